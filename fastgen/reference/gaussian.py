"""Diagonal Gaussians of the VAE in plain torch: reparameterization, KL divergence, negative ELBO.

Kingma & Welling, "Auto-Encoding Variational Bayes" (arXiv 1312.6114). The encoder outputs
q(z|x) = N(mu, diag(exp(logvar))); the ELBO of one datapoint, estimated with one sample (Eq. 10), is

    L(x) = -KL(q(z|x) || p(z)) + log p(x|z),       z = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)

    reparameterization (Sec. 2.4, the ``where`` of Eq. 10):  z = mu + sigma * eps,   sigma = exp(logvar / 2)
    KL to the standard normal prior (Appendix B, per latent dimension j):
        KL_j = -1/2 (1 + logvar_j - mu_j^2 - exp(logvar_j))
    KL between two diagonal Gaussians (the same integral with p(z) = N(mu2, diag(exp(logvar2))),
    which reduces to Appendix B at mu2 = 0, logvar2 = 0):
        KL_j = 1/2 (logvar2_j - logvar_j + (exp(logvar_j) + (mu_j - mu2_j)^2) / exp(logvar2_j) - 1)
    Bernoulli decoder (Appendix C.1):  -log p(x|z) = -sum_i x_i log y_i + (1 - x_i) log(1 - y_i),
        y = sigmoid(logits), computed as sum_i softplus(logits_i) - x_i logits_i (no log of 0)
    Gaussian decoder (Appendix C.2):   -log p(x|z) = 1/2 sum_i log(2 pi) + logvar_i + (x_i - mean_i)^2 / exp(logvar_i)

Everything here is elementwise in the tensors' own dtype; autograd gives the gradients. Broadcasting
of the prior (``mu2``, ``logvar2``) follows one rule, checked by ``check_prior``: torch broadcasting
against ``mu`` that leaves ``mu``'s shape unchanged (a prior shared over the batch, shape
``mu.shape[1:]``; a per-sample prior, shape ``mu.shape``; a scalar).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "per_sample", "sum", "batchmean")
LIKELIHOODS = ("bernoulli", "gaussian")


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * noise  (Sec. 2.4, Eq. 10)."""
    return mu + torch.exp(0.5 * logvar) * noise


def check_prior(t, name: str, shape: torch.Size):
    """Raise ValueError unless ``t`` broadcasts against ``shape`` without changing it."""
    try:
        out = torch.broadcast_shapes(t.shape, shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise ValueError(f"{name} must broadcast to mu's shape {tuple(shape)} without changing it, "
                         f"got shape {tuple(t.shape)}")


def gaussian_kl(mu, logvar, mu2=None, logvar2=None) -> torch.Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(mu2, exp(logvar2))); None stands for the standard
    normal's mu2 = 0, logvar2 = 0 (Appendix B). Shape: mu's."""
    for t, name in ((mu2, "mu2"), (logvar2, "logvar2")):
        if t is not None:
            check_prior(t, name, mu.shape)
    # the prior's gradient is then a sum of elementwise terms (0 for an empty mu, whatever the prior)
    mu2, logvar2 = (None if t is None else t.expand(mu.shape) for t in (mu2, logvar2))
    if logvar2 is None:
        d = mu if mu2 is None else mu - mu2
        return 0.5 * (torch.exp(logvar) + d * d - 1.0 - logvar)              # Appendix B, negated
    d = mu if mu2 is None else mu - mu2
    return 0.5 * (logvar2 - logvar + torch.exp(logvar - logvar2) + d * d * torch.exp(-logvar2) - 1.0)


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """"none": as is; "per_sample": sum over all dims but the first (shape [B]); "sum": a scalar;
    "batchmean": the sum divided by B = values.shape[0]."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if values.dim() == 0:
        raise ValueError(f"reduction={reduction!r} needs a batch dimension, got a 0-d tensor")
    if reduction == "per_sample":
        return values.sum(dim=tuple(range(1, values.dim()))) if values.dim() > 1 else values
    return values.sum() / values.shape[0]  # batchmean


def reparameterize_with_kl(mu, logvar, noise):
    """(z, KL to the standard normal summed per sample): the two Gaussian terms of Eq. 10."""
    return reparameterize(mu, logvar, noise), reduce(gaussian_kl(mu, logvar), "per_sample")


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per sample for a Bernoulli decoder with y = sigmoid(logits) (Appendix C.1):
    -(x log y + (1 - x) log(1 - y)) = softplus(logits) - x * logits, summed over all dims but the first."""
    return reduce(F.softplus(logits) - x * logits, "per_sample")


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, diag(exp(logvar))) per sample (Appendix C.2); ``logvar`` broadcasts against x."""
    nll = 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))
    return reduce(nll.expand_as(x), "per_sample")


class ELBO(NamedTuple):
    """Negative ELBO averaged over the batch (``loss`` = ``recon`` + ``kl``) and its two parts."""
    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor

    @classmethod
    def from_parts(cls, recon_per_sample: torch.Tensor, kl_per_sample: torch.Tensor) -> "ELBO":
        """-L = -log p(x|z) + KL (Eq. 10 with one sample), each averaged over the batch."""
        recon, kl = recon_per_sample.mean(), kl_per_sample.mean()
        return cls(recon + kl, recon, kl)


def reconstruction_nll(x, decoded, likelihood: str = "bernoulli", x_logvar=None) -> torch.Tensor:
    """-log p(x|z) per sample; ``decoded`` holds logits (bernoulli) or the mean (gaussian, with
    log-variance ``x_logvar``, default 0)."""
    if likelihood == "bernoulli":
        return bernoulli_nll(x, decoded)
    if likelihood == "gaussian":
        return gaussian_nll(x, decoded, torch.zeros_like(decoded) if x_logvar is None else x_logvar)
    raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}")


def negative_elbo(x, decoded, mu, logvar, *, likelihood: str = "bernoulli", x_logvar=None) -> ELBO:
    """The VAE loss: -L(x) of Eq. 10 with one sample and a standard normal prior, batch mean."""
    kl = reduce(gaussian_kl(mu, logvar), "per_sample")
    return ELBO.from_parts(reconstruction_nll(x, decoded, likelihood, x_logvar), kl)
