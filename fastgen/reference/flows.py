"""Normalizing flows in plain torch: the invertible layers of RealNVP and Glow, each with its log-det.

A flow maps data y to z = f(y) through invertible layers of unchanged dimensionality; the change of
variables gives the exact log-likelihood

    log p(y) = log N(z; 0, I) + sum_k log |det J_k|                  (Dinh et al. 2017, Eq. 3)

Every layer below returns (output, log|det J|) with the log-det summed per sample (shape [N]), and
has an inverse. Equations from Dinh, Sohl-Dickstein, Bengio, "Density estimation using Real NVP"
(arXiv 1605.08803, RealNVP) and Kingma, Dhariwal, "Glow" (arXiv 1807.03039, Table 1):

    affine coupling   y1 = x1,  y2 = x2 * exp(s(x1)) + t(x1),  log|det| = sum s      (RealNVP Eq. 7, 8)
       inverse        x1 = y1,  x2 = (y2 - t(y1)) * exp(-s(y1)), log|det| = -sum s  (RealNVP Eq. 9)
       with a mask b  y = b*x + (1-b) * (x * exp(s(b*x)) + t(b*x))                  (RealNVP Eq. 9)
    actnorm           y = x * exp(log_scale) + bias per channel, log|det| = H W sum log_scale   (Glow)
       data-dependent init: bias, log_scale such that y has zero mean, unit variance per channel
    invertible 1x1    y = W x at every pixel, W = P L (U + diag(sign_s * exp(log_s))),
       convolution    log|det| = H W sum log_s                                       (Glow Eq. 10)
    squeeze           [C, H, W] -> [4C, H/2, W/2]: each 2x2 block becomes 4 channels   (RealNVP Sec. 3.6)
    mixture CDF       x' = logit(sum_k pi_k sigmoid((x - mu_k) / s_k)) elementwise    (Flow++ Sec. 3.2)

Data preprocessing of the 8x8 digits (17 grey levels 0..16; RealNVP Sec. 4.1):

    dequantization    y = (level + u) / 17,  u ~ U[0, 1)^D: a density on [0, 1)^D whose
                      log-likelihood bounds the discrete one: log P(level) >= E_u log p(y) - D log 17
    logit transform   x = logit(a + (1 - 2a) y), a = 0.05,
                      log|det| = sum D log(1 - 2a) - log p - log(1 - p),  p = a + (1 - 2a) y
    bits/dim          -log P(level) / (D ln 2) <= -log p(y) / (D ln 2) + log2 17

Everything here runs in the tensors' own dtype (the tests use float64); autograd gives the gradients.
"""
import math

import torch
import torch.nn.functional as F

LOGIT_ALPHA = 0.05  # RealNVP's a: keeps the logit away from the infinities at 0 and 1
N_LEVELS = 17       # the digits' grey levels 0..16


def per_sample_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the first (shape [N]); a 1-d tensor holds one value per sample."""
    if values.dim() == 0:
        raise ValueError("a flow layer needs a batch dimension, got a 0-d tensor")
    return values.sum(dim=tuple(range(1, values.dim()))) if values.dim() > 1 else values


# --- affine coupling (RealNVP Eq. 7-9, Glow Table 1) -----------------------------------------------

def affine_coupling(x2: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor):
    """(y2, log|det|) of y2 = x2 * exp(s) + t, log|det| = sum s per sample; s = s(x1), t = t(x1)
    are computed by the caller from the half that passes through unchanged (RealNVP Eq. 7, 8)."""
    return x2 * torch.exp(log_scale) + shift, per_sample_sum(log_scale)


def affine_coupling_inverse(y2: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor):
    """(x2, log|det|) of the inverse x2 = (y2 - t) * exp(-s), log|det| = -sum s (RealNVP Eq. 9)."""
    return (y2 - shift) * torch.exp(-log_scale), -per_sample_sum(log_scale)


def checkerboard_mask(height: int, width: int, parity: int = 0, *, dtype=torch.float64, device=None):
    """b [1, 1, H, W]: 1 where (i + j + parity) is even (the half that passes through; RealNVP Fig. 3)."""
    i = torch.arange(height, device=device)[:, None]
    j = torch.arange(width, device=device)[None, :]
    return ((i + j + parity) % 2 == 0).to(dtype).reshape(1, 1, height, width)


def channel_mask(channels: int, parity: int = 0, *, dtype=torch.float64, device=None):
    """b [1, C, 1, 1]: 1 on the first half of the channels (parity 0) or the second (parity 1)."""
    first = torch.arange(channels, device=device) < channels // 2
    return (first if parity == 0 else ~first).to(dtype).reshape(1, channels, 1, 1)


def masked_affine_coupling(x, mask, net, *, reverse: bool = False):
    """RealNVP Eq. 9 with a binary mask b: y = b x + (1 - b) (x exp(s(b x)) + t(b x)); ``net(b x)``
    returns (s, t) shaped like x. The masked half has s = t = 0, so it passes through with log-det 0."""
    s, t = net(mask * x)
    s, t = (1 - mask) * s, (1 - mask) * t
    return affine_coupling_inverse(x, s, t) if reverse else affine_coupling(x, s, t)


# --- actnorm (Glow Sec. 3.1) ------------------------------------------------------------------------

def actnorm(x: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor, *, reverse: bool = False):
    """y = x * exp(log_scale) + bias per channel (x: [N, C, H, W], parameters [C]);
    log|det| = H W sum log_scale. Reverse: x = (y - bias) * exp(-log_scale), log|det| negated."""
    s, b = log_scale.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)
    pixels = x.shape[2] * x.shape[3]
    logdet = (pixels * log_scale.sum()).expand(x.shape[0])
    if reverse:
        return (x - b) * torch.exp(-s), -logdet
    return x * torch.exp(s) + b, logdet


def actnorm_init(x: torch.Tensor, eps: float = 1e-6):
    """Data-dependent initialisation (Glow Sec. 3.1): (log_scale, bias) [C] such that actnorm(x) has
    zero mean and unit variance per channel over the batch and the pixels."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    log_scale = -torch.log(std + eps)
    return log_scale, -mean * torch.exp(log_scale)


# --- invertible 1x1 convolution, LU-parameterised (Glow Sec. 3.2, Eq. 10) ----------------------------

def lu_weight(permutation, lower, upper, sign_s, log_s):
    """W = P L (U + diag(sign_s * exp(log_s))): L strictly lower (unit diagonal added), U strictly upper
    (only their triangles are used), P a fixed permutation matrix; log|det W| = sum log_s."""
    c = log_s.shape[0]
    eye = torch.eye(c, dtype=log_s.dtype, device=log_s.device)
    lower = torch.tril(lower, diagonal=-1) + eye
    upper = torch.triu(upper, diagonal=1) + torch.diag(sign_s * torch.exp(log_s))
    return permutation @ lower @ upper


def lu_init(channels: int, generator=None, dtype=torch.float64):
    """(P, L, U, sign_s, log_s) of a random rotation W = QR's Q (Glow's initialisation), via torch.linalg.lu."""
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    p, lower, upper = torch.linalg.lu(q)
    s = torch.diagonal(upper)
    return tuple(t.to(dtype) for t in (p, lower, torch.triu(upper, 1), torch.sign(s), torch.log(s.abs())))


def invertible_conv1x1(x: torch.Tensor, weight: torch.Tensor, log_s: torch.Tensor, *, reverse: bool = False):
    """y[n, :, i, j] = W x[n, :, i, j] (Glow Eq. 9): log|det| = H W log|det W| = H W sum log_s (Eq. 10).
    Reverse applies W^-1 and negates the log-det."""
    pixels = x.shape[2] * x.shape[3]
    logdet = (pixels * log_s.sum()).expand(x.shape[0])
    if reverse:
        return F.conv2d(x, torch.linalg.inv(weight)[:, :, None, None]), -logdet
    return F.conv2d(x, weight[:, :, None, None]), logdet


def permute_channels(x: torch.Tensor, order: torch.Tensor, *, reverse: bool = False):
    """A fixed channel permutation (RealNVP alternates halves; reversing is Glow's baseline): log|det| = 0."""
    if reverse:
        order = torch.argsort(order)
    return x[:, order], x.new_zeros(x.shape[0])



# --- elementwise mixture-of-logistics CDF (Flow++ Sec. 3.2) ------------------------------------------

def mixture_logistic_cdf(x, logits, means, log_scales, *, reverse: bool = False, iterations: int = 64):
    """x' = logit(F(x)) elementwise, F(x) = sum_k pi_k sigmoid((x - mu_k) / s_k), pi = softmax(logits)
    (Ho et al., Flow++, arXiv 1902.00275, Sec. 3.2, without the coupling: one learned monotone map per
    element). It reshapes each element's marginal (e.g. a dequantized box) into what the Gaussian
    prior fits; affine layers cannot bend an element's own distribution.

        log|dx'/dx| = log f(x) - log F(x) - log(1 - F(x)),  f(x) = sum_k pi_k sigmoid'(u_k) / s_k,
        u_k = (x - mu_k) / s_k, each log computed as a logsumexp of log-sigmoids (no cancellation).

    x [N, *E]; logits, means, log_scales [*E, K]. Reverse: F(x) = sigmoid(x') solved by bisection
    (F is increasing) in float64 on [-64, 64], ``iterations`` halvings, then the log-det of the
    forward map at the solution, negated.
    """
    log_pi = torch.log_softmax(logits, dim=-1)
    if reverse:
        target = x.double()
        params = [p.double() for p in (log_pi, means, log_scales)]
        low, high = torch.full_like(target, -64.0), torch.full_like(target, 64.0)
        with torch.no_grad():
            for _ in range(iterations):
                mid = 0.5 * (low + high)
                below = _mixture_logit(mid, *params)[0] < target
                low, high = torch.where(below, mid, low), torch.where(below, high, mid)
        solution = (0.5 * (low + high)).to(x.dtype)
        return solution, -_mixture_logit(solution, log_pi, means, log_scales)[1]
    return _mixture_logit(x, log_pi, means, log_scales)


def _mixture_logit(x, log_pi, means, log_scales):
    """(logit F(x), per-sample log|d logit F / dx|) of the mixture with log-weights ``log_pi``."""
    u = (x[..., None] - means) * torch.exp(-log_scales)
    log_cdf = torch.logsumexp(log_pi + F.logsigmoid(u), dim=-1)              # log F
    log_sf = torch.logsumexp(log_pi + F.logsigmoid(-u), dim=-1)              # log (1 - F)
    log_pdf = torch.logsumexp(log_pi - log_scales + F.logsigmoid(u) + F.logsigmoid(-u), dim=-1)  # log f
    return log_cdf - log_sf, per_sample_sum(log_pdf - log_cdf - log_sf)

# --- squeeze (RealNVP Sec. 3.6) ---------------------------------------------------------------------

def squeeze(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 4C, H/2, W/2]: channel 4c + 2a + b of pixel (i, j) is x[c, 2i + a, 2j + b]."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``squeeze``: [N, 4C, H, W] -> [N, C, 2H, 2W]."""
    n, c4, h, w = x.shape
    x = x.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c4 // 4, 2 * h, 2 * w)


# --- data: dequantization, logit transform, the prior, bits/dim ---------------------------------------

def levels_of(x: torch.Tensor, n_levels: int = N_LEVELS) -> torch.Tensor:
    """Integer grey levels of pixels given as level / (n_levels - 1) in [0, 1] (fastgen.data.digits)."""
    return torch.round(x * (n_levels - 1)).long()


def dequantize(levels: torch.Tensor, u: torch.Tensor, n_levels: int = N_LEVELS) -> torch.Tensor:
    """y = (level + u) / n_levels in [0, 1): uniform dequantization, u ~ U[0, 1) (RealNVP Sec. 4.1)."""
    return (levels.to(u.dtype) + u) / n_levels


def quantize(y: torch.Tensor, n_levels: int = N_LEVELS) -> torch.Tensor:
    """The level a dequantized value came from: floor(y * n_levels), clamped to 0 .. n_levels - 1."""
    return torch.floor(y * n_levels).clamp(0, n_levels - 1).long()


def logit_transform(y: torch.Tensor, alpha: float = LOGIT_ALPHA, *, reverse: bool = False):
    """x = logit(p), p = alpha + (1 - 2 alpha) y; log|det dx/dy| = sum log(1 - 2 alpha) - log p - log(1 - p).
    Reverse: y = (sigmoid(x) - alpha) / (1 - 2 alpha), with the log-det negated."""
    if reverse:
        p = torch.sigmoid(y)
        return (p - alpha) / (1 - 2 * alpha), -per_sample_sum(math.log(1 - 2 * alpha) - F.logsigmoid(y)
                                                                - F.logsigmoid(-y))
    p = alpha + (1 - 2 * alpha) * y
    return torch.log(p) - torch.log1p(-p), per_sample_sum(math.log(1 - 2 * alpha) - torch.log(p) - torch.log1p(-p))


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample: -1/2 sum (z^2 + log 2 pi)."""
    return -0.5 * per_sample_sum(z * z + math.log(2 * math.pi))


def bits_per_dim(log_prob: torch.Tensor, dims: int, n_levels: int = N_LEVELS) -> torch.Tensor:
    """Bits per dimension of the discrete data from the dequantized log-density log p(y) on [0, 1)^D:
    -log p(y) / (D ln 2) + log2 n_levels (an upper bound on -log2 P(level) / D, by Jensen)."""
    return -log_prob / (dims * math.log(2)) + math.log2(n_levels)


def categorical_bits_per_dim(train_levels: torch.Tensor, test_levels: torch.Tensor,
                             n_levels: int = N_LEVELS, smoothing: float = 1.0) -> torch.Tensor:
    """The independent per-pixel baseline: P(level at pixel d) = (count_d(level) + smoothing) /
    (N + n_levels smoothing) from the train levels [N, D] (Laplace smoothing); bits/dim of each test
    row [M, D]: -sum_d log2 P / D."""
    counts = torch.stack([torch.bincount(col, minlength=n_levels) for col in train_levels.t()]).double()
    probs = (counts + smoothing) / (counts.sum(1, keepdim=True) + n_levels * smoothing)
    return -torch.log2(probs.gather(1, test_levels.t())).t().mean(1)
