"""The comparison every kernel test relies on must itself be able to fail."""
import pytest
import torch

from fastgen.testing import compare, compare_exact


def test_within_tolerance_passes_and_outside_fails():
    e = torch.randn(100, dtype=torch.float64)
    assert compare(e.float(), e).ok
    assert not compare((e * (1 + 1e-4)).float(), e).ok


def test_nan_never_passes_and_mismatched_infinities_fail():
    e = torch.randn(10, dtype=torch.float64)
    a = e.float().clone()
    a[3] = float("nan")
    result = compare(a, e)
    assert not result.ok and result.n_nonfinite_mismatch == 1 and result.worst[0][0] == (3,)
    assert not compare(torch.tensor([float("nan")]), torch.tensor([float("nan")], dtype=torch.float64)).ok
    assert compare(torch.tensor([float("nan")]), torch.tensor([float("nan")], dtype=torch.float64), equal_nan=True).ok
    assert not compare(torch.tensor([float("inf")]), torch.tensor([-float("inf")], dtype=torch.float64)).ok


@pytest.mark.parametrize("value, ok", [(2.1e5, True), (65520.0, True), (65519.0, False), (6e4, False)])
def test_reference_beyond_fp16_range_is_the_infinity_it_rounds_to(value, ok):
    """fp16 rounds values >= 65520 (max 65504 + half an ulp) to inf: a kernel writing inf there is right."""
    assert torch.tensor(value).half().isinf().item() == ok
    assert compare(torch.tensor([float("inf")], dtype=torch.float16), torch.tensor([value], dtype=torch.float64)).ok == ok
    assert compare(torch.tensor([-float("inf")], dtype=torch.float16), torch.tensor([-value], dtype=torch.float64)).ok == ok


def test_exact_comparison_lists_differences():
    a, e = torch.arange(10), torch.arange(10)
    assert compare_exact(a, e).ok
    a[7] = 0
    result = compare_exact(a, e)
    assert not result.ok and result.n_out_of_tol == 1 and result.worst[0][0] == (7,)
