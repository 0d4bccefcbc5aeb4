"""The sigma-space samplers' step op: one run's steps as coefficient rows, and the fused step on them
(kernels/samplers.py; each sampler's float64 reference in fastgen/reference/samplers.py).

A ``StepTable`` holds what a run of N steps needs, made once on the host from a scheduler's sigmas
(by the sampler's builder in fastgen/reference/samplers.py, in float64): per step i the affine
coefficients of kernels/samplers.py (columns CHURN .. NOISE), the noise stream, whether diffusers'
generator draws, the model's timestep and input scale; per run the clipping and the initial noise.
Its ``reference`` is the sampler's own float64 step (the paper's equations), which the kernel and
the torch path are checked against.

    table = fastgen.reference.samplers.euler_table(sigmas, timesteps, prediction_type="epsilon")
    x, denoised = fastgen.ops.samplers.sampler_step(table, i, model_output, x, seed=0)

Backends: "triton" the fused kernel; "torch" the same affine map in whole-tensor fp32 torch ops;
"reference" the sampler's float64 step. ``offset`` counts samples, as in every public op.
"""
import dataclasses
from typing import Callable

import torch

from fastgen import _checks
from fastgen._alloc import empty
from fastgen.backend import resolve_backend
from fastgen.ops.guidance import check_guided_output, guidance_scale_arg, guided

COLUMNS = ("churn", "cx", "cf", "dx", "d0", "ax", "ad", "ap", "af", "noise")  # kernels/samplers.py's row order
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
    reference: ``reference(i, model_output, sample, prev_denoised, noise) -> (out, denoised)``, float64.
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

    def __post_init__(self):
        n = self.coefficients.shape[0]
        if self.coefficients.shape != (n, len(COLUMNS)) or n == 0:
            raise ValueError(f"coefficients must be [N >= 1, {len(COLUMNS)}], got {tuple(self.coefficients.shape)}")
        for name in ("streams", "generator_draws", "model_timesteps", "model_input_scales"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have one entry per step ({n}), got {tuple(getattr(self, name).shape)}")
        _checks.choice(self.clip, "clip", CLIPS)
        object.__setattr__(self, "_devices", {})

    @property
    def num_steps(self) -> int:
        return self.coefficients.shape[0]

    def draws(self, i: int) -> bool:
        """Whether step i uses noise at all (its churn or noise coefficient is not 0)."""
        row = self.coefficients[i]
        return bool(row[0] != 0 or row[-1] != 0)

    @property
    def any_draws(self) -> bool:
        return bool((self.coefficients[:, 0] != 0).any() or (self.coefficients[:, -1] != 0).any())

    def on(self, device):
        """(fp32 coefficients [N, ROW], int64 streams [N], int64 step indices [N]) on ``device``, made once."""
        device = torch.device(device)
        if device not in self._devices:
            self._devices[device] = (self.coefficients.to(device, torch.float32).contiguous(),
                                     self.streams.to(device, torch.int64).contiguous(),
                                     torch.arange(self.num_steps, dtype=torch.int64, device=device))
        return self._devices[device]

    def row(self, i: int) -> dict:
        """Step i's coefficients as Python floats by column name."""
        return dict(zip(COLUMNS, self.coefficients[i].tolist()))


def affine_table(coefficients, *, reads_previous=True, **clip_settings) -> StepTable:
    """A StepTable of arbitrary coefficient rows (float64 [N, len(COLUMNS)]) whose reference is the
    kernel's affine map itself in float64: what the kernel is validated on apart from any sampler.
    Step i draws stream 7 + i; the model timesteps are the step indices."""
    coefficients = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1, len(COLUMNS))
    n = coefficients.shape[0]
    tables = []

    def affine_map(i, f, x, prev, z):
        return torch_step(tables[0], tables[0].row(i), f, x, prev, z)

    tables.append(StepTable(
        kind="affine", coefficients=coefficients, streams=torch.arange(7, 7 + n), generator_draws=torch.ones(n, dtype=bool),
        model_timesteps=torch.arange(n), model_input_scales=torch.ones(n, dtype=torch.float64), init_noise_sigma=1.0,
        init_stream=0, reads_previous=reads_previous, reference=affine_map, **clip_settings))
    return tables[0]


def sampler_step(table: StepTable, i, model_output, sample, *, prev_denoised=None, seed=None, noise=None, offset=0,
                 guidance_scale=None, return_denoised=True, denoised_out=None, backend="auto"):
    """Step i of ``table``'s sampler: (x_next, denoised) from the model output at x (kernels/samplers.py).

    Args:
        table: the run's StepTable.
        i: the step index, an int in [0, N), or an int64 tensor of one element on the sample's device
            (what a captured loop passes; not checked on the host).
        model_output: like ``sample``, or [2B, ...] with guidance_scale (unconditional half first).
        sample: x [B, ...] fp32/fp16/bf16.
        prev_denoised: the previous step's denoised output, like sample (required when the table
            reads it, from its second step on).
        seed, offset, noise: the step's noise z: counter-based (stream table.streams[i], element g
            of sample b the normal of counter element (offset + b) n + g, offset counted in samples)
            or the tensor ``noise`` (like sample).
        guidance_scale: None, or w: classifier-free guidance fused into the step.
        return_denoised: False returns (x_next, None).
        denoised_out: backend "triton": write the denoised output into this tensor (like sample; it
            may be ``prev_denoised`` itself, overwritten in place: what a captured loop keeps).
    Returns (x_next, denoised) in the sample's dtype.
    """
    if not isinstance(table, StepTable):
        raise TypeError(f"table must be a fastgen.ops.samplers.StepTable, got {type(table).__name__}")
    _checks.batched(sample, "sample")
    host_i = i if isinstance(i, int) else None
    if host_i is not None:
        host_i = _checks.as_int(i, "i")
        if not 0 <= host_i < table.num_steps:
            raise ValueError(f"i must be a step index in [0, {table.num_steps}), got {host_i}")
    elif not (isinstance(i, torch.Tensor) and i.numel() == 1 and i.dtype == torch.int64 and i.device == sample.device):
        raise TypeError(f"i must be an int or an int64 tensor of one element on {sample.device}, got {i!r}")
    guidance_scale = guidance_scale_arg(guidance_scale)
    _checks.like(model_output, "model_output", sample, "sample", shape=guidance_scale is None)
    check_guided_output(model_output, sample.shape, guidance_scale)
    needs_previous = table.reads_previous and (host_i is None or bool(table.coefficients[host_i, 7] != 0))
    if needs_previous:
        if prev_denoised is None:
            raise ValueError(f"prev_denoised is required: the {table.kind} step reads the previous step's denoised "
                             "output")
        _checks.like(prev_denoised, "prev_denoised", sample, "sample")
    else:
        prev_denoised = None
    if noise is not None:
        _checks.like(noise, "noise", sample, "sample")
    if denoised_out is not None:
        _checks.like(denoised_out, "denoised_out", sample, "sample")
        if not denoised_out.is_contiguous():
            raise ValueError("denoised_out must be contiguous")
    element_offset = _checks.sample_offset(offset, sample.shape)
    backend = resolve_backend(backend, sample.device)
    seed = _checks.seed64(seed) if noise is None and table.any_draws else 0
    if backend == "triton":
        return _fused_step(table, i, model_output, sample, prev_denoised, noise=noise, seed=seed,
                           offset=element_offset, guidance_scale=guidance_scale, return_denoised=return_denoised,
                           denoised_out=denoised_out)
    if host_i is None:
        raise ValueError(f"backend {backend!r} steps on the host: i must be an int, got a tensor")
    if noise is None and table.draws(host_i):
        noise = step_noise(table, host_i, sample.shape, seed=seed, offset=element_offset, device=sample.device)
    if backend == "reference":
        f = guided(model_output.double(), guidance_scale)
        prev = None if prev_denoised is None else prev_denoised.double()
        out, denoised = table.reference(host_i, f, sample.double(), prev, None if noise is None else noise.double())
    else:
        out, denoised = torch_step(table, table.row(host_i), guided(model_output.float(), guidance_scale),
                                   sample.float(), prev_denoised, noise)
    if denoised_out is not None:
        denoised = denoised_out.copy_(denoised)
    return out.to(sample.dtype), (denoised.to(sample.dtype) if return_denoised else None)


def step_noise(table: StepTable, i: int, shape, *, seed: int, offset: int, device, dtype=torch.float64):
    """Step i's counter-based noise for a [B, ...] batch (offset in elements): stream table.streams[i]."""
    from fastgen.reference import random as ref_random

    return ref_random.normals(torch.Size(shape).numel(), seed=seed, stream=int(table.streams[i]), offset=offset,
                              device=device, dtype=dtype).reshape(shape)


def torch_step(table: StepTable, row: dict, f, x, prev_denoised, noise):
    """The kernel's affine map (kernels/samplers.py) in whole-tensor torch ops on one row of Python
    floats: the fast CPU path. f: the (guided) model output; noise None where the step draws none."""
    from fastgen.reference.diffusion import clip_x0

    if noise is not None and row["churn"]:
        x = x + row["churn"] * noise.to(x.dtype)
    x0 = row["cx"] * x + row["cf"] * f
    x0 = _clip(table, x0, clip_x0)
    denoised = x0 if (row["dx"], row["d0"]) == (0.0, 1.0) else row["dx"] * x + row["d0"] * x0
    out = row["ax"] * x + row["ad"] * denoised + row["af"] * f
    if row["ap"] and prev_denoised is not None:
        out = out + row["ap"] * prev_denoised.to(out.dtype)
    if row["noise"] and noise is not None:
        out = out + row["noise"] * noise.to(out.dtype)
    return out, denoised


def _clip(table: StepTable, x0, clip_x0):
    if table.clip == "none":
        return x0
    return clip_x0(x0, clip_sample=table.clip == "range", clip_sample_range=table.clip_range,
                   thresholding=table.clip == "threshold", dynamic_thresholding_ratio=table.dynamic_thresholding_ratio,
                   sample_max_value=table.sample_max_value)


def _fused_step(table, i, model_output, sample, prev_denoised, *, noise, seed, offset, guidance_scale,
                return_denoised, denoised_out):
    from fastgen.kernels import samplers as k_samplers
    from fastgen.kernels.random import NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR

    out = empty(sample.shape, dtype=sample.dtype, device=sample.device)
    denoised = denoised_out
    if denoised is None and return_denoised:
        denoised = empty(sample.shape, dtype=sample.dtype, device=sample.device)
    if sample.numel() == 0:
        return out, denoised
    coefficients, streams, steps = table.on(sample.device)
    step = steps[i] if isinstance(i, int) else i.reshape(())
    draws = table.draws(i) if isinstance(i, int) else table.any_draws  # a device index: any step may draw
    noise_mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX if draws else NOISE_NONE
    model_output, sample = model_output.contiguous(), sample.contiguous()
    scale = None
    if table.clip == "threshold":  # s per sample: the reference's quantile rule on the unclipped x0 (fp32)
        scale = threshold_scale(table, coefficients[step], guided(model_output.float(), guidance_scale),
                                sample.float())
    k_samplers.sampler_step(out, denoised, model_output, sample,
                            None if prev_denoised is None else prev_denoised.contiguous(), coefficients, streams, step,
                            guided=guidance_scale is not None, guidance=1.0 if guidance_scale is None else guidance_scale,
                            clip=table.clip, clip_range=table.clip_range, scale=scale, noise_mode=noise_mode,
                            noise=None if noise is None else noise.contiguous(), seed=seed, offset=offset)
    return out, denoised


def threshold_scale(table: StepTable, row: torch.Tensor, f, x):
    """Dynamic thresholding's s per sample on the unclipped x0 = cx x + cf f (a device row: no sync;
    the thresholding samplers have no churn)."""
    from fastgen.reference.diffusion import dynamic_threshold_scale

    x0 = row[1] * x + row[2] * f
    return dynamic_threshold_scale(x0, table.dynamic_thresholding_ratio, table.sample_max_value).float().contiguous()
