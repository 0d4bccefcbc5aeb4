import pytest
import torch

from fastgen.data import digits


def test_digits_splits_are_disjoint_and_complete():
    x, y = digits()
    xtr, ytr = digits("train")
    xte, yte = digits("test", flat=True)
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert len(xtr) + len(xte) == 1797 and abs(len(xte) - 359) <= 1
    assert xte.shape[1:] == (64,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.2
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())
    rows = {tuple(r.tolist()) for r in xtr.reshape(len(xtr), -1)}
    assert sum(tuple(r.tolist()) in rows for r in xte) < 5  # only a handful of duplicate images in the data
    assert torch.equal(digits("test")[0], digits("test")[0])  # the split is fixed


@pytest.mark.parametrize("kwargs", [dict(split="val"), dict(test_fraction=1.5)])
def test_digits_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        digits(**kwargs)
