"""The bracketed exact selection used to trim large task vectors, against torch.kthvalue."""

import pytest
import torch

from mergeme.merge.sparsify import SMALL_SELECTION, keep_count, kth_smallest, trim_in_place


@pytest.mark.parametrize("kind", ["normal", "few_values", "heavy_tail"])
@pytest.mark.parametrize("quantile", [0.001, 0.2, 0.5, 0.999])
def test_kth_smallest_equals_kthvalue_on_large_tensors(kind, quantile):
    generator = torch.Generator().manual_seed(0)
    numel = 2 * SMALL_SELECTION + 17
    values = torch.randn(numel, generator=generator)
    if kind == "few_values":  # massive ties
        values = values.round()
    elif kind == "heavy_tail":
        values = values**5
    rank = max(1, int(quantile * numel))

    assert kth_smallest(values, rank) == torch.kthvalue(values, rank).values


def test_trim_keeps_exactly_the_count_with_ties_broken_by_flat_index():
    generator = torch.Generator().manual_seed(1)
    task_vector = torch.randn(1500, 1500, generator=generator).round()  # many equal magnitudes
    trimmed = trim_in_place(task_vector.clone(), 0.8)

    k = keep_count(task_vector.numel(), 0.8)
    # reference: stable sort by descending magnitude keeps earlier indexes among equals
    order = torch.sort(-task_vector.abs().flatten(), stable=True).indices[:k]
    expected = torch.zeros(task_vector.numel())
    expected[order] = task_vector.flatten()[order]
    assert torch.equal(trimmed.flatten(), expected)


def test_a_bracket_that_misses_falls_back_to_the_full_selection(monkeypatch):
    from mergeme.merge import sparsify

    # no margin: the bracket is one sample value, so the rank almost surely lies outside it
    monkeypatch.setattr(sparsify, "SAMPLE_MARGIN", 0)
    generator = torch.Generator().manual_seed(4)
    values = torch.randn(2 * SMALL_SELECTION + 5, generator=generator)
    for rank in (1, 12345, values.numel() // 2, values.numel()):
        assert kth_smallest(values, rank) == torch.kthvalue(values, rank).values
