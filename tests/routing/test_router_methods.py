"""Router methods: the registry, ppl_probe labels and fits, the load-balancing loss and
finetune, each checked against an independent computation."""

from __future__ import annotations

import logging
import typing

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mergeme.checkpoint import Checkpoint
from mergeme.config import (
    CentroidSettings,
    FinetuneSettings,
    MergeConfig,
    ProbeSettings,
    RouterConfig,
    RouterMethodName,
)
from mergeme.merge.moe_builder import build_moe
from mergeme.routing.calibrate import calibrate_routers
from mergeme.routing.centroid import subtract_other_means
from mergeme.routing.diagnostics import condition_number, warn_on_ill_conditioned
from mergeme.routing.finetune import layer_balance_loss, load_balancing_loss
from mergeme.routing.methods import ROUTER_METHODS
from mergeme.routing.ppl_probe import fit_least_squares, fit_logistic, perplexity_labels

TEXTS = [
    ["Ann has 3 apples. Answer: 3", "Bo has 12 pens and buys 4. Answer: 16"],
    ["def f(x):\n    return x + 1", "import os\nprint(os.sep)"],
    ["The alpha-2 code of Norway is NO.", "Q: What is the currency of Japan? A: Yen"],
]
ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"


@pytest.fixture(scope="module")
def merged(tiny_family, tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe") / "moe"
    experts = [Checkpoint(p, name=d) for d, p in tiny_family.experts.items()]
    build_moe(Checkpoint(tiny_family.base), experts, folder, MergeConfig())
    return folder


def test_registry_covers_every_configurable_method():
    assert set(ROUTER_METHODS) == set(typing.get_args(RouterMethodName))
    for name, method in ROUTER_METHODS.items():
        assert method.name == name and method.reference and method.summary


def test_probe_labels_are_the_argmin_of_each_experts_own_loss(tiny_family):
    texts = [text for group in TEXTS for text in group]
    paths = list(tiny_family.experts.values())

    labels, losses = perplexity_labels(paths, texts, max_length=64, batch_size=4)

    # independently: one text at a time, transformers' own loss of each dense expert
    expected = torch.zeros(len(texts), len(paths))
    for column, path in enumerate(paths):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        for row, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                expected[row, column] = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, expected.argmin(dim=1))


def test_least_squares_fit_equals_lstsq_of_the_augmented_system():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 6, generator=generator)
    labels = torch.randint(0, 3, (50,), generator=generator)
    ridge = 0.1

    weight = fit_least_squares(hidden, labels, 3, ridge)

    # ridge as ordinary least squares on [H; sqrt(ridge·n)·I] against [Y; 0]
    augmented = torch.cat([hidden, (ridge * 50) ** 0.5 * torch.eye(6)]).double()
    targets = torch.cat([torch.nn.functional.one_hot(labels, 3), torch.zeros(6, 3)]).double()
    expected = torch.linalg.lstsq(augmented, targets).solution.T.float()
    torch.testing.assert_close(weight, expected, rtol=1e-4, atol=1e-5)


def _layer0_router_inputs(merged, texts, labels):
    """Layer 0's router input of every token, from post_attention_layernorm, with its label."""
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    rows, row_labels = [], []
    norm = model.model.layers[0].post_attention_layernorm
    for text, label in zip(texts, labels):
        captured = []
        hook = norm.register_forward_hook(lambda _m, _i, out, c=captured: c.append(out))
        with torch.no_grad():
            model(**tokenizer(text, return_tensors="pt"))
        hook.remove()
        rows.append(captured[0][0])
        row_labels += [int(label)] * captured[0].shape[1]
    return torch.cat(rows), torch.tensor(row_labels)


def test_probe_router_of_layer_0_fits_the_merged_models_own_hidden_states(
    tiny_family, merged, tmp_path
):
    settings = RouterConfig(method="ppl_probe", probe=ProbeSettings(fit="least_squares"))
    paths = list(tiny_family.experts.values())
    report = calibrate_routers(merged, tmp_path / "probe", TEXTS, settings, expert_paths=paths)

    # independently: labels, then layer 0's router input from post_attention_layernorm
    texts = [text for group in TEXTS for text in group]
    labels, _ = perplexity_labels(paths, texts, max_length=128)
    hidden, token_labels = _layer0_router_inputs(merged, texts, labels)
    expected = fit_least_squares(hidden, token_labels, 3, 1e-3)

    with Checkpoint(tmp_path / "probe") as calibrated:
        torch.testing.assert_close(calibrated.get(ROUTER.format(0)), expected, rtol=1e-3, atol=1e-4)
    assert report.probe_label_counts == torch.bincount(labels, minlength=3).tolist()


def test_logistic_fit_reaches_the_maximum_likelihood_found_by_lbfgs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 6, generator=generator)
    truth = torch.randn(3, 6, generator=generator)
    probabilities = torch.softmax(hidden @ truth.T, dim=-1)
    labels = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)  # overlapping
    settings = ProbeSettings()  # the default fit, steps and learning rate

    weight = fit_logistic(hidden, labels, 3, settings.steps, settings.learning_rate)

    # independently: L-BFGS in float64 on the same likelihood; rows are only defined up to a
    # shared shift (no bias), so compare the predicted probabilities
    solution = torch.zeros(3, 6, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [solution], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(hidden.double() @ solution.T, labels)
        loss.backward()
        return loss

    optimiser.step(closure)
    expected = torch.softmax(hidden.double() @ solution.detach().T, dim=-1).float()
    torch.testing.assert_close(torch.softmax(hidden @ weight.T, -1), expected, atol=1e-4, rtol=0)


def test_default_probe_router_of_layer_0_is_the_logistic_fit_of_its_hidden_states(
    tiny_family, merged, tmp_path
):
    settings = RouterConfig(method="ppl_probe")
    assert settings.probe.fit == "logistic"  # the default is what this test covers
    paths = list(tiny_family.experts.values())
    calibrate_routers(merged, tmp_path / "probe", TEXTS, settings, expert_paths=paths)

    texts = [text for group in TEXTS for text in group]
    labels, _ = perplexity_labels(paths, texts, max_length=128)
    hidden, token_labels = _layer0_router_inputs(merged, texts, labels)
    probe = settings.probe
    expected = fit_logistic(hidden, token_labels, 3, probe.steps, probe.learning_rate, seed=0)
    with Checkpoint(tmp_path / "probe") as calibrated:
        torch.testing.assert_close(calibrated.get(ROUTER.format(0)), expected, rtol=1e-3, atol=1e-4)


def test_finetune_starts_from_the_ppl_probe_routers(tiny_family, merged, tmp_path):
    paths = list(tiny_family.experts.values())
    calibrate_routers(
        merged, tmp_path / "probe", TEXTS, RouterConfig(method="ppl_probe"), expert_paths=paths
    )
    calibrate_routers(merged, tmp_path / "centroid", TEXTS, RouterConfig(method="centroid"))
    rate = 1e-3
    finetune = FinetuneSettings(init="ppl_probe", steps=1, batch_size=2, learning_rate=rate)
    settings = RouterConfig(method="finetune", finetune=finetune)
    report = calibrate_routers(merged, tmp_path / "tuned", TEXTS, settings, expert_paths=paths)

    # AdamW's first step moves every entry by at most the learning rate
    assert sum(report.probe_label_counts) == 6
    with (
        Checkpoint(tmp_path / "tuned") as tuned,
        Checkpoint(tmp_path / "probe") as probe,
        Checkpoint(tmp_path / "centroid") as centroid,
    ):
        for layer in range(2):
            name = ROUTER.format(layer)
            moved = (tuned.get(name) - probe.get(name)).abs()
            assert 0 < moved.max() <= rate * 1.001
            assert (tuned.get(name) - centroid.get(name)).abs().max() > 10 * rate


def test_load_balancing_loss_equals_a_hand_computation():
    logits = torch.tensor(
        [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.5, 0.2, 0.1]]
    )  # (tokens, experts)
    mask = torch.tensor([1, 1, 1, 0])  # the last token is padding

    # by hand: top-2 of the three real tokens are {0,1}, {1,2}, {2,0}
    share = torch.tensor([2 / 3, 2 / 3, 2 / 3])
    probs = torch.softmax(logits[:3], dim=-1).mean(0)
    expected = 3 * (share * probs).sum()

    torch.testing.assert_close(layer_balance_loss(logits, 2, mask), expected)
    two_layers = load_balancing_loss((logits, logits * 0.5), 2, mask)
    torch.testing.assert_close(
        two_layers, expected + layer_balance_loss(logits * 0.5, 2, mask), rtol=0, atol=0
    )
    # transformers' Mixtral loss agrees for a single layer
    reference = load_balancing_loss_func((logits,), 3, top_k=2, attention_mask=mask[None])
    torch.testing.assert_close(layer_balance_loss(logits, 2, mask), reference)


def test_finetune_routers_only_changes_nothing_but_routers(merged, tmp_path):
    settings = RouterConfig(
        method="finetune", finetune=FinetuneSettings(steps=3, batch_size=2, learning_rate=0.05)
    )
    report = calibrate_routers(merged, tmp_path / "tuned", TEXTS, settings)

    assert len(report.loss_curves["loss"]) == 3
    routers = {ROUTER.format(layer) for layer in range(2)}
    with Checkpoint(tmp_path / "tuned") as tuned, Checkpoint(merged) as source:
        assert tuned.tensor_names() == source.tensor_names()
        for name in source.tensor_names():
            same = tuned.get(name).numpy().tobytes() == source.get(name).numpy().tobytes()
            assert same == (name not in routers), name


def test_finetune_routers_and_trunk_keeps_the_experts(merged, tmp_path):
    finetune = FinetuneSettings(scope="routers_and_trunk", init="random", steps=2, batch_size=2)
    settings = RouterConfig(method="finetune", finetune=finetune)
    calibrate_routers(merged, tmp_path / "tuned", TEXTS, settings)
    with Checkpoint(tmp_path / "tuned") as tuned, Checkpoint(merged) as source:
        for name in source.tensor_names():
            same = torch.equal(tuned.get(name), source.get(name))
            assert same == (".experts." in name), name


def test_negative_set_and_the_conditioning_warning(merged, tmp_path, caplog):
    means = torch.tensor([[3.0, 0.0], [1.0, 2.0], [2.0, 4.0]])
    expected = torch.tensor([[1.5, -3.0], [-1.5, 0.0], [0.0, 3.0]])  # minus others' mean
    torch.testing.assert_close(subtract_other_means(means, 1.0), expected)

    parallel = torch.tensor([[1.0, 0.0], [1.0, 1e-4]])
    assert condition_number(parallel) > 1e4
    with caplog.at_level(logging.WARNING, logger="mergeme.routing.diagnostics"):
        assert warn_on_ill_conditioned([2.0, condition_number(parallel)], 100.0) == [1]
    assert "layer 1: router condition number" in caplog.text

    settings = RouterConfig(centroid=CentroidSettings(negative="other_domains"))
    plain = calibrate_routers(merged, tmp_path / "plain", TEXTS, RouterConfig())
    negative = calibrate_routers(merged, tmp_path / "negative", TEXTS, settings)
    assert max(negative.max_cosine_between_rows) < max(plain.max_cosine_between_rows)
    assert len(negative.condition_numbers) == 2


@pytest.mark.parametrize(
    ("method", "hint"),
    [
        ("centroid", "router.centroid.negative"),
        ("ppl_probe", "probe_label_counts"),
        ("finetune", "load_balancing_coef"),
        ("random", "router.seed"),
    ],
)
def test_the_conditioning_warning_suggests_what_fits_the_method(caplog, method, hint):
    with caplog.at_level(logging.WARNING, logger="mergeme.routing.diagnostics"):
        warn_on_ill_conditioned([1e6], 100.0, method)
    assert hint in caplog.text and f"{method} router" in caplog.text
    if method != "centroid":
        assert "centroid.negative" not in caplog.text


def test_finetune_everything_writes_a_loadable_checkpoint(merged, tmp_path):
    finetune = FinetuneSettings(
        scope="all", init="random", steps=2, batch_size=2, learning_rate=0.01
    )
    settings = RouterConfig(method="finetune", finetune=finetune)
    calibrate_routers(merged, tmp_path / "tuned", TEXTS, settings)

    name = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    with Checkpoint(tmp_path / "tuned") as tuned, Checkpoint(merged) as source:
        assert tuned.tensor_names() == source.tensor_names()  # the classic layout again
        assert not torch.equal(tuned.get(name), source.get(name))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert model.config.num_local_experts == 3
    assert (tmp_path / "tuned" / "tokenizer.json").is_file()
    assert (tmp_path / "tuned" / "mergeme_router.json").is_file()
