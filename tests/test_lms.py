"""LMSDiscreteScheduler: the fused step against the float64 reference (fastgen/reference/lms.py, the
Lagrange integrals by quadrature; the kernel in the interpreter on a CPU), against diffusers' own step,
diffusers' asserted values, the orders that run diffusers' step, and a run begun mid-schedule."""
import diffusers
import pytest
import torch

import fastgen.schedulers as fs
from fastgen.reference import lms
from fastgen.step_table import step_table
from tests.sigma_utils import (DIFFUSERS_TEST_CONFIG, SHAPE, assert_abs_sum_mean, assert_sample_matches_reference,
                               assert_trajectories_agree, diffusers_full_loop, dummy_model, fresh_sample,
                               scheduler_pair, step_by_step)

# (scheduler config, inference steps, step()'s order, tolerance against diffusers relative to the largest operand)
SWEEP = {
    "order 4": ({}, 10, 4, 1e-5),
    "order 5": ({}, 9, 5, 1e-5),
    "order 1": ({}, 6, 1, 1e-5),
    "order 2": ({}, 7, 2, 1e-5),
    "order 3 karras v_prediction": (dict(prediction_type="v_prediction", use_karras_sigmas=True), 20, 3, 1e-5),
    "exponential sample": (dict(prediction_type="sample", use_exponential_sigmas=True), 8, 4, 1e-5),
    "beta sigmas trailing": (dict(use_beta_sigmas=True, timestep_spacing="trailing"), 9, 4, 1e-5),
    "leading": (dict(timestep_spacing="leading", steps_offset=1), 12, 4, 1e-5),
}


def _pair(case, backend):
    config, steps, _, _ = SWEEP[case]
    return scheduler_pair("LMSDiscreteScheduler", config, steps, backend)


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs = _pair(case, "torch")
    order = SWEEP[case][2]
    table = step_table(theirs, order=order)
    assert table.history == min(order, theirs.num_inference_steps) - 1 or (order == 1 and table.history == 1)
    assert_trajectories_agree(table, fresh_sample(table, torch.Generator().manual_seed(len(case))), seed=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers_to_fp32_rounding(case, backend):
    ours, theirs = _pair(case, backend)
    tolerance = SWEEP[case][3]
    step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)), rtol=tolerance,
                 atol=tolerance, with_generator=False, step_kwargs=dict(order=SWEEP[case][2]))


def test_builder_coefficients_are_the_quadrature_weights():
    """The builder integrates the Lagrange basis in closed form; the reference by quadrature: the same
    numbers to float64 rounding (and diffusers' scipy quadrature to its fp32 sigmas)."""
    scheduler = diffusers.LMSDiscreteScheduler()
    scheduler.set_timesteps(12)
    table = step_table(scheduler, order=4)
    sigmas = scheduler.sigmas.double().tolist()
    for i in range(3, 11):
        weights = lms.lms_weights([sigmas[i - k] for k in range(4)], sigmas[i], sigmas[i + 1])
        row = table.row(i)
        torch.testing.assert_close(torch.tensor([row[c] for c in ("ad", "ap", "ap2", "ap3")], dtype=torch.float64),
                                   torch.tensor(weights, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        theirs = [scheduler.get_lms_coefficient(4, i, k) for k in range(4)]
        torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64), rtol=1e-5,
                                   atol=1e-6)


def test_orders_above_five_run_diffusers_step():
    ours, theirs = fs.LMSDiscreteScheduler(), diffusers.LMSDiscreteScheduler()
    assert "keeps at most 4" in lms.fused_settings(6)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0,
                 with_generator=False, step_kwargs=dict(order=6))


# diffusers' own test (tests/schedulers/test_scheduler_lms.py): 10 steps of its dummy model from its
# deterministic sample, the model fed scale_model_input's output and the step that too, as the test does;
# (config changes, loop keywords, |x| sum, |x| mean[, sum tolerance])
DIFFUSERS_VALUES = {
    "no noise": ({}, {}, 1006.388, 1.31),
    "v_prediction": (dict(prediction_type="v_prediction"), {}, 0.0017, 2.2676e-06),
    "karras sigmas": (dict(use_karras_sigmas=True), {}, 3812.9927, 4.9648, 2e-2),
    # a run begun mid-schedule: its first steps have fewer derivatives than the order
    "with noise": ({}, dict(start=8), 27663.6895, 36.0204),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    config, loop, *values = DIFFUSERS_VALUES[case]
    scheduler = fs.LMSDiscreteScheduler(**DIFFUSERS_TEST_CONFIG, **config, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler, scale="sample", **loop), *values)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_run_begun_mid_schedule_matches_diffusers(backend):
    """set_begin_index(k): diffusers' order is min(k + 1, 4) from the first step, with only the run's own
    derivatives (the table's ``start``)."""
    ours, theirs = _pair("order 4", backend)
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    for t in theirs.timesteps[5:]:
        ours.scale_model_input(x, t), theirs.scale_model_input(x, t)
        m = dummy_model(x, t)
        got, want = ours.step(m, t, x), theirs.step(m, t, x)
        torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-5, atol=1e-5)
        x = want.prev_sample


def test_saved_scheduler_reloads_as_fastgen(tmp_path):
    fs.LMSDiscreteScheduler(use_karras_sigmas=True).save_pretrained(tmp_path)
    reloaded = fs.LMSDiscreteScheduler.from_pretrained(tmp_path)
    assert type(reloaded) is fs.LMSDiscreteScheduler and reloaded.config.use_karras_sigmas


def test_bad_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'v_prediction', 'sample', "
                                         "got 'noise'"):
        fs.LMSDiscreteScheduler(prediction_type="noise")


def test_sample_runs_lms():
    assert_sample_matches_reference("lms", 8)
