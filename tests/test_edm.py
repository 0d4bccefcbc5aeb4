"""EDMEulerScheduler and EDMDPMSolverMultistepScheduler: the fused step against the float64 reference
(fastgen/reference/edm.py, the kernel in the interpreter), against diffusers' own step from the same
generator, counter noise batch-invariant, the fallbacks, the saved pipeline, and diffusers' asserted values."""
import json

import diffusers
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from fastgen.step_table import step_table
from tests.sigma_utils import (SHAPE, assert_abs_sum_mean, assert_batch_invariant, assert_trajectories_agree,
                               diffusers_full_loop, fresh_sample, scheduler_pair, step_by_step)

# (class name, scheduler config, step keywords)
SWEEP = {
    "euler": ("EDMEulerScheduler", {}, {}),
    "euler v exponential": ("EDMEulerScheduler", dict(prediction_type="v_prediction", sigma_schedule="exponential"), {}),
    "euler churn": ("EDMEulerScheduler", {}, dict(s_churn=1.0)),
    "euler sigma_min": ("EDMEulerScheduler", dict(final_sigmas_type="sigma_min", sigma_data=1.0), {}),
    "dpmsolver++ 2M": ("EDMDPMSolverMultistepScheduler", {}, {}),
    "dpmsolver++ heun v": ("EDMDPMSolverMultistepScheduler",
                           dict(solver_type="heun", prediction_type="v_prediction", lower_order_final=False), {}),
    "sde-dpmsolver++": ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}),
    "dpmsolver++ thresholding exponential": ("EDMDPMSolverMultistepScheduler",
                                             dict(thresholding=True, sigma_schedule="exponential",
                                                  final_sigmas_type="sigma_min"), {}),
}


def _pair(case, backend, steps=6):
    name, config, step_kwargs = SWEEP[case]
    return (*scheduler_pair(name, config, steps, backend), step_kwargs)


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs, step_kwargs = _pair(case, "torch")
    table = step_table(theirs, **step_kwargs) if step_kwargs else step_table(theirs)
    x = fresh_sample(table, torch.Generator().manual_seed(len(case)))
    assert_trajectories_agree(table, x, seed=31)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers_to_fp32_rounding(case, backend):
    ours, theirs, step_kwargs = _pair(case, backend)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * ours.init_noise_sigma
    step_by_step(ours, theirs, x, step_kwargs=step_kwargs, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name, step_kwargs", [("EDMEulerScheduler", dict(s_churn=2.0)),
                                               ("EDMDPMSolverMultistepScheduler", {})])
def test_seed_is_batch_invariant(name, step_kwargs):
    def make():
        config = {} if name == "EDMEulerScheduler" else dict(algorithm_type="sde-dpmsolver++")
        s = getattr(fs, name)(**config, backend="triton")
        s.set_timesteps(4)
        return s

    assert_batch_invariant(make, torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5)), seed=78,
                           step_kwargs=step_kwargs)


def test_third_order_runs_diffusers_step():
    ours = fs.EDMDPMSolverMultistepScheduler(solver_order=3)
    theirs = diffusers.EDMDPMSolverMultistepScheduler(solver_order=3)
    assert "solver_order" in ours.fused_config
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    step_by_step(ours, theirs, torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="seed= needs the fused step"):
        ours.step(torch.zeros(SHAPE), ours.timesteps[0], torch.zeros(SHAPE), seed=1)


def test_sample_runs_the_edm_samplers():
    """fastgen.sample's loop (torch strategy) equals the float64 reference loop."""
    class Model(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return 0.5 * torch.tanh(x)

    for kind in ("edm_euler", "edm_dpmsolver++", "edm_sde-dpmsolver++"):
        scheduler = fastgen.sampling.make_scheduler(kind)
        fast = fastgen.sample(Model(), (2, 8), scheduler, num_inference_steps=5, seed=3, backend="torch")
        ref = fastgen.sample(Model(), (2, 8), scheduler, num_inference_steps=5, seed=3, backend="reference")
        torch.testing.assert_close(fast, ref.float(), rtol=1e-5, atol=1e-5)


def test_saved_pipeline_reloads_fastgen_scheduler(tmp_path):
    from tests.test_diffusers_parity import tiny_unet

    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=fs.EDMEulerScheduler(sigma_data=0.7))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["fastgen", "EDMEulerScheduler"]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is fastgen.EDMEulerScheduler
    assert loaded.scheduler.config.sigma_data == 0.7


# diffusers' own tests (tests/schedulers/test_scheduler_edm_euler.py, test_scheduler_edm_dpmsolver_multistep.py):
# 10 steps of its dummy model from its deterministic sample. EDM Euler's: the sample times init_noise_sigma, the
# model fed scale_model_input's output, the step the sample (its full_loop_device test is the same loop); EDM
# DPM-Solver's: the sample as it is, with lower_order_final=False, final_sigmas_type="sigma_min" (the rest of its
# config is the defaults). (class, config, loop keywords, |x| sum or None, |x| mean[, sum tolerance])
EDM_DPM = dict(lower_order_final=False, final_sigmas_type="sigma_min")
DIFFUSERS_VALUES = {
    "euler no noise": ("EDMEulerScheduler", dict(num_train_timesteps=256), dict(scale="model"), 34.1855, 0.044, 1e-3),
    "dpmsolver++ no noise": ("EDMDPMSolverMultistepScheduler", EDM_DPM, {}, None, 0.0001),
    "dpmsolver++ with noise": ("EDMDPMSolverMultistepScheduler", EDM_DPM, dict(start=5), 8.1661, 0.0106),
    "dpmsolver++ no noise thres": ("EDMDPMSolverMultistepScheduler",
                                   dict(EDM_DPM, thresholding=True, dynamic_thresholding_ratio=0.87,
                                        sample_max_value=0.5), {}, None, 0.0080),
    "dpmsolver++ v_prediction": ("EDMDPMSolverMultistepScheduler", dict(EDM_DPM, prediction_type="v_prediction"), {},
                                 None, 0.0092),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    name, config, loop, *values = DIFFUSERS_VALUES[case]
    assert_abs_sum_mean(diffusers_full_loop(getattr(fs, name)(**config, backend=backend), **loop), *values)
