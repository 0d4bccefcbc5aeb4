"""Reference GANs in plain torch: DCGAN-style and MLP generator/discriminator pairs, the training
loop, checkpoints, and a generator trained on the built-in 8x8 digits shipped with the package.

    from fastgen.models import gan
    G = gan.pretrained_generator()                  # trained on fastgen.data.digits("train")
    x = G.sample(16, seed=0, truncation=1.0)        # [16, 1, 8, 8] in [-1, 1], latents by fastgen.latents

DCGAN (Radford, Metz, Chintala, arXiv 1511.06434) for 8x8 images: the generator projects z to a
2x2 feature map and doubles it twice with stride-2 transposed convolutions (BatchNorm + ReLU, tanh
out); the discriminator mirrors it with stride-2 convolutions and LeakyReLU(0.2). Its BatchNorm is
left out so that its scores are per-sample functions, as the WGAN-GP gradient penalty needs
(Gulrajani et al. drop critic batch normalisation for the same reason). Training uses Adam with
DCGAN's lr = 2e-4, betas = (0.5, 0.999), and the losses of ``fastgen.reference.gan``.
"""
import importlib.resources
import math

import torch
from torch import nn

import fastgen
from fastgen import data as datasets
from fastgen import _checks
from fastgen.models import _checkpoint, _training
from fastgen.reference import gan as losses

CHECKPOINT_FORMAT = "fastgen-gan/1"
PRETRAINED = {"digits": "gan_digits.pt"}


# --- models --------------------------------------------------------------------------------------

class Generator(nn.Module):
    """Base of the generators: ``forward(z [N, latent_dim]) -> x``, ``sample`` draws z with fastgen.latents."""
    latent_dim: int

    def config(self) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, *, seed=None, truncation=None, offset: int = 0, backend: str = "auto") -> torch.Tensor:
        """G(z) for n latents ``fastgen.latents(n, latent_dim, seed=seed, offset=offset, truncation=truncation)``
        (in eval mode: BatchNorm uses its running statistics, so sample k does not depend on n).
        Sample k is the same however the batch is split; ``truncation=psi`` applies the truncation trick."""
        param = next(self.parameters())
        z = fastgen.latents(n, self.latent_dim, seed=seed, offset=offset, truncation=truncation,
                            device=param.device, backend=backend)
        was_training = self.training
        self.eval()
        try:
            return self(z.to(param.dtype))
        finally:
            self.train(was_training)


class DCGANGenerator(Generator):
    """z [N, latent_dim] -> image [N, channels, 4 * base, 4 * base] in [-1, 1] (8x8 for base=2)."""

    def __init__(self, latent_dim: int = 32, width: int = 32, channels: int = 1, base: int = 2):
        super().__init__()
        self.latent_dim, self.width, self.channels, self.base = latent_dim, width, channels, base
        self.project = nn.Sequential(nn.Linear(latent_dim, 2 * width * base * base, bias=False),
                                     nn.BatchNorm1d(2 * width * base * base), nn.ReLU())
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),  # base -> 2 base
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),               # 2 base -> 4 base
            nn.Tanh())

    def config(self):
        return dict(latent_dim=self.latent_dim, width=self.width, channels=self.channels, base=self.base)

    def forward(self, z):
        h = self.project(z).reshape(len(z), 2 * self.width, self.base, self.base)
        return self.upsample(h)


class DCGANDiscriminator(nn.Module):
    """image [N, channels, 4 * base, 4 * base] -> score [N] (a logit)."""

    def __init__(self, width: int = 32, channels: int = 1, base: int = 2):
        super().__init__()
        self.width, self.channels, self.base = width, channels, base
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),      # 4 base -> 2 base
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2))     # 2 base -> base
        self.score = nn.Linear(2 * width * base * base, 1)

    def config(self):
        return dict(width=self.width, channels=self.channels, base=self.base)

    def forward(self, x):
        return self.score(self.features(x).flatten(1)).squeeze(1)


class MLPGenerator(Generator):
    """z [N, latent_dim] -> x [N, data_dim] in [-1, 1] (flat data)."""

    def __init__(self, latent_dim: int = 32, data_dim: int = 64, hidden: int = 256, depth: int = 2):
        super().__init__()
        self.latent_dim, self.data_dim, self.hidden, self.depth = latent_dim, data_dim, hidden, depth
        layers, width = [], latent_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, data_dim), nn.Tanh())

    def config(self):
        return dict(latent_dim=self.latent_dim, data_dim=self.data_dim, hidden=self.hidden, depth=self.depth)

    def forward(self, z):
        return self.net(z)


class MLPDiscriminator(nn.Module):
    """x [N, data_dim] -> score [N] (a logit)."""

    def __init__(self, data_dim: int = 64, hidden: int = 256, depth: int = 2):
        super().__init__()
        self.data_dim, self.hidden, self.depth = data_dim, hidden, depth
        layers, width = [], data_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def config(self):
        return dict(data_dim=self.data_dim, hidden=self.hidden, depth=self.depth)

    def forward(self, x):
        return self.net(x).squeeze(1)


ARCHITECTURES = {"dcgan": (DCGANGenerator, DCGANDiscriminator), "mlp": (MLPGenerator, MLPDiscriminator)}


def build(architecture: str = "dcgan", *, latent_dim: int = 32, **kwargs):
    """A fresh (generator, discriminator) pair for 8x8 digits ("dcgan": images, "mlp": flat vectors)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    gen_cls, disc_cls = ARCHITECTURES[architecture]
    return gen_cls(latent_dim=latent_dim, **kwargs), disc_cls(**kwargs)


# --- training ------------------------------------------------------------------------------------

def digits_for_training(architecture: str = "dcgan", split: str = "train") -> torch.Tensor:
    """fastgen.data.digits with pixels mapped from [0, 1] to the generator's tanh range [-1, 1]."""
    x, _ = datasets.digits(split, flat=architecture == "mlp")
    return 2.0 * x - 1.0


TRAIN_SETTINGS = ("loss", "steps", "batch_size", "d_steps", "lr", "betas", "gp_weight", "seed")


def train(generator: Generator, discriminator: nn.Module, data: torch.Tensor, *, loss: str = "nonsaturating",
          steps: int = 3000, batch_size: int = 64, d_steps: int = 1, lr: float = 2e-4, betas=(0.5, 0.999),
          gp_weight: float = 10.0, seed: int = 0, progress: bool = True, checkpoint=None, checkpoint_every: int = 500,
          resume_from: dict = None) -> dict:
    """Alternate ``d_steps`` discriminator updates and one generator update, ``steps`` times.

    Each discriminator update: a batch of data x and of fresh samples G(z), minimise the game's D
    loss (+ gp_weight * gradient penalty for "wgan-gp"). Each generator update: fresh G(z), minimise
    the G loss. Latents come from ``fastgen.latents(seed=seed)``, sample after sample (so a run is
    reproducible), batches from a permutation seeded by ``seed``.

    Resumable (``fastgen.models._training``): after every ``checkpoint_every``-th step but the last,
    ``checkpoint(training)`` is called with the run's state (both Adam states, the data order and cursor,
    the latent offset, the generators, the settings); ``resume_from=training``, with the networks holding
    the weights saved beside it, continues the run exactly, with its settings. Returns the loss history
    of this sitting, the seconds of all sittings, the settings and ``training``, the state at the end.
    """
    if resume_from is not None:
        loss, steps, batch_size, d_steps, lr, betas, gp_weight, seed = (resume_from[k] for k in TRAIN_SETTINGS)
    checkpoint_every = _checks.as_int(checkpoint_every, "checkpoint_every")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if loss not in losses.LOSSES:
        raise ValueError(f"loss must be one of {sorted(losses.LOSSES)}, got {loss!r}")
    game = losses.LOSSES[loss]
    steps = _checks.nonneg_int(steps, "steps")
    d_steps = _checks.as_int(d_steps, "d_steps")
    batch_size = _checks.as_int(batch_size, "batch_size")
    if d_steps < 1 or batch_size < 1:
        raise ValueError(f"d_steps and batch_size must be >= 1, got {d_steps} and {batch_size}")
    if len(data) < batch_size:
        raise ValueError(f"data must hold at least batch_size={batch_size} samples, got {len(data)}")
    device = next(generator.parameters()).device
    data = data.to(device)
    rng = torch.Generator().manual_seed(seed)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
    optimizers = {"g_optimizer": opt_g, "d_optimizer": opt_d}
    settings = dict(loss=loss, steps=steps, batch_size=batch_size, d_steps=d_steps, lr=lr, betas=tuple(betas),
                    gp_weight=gp_weight, seed=seed)
    start, seconds, drawn = 0, 0.0, 0  # drawn: latents used so far, the offset of the next batch
    order, cursor = torch.randperm(len(data), generator=rng), 0
    if resume_from is not None:
        start, seconds = _training.restore(resume_from, optimizers, rng)
        order, cursor, drawn = resume_from["order"], resume_from["cursor"], resume_from["drawn"]

    def latents(n):
        nonlocal drawn
        z = fastgen.latents(n, generator.latent_dim, seed=seed, offset=drawn, device=device)
        drawn += n
        return z

    def real_batch():
        nonlocal order, cursor
        if cursor + batch_size > len(data):
            order, cursor = torch.randperm(len(data), generator=rng), 0
        batch = data[order[cursor:cursor + batch_size].to(device)]
        cursor += batch_size
        return batch

    def state(step):
        return _training.state(step, clock.seconds(), settings, optimizers, rng, order=order.clone(), cursor=cursor,
                               drawn=drawn)

    history = {"d_loss": [], "g_loss": []}
    generator.train()
    discriminator.train()
    bar = _training.progress(steps - start, progress, f"GAN ({loss})")
    clock = _training.Stopwatch(seconds)
    for step in range(start, steps):
        for _ in range(d_steps):
            x = real_batch()
            with torch.no_grad():
                fake = generator(latents(batch_size))
            d_loss = game.d_loss(discriminator(x), discriminator(fake))
            if game.gradient_penalty:
                eps = torch.rand(batch_size, generator=rng).to(device)
                d_loss = d_loss + gp_weight * losses.gradient_penalty(discriminator, x, fake, eps)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        g_loss = game.g_loss(discriminator(generator(latents(batch_size))))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        history["d_loss"].append(d_loss.item())
        history["g_loss"].append(g_loss.item())
        if not (math.isfinite(history["d_loss"][-1]) and math.isfinite(history["g_loss"][-1])):
            raise FloatingPointError(f"GAN training diverged at step {step + 1}: "
                                     f"d_loss {history['d_loss'][-1]}, g_loss {history['g_loss'][-1]}")
        bar.set_postfix(d=f"{history['d_loss'][-1]:.3f}", g=f"{history['g_loss'][-1]:.3f}", refresh=False)
        bar.update()
        if checkpoint is not None and _training.checkpoint_due(step, steps, checkpoint_every):
            checkpoint(state(step + 1))
    bar.close()
    history["training"] = state(steps)
    history["seconds"], history["settings"] = history["training"]["seconds"], settings
    return history


def train_gan(out, *, architecture: str = "dcgan", latent_dim: int = 32, loss: str = "nonsaturating",
              steps: int = 8000, batch_size: int = 64, d_steps: int = 1, seed: int = 0, resume: bool = False,
              checkpoint_every: int = 500, slim: bool = False, threads: int = None, device="cpu",
              progress: bool = True, quality_samples: int = 1000) -> dict:
    """Build (initial weights from torch.manual_seed(seed)) and ``train`` a GAN on the train digits,
    writing its checkpoint to ``out`` every ``checkpoint_every`` steps (atomically, with the training
    state) and at the end, with the classifier confidence and MMD^2 of ``quality_samples`` samples
    (seed + 1) in the metadata. ``slim=True`` leaves the training state out of the final file.
    ``resume=True`` continues the run whose checkpoint is at ``out``, bit for bit, with its settings.
    Returns dict(generator, discriminator, quality, seconds, history)."""
    from fastgen import quality

    out, state, resume_from = _training.start(out, resume, threads,
                                              lambda path: _checkpoint.load(path, CHECKPOINT_FORMAT))
    if resume:
        architecture = state["architecture"]
        generator, discriminator = _networks(state, out, discriminator=True)
    else:
        torch.manual_seed(seed)
        generator, discriminator = build(architecture, latent_dim=latent_dim)
    generator.to(device)
    discriminator.to(device)

    def checkpoint(training):
        save_checkpoint(out, generator, discriminator, training=training, step=training["step"],
                        **{k: training[k] for k in TRAIN_SETTINGS})

    history = train(generator, discriminator, digits_for_training(architecture), loss=loss, steps=steps,
                    batch_size=batch_size, d_steps=d_steps, seed=seed, progress=progress, checkpoint=checkpoint,
                    checkpoint_every=checkpoint_every, resume_from=resume_from)
    settings = history["settings"]
    score = quality.digits_quality(generator.sample(quality_samples, seed=settings["seed"] + 1), value_range=(-1, 1))
    generator, discriminator = generator.cpu(), discriminator.cpu()
    save_checkpoint(out, generator, discriminator, training=None if slim else history["training"], **settings,
                    seconds=round(history["seconds"], 1), confidence=score.confidence, mmd=score.mmd)
    return dict(generator=generator, discriminator=discriminator, quality=score, seconds=history["seconds"],
                history=history)


# --- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(path, generator: Generator, discriminator: nn.Module = None, *, training: dict = None,
                    **metadata):
    """Write architecture, config and weights (generator; discriminator if given), ``metadata`` and, when
    given, the ``training`` state a resumed run needs, atomically: a write that fails midway leaves the
    file that was at ``path`` as it was."""
    arch = next(name for name, (g, _) in ARCHITECTURES.items() if isinstance(generator, g))
    state = {"format": CHECKPOINT_FORMAT, "architecture": arch,
             "generator": {"config": generator.config(), "state_dict": generator.state_dict()},
             "metadata": metadata}
    if discriminator is not None:
        state["discriminator"] = {"config": discriminator.config(), "state_dict": discriminator.state_dict()}
    if training is not None:
        state["training"] = training
    _checkpoint.save(state, path)


def load_checkpoint(path, *, device=None, discriminator: bool = False):
    """The generator of a checkpoint (eval mode), or (generator, discriminator) with ``discriminator=True``.
    The file is read as plain tensors (``torch.load(weights_only=True)``); one that is not a fastgen-gan
    checkpoint or would run pickled code is refused with a ValueError saying why."""
    state = _checkpoint.load(path, CHECKPOINT_FORMAT, map_location=device or "cpu")
    if discriminator and "discriminator" not in state:
        raise ValueError(f"checkpoint {str(path)!r} holds no discriminator")
    networks = _networks(state, path, discriminator=discriminator)
    networks = tuple(net.to(device or "cpu").eval() for net in networks)
    return networks if discriminator else networks[0]


def _networks(state: dict, path, *, discriminator: bool) -> tuple:
    """(generator,) or (generator, discriminator) of a checkpoint loaded from ``path``; ValueError naming
    the file for an unknown architecture or weights that do not fit the config."""
    classes = _checkpoint.architecture(state, ARCHITECTURES, path)
    parts = ("generator", "discriminator")[:1 + discriminator]
    entries = [state.get(part) if isinstance(state.get(part), dict) else {} for part in parts]
    return tuple(_checkpoint.build(state, path, cls, entry.get("config"), entry.get("state_dict"))
                 for cls, entry in zip(classes, entries))


def pretrained_path(name: str = "digits"):
    """Path of a checkpoint shipped in fastgen/checkpoints."""
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {sorted(PRETRAINED)}, got {name!r}")
    return importlib.resources.files("fastgen") / "checkpoints" / PRETRAINED[name]


def pretrained_generator(name: str = "digits", *, device=None) -> Generator:
    """The generator shipped with the package, in eval mode. "digits" was made by
    ``python -m fastgen train gan --threads 1 --slim --out fastgen/checkpoints/gan_digits.pt`` (DCGAN,
    non-saturating loss, 8000 steps of batch 64, seed 0; 158 s on one CPU core): on 1000 samples the
    digit classifier's confidence is 0.93 and the MMD^2 to held-out digits 0.002 (see the metadata)."""
    with importlib.resources.as_file(pretrained_path(name)) as path:
        return load_checkpoint(path, device=device)
