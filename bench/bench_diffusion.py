"""Benchmarks of the diffusion ops of kernels/diffusion.py: ``fastgen.q_sample``, ``fastgen.ddpm_step``
and ``fastgen.ddim_step``, against diffusers' schedulers on the same tensors.

    q_sample        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                     (Ho et al. eq. 4)
    ddpm_step       x_{t-1} = mu~_t(x0_hat, x_t) + sigma_t z, x0_hat clipped to [-1, 1]  (eqs. 6-7, 15)
    ddim_step       x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z
                                                                                 (Song et al. eqs. 12, 16)

Ops (``--ops diffusion`` selects them all); the schedule is diffusers' default (linear betas
1e-4 .. 0.02, T = 1000), the same as ``fastgen.NoiseSchedule()``:

    q_sample        per-sample timesteps t ~ U{0..999} (an int64 [B] tensor, as in training), eps in-kernel
    ddpm_step       t = 500 -> 499, prediction_type="epsilon", variance_type="fixed_small", clip_sample=True
    ddim_step_eta0  t = 500 -> 480 (50 inference steps), eta = 0 (deterministic), clip_sample=True
    ddim_step_eta1  the same step with eta = 1 (noise z drawn)

Inputs: [B, 4, h, w] tensors of fresh normal data: B = 16 from 2^16 elements up (h x w = size / 64,
as square as a power of two allows), fewer samples below (the quick size is [2, 4, 32, 32]). No backward: these are sampling ops.

Bytes moved (minimal traffic, the harness's default): every tensor input read once + every output
written once. q_sample: x0 and t read, x_t written (2E + 8B bytes). ddpm_step / ddim_step:
model_output and sample read, prev_sample and pred_original_sample written (4E). Noise drawn in the
kernel is not traffic; a provider that materialises it (diffusers) pays for it in its time.

Providers: fastgen (backend="triton"), the eager reference (backend="torch": fastgen's float64
reference, which draws the same counter-based noise as the kernel), torch.compile of that reference,
and diffusers (when installed):
- q_sample: ``noise = torch.randn_like(x0); DDPMScheduler.add_noise(x0, noise, t)``, as diffusers'
  training scripts do;
- ddpm_step: ``DDPMScheduler.step(model_output, t, sample, generator=g)``; ddim_step:
  ``DDIMScheduler.step(model_output, t, sample, eta=eta, generator=g)`` after ``set_timesteps(50)``.
  The step draws its own noise ``z`` with ``randn_tensor(generator=g)`` (a torch Philox stream, not
  fastgen's), so its prev_sample differs from fastgen's by the noise; the arithmetic is the same. The
  schedulers are built once, outside the timed call; diffusers keeps its tables in fp32 on the CPU.
On CPU (no GPU) the report runs the reference against diffusers (fastgen's kernels run there only
in the Triton interpreter, in ``--quick``).
"""
import functools
import importlib.util

import torch

import fastgen
from fastgen.bench import compiled, fastgen as fastgen_provider, peer, pytest_benchmarks, random_tensor, reference, register
from fastgen.bench.registry import Op

SCHEDULE = fastgen.NoiseSchedule()  # linear, T = 1000: diffusers' default
SEED = 0xD1FF_5EED                  # one seed for every input set: torch.compile specialises on Python ints
DDPM_T = 500
DDIM_T, DDIM_STEPS = 500, 50
DDIM_PREV_T = DDIM_T - SCHEDULE.num_train_timesteps // DDIM_STEPS  # 480, as diffusers steps
BATCH, CHANNELS, SAMPLE_PIXELS = 16, 4, 1024  # [16, 4, 32, 32] at the smallest full size
SIZES = [1 << k for k in range(16, 29, 2)]  # 64K .. 256M elements
QUICK_SIZES = [1 << 13]  # [2, 4, 32, 32]: two samples, distinct timesteps
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def image_shape(size):
    """[B, 4, h, w]: B = 16 from 64K elements up (fewer below: the interpreter's cost is per sample),
    h * w = size / (4 B), h the largest power of two <= sqrt(h * w) dividing it."""
    batch = min(BATCH, max(1, size // (CHANNELS * SAMPLE_PIXELS)))
    pixels, rest = divmod(size, batch * CHANNELS)
    if rest or pixels == 0:
        raise ValueError(f"sizes of the diffusion ops must be multiples of {batch * CHANNELS} "
                         f"(a [{batch}, {CHANNELS}, h, w] batch), got {size}")
    h = 1
    while (2 * h) ** 2 <= pixels and pixels % (2 * h) == 0:
        h *= 2
    return (batch, CHANNELS, h, pixels // h)


def q_sample_inputs(size, dtype, device, generator):
    shape = image_shape(size)
    t = torch.randint(0, SCHEDULE.num_train_timesteps, (shape[0],), generator=generator, device=device)
    return {"x0": random_tensor(shape, dtype, device, generator), "t": t}


def step_inputs(size, dtype, device, generator):
    """model_output (an eps prediction) ~ N(0, 1) and sample x_t ~ N(0, 1)."""
    shape = image_shape(size)
    return {"model_output": random_tensor(shape, dtype, device, generator),
            "sample": random_tensor(shape, dtype, device, generator)}


@functools.cache
def _diffusers_scheduler(kind, device_type):
    """A diffusers scheduler with diffusers' defaults, one per use and device type: add_noise moves its
    table to the device, while step reads it on the CPU as a pipeline's scheduler does."""
    import diffusers

    if kind in ("add_noise", "ddpm"):
        return diffusers.DDPMScheduler(num_train_timesteps=SCHEDULE.num_train_timesteps)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=SCHEDULE.num_train_timesteps)
    scheduler.set_timesteps(DDIM_STEPS)
    return scheduler


@functools.cache
def _generator(device):
    return torch.Generator(device=device).manual_seed(SEED)


def diffusers_add_noise(x0, t):
    noise = torch.randn_like(x0)
    return _diffusers_scheduler("add_noise", x0.device.type).add_noise(x0, noise, t)


def diffusers_ddpm_step(model_output, sample):
    scheduler = _diffusers_scheduler("ddpm", sample.device.type)
    return scheduler.step(model_output, DDPM_T, sample, generator=_generator(sample.device), return_dict=False)


def diffusers_ddim_step(eta):
    def step(model_output, sample):
        scheduler = _diffusers_scheduler("ddim", sample.device.type)
        return scheduler.step(model_output, DDIM_T, sample, eta=eta, generator=_generator(sample.device),
                              return_dict=False)
    return step


def diffusion_op(name, description, make_inputs, providers, diffusers_fn):
    if HAVE_DIFFUSERS:
        providers = [*providers, peer("diffusers", diffusers_fn)]
    return register(Op(name=name, description=description, providers=providers, make_inputs=make_inputs,
                       sizes=SIZES, dtypes=[torch.float32, torch.bfloat16], quick_sizes=QUICK_SIZES,
                       shape_of=image_shape))


def q_sample_with(backend):
    return lambda x0, t: fastgen.q_sample(x0, t, SCHEDULE, seed=SEED, backend=backend)


Q_SAMPLE = diffusion_op(
    "q_sample", "x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per-sample t, eps drawn in the kernel",
    q_sample_inputs,
    [fastgen_provider(q_sample_with("triton")), reference(q_sample_with("torch")), compiled(q_sample_with("torch"))],
    diffusers_add_noise)


def ddpm_step_with(backend):
    return lambda model_output, sample: fastgen.ddpm_step(model_output, DDPM_T, sample, SCHEDULE, seed=SEED,
                                                          backend=backend)


DDPM_STEP = diffusion_op(
    "ddpm_step", f"DDPM step t = {DDPM_T} -> {DDPM_T - 1}: epsilon, fixed_small, clip_sample",
    step_inputs,
    [fastgen_provider(ddpm_step_with("triton")), reference(ddpm_step_with("torch")), compiled(ddpm_step_with("torch"))],
    diffusers_ddpm_step)


def ddim_step_with(backend, eta):
    return lambda model_output, sample: fastgen.ddim_step(model_output, DDIM_T, DDIM_PREV_T, sample, SCHEDULE, eta=eta,
                                                          seed=SEED, backend=backend)


def ddim_op(name, eta):
    return diffusion_op(
        name, f"DDIM step t = {DDIM_T} -> {DDIM_PREV_T}: eta = {eta}, epsilon, clip_sample", step_inputs,
        [fastgen_provider(ddim_step_with("triton", eta)), reference(ddim_step_with("torch", eta)),
         compiled(ddim_step_with("torch", eta))],
        diffusers_ddim_step(eta))


DDIM_STEP_ETA0 = ddim_op("ddim_step_eta0", 0.0)
DDIM_STEP_ETA1 = ddim_op("ddim_step_eta1", 1.0)

test_q_sample = pytest_benchmarks(Q_SAMPLE)
test_ddpm_step = pytest_benchmarks(DDPM_STEP)
test_ddim_step_eta0 = pytest_benchmarks(DDIM_STEP_ETA0)
test_ddim_step_eta1 = pytest_benchmarks(DDIM_STEP_ETA1)
