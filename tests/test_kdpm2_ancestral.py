"""KDPM2AncestralDiscreteScheduler: both stages fused, the ancestral noise in the second, against the
float64 reference (fastgen/reference/karras.py's kdpm2_ancestral_stage, the same counter noise; the
kernel in the interpreter), against diffusers' own step from the same generator, counter noise
batch-invariant, in fastgen.sample, and diffusers' asserted values."""
import pytest
import torch

import fastgen.schedulers as fs
from fastgen.step_table import step_table
from tests.sigma_utils import (DIFFUSERS_TEST_CONFIG, SHAPE, assert_abs_sum_mean, assert_batch_invariant,
                               assert_sample_matches_reference, assert_trajectories_agree, diffusers_full_loop,
                               fresh_sample, scheduler_pair, step_by_step)

# (scheduler config, inference steps)
SWEEP = {
    "epsilon": ({}, 6),
    "v_prediction karras": (dict(prediction_type="v_prediction", use_karras_sigmas=True), 5),
    "trailing": (dict(timestep_spacing="trailing"), 3),
}


def _pair(case, backend):
    return scheduler_pair("KDPM2AncestralDiscreteScheduler", *SWEEP[case], backend)


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs = _pair(case, "torch")
    table = step_table(theirs)
    assert table.any_draws and table.generator_draws.tolist() == [k % 2 == 1 for k in range(table.num_steps)]
    assert_trajectories_agree(table, fresh_sample(table, torch.Generator().manual_seed(len(case))), seed=17)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers_to_fp32_rounding(case, backend):
    ours, theirs = _pair(case, backend)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * theirs.init_noise_sigma
    step_by_step(ours, theirs, x, rtol=1e-5, atol=2e-6, seed=1)


def test_seed_is_batch_invariant():
    def make():
        s = fs.KDPM2AncestralDiscreteScheduler(backend="triton")
        s.set_timesteps(3)
        return s

    assert_batch_invariant(make, torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5)), seed=80)


# diffusers' own test (tests/schedulers/test_scheduler_kdpm2_ancestral.py): 10 steps of its dummy model from its
# deterministic sample times init_noise_sigma, the sample replaced by scale_model_input's output each step (the model
# and the step get that), the ancestral noise from a generator seeded 0; (config changes, loop keywords, |x| sum,
# |x| mean[, sum tolerance, mean tolerance])
DIFFUSERS_VALUES = {
    # the no-noise test asserts the mean within 5e-3, full_loop_device (the same loop) within 1e-3: the stricter
    "no noise": ({}, {}, 13979.9433, 18.2030),
    "v_prediction": (dict(prediction_type="v_prediction"), {}, 331.8133, 0.4320),
    "with noise": ({}, dict(start=8), 93087.3437, 121.2074, 1e-2, 5e-3),  # from timesteps[8 * order]
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    config, loop, *values = DIFFUSERS_VALUES[case]
    scheduler = fs.KDPM2AncestralDiscreteScheduler(**DIFFUSERS_TEST_CONFIG, **config, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler, scale="sample", seed=0, **loop), *values)


def test_sample_runs_kdpm2_ancestral():
    assert_sample_matches_reference("kdpm2_ancestral", 4)
