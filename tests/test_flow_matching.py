"""Flow-matching Euler (fastgen/reference/flow_matching.py, fastgen/schedulers/flow_match.py): the fused
step against the float64 reference over whole trajectories (stochastic sampling with the same counter
noise), fastgen's class against diffusers' step by step to fp32 rounding over shifts, dynamic
shifting and sigma options, batch invariance with seed=, diffusers' per-token step, bad input and
save/load in a pipeline."""
import json

import diffusers
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from fastgen.schedulers._sigma import step_table
from tests.sigma_utils import SHAPE, assert_batch_invariant, assert_trajectories_agree, fresh_sample, step_by_step

# (scheduler config, set_timesteps keywords)
SWEEP = {
    "plain": ({}, {}),
    "shift 3 (SD3)": (dict(shift=3.0), {}),
    "dynamic exponential (FLUX)": (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), dict(mu=0.8)),
    "dynamic linear terminal": (dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1),
                                dict(mu=1.3)),
    "karras": (dict(shift=2.0, use_karras_sigmas=True), {}),
    "exponential": (dict(use_exponential_sigmas=True), {}),
    "beta": (dict(use_beta_sigmas=True), {}),
    "invert_sigmas": (dict(invert_sigmas=True), {}),
    "stochastic": (dict(shift=3.0, stochastic_sampling=True), {}),
    "stochastic dynamic": (dict(use_dynamic_shifting=True, stochastic_sampling=True), dict(mu=0.5)),
}


def _pair(config, timesteps_kwargs, backend, steps=5):
    ours = fs.FlowMatchEulerDiscreteScheduler(**config, backend=backend)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    ours.set_timesteps(steps, **timesteps_kwargs)
    theirs.set_timesteps(steps, **timesteps_kwargs)
    return ours, theirs


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    config, timesteps_kwargs = SWEEP[case]
    _, theirs = _pair(config, timesteps_kwargs, "torch")
    table = step_table(theirs)
    assert table.any_draws == bool(config.get("stochastic_sampling"))
    x = fresh_sample(table, torch.Generator().manual_seed(len(case)))
    assert_trajectories_agree(table, x, seed=29)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers_to_fp32_rounding(case, backend):
    config, timesteps_kwargs = SWEEP[case]
    ours, theirs = _pair(config, timesteps_kwargs, backend)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    step_by_step(ours, theirs, x, rtol=1e-6, atol=2e-6)


def test_custom_sigmas_timesteps_and_half_precision_match_diffusers():
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    ours, theirs = fs.FlowMatchEulerDiscreteScheduler(shift=3.0, backend="triton"), \
        diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(sigmas=sigmas)
    theirs.set_timesteps(sigmas=sigmas)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    step_by_step(ours, theirs, x, rtol=1e-6, atol=2e-6)
    timesteps = [999.0, 700.0, 420.0, 90.0]
    ours.set_timesteps(timesteps=timesteps)
    theirs.set_timesteps(timesteps=timesteps)
    step_by_step(ours, theirs, x, rtol=1e-6, atol=2e-6)
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    step_by_step(ours, theirs, x.half(), rtol=1e-3, atol=1e-3)


def test_a_whole_loop_equals_diffusers_loop():
    """A pipeline's loop, each side on its own trajectory (errors may compound): fp32 rounding still."""
    ours, theirs = _pair(dict(shift=3.0), {}, "triton", steps=8)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    x, y = x0.clone(), x0.clone()
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        x = ours.step(-0.7 * x, t_ours, x).prev_sample
        y = theirs.step(-0.7 * y, t_theirs, y).prev_sample
    torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6)


def test_seed_is_batch_invariant():
    def make():
        s = fs.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True, backend="triton")
        s.set_timesteps(4)
        return s

    assert_batch_invariant(make, torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5)), seed=77)


def test_per_token_timesteps_is_diffusers_step():
    ours, theirs = _pair({}, {}, "torch")
    x = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(6))
    per_token = torch.full((1, 6), float(theirs.timesteps[1])) - torch.arange(6.0)
    t = theirs.timesteps[0]
    got = ours.step(0.3 * x, ours.timesteps[0], x, per_token_timesteps=per_token).prev_sample
    want = theirs.step(0.3 * x, t, x, per_token_timesteps=per_token).prev_sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _stepped(config=None, set_kwargs=None, **step_kwargs):
    s = fs.FlowMatchEulerDiscreteScheduler(**(config or {}))
    s.set_timesteps(3, **(set_kwargs or {}))
    x = torch.randn(SHAPE)
    return s.step(x, step_kwargs.pop("timestep", s.timesteps[0]), x, **step_kwargs)


@pytest.mark.parametrize("call, error, match", [
    (lambda: _stepped(timestep=3), ValueError, "Passing integer indices"),
    (lambda: _stepped(seed=1, per_token_timesteps=torch.ones(2, 3)), ValueError, "per_token_timesteps"),
    (lambda: _stepped(dict(stochastic_sampling=True), seed=1, generator=torch.Generator()), ValueError,
     "pass one noise source"),
    (lambda: _stepped(dict(use_dynamic_shifting=True)), ValueError, "`mu` must be passed"),
    (lambda: fs.FlowMatchEulerDiscreteScheduler(time_shift_type="cubic"), ValueError, "'exponential' or 'linear'"),
    (lambda: fs.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True), ValueError,
     "Only one of"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_step_before_set_timesteps_is_refused():
    s = fs.FlowMatchEulerDiscreteScheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, s.timesteps[0], x)


def test_saved_pipeline_reloads_fastgen_scheduler(tmp_path):
    from tests.test_diffusers_parity import tiny_unet

    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=fs.FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == [
        "fastgen", "FlowMatchEulerDiscreteScheduler"]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is fastgen.FlowMatchEulerDiscreteScheduler
    assert loaded.scheduler.config.shift == 3.0
