"""The sigma-space samplers' step op: the fused step on a run's StepTable (fastgen/step_table.py;
kernels/samplers.py; each sampler's float64 reference and table builder in fastgen/reference/).

    table = fastgen.step_table.step_table(scheduler)   # after scheduler.set_timesteps(N)
    x, denoised = fastgen.ops.samplers.sampler_step(table, i, model_output, x, seed=0)

Backends: "triton" the fused kernel; "torch" the same affine map in whole-tensor fp32 torch ops;
"reference" the sampler's float64 step. ``offset`` counts samples, as in every public op.
"""
from typing import Optional

import torch

from fastgen import _checks, _compile
from fastgen._alloc import empty
from fastgen.ops._library import kernel_op
from fastgen.backend import resolve_backend
from fastgen.ops.guidance import check_guided_output, guidance_scale_arg, guided
from fastgen.ops.random import compiled_normals
from fastgen.step_table import CLIPS, COLUMNS, HISTORY_COLUMNS, StepTable  # noqa: F401  (CLIPS, COLUMNS: this op's row names)

def affine_table(coefficients, *, reads_previous=True, **clip_settings) -> StepTable:
    """A StepTable of arbitrary coefficient rows (float64 [N, len(COLUMNS)]) whose reference is the
    kernel's affine map itself in float64: what the kernel is validated on apart from any sampler.
    Step i draws stream 7 + i; the model timesteps are the step indices."""
    coefficients = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1, len(COLUMNS))
    n = coefficients.shape[0]
    tables = []

    def affine_map(i, f, x, prev, z):
        z, z_prev = z if isinstance(z, tuple) else (z, None)
        return torch_step(tables[0], tables[0].row(i), f, x, prev, z, noise_prev=z_prev)

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
            reads it, from its second step on); with ``table.history`` = H > 1 the ring of the last H,
            [H, *sample.shape], D_j in slot j mod H (kernels/samplers.py).
        seed, offset, noise: the step's noise z: counter-based (stream table.streams[i], element g
            of sample b the normal of counter element (offset + b) n + g, offset counted in samples)
            or the tensor ``noise`` (like sample).
        guidance_scale: None, or w: classifier-free guidance fused into the step.
        return_denoised: False returns (x_next, None).
        denoised_out: write the denoised output into this tensor: like sample (it may be
            ``prev_denoised`` itself, overwritten in place: what a captured loop keeps), or with
            history H > 1 the ring, whose slot i mod H it writes.
    Returns (x_next, denoised) in the sample's dtype.
    """
    if not isinstance(table, StepTable):
        raise TypeError(f"table must be a fastgen.ops.samplers.StepTable, got {type(table).__name__}")
    _checks.batched(sample, "sample")
    if torch.compiler.is_compiling():
        return _traced_step(table, i, model_output, sample, prev_denoised, seed=seed, noise=noise, offset=offset,
                            guidance_scale=guidance_scale, return_denoised=return_denoised, denoised_out=denoised_out,
                            backend=backend)
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
    row = None if host_i is None else table.row(host_i)
    needs_previous = table.reads_previous and (row is None or any(row[name] != 0 for name in HISTORY_COLUMNS))
    if needs_previous:
        if prev_denoised is None:
            raise ValueError(f"prev_denoised is required: the {table.kind} step reads the previous step's denoised "
                             "output")
        _check_history(prev_denoised, "prev_denoised", sample, table.history)
    else:
        prev_denoised = None
    if noise is not None:
        _checks.like(noise, "noise", sample, "sample")
        _refuse_noise_tensor(table)
    if denoised_out is not None:
        _check_history(denoised_out, "denoised_out", sample, table.history)
        if not denoised_out.is_contiguous():
            raise ValueError("denoised_out must be contiguous")
    element_offset = _checks.sample_offset(offset, sample.shape)
    backend_arg, backend = backend, resolve_backend(backend, sample.device)
    seed = _checks.seed64(seed) if noise is None and table.any_draws else 0
    if backend == "triton":
        return fused_step(table, i, model_output, sample, prev_denoised, noise=noise, seed=seed,
                           offset=element_offset, guidance_scale=guidance_scale, return_denoised=return_denoised,
                           denoised_out=denoised_out)
    if host_i is None:
        raise ValueError(f"backend {backend!r} steps on the host: i must be an int, got a tensor")
    if noise is None and table.draws(host_i):
        if _compile.runs_compiled(backend_arg, backend, sample.device):  # the Philox loop compiled, fp32
            noise = compiled_normals(sample.shape, seed, int(table.streams[host_i]), element_offset)
        else:
            noise = step_noise(table, host_i, sample.shape, seed=seed, offset=element_offset, device=sample.device)
    previous = previous_outputs(table, prev_denoised, host_i)
    noise_prev = None
    if row["noise_prev"]:  # the previous step's counter noise, drawn again
        noise_prev = step_noise(table, host_i - 1, sample.shape, seed=seed, offset=element_offset, device=sample.device)
    if backend == "reference":
        f = guided(model_output.double(), guidance_scale)
        previous = tuple(d.double() for d in previous)
        z = None if noise is None else noise.double() if noise_prev is None else (noise.double(), noise_prev.double())
        out, denoised = table.reference(host_i, f, sample.double(), reference_previous(table, previous), z)
    else:
        out, denoised = torch_step(table, row, guided(model_output.float(), guidance_scale),
                                   sample.float(), previous, noise, noise_prev=noise_prev)
    if denoised_out is not None:
        denoised = keep_denoised(table, denoised_out, host_i, denoised)
    return out.to(sample.dtype), (denoised.to(sample.dtype) if return_denoised else None)


def _refuse_noise_tensor(table: StepTable):
    """A table whose steps add the previous step's counter noise again takes counter noise only."""
    if table.reads_previous_noise:
        raise ValueError(f"the {table.kind} steps add the previous step's counter noise again (correlated Brownian "
                         "increments): pass seed=, not a noise tensor")


def _check_history(tensor, name, sample, history: int):
    """``tensor`` like the sample (history 1) or a ring of ``history`` of them."""
    if history == 1:
        return _checks.like(tensor, name, sample, "sample")
    _checks.like(tensor, name, sample, "sample", shape=False)
    if tuple(tensor.shape) != (history, *sample.shape):
        raise ValueError(f"{name} must be the ring of the last {history} denoised outputs, shape "
                         f"{(history, *sample.shape)}, got {tuple(tensor.shape)}")
    return tensor


def previous_outputs(table: StepTable, prev, i) -> tuple:
    """(D_i-1, ..., D_i-H) of step i (an int, a symbolic int or an int64 tensor of one element) from
    ``prev``: D' itself (history 1), or the ring [H, ...] (D_j in slot j mod H); () for None."""
    if prev is None:
        return ()
    if table.history == 1:
        return (prev,)
    return tuple(_ring_slot(prev, i, k, table.history) for k in range(1, table.history + 1))


def _ring_slot(ring, i, k: int, history: int):
    """D_(i - k) in ``ring``: slot (i - k) mod H (a view for an int i, read on the device for a tensor)."""
    if isinstance(i, torch.Tensor):
        return ring.index_select(0, (i.reshape(1) - k) % history)[0]
    return ring[(i - k) % history]


def reference_previous(table: StepTable, previous: tuple):
    """What a table's reference takes: D' (history 1, None before the first step) or the tuple."""
    if table.history == 1:
        return previous[0] if previous else None
    return previous


def keep_denoised(table: StepTable, kept, i: int, denoised):
    """Step i's denoised output written where the next steps read it: ``kept`` itself (history 1) or
    its ring slot i mod H. Returns the kept tensor (history 1) or the slot."""
    if table.history == 1:
        return kept.copy_(denoised)
    if isinstance(i, torch.Tensor):  # a device index: written on the device
        kept.index_copy_(0, i.reshape(1) % table.history, denoised.unsqueeze(0).to(kept.dtype))
        return _ring_slot(kept, i, 0, table.history)
    return kept[i % table.history].copy_(denoised)


def _traced_step(table, i, model_output, sample, prev_denoised, *, seed, noise, offset, guidance_scale, return_denoised,
                 denoised_out, backend):
    """``sampler_step`` while torch.compile traces it: the checks that read no tensor, then
    ``device_step`` (the step index may be symbolic; whether the step reads ``prev_denoised`` or
    draws noise is left to its coefficients, which are 0 where it does not)."""
    from fastgen.ops.random import seed_of, seed_operands

    guidance_scale = guidance_scale_arg(guidance_scale)
    _checks.like(model_output, "model_output", sample, "sample", shape=guidance_scale is None)
    check_guided_output(model_output, sample.shape, guidance_scale)
    for tensor, name in ((prev_denoised, "prev_denoised"), (denoised_out, "denoised_out")):
        if tensor is not None:
            _check_history(tensor, name, sample, table.history)
    if noise is not None:
        _checks.like(noise, "noise", sample, "sample")
        _refuse_noise_tensor(table)
    element_offset = _checks.sample_offset(offset, sample.shape)
    backend = resolve_backend(backend, sample.device)
    if backend == "triton":  # the custom op: inductor places fastgen's kernel in its graph
        seed = _checks.seed64(seed) if noise is None and table.any_draws else 0
        return fused_step(table, i, model_output, sample, prev_denoised, noise=noise, seed=seed, offset=element_offset,
                           guidance_scale=guidance_scale, return_denoised=return_denoised, denoised_out=denoised_out)
    seed, seed_bits = seed_operands(seed, "torch") if noise is None and table.any_draws else (0, None)
    out, denoised = device_step(table, i, model_output, sample, prev_denoised, noise=noise,
                                seed=seed_of(seed, seed_bits), offset=element_offset, guidance_scale=guidance_scale)
    if denoised_out is not None:
        denoised = keep_denoised(table, denoised_out, i, denoised)
    return out.to(sample.dtype), (denoised.to(sample.dtype) if return_denoised else None)


def step_noise(table: StepTable, i: int, shape, *, seed: int, offset: int, device, dtype=torch.float64):
    """Step i's counter-based noise for a [B, ...] batch (offset in elements): stream table.streams[i]."""
    from fastgen.reference import random as ref_random

    return ref_random.normals(torch.Size(shape).numel(), seed=seed, stream=int(table.streams[i]), offset=offset,
                              device=device, dtype=dtype).reshape(shape)


def torch_step(table: StepTable, row: dict, f, x, previous, noise, *, need_denoised=True, noise_prev=None):
    """The kernel's affine map (kernels/samplers.py) in whole-tensor torch ops on one row of Python
    floats: the fast CPU path. f: the (guided) model output; previous: (D_i-1, ..., D_i-H), fewer
    (even none) before the run has them, or D' itself; noise None where the step draws none; noise_prev:
    the previous step's counter noise where the row's NOISE_PREV is not 0.
    need_denoised=False: D is not wanted (no multistep history, not returned): where the output does
    not use it (AD = 0, e.g. an Euler or flow-matching step) it is not formed, one pass fewer; NaN in x
    or F still reaches the output through their own terms. Returns (x_next, D or None)."""
    if noise is not None and row["churn"]:
        x = x + row["churn"] * noise.to(x.dtype)
    denoised = None
    if need_denoised or row["ad"] or table.clip != "none":
        x0 = _clip(table.clip_settings, affine((row["cx"], x), (row["cf"], f)))
        denoised = x0 if (row["dx"], row["d0"]) == (0.0, 1.0) else affine((row["dx"], x), (row["d0"], x0))
    terms = [(row["ax"], x), (row["af"], f)] if denoised is None else [(row["ax"], x), (row["ad"], denoised),
                                                                       (row["af"], f)]
    previous = (previous,) if isinstance(previous, torch.Tensor) else previous or ()
    terms += [(row[name], d.to(x.dtype)) for name, d in zip(HISTORY_COLUMNS, previous) if row[name]]
    if row["noise"] and noise is not None:
        terms.append((row["noise"], noise.to(x.dtype)))
    if row["noise_prev"] and noise_prev is not None:
        terms.append((row["noise_prev"], noise_prev.to(x.dtype)))
    return affine(*terms), denoised


def device_step(table: StepTable, i, model_output, sample, prev_denoised=None, *, noise=None, seed=0, offset=0,
                guidance_scale=None):
    """Step i of ``table`` in fp32 torch ops with the step's row and stream read on the device at ``i``
    (an int, a symbolic int or an int64 tensor of one element): ``affine_step`` on them, with no host
    read, so torch.compile traces the whole step. What a compiled scheduler step runs; the arguments
    are trusted (``sampler_step`` checks them). Returns (x_next, denoised) in fp32."""
    coefficients, streams, _ = table.on(sample.device)
    previous = previous_outputs(table, prev_denoised, i)
    if isinstance(i, torch.Tensor):
        i = i.reshape(())
    prev_stream = streams[(i - 1).clamp(min=0) if isinstance(i, torch.Tensor) else max(i - 1, 0)] \
        if table.reads_previous_noise else None
    return affine_step(coefficients[i], streams[i], model_output, sample, previous, noise=noise, prev_stream=prev_stream,
                       draws=table.any_draws, seed=seed, offset=offset, guidance_scale=guidance_scale,
                       clip=table.clip_settings)


def affine_step(row, stream, model_output, sample, previous=(), *, noise=None, draws=False, seed=0, offset=0,
                guidance_scale=None, clip=("none", 1.0, 0.995, 1.0), prev_stream=None):
    """The kernel's affine map (kernels/samplers.py) on one coefficient row held in a tensor (fp32,
    COLUMNS), in whole-tensor torch ops with no host read: what torch.compile fuses, counter noise
    included, into one loop (the compiled scheduler step and the compiled CPU sampling loop).

        x^ = x + churn z;   x0 = clip(cx x^ + cf F);   D = dx x^ + d0 x0
        x' = ax x^ + ad D + af F + ap D_i-1 + ... + ap4 D_i-4 + cnoise z    (a 0 coefficient adds 0)

    previous: (D_i-1, ..., D_i-H), fewer (even none) before the run has them, or D' itself. prev_stream:
    the previous step's stream (an int64 tensor), whose normals the NOISE_PREV term adds; None: no such term.
    noise: z like the sample, or None: drawn from the counter stream ``stream`` (an int64 tensor) when
    ``draws``, element g of the flat batch at counter element offset + g (``offset`` in elements;
    ``seed`` an int or an int64 tensor). clip: (mode, range, thresholding ratio, max value), as
    ``StepTable.clip_settings``. Returns (x_next, denoised) in fp32."""
    from fastgen.reference.random import normals

    churn, cx, cf, dx, d0, ax, ad, ap, ap2, ap3, ap4, af, cz_prev, cz = row.unbind()
    f, x = guided(model_output.float(), guidance_scale), sample.float()
    if noise is None and draws:
        noise = normals(sample.numel(), seed=seed, stream=stream.reshape(1), offset=offset, device=sample.device,
                        dtype=torch.float32).reshape(sample.shape)
    z = None if noise is None else noise.float()
    if z is not None:
        x = x + _term(churn, z)
    x0 = _clip(clip, cx * x + cf * f)
    denoised = dx * x + d0 * x0
    out = ax * x + ad * denoised + af * f
    previous = (previous,) if isinstance(previous, torch.Tensor) else previous or ()
    for coefficient, d in zip((ap, ap2, ap3, ap4), previous):
        out = out + _term(coefficient, d.float())
    if z is not None:
        out = out + _term(cz, z)
    if prev_stream is not None:
        z_prev = normals(sample.numel(), seed=seed, stream=prev_stream.reshape(1), offset=offset, device=sample.device,
                         dtype=torch.float32).reshape(sample.shape)
        out = out + _term(cz_prev, z_prev)
    return out, denoised


def _term(coefficient, value):
    """coefficient * value, and 0 where the coefficient is 0 whatever the value (the kernel's rule)."""
    return torch.where(coefficient != 0, coefficient * value, 0.0)


def affine(*terms):
    """sum of c t over (c, t) terms, a new tensor, in one pass per term: t + c u as torch.add(t, u,
    alpha=c), a coefficient of 1 not multiplied. Every term counts, zero coefficients too (0 * NaN is
    NaN, as in the kernel)."""
    (c0, t0), rest = terms[0], terms[1:]
    if not rest:
        return t0.clone() if c0 == 1 else t0 * c0
    out = torch.add(t0, rest[0][1], alpha=rest[0][0]) if c0 == 1 else torch.add(t0 * c0, rest[0][1], alpha=rest[0][0])
    for c, t in rest[1:]:
        out.add_(t, alpha=c)
    return out


def _clip(clip, x0):
    """x0 clipped as ``clip`` = (mode, range, ratio, max value) says (diffusers' clip_sample or dynamic
    thresholding; ``StepTable.clip_settings``)."""
    from fastgen.reference.diffusion import clip_x0

    mode, clip_range, ratio, max_value = clip
    if mode == "none":
        return x0
    return clip_x0(x0, clip_sample=mode == "range", clip_sample_range=clip_range, thresholding=mode == "threshold",
                   dynamic_thresholding_ratio=ratio, sample_max_value=max_value)


def fused_step(table, i, model_output, sample, prev_denoised, *, noise, seed, offset, guidance_scale,
                return_denoised, denoised_out):
    """The Triton path: the custom op ``fastgen::sampler_step`` on the table's device copies, at the
    step index i (an int, or an int64 tensor of one element: then any step may draw). With
    ``denoised_out`` (the sampling loop's kept D', overwritten in place) the launch is direct: a custom
    op returns new tensors only."""
    coefficients, streams, steps = table.on(sample.device)
    step = steps[i] if isinstance(i, int) else i.reshape(())
    draws = table.draws(i) if isinstance(i, int) else table.any_draws
    args = (model_output, sample, prev_denoised, noise, coefficients, streams, step, draws, _int64_bits(seed), offset,
            guidance_scale, *table.clip_settings, table.history, table.reads_previous_noise and noise is None)
    if denoised_out is not None and not torch.compiler.is_compiling():
        out = _launch_sampler_step(*args, denoised_out)
        if table.history == 1:
            return out, denoised_out
        return out, (_ring_slot(denoised_out, i, 0, table.history) if return_denoised else None)
    outs = _sampler_step_op(*args, return_denoised or denoised_out is not None)
    if denoised_out is not None:
        return outs[0], keep_denoised(table, denoised_out, i, outs[1])
    return outs[0], (outs[1] if return_denoised else None)


@kernel_op("fastgen::sampler_step", direct=True)
def _sampler_step_op(model_output: torch.Tensor, sample: torch.Tensor, prev_denoised: Optional[torch.Tensor],
                     noise: Optional[torch.Tensor], coefficients: torch.Tensor, streams: torch.Tensor,
                     step: torch.Tensor, draws: bool, seed: int, offset: int, guidance: Optional[float], clip: str,
                     clip_range: float, dynamic_thresholding_ratio: float, sample_max_value: float, history: int,
                     noise_prev: bool, return_denoised: bool) -> list[torch.Tensor]:
    """One fused sampler step (kernels/samplers.py) on the coefficient row ``coefficients[step]``
    (``step`` an int64 tensor of one element): [x_next], and the denoised output with
    ``return_denoised``. ``noise``: a tensor to read, or None (``draws``: counter noise of stream
    ``streams[step]``); ``seed``: the 64-bit seed's bits as an int64; ``offset`` in elements; clip
    settings as ``StepTable.clip_settings``; ``history``: ``prev_denoised`` is the ring of the last H
    denoised outputs (``StepTable.history``); ``noise_prev``: add the NOISE_PREV term (step - 1's counter
    noise)."""
    denoised = empty(sample.shape, dtype=sample.dtype, device=sample.device) if return_denoised else None
    out = _launch_sampler_step(model_output, sample, prev_denoised, noise, coefficients, streams, step, draws, seed,
                               offset, guidance, clip, clip_range, dynamic_thresholding_ratio, sample_max_value,
                               history, noise_prev, denoised)
    return [out] if denoised is None else [out, denoised]


def _launch_sampler_step(model_output, sample, prev_denoised, noise, coefficients, streams, step, draws, seed, offset,
                         guidance, clip, clip_range, dynamic_thresholding_ratio, sample_max_value, history, noise_prev,
                         denoised):
    """The step kernel's launch (the op's body): x_next, and D into ``denoised`` when not None (like
    the sample, or the ring ``prev_denoised`` itself, its slot step mod history)."""
    from fastgen.kernels import samplers as k_samplers
    from fastgen.kernels.random import NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR

    out = empty(sample.shape, dtype=sample.dtype, device=sample.device)
    if sample.numel() == 0:
        return out
    noise_mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX if draws else NOISE_NONE
    model_output, sample = model_output.contiguous(), sample.contiguous()
    scale = None
    if clip == "threshold":  # s per sample: the reference's quantile rule on the unclipped x0 (fp32)
        scale = threshold_scale(coefficients.index_select(0, step.reshape(1))[0], guided(model_output.float(), guidance),
                                sample.float(), dynamic_thresholding_ratio, sample_max_value)
    k_samplers.sampler_step(out, denoised, model_output, sample,
                            None if prev_denoised is None else prev_denoised.contiguous(), coefficients, streams, step,
                            guided=guidance is not None, guidance=1.0 if guidance is None else guidance,
                            clip=clip, clip_range=clip_range, scale=scale, noise_mode=noise_mode,
                            noise=None if noise is None else noise.contiguous(), seed=seed, offset=offset,
                            history=history, noise_prev=noise_prev and noise_mode == NOISE_PHILOX)
    return out


def _int64_bits(seed: int) -> int:
    from fastgen.ops.random import _int64_bits as bits

    return bits(seed)


def threshold_scale(row: torch.Tensor, f, x, ratio: float, max_value: float):
    """Dynamic thresholding's s per sample on the unclipped x0 = cx x + cf f (a device row: no sync;
    the thresholding samplers have no churn)."""
    from fastgen.reference.diffusion import dynamic_threshold_scale

    x0 = row[1] * x + row[2] * f
    return dynamic_threshold_scale(x0, ratio, max_value).float().contiguous()
