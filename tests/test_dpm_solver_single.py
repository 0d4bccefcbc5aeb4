"""DPMSolverSinglestepScheduler: the fused step against the float64 reference (2S from the pair's
start, fastgen/reference/dpm_solver.py; the kernel in the interpreter), against diffusers' own step,
the configurations that run diffusers' step, and diffusers' asserted values."""
import diffusers
import pytest
import torch

import fastgen.schedulers as fs
from fastgen.step_table import step_table
from tests.sigma_utils import (SHAPE, assert_abs_sum_mean, assert_sample_matches_reference, assert_trajectories_agree,
                               diffusers_full_loop, fresh_sample, scheduler_pair, step_by_step)

# (scheduler config, inference steps)
SWEEP = {
    "2S midpoint": ({}, 10),
    "2S heun v_prediction": (dict(solver_type="heun", prediction_type="v_prediction"), 7),
    "lower_order_final odd": (dict(lower_order_final=True), 9),
    "karras sigma_min": (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), 8),
    "thresholding": (dict(thresholding=True, sample_max_value=2.0), 6),
    "order 1": (dict(solver_order=1), 5),
}


def _pair(case, backend):
    return scheduler_pair("DPMSolverSinglestepScheduler", *SWEEP[case], backend)


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs = _pair(case, "torch")
    table = step_table(theirs)
    assert table.reads_previous == (SWEEP[case][0].get("solver_order", 2) == 2)
    assert_trajectories_agree(table, fresh_sample(table, torch.Generator().manual_seed(len(case))), seed=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers_to_fp32_rounding(case, backend):
    ours, theirs = _pair(case, backend)
    step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)), rtol=1e-5, atol=2e-6)


def test_sde_and_third_order_run_diffusers_step():
    for config in (dict(algorithm_type="sde-dpmsolver++"), dict(solver_order=3)):
        ours, theirs = fs.DPMSolverSinglestepScheduler(**config), diffusers.DPMSolverSinglestepScheduler(**config)
        assert ours.fused_config is not None
        ours.set_timesteps(6)
        theirs.set_timesteps(6)
        step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)


# diffusers' own test (tests/schedulers/test_scheduler_dpm_single.py): its dummy model from its deterministic sample,
# with final_sigmas_type="sigma_min" (the rest of its config is the defaults); test_switch asserts the no-noise
# value again. (config changes, loop keywords, |x| sum or None, |x| mean)
DIFFUSERS_VALUES = {
    "no noise": ({}, {}, None, 0.2791),
    "karras": (dict(use_karras_sigmas=True), {}, None, 0.2248),
    "v_prediction": (dict(prediction_type="v_prediction"), {}, None, 0.1453),
    "karras v_prediction": (dict(prediction_type="v_prediction", use_karras_sigmas=True), {}, None, 0.0649),
    "with noise": ({}, dict(start=5), 269.2187, 0.3505),
    # 50 steps begun at timesteps[3], without noise: the second step of a pair, which diffusers takes at first order
    "uneven loop": ({}, dict(steps=50, start=3, noise=False), None, 0.2574),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    config, loop, *values = DIFFUSERS_VALUES[case]
    scheduler = fs.DPMSolverSinglestepScheduler(final_sigmas_type="sigma_min", **config, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler, **loop), *values)


def test_sample_runs_singlestep():
    assert_sample_matches_reference("dpmsolver++_singlestep", 6)
