"""A corpus of broken inputs, each built from the tiny family and the DVC project's data.

Every entry writes a pipeline config into a folder and says what validation must report:
the problem kinds (``kinds``), or, for a config that cannot load, fragments of the
ConfigError (``config_error``).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import write_pipeline_config
from tests.factories import TinyFamily, random_llama, tiny_llama_config

WEIGHTS = "model.safetensors"
MATH_DATA = ("math", "calibration.jsonl")


@dataclass(frozen=True)
class BrokenInput:
    name: str
    build: Callable[[Path, TinyFamily, Path], Path]  # (folder, family, dvc project) -> config
    kinds: frozenset[str] = frozenset()
    config_error: tuple[str, ...] = ()


# -- helpers ------------------------------------------------------------------------------


def copy_expert(family: TinyFamily, folder: Path, domain: str = "math") -> Path:
    target = folder / f"broken-{domain}"
    shutil.copytree(family.experts[domain], target)
    return target


def config_with(folder: Path, family: TinyFamily, project: Path, **sections) -> Path:
    """A config over ``family`` whose data is a copy of the project's (no dvc.lock check unless
    ``data`` is given), registering into the folder's sqlite store."""
    data = folder / "data"
    if not data.exists():
        shutil.copytree(project / "data" / "demo", data)
    sections.setdefault("data", {"root": str(data)})
    sections.setdefault(
        "registry",
        {
            "model_name": "tiny-moe",
            "experiment": "corpus",
            "tracking_uri": f"sqlite:///{folder.parent / 'corpus-mlflow.db'}",
        },
    )
    return write_pipeline_config(folder, family, project, **sections)


def with_expert(family: TinyFamily, domain: str, path: Path) -> TinyFamily:
    return replace(family, experts={**family.experts, domain: path})


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def shard(folder: Path) -> dict[str, str]:
    """Split ``model.safetensors`` into two shards and an index; returns the weight map."""
    tensors = load_file(folder / WEIGHTS)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2]}
    halves["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (folder / WEIGHTS).unlink()
    write_index(folder, weight_map)
    return weight_map


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _checkpoint_case(mutate: Callable[[Path, TinyFamily], None], domain: str = "math"):
    def build(folder: Path, family: TinyFamily, project: Path) -> Path:
        broken = copy_expert(family, folder, domain)
        mutate(broken, family)
        return config_with(folder, with_expert(family, domain, broken), project)

    return build


def _data_case(mutate: Callable[[Path], None], **sections):
    def build(folder: Path, family: TinyFamily, project: Path) -> Path:
        shutil.copytree(project / "data" / "demo", folder / "data")
        mutate(folder / "data")
        return config_with(folder, family, project, **sections)

    return build


# -- checkpoint files ---------------------------------------------------------------------


def truncate(folder: Path, _family) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:-100])


def lie_about_offsets(folder: Path, _family) -> None:
    # move one tensor's span by 4 bytes (a gap before it and an overlap after), then write a
    # well-formed file around that header with the same data bytes
    data = (folder / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    entry = header["model.layers.0.mlp.up_proj.weight"]
    entry["data_offsets"] = [offset + 4 for offset in entry["data_offsets"]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def set_value(value: float) -> Callable[[Path, TinyFamily], None]:
    def mutate(folder: Path, _family) -> None:
        def edit(tensors):
            tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = value

        edit_tensors(folder, edit)

    return mutate


def to_float64(folder: Path, _family) -> None:
    def edit(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].double()

    edit_tensors(folder, edit)


def missing_shard(folder: Path, _family) -> None:
    shard(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()


def index_names_absent_tensor(folder: Path, _family) -> None:
    weight_map = shard(folder)
    weight_map["model.layers.0.mlp.extra.weight"] = "model-00001-of-00002.safetensors"
    write_index(folder, weight_map)


def index_escapes(folder: Path, _family) -> None:
    weight_map = shard(folder)
    outside = folder.parent / "outside.safetensors"
    shutil.copy(folder / "model-00002-of-00002.safetensors", outside)
    escaped = {n: "../outside.safetensors" if "00002" in f else f for n, f in weight_map.items()}
    write_index(folder, escaped)


def symlink_escapes(folder: Path, _family) -> None:
    shard(folder)
    target = folder / "model-00002-of-00002.safetensors"
    outside = folder.parent / "elsewhere.safetensors"
    target.rename(outside)
    target.symlink_to(outside)


def shapes_disagree_with_config(folder: Path, _family) -> None:
    edit_config(folder, num_key_value_heads=4)


def add_stray_tensor(folder: Path, _family) -> None:
    edit_tensors(folder, lambda tensors: tensors.update({"model.extra.weight": torch.ones(3)}))


def remove_config(folder: Path, _family) -> None:
    (folder / "config.json").unlink()


def garble_config(folder: Path, _family) -> None:
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def needs_remote_code(folder: Path, _family) -> None:
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})


def pickle_only(folder: Path, _family) -> None:
    tensors = load_file(folder / WEIGHTS)
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / WEIGHTS).unlink()


# -- compatibility ------------------------------------------------------------------------


def other_vocabulary(folder: Path, family: TinyFamily) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(folder)


def other_tokenizer(folder: Path, _family) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zzz-extra"] = 10_000
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


def swap_token_ids(folder: Path, _family) -> None:
    """Swap the ids of two tokens in tokenizer.json: same byte size, different content."""
    path = folder / "tokenizer.json"
    text = path.read_text()
    by_id = {i: t for t, i in json.loads(text)["model"]["vocab"].items()}
    lines = [f"{json.dumps(by_id[i])}: {i}," for i in (40, 41)]
    assert all(text.count(line) == 1 for line in lines)
    swapped = [f"{json.dumps(by_id[i])}: {j}," for i, j in ((40, 41), (41, 40))]
    edited = text.replace(lines[0], "\0").replace(lines[1], swapped[1]).replace("\0", swapped[0])
    assert len(edited.encode()) == len(text.encode()) and edited != text
    path.write_text(edited)


def tokenizer_names_custom_code(folder: Path, _family) -> None:
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


def other_architecture(folder: Path, family: TinyFamily) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = json.loads((family.base / "config.json").read_text())["vocab_size"]
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4))
    for file in folder.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(folder)


def unrelated_weights(folder: Path, family: TinyFamily) -> None:
    base = json.loads((family.base / "config.json").read_text())
    config = tiny_llama_config(
        vocab_size=base["vocab_size"],
        **{k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    random_llama(config, seed=99).save_pretrained(folder)


def identical_experts(folder: Path, family: TinyFamily, project: Path) -> Path:
    twin = folder / "twin-of-math"
    shutil.copytree(family.experts["math"], twin)
    return config_with(folder, with_expert(family, "code", twin), project)


# -- data ---------------------------------------------------------------------------------


def empty_calibration(data: Path) -> None:
    (data / "math" / "calibration.jsonl").write_text("")


def append_line(domain: str, split: str, line: bytes) -> Callable[[Path], None]:
    def mutate(data: Path) -> None:
        with open(data / domain / f"{split}.jsonl", "ab") as stream:
            stream.write(line + b"\n")

    return mutate


def leak_eval(data: Path) -> None:
    first_eval = (data / "math" / "eval.jsonl").read_text().splitlines()[0]
    with open(data / "math" / "calibration.jsonl", "a") as stream:
        stream.write(first_eval + "\n")


def leak_eval_respaced(data: Path) -> None:
    first_eval = json.loads((data / "math" / "eval.jsonl").read_text().splitlines()[0])
    respaced = "  " + "\t ".join(first_eval["text"].split(" ")) + "\n"
    with open(data / "math" / "calibration.jsonl", "a") as stream:
        stream.write(json.dumps({"domain": "math", "text": respaced}) + "\n")


def remove_eval(data: Path) -> None:
    (data / "knowledge" / "eval.jsonl").unlink()


def data_off_the_lock(folder: Path, family: TinyFamily, project: Path) -> Path:
    copy = folder / "project"
    shutil.copytree(project, copy)
    with open(copy / "data" / "demo" / "math" / "eval.jsonl", "a") as stream:
        stream.write('{"domain": "math", "text": "An edit nobody committed."}\n')
    data = {"root": str(copy / "data" / "demo"), "dvc_lock": str(copy / "dvc.lock")}
    return config_with(folder, family, project, data=data)


def data_outside_the_lock(folder: Path, family: TinyFamily, project: Path) -> Path:
    # an unchanged copy of the locked data, elsewhere: the lock does not identify it
    copy = folder / "copied-data"
    shutil.copytree(project / "data" / "demo", copy)
    data = {"root": str(copy), "dvc_lock": str(project / "dvc.lock")}
    return config_with(folder, family, project, data=data)


def lock_outside_a_repository(folder: Path, family: TinyFamily, project: Path) -> Path:
    loose = folder / "no-dvc-repo"
    shutil.copytree(project / "data", loose / "data")
    shutil.copy(project / "dvc.lock", loose / "dvc.lock")
    data = {"root": str(loose / "data" / "demo"), "dvc_lock": str(loose / "dvc.lock")}
    return config_with(folder, family, project, data=data)


# -- configuration ------------------------------------------------------------------------


def bad_keys_and_types(folder: Path, family: TinyFamily, project: Path) -> Path:
    path = config_with(folder, family, project)
    config = yaml.safe_load(path.read_text())
    config["merge"] = {"trunk_method": "average", "colour": "blue"}
    config["router"]["max_length"] = "long"
    config["data"]["allow_uncommitted"] = "perhaps"
    path.write_text(yaml.safe_dump(config))
    return path


def single_expert(folder: Path, family: TinyFamily, project: Path) -> Path:
    path = config_with(folder, family, project)
    config = yaml.safe_load(path.read_text())
    config["experts"] = config["experts"][:1]
    path.write_text(yaml.safe_dump(config))
    return path


def field_and_cross_field_errors(folder: Path, family: TinyFamily, project: Path) -> Path:
    path = config_with(folder, family, project)
    config = yaml.safe_load(path.read_text())
    config["merge"] = {"density": 2, "experts_per_token": 5}
    config["validation"] = {"min_text_chars": 50, "max_text_chars": 10, "allow_remote_code": "sure"}
    path.write_text(yaml.safe_dump(config))
    return path


def _kinds(*kinds: str) -> frozenset[str]:
    return frozenset(kinds)


CORPUS = [
    BrokenInput("truncated-shard", _checkpoint_case(truncate), _kinds("shard_truncated")),
    BrokenInput("header-lies", _checkpoint_case(lie_about_offsets), _kinds("header_invalid")),
    BrokenInput("nan-tensor", _checkpoint_case(set_value(float("nan"))), _kinds("non_finite")),
    BrokenInput("inf-tensor", _checkpoint_case(set_value(float("inf"))), _kinds("non_finite")),
    BrokenInput("float64-tensor", _checkpoint_case(to_float64), _kinds("dtype_not_allowed")),
    BrokenInput("missing-shard", _checkpoint_case(missing_shard), _kinds("shard_missing")),
    BrokenInput(
        "index-names-absent-tensor",
        _checkpoint_case(index_names_absent_tensor),
        _kinds("index_tensor_absent"),
    ),
    BrokenInput("index-path-escapes", _checkpoint_case(index_escapes), _kinds("index_path_escape")),
    BrokenInput(
        "shard-symlink-escapes", _checkpoint_case(symlink_escapes), _kinds("index_path_escape")
    ),
    BrokenInput(
        "shapes-disagree-with-config",
        _checkpoint_case(shapes_disagree_with_config),
        _kinds("shape_config_mismatch", "architecture_mismatch"),
    ),
    BrokenInput(
        # the base lacks the tensor too, so the comparison with it names the tensor as well
        "stray-tensor",
        _checkpoint_case(add_stray_tensor),
        _kinds("tensor_unexpected", "tensor_mismatch"),
    ),
    BrokenInput("missing-config", _checkpoint_case(remove_config), _kinds("config_missing")),
    BrokenInput(
        "unparseable-config", _checkpoint_case(garble_config), _kinds("config_unparseable")
    ),
    BrokenInput("remote-code", _checkpoint_case(needs_remote_code), _kinds("remote_code")),
    BrokenInput("pickle-only", _checkpoint_case(pickle_only), _kinds("pickle_weights")),
    BrokenInput("other-vocabulary", _checkpoint_case(other_vocabulary), _kinds("vocab_mismatch")),
    BrokenInput("other-tokenizer", _checkpoint_case(other_tokenizer), _kinds("tokenizer_mismatch")),
    BrokenInput(
        "same-size-tokenizer-swap", _checkpoint_case(swap_token_ids), _kinds("tokenizer_mismatch")
    ),
    BrokenInput(
        "tokenizer-names-custom-code",
        _checkpoint_case(tokenizer_names_custom_code),
        _kinds("remote_code", "tokenizer_mismatch"),
    ),
    BrokenInput(
        "other-architecture",
        _checkpoint_case(other_architecture),
        _kinds("architecture_mismatch", "architecture_unsupported"),
    ),
    BrokenInput("not-derived", _checkpoint_case(unrelated_weights), _kinds("not_derived")),
    BrokenInput("identical-experts", identical_experts, _kinds("duplicate_expert")),
    BrokenInput("empty-calibration", _data_case(empty_calibration), _kinds("data_empty")),
    BrokenInput(
        "unknown-domain",
        _data_case(append_line("math", "eval", b'{"domain": "poetry", "text": "Roses."}')),
        _kinds("data_unknown_domain"),
    ),
    BrokenInput(
        "non-utf8-text",
        _data_case(append_line("code", "calibration", b'{"domain": "code", "text": "x = \xff"}')),
        _kinds("data_not_utf8"),
    ),
    BrokenInput(
        "missing-text-field",
        _data_case(append_line("math", "eval", b'{"domain": "math", "body": "2 + 2"}')),
        _kinds("data_columns", "data_text_empty"),
    ),
    BrokenInput(
        "over-long-text",
        # a bound from the config (demo texts are at most 200 characters)
        _data_case(
            append_line("math", "eval", b'{"domain": "math", "text": "' + b"9" * 400 + b'"}'),
            validation={"max_text_chars": 300},
        ),
        _kinds("data_length"),
    ),
    BrokenInput(
        "null-domain",
        _data_case(append_line("math", "eval", b'{"domain": null, "text": "Whose is this?"}')),
        _kinds("data_unknown_domain"),
    ),
    BrokenInput(
        "text-is-a-list",
        _data_case(append_line("code", "eval", b'{"domain": "code", "text": ["x = 1"]}')),
        _kinds("data_not_string"),
    ),
    BrokenInput(
        "row-in-another-domains-file",
        _data_case(append_line("math", "calibration", b'{"domain": "code", "text": "x = 1"}')),
        _kinds("data_domain_mismatch"),
    ),
    BrokenInput("eval-leaks-into-calibration", _data_case(leak_eval), _kinds("data_leak")),
    BrokenInput(
        "eval-leaks-with-other-whitespace", _data_case(leak_eval_respaced), _kinds("data_leak")
    ),
    BrokenInput("missing-eval-file", _data_case(remove_eval), _kinds("data_missing")),
    BrokenInput("data-differs-from-dvc-lock", data_off_the_lock, _kinds("data_uncommitted")),
    BrokenInput("data-outside-the-lock", data_outside_the_lock, _kinds("data_untracked")),
    BrokenInput(
        "dvc-lock-outside-a-repository", lock_outside_a_repository, _kinds("data_lock_unusable")
    ),
    BrokenInput(
        "unknown-keys-and-wrong-types",
        bad_keys_and_types,
        config_error=(
            "merge.colour: unknown key",
            "router.max_length: Input should be a valid integer",
            "data.allow_uncommitted: Input should be a valid boolean",
        ),
    ),
    BrokenInput(
        "field-and-cross-field-errors",
        field_and_cross_field_errors,
        config_error=(
            "4 problem(s)",
            "merge.density: Input should be less than or equal to 1; write 1.0 or less",
            "validation.allow_remote_code: Input should be a valid boolean",
            "merge.experts_per_token: 5 is more than the 3 experts; set it to at most 3",
            "validation.min_text_chars: 50 is above validation.max_text_chars 10",
        ),
    ),
    BrokenInput("single-expert", single_expert, config_error=("experts: List should have",)),
]
