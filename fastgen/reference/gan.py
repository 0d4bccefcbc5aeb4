"""GAN losses as the papers state them, in plain torch. Every loss is a quantity to *minimise*.

The discriminator D outputs a real-valued score per sample (a logit; for the minimax and
non-saturating games D(x) = sigmoid(score) is the probability that x is real). ``real`` and ``fake``
are the scores of a batch of data x and of generated samples G(z); expectations are batch means.

Original minimax (Goodfellow et al., "Generative Adversarial Nets", arXiv 1406.2661, eq. 1):

    min_G max_D  V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))]
    D minimises  -V = -E_x[log D(x)] - E_z[log(1 - D(G(z)))]             (the binary cross-entropy)
    G minimises       E_z[log(1 - D(G(z)))]                               (saturates when D wins)

Non-saturating (same paper, Sec. 3: "train G to maximize log D(G(z))"): D as above and

    G minimises      -E_z[log D(G(z))]

Hinge (Lim & Ye, "Geometric GAN", arXiv 1705.02894, the SVM hinge loss; as used by SAGAN and BigGAN):

    D minimises  E_x[max(0, 1 - D(x))] + E_z[max(0, 1 + D(G(z)))]
    G minimises -E_z[D(G(z))]

WGAN-GP (Gulrajani et al., "Improved Training of Wasserstein GANs", arXiv 1704.00028, eq. 3):

    D minimises  E_z[D(G(z))] - E_x[D(x)] + lambda E_xhat[(||grad_xhat D(xhat)||_2 - 1)^2]
                 xhat = eps x + (1 - eps) G(z),  eps ~ U[0, 1] per sample,  lambda = 10
    G minimises -E_z[D(G(z))]

log D = log sigmoid(s) and log(1 - D) = log sigmoid(-s) are evaluated with logsigmoid, which
is the same function without overflow for large |s|.
"""
import dataclasses

import torch
from torch.nn import functional as F


# --- the original minimax game (1406.2661, eq. 1) ------------------------------------------------

def minimax_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """-E[log D(x)] - E[log(1 - D(G(z)))]."""
    return -F.logsigmoid(real).mean() - F.logsigmoid(-fake).mean()


def minimax_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """E[log(1 - D(G(z)))]."""
    return F.logsigmoid(-fake).mean()


# --- non-saturating (1406.2661, Sec. 3) ----------------------------------------------------------

nonsaturating_d_loss = minimax_d_loss


def nonsaturating_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E[log D(G(z))]."""
    return -F.logsigmoid(fake).mean()


# --- hinge (1705.02894) --------------------------------------------------------------------------

def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]."""
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]."""
    return -fake.mean()


# --- WGAN-GP (1704.00028, eq. 3) -----------------------------------------------------------------

def wasserstein_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[D(G(z))] - E[D(x)]: the critic's estimate of minus the Wasserstein-1 distance."""
    return fake.mean() - real.mean()


def wasserstein_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]."""
    return -fake.mean()


def interpolates(real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """xhat = eps x + (1 - eps) G(z), eps one number per sample (shape [N])."""
    eps = eps.reshape(-1, *([1] * (real.dim() - 1))).to(real.dtype)
    return eps * real + (1.0 - eps) * fake


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor = None, *,
                     generator: torch.Generator = None) -> torch.Tensor:
    """E[(||grad_xhat D(xhat)||_2 - 1)^2] (without lambda), differentiable w.r.t. the critic's parameters.

    ``eps`` [N] defaults to U[0, 1) draws from ``generator``. ``fake`` is detached: the penalty
    trains the critic only.
    """
    if eps is None:
        eps = torch.rand(len(real), generator=generator, device=real.device if generator is None else generator.device)
    xhat = interpolates(real.detach(), fake.detach(), eps.to(real.device)).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(xhat).sum(), xhat, create_graph=True)
    return (grad.reshape(len(grad), -1).norm(2, dim=1) - 1.0).square().mean()


def wgan_gp_d_loss(critic, real_x: torch.Tensor, fake_x: torch.Tensor, *, weight: float = 10.0,
                   eps: torch.Tensor = None, generator: torch.Generator = None) -> torch.Tensor:
    """E[D(G(z))] - E[D(x)] + lambda E[(||grad D(xhat)||_2 - 1)^2] on data ``real_x`` and samples ``fake_x``."""
    penalty = gradient_penalty(critic, real_x, fake_x, eps, generator=generator)
    return wasserstein_d_loss(critic(real_x), critic(fake_x.detach())) + weight * penalty


@dataclasses.dataclass(frozen=True)
class Loss:
    """One game: the discriminator's and the generator's loss on scores, and whether D needs the
    gradient penalty (then the trainer adds ``weight * gradient_penalty``)."""
    name: str
    d_loss: callable
    g_loss: callable
    gradient_penalty: bool = False


LOSSES = {
    "minimax": Loss("minimax", minimax_d_loss, minimax_g_loss),
    "nonsaturating": Loss("nonsaturating", nonsaturating_d_loss, nonsaturating_g_loss),
    "hinge": Loss("hinge", hinge_d_loss, hinge_g_loss),
    "wgan-gp": Loss("wgan-gp", wasserstein_d_loss, wasserstein_g_loss, gradient_penalty=True),
}
