"""PNDMScheduler: the fused PLMS step against the float64 reference (fastgen/reference/pndm.py; the kernel
in the interpreter on a CPU), against diffusers' own step (with and without its Runge-Kutta warm-up),
diffusers' asserted values, and what fastgen.sample refuses."""
import diffusers
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from fastgen.reference import pndm
from fastgen.step_table import step_table
from tests.sigma_utils import (SHAPE, assert_abs_sum_mean, assert_sample_matches_reference, assert_trajectories_agree,
                               diffusers_full_loop, fresh_sample, scheduler_pair, step_by_step)

# (scheduler config, inference steps); every case skips the Runge-Kutta warm-up but the last
SWEEP = {
    "plms": (dict(skip_prk_steps=True), 10),
    "plms v_prediction alpha to one": (dict(skip_prk_steps=True, prediction_type="v_prediction",
                                            set_alpha_to_one=True), 12),
    "plms trailing scaled_linear": (dict(skip_prk_steps=True, timestep_spacing="trailing",
                                         beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 7),
    "plms linspace few steps": (dict(skip_prk_steps=True, timestep_spacing="linspace"), 3),
    "runge-kutta warm-up": ({}, 15),
}


def _pair(case, backend):
    config, steps = SWEEP[case]
    return scheduler_pair("PNDMScheduler", config, steps, backend)


@pytest.mark.parametrize("case", [case for case in SWEEP if SWEEP[case][0].get("skip_prk_steps")])
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs = _pair(case, "torch")
    table = step_table(theirs)
    assert table.num_steps == len(theirs.timesteps) and table.history == (4 if table.num_steps > 5 else 2)
    assert_trajectories_agree(table, fresh_sample(table, torch.Generator().manual_seed(len(case))), seed=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers_to_fp32_rounding(case, backend):
    ours, theirs = _pair(case, backend)
    step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)), rtol=1e-5, atol=1e-5,
                 with_generator=False)


def test_warm_up_runs_diffusers_step_then_the_fused_plms():
    scheduler = fs.PNDMScheduler()
    assert "Runge-Kutta warm-up" in scheduler.fused_config
    assert fs.PNDMScheduler(skip_prk_steps=True).fused_config is None
    scheduler.set_timesteps(10)
    table = step_table(scheduler, after_prk=True)  # three rows for the warm-up's kept outputs, then PLMS
    assert table.num_steps == 3 + len(scheduler.plms_timesteps) and table.history == 3


# diffusers' own test (tests/schedulers/test_scheduler_pndm.py): 10 steps of its dummy model from its
# deterministic sample, the Runge-Kutta warm-up then PLMS, here through ``step``; (config, |x| sum, |x| mean)
DIFFUSERS_VALUES = {
    "no noise": ({}, 198.1318, 0.2580),
    "v_prediction": (dict(prediction_type="v_prediction"), 67.3986, 0.0878),
    "set_alpha_to_one": (dict(set_alpha_to_one=True, beta_start=0.01), 230.0399, 0.2995),
    "no set_alpha_to_one": (dict(set_alpha_to_one=False, beta_start=0.01), 186.9482, 0.2434),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    config, *values = DIFFUSERS_VALUES[case]
    scheduler = fs.PNDMScheduler(**{"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                    "beta_schedule": "linear", **config}, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler), *values)


def test_plms_builder_refuses_the_warm_up_for_the_sampling_loop():
    scheduler = diffusers.PNDMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="skip_prk_steps=False: the Runge-Kutta warm-up .* set skip_prk_steps=True"):
        step_table(scheduler)
    with pytest.raises(ValueError, match="skip_prk_steps=True"):
        fastgen.sample(lambda x, t: x, (2, 4), fs.PNDMScheduler(), num_inference_steps=5, seed=0)


def test_transfer_is_the_ddim_step():
    """[Liu22] eq. 9's transfer part is DDIM's deterministic step on the noise estimate."""
    abar_t, abar_s = 0.3, 0.7
    x, e = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x0 = (x - (1 - abar_t) ** 0.5 * e) / abar_t ** 0.5
    torch.testing.assert_close(pndm.transfer(x, e, abar_t, abar_s), abar_s ** 0.5 * x0 + (1 - abar_s) ** 0.5 * e)


def test_saved_scheduler_reloads_as_fastgen(tmp_path):
    fs.PNDMScheduler(skip_prk_steps=True).save_pretrained(tmp_path)
    reloaded = fs.PNDMScheduler.from_pretrained(tmp_path)
    assert type(reloaded) is fs.PNDMScheduler and reloaded.config.skip_prk_steps


def test_bad_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'v_prediction', got 'sample'"):
        fs.PNDMScheduler(prediction_type="sample")


def test_sample_runs_pndm():
    assert_sample_matches_reference("pndm", 8)
