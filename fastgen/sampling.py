"""The sampling loop: x_T ~ N(0, I), then one fused reverse step per timestep, device-resident and
(on CUDA) captured once as a CUDA graph and replayed.

    import fastgen
    from fastgen.models import pretrained_denoiser
    from fastgen.schedulers import DDIMScheduler        # or diffusers' DDPMScheduler / DDIMScheduler

    model = pretrained_denoiser()
    x = fastgen.sample(model, (64, 1, 8, 8), DDIMScheduler(**model.scheduler_config), num_inference_steps=50, seed=0)

The loop (Ho et al. 2020, Algorithm 2; Song et al. 2021, eq. 12 for DDIM), for the scheduler's
timesteps t_0 > t_1 > ... > t_{N-1} with s_i = the timestep after t_i as the scheduler defines it
(DDPM: the next one in the list, -1 after the last; DDIM: t_i - T // N, diffusers' rule), -1 meaning
"the end of the chain" (abar = 1, or abar_0 for DDIM with set_alpha_to_one=False):

    x <- z_T                                         z_T from stream T
    for i in 0 .. N-1:   x <- step(model(x, t_i), t_i, s_i, x, noise z from stream t_i)

where ``step`` is ``fastgen.ddpm_step`` / ``fastgen.ddim_step`` with the scheduler's config
(prediction_type, variance_type, clip_sample(_range), thresholding, set_alpha_to_one).

Noise. Counter-based (``fastgen.randn``): element g of sample b in a step at timestep t is the normal
of counter element (offset + b) * n + g in stream t (n = elements per sample, ``offset`` counted in
samples), and x_T is stream T = num_train_timesteps. So sample k is the same whether drawn alone
(offset=k), in a batch of 64, or in shards. With ``generator=`` (a torch.Generator, or a list with one
per sample) the noise is instead drawn exactly as diffusers' pipelines draw it (x_T first, then one
draw per step where diffusers draws: DDPM where t > 0, DDIM where eta > 0), so the result matches
a diffusers loop with the same generator; the fused kernel reads that noise.

Backends (the names mean what they mean for every op, fastgen.backend). "triton" runs ``step`` as
one fused kernel per step. "torch" (what "auto" picks off CUDA) runs the same update as a few
whole-tensor fp32 torch ops per step (``fastgen.ops.diffusion.torch_update``, the ops' own "torch"
path), with every per-step coefficient computed once per run in float64 (``torch_coefficients``)
and the counter-based noise of many steps (z_T with the first) drawn in one call: the loop for a
CPU, where a kernel runs only in the slow Triton interpreter. "reference" steps through
``fastgen.reference.diffusion`` in float64: the loop the other two are checked against.

Device residency. The timesteps and the previous timesteps are int64 tensors on the device, read
by the kernels in place; the schedule tables live there too. Nothing in the loop calls ``.item()``
or synchronises (the torch and reference loops read their timesteps and coefficients from host
copies, also without a sync).
With ``cuda_graph`` (default "auto": on for a CUDA device with the Triton backend) the model call and
the fused step are warmed up on a side stream, captured once into a CUDA graph on static buffers
(the sample, a step counter, the noise buffer for ``generator``), and replayed N times; inside the
graph the step reads t_i and s_i from the device tables at the counter and advances it. A model
that cannot be captured (data-dependent shapes, host syncs) falls back to the eager loop under
"auto" with a warning, and raises under ``cuda_graph=True``.
"""
import copy
import itertools
import warnings

import torch

from fastgen import _checks
from fastgen import ops
from fastgen.backend import resolve_backend
from fastgen.ops import diffusion as diffusion_ops
from fastgen.reference import random as ref_random
from fastgen.step_spec import StepSpec

DEFAULT_STEPS = {"ddim": 50}  # DDPM: every training timestep (diffusers' pipelines use 1000 and 50)


def make_scheduler(kind: str, **config):
    """A DDPMScheduler ("ddpm") or DDIMScheduler ("ddim"): fastgen's drop-in classes
    (``fastgen.schedulers``) when present, else diffusers' own."""
    names = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}
    if kind not in names:
        raise ValueError(f"kind must be one of {sorted(names)}, got {kind!r}")
    try:
        from fastgen import schedulers
    except ImportError:
        try:
            import diffusers as schedulers
        except ImportError as err:
            raise ImportError("make_scheduler needs fastgen.schedulers or diffusers (pip install diffusers)") from err
    return getattr(schedulers, names[kind])(**config)


# --- the plan: what the scheduler says, checked once, on the host ----------------------------------

class _Plan:
    """Kind, noise schedule, step arguments and the host timesteps / previous timesteps of a run."""

    def __init__(self, scheduler, num_inference_steps, eta):
        from fastgen.schedulers._common import schedule_of

        config = getattr(scheduler, "config", None)
        if config is None or not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"scheduler must be a DDPMScheduler or DDIMScheduler (diffusers' or fastgen.schedulers'"
                            f"), with config, alphas_cumprod and set_timesteps, got {type(scheduler).__name__}")
        # a private copy: set_timesteps below must not change (or race with) the caller's scheduler
        scheduler = copy.deepcopy(scheduler)
        config = dict(config)
        self.spec = spec = StepSpec.from_scheduler(scheduler, **({"eta": eta} if eta else {}))
        self.kind = kind = spec.kind
        self.schedule = schedule_of(scheduler)  # the scheduler's own tables, as its step reads them
        T = self.num_train_timesteps = self.schedule.num_train_timesteps

        if num_inference_steps is None:
            num_inference_steps = DEFAULT_STEPS.get(kind, T)
        num_inference_steps = _checks.as_int(num_inference_steps, "num_inference_steps")
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={T}], got {num_inference_steps}")
        scheduler.set_timesteps(num_inference_steps)
        timesteps = torch.as_tensor(scheduler.timesteps).to("cpu", torch.int64)
        if timesteps.dim() != 1 or not len(timesteps) or (timesteps < 0).any() or (timesteps >= T).any():
            raise ValueError(f"scheduler.timesteps must be a non-empty list of timesteps in [0, {T}), "
                             f"got {timesteps.tolist()}")
        self.num_inference_steps = len(timesteps)
        prev = spec.prev_timesteps(timesteps, config.get("num_train_timesteps", T))
        if (prev >= timesteps).any():
            raise ValueError(f"scheduler.timesteps must decrease, got {timesteps.tolist()}")
        self.timesteps, self.prev_timesteps = timesteps, prev
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))

    def generator_draws(self, i: int) -> bool:
        """Whether diffusers draws step noise at step i (its generator advances)."""
        return self.spec.generator_draws(int(self.timesteps[i]))


# --- the torch backend's step: the fused update in whole-tensor ops ---------------------------------

class _TorchSteps:
    """The loop body of the torch backend: the fused kernels' update (``kernels/diffusion.py``'s
    equations) as a few whole-tensor torch ops per step in fp32, with every per-step coefficient
    computed once for the run in float64 by the reference (``step_coefficients``, ``model_variance``
    over all timesteps at once) and read as Python floats, and the counter-based noise drawn for
    several steps per call (``fastgen.reference.random.normals`` with one stream per step). What it
    saves against stepping through the float64 reference is per-step work on the host: a handful
    of ops per step instead of ~100 small ones, and one Philox pass per chunk of steps.
    """

    NOISE_CHUNK = 1 << 20  # normals per noise call: big enough to amortise the per-op cost (a DDPM
    # loop's noise ~15% cheaper than with 1 << 18 on a 2-core CPU); the Philox words fill ~10 MB

    def __init__(self, plan, shape, *, seed, element_offset, device):
        from fastgen.ops.diffusion import torch_coefficients

        self.plan, self.shape, self.seed, self.element_offset, self.device = plan, shape, seed, element_offset, device
        t, spec = plan.timesteps, plan.spec
        n = len(t)
        noisy = t > 0  # no step adds noise at t = 0
        columns = torch_coefficients(spec, plan.schedule, t, plan.prev_timesteps)
        self.coefficients = [dict(zip(columns, row)) for row in zip(*(c.tolist() for c in columns.values()))]
        self.draws = [bool(noisy[i]) and spec.adds_noise for i in range(n)]
        self._noise_rows = {}

    def initial_noise(self) -> torch.Tensor:
        """z_T (flat, fp32): stream T at the run's element offset, drawn in one call with the
        first steps' noise."""
        self._draw(-1)
        return self._noise_rows.pop(-1)

    def noise(self, i: int) -> torch.Tensor:
        """Step i's counter-based noise (flat, fp32): stream t_i at the run's element offset, drawn
        with the next steps' in one call."""
        if i not in self._noise_rows:
            self._draw(i)
        return self._noise_rows.pop(i)

    def _draw(self, i: int):
        """The noise of step i (-1: z_T) and of the next drawing steps, NOISE_CHUNK normals in all."""
        numel = self.shape.numel()
        rows_per_call = max(1, self.NOISE_CHUNK // numel)
        drawing = (j for j in range(max(i, 0), len(self.draws)) if self.draws[j])
        first = [-1] if i < 0 else []
        upcoming = first + list(itertools.islice(drawing, rows_per_call - len(first)))
        streams = [self.plan.num_train_timesteps if j < 0 else int(self.plan.timesteps[j]) for j in upcoming]
        rows = ref_random.normals(numel, seed=self.seed, stream=torch.tensor(streams, device=self.device),
                                  offset=self.element_offset, device=self.device, dtype=torch.float32)
        self._noise_rows = dict(zip(upcoming, rows))

    def __call__(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, noise) -> torch.Tensor:
        """x_{s_i} from x_{t_i} = ``sample`` and the model output (noise: a tensor like the sample, or
        None for the counter-based stream): ``fastgen.ops.diffusion.torch_update`` on this step's
        precomputed coefficients."""
        from fastgen.ops.diffusion import torch_update

        z = self._noise(i, noise) if self.draws[i] else None
        prev, _ = torch_update(self.plan.spec, self.coefficients[i], model_output, sample, z)
        return prev.to(sample.dtype)

    def _noise(self, i, noise):
        return (noise.float() if noise is not None else self.noise(i)).reshape(self.shape)


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
        raise ValueError(f"model output must have shape {tuple(expected)} (the sample's"
                         f"{', with 2x channels for a learned variance' if expected[1:] else ''}), "
                         f"got {tuple(pred.shape)}")
    if pred.dtype != dtype:
        raise ValueError(f"model output must have the sampling dtype {dtype} (pass dtype= to match the model), "
                         f"got {pred.dtype}")
    if pred.device != device:
        raise ValueError(f"model output must be on the sampling device {device}, got {pred.device}")


# --- the loop --------------------------------------------------------------------------------------

def sample(model, shape, scheduler, *, num_inference_steps=None, seed=0, offset=0, generator=None, device=None,
           dtype=torch.float32, cuda_graph="auto", progress=False, return_trajectory=False, eta=0.0,
           backend="auto"):
    """Draw samples with ``model`` and a DDPM/DDIM scheduler (see the module docstring for the loop).

    Args:
        model: callable ``model(x_t, t) -> prediction`` (a tensor, or a diffusers output with ``.sample``),
            x_t [B, ...] in ``dtype``, t an int64 tensor [B] on the device; the prediction is what
            ``scheduler.config.prediction_type`` says, shaped like x_t (2x channels on dim 1 for a
            learned variance).
        shape: the batch shape [B, ...].
        scheduler: diffusers' or fastgen.schedulers' DDPMScheduler / DDIMScheduler; its config gives
            the schedule and the step, its ``set_timesteps(num_inference_steps)`` the timesteps
            (called here, as diffusers' pipelines do).
        num_inference_steps: default: every training timestep for DDPM, 50 for DDIM.
        seed: 64-bit int of the counter-based noise (None: drawn from torch's default generator).
        offset: non-negative int, counted in samples: sample b of this call is sample offset + b of
            the stream, so shards with offsets reproduce one large batch.
        generator: diffusers parity noise instead of the counter-based stream (see the module
            docstring); offset must then be 0.
        device: default: the model's parameters' device, else the CPU.
        dtype: of x_t, the model input and the result.
        cuda_graph: "auto" (CUDA device and Triton backend), True (error without CUDA) or False.
        progress: show a tqdm bar.
        return_trajectory: also return every x, a [N + 1, *shape] tensor (x_T first).
        eta: DDIM's eta in [0, 1] (0: deterministic after x_T); must be 0 for DDPM.
        backend: "auto" (Triton on CUDA, "torch" elsewhere), "triton" (the fused kernels), "torch" (the
            same update in whole-tensor torch ops, coefficients precomputed: the fast loop on a CPU) or
            "reference" (every step through fastgen.reference.diffusion in float64: the slow loop
            the others are checked against).
    Returns x_0 in ``dtype`` (and the trajectory).
    """
    sampler = Sampler(model, shape, scheduler, num_inference_steps=num_inference_steps, seed=seed, offset=offset,
                      generator=generator, device=device, dtype=dtype, cuda_graph=cuda_graph, eta=eta,
                      backend=backend)
    return sampler(progress=progress, return_trajectory=return_trajectory)


class Sampler:
    """``fastgen.sample`` prepared once (arguments as there) and run by calling it: the checks, the
    schedule, the device timesteps and, on CUDA, the captured graph are made on the first call and
    reused by every later one, so repeated sampling pays the capture once. With ``seed`` every call
    returns the same samples; with ``generator`` every call draws on from it, as diffusers does.

        sampler = fastgen.sampling.Sampler(model, (64, 1, 8, 8), scheduler, num_inference_steps=50, seed=0)
        x = sampler()                       # captures (CUDA), then replays 50 times
        x = sampler(progress=True)          # replays only
    """

    def __init__(self, model, shape, scheduler, *, num_inference_steps=None, seed=0, offset=0, generator=None,
                 device=None, dtype=torch.float32, cuda_graph="auto", eta=0.0, backend="auto"):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
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
        backend = resolve_backend(backend, device)
        if cuda_graph is True and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got device {device}")
        if cuda_graph is True and backend != "triton":
            raise ValueError("cuda_graph=True needs backend 'triton' (the torch and reference loops step on the host), "
                             f"got backend {backend!r}")
        seed = _checks.seed64(seed) if generator is None else None
        plan = _Plan(scheduler, num_inference_steps, eta)
        if plan.spec.learned_variance and len(shape) < 2:
            raise ValueError(f"shape needs a channel dimension (dim 1) for variance_type={plan.spec.variance_type!r}, "
                             f"got {tuple(shape)}")
        self.cuda_graph, self.backend = cuda_graph, backend
        self.use_graph = cuda_graph is not False and device.type == "cuda" and backend == "triton"
        self.loop = _Loop(model, shape, plan, seed=seed, offset=offset, generator=generator, device=device,
                          dtype=dtype, backend=backend)
        self.num_inference_steps = plan.num_inference_steps
        self.timesteps = plan.timesteps

    @property
    def captured(self) -> bool:
        """Whether the loop runs as a CUDA graph (after the first call)."""
        return self.loop.graph is not None

    def __call__(self, *, progress=False, return_trajectory=False):
        loop = self.loop
        with torch.no_grad():
            if self.use_graph and loop.graph is None:
                try:
                    loop.capture()
                except Exception as err:  # noqa: BLE001  (any capture failure: fall back or re-raise)
                    if self.cuda_graph is True:
                        raise RuntimeError(f"cuda_graph=True: capturing the model and step failed ({err}); "
                                           "pass cuda_graph=False for a model that cannot be captured") from err
                    warnings.warn(f"fastgen.sample: CUDA graph capture failed ({err}); running the eager loop",
                                  RuntimeWarning, stacklevel=3)
                    loop.graph, self.use_graph = None, False
            return loop.run(progress, return_trajectory)


class _Loop:
    """The sampling loop's state and step, run eagerly or as a captured CUDA graph."""

    def __init__(self, model, shape, plan, *, seed, offset, generator, device, dtype, backend):
        self.model, self.shape, self.plan = model, shape, plan
        self.seed, self.generator, self.device, self.dtype = seed, generator, device, dtype
        self.backend = backend
        self.host_timesteps = backend == "reference"  # the reference step takes host ints
        self.offset = offset  # in samples: what ops.randn takes
        self.element_offset = _checks.sample_offset(offset, shape)  # in elements: what the step takes
        self.torch_steps = None
        if backend == "torch":
            self.torch_steps = _TorchSteps(plan, shape, seed=seed, element_offset=self.element_offset, device=device)
        self.expected = plan.spec.model_output_shape(shape)
        # Every sample steps from the same t, so the step may read the batch as one [1, B * n] sample:
        # element g of sample b is flat element b * n + g either way, with the same noise counter
        # element_offset + b * n + g. Not with dynamic thresholding (a quantile per sample) or a learned
        # variance (channels split per sample). An offset in samples of that one long sample would
        # count B * n elements per unit, so the step goes through the ops' internal entry, which takes
        # the element offset (fastgen.ops.diffusion._step), not through ddpm_step / ddim_step.
        self.flat = not plan.spec.thresholding and not plan.spec.learned_variance
        self.timesteps = plan.timesteps.to(device)
        self.prev_timesteps = plan.prev_timesteps.to(device)
        self.graph = self.counter = self.x = None
        self.noise = None
        if generator is not None and any(plan.generator_draws(i) for i in range(plan.num_inference_steps)):
            self.noise = torch.zeros(shape, dtype=dtype, device=device)

    def _initial_noise(self):
        """x_T = init_noise_sigma z_T: stream T (counter-based) or the generator (diffusers' order)."""
        if self.generator is not None:
            x = _diffusers_noise(self.shape, self.generator, self.device, self.dtype)
        elif self.torch_steps is not None:
            x = self.torch_steps.initial_noise().reshape(self.shape).to(self.dtype)
        else:
            x = ops.randn(self.shape, seed=self.seed, stream=self.plan.num_train_timesteps,
                          offset=self.offset, device=self.device, dtype=self.dtype, backend=self.backend)
        return x * self.plan.init_noise_sigma if self.plan.init_noise_sigma != 1.0 else x.contiguous()

    def predict(self, x, t_model):
        """The model's checked prediction at x_t; t_model: the model's [B] timesteps."""
        pred = _prediction(self.model(x, t_model))
        _check_prediction(pred, self.expected, self.dtype, self.device)
        return pred

    def step(self, x, t, prev_t, t_model, noise):
        """x_{prev_t} from x_t: the model call, then the fused (or reference) step. t, prev_t: device
        tensors of shape [] (or host ints for the reference); t_model: the model's [B] timesteps."""
        pred = self.predict(x, t_model)
        if self.flat:  # one timestep for the batch: the same counters as [B, n], in fewer, larger programs
            pred, x, noise = (None if v is None else v.reshape(1, -1) for v in (pred, x, noise))
        # ddpm_step / ddim_step with the plan's spec, the offset given in elements (see __init__)
        prev, _ = diffusion_ops._step(self.plan.spec, pred, t, prev_t, x, self.plan.schedule,
                                      seed=self.seed if noise is None else None, noise=noise,
                                      offset=self.element_offset, return_x0=False, backend=self.backend)
        return prev.reshape(self.shape)

    def _draw_step_noise(self, i):
        if self.noise is not None and self.plan.generator_draws(i):
            self.noise.copy_(_diffusers_noise(self.shape, self.generator, self.device, self.dtype))

    def capture(self):
        """Warm up (compile, autotune, allocate) on a side stream, then capture one step into a CUDA
        graph on static buffers (x, the step counter, the noise): the step reads t_i, s_i from the
        device tables at the counter, writes x_{s_i} into x and advances the counter."""
        batch = self.shape[0]
        self.x = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.counter = counter = torch.zeros(1, dtype=torch.int64, device=self.device)

        def body():
            t = self.timesteps.index_select(0, counter).reshape(())
            prev_t = self.prev_timesteps.index_select(0, counter).reshape(())
            self.x.copy_(self.step(self.x, t, prev_t, t.expand(batch), self.noise))
            counter.add_(1)

        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # results discarded: x and the counter are not advanced
                t, prev_t = self.timesteps[0], self.prev_timesteps[0]
                self.step(self.x, t, prev_t, t.expand(batch), self.noise)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        self.graph = graph

    def run(self, progress: bool, return_trajectory: bool):
        from tqdm.auto import tqdm

        plan, batch = self.plan, self.shape[0]
        x = self._initial_noise()
        if self.graph is not None:
            self.x.copy_(x)
            self.counter.zero_()
            x = self.x
        trajectory = None
        if return_trajectory:
            trajectory = torch.empty((plan.num_inference_steps + 1, *self.shape), dtype=self.dtype, device=self.device)
            trajectory[0].copy_(x)
        for i in tqdm(range(plan.num_inference_steps), disable=not progress, desc=f"{plan.kind} sampling",
                      dynamic_ncols=True):
            self._draw_step_noise(i)
            if self.graph is not None:
                self.graph.replay()
            elif self.torch_steps is not None:
                x = self.torch_steps(i, self.predict(x, self.timesteps[i].expand(batch)), x, self.noise)
            else:
                t_dev = self.timesteps[i]
                if self.host_timesteps:  # host ints: no device sync on their way in
                    t, prev_t = int(plan.timesteps[i]), int(plan.prev_timesteps[i])
                else:
                    t, prev_t = t_dev, self.prev_timesteps[i]
                x = self.step(x, t, prev_t, t_dev.expand(batch), self.noise)
            if trajectory is not None:
                trajectory[i + 1].copy_(x)
        if self.graph is not None:
            x = x.clone()  # the static buffer is overwritten by the next call
        return (x, trajectory) if return_trajectory else x
