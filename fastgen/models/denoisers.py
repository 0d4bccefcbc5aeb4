"""Denoisers for DDPM/DDIM in plain torch, optionally class-conditional, their resumable training,
checkpoints, and a conditional MLP denoiser trained on the built-in 8x8 digits shipped with the package.

    from fastgen.models import denoisers
    model = denoisers.pretrained_denoiser()          # v-prediction, cosine schedule, 10 classes + null
    scheduler = DDIMScheduler(**model.scheduler_config)
    x = fastgen.sample(model, (16, 1, 8, 8), scheduler, num_inference_steps=50)           # the null label
    sevens = fastgen.sample(lambda x, t: model(x, t, class_labels=7), (16, 1, 8, 8), scheduler)

Models (``forward(x, t, class_labels=None) -> prediction`` with x [B, ...], t an int or an integer
tensor [] / [B]; ``prediction_type`` says what the output means, "epsilon" by default):

- ``MLPDenoiser`` for flat data [B, dim]: residual MLP blocks, each conditioned on the time embedding.
- ``UNetDenoiser`` for images [B, C, H, W]: the DDPM UNet (Ho et al. 2020, appendix B) in small:
  residual blocks with GroupNorm + SiLU and the time embedding added between the two 3x3 convs,
  self-attention at the low resolutions, stride-2 downsampling, nearest upsampling + conv, skip
  connections from every block of the way down.

Time embedding (Vaswani et al. 2017, sec. 3.5, as DDPM uses it): for d channels,
    emb(t)_i = sin(t / 10000^(i / (d/2))),  emb(t)_{d/2 + i} = cos(t / 10000^(i / (d/2))),  i < d/2,
followed by Linear -> SiLU -> Linear. A class-conditional model (``num_classes`` > 0) adds a learned
embedding of the label, one of ``num_classes`` classes or the null label ``num_classes`` (``Denoiser``).

Training (Ho et al. Algorithm 1): x_0 from the data, t ~ U{0..T-1}, eps ~ N(0, I) from the counter-based
stream, x_t = ``fastgen.q_sample(x_0, t, schedule, noise=eps)``, minimise |target - model(x_t, t)|^2 with
the target of the prediction type (eps: L_simple, eq. 14; v: Salimans & Ho 2022); a conditional model
sees the null label in place of the true one with probability ``label_dropout`` (Ho & Salimans 2022).
The weights saved are an exponential moving average of the trained ones. ``train_ddpm`` writes
checkpoints as it goes and resumes an interrupted run exactly (``fastgen.models._training``).
"""
import copy
import importlib.resources
import math

import torch
from torch import nn
from torch.nn import functional as F

import fastgen
from fastgen import _checks
from fastgen import data as datasets
from fastgen.models import _checkpoint, _training
from fastgen.schedules import NoiseSchedule
from fastgen.step_spec import PREDICTION_TYPES

CHECKPOINT_FORMAT = "fastgen-denoiser/1"
PRETRAINED = {"digits": "ddpm_digits.pt"}
# The DDPMScheduler / DDIMScheduler arguments the digits denoiser is trained and sampled with (diffusers' defaults).
DIGITS_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                               prediction_type="epsilon", clip_sample=True)
# The scheduler arguments that make the training noise schedule (fastgen.schedules.NoiseSchedule).
SCHEDULE_KEYS = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end", "trained_betas",
                 "rescale_betas_zero_snr")


# --- time embedding --------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim] sinusoidal features (sin half, then cos half; zero-padded if dim is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2)) if dim % 2 else emb


def _batch_timesteps(t, batch: int, device) -> torch.Tensor:
    """t (int, or integer/float tensor of shape [] or [B]) as a [B] tensor on ``device``, without a sync."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, device=device)
    if t.dim() == 0:
        return t.to(device).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"t must be an int or a tensor of shape [] or [batch={batch}], got shape {tuple(t.shape)}")
    return t.to(device)


class TimeEmbedding(nn.Module):
    """t -> sinusoidal(t, dim) -> Linear -> SiLU -> Linear (dim -> out_dim)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.dim))


class Denoiser(nn.Module):
    """Base of the denoisers: ``forward(x, t, class_labels=None)`` returns the ``prediction_type``
    quantity, shaped like x.

    Class conditioning (``num_classes`` > 0): a learned embedding of ``num_classes + 1`` entries is
    added to the time embedding; entry ``null_class_label = num_classes`` is the null label, "no class",
    which training puts in place of the true label with probability ``label_dropout`` so that one
    network is both p(x | class) and p(x) (classifier-free guidance, Ho & Salimans 2022, Algorithm 1).
    ``class_labels=None`` means the null label for every sample. An unconditional denoiser has
    ``num_classes = 0`` and ``null_class_label = None`` and refuses labels."""
    prediction_type: str = "epsilon"
    num_classes: int = 0
    null_class_label = None

    def config(self) -> dict:
        raise NotImplementedError

    def _init_classes(self, num_classes: int, embedding_dim: int):
        self.num_classes = _checks.nonneg_int(num_classes, "num_classes")
        self.null_class_label = self.num_classes if self.num_classes else None
        self.class_embedding = nn.Embedding(self.num_classes + 1, embedding_dim) if self.num_classes else None

    def _conditioning(self, t, class_labels, batch: int, device, dtype) -> torch.Tensor:
        """The [B, d] embedding of the timesteps plus, when conditional, of the class labels."""
        emb = self.time_embedding(_batch_timesteps(t, batch, device))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(self._batch_labels(class_labels, batch, device))
        elif class_labels is not None:
            raise ValueError("class_labels must be None for an unconditional denoiser (num_classes=0), got labels")
        return emb.to(dtype)

    def _batch_labels(self, labels, batch: int, device) -> torch.Tensor:
        """class_labels (None, an int, or an integer tensor [] / [B]) as a [B] int64 tensor in
        [0, num_classes] (num_classes being the null label). Values are checked on the CPU only: on
        a GPU the check would synchronise (the embedding lookup asserts there instead)."""
        allowed = f"in [0, {self.num_classes}] ({self.num_classes} = null_class_label)"
        if labels is None:
            return torch.full((batch,), self.null_class_label, dtype=torch.int64, device=device)
        if not isinstance(labels, torch.Tensor):
            if isinstance(labels, bool) or not isinstance(labels, int) or not 0 <= labels <= self.num_classes:
                raise ValueError(f"class_labels must be None, an int {allowed} or an integer tensor, got {labels!r}")
            labels = torch.tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.dim() > 1 or (labels.dim() == 1 and labels.shape[0] != batch):
            raise ValueError(f"class_labels must be None, an int or a tensor of shape [] or [batch={batch}], "
                             f"got shape {tuple(labels.shape)}")
        if labels.device.type == "cpu" and labels.numel() and not (0 <= labels.min() and labels.max() <= self.num_classes):
            raise ValueError(f"class_labels must be {allowed}, got values from {labels.min().item()} to "
                             f"{labels.max().item()}")
        return labels.to(device=device, dtype=torch.int64).expand(batch)


def _prediction_type(value):
    if value not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {value!r}")
    return value


# --- MLP -------------------------------------------------------------------------------------------

class _MLPBlock(nn.Module):
    def __init__(self, hidden: int, time_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.time = nn.Linear(time_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h, temb):
        return h + self.fc2(F.silu(self.fc1(F.silu(self.norm(h))) + self.time(temb)))


class MLPDenoiser(Denoiser):
    """x [B, dim] (or [B, ...] with dim elements per sample, reshaped back), t -> prediction like x."""

    def __init__(self, dim: int = 64, hidden: int = 256, depth: int = 3, time_dim: int = 64,
                 prediction_type: str = "epsilon", num_classes: int = 0):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth), ("time_dim", time_dim)):
            if _checks.as_int(value, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.dim, self.hidden, self.depth, self.time_dim = dim, hidden, depth, time_dim
        self.prediction_type = _prediction_type(prediction_type)
        self.time_embedding = TimeEmbedding(time_dim, time_dim)
        self._init_classes(num_classes, time_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden, time_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def config(self):
        return dict(dim=self.dim, hidden=self.hidden, depth=self.depth, time_dim=self.time_dim,
                    prediction_type=self.prediction_type, num_classes=self.num_classes)

    def forward(self, x, t, class_labels=None):
        if x.dim() < 1 or x[0].numel() != self.dim:
            raise ValueError(f"x must be [B, ...] with {self.dim} elements per sample, got shape {tuple(x.shape)}")
        temb = self._conditioning(t, class_labels, x.shape[0], x.device, x.dtype)
        h = self.inp(x.reshape(x.shape[0], self.dim))
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h).reshape(x.shape)


# --- UNet ------------------------------------------------------------------------------------------

def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 (+ time projection) -> GroupNorm -> SiLU -> conv3x3, plus a skip."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual: x + proj(softmax(q k^T / sqrt(c)) v)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class UNetDenoiser(Denoiser):
    """x [B, C, H, W] (H, W divisible by 2^(levels-1)), t -> prediction [B, C, H, W].

    channel_mults: channels of each resolution level as multiples of ``channels``; attention in every
    block whose resolution (H at that level) is in ``attention_resolutions`` and in the middle."""

    def __init__(self, in_channels: int = 1, channels: int = 32, channel_mults=(1, 2), num_res_blocks: int = 1,
                 attention_resolutions=(4,), image_size: int = 8, prediction_type: str = "epsilon",
                 num_classes: int = 0):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("channels", channels),
                            ("num_res_blocks", num_res_blocks), ("image_size", image_size)):
            if _checks.as_int(value, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        channel_mults, attention_resolutions = tuple(channel_mults), tuple(attention_resolutions)
        if not channel_mults or image_size % (1 << (len(channel_mults) - 1)):
            raise ValueError(f"image_size must be divisible by 2^(len(channel_mults) - 1), got image_size="
                             f"{image_size} and channel_mults={channel_mults}")
        self.in_channels, self.channels, self.channel_mults = in_channels, channels, channel_mults
        self.num_res_blocks, self.attention_resolutions, self.image_size = num_res_blocks, attention_resolutions, \
            image_size
        self.prediction_type = _prediction_type(prediction_type)
        time_dim = 4 * channels
        self.time_embedding = TimeEmbedding(channels, time_dim)
        self._init_classes(num_classes, time_dim)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips, ch, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                out = channels * mult
                self.down.append(nn.ModuleList([ResBlock(ch, out, time_dim),
                                                Attention(out) if res in attention_resolutions else nn.Identity()]))
                ch = out
                skips.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, time_dim), Attention(ch), ResBlock(ch, ch, time_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = channels * mult
                self.up.append(nn.ModuleList([ResBlock(ch + skips.pop(), out, time_dim),
                                              Attention(out) if res in attention_resolutions else nn.Identity()]))
                ch = out
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def config(self):
        return dict(in_channels=self.in_channels, channels=self.channels, channel_mults=list(self.channel_mults),
                    num_res_blocks=self.num_res_blocks, attention_resolutions=list(self.attention_resolutions),
                    image_size=self.image_size, prediction_type=self.prediction_type, num_classes=self.num_classes)

    def forward(self, x, t, class_labels=None):
        divisor = 1 << (len(self.channel_mults) - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % divisor or x.shape[3] % divisor:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W] with H and W divisible by {divisor}, "
                             f"got shape {tuple(x.shape)}")
        temb = self._conditioning(t, class_labels, x.shape[0], x.device, x.dtype)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](h, temb))
            else:
                h = layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](torch.cat([h, hs.pop()], dim=1), temb))
            else:
                h = layer(h)
        return self.out(h)


ARCHITECTURES = {"mlp": MLPDenoiser, "unet": UNetDenoiser}


# --- training --------------------------------------------------------------------------------------

def digits_for_training(architecture: str = "unet", split: str = "train", *, labels: bool = False):
    """fastgen.data.digits with pixels mapped from [0, 1] to [-1, 1] (flat [N, 64] for the MLP);
    with ``labels``, the pair (x, y) with y the int64 digit of each row."""
    x, y = datasets.digits(split, flat=architecture == "mlp")
    return (2.0 * x - 1.0, y) if labels else 2.0 * x - 1.0


def training_target(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                    schedule) -> torch.Tensor:
    """What the denoiser learns to output at x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (t a CPU tensor [B]):
    "epsilon": eps (Ho et al. eq. 14); "sample": x_0; "v_prediction": v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
    (Salimans & Ho 2022, sec. 4), the parameterisation whose target stays of unit scale at every t."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    shape = (-1,) + (1,) * (x0.dim() - 1)
    signal = schedule.sqrt_alphas_cumprod[t].to(x0.device, x0.dtype).reshape(shape)
    noise = schedule.sqrt_one_minus_alphas_cumprod[t].to(x0.device, x0.dtype).reshape(shape)
    return signal * eps - noise * x0


TRAIN_SETTINGS = ("steps", "batch_size", "lr", "ema_decay", "seed", "label_dropout")


def train(model: Denoiser, data: torch.Tensor, schedule, *, labels: torch.Tensor = None, label_dropout: float = 0.1,
          steps: int = 4000, batch_size: int = 128, lr: float = 2e-3, ema_decay: float = 0.995, seed: int = 0,
          progress: bool = True, checkpoint=None, checkpoint_every: int = 500, resume_from: dict = None) -> dict:
    """Ho et al. Algorithm 1 with Adam (lr warmed up over min(200, steps / 10) steps, then cosine-decayed
    to 0): the batch from a permutation seeded by ``seed``, t ~ U{0..T-1} from it too, eps from the
    counter-based stream (``fastgen.randn(seed=seed)``, sample after sample), x_t by ``fastgen.q_sample``,
    the loss |target - model(x_t, t)|^2 with the target of ``model.prediction_type`` (``training_target``).
    After each update the exponential moving average of the weights moves by ``1 - ema_decay``; the EMA
    is copied into ``model`` at the end.

    A class-conditional model (``model.num_classes`` > 0) needs ``labels`` [N], the class of each row of
    ``data``; each is replaced by the null label with probability ``label_dropout`` (drawn from the
    same generator), which teaches the unconditional model alongside the conditional one.

    Resumable: after every ``checkpoint_every``-th step but the last, ``checkpoint(ema_model, training)``
    is called with the EMA model and the run's state (``_training.state``: the raw weights, Adam's
    moments, the data order and cursor, the noise offset, both generators, the settings).
    ``resume_from=training`` continues such a run exactly, taking its settings from it (``model`` must
    have the same config; its weights are replaced). Returns the loss of this sitting's steps, the
    seconds of all sittings, the settings and ``training``, the state after the last step."""
    if resume_from is not None:
        steps, batch_size, lr, ema_decay, seed, label_dropout = (resume_from[k] for k in TRAIN_SETTINGS)
    steps = _checks.nonneg_int(steps, "steps")
    batch_size = _checks.as_int(batch_size, "batch_size")
    checkpoint_every = _checks.as_int(checkpoint_every, "checkpoint_every")
    if batch_size < 1 or len(data) < batch_size:
        raise ValueError(f"batch_size must be in [1, len(data)={len(data)}], got {batch_size}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout!r}")
    if model.num_classes and (labels is None or labels.shape != (len(data),)):
        raise ValueError(f"labels must be a [len(data)={len(data)}] tensor of classes for a class-conditional model, "
                         f"got {None if labels is None else tuple(labels.shape)}")
    if not model.num_classes and labels is not None:
        raise ValueError("labels must be None for an unconditional model (num_classes=0)")
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, seed=seed,
                    label_dropout=label_dropout)
    device = next(model.parameters()).device
    data = data.to(device)
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = min(200, max(steps // 10, 1))
    ema = copy.deepcopy(model).requires_grad_(False)
    start, seconds, cursor, drawn = 0, 0.0, 0, 0
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        ema.load_state_dict(resume_from["ema"])
        start, seconds = _training.restore(resume_from, {"optimizer": opt}, rng)
        order, cursor, drawn = resume_from["order"], resume_from["cursor"], resume_from["drawn"]
    else:
        order = torch.randperm(len(data), generator=rng)

    def state(step):
        weights = {name: {k: v.detach().clone() for k, v in net.state_dict().items()}
                   for name, net in (("model", model), ("ema", ema))}
        return _training.state(step, clock.seconds(), settings, {"optimizer": opt}, rng, order=order.clone(),
                               cursor=cursor, drawn=drawn, **weights)

    history = {"loss": []}
    model.train()
    bar = _training.progress(steps - start, progress, "DDPM")
    clock = _training.Stopwatch(seconds)
    for step in range(start, steps):
        if cursor + batch_size > len(data):
            order, cursor = torch.randperm(len(data), generator=rng), 0
        rows = order[cursor:cursor + batch_size]
        x0 = data[rows.to(device)]
        cursor += batch_size
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=rng)
        class_labels = None
        if model.num_classes:
            dropped = torch.rand(batch_size, generator=rng) < label_dropout
            class_labels = torch.where(dropped, model.null_class_label, labels[rows]).to(device)
        eps = fastgen.randn(x0.shape, seed=seed, offset=drawn, device=device)
        drawn += batch_size  # samples drawn so far: the offset of the next batch
        x_t = fastgen.q_sample(x0, t.to(device), schedule, noise=eps)
        target = training_target(model.prediction_type, x0, eps, t, schedule)
        prediction = model(x_t, t.to(device)) if class_labels is None else model(x_t, t.to(device), class_labels)
        loss = F.mse_loss(prediction, target)                                         # L_simple, eq. (14)
        _training.set_learning_rate(opt, _training.learning_rate(step, steps, lr, warmup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - ema_decay)
        _training.record_loss(history["loss"], loss, step, bar, "DDPM training")
        bar.update()
        if checkpoint is not None and _training.checkpoint_due(step, steps, checkpoint_every):
            checkpoint(ema, state(step + 1))
    bar.close()
    history["training"] = state(steps)
    history["seconds"], history["settings"] = history["training"]["seconds"], settings
    model.load_state_dict(ema.state_dict())
    model.eval()
    return history


def sample_quality(model: Denoiser, *, n: int = 500, seed: int = 1, steps: int = 50, class_labels=None,
                   guidance_scale=None, sampler: str = "ddim"):
    """``fastgen.quality.digits_quality`` of ``n`` samples of the digits denoiser: ``steps`` steps of
    ``sampler`` (a ``fastgen.sampling.make_scheduler`` kind; DDIM with eta 0 by default) with the
    scheduler of ``model.scheduler_config`` on the torch backend, seed ``seed``; ``class_labels`` (an
    int or [n] tensor) samples a conditional model given those classes, with classifier-free guidance
    ``guidance_scale`` if given."""
    from fastgen import quality

    return quality.digits_quality(_samples(model, n, seed, steps, class_labels, guidance_scale, sampler),
                                  value_range=(-1, 1))


def _samples(model, n, seed, steps, class_labels, guidance_scale, sampler):
    from fastgen.models import views

    seen, scheduler = views.for_sampler(model, sampler)
    with torch.no_grad():
        return fastgen.sample(seen, (n, 1, 8, 8), scheduler, num_inference_steps=steps, seed=seed, backend="torch",
                              class_labels=class_labels, guidance_scale=guidance_scale,
                              device=next(model.parameters()).device)


def class_shares(model: Denoiser, *, n: int = 200, seed: int = 1, steps: int = 50, guidance_scale=None,
                 sampler: str = "ddim") -> tuple:
    """(shares, quality): ``n`` samples given each class K of a conditional model (labels K = i mod
    num_classes, one run; ``guidance_scale``: classifier-free guidance), the share of those given K
    that the digit classifier of ``fastgen.quality`` labels K, for each K, and the quality of all of
    them together: how well the conditioning works."""
    from fastgen import quality

    if not model.num_classes:
        raise ValueError("model must be class-conditional (num_classes > 0), got an unconditional denoiser")
    labels = torch.arange(n * model.num_classes) % model.num_classes
    x = _samples(model, len(labels), seed, steps, labels, guidance_scale, sampler)
    predicted = quality.class_probabilities(x, value_range=(-1, 1)).argmax(1)
    shares = [float((predicted[labels == k] == k).float().mean()) for k in range(model.num_classes)]
    return shares, quality.digits_quality(x, value_range=(-1, 1))


def train_ddpm(out, *, architecture: str = "unet", model_config: dict = None, conditional: bool = True,
               scheduler_config: dict = None, steps: int = 10000, batch_size: int = 64, lr: float = 2e-3,
               ema_decay: float = 0.995, label_dropout: float = 0.1, seed: int = 0, resume: bool = False,
               checkpoint_every: int = 500, slim: bool = False, threads: int = None, device="cpu",
               progress: bool = True, quality_samples: int = 500) -> dict:
    """Train a digits denoiser (``train``) and write its checkpoint to ``out``: every ``checkpoint_every``
    steps (atomically, with the training state) and at the end, where the EMA weights, rounded to fp16
    as saved, are scored by ``sample_quality`` (``quality_samples`` samples, seed + 1; the null label for a
    conditional model) and the scores go into the metadata. ``slim=True`` leaves the training state out
    of the final file (fp16 weights only: what is shipped; it cannot be resumed).

    ``architecture`` ("mlp" / "unet") and ``model_config`` (constructor arguments) choose the network;
    ``conditional`` makes it class-conditional on the 10 digits with ``label_dropout``;
    ``scheduler_config`` (diffusers' DDPMScheduler arguments; default ``DIGITS_SCHEDULER_CONFIG``) sets
    the noise schedule, and its ``prediction_type`` the model's. The initial weights come from
    torch.manual_seed(seed). ``resume=True`` continues the run whose checkpoint is at ``out`` bit for
    bit, with that run's architecture, schedule and settings. Returns dict(model, quality, seconds, loss)."""
    out, state, resume_from = _training.start(out, resume, threads,
                                              lambda path: _checkpoint.load(path, CHECKPOINT_FORMAT))
    if resume:
        architecture, scheduler_config = state["architecture"], dict(state["scheduler_config"])
        model = _checkpoint.architecture(state, ARCHITECTURES, out)(**state["config"])
    else:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
        scheduler_config = dict(DIGITS_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
        torch.manual_seed(seed)
        model = ARCHITECTURES[architecture](**dict(model_config or {}),
                                            prediction_type=scheduler_config.get("prediction_type", "epsilon"),
                                            num_classes=10 if conditional else 0)
    schedule = NoiseSchedule(**{k: scheduler_config[k] for k in SCHEDULE_KEYS if k in scheduler_config})
    data, labels = digits_for_training(architecture, labels=True)
    model.to(device)

    def checkpoint(ema, training):
        save_checkpoint(out, ema, scheduler_config, training=training, step=training["step"],
                        **{k: training[k] for k in TRAIN_SETTINGS})

    history = train(model, data, schedule, labels=labels if model.num_classes else None, label_dropout=label_dropout,
                    steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, seed=seed, progress=progress,
                    checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume_from=resume_from)
    settings = history["settings"]
    model = model.cpu()
    with torch.no_grad():  # score the weights as they are saved: rounded to fp16
        for p in model.parameters():
            p.copy_(p.half().float())
    model.scheduler_config = scheduler_config
    score = sample_quality(model, n=quality_samples, seed=settings["seed"] + 1)
    save_checkpoint(out, model, scheduler_config, training=None if slim else history["training"],
                    **settings, seconds=round(history["seconds"], 1),
                    sampler="ddim-50", quality_samples=quality_samples, confidence=score.confidence, mmd=score.mmd)
    return dict(model=model, quality=score, seconds=history["seconds"], loss=history["loss"])


# --- checkpoints -----------------------------------------------------------------------------------

def save_checkpoint(path, model: Denoiser, scheduler_config: dict, *, half: bool = True, training: dict = None,
                    **metadata):
    """Write architecture, config, weights (fp16 when ``half``: half the file) and the noise
    schedule's config (diffusers' DDPMScheduler arguments) plus ``metadata`` and, when given, the
    ``training`` state a resumed run needs, atomically: a write that fails midway leaves the file that
    was at ``path`` as it was."""
    arch = next(name for name, cls in ARCHITECTURES.items() if isinstance(model, cls))
    weights = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    state = {"format": CHECKPOINT_FORMAT, "architecture": arch, "config": model.config(), "state_dict": weights,
             "scheduler_config": dict(scheduler_config), "metadata": metadata}
    if training is not None:
        state["training"] = training
    _checkpoint.save(state, path)


def load_checkpoint(path, *, device=None) -> Denoiser:
    """The denoiser of a checkpoint in eval mode, fp32, with ``scheduler_config`` and ``metadata`` attributes.
    The file is read as plain tensors (``torch.load(weights_only=True)``); one that is not a
    fastgen-denoiser checkpoint, would run pickled code, names an unknown architecture or holds weights
    that do not fit its config is refused with a ValueError naming the file and saying why."""
    state = _checkpoint.load(path, CHECKPOINT_FORMAT)
    model = network(state, path)
    model.scheduler_config = dict(state["scheduler_config"])
    model.metadata = dict(state["metadata"])
    return model.to(device or "cpu").eval().requires_grad_(False)


def network(state: dict, path) -> Denoiser:
    """The network of a checkpoint loaded from ``path`` (its architecture, config and weights in fp32);
    ValueError naming the file for an unknown architecture or weights that do not fit the config."""
    make = _checkpoint.architecture(state, ARCHITECTURES, path)
    weights = state.get("state_dict")
    if isinstance(weights, dict):
        weights = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                   for k, v in weights.items()}
    return _checkpoint.build(state, path, make, state.get("config"), weights)


def pretrained_path(name: str = "digits"):
    """Path of a checkpoint shipped in fastgen/checkpoints."""
    return _checkpoint.shipped_path(PRETRAINED, name)


def pretrained_denoiser(name: str = "digits", *, device=None) -> Denoiser:
    """The denoiser shipped with the package (eval mode, no gradients): digits [B, 1, 8, 8] in [-1, 1].
    ``model.scheduler_config`` holds the DDPMScheduler/DDIMScheduler arguments it was trained with,
    ``model.metadata`` how it was made and its scores. "digits" is class-conditional (10 digits + the
    null label, ``class_labels=None`` by default), an MLPDenoiser 512 x 4 predicting v on the cosine
    schedule, made by ``python -m fastgen train ddpm --denoiser mlp --width 512 --depth 4 --conditional
    --label-dropout 0.2 --beta-schedule squaredcos_cap_v2 --prediction-type v_prediction --no-clip-sample
    --lr 1e-3 --ema-decay 0.9995 --batch-size 128 --steps 28000 --checkpoint-every 2000 --slim --threads 1
    --out fastgen/checkpoints/ddpm_digits.pt`` (seed 0, EMA weights stored as fp16; 2066 s on one thread
    of a CPU shared with other jobs). 1000 samples of 50 DDIM steps with the null label
    (``sample_quality(model, n=1000, seed=1)``) get a digit-classifier confidence of 0.973 and an MMD^2
    to held-out digits of 0.0004 (real held-out digits: 0.980 and ~0); given class K without guidance,
    99.8% of samples are labelled K (``class_shares``)."""
    with importlib.resources.as_file(pretrained_path(name)) as path:
        return load_checkpoint(path, device=device)
