"""The chunked, fused TIES and DARE merges against the plain whole-tensor versions in
``plain_merges.py``, on tensors full of sign conflicts and equal magnitudes.

The inputs are small multiples of 1/4 and every weight, density and scale is a power of two,
so float32 arithmetic on them is exact: any difference is a difference in the method, not in
rounding, and the sums are compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from mergeme.merge.sparsify import SMALL_SELECTION
from mergeme.merge.trunk_methods import merge_trunk_tensor
from tests.merge.plain_merges import plain_merge

# one shape below the exact-selection size, one above it (bracketed selection, many chunks)
SHAPES = [(37, 29), (SMALL_SELECTION // 1000 + 100, 1000)]


def _conflicting(shape, seed: int):
    """bf16 base and four experts whose task vectors take the 17 values -2, -1.75, ..., 2:
    every magnitude is shared by many entries and signs conflict everywhere."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(-16, 17, shape, generator=generator) * 0.5
    experts = [base + torch.randint(-8, 9, shape, generator=generator) * 0.25 for _ in range(4)]
    return base.bfloat16(), [expert.bfloat16() for expert in experts]


# dare_linear elects no sign, so the agreement setting does not apply to it
METHOD_AGREEMENTS = [("ties", "sum"), ("ties", "mean"), ("dare_ties", "sum")]
METHOD_AGREEMENTS += [("dare_ties", "mean"), ("dare_linear", "sum")]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("method", "agreement"), METHOD_AGREEMENTS)
@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.0, 0.0]])
def test_fused_merge_equals_the_plain_merge(shape, method, agreement, weights):
    base, experts = _conflicting(shape, seed=shape[0] + len(method))
    settings = dict(weights=weights, density=0.5, scale=0.25, seed=3)

    fused = merge_trunk_tensor(
        method,
        base,
        experts,
        ties_agreement=agreement,
        tensor_name="w",
        out_dtype=torch.float32,
        **settings,
    )
    plain = plain_merge(method, base, experts, agreement=agreement, name="w", **settings)

    if agreement == "sum":
        assert torch.equal(fused, plain.float())
    else:  # one division by the agreeing weight: rounded once in float32, once in float64
        torch.testing.assert_close(fused, plain.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.8, 0.999])
def test_ties_trims_like_the_plain_merge_at_any_density(density):
    base, experts = _conflicting(SHAPES[1], seed=7)
    settings = dict(weights=None, density=density, scale=0.5, seed=0)

    fused = merge_trunk_tensor("ties", base, experts, out_dtype=torch.float32, **settings)
    plain = plain_merge("ties", base, experts, agreement="sum", name="", **settings)

    assert torch.equal(fused, plain.float())
