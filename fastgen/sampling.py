"""The sampling loop: x_N ~ init_noise_sigma N(0, I), then one fused reverse step per timestep,
device-resident and (on CUDA) captured once as a CUDA graph and replayed.

    import fastgen
    from fastgen.models import pretrained_denoiser
    from fastgen.schedulers import DDIMScheduler        # or any scheduler below, fastgen's or diffusers'

    model = pretrained_denoiser()
    x = fastgen.sample(model, (64, 1, 8, 8), DDIMScheduler(**model.scheduler_config), num_inference_steps=50, seed=0)

Schedulers. DDPM and DDIM (Ho et al. 2020, Algorithm 2; Song et al. 2021, eq. 12) step with
``fastgen.ddpm_step`` / ``fastgen.ddim_step`` from timestep t_i to s_i (DDPM: the next timestep of
the chain; DDIM: t_i - T // N, diffusers' rule; -1 the end). The sigma-space samplers (Euler, Euler
ancestral, DPM-Solver++, flow matching, consistency, LCM: every scheduler with a StepTable builder,
fastgen.schedulers._sigma) step with ``fastgen.ops.samplers.sampler_step`` on the run's StepTable,
the model seeing scale_i x at the scheduler's timestep (diffusers' ``scale_model_input``). The loop:

    x <- init_noise_sigma z_N
    for i in 0 .. N-1:   x <- step_i(model(scale_i x, t_i), x, noise z of step i)

Classifier-free guidance (``class_labels``, ``guidance_scale`` w): the model sees the doubled batch
[x; x] with labels [null; labels] and the step combines m_u + w (m_c - m_u) as it reads the two
halves (fused in every kernel). ``class_labels`` without guidance: one conditional pass.

Noise. Counter-based (``fastgen.randn``): element g of sample b in step i is the normal of counter
element (offset + b) n + g in the step's stream (n = elements per sample, ``offset`` counted in
samples): stream t_i for DDPM/DDIM with x_N from stream T = num_train_timesteps; stream i with x_N
from stream N for the StepTable samplers. So sample k is the same whether drawn alone (offset=k), in
a batch of 64, or in shards. With ``generator=`` (a torch.Generator, or a list with one per sample)
the noise is instead drawn exactly as diffusers' pipelines draw it (x_N first, then one draw per
step where diffusers' step draws), so the result matches a diffusers loop with the same generator.

Backends (the names mean what they mean for every op, fastgen.backend), one step strategy each:
"triton" (``_TritonSteps``) runs each step as one fused kernel; "torch" (``_TorchSteps``, what "auto"
picks off CUDA) runs the same update as a few whole-tensor fp32 torch ops per step on per-step
coefficients made once per run in float64, with the counter-based noise of many steps drawn in one
call: the loop for a CPU, where a kernel runs only in the slow Triton interpreter; "reference"
(``_ReferenceSteps``) steps through the float64 references: the loop the others are checked against.

Device residency. Timesteps, step indices and coefficient tables live on the device and the kernels
read them in place; nothing in the loop calls ``.item()`` or synchronises (the torch and reference
strategies read host copies). With ``cuda_graph`` (default "auto": on for a CUDA device with the
Triton backend) the model call and the fused step are warmed up on a side stream, captured once
into a CUDA graph on static buffers (the sample, a step counter, the noise buffer for ``generator``,
a multistep solver's previous output), and replayed N times; inside the graph the step reads its
timesteps, coefficients and input scale from the device tables at the counter and advances it. A
model that cannot be captured falls back to the eager loop under "auto" with a warning, and raises
under ``cuda_graph=True``.
"""
import copy
import inspect
import itertools
import warnings

import torch

from fastgen import _checks, registry
from fastgen import ops
from fastgen.backend import resolve_backend
from fastgen.ops import diffusion as diffusion_ops
from fastgen.ops import samplers as sampler_ops
from fastgen.ops.guidance import guidance_scale_arg, guided
from fastgen.reference import random as ref_random
from fastgen.step_spec import StepSpec

# The schedulers make_scheduler knows, by the name the CLI and the bench use: (class, config overrides).
SCHEDULERS = {sampler.name: (sampler.scheduler, sampler.config) for sampler in registry.SAMPLERS}
DIFFUSION_KINDS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
DEFAULT_STEPS = 50  # DDPM: every training timestep (diffusers' pipelines use 1000 and 50)


def make_scheduler(kind: str, **config):
    """The scheduler named ``kind`` (a key of SCHEDULERS) with ``config``: fastgen's drop-in class
    (``fastgen.schedulers``) where there is one, else diffusers' own."""
    if kind not in SCHEDULERS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, SCHEDULERS))}, got {kind!r}")
    import diffusers

    from fastgen import schedulers

    name, overrides = SCHEDULERS[kind]
    cls = getattr(schedulers, name, None) or getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        config = {k: v for k, v in config.items() if k in accepted}  # a model's DDPM config on an Euler scheduler
    return cls(**{**config, **overrides})


# --- the plan: what the scheduler says, checked once, on the host ----------------------------------

class _Plan:
    """A run's steps as the scheduler defines them, checked once on the host: kind, model timesteps
    and input scales, initial noise, which steps draw diffusers' noise; DDPM/DDIM: the StepSpec,
    schedule, timesteps and previous timesteps; the other samplers: the StepTable."""

    def __init__(self, scheduler, num_inference_steps, eta, timesteps=None, churn=None):
        if not hasattr(scheduler, "set_timesteps") or getattr(scheduler, "config", None) is None:
            raise TypeError(f"scheduler must be a diffusers or fastgen.schedulers scheduler (with config and "
                            f"set_timesteps), got {type(scheduler).__name__}")
        # a private copy: set_timesteps below must not change (or race with) the caller's scheduler
        scheduler = copy.deepcopy(scheduler)
        config = dict(scheduler.config)
        name = type(scheduler).__name__
        self.spec = self.table = None
        if name in DIFFUSION_KINDS or (config.get("_class_name") in DIFFUSION_KINDS and name not in _sigma_tables()):
            if timesteps is not None:
                raise ValueError(f"timesteps= sets a sigma-space scheduler's steps; {name} takes num_inference_steps")
            self._diffusion(scheduler, config, num_inference_steps, eta)
        else:
            self._sigma(scheduler, num_inference_steps, eta, timesteps, churn)
        self.model_timesteps = self.model_timesteps.reshape(-1)

    def _diffusion(self, scheduler, config, num_inference_steps, eta):
        from fastgen.schedulers._common import schedule_of

        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"scheduler must be a DDPMScheduler or DDIMScheduler with alphas_cumprod, got "
                            f"{type(scheduler).__name__}")
        self.spec = spec = StepSpec.from_scheduler(scheduler, **({"eta": eta} if eta else {}))
        self.kind = spec.kind
        self.schedule = schedule_of(scheduler)  # the scheduler's own tables, as its step reads them
        T = self.schedule.num_train_timesteps
        scheduler.set_timesteps(self._num_steps(num_inference_steps, T if spec.kind == "ddpm" else DEFAULT_STEPS, T))
        timesteps = torch.as_tensor(scheduler.timesteps).to("cpu", torch.int64)
        if timesteps.dim() != 1 or not len(timesteps) or (timesteps < 0).any() or (timesteps >= T).any():
            raise ValueError(f"scheduler.timesteps must be a non-empty list of timesteps in [0, {T}), "
                             f"got {timesteps.tolist()}")
        prev = spec.prev_timesteps(timesteps, config.get("num_train_timesteps", T))
        if (prev >= timesteps).any():
            raise ValueError(f"scheduler.timesteps must decrease, got {timesteps.tolist()}")
        self.timesteps, self.prev_timesteps = timesteps, prev
        self.num_steps = len(timesteps)
        self.model_timesteps = timesteps
        self.model_input_scales = torch.ones(self.num_steps, dtype=torch.float64)
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
        self.init_stream = T
        self.streams = timesteps
        self.counter_draws = (timesteps > 0) & spec.adds_noise  # no step adds noise at t = 0
        self.generator_draws = torch.tensor([spec.generator_draws(int(t)) for t in timesteps])

    def _sigma(self, scheduler, num_inference_steps, eta, timesteps, churn=None):
        from fastgen.step_table import step_table

        if eta:
            raise ValueError(f"eta is DDIM's setting; {type(scheduler).__name__} takes none, got eta={eta}")
        if timesteps is None:
            limit = getattr(scheduler.config, "num_train_timesteps", None) or 10 ** 9
            scheduler.set_timesteps(self._num_steps(num_inference_steps, DEFAULT_STEPS, limit))
        else:  # the scheduler checks the values, as in diffusers
            scheduler.set_timesteps(timesteps=self._custom_timesteps(scheduler, num_inference_steps, timesteps))
        self.table = table = step_table(scheduler, **_churn_settings(scheduler, churn))
        _check_finite_run(table, scheduler)
        self.kind = table.kind
        self.num_steps = table.num_steps
        self.model_timesteps = torch.as_tensor(table.model_timesteps).cpu()
        self.model_input_scales = table.model_input_scales.double()
        self.init_noise_sigma = float(table.init_noise_sigma)
        self.init_stream = table.init_stream
        self.streams = table.streams
        self.counter_draws = torch.tensor([table.draws(i) for i in range(table.num_steps)])
        self.generator_draws = table.generator_draws.bool()

    @staticmethod
    def _custom_timesteps(scheduler, num_inference_steps, timesteps) -> list:
        if isinstance(timesteps, (str, bytes)) or not hasattr(timesteps, "__iter__"):
            raise TypeError(f"timesteps must be a sequence of timesteps, got {type(timesteps).__name__}")
        if num_inference_steps is not None:
            raise ValueError(f"pass num_inference_steps or timesteps, not both; got {num_inference_steps} and "
                             f"{list(timesteps)}")
        if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"timesteps= needs a scheduler whose set_timesteps takes custom timesteps; "
                             f"{type(scheduler).__name__} does not")
        return list(timesteps)

    @staticmethod
    def _num_steps(num_inference_steps, default: int, limit: int) -> int:
        n = default if num_inference_steps is None else _checks.as_int(num_inference_steps, "num_inference_steps")
        if not 1 <= n <= limit:
            raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={limit}], got {n}")
        return n

    @property
    def learned_variance(self) -> bool:
        return self.spec is not None and self.spec.learned_variance

    @property
    def per_sample(self) -> bool:
        """Whether a step treats samples apart (a quantile per sample, channels split per sample)."""
        if self.spec is not None:
            return self.spec.thresholding or self.spec.learned_variance
        return self.table.clip == "threshold"

    def model_output_shape(self, shape: torch.Size) -> torch.Size:
        return self.spec.model_output_shape(shape) if self.spec is not None else shape


def _churn_settings(scheduler, churn) -> dict:
    """The Euler table's settings for ``fastgen.sample``'s churn (s_churn, s_tmin, s_tmax, s_noise):
    Karras et al.'s Algorithm 2 as written (``churn_at="model"``: the model evaluated at the churned
    sample). Only EulerDiscreteScheduler churns; None or s_churn = 0 is no churn."""
    if churn is None or not churn.get("s_churn"):
        return {}
    if "EulerDiscreteScheduler" not in {cls.__name__ for cls in type(scheduler).__mro__}:
        raise ValueError(f"s_churn applies to EulerDiscreteScheduler (Karras et al.'s Algorithm 2), got "
                         f"{type(scheduler).__name__}")
    return dict(churn, churn_at="model")


def _check_finite_run(table, scheduler):
    """ValueError unless every step of the run has finite coefficients and input scales: a schedule whose
    noise levels repeat or vanish (e.g. DPM-Solver++ with as many steps as training timesteps, or flow
    matching with shift 0) gives inf / NaN steps, which would return NaN samples without an error."""
    finite = torch.isfinite(table.coefficients).all(dim=1) & torch.isfinite(table.model_input_scales)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        sigmas = getattr(scheduler, "sigmas", None)
        levels = f" (its noise levels {float(sigmas[i]):g} -> {float(sigmas[i + 1]):g})" if sigmas is not None and \
            len(sigmas) > i + 1 else ""
        raise ValueError(f"{type(scheduler).__name__}'s run of {table.num_steps} steps is degenerate: step {i}'s "
                         f"coefficients are not finite{levels}, so every sample would be NaN; use fewer steps or "
                         "another timestep_spacing, shift or sigma schedule")


def _sigma_tables():
    """The StepTable builders by diffusers class name (every builder the registry names)."""
    from fastgen.step_table import TABLES

    registry.load_builders()
    return TABLES


# --- the step strategies, one per backend ----------------------------------------------------------

class _Steps:
    """What every strategy shares: the run's plan, noise arguments and guidance. ``step(i, pred, x,
    noise)`` advances x by step i (a host int) from the model's prediction; noise: diffusers'
    generator noise for the step, or None for the counter-based stream."""

    backend = None  # the ops' backend this strategy runs

    def __init__(self, plan, shape, *, seed, offset, device, dtype, guidance_scale):
        self.plan, self.shape, self.seed, self.offset = plan, shape, seed, offset
        self.element_offset = _checks.sample_offset(offset, shape)  # what the kernels and references take
        self.device, self.dtype, self.guidance_scale = device, dtype, guidance_scale
        self.denoised = None  # a multistep solver's previous output(s): D', or the ring of the last H
        self.previous = ()  # the torch strategies' (D_i-1, ..., D_i-H), most recent first

    def initial_noise(self) -> torch.Tensor:
        """z_N from the initial stream (counter-based), not yet scaled."""
        return ops.randn(self.shape, seed=self.seed, stream=self.plan.init_stream, offset=self.offset,
                         device=self.device, dtype=self.dtype, backend=self.backend)


class _TritonSteps(_Steps):
    """Each step one fused kernel, its timesteps / coefficients read on the device (graph-capturable).

    Every sample steps from the same timestep, so a step may read the batch as one [1, B n] sample:
    element g of sample b is flat element b n + g either way, with the same noise counter. Not where
    a step treats samples apart (dynamic thresholding, a learned variance); the element offset of
    such a flat batch goes through the ops' internal entry (``fastgen.ops.diffusion._step``) or, for
    the StepTable samplers, as sample offset 0 of the flat sample plus the element offset in the seed's
    counter (``_flat_offset``)."""

    backend = "triton"

    def __init__(self, plan, shape, **kwargs):
        super().__init__(plan, shape, **kwargs)
        self.flat = not plan.per_sample
        device = self.device
        self.timesteps = plan.timesteps.to(device) if plan.spec is not None else None
        self.prev_timesteps = plan.prev_timesteps.to(device) if plan.spec is not None else None
        if plan.table is not None:
            self.steps = plan.table.on(device)[2]
            if plan.table.reads_previous:
                self.denoised = torch.zeros(_ring_shape(plan.table, shape), dtype=self.dtype, device=device)

    def step_at(self, index, pred, x, noise):
        """The step at ``index``: a host int (eager) or the device counter (captured)."""
        plan, shape = self.plan, x.shape
        if self.flat:  # one timestep for the batch: the same counters as [B, n], in fewer, larger programs
            rows = 2 if self.guidance_scale is not None else 1
            pred, x, noise = (None if v is None else v.reshape(r, -1) for v, r in ((pred, rows), (x, 1), (noise, 1)))
        if plan.spec is not None:
            t = self.timesteps[index] if isinstance(index, int) else self.timesteps.index_select(0, index).reshape(())
            prev_t = (self.prev_timesteps[index] if isinstance(index, int)
                      else self.prev_timesteps.index_select(0, index).reshape(()))
            x_next, _ = diffusion_ops._step(plan.spec, pred, t, prev_t, x, plan.schedule,
                                            seed=self.seed if noise is None else None, noise=noise,
                                            offset=self.element_offset, return_x0=False, backend="triton",
                                            guidance_scale=self.guidance_scale)
            return x_next.reshape(shape)
        step = self.steps[index] if isinstance(index, int) else index.reshape(())
        denoised = self.denoised.reshape(_ring_shape(plan.table, x.shape)) if self.denoised is not None else None
        x_next, _ = sampler_ops.fused_step(
            plan.table, step, pred, x, denoised, noise=noise, seed=self.seed if self.seed is not None else 0,
            offset=self.element_offset, guidance_scale=self.guidance_scale, return_denoised=denoised is not None,
            denoised_out=denoised)
        return x_next.reshape(shape)

    def step(self, i, pred, x, noise):
        return self.step_at(i, pred, x, noise)


class _TorchSteps(_Steps):
    """The fused update as a few whole-tensor fp32 torch ops per step: every per-step coefficient made
    once for the run in float64 (DDPM/DDIM: ``torch_coefficients``; StepTables: their rows) and read
    as Python floats, and the counter-based noise drawn for several steps per call
    (``fastgen.reference.random.normals`` with one stream per step). What it saves against stepping
    through the float64 reference is per-step work on the host: a handful of ops per step instead of
    ~100 small ones, and one Philox pass per chunk of steps."""

    NOISE_CHUNK = 1 << 20  # normals per noise call: big enough to amortise the per-op cost (a DDPM
    # loop's noise ~15% cheaper than with 1 << 18 on a 2-core CPU); the Philox words fill ~10 MB

    def __init__(self, plan, shape, **kwargs):
        super().__init__(plan, shape, **kwargs)
        if plan.spec is not None:
            columns = diffusion_ops.torch_coefficients(plan.spec, plan.schedule, plan.timesteps, plan.prev_timesteps)
            self.rows = [dict(zip(columns, row)) for row in zip(*(c.tolist() for c in columns.values()))]
        else:
            self.rows = [plan.table.row(i) for i in range(plan.num_steps)]
        self.draws = plan.counter_draws.tolist()
        self._noise_rows = {}
        self._previous_noise = None  # the last step's counter noise (a NOISE_PREV row adds it again)

    def initial_noise(self) -> torch.Tensor:
        """z_N (drawn in one call with the first steps' noise)."""
        self._draw(-1)
        return self._noise_rows.pop(-1).reshape(self.shape).to(self.dtype)

    def _counter_noise(self, i: int) -> torch.Tensor:
        """Step i's counter-based noise (fp32), drawn with the next steps' in one call."""
        if i not in self._noise_rows:
            self._draw(i)
        return self._noise_rows.pop(i).reshape(self.shape)

    def _draw(self, i: int):
        """The noise of step i (-1: z_N) and of the next drawing steps, NOISE_CHUNK normals in all."""
        numel = self.shape.numel()
        rows_per_call = max(1, self.NOISE_CHUNK // numel)
        drawing = (j for j in range(max(i, 0), len(self.draws)) if self.draws[j])
        first = [-1] if i < 0 else []
        upcoming = first + list(itertools.islice(drawing, rows_per_call - len(first)))
        streams = [self.plan.init_stream if j < 0 else int(self.plan.streams[j]) for j in upcoming]
        rows = ref_random.normals(numel, seed=self.seed, stream=torch.tensor(streams, device=self.device),
                                  offset=self.element_offset, device=self.device, dtype=torch.float32)
        self._noise_rows = dict(zip(upcoming, rows))

    def step(self, i, pred, x, noise):
        plan = self.plan
        z = None
        if self.draws[i]:
            z = noise.float() if noise is not None else self._counter_noise(i)
        pred = guided(pred.float(), self.guidance_scale)
        if plan.spec is not None:
            x_next, _ = diffusion_ops.torch_update(plan.spec, self.rows[i], pred, x, z)
            return x_next.to(x.dtype)
        row = self.rows[i]
        noise_prev = self._previous_noise if row["noise_prev"] else None
        self._previous_noise = z
        x_next, denoised = sampler_ops.torch_step(plan.table, row, pred, x.float(), self.previous, z,
                                                  need_denoised=plan.table.reads_previous, noise_prev=noise_prev)
        self._keep(denoised)
        return x_next.to(x.dtype)

    def _keep(self, denoised):
        """The step's denoised output as the most recent of the last H (a multistep solver's history)."""
        if self.plan.table.reads_previous:
            self.previous = (denoised, *self.previous)[:self.plan.table.history]


class _CompiledSteps(_TorchSteps):
    """The torch strategy with its counter noise compiled by inductor (fastgen._compile; "auto" on a CPU
    with a C++ compiler). The initial noise is one generated C++ loop (Philox and Box-Muller fused), and
    a step that draws counter noise is one too, the update included (``row_update`` for DDPM/DDIM,
    ``affine_step`` for the StepTable samplers), reading the step's coefficient row and stream from
    tensors so one compiled graph serves every step. A step that draws no counter noise runs the eager
    torch update, a few whole-tensor ops that cost less than a compiled call's fixed overhead (tens of
    microseconds), which the fused noise repays; except a DDPM/DDIM update (about seven passes) of
    COMPILED_UPDATE_NUMEL elements and more, which the single fused pass repays too. Compiled once per
    sampler, dtype and shape;
    ``compile_seconds`` is the first run's one-time cost (the first noise draw, and the steps' time
    above the median step's)."""

    backend = "torch"
    COMPILED_UPDATE_NUMEL = 1 << 15  # a DDPM/DDIM update this large runs compiled without noise too

    def __init__(self, plan, shape, **kwargs):
        super().__init__(plan, shape, **kwargs)
        from fastgen import _compile
        from fastgen.ops import random as random_ops

        device = self.device
        self.seed_tensor = torch.tensor(0 if self.seed is None else _signed64(self.seed), dtype=torch.int64)
        self.noise_fn = _compile.compiled(random_ops._torch_randn, ("loop", shape, self.dtype))
        self.fn = None
        self.draws_noise = self.seed is not None and bool(plan.counter_draws.any())
        large = shape.numel() >= self.COMPILED_UPDATE_NUMEL
        if self.draws_noise or (plan.spec is not None and large):  # compiled: see the class docstring
            guided_key = self.guidance_scale is not None
            if plan.spec is not None:
                self.names = tuple(self.rows[0])
                self.coefficients = torch.tensor([[row[n] for n in self.names] for row in self.rows],
                                                 dtype=torch.float32, device=device)
                self.streams = plan.timesteps.to(device)
                self.fn = _compile.compiled(diffusion_ops.row_update, ("ddpm/ddim", plan.spec, shape, self.dtype,
                                                                        guided_key))
            else:
                self.coefficients, self.streams, _ = plan.table.on(device)
                self.fn = _compile.compiled(sampler_ops.affine_step, (plan.table.clip_settings, shape, self.dtype,
                                                                       guided_key))
        self.step_seconds = []
        self.first_noise_seconds = self.compile_seconds = None

    def initial_noise(self) -> torch.Tensor:
        """z_N from the initial stream, drawn by the compiled Philox loop."""
        import time

        start = time.perf_counter()
        z = self.noise_fn(list(self.shape), self.seed_tensor, self.plan.init_stream, self.element_offset, self.dtype)
        if self.first_noise_seconds is None:
            self.first_noise_seconds = time.perf_counter() - start
        return z

    def step(self, i, pred, x, noise):
        import time

        plan, start = self.plan, time.perf_counter()
        if self.fn is None or noise is not None:  # no counter noise to fuse: the eager update
            x_next = super().step(i, pred, x, noise)
        elif plan.spec is not None:
            x_next = self.fn(plan.spec, self.names, self.coefficients[i], self.streams[i], pred, x,
                             draws=self.draws_noise, seed=self.seed_tensor, offset=self.element_offset,
                             guidance_scale=self.guidance_scale)
        else:
            # always H previous outputs (x where the run has fewer: their coefficients are 0), one graph
            previous = (self.previous + (x,) * plan.table.history)[:plan.table.history] \
                if plan.table.reads_previous else ()
            prev_stream = self.streams[max(i - 1, 0)] if plan.table.reads_previous_noise else None
            x_next, denoised = self.fn(self.coefficients[i], self.streams[i], pred, x, previous, draws=True,
                                       seed=self.seed_tensor, offset=self.element_offset,
                                       guidance_scale=self.guidance_scale, clip=plan.table.clip_settings,
                                       prev_stream=prev_stream)
            self._keep(denoised)
            x_next = x_next.to(x.dtype)
        if self.compile_seconds is None:
            self.step_seconds.append(time.perf_counter() - start)
            if len(self.step_seconds) == plan.num_steps:
                median = sorted(self.step_seconds)[len(self.step_seconds) // 2]
                excess = sum(max(0.0, t - median) for t in self.step_seconds)
                self.compile_seconds = (self.first_noise_seconds or 0.0) + excess
        return x_next


def _signed64(value: int) -> int:
    """A 64-bit unsigned int's bits as a signed int (what an int64 tensor holds)."""
    return value - (1 << 64) if value >= 1 << 63 else value


class _ReferenceSteps(_Steps):
    """Every step through the float64 references (host timesteps): the loop the others are checked against."""

    backend = "reference"

    def step(self, i, pred, x, noise):
        plan = self.plan
        if plan.spec is not None:
            x_next, _ = diffusion_ops._step(plan.spec, pred, int(plan.timesteps[i]), int(plan.prev_timesteps[i]), x,
                                            plan.schedule, seed=self.seed if noise is None else None, noise=noise,
                                            offset=self.element_offset, return_x0=False, backend="reference",
                                            guidance_scale=self.guidance_scale)
            return x_next
        table = plan.table
        if table.reads_previous and self.denoised is None:
            self.denoised = torch.zeros(_ring_shape(table, x.shape), dtype=x.dtype, device=x.device)
        x_next, _ = sampler_ops.sampler_step(
            table, i, pred, x, prev_denoised=self.denoised, seed=self.seed if noise is None else None, noise=noise,
            offset=self.offset, guidance_scale=self.guidance_scale, return_denoised=False,
            denoised_out=self.denoised, backend="reference")
        return x_next


def _ring_shape(table, shape) -> tuple:
    """The shape of the kept denoised outputs: the sample's (history 1), or a ring of H of them."""
    return tuple(shape) if table.history == 1 else (table.history, *shape)


STRATEGIES = {"triton": _TritonSteps, "torch": _TorchSteps, "reference": _ReferenceSteps}


def _strategy(backend_arg, backend: str, device: torch.device):
    """The step strategy: STRATEGIES[backend], except that "auto" on a CPU runs the torch strategy
    compiled (``_CompiledSteps``) where fastgen._compile is available."""
    from fastgen import _compile

    return _CompiledSteps if _compile.runs_compiled(backend_arg, backend, device) else STRATEGIES[backend]


# --- noise -----------------------------------------------------------------------------------------

def _diffusers_noise(shape, generator, device, dtype) -> torch.Tensor:
    """Normals drawn exactly as diffusers' pipelines draw them (its ``randn_tensor``)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def _generator_arg(generator, batch: int):
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch:
            raise ValueError(f"generator must be one torch.Generator or a list of one per sample "
                             f"(batch={batch}), got a list of {len(generator)}")
        return list(generator)
    raise TypeError(f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}")


# --- the model -------------------------------------------------------------------------------------

def _model_device(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return None


def _prediction(out):
    """The model's prediction: a tensor, the ``.sample`` of a diffusers output, or the first of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model must return a tensor (or a diffusers output with .sample), got {type(out).__name__}")


def _check_prediction(pred, expected: torch.Size, dtype, device):
    if pred.shape != expected:
        raise ValueError(f"model output must have shape {tuple(expected)} (the model input's"
                         f"{', with 2x channels for a learned variance' if expected[1:] else ''}), "
                         f"got {tuple(pred.shape)}")
    if pred.dtype != dtype:
        raise ValueError(f"model output must have the sampling dtype {dtype} (pass dtype= to match the model), "
                         f"got {pred.dtype}")
    if pred.device != device:
        raise ValueError(f"model output must be on the sampling device {device}, got {pred.device}")


def _labels_arg(class_labels, null_class_label, guidance_scale, model, batch, device):
    """(labels [B] or None, the guided model's labels [2B] or None) on the device, checked."""
    if class_labels is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale needs class_labels (the condition to guide towards)")
        return None, None
    if isinstance(class_labels, torch.Tensor):
        if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool or class_labels.dim() > 1:
            raise TypeError(f"class_labels must be an int or an integer tensor of shape [B], got {class_labels!r}")
        labels = class_labels.to("cpu", torch.int64).expand(batch) if class_labels.numel() == 1 else class_labels
        if labels.shape != (batch,):
            raise ValueError(f"class_labels must be one int or one per sample (batch={batch}), got shape "
                             f"{tuple(class_labels.shape)}")
    else:
        labels = torch.full((batch,), _checks.as_int(class_labels, "class_labels"), dtype=torch.int64)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and labels.device.type == "cpu" and ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"class_labels must be in [0, {num_classes}) (the model's classes), got {labels.tolist()}")
    labels = labels.to(device)
    if guidance_scale is None:
        return labels, None
    if null_class_label is None:
        null_class_label = getattr(model, "null_class_label", None)
    if null_class_label is None:
        raise ValueError("guidance_scale needs null_class_label (the unconditional label), or a model with a "
                         "null_class_label attribute")
    null = torch.full((batch,), _checks.as_int(null_class_label, "null_class_label"), dtype=torch.int64, device=device)
    return labels, torch.cat([null, labels])


# --- the loop --------------------------------------------------------------------------------------

def sample(model, shape, scheduler, *, num_inference_steps=None, seed=0, offset=0, generator=None, device=None,
           dtype=torch.float32, cuda_graph="auto", progress=False, return_trajectory=False, eta=0.0,
           class_labels=None, guidance_scale=None, null_class_label=None, backend="auto", timesteps=None,
           s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Draw samples with ``model`` and a scheduler (see the module docstring for the loop).

    Args:
        model: callable ``model(x, t) -> prediction`` (a tensor, or a diffusers output with ``.sample``),
            or ``model(x, t, class_labels=labels)`` when class_labels are given; x [B, ...] (2B with
            guidance) in ``dtype``, t [B] on the device (the scheduler's timesteps, int64 for
            DDPM/DDIM); the prediction is what the scheduler's config says (prediction_type), shaped
            like x (2x channels on dim 1 for a learned variance).
        shape: the batch shape [B, ...].
        scheduler: diffusers' or fastgen.schedulers' DDPM, DDIM, Euler, Euler ancestral,
            DPM-Solver++ (multistep), flow-matching Euler, consistency (CMStochasticIterative) or LCM
            scheduler; its config gives the step, its ``set_timesteps(num_inference_steps)`` the
            timesteps (called on a private copy, as diffusers' pipelines do).
        num_inference_steps: default: every training timestep for DDPM, 50 for the others.
        timesteps: instead of num_inference_steps, the custom timesteps of a sigma-space scheduler
            whose ``set_timesteps`` takes them (``set_timesteps(timesteps=...)``, as diffusers'
            pipelines pass them): e.g. a consistency model's 2-step schedule ``[j, 0]``.
        seed: 64-bit int of the counter-based noise (None: drawn from torch's default generator).
        offset: non-negative int, counted in samples: sample b of this call is sample offset + b of
            the stream, so shards with offsets reproduce one large batch.
        generator: diffusers parity noise instead of the counter-based stream; offset must then be 0.
        device: default: the model's parameters' device, else the CPU.
        dtype: of x, the model input and the result.
        cuda_graph: "auto" (CUDA device and Triton backend), True (error without CUDA) or False.
        progress: show a tqdm bar.
        return_trajectory: also return every x, a [N + 1, *shape] tensor (x_N first).
        eta: DDIM's eta in [0, 1] (0: deterministic after x_N); must be 0 for the other schedulers.
        class_labels: an int or an int tensor [B]: the model is conditioned on them.
        guidance_scale: w, classifier-free guidance towards class_labels (fused into the step).
        null_class_label: the unconditional label (default: the model's ``null_class_label``).
        backend: "auto" (Triton on CUDA, "torch" elsewhere), "triton", "torch" or "reference".
        s_churn, s_tmin, s_tmax, s_noise: EulerDiscreteScheduler only: Karras et al.'s churn in the form
            of their Algorithm 2, the model evaluated at the churned sample x^ = x + s_noise
            sqrt(sigma^^2 - sigma^2) z at the timestep of sigma^ (gamma = min(s_churn / N, sqrt(2) - 1)
            where s_tmin <= sigma <= s_tmax; z the step's noise). diffusers' own step (and fastgen's
            drop-in ``step(s_churn=)``) instead reuses the model output at the pre-churn sample. A run
            with churn steps without a CUDA graph.
    Returns x_0 in ``dtype`` (and the trajectory).
    """
    sampler = Sampler(model, shape, scheduler, num_inference_steps=num_inference_steps, seed=seed, offset=offset,
                      generator=generator, device=device, dtype=dtype, cuda_graph=cuda_graph, eta=eta,
                      class_labels=class_labels, guidance_scale=guidance_scale, null_class_label=null_class_label,
                      backend=backend, timesteps=timesteps, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                      s_noise=s_noise)
    return sampler(progress=progress, return_trajectory=return_trajectory)


class Sampler:
    """``fastgen.sample`` prepared once (arguments as there) and run by calling it: the checks, the
    plan, the device tables and, on CUDA, the captured graph are made on the first call and reused
    by every later one, so repeated sampling pays the capture once. With ``seed`` every call returns
    the same samples; with ``generator`` every call draws on from it, as diffusers does.

        sampler = fastgen.sampling.Sampler(model, (64, 1, 8, 8), scheduler, num_inference_steps=50, seed=0)
        x = sampler()                       # captures (CUDA), then replays 50 times
        x = sampler(progress=True)          # replays only

    The loop's state (the sample, the step counter, the noise buffer, the strategy) lives here:
    ``run`` is the loop, eager or replaying the captured graph.
    """

    def __init__(self, model, shape, scheduler, *, num_inference_steps=None, seed=0, offset=0, generator=None,
                 device=None, dtype=torch.float32, cuda_graph="auto", eta=0.0, class_labels=None, guidance_scale=None,
                 null_class_label=None, backend="auto", timesteps=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                 s_noise=1.0):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
        shape = _checks.shape(shape)
        if len(shape) < 1 or shape.numel() == 0:
            raise ValueError(f"shape must be [batch, ...] with no zero dims, got {tuple(shape)}")
        dtype = _checks.float_dtype(dtype)
        model_device = _model_device(model)
        device = _checks.compute_device(device if device is not None else (model_device or "cpu"))
        if model_device is not None and model_device != device:
            raise ValueError(f"device must be the model's device: the model's parameters are on {model_device}, "
                             f"got device={device}")
        _checks.sample_offset(offset, shape)  # in samples, as every public op counts it
        offset = _checks.as_int(offset, "offset")
        generator = _generator_arg(generator, shape[0])
        if generator is not None and offset:
            raise ValueError(f"offset selects counter-based noise; with generator= it must be 0, got {offset}")
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        backend_arg, backend = backend, resolve_backend(backend, device)
        if cuda_graph is True and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got device {device}")
        if cuda_graph is True and backend != "triton":
            raise ValueError("cuda_graph=True needs backend 'triton' (the torch and reference loops step on the host), "
                             f"got backend {backend!r}")
        seed = _checks.seed64(seed) if generator is None else None
        guidance_scale = guidance_scale_arg(guidance_scale)
        if guidance_scale == 1.0:
            guidance_scale = None  # w = 1 is the conditional model: one pass
        self.labels, self.guided_labels = _labels_arg(class_labels, null_class_label, guidance_scale, model, shape[0],
                                                      device)
        plan = _Plan(scheduler, num_inference_steps, eta, timesteps,
                     churn=dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise))
        if generator is not None and plan.table is not None and plan.table.reads_previous_noise:
            raise ValueError(f"{type(scheduler).__name__}'s steps draw correlated Brownian increments from the counter "
                             "stream (diffusers' own step draws them from torchsde's tree, never from a generator): "
                             "pass seed=, not generator=")
        if plan.learned_variance and len(shape) < 2:
            raise ValueError(f"shape needs a channel dimension (dim 1) for variance_type={plan.spec.variance_type!r}, "
                             f"got {tuple(shape)}")
        if plan.learned_variance and guidance_scale is not None:
            raise ValueError(f"guidance_scale is not supported with variance_type={plan.spec.variance_type!r}")
        self.model, self.shape, self.plan, self.generator = model, shape, plan, generator
        self.device, self.dtype, self.cuda_graph, self.backend = device, dtype, cuda_graph, backend
        self.guidance_scale = guidance_scale
        pre_churn = None if plan.table is None else plan.table.pre_churn
        self.pre_churn = None if pre_churn is None else pre_churn.tolist()
        if self.pre_churn is not None and cuda_graph is True:
            raise ValueError("cuda_graph=True cannot run churn (s_churn > 0): the churn is added before the model "
                             "call, outside the captured step; pass cuda_graph='auto' or False")
        self.use_graph = (cuda_graph is not False and device.type == "cuda" and backend == "triton"
                          and self.pre_churn is None)
        strategy = _strategy(backend_arg, backend, device)
        self.strategy = strategy(plan, shape, seed=seed, offset=offset, device=device, dtype=dtype,
                                 guidance_scale=guidance_scale)
        rows = 2 if guidance_scale is not None else 1
        self.expected = plan.model_output_shape(torch.Size([rows * shape[0], *shape[1:]]))
        self.model_timesteps = plan.model_timesteps.to(device)
        self.input_scales = plan.model_input_scales.tolist()
        self.scales_on_device = plan.model_input_scales.to(device, torch.float32)
        self.graph = self.counter = self.x = None
        self.generator_draws = plan.generator_draws.tolist()  # host values: the loop reads no tensor
        self.noise = None
        if generator is not None and any(self.generator_draws):
            self.noise = torch.zeros(shape, dtype=dtype, device=device)
        self.num_inference_steps = plan.num_steps
        self.timesteps = plan.model_timesteps

    @property
    def captured(self) -> bool:
        """Whether the loop runs as a CUDA graph (after the first call)."""
        return self.graph is not None

    def __call__(self, *, progress=False, return_trajectory=False):
        with torch.no_grad():
            if self.use_graph and self.graph is None:
                try:
                    self.capture()
                except Exception as err:  # noqa: BLE001  (any capture failure: fall back or re-raise)
                    if self.cuda_graph is True:
                        raise RuntimeError(f"cuda_graph=True: capturing the model and step failed ({err}); "
                                           "pass cuda_graph=False for a model that cannot be captured") from err
                    warnings.warn(f"fastgen.sample: CUDA graph capture failed ({err}); running the eager loop",
                                  RuntimeWarning, stacklevel=2)
                    self.graph, self.use_graph = None, False
            return self.run(progress, return_trajectory)

    # --- the model call --------------------------------------------------------------------------------

    def predict(self, x, index):
        """The model's checked prediction at x for step ``index`` (a host int, or the device counter
        inside a graph): the input scaled as the scheduler says, doubled for guidance."""
        if isinstance(index, int):
            t = self.model_timesteps[index]
            scale = self.input_scales[index]
            x_in = x * scale if scale != 1.0 else x
        else:
            t = self.model_timesteps.index_select(0, index).reshape(())
            x_in = x * self.scales_on_device.index_select(0, index).reshape(()).to(x.dtype)
        batch = x.shape[0]
        if self.guided_labels is not None:
            x_in = torch.cat([x_in, x_in])
            out = self.model(x_in, t.expand(2 * batch), class_labels=self.guided_labels)
        elif self.labels is not None:
            out = self.model(x_in, t.expand(batch), class_labels=self.labels)
        else:
            out = self.model(x_in, t.expand(batch))
        pred = _prediction(out)
        _check_prediction(pred, self.expected, self.dtype, self.device)
        return pred

    # --- the loop --------------------------------------------------------------------------------------

    def _initial_noise(self):
        """x_N = init_noise_sigma z_N: the initial stream (counter-based) or the generator (diffusers' order)."""
        if self.generator is not None:
            x = _diffusers_noise(self.shape, self.generator, self.device, self.dtype)
        else:
            x = self.strategy.initial_noise()
        sigma = self.plan.init_noise_sigma
        return x * sigma if sigma != 1.0 else x.contiguous()

    def _draw_step_noise(self, i):
        if self.noise is not None and self.generator_draws[i]:
            self.noise.copy_(_diffusers_noise(self.shape, self.generator, self.device, self.dtype))

    def _churn_noise(self, i, dtype):
        """Step i's noise for the churn added before the model call: the generator's draw, or the
        counter stream of step i (the stream the step itself would draw)."""
        if self.noise is not None:
            return self.noise.to(dtype)
        return ops.randn(self.shape, seed=self.strategy.seed, stream=int(self.plan.streams[i]),
                         offset=self.strategy.offset, device=self.device, backend="torch").to(dtype)

    def _step_noise(self, i):
        return self.noise if self.noise is not None and self.generator_draws[i] else None

    def capture(self):
        """Warm up (compile, autotune, allocate) on a side stream, then capture one step into a CUDA
        graph on static buffers (x, the step counter, the noise, the previous denoised output): the
        step reads its timesteps, coefficients and input scale from the device tables at the counter,
        writes x_next into x and advances the counter."""
        strategy = self.strategy
        self.x = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.counter = counter = torch.zeros(1, dtype=torch.int64, device=self.device)
        noise = self.noise  # the graph reads the buffer whenever the plan's step uses noise

        def body():
            self.x.copy_(strategy.step_at(counter, self.predict(self.x, counter), self.x, noise))
            counter.add_(1)

        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # results discarded: x and the counter are not advanced
                strategy.step_at(0, self.predict(self.x, 0), self.x, noise)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        self.graph = graph

    def run(self, progress: bool, return_trajectory: bool):
        from tqdm.auto import tqdm

        plan = self.plan
        x = self._initial_noise()
        if self.graph is not None:
            self.x.copy_(x)
            self.counter.zero_()
            x = self.x
        trajectory = None
        if return_trajectory:
            trajectory = torch.empty((plan.num_steps + 1, *self.shape), dtype=self.dtype, device=self.device)
            trajectory[0].copy_(x)
        for i in tqdm(range(plan.num_steps), disable=not progress, desc=f"{plan.kind} sampling", dynamic_ncols=True):
            self._draw_step_noise(i)
            if self.pre_churn is not None and self.pre_churn[i]:
                x = x + self.pre_churn[i] * self._churn_noise(i, x.dtype)
            if self.graph is not None:
                self.graph.replay()
            else:
                x = self.strategy.step(i, self.predict(x, i), x, self._step_noise(i))
            if trajectory is not None:
                trajectory[i + 1].copy_(x)
        if self.graph is not None:
            x = x.clone()  # the static buffer is overwritten by the next call
        return (x, trajectory) if return_trajectory else x
