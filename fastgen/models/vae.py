"""A small VAE (Kingma & Welling, arXiv 1312.6114) whose Gaussian pieces run fused or as the reference.

    encode:  x -> (mu, logvar) of q(z|x) = N(mu, diag(exp(logvar)))       (Appendix C.2, as encoder)
    sample:  z = mu + exp(logvar / 2) * eps, eps ~ N(0, I)                   (Sec. 2.4)
    decode:  z -> logits of Bernoulli p(x|z) (Appendix C.1) or the mean of a Gaussian p(x|z) with a
             learned per-pixel log-variance (Appendix C.2)
    loss:    -ELBO = -log p(x|z) + KL(q(z|x) || N(0, I)), one sample, averaged over the batch (Eq. 10)

``fused=True`` draws z and the per-sample KL with ``fastgen.reparameterize_with_kl`` (one pass over
mu and logvar, autograd through the Triton kernels); ``fused=False`` uses the readable reference in
fastgen/reference/gaussian.py. Both take eps from the same counter-based stream (``seed``), so one
seed gives the same losses either way, to float rounding.
"""
import math

import torch
from torch import nn

from fastgen import _checks, ops
from fastgen.reference import gaussian as ref_gaussian
from fastgen.reference import random as ref_random

ARCHS = ("mlp", "conv")


class VAE(nn.Module):
    """Variational autoencoder for inputs of shape ``input_shape`` (e.g. (1, 8, 8) or (64,)).

    Args:
        input_shape: shape of one input; "conv" needs (C, H, W) with H and W divisible by 4.
        latent_dim: size of z.
        hidden: width of the MLP's hidden layer / channels of the conv net's first layer.
        arch: "mlp" (one hidden tanh layer each way, as in Appendix C) or "conv" (two stride-2 convs
            down, two transposed convs up).
        likelihood: "bernoulli" (inputs in [0, 1]) or "gaussian".
        fused: take z and the KL from the fastgen kernels (True) or the reference (False).
        backend: the fused ops' backend ("auto": Triton on CUDA, the torch reference elsewhere).
    """

    def __init__(self, input_shape=(1, 8, 8), latent_dim: int = 8, hidden: int = 128, *, arch: str = "mlp",
                 likelihood: str = "bernoulli", fused: bool = False, backend: str = "auto"):
        super().__init__()
        self.input_shape = _checks.shape(input_shape, "input_shape")
        self.latent_dim = _checks.nonneg_int(latent_dim, "latent_dim")
        hidden = _checks.nonneg_int(hidden, "hidden")
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(map(repr, ARCHS))}, got {arch!r}")
        if likelihood not in ref_gaussian.LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(map(repr, ref_gaussian.LIKELIHOODS))}, "
                             f"got {likelihood!r}")
        if latent_dim < 1 or hidden < 1 or self.input_shape.numel() < 1:
            raise ValueError("latent_dim, hidden and the input size must be positive")
        self.arch, self.likelihood, self.fused, self.backend = arch, likelihood, bool(fused), backend
        if arch == "mlp":
            self.encoder, self.decoder = self._mlp(hidden)
        else:
            self.encoder, self.decoder = self._conv(hidden)
        # Gaussian decoder: a learned log-variance per input element (unused for Bernoulli)
        self.x_logvar = nn.Parameter(torch.zeros(self.input_shape)) if likelihood == "gaussian" else None

    def _mlp(self, hidden):
        d = self.input_shape.numel()
        encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 2 * self.latent_dim))
        decoder = nn.Sequential(nn.Linear(self.latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, d),
                                nn.Unflatten(1, self.input_shape))
        return encoder, decoder

    def _conv(self, hidden):
        if len(self.input_shape) != 3 or self.input_shape[1] % 4 or self.input_shape[2] % 4:
            raise ValueError(f"arch='conv' needs input_shape (C, H, W) with H, W divisible by 4, "
                             f"got {tuple(self.input_shape)}")
        c, h, w = self.input_shape
        inner = (2 * hidden, h // 4, w // 4)
        encoder = nn.Sequential(
            nn.Conv2d(c, hidden, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(math.prod(inner), 2 * self.latent_dim))
        decoder = nn.Sequential(
            nn.Linear(self.latent_dim, math.prod(inner)), nn.SiLU(), nn.Unflatten(1, inner),
            nn.ConvTranspose2d(2 * hidden, hidden, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(hidden, c, 4, stride=2, padding=1))
        return encoder, decoder

    def _check_input(self, x) -> None:
        """ValueError/TypeError naming ``x`` unless it is a [N, *input_shape] tensor."""
        expected = f"[N, {', '.join(map(str, self.input_shape))}]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a {expected} tensor (input_shape {tuple(self.input_shape)}), got "
                            f"{type(x).__name__}")
        if x.dim() != 1 + len(self.input_shape) or x.shape[1:] != self.input_shape:
            raise ValueError(f"x must be a {expected} tensor (input_shape {tuple(self.input_shape)}), got shape "
                             f"{tuple(x.shape)}")

    def encode(self, x: torch.Tensor):
        """(mu, logvar), each [N, latent_dim], of x [N, *input_shape]."""
        self._check_input(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits or the Gaussian mean, [N, *input_shape]."""
        return self.decoder(z)

    def reparameterize_with_kl(self, mu, logvar, seed=None):
        """(z, KL(q(z|x) || N(0, I)) per sample) with eps from the counter-based stream at ``seed``."""
        if self.fused:
            return ops.reparameterize_with_kl(mu, logvar, seed=seed, backend=self.backend)
        eps = ref_random.randn(mu.shape, seed=_checks.seed64(seed), device=mu.device, dtype=mu.dtype)
        return ref_gaussian.reparameterize_with_kl(mu, logvar, eps)

    def forward(self, x: torch.Tensor, seed=None):
        """(decoded, mu, logvar, z, kl per sample) for a batch x [N, *input_shape]; ``seed`` picks eps (None: drawn
        from torch's default generator)."""
        mu, logvar = self.encode(x)
        z, kl = self.reparameterize_with_kl(mu, logvar, seed)
        return self.decode(z), mu, logvar, z, kl

    def loss(self, x: torch.Tensor, seed=None) -> ref_gaussian.ELBO:
        """Negative ELBO (batch mean) and its parts ``recon`` (-log p(x|z)) and ``kl``, of x [N, *input_shape]
        (ValueError naming x and the expected shape otherwise)."""
        decoded, _, _, _, kl = self(x, seed)  # checks x: [N, *input_shape], the decoder's shape
        recon = ref_gaussian.reconstruction_nll(x, decoded, self.likelihood, self.x_logvar)
        return ref_gaussian.ELBO.from_parts(recon, kl)

    @torch.no_grad()
    def sample(self, n: int, seed=None) -> torch.Tensor:
        """n draws from the generative model, z ~ N(0, I) from the counter-based stream at ``seed``:
        Bernoulli probabilities sigmoid(logits) or the Gaussian mean, [n, *input_shape]."""
        n = _checks.nonneg_int(n, "n")
        p = next(self.parameters())
        z = ops.randn((n, self.latent_dim), seed=seed, device=p.device, dtype=p.dtype,
                      backend=self.backend if self.fused else "torch")
        decoded = self.decode(z)
        return torch.sigmoid(decoded) if self.likelihood == "bernoulli" else decoded
