"""The streaming merge engine end to end: every trunk method, output dtype, seeded
determinism, the params a release logs, and pickle checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mergeme.checkpoint import Checkpoint
from mergeme.config import MergeConfig
from mergeme.errors import CheckpointError
from mergeme.merge.moe_builder import build_moe
from mergeme.merge.plan import trunk_parameters
from mergeme.merge.trunk_methods import TRUNK_METHODS, merge_trunk_tensor
from tests.factories import perturbed, random_llama, tiny_llama_config
from tests.merge.plain_merges import plain_merge

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama base and three fine-tunes of it, saved as safetensors."""
    root = tmp_path_factory.mktemp("family")
    base = random_llama(tiny_llama_config(), seed=1)
    base.save_pretrained(root / "base")
    for index in range(3):
        perturbed(base, seed=30 + index, scale=0.05).save_pretrained(root / f"e{index}")
    return root


def _open(root):
    return Checkpoint(root / "base"), [Checkpoint(root / f"e{i}") for i in range(3)]


def _merge(root, out, **settings):
    base, experts = _open(root)
    return build_moe(base, experts, out, MergeConfig(**settings))


def _weights(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("method", sorted(TRUNK_METHODS))
def test_every_trunk_method_merges_in_float32_and_writes_the_requested_dtype(
    family, tmp_path, method
):
    report = _merge(family, tmp_path / "moe", trunk_method=method, output_dtype="bfloat16", seed=3)
    written = _weights(tmp_path / "moe")

    assert {tensor.dtype for tensor in written.values()} == {torch.bfloat16}
    base, experts = _open(family)
    expert_q = [e.get(Q_PROJ) for e in experts]  # float32 (out, in) each
    base_q = base.get(Q_PROJ)
    if method == "base":
        expected = base_q
    elif method == "average":
        expected = torch.stack(expert_q).mean(0)
    elif method == "task_arithmetic":
        expected = base_q + (torch.stack(expert_q) - base_q).sum(0) / 3
    else:  # the sparse methods, written out plainly in float64 with the paper's defaults
        settings = dict(weights=None, density=0.8, scale=1 / 3, agreement="sum", seed=3)
        expected = plain_merge(method, base_q, expert_q, name=Q_PROJ, **settings)
    # one bfloat16 rounding apart at most (float32 here, float64 in the plain version)
    torch.testing.assert_close(written[Q_PROJ].float(), expected.float(), rtol=2**-8, atol=1e-6)

    # the engine reads its inputs from the files, chunk by chunk: the same bytes as in memory
    in_memory = merge_trunk_tensor(
        method, base_q, expert_q, seed=3, tensor_name=Q_PROJ, out_dtype=torch.bfloat16
    )
    assert torch.equal(written[Q_PROJ], in_memory)
    assert report.trunk_method == method


def test_dare_ties_gives_identical_bytes_for_one_seed_and_other_bytes_for_another(family, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        _merge(family, tmp_path / name, trunk_method="dare_ties", seed=seed, density=0.5)
    read = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}

    assert read["a"] == read["b"]
    assert read["a"] != read["c"]
    differs = [
        name
        for name, tensor in _weights(tmp_path / "a").items()
        if not torch.equal(tensor, _weights(tmp_path / "c")[name])
    ]
    assert Q_PROJ in differs  # the trunk changes with the seed ...
    assert not any(".experts." in name for name in differs)  # ... the routed experts do not


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("base", {}),
        ("average", {}),
        ("task_arithmetic", {"scale": 0.5}),
        ("ties", {"density": 0.6, "scale": 0.5, "ties_agreement": "mean"}),
        ("dare_linear", {"density": 0.6, "scale": 0.5, "seed": 9}),
        ("dare_ties", {"density": 0.6, "scale": 0.5, "ties_agreement": "mean", "seed": 9}),
    ],
)
def test_trunk_parameters_are_those_the_method_uses(method, expected):
    settings = MergeConfig(
        trunk_method=method, density=0.6, scale=0.5, ties_agreement="mean", seed=9
    )
    assert trunk_parameters(settings) == expected
    weighted = settings.model_copy(update={"expert_weights": [1.0, 2.0]})
    assert trunk_parameters(weighted) == {**expected, "expert_weights": [1.0, 2.0]}


def test_a_release_logs_the_trunk_parameters_as_mlflow_params(tmp_path):
    import mlflow
    from mergeme.config import PipelineConfig
    from mergeme.pipeline import release_params
    from mergeme.registry.release import flatten

    source = {"source": {"kind": "local", "path": str(tmp_path)}}
    config = PipelineConfig(
        base=source,
        experts=[{"name": n, "domain": n, **source} for n in ("a", "b")],
        merge={"trunk_method": "dare_ties", "density": 0.7, "seed": 4, "expert_weights": [1, 3]},
        data={"root": str(tmp_path)},
        registry={"model_name": "m"},
    )
    merged = {"trunk_parameters": trunk_parameters(config.merge)}

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("params", artifact_location=str(tmp_path / "art"))
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_params(flatten("", release_params(config, merged)))
    params = mlflow.get_run(run.info.run_id).data.params

    assert params["merge.trunk_method"] == "dare_ties"
    assert params["trunk.density"] == "0.7" and params["trunk.seed"] == "4"
    assert params["trunk.scale"] == str(1 / 3) and params["trunk.ties_agreement"] == "sum"
    assert params["trunk.expert_weights"] == "[1.0, 3.0]"


def _save_as_pickle(source: Checkpoint, folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(source.config))
    torch.save(dict(source.iter_tensors()), folder / "pytorch_model.bin")


def test_a_pickle_checkpoint_is_refused_unless_allowed_then_merges_like_safetensors(
    family, tmp_path
):
    base, experts = _open(family)
    for index, expert in enumerate(experts):
        _save_as_pickle(expert, tmp_path / f"p{index}")

    with pytest.raises(CheckpointError, match=r"p0/pytorch_model\.bin.*merge\.allow_pickle: true"):
        Checkpoint(tmp_path / "p0")
    pickled = [Checkpoint(tmp_path / f"p{i}", allow_pickle=True) for i in range(3)]

    # safetensors experts are copied file to file, pickled ones go through torch: same bytes
    settings = MergeConfig(trunk_method="ties", allow_pickle=True)
    build_moe(base, experts, tmp_path / "from_safetensors", settings)
    build_moe(base, pickled, tmp_path / "from_pickle", settings)
    assert (tmp_path / "from_safetensors" / "model.safetensors").read_bytes() == (
        tmp_path / "from_pickle" / "model.safetensors"
    ).read_bytes()


class _NotATensor:
    pass


def test_a_pickle_that_is_not_plain_weights_is_refused_even_when_allowed(family, tmp_path):
    base, _ = _open(family)
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(base.config))
    torch.save({"weight": _NotATensor()}, folder / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match="cannot be loaded with weights_only=True"):
        Checkpoint(folder, allow_pickle=True)


def test_output_dtype_auto_keeps_the_base_dtype(tmp_path):
    dense = random_llama(tiny_llama_config(), seed=6).to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "dense")
    checkpoint = Checkpoint(tmp_path / "dense")

    build_moe(checkpoint, [checkpoint, checkpoint], tmp_path / "moe", MergeConfig(seed=1))

    assert MergeConfig().output_dtype == "auto"
    assert {t.dtype for t in _weights(tmp_path / "moe").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["dtype"] == "bfloat16"
    # the routed experts are byte copies of the bfloat16 inputs
    size = sum(f.stat().st_size for f in (tmp_path / "moe").glob("*.safetensors"))
    assert size < 2 * sum(f.stat().st_size for f in (tmp_path / "dense").glob("*.safetensors"))
