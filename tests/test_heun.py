"""HeunDiscreteScheduler: both stages fused, against the float64 reference (fastgen/reference/karras.py's
heun_stage; the kernel in the interpreter), against diffusers' own step (prev_sample and
pred_original_sample) in a pipeline's loop and with another sample given to the second stage, in
fastgen.sample, and diffusers' asserted values."""
import pytest
import torch

import fastgen.schedulers as fs
from fastgen.step_table import step_table
from tests.sigma_utils import (DIFFUSERS_TEST_CONFIG, SHAPE, assert_abs_sum_mean, assert_sample_matches_reference,
                               assert_trajectories_agree, diffusers_full_loop, fresh_sample, scheduler_pair,
                               step_by_step)

# (scheduler config, inference steps)
SWEEP = {
    "epsilon": ({}, 6),
    "v_prediction karras": (dict(prediction_type="v_prediction", use_karras_sigmas=True), 5),
    "sample clip": (dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.8), 4),
    "trailing": (dict(timestep_spacing="trailing"), 3),
    "one step": ({}, 1),
}


def _pair(case, backend):
    return scheduler_pair("HeunDiscreteScheduler", *SWEEP[case], backend)


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs = _pair(case, "torch")
    table = step_table(theirs)
    assert table.num_steps == 2 * SWEEP[case][1] - 1
    assert_trajectories_agree(table, fresh_sample(table, torch.Generator().manual_seed(len(case))), seed=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers_to_fp32_rounding(case, backend):
    ours, theirs = _pair(case, backend)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * theirs.init_noise_sigma
    step_by_step(ours, theirs, x, rtol=1e-5, atol=2e-6, with_generator=False)
    assert ours.state_in_first_order == theirs.state_in_first_order


def test_second_stage_at_another_sample_is_diffusers():
    """diffusers' corrector steps from the first stage's stored start, whatever sample the second call
    gets: the half step H carries it (here the second call gets the first stage's output rescaled)."""
    ours, theirs = _pair("epsilon", "torch")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * theirs.init_noise_sigma
    y = x.clone()
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        x = ours.scale_model_input(x, t_ours)
        y = theirs.scale_model_input(y, t_theirs)
        x = ours.step(0.8 * x, t_ours, x).prev_sample
        y = theirs.step(0.8 * y, t_theirs, y).prev_sample
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# diffusers' own test (tests/schedulers/test_scheduler_heun.py): 10 steps of its dummy model from its deterministic
# sample times init_noise_sigma, the sample replaced by scale_model_input's output each step (the model and the step
# get that); its full_loop_device tests repeat the no-noise and karras loops on the device. (config changes, loop
# keywords, |x| sum, |x| mean[, sum tolerance, mean tolerance])
DIFFUSERS_VALUES = {
    "no noise": ({}, {}, 0.1233, 0.0002),
    "v_prediction": (dict(prediction_type="v_prediction"), {}, 4.6934e-07, 6.1112e-10),
    "karras sigmas": (dict(use_karras_sigmas=True), {}, 0.00015, 1.9869554535034695e-07, 1e-2, 1e-2),
    "with noise": ({}, dict(start=8), 75074.8906, 97.7538),  # from timesteps[8 * order]
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    config, loop, *values = DIFFUSERS_VALUES[case]
    scheduler = fs.HeunDiscreteScheduler(**DIFFUSERS_TEST_CONFIG, **config, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler, scale="sample", **loop), *values)


def test_sample_runs_heun():
    assert_sample_matches_reference("heun", 5)
