"""UniPCMultistepScheduler: the fused corrector-predictor step against the float64 reference
(fastgen/reference/unipc.py; the kernel in the interpreter on a CPU), against diffusers' own step,
diffusers' asserted values, and the configurations that run diffusers' step."""
import diffusers
import pytest
import torch

import fastgen.schedulers as fs
from fastgen.reference import unipc
from fastgen.step_table import step_table
from tests.sigma_utils import (SHAPE, assert_abs_sum_mean, assert_sample_matches_reference, assert_trajectories_agree,
                               diffusers_full_loop, dummy_model, fresh_sample, scheduler_pair, step_by_step)

# (scheduler config, inference steps, tolerance against diffusers relative to the largest operand)
SWEEP = {
    "bh2 order 2": ({}, 10, 1e-5),
    # bh1 onto sigma 0: diffusers' last step is NaN (0 * B(h) = 0 * -inf); test_bh1_onto_sigma_zero_is_finite
    "bh1 order 3": (dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"), 9, 1e-5),
    "order 1": (dict(solver_order=1), 6, 1e-5),
    # predict_x0=False steps onto sigma 0 as 0 * inf (NaN, diffusers too): sigma_min as the last sigma
    "eps prediction order 4 sample": (dict(predict_x0=False, solver_order=4, prediction_type="sample",
                                           final_sigmas_type="sigma_min"), 12, 1e-5),
    "karras v_prediction": (dict(prediction_type="v_prediction", use_karras_sigmas=True), 20, 1e-5),
    "thresholding trailing": (dict(thresholding=True, sample_max_value=1.5, timestep_spacing="trailing"), 8, 1e-5),
    "no lower_order_final sigma_min": (dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
                                       7, 1e-5),
    "disable_corrector": (dict(disable_corrector=[0, 3]), 8, 1e-5),
    "exponential": (dict(use_exponential_sigmas=True), 8, 1e-5),
    # diffusers forms alpha = 1 - sigma in float32 at sigma near 1 (the first step): its own error is ~1e-4
    "flow sigmas": (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), 9, 1e-4),
}


def _pair(case, backend):
    config, steps, _ = SWEEP[case]
    return scheduler_pair("UniPCMultistepScheduler", config, steps, backend)


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs = _pair(case, "torch")
    table = step_table(theirs)
    assert_trajectories_agree(table, fresh_sample(table, torch.Generator().manual_seed(len(case))), seed=0)


def test_history_is_the_solver_order():
    """The corrector reads the outputs of the step it corrects, so the ring holds solver_order of them."""
    for order in (1, 2, 3, 4):
        scheduler = diffusers.UniPCMultistepScheduler(solver_order=order, lower_order_final=False,
                                                      final_sigmas_type="sigma_min")
        scheduler.set_timesteps(10)
        assert step_table(scheduler).history == order


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers_to_fp32_rounding(case, backend):
    ours, theirs = _pair(case, backend)
    tolerance = SWEEP[case][2]
    step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)), rtol=tolerance,
                 atol=tolerance, with_generator=False)


def test_bh1_onto_sigma_zero_is_finite():
    """bh1's B(h) = hh is -inf on the step onto sigma 0, which is first order (no B(h) term): fastgen's step
    lands on the data prediction, where diffusers multiplies -inf by an empty sum of 0 and returns NaN."""
    ours, theirs = scheduler_pair("UniPCMultistepScheduler", dict(solver_type="bh1"), 10, "torch")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for t in ours.timesteps:
        x_ours = ours.step(dummy_model(x, t), t, x).prev_sample
        x_theirs = theirs.step(dummy_model(x, t), t, x).prev_sample
        x = x_ours
    assert torch.isfinite(x_ours).all() and torch.isnan(x_theirs).all()


def test_unfused_configurations_run_diffusers_step():
    ours, theirs = fs.UniPCMultistepScheduler(solver_order=5), diffusers.UniPCMultistepScheduler(solver_order=5)
    assert "keeps at most 4" in ours.fused_config
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0,
                 with_generator=False)
    with_solver_p = fs.UniPCMultistepScheduler(solver_p=diffusers.DDIMScheduler())
    assert "solver_p" in with_solver_p.fused_config


# diffusers' own test (tests/schedulers/test_scheduler_unipc.py): 10 steps of its dummy model from its
# deterministic sample; (config changes, loop keywords, |x| sum or None, |x| mean)
DIFFUSERS_VALUES = {
    "no noise": ({}, {}, None, 0.2464),
    "karras": (dict(use_karras_sigmas=True), {}, None, 0.2925),
    "v_prediction": (dict(prediction_type="v_prediction"), {}, None, 0.1014),
    "karras v_prediction": (dict(prediction_type="v_prediction", use_karras_sigmas=True), {}, None, 0.1966),
    # a run begun mid-schedule: its first step is first order, uncorrected
    "with noise": ({}, dict(start=8), 315.5757, 0.4109),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    config, loop, *values = DIFFUSERS_VALUES[case]
    scheduler = fs.UniPCMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                           beta_schedule="linear", solver_order=2, solver_type="bh2",
                                           final_sigmas_type="sigma_min", **config, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler, **loop), *values)


def test_saved_scheduler_reloads_as_fastgen(tmp_path):
    fs.UniPCMultistepScheduler(solver_type="bh1").save_pretrained(tmp_path)
    reloaded = fs.UniPCMultistepScheduler.from_pretrained(tmp_path)
    assert type(reloaded) is fs.UniPCMultistepScheduler and reloaded.config.solver_type == "bh1"


def test_bad_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'sample', 'v_prediction', "
                                         "'flow_prediction', got 'noise'"):
        fs.UniPCMultistepScheduler(prediction_type="noise")


def test_weights_order_two_predictor_is_half():
    """[Zhao23] Alg. 2: UniP-2 takes rho = 1/2 whatever B(h)."""
    _, _, _, rho = unipc.unipc_weights([0.0, -0.4], 0.5, order=2, predict_x0=True, solver_type="bh1",
                                       corrector=False)
    assert rho == [0.5]


def test_sample_runs_unipc():
    assert_sample_matches_reference("unipc", 8)
