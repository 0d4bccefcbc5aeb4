"""TCDScheduler: the fused step against the float64 reference (fastgen/reference/tcd.py, the kernel in
the interpreter), against diffusers' own step from the same generator (prev_sample and
pred_noised_sample), counter noise batch-invariant, a timestep off the step index, and diffusers' asserted
values."""
import pytest
import torch

import fastgen.schedulers as fs
from fastgen.step_table import step_table
from tests.sigma_utils import (SHAPE, assert_abs_sum_mean, assert_batch_invariant, assert_sample_matches_reference,
                               assert_trajectories_agree, diffusers_full_loop, fresh_sample, scheduler_pair)
from tests.utils import assert_close

# (scheduler config, set_timesteps steps, gamma)
SWEEP = {
    "epsilon gamma 0.3": ({}, 4, 0.3),
    "epsilon deterministic": ({}, 6, 0.0),
    "v_prediction gamma 0.5": (dict(prediction_type="v_prediction", rescale_betas_zero_snr=True), 4, 0.5),
    "sample gamma 1": (dict(prediction_type="sample", set_alpha_to_one=False), 3, 1.0),
    "one step": ({}, 1, 0.3),
}


def _pair(case, backend):
    config, steps, gamma = SWEEP[case]
    return (*scheduler_pair("TCDScheduler", config, steps, backend), gamma)


def _model(x, t):
    return 0.8 * x + 0.2 * torch.sin(3 * x + float(t) / 1000)


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs, gamma = _pair(case, "torch")
    table = step_table(theirs, eta=gamma)
    assert table.any_draws == (gamma > 0 and len(theirs.timesteps) > 1)
    assert_trajectories_agree(table, fresh_sample(table, torch.Generator().manual_seed(len(case))), seed=41)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers(case, backend):
    ours, theirs, gamma = _pair(case, backend)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    g_ours, g_theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        m = _model(x, t_theirs)
        got = ours.step(m, t_ours, x, eta=gamma, generator=g_ours)
        want = theirs.step(m, t_theirs, x, eta=gamma, generator=g_theirs)
        scale = max(1.0, float(x.abs().max()), float(want.prev_sample.abs().max()))
        assert_close(got.prev_sample, want.prev_sample, rtol=1e-5, atol=2e-6 * scale)
        assert_close(got.pred_noised_sample, want.pred_noised_sample, rtol=1e-5, atol=2e-6 * scale)
        x = want.prev_sample


def test_seed_is_batch_invariant():
    def make():
        s = fs.TCDScheduler(backend="triton")
        s.set_timesteps(4)
        return s

    assert_batch_invariant(make, torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5)), seed=79)


def test_gamma_outside_the_unit_interval_is_refused():
    scheduler = fs.TCDScheduler()
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="eta .* must be a number in \\[0, 1\\]"):
        scheduler.step(torch.zeros(SHAPE), scheduler.timesteps[0], torch.zeros(SHAPE), eta=1.5)


# diffusers' own test (tests/schedulers/test_scheduler_tcd.py): its dummy model from its deterministic sample, the
# config the defaults, every step given gamma (eta) = 0 and a generator seeded 0: with gamma 0 nothing is drawn,
# and the test asserts no value for gamma > 0. (loop keywords, |x| sum, |x| mean, sum tolerance)
DIFFUSERS_VALUES = {
    "onestep deter": (dict(steps=1), 29.8715, 0.0389, 1e-3),
    "multistep deter": (dict(steps=10), 181.2040, 0.2359, 1e-3),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    loop, *values = DIFFUSERS_VALUES[case]
    sample = diffusers_full_loop(fs.TCDScheduler(backend=backend), eta=0.0, seed=0, **loop)
    assert_abs_sum_mean(sample, *values)


def test_sample_runs_tcd():
    assert_sample_matches_reference("tcd", 4)
