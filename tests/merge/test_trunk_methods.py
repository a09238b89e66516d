"""Trunk merge methods against small cases computed by hand in the comments."""

import pytest
import torch

from mergeme.merge.sparsify import (
    SMALL_SELECTION,
    derive_seed,
    keep_count,
    keep_largest_magnitude,
)
from mergeme.merge.trunk_methods import TRUNK_METHODS, merge_trunk_tensor


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# three experts over base 10 whose task vectors conflict in sign:
#   tau1 = [ 2, -1, 3, 0,  1]
#   tau2 = [-1, -2, 1, 0, -1]
#   tau3 = [-3,  4, 2, 0,  0]
BASE = t(10, 10, 10, 10, 10)
CONFLICTING = [BASE + t(2, -1, 3, 0, 1), BASE + t(-1, -2, 1, 0, -1), BASE + t(-3, 4, 2, 0, 0)]


# registry


def test_registry_holds_the_six_methods_with_paper_defaults():
    assert list(TRUNK_METHODS) == [
        "base",
        "average",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
    ]
    for name in ("ties", "dare_linear", "dare_ties"):
        assert TRUNK_METHODS[name].defaults["density"] == 0.8
        assert TRUNK_METHODS[name].defaults["scale"] == pytest.approx(1 / 3)
    assert TRUNK_METHODS["ties"].defaults["ties_agreement"] == "sum"
    assert [m.name for m in TRUNK_METHODS.values() if not m.needs_base] == ["average"]
    assert "2306.01708" in TRUNK_METHODS["ties"].reference


# base and average


def test_base_returns_the_base_tensor_whatever_the_experts():
    merged = merge_trunk_tensor("base", t(1, 2, 3), [t(9, 9, 9), t(-5, 0, 5)])
    assert torch.equal(merged, t(1, 2, 3))


def test_average_is_the_plain_mean_and_needs_no_base():
    # ([2, 4] + [4, 8]) / 2 = [3, 6]
    merged = merge_trunk_tensor("average", None, [t(2, 4), t(4, 8)])
    assert torch.equal(merged, t(3, 6))


def test_average_weights_are_normalised_by_their_sum():
    # (3 * [2, 4] + 1 * [4, 8]) / 4 = [10, 20] / 4 = [2.5, 5]
    merged = merge_trunk_tensor("average", None, [t(2, 4), t(4, 8)], weights=[3, 1])
    assert torch.equal(merged, t(2.5, 5))


# task arithmetic


def test_task_arithmetic_adds_the_scaled_sum_of_task_vectors():
    # tau1 = [1, 0, -1], tau2 = [3, 0, 0]; 1 + 0.5 * [4, 0, -1] = [3, 1, 0.5]
    merged = merge_trunk_tensor("task_arithmetic", t(1, 1, 1), [t(2, 1, 0), t(4, 1, 1)], scale=0.5)
    assert torch.equal(merged, t(3, 1, 0.5))


def test_task_arithmetic_weights_multiply_task_vectors_without_normalising():
    # 1 * [1, 0, -1] + 2 * [3, 0, 0] = [7, 0, -1]; 1 + 0.5 * that = [4.5, 1, 0.5]
    merged = merge_trunk_tensor(
        "task_arithmetic", t(1, 1, 1), [t(2, 1, 0), t(4, 1, 1)], weights=[1, 2], scale=0.5
    )
    assert torch.equal(merged, t(4.5, 1, 0.5))


# ties


def test_ties_sum_keeps_only_entries_of_the_elected_sign():
    # per coordinate, weighted sum -> elected sign -> agreeing entries -> their sum:
    #   [ 2, -1, -3]: -2 -> neg -> -1, -3 -> -4
    #   [-1, -2,  4]:  1 -> pos ->  4     ->  4
    #   [ 3,  1,  2]:  6 -> pos -> all    ->  6
    #   [ 0,  0,  0]:  0 -> none          ->  0
    #   [ 1, -1,  0]:  0 -> none (tie)    ->  0
    # 10 + 0.5 * [-4, 4, 6, 0, 0] = [8, 12, 13, 10, 10]
    merged = merge_trunk_tensor("ties", BASE, CONFLICTING, density=1.0, scale=0.5)
    assert torch.equal(merged, t(8, 12, 13, 10, 10))


def test_ties_mean_divides_by_the_number_of_agreeing_entries():
    # same elections; means: -4 / 2 = -2, 4 / 1 = 4, 6 / 3 = 2, none -> 0, none -> 0
    # 10 + 0.5 * [-2, 4, 2, 0, 0] = [9, 12, 11, 10, 10]
    merged = merge_trunk_tensor(
        "ties", BASE, CONFLICTING, density=1.0, scale=0.5, ties_agreement="mean"
    )
    assert torch.equal(merged, t(9, 12, 11, 10, 10))


def test_ties_mean_with_weights_is_the_weighted_mean_of_agreeing_entries():
    # tau = 2 and 4 with weights 1 and 3: sum = 2 + 12 = 14, weighted mean = 14 / 4 = 3.5
    base, experts = t(0), [t(2), t(4)]
    summed = merge_trunk_tensor("ties", base, experts, weights=[1, 3], density=1.0, scale=1.0)
    mean = merge_trunk_tensor(
        "ties", base, experts, weights=[1, 3], density=1.0, scale=1.0, ties_agreement="mean"
    )
    assert torch.equal(summed, t(14))
    assert torch.equal(mean, t(3.5))


def test_ties_weights_can_flip_the_elected_sign():
    # tau = +3 and -2; unit weights elect + (result 3), weights [1, 2] give 3 - 4 < 0 -> -2 * 2
    base, experts = t(0), [t(3), t(-2)]
    plain = merge_trunk_tensor("ties", base, experts, density=1.0, scale=1.0)
    weighted = merge_trunk_tensor("ties", base, experts, weights=[1, 2], density=1.0, scale=1.0)
    assert torch.equal(plain, t(3))
    assert torch.equal(weighted, t(-4))


def test_ties_density_trims_the_small_entries_before_the_election():
    # density 0.6 of 5 entries keeps 3 per task vector:
    #   tau1 = [5, -0.1, 3, -4, 0.2]  -> [5,  0, 3, -4, 0]
    #   tau2 = [0.5, -6, -0.3, 1, 2]  -> [0, -6, 0,  1, 2]
    # coordinate 3: -4 + 1 < 0 -> keeps -4; the others have one entry left each
    # untrimmed it would be [5.5, -6.1, 3, -4, 2.2]
    base = torch.zeros(5)
    experts = [t(5, -0.1, 3, -4, 0.2), t(0.5, -6, -0.3, 1, 2)]
    merged = merge_trunk_tensor("ties", base, experts, density=0.6, scale=1.0)
    assert torch.equal(merged, t(5, -6, 3, -4, 2))


def test_keep_count_rounds_to_nearest_with_at_least_one():
    assert keep_count(5, 0.8) == 4  # 4.000000000000001, not 5
    assert keep_count(4, 0.8) == 3  # 3.2
    assert keep_count(4, 0.875) == 4  # 3.5 rounds up
    assert keep_count(10, 0.01) == 1  # 0.1, but never zero
    assert keep_count(7, 1.0) == 7


def test_keep_largest_magnitude_breaks_ties_by_flat_index():
    # magnitudes [1, 2, 2, 2, 1], keep 2: the tied 2s at indices 1 and 2 win over index 3
    kept = keep_largest_magnitude(t(1, -2, 2, 2, 1), density=0.4)
    assert torch.equal(kept, t(0, -2, 2, 0, 0))
    # row-major order in two dimensions: indices 1 and 2 of [[1, 2], [2, 2]]
    kept_2d = keep_largest_magnitude(torch.tensor([[1.0, 2.0], [2.0, 2.0]]), density=0.5)
    assert torch.equal(kept_2d, torch.tensor([[0.0, 2.0], [2.0, 0.0]]))


def test_ties_at_density_one_with_agreeing_signs_equals_task_arithmetic():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator)
    signs = torch.randn(6, 5, generator=generator).sign()
    experts = [base + signs * torch.rand(6, 5, generator=generator) for _ in range(3)]
    for agreement_weights in ([1.0, 1.0, 1.0], [0.5, 2.0, 1.0]):
        ties = merge_trunk_tensor(
            "ties", base, experts, weights=agreement_weights, density=1.0, scale=0.4
        )
        task_arithmetic = merge_trunk_tensor(
            "task_arithmetic", base, experts, weights=agreement_weights, scale=0.4
        )
        torch.testing.assert_close(ties, task_arithmetic)


# dare


def test_dare_keeps_entries_rescaled_by_one_over_density_and_zeroes_the_rest():
    tau = torch.arange(1, 1001, dtype=torch.float32)
    merged = merge_trunk_tensor(
        "dare_linear", torch.zeros(1000), [tau], density=0.25, scale=1.0, tensor_name="w"
    )
    kept = merged != 0
    assert torch.equal(merged[kept], tau[kept] * 4)
    # 1000 draws at p = 0.25: the kept share lies within 0.25 +- 0.05 (over 3.6 sigma)
    assert 0.2 < kept.float().mean().item() < 0.3


def test_dare_linear_matches_task_arithmetic_in_expectation():
    base = t(0, 1, -1, 2)
    experts = [t(1, 1, -2, 2.5), t(-1, 2, 0, 2)]  # tau1 = [1, 0, -1, 0.5], tau2 = [-1, 1, 1, 0]
    mean = torch.stack(
        [
            merge_trunk_tensor("dare_linear", base, experts, seed=seed, scale=0.5, tensor_name="w")
            for seed in range(400)
        ]
    ).mean(0)
    # base + 0.5 * [0, 1, 0, 0.5] = [0, 1.5, -1, 2.25]; per-entry std over 400 seeds < 0.03
    torch.testing.assert_close(mean, t(0, 1.5, -1, 2.25), atol=0.12, rtol=0)


def test_dare_same_seed_gives_the_same_bytes_and_other_seeds_or_names_do_not():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(16, 16, generator=generator)
    experts = [base + torch.randn(16, 16, generator=generator) for _ in range(2)]

    def merge(method: str, seed: int, name: str) -> torch.Tensor:
        return merge_trunk_tensor(method, base, experts, density=0.5, seed=seed, tensor_name=name)

    for method in ("dare_linear", "dare_ties"):
        first = merge(method, 7, "layers.0.q_proj.weight")
        merge(method, 7, "layers.1.q_proj.weight")  # another tensor in between changes nothing
        assert torch.equal(first, merge(method, 7, "layers.0.q_proj.weight"))
        assert not torch.equal(first, merge(method, 8, "layers.0.q_proj.weight"))
        assert not torch.equal(first, merge(method, 7, "layers.1.q_proj.weight"))


def test_dare_draws_a_different_mask_for_each_expert():
    # two identical experts with tau = 1 at density 0.5: each coordinate is (m1 + m2) / 0.5;
    # shared masks would give only 0 or 4, independent masks also give 2
    merged = merge_trunk_tensor(
        "dare_linear",
        torch.zeros(64),
        [torch.ones(64)] * 2,
        density=0.5,
        scale=1.0,
        tensor_name="w",
    )
    assert set(merged.tolist()) == {0.0, 2.0, 4.0}


def test_dare_at_density_one_equals_the_deterministic_methods():
    assert torch.equal(
        merge_trunk_tensor("dare_ties", BASE, CONFLICTING, density=1.0, scale=0.5),
        t(8, 12, 13, 10, 10),  # the hand-computed ties sum above
    )
    assert torch.equal(
        merge_trunk_tensor("dare_linear", BASE, CONFLICTING, density=1.0, scale=0.5),
        BASE + 0.5 * t(-2, 1, 6, 0, 0),  # sum of the three task vectors
    )


# dtypes and purity


def test_out_dtype_bfloat16_and_default_dtype_of_the_inputs():
    merged = merge_trunk_tensor(
        "ties", BASE, CONFLICTING, density=1.0, scale=0.5, out_dtype=torch.bfloat16
    )
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, t(8, 12, 13, 10, 10).bfloat16())

    bf16_experts = [expert.bfloat16() for expert in CONFLICTING]
    assert merge_trunk_tensor("average", None, bf16_experts).dtype == torch.bfloat16
    assert merge_trunk_tensor("ties", BASE.bfloat16(), bf16_experts).dtype == torch.bfloat16
    assert merge_trunk_tensor("ties", BASE, bf16_experts).dtype == torch.float32  # base's dtype


# a float32 tensor larger than the exact-selection size: reads of it are views, not copies
LARGE = (SMALL_SELECTION // 1000 + 1, 1000)


@pytest.mark.parametrize("shape", [(5,), LARGE])
@pytest.mark.parametrize("method", list(TRUNK_METHODS))
def test_merge_leaves_its_inputs_unchanged(method: str, shape):
    generator = torch.Generator().manual_seed(2)
    original = [torch.randn(shape, generator=generator) for _ in range(4)]
    base, experts = original[0].clone(), [tensor.clone() for tensor in original[1:]]
    merged = merge_trunk_tensor(method, base, experts, density=0.6, tensor_name="w")
    merged += 100  # the result must not share storage with an input either
    assert torch.equal(base, original[0])
    assert all(torch.equal(e, c) for e, c in zip(experts, original[1:], strict=True))


def test_derive_seed_changes_with_each_part():
    seed = derive_seed(0, "w", 0)
    assert seed == derive_seed(0, "w", 0)
    assert len({seed, derive_seed(1, "w", 0), derive_seed(0, "v", 0), derive_seed(0, "w", 1)}) == 4


# errors


def test_shape_mismatch_names_the_tensor_and_both_shapes():
    with pytest.raises(ValueError, match=r"'embed_tokens.weight'.*expert 1.*\(3, 2\).*\(2, 3\)"):
        merge_trunk_tensor(
            "ties",
            torch.zeros(2, 3),
            [torch.zeros(2, 3), torch.zeros(3, 2)],
            tensor_name="embed_tokens.weight",
        )
    with pytest.raises(
        ValueError, match=r"expert 1 has shape \(4,\) but expert 0 has shape \(3,\)"
    ):
        merge_trunk_tensor("average", None, [torch.zeros(3), torch.zeros(4)])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_zero_one_is_refused(density: float):
    with pytest.raises(ValueError, match=rf"'w': density {density} is outside \(0, 1\]"):
        merge_trunk_tensor("dare_ties", BASE, CONFLICTING, density=density, tensor_name="w")


def test_density_is_not_checked_for_methods_that_do_not_use_it():
    merged = merge_trunk_tensor("task_arithmetic", t(0), [t(3)], density=0.0, scale=1.0)
    assert torch.equal(merged, t(3))


@pytest.mark.parametrize("method", ["base", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_methods_that_need_a_base_refuse_none(method: str):
    with pytest.raises(ValueError, match=rf"'norm.weight': trunk method '{method}' needs the base"):
        merge_trunk_tensor(method, None, CONFLICTING, tensor_name="norm.weight")


def test_weights_must_match_the_number_of_experts():
    with pytest.raises(ValueError, match="got 2 weights for 3 experts"):
        merge_trunk_tensor("task_arithmetic", BASE, CONFLICTING, weights=[1, 1])


def test_negative_or_all_zero_weights_are_refused():
    for weights in ([1, -1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="must be non-negative with a positive sum"):
            merge_trunk_tensor("average", None, CONFLICTING, weights=weights)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown trunk merge method 'slerp'.*known methods: base, average, "
        "task_arithmetic, ties, dare_linear, dare_ties",
    ):
        merge_trunk_tensor("slerp", BASE, CONFLICTING)


def test_unknown_ties_agreement_and_empty_experts_are_refused():
    with pytest.raises(ValueError, match="ties_agreement 'median' is not one of 'sum', 'mean'"):
        merge_trunk_tensor("ties", BASE, CONFLICTING, ties_agreement="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got no expert tensors"):
        merge_trunk_tensor("average", None, [])
