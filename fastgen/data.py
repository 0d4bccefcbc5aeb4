"""Built-in datasets that need no download."""
import torch


def digits(split: str = "all", *, flat: bool = False, test_fraction: float = 0.2, dtype=torch.float32, device=None):
    """scikit-learn's 8x8 handwritten digits (1797 images shipped inside the scikit-learn package).

    Returns ``(x, y)``: x with pixel values in [0, 1] (the 0..16 grey levels / 16), shape [N, 1, 8, 8]
    or [N, 64] when ``flat``; y the int64 labels 0..9. ``split`` is "all", "train" or "test": a fixed
    permutation (seed 0) holds out ``test_fraction`` of the images, the same on every machine.
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("fastgen.data.digits needs scikit-learn: pip install scikit-learn "
                          "(or pip install -e '.[train]')") from err
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float64) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    if split != "all":
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        n_test = int(round(test_fraction * len(x)))
        keep = order[:n_test] if split == "test" else order[n_test:]
        x, y = x[keep], y[keep]
    x = x.reshape(len(x), 64) if flat else x.reshape(len(x), 1, 8, 8)
    return x.to(device=device, dtype=dtype), y.to(device)
