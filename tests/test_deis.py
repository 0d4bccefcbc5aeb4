"""DEISMultistepScheduler: the fused step against the float64 reference (fastgen/reference/deis.py, the
integrals by quadrature; the kernel in the interpreter on a CPU), against diffusers' own step, diffusers'
asserted values, and the configuration that runs diffusers' step."""
import diffusers
import pytest
import torch

import fastgen.schedulers as fs
from fastgen.step_table import step_table
from tests.sigma_utils import (SHAPE, assert_abs_sum_mean, assert_sample_matches_reference, assert_trajectories_agree,
                               diffusers_full_loop, fresh_sample, scheduler_pair, step_by_step)

# (scheduler config, inference steps, tolerance against diffusers relative to the largest operand)
SWEEP = {
    "order 2": ({}, 10, 1e-5),
    "order 1": (dict(solver_order=1), 6, 1e-5),
    "lower_order_final off": (dict(lower_order_final=False), 7, 1e-5),
    "karras v_prediction": (dict(prediction_type="v_prediction", use_karras_sigmas=True), 20, 1e-5),
    "exponential sample": (dict(prediction_type="sample", use_exponential_sigmas=True), 8, 1e-5),
    "thresholding trailing": (dict(thresholding=True, sample_max_value=2.0, timestep_spacing="trailing"), 8, 1e-5),
    # diffusers forms alpha = 1 - sigma in float32 at sigma near 1 (the first step): its own error is ~1e-4
    "flow sigmas": (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), 9, 1e-4),
}


def _pair(case, backend):
    config, steps, _ = SWEEP[case]
    return scheduler_pair("DEISMultistepScheduler", config, steps, backend)


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
    tolerance = SWEEP[case][2]
    step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)), rtol=tolerance,
                 atol=tolerance, with_generator=False)


def test_third_order_runs_diffusers_step():
    ours, theirs = fs.DEISMultistepScheduler(solver_order=3), diffusers.DEISMultistepScheduler(solver_order=3)
    assert "solver_order must be one of 1, 2" in ours.fused_config
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0,
                 with_generator=False)


# diffusers' own test (tests/schedulers/test_scheduler_deis.py): 10 steps of its dummy model from its
# deterministic sample; (config changes, loop keywords, |x| sum or None, |x| mean)
DIFFUSERS_VALUES = {
    "no noise": ({}, {}, None, 0.23916),
    "v_prediction": (dict(prediction_type="v_prediction"), {}, None, 0.091),
    "with noise": ({}, dict(start=8), 315.3016, 0.41054),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    config, loop, *values = DIFFUSERS_VALUES[case]
    scheduler = fs.DEISMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                          beta_schedule="linear", solver_order=2, **config, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler, **loop), *values)


def test_saved_scheduler_reloads_as_fastgen(tmp_path):
    fs.DEISMultistepScheduler(solver_order=1).save_pretrained(tmp_path)
    reloaded = fs.DEISMultistepScheduler.from_pretrained(tmp_path)
    assert type(reloaded) is fs.DEISMultistepScheduler and reloaded.config.solver_order == 1


def test_bad_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'sample', 'v_prediction', "
                                         "'flow_prediction', got 'noise'"):
        fs.DEISMultistepScheduler(prediction_type="noise")


def test_sample_runs_deis():
    assert_sample_matches_reference("deis", 8)
