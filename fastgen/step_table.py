"""The step table: a sigma-space sampler's run as rows of affine coefficients, made once on the host.

A ``StepTable`` holds what a run of N steps needs, made once on the host from a scheduler's sigmas
(by the sampler's builder in fastgen/reference/, in float64): per step i the affine coefficients of
kernels/samplers.py (the named COLUMNS), the noise stream, whether diffusers' generator draws, the
model's timestep and input scale; per run the clipping and the initial noise. Its ``reference`` is
the sampler's own float64 step (the paper's equations), which the kernel and the torch path are
checked against.

    table = fastgen.step_table.step_table(scheduler)    # after scheduler.set_timesteps(N)
    x, denoised = fastgen.ops.samplers.sampler_step(table, i, model_output, x, seed=0)

This module sits beside step_spec.py, below everything that uses it: the references (whose builders
``table_builder`` registers and ``scheduler_table`` assembles), the ops (fastgen.ops.samplers) and the
drop-in schedulers (fastgen.schedulers) all import it, and it imports none of them.
"""
import dataclasses
from typing import Callable

import torch

from fastgen import _checks

COLUMNS = ("churn", "cx", "cf", "dx", "d0", "ax", "ad", "ap", "ap2", "ap3", "ap4", "af", "noise_prev",  # kernels/
           "noise")  # samplers.py's
HISTORY_COLUMNS = ("ap", "ap2", "ap3", "ap4")  # the coefficients of D_i-1, ..., D_i-4            # row order
CLIPS = ("none", "range", "threshold")


@dataclasses.dataclass(frozen=True, eq=False)
class StepTable:
    """A run's N steps (module docstring). Host tensors; ``on(device)`` gives the kernel's copies.

    kind: the sampler's name (e.g. "euler", "dpmsolver++").
    coefficients: float64 [N, len(COLUMNS)].
    streams: int64 [N], the counter-noise stream of each step; init_stream: that of the initial noise.
    generator_draws: bool [N], where diffusers' step draws from its generator (parity noise).
    model_timesteps: [N], what the model is called with at step i (the scheduler's timesteps).
    model_input_scales: float64 [N], the model sees scale_i x (diffusers' ``scale_model_input``).
    init_noise_sigma: x_N = init_noise_sigma z.
    reads_previous: whether a step reads the previous step's denoised output D' (multistep solvers).
    clip, clip_range, dynamic_thresholding_ratio, sample_max_value: clipping of x0 ("none" | "range"
        | "threshold", diffusers' names).
    reference: ``reference(i, model_output, sample, prev_denoised, noise) -> (out, denoised)``, float64;
        prev_denoised: D' (history 1), or the tuple (D_i-1, ..., D_i-history).
    pre_churn: None, or float64 [N]: x^ = x + pre_churn_i z_i, added by the loop before the model call
        (z_i stream i's noise, the model and the step at x^; Karras et al.'s Algorithm 2 form of churn).
    history (derived): how many previous denoised outputs a step reads (1 to 4: the last nonzero
        HISTORY_COLUMNS); above 1 they live in a ring [history, B, ...] (kernels/samplers.py).
    reads_previous_noise (derived): whether a step adds the previous step's counter noise again (NOISE_PREV:
        DPM-Solver SDE's correlated Brownian increments); such a table takes counter noise only.
    step_draws, any_draws, any_generator_draws (derived): whether each step / any step uses noise, and
        whether any step draws from diffusers' generator (host values: a traced step reads them as constants).
    """
    kind: str
    coefficients: torch.Tensor
    streams: torch.Tensor
    generator_draws: torch.Tensor
    model_timesteps: torch.Tensor
    model_input_scales: torch.Tensor
    init_noise_sigma: float
    init_stream: int
    reads_previous: bool
    reference: Callable
    clip: str = "none"
    clip_range: float = 1.0
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    pre_churn: torch.Tensor = None

    def __post_init__(self):
        n = self.coefficients.shape[0]
        if self.coefficients.shape != (n, len(COLUMNS)) or n == 0:
            raise ValueError(f"coefficients must be [N >= 1, {len(COLUMNS)}], got {tuple(self.coefficients.shape)}")
        if self.pre_churn is not None and self.pre_churn.shape != (n,):
            raise ValueError(f"pre_churn must have one entry per step ({n}), got {tuple(self.pre_churn.shape)}")
        for name in ("streams", "generator_draws", "model_timesteps", "model_input_scales"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have one entry per step ({n}), got {tuple(getattr(self, name).shape)}")
        _checks.choice(self.clip, "clip", CLIPS)
        object.__setattr__(self, "_devices", {})
        # host facts of the whole run, read once here: a compiled step reads them as constants
        uses_noise = (self.coefficients[:, COLUMNS.index("churn")] != 0) | (self.coefficients[:, -1] != 0) | \
            (self.coefficients[:, COLUMNS.index("noise_prev")] != 0)
        object.__setattr__(self, "reads_previous_noise",
                           bool((self.coefficients[:, COLUMNS.index("noise_prev")] != 0).any()))
        object.__setattr__(self, "step_draws", tuple(uses_noise.tolist()))
        reads = [bool((self.coefficients[:, COLUMNS.index(name)] != 0).any()) for name in HISTORY_COLUMNS]
        object.__setattr__(self, "history", max((k + 1 for k, read in enumerate(reads) if read), default=1))
        object.__setattr__(self, "any_draws", any(self.step_draws))
        object.__setattr__(self, "any_generator_draws", bool(self.generator_draws.any()))
        object.__setattr__(self, "_rows", tuple(dict(zip(COLUMNS, row)) for row in self.coefficients.tolist()))

    @property
    def num_steps(self) -> int:
        return self.coefficients.shape[0]

    def draws(self, i: int) -> bool:
        """Whether step i uses noise at all (its churn or noise coefficient is not 0)."""
        return self.step_draws[i]

    def on(self, device):
        """(fp32 coefficients [N, ROW], int64 streams [N], int64 step indices [N]) on ``device``, made once."""
        device = torch.device(device)
        if device not in self._devices:
            self._devices[device] = (self.coefficients.to(device, torch.float32).contiguous(),
                                     self.streams.to(device, torch.int64).contiguous(),
                                     torch.arange(self.num_steps, dtype=torch.int64, device=device))
        return self._devices[device]

    @property
    def clip_settings(self) -> tuple:
        """(clip, clip_range, dynamic_thresholding_ratio, sample_max_value): what ``affine_step`` takes."""
        return self.clip, self.clip_range, self.dynamic_thresholding_ratio, self.sample_max_value

    def row(self, i: int) -> dict:
        """Step i's coefficients as Python floats by column name (made once; read it, do not change it)."""
        return self._rows[i]


TABLES = {}  # diffusers class name -> builder(scheduler, **step_settings) -> StepTable


def table_builder(diffusers_name: str):
    """Registers ``builder(scheduler, **step_settings) -> StepTable`` for a diffusers scheduler class."""
    def register(builder):
        TABLES[diffusers_name] = builder
        return builder
    return register


def scheduler_table(scheduler, kind: str, rows, reference, *, generator_draws, model_input_scales=None,
                    init_noise_sigma=1.0, reads_previous=False, model_timesteps=None, pre_churn=None,
                    **clip_settings) -> StepTable:
    """A StepTable on ``scheduler``'s run under the conventions every sampling loop relies on:
    step i draws counter stream i, the initial noise stream N; the model sees diffusers' timesteps.

    rows: one dict per step of the affine coefficients by column name (kernels/samplers.py);
        a column not given is 0, except d0 (the denoised output D = x0) which is 1.
    generator_draws: [N] bools, where diffusers' step draws from its generator.
    model_input_scales: [N] floats, diffusers' ``scale_model_input`` factors (None: 1).
    model_timesteps: [N], what the model is called with (None: the scheduler's timesteps).
    pre_churn: [N] floats, the churn a loop adds before the model call (Karras et al.'s Algorithm 2
        form, stream i's noise; None: none).
    """
    unknown = {name for row in rows for name in row} - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown coefficient columns {sorted(unknown)}; the columns are {COLUMNS}")
    coefficients = torch.tensor([[row.get(name, 1.0 if name == "d0" else 0.0) for name in COLUMNS] for row in rows],
                                dtype=torch.float64)
    n = coefficients.shape[0]
    timesteps = torch.as_tensor(scheduler.timesteps if model_timesteps is None else model_timesteps).detach().cpu()
    scales = torch.ones(n, dtype=torch.float64) if model_input_scales is None else \
        torch.as_tensor(model_input_scales, dtype=torch.float64)
    return StepTable(kind=kind, coefficients=coefficients, streams=torch.arange(n, dtype=torch.int64),
                     generator_draws=torch.as_tensor(generator_draws, dtype=torch.bool).reshape(n),
                     model_timesteps=timesteps[:n], model_input_scales=scales, init_noise_sigma=float(init_noise_sigma),
                     init_stream=n, reads_previous=reads_previous, reference=reference,
                     pre_churn=None if pre_churn is None else torch.as_tensor(pre_churn, dtype=torch.float64),
                     **clip_settings)


def host_values(values) -> torch.Tensor:
    """One of a scheduler's tables (diffusers' float32 values) in float64 on the host."""
    return torch.as_tensor(values).detach().cpu().double()


def host_sigmas(scheduler) -> torch.Tensor:
    """The scheduler's sigmas (diffusers' float32 values, N + 1 of them) in float64 on the host."""
    return host_values(scheduler.sigmas)


def step_table(scheduler, **step_settings) -> StepTable:
    """The StepTable of ``scheduler`` (fastgen's class or diffusers' own) on its current sigmas (after
    ``set_timesteps``; the Euler schedulers also step on their training schedule before it, as diffusers').
    Every builder the registry names is loaded first (fastgen.registry), so no import order matters."""
    from fastgen import registry

    registry.load_builders()
    for cls in type(scheduler).__mro__:
        if cls.__module__.startswith("diffusers.") and cls.__name__ in TABLES:
            return TABLES[cls.__name__](scheduler, **step_settings)
    raise TypeError(f"scheduler must be one of DDPMScheduler, DDIMScheduler{''.join(', ' + n for n in sorted(TABLES))}"
                    f" (diffusers' or fastgen's), got {type(scheduler).__name__}")


def require_timesteps(scheduler):
    """diffusers' error for a step before ``set_timesteps``."""
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(
            "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
