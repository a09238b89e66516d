"""Centroid routers against hidden states captured independently, layer by layer, and the
negative text sets subtracted from them."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeme.checkpoint import Checkpoint
from mergeme.config import CentroidSettings, MergeConfig, NegativeTextsConfig, RouterConfig
from mergeme.errors import DataError
from mergeme.merge.moe_builder import build_moe
from mergeme.routing.calibrate import calibrate_routers
from mergeme.routing.centroid import centroid_routers, load_negative_texts


def _merged(tiny_family, tmp_path):
    base = Checkpoint(tiny_family.base)
    experts = [Checkpoint(p, name=d) for d, p in tiny_family.experts.items()]
    build_moe(base, experts, tmp_path / "moe", MergeConfig())
    return tmp_path / "moe"


def _post_attention_means(model, tokenizer, texts, layer):
    """Mean of post_attention_layernorm's output at ``layer`` over real tokens."""
    captured = []
    hook = model.model.layers[layer].post_attention_layernorm.register_forward_hook(
        lambda _m, _i, output: captured.append(output)
    )
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**encoded)
    hook.remove()
    mask = encoded["attention_mask"].bool()
    return captured[0][mask].mean(0)


TEXTS = [
    ["Ann has 3 apples. Answer: 3", "Bo has 12 pens and buys 4. Answer: 16"],
    ["def f(x):\n    return x + 1", "import os\nprint(os.sep)"],
    ["The alpha-2 code of Norway is NO.", "Q: What is the currency of Japan? A: Yen"],
]


def test_rows_are_normalised_domain_means_of_the_router_input(tiny_family, tmp_path):
    folder = _merged(tiny_family, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    routers = centroid_routers(model, tokenizer, TEXTS, max_length=64, batch_size=1)

    for layer in range(len(routers)):
        means = torch.stack([_post_attention_means(reference, tokenizer, t, layer) for t in TEXTS])
        expected = means / means.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(routers[layer], expected, rtol=1e-4, atol=1e-5)
        # layer l+1 sees what the calibrated router of layer l sends it
        with torch.no_grad():
            reference.model.layers[layer].mlp.gate.weight.copy_(expected)


def test_calibration_writes_a_new_checkpoint_and_keeps_the_merged_one(tiny_family, tmp_path):
    folder = _merged(tiny_family, tmp_path)
    with Checkpoint(folder) as merged:
        random_router = merged.get("model.layers.0.block_sparse_moe.gate.weight")

    report = calibrate_routers(folder, tmp_path / "calibrated", TEXTS, RouterConfig())

    with Checkpoint(tmp_path / "calibrated") as calibrated, Checkpoint(folder) as merged:
        new_router = calibrated.get("model.layers.0.block_sparse_moe.gate.weight")
        assert torch.equal(merged.get("model.layers.0.block_sparse_moe.gate.weight"), random_router)
        assert not torch.equal(new_router, random_router)
        torch.testing.assert_close(new_router.norm(dim=-1), torch.ones(3))
        name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
        assert torch.equal(calibrated.get(name), merged.get(name))
    assert report.method == "centroid" and report.texts_per_expert == [2, 2, 2]


NEGATIVE = ["Hello there, how are you today?", "Thanks, and goodbye."]


def test_negative_texts_are_subtracted_from_every_row_before_normalising(tiny_family, tmp_path):
    folder = _merged(tiny_family, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    routers = centroid_routers(
        model,
        tokenizer,
        TEXTS,
        max_length=64,
        batch_size=1,
        negative="texts",
        negative_weight=0.5,
        negative_texts=NEGATIVE,
    )

    for layer in range(len(routers)):
        means = torch.stack([_post_attention_means(reference, tokenizer, t, layer) for t in TEXTS])
        negative = _post_attention_means(reference, tokenizer, NEGATIVE, layer)
        rows = means - 0.5 * negative
        expected = rows / rows.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(routers[layer], expected, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            reference.model.layers[layer].mlp.gate.weight.copy_(expected)


def test_a_negative_text_file_reads_the_same_as_jsonl_or_txt(tiny_family, tmp_path):
    folder = _merged(tiny_family, tmp_path)
    (tmp_path / "negative.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in NEGATIVE))
    (tmp_path / "negative.txt").write_text("\n\n".join(NEGATIVE) + "\n")
    reports = {}
    for name in ("negative.jsonl", "negative.txt", None):
        centroid = CentroidSettings(
            negative="texts" if name else "none",
            negative_texts=NegativeTextsConfig(path=tmp_path / name) if name else None,
        )
        reports[name] = calibrate_routers(
            folder, tmp_path / f"out-{name}", TEXTS, RouterConfig(centroid=centroid)
        )
    router = "model.layers.1.block_sparse_moe.gate.weight"
    with (
        Checkpoint(tmp_path / "out-negative.jsonl") as jsonl,
        Checkpoint(tmp_path / "out-negative.txt") as txt,
        Checkpoint(tmp_path / "out-None") as plain,
    ):
        assert torch.equal(jsonl.get(router), txt.get(router))
        assert not torch.allclose(jsonl.get(router), plain.get(router), atol=1e-3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "does not exist"),
        ("negative.csv", "text\nhello\n", "must be a .jsonl or a .txt file"),
        ("negative.jsonl", '{"text": "ok"}\n{"text": oops}\n', "line 2: not valid JSON"),
        ("negative.jsonl", '{"text": "ok"}\n\n{"prompt": "no"}\n', "line 3: needs a non-empty"),
        ("negative.txt", "\n  \n", "holds no negative texts"),
    ],
)
def test_bad_negative_text_files_are_refused_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_negative_texts(NegativeTextsConfig(path=path))
    assert str(path) in str(error.value)


def test_only_the_first_max_texts_negative_texts_are_read(tmp_path):
    path = tmp_path / "negative.txt"
    path.write_text("one\ntwo\nthree\n")
    assert load_negative_texts(NegativeTextsConfig(path=path, max_texts=2)) == ["one", "two"]
