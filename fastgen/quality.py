"""Is it a digit? Two automatic measures of samples from a generative model of the 8x8 digits.

Shared by every model of ``fastgen.data.digits`` (the GAN, the DDPM), so they are judged alike:

- **classifier confidence**: a small MLP trained (deterministically, in about a second, cached per
  process) on the train split labels the samples; the mean probability of its top class is high for
  recognisable digits and low for blobs and noise. The histogram of top classes shows mode collapse.
- **MMD** (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012, eq. 3, the unbiased estimate)
  between the samples and the held-out test split under the RBF kernel
  k(x, y) = exp(-|x - y|^2 / (2 sigma^2)), with sigma the median pairwise distance of the test split
  (the median heuristic, fixed by the data so that every model is measured with the same kernel):

      MMD^2 = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)

  0 in expectation when samples and data share a distribution; larger is worse.

Samples are images with pixel values in ``value_range`` (default [0, 1], what ``digits()`` returns;
pass (-1, 1) for tanh generators), shaped [N, 1, 8, 8] or [N, 64].
"""
import contextlib
import dataclasses
import functools

import torch
from torch import nn

from fastgen import data

CLASSIFIER_SEED = 0
CLASSIFIER_STEPS = 300


@dataclasses.dataclass(frozen=True)
class Quality:
    confidence: float    # mean top-class probability of the digit classifier (real test digits: ~0.97)
    mmd: float           # unbiased MMD^2 to the held-out test digits (real train digits: ~0)
    class_counts: tuple  # how many samples the classifier puts in each class 0..9

    def __str__(self):
        return f"confidence {self.confidence:.3f}, MMD^2 {self.mmd:.4f}, classes {list(self.class_counts)}"


def _pixels(samples: torch.Tensor, value_range) -> torch.Tensor:
    """[N, 64] float64 pixels in [0, 1] on the CPU."""
    if not isinstance(samples, torch.Tensor) or not samples.is_floating_point():
        raise TypeError(f"samples must be a floating-point tensor, got {type(samples).__name__}")
    if samples.dim() < 2 or samples[0].numel() != 64:
        raise ValueError(f"samples must be 8x8 images shaped [N, 1, 8, 8] or [N, 64], got {tuple(samples.shape)}")
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    x = samples.detach().to("cpu", torch.float64).reshape(len(samples), 64)
    return (x - low) / (high - low)


@contextlib.contextmanager
def _one_thread():
    """Train on one CPU thread: the same reduction order (so the same weights) on every machine,
    and no thread oversubscription on a busy CPU (which slows this tiny model down many times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def digit_classifier() -> nn.Module:
    """A 64-128-10 MLP trained on the train split (full batch, Adam, fixed seed); ~97% test accuracy."""
    x, y = data.digits("train", flat=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CLASSIFIER_SEED)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    with _one_thread():
        for _ in range(CLASSIFIER_STEPS):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval().requires_grad_(False)


def class_probabilities(samples: torch.Tensor, *, value_range=(0.0, 1.0)) -> torch.Tensor:
    """[N, 10] probabilities of the digit classes."""
    return digit_classifier()(_pixels(samples, value_range).float()).double().softmax(dim=1)


@functools.lru_cache(maxsize=1)
def _test_digits():
    x, _ = data.digits("test", flat=True, dtype=torch.float64)
    return x, torch.cdist(x, x).median().item()


def mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """Unbiased MMD^2 between the rows of x [m, d] and y [n, d] under an RBF kernel of width sigma."""
    def kernel(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2.0 * sigma**2))

    m, n = len(x), len(y)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return (within_x + within_y - 2.0 * kxy.mean()).item()


def digits_mmd(samples: torch.Tensor, *, value_range=(0.0, 1.0)) -> float:
    """Unbiased MMD^2 between the samples and the held-out test digits (median-heuristic RBF)."""
    test, sigma = _test_digits()
    return mmd2(_pixels(samples, value_range), test, sigma)


def digits_quality(samples: torch.Tensor, *, value_range=(0.0, 1.0)) -> Quality:
    """Classifier confidence, MMD^2 to held-out digits and class histogram of ``samples`` (N >= 2)."""
    if len(samples) < 2:
        raise ValueError(f"samples must hold at least 2 images for the MMD, got {len(samples)}")
    probs = class_probabilities(samples, value_range=value_range)
    top, label = probs.max(dim=1)
    counts = torch.bincount(label, minlength=10)
    return Quality(confidence=top.mean().item(), mmd=digits_mmd(samples, value_range=value_range),
                   class_counts=tuple(int(c) for c in counts))
