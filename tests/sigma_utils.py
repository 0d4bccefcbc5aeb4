"""Helpers for the sigma-space samplers' tests (test_karras.py, test_dpm_solver.py, test_flow_matching.py):
whole trajectories on a StepTable (fused step or float64 reference, with the same counter noise) and
fastgen's scheduler against diffusers' own, step by step, from the same generator. Every helper runs
on the session's device (tests/conftest.py's DEVICE): the kernels compiled on a GPU, interpreted on a
CPU; inputs may be made on the CPU (from CPU generators, as diffusers' pipelines draw them). And the
loop of diffusers' own full-loop tests (its dummy model from its deterministic sample), whose asserted
values the tests of each drop-in scheduler assert too."""
import math

import torch

from fastgen.ops.samplers import reference_previous, sampler_step, step_noise
from tests.conftest import DEVICE
from tests.utils import assert_close

SHAPE = (2, 3, 8, 8)
# the config of diffusers' tests of Euler, Euler ancestral, LMS, Heun, KDPM2, KDPM2 ancestral and DPM-SDE
DIFFUSERS_TEST_CONFIG = dict(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def scheduler_pair(name, config, steps, backend):
    """(fastgen's scheduler ``name``, diffusers' own) on ``config``, both after ``set_timesteps(steps)``."""
    import diffusers

    import fastgen.schedulers as fs

    ours, theirs = getattr(fs, name)(**config, backend=backend), getattr(diffusers, name)(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    return ours, theirs


def toy_model(x, t):
    """A smooth, bounded stand-in for a denoiser: F = 0.9 x + 0.1 sin(3 x + t / 1000) (any dtype)."""
    t = float(t)
    return 0.9 * x + 0.1 * torch.sin(3 * x + t / 1000)


def fresh_sample(table, generator, shape=SHAPE):
    """x_N = init_noise_sigma z, z a fresh normal draw (float32)."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * table.init_noise_sigma).float()


def fused_trajectory(table, x, *, seed=0, offset=0, backend="triton", model=toy_model):
    """All of ``table``'s steps from x through ``sampler_step`` (the model sees scale_i x at t_i)."""
    x = x.to(DEVICE)
    kept = None  # the last denoised outputs, kept in place: D', or the ring of the last H
    if table.reads_previous:
        kept = torch.zeros(x.shape if table.history == 1 else (table.history, *x.shape), dtype=x.dtype, device=DEVICE)
    for i in range(table.num_steps):
        m = model(x * float(table.model_input_scales[i]), table.model_timesteps[i]).to(x.dtype)
        x, _ = sampler_step(table, i, m, x, prev_denoised=kept if i else None, denoised_out=kept, seed=seed,
                            offset=offset, backend=backend)
    return x


def reference_trajectory(table, x, *, seed=0, offset=0, model=toy_model):
    """The same trajectory in float64 through the sampler's own equations (``table.reference``), with
    the counter noise the kernel draws (stream i, sample b's element g at counter (offset + b) n + g)."""
    x, previous = x.double(), ()
    n = math.prod(x.shape[1:])
    for i in range(table.num_steps):
        m = model(x * float(table.model_input_scales[i]), table.model_timesteps[i])
        z = (step_noise(table, i, x.shape, seed=seed, offset=offset * n, device=x.device) if table.draws(i)
             else None)
        if table.row(i)["noise_prev"]:  # the previous step's noise again (DPM-Solver SDE's second stage)
            z = (z, step_noise(table, i - 1, x.shape, seed=seed, offset=offset * n, device=x.device))
        x, denoised = table.reference(i, m, x, reference_previous(table, previous), z)
        previous = (denoised, *previous)[:table.history]
    return x


def assert_trajectories_agree(table, x, *, seed, rtol=2e-5, atol=2e-5):
    """The fused kernel's fp32 trajectory equals the float64 reference's to fp32 rounding accumulated
    over the steps (atol relative to the trajectory's scale)."""
    got = fused_trajectory(table, x, seed=seed)
    want = reference_trajectory(table, x, seed=seed)
    assert torch.isfinite(want).all()
    scale = max(1.0, float(want.abs().max()))
    assert_close(got.cpu(), want.float(), rtol=rtol, atol=atol * scale)


def dummy_sample(reverse=False):
    """diffusers' dummy_sample_deter (reverse=True: its dummy_noise_deter, the ramp flipped): the ramp
    k / 768, k = 0 .. 767, laid out [C, H, W, B] = [3, 8, 8, 4] and returned as [B, C, H, W]."""
    values = torch.arange(4 * 3 * 8 * 8)
    values = values.flip(-1) if reverse else values
    return (values.reshape(3, 8, 8, 4) / values.numel()).permute(3, 0, 1, 2)


def dummy_model(sample, t):
    """diffusers' dummy_model: sample t / (t + 1), the timestep broadcast over the batch."""
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *[1] * (sample.dim() - 1)).to(sample.device, sample.dtype)
    return sample * t / (t + 1)


def diffusers_full_loop(scheduler, *, steps=10, start=None, noise=True, scale=None, seed=None, device=DEVICE,
                        **step_kwargs):
    """The loop of diffusers' full-loop tests, on ``device``: set_timesteps(steps), the dummy model from the
    dummy sample. start: begin at timesteps[start * order], the dummy noise added there (noise=False: not).
    scale=None: the sample as it is; "model": scaled by init_noise_sigma, the model fed scale_model_input's
    output; "sample": the same, the sample itself replaced by scale_model_input's output, the step fed that
    too (as diffusers' tests of the Karras-sigma schedulers do). seed: a CPU generator seeded so (the draws
    of diffusers' torch.manual_seed(seed)) given to every step. Returns the final sample."""
    scheduler.set_timesteps(steps, device=device)
    sample, timesteps = dummy_sample().to(device), scheduler.timesteps
    if scale is not None:
        sample = sample * scheduler.init_noise_sigma
    if start is not None:
        timesteps = timesteps[start * scheduler.order:]
        if noise:
            sample = scheduler.add_noise(sample, dummy_sample(reverse=True).to(device), timesteps[:1])
    if seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    for t in timesteps:
        scaled = sample if scale is None else scheduler.scale_model_input(sample, t)
        sample = scaled if scale == "sample" else sample
        sample = scheduler.step(dummy_model(scaled, t), t, sample, **step_kwargs).prev_sample
    return sample


def assert_abs_sum_mean(sample, total, mean, sum_tolerance=1e-2, mean_tolerance=1e-3):
    """diffusers' full-loop assertion: sum |x| and mean |x| within its tolerances (total None: not asserted)."""
    if total is not None:
        assert abs(sample.abs().sum().item() - total) < sum_tolerance, sample.abs().sum().item()
    assert abs(sample.abs().mean().item() - mean) < mean_tolerance, sample.abs().mean().item()


def model_input(scheduler, x, t):
    """What a pipeline feeds the model: ``scale_model_input`` where the scheduler has one (flow matching
    has none: the model sees x)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def step_by_step(ours, theirs, x, *, steps=None, step_kwargs=None, rtol=1e-5, atol=1e-5, seed=0, noise_key=None,
                 model=toy_model, with_generator=True):
    """fastgen's scheduler and diffusers' on the same inputs at every step, with generators seeded alike:
    prev_sample (and pred_original_sample where diffusers returns it) agree to fp32 rounding of the
    largest operand (diffusers' own fp32 sums cancel where x is large and x_i+1 small). Both go
    on from diffusers' output, so errors do not compound. with_generator=False: for the steps that
    take no generator (Heun, KDPM2). Returns diffusers' final sample."""
    step_kwargs, x = step_kwargs or {}, x.to(DEVICE)
    g_ours, g_theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    timesteps = list(theirs.timesteps) if steps is None else list(theirs.timesteps)[:steps]
    for t_ours, t_theirs in zip(ours.timesteps, timesteps):
        m = model(model_input(theirs, x, t_theirs), t_theirs)
        assert_close(model_input(ours, x, t_ours), model_input(theirs, x, t_theirs), rtol=1e-6, atol=1e-6)
        generators = ({"generator": g_ours}, {"generator": g_theirs}) if with_generator else ({}, {})
        got = ours.step(m, t_ours, x, **generators[0], **step_kwargs)
        want = theirs.step(m, t_theirs, x, **generators[1], **step_kwargs)
        scale = max(1.0, float(want.prev_sample.abs().max()), float(x.abs().max()))  # fp32 rounding of the operands
        assert_close(got.prev_sample, want.prev_sample, rtol=rtol, atol=atol * scale)
        if getattr(want, "pred_original_sample", None) is not None:
            assert_close(got.pred_original_sample, want.pred_original_sample.to(got.pred_original_sample.dtype),
                         rtol=rtol, atol=atol * scale)
        x = want.prev_sample
    return x


def seeded_loop(scheduler, x, *, seed, offset=0, step_kwargs=None, model=toy_model):
    """A pipeline's loop on ``scheduler`` with fastgen's counter noise (``step(..., seed=, offset=)``)."""
    x = x.to(DEVICE)
    for t in scheduler.timesteps:
        m = model(model_input(scheduler, x, t), t)
        x = scheduler.step(m, t, x, seed=seed, offset=offset, **(step_kwargs or {})).prev_sample
    return x


def assert_batch_invariant(make_scheduler, x, *, seed, step_kwargs=None):
    """Sample k stepped alone with offset=k equals sample k of the whole batch, for every k."""
    whole = seeded_loop(make_scheduler(), x, seed=seed, step_kwargs=step_kwargs)
    assert torch.isfinite(whole).all()
    for k in range(x.shape[0]):
        alone = seeded_loop(make_scheduler(), x[k:k + 1], seed=seed, offset=k, step_kwargs=step_kwargs)
        torch.testing.assert_close(alone, whole[k:k + 1], rtol=0, atol=0)


class TanhModel(torch.nn.Module):
    """A bounded stand-in denoiser for ``fastgen.sample`` (called as model(x, t))."""

    def forward(self, x, t, class_labels=None):
        return 0.5 * torch.tanh(x)


def assert_sample_matches_reference(kind, steps, *, shape=(2, 8), seed=3):
    """``fastgen.sample`` with the sampler ``kind`` (fastgen.registry's name): the torch loop equals the
    float64 reference loop to fp32 rounding."""
    import fastgen

    scheduler = fastgen.sampling.make_scheduler(kind)
    fast = fastgen.sample(TanhModel(), shape, scheduler, num_inference_steps=steps, seed=seed, backend="torch")
    ref = fastgen.sample(TanhModel(), shape, scheduler, num_inference_steps=steps, seed=seed, backend="reference")
    torch.testing.assert_close(fast, ref.float(), rtol=1e-5, atol=1e-5)
