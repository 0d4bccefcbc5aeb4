"""DPM-Solver++ 2M and SDE-DPM-Solver++ 2M (fastgen/reference/dpm_solver.py, fastgen/schedulers/dpm_solver.py):
the fused step against the float64 reference over whole trajectories (the SDE's noise from the same
counter streams), fastgen's class against diffusers' step by step from the same generator, batch
invariance with seed=, the configurations that step with diffusers' own step, the values diffusers'
own tests assert, bad input and save/load in a pipeline."""
import json

import diffusers
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from fastgen.reference import dpm_solver
from fastgen.schedulers._sigma import step_table
from tests.sigma_utils import (SHAPE, assert_abs_sum_mean, assert_batch_invariant, assert_trajectories_agree,
                               diffusers_full_loop, dummy_model, dummy_sample, fresh_sample, step_by_step)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SDE = dict(algorithm_type="sde-dpmsolver++")

# (scheduler config, inference steps, set_timesteps keywords)
KERNEL_SWEEP = {
    "2M": ({}, 6, {}),
    "2M karras v": (dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), 6, {}),
    "2M heun sample sigma_min": (dict(solver_type="heun", prediction_type="sample", final_sigmas_type="sigma_min",
                                      lower_order_final=False), 5, {}),
    "1 lu lambdas": (dict(solver_order=1, use_lu_lambdas=True), 4, {}),
    "2M thresholding": (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                             prediction_type="sample"), 5, {}),
    "2M euler_at_final exponential": (dict(euler_at_final=True, use_exponential_sigmas=True,
                                           final_sigmas_type="sigma_min"), 5, {}),
    "2M flow sigmas": (dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), 5, {}),
    "SDE 2M": (SDE, 6, {}),
    "SDE 2M karras heun": (dict(SDE, **SD, use_karras_sigmas=True, solver_type="heun"), 5, {}),
    "SDE 1 v trailing": (dict(SDE, solver_order=1, prediction_type="v_prediction", timestep_spacing="trailing"),
                         4, {}),
}


def _diffusers_scheduler(config, steps, **set_kwargs):
    scheduler = diffusers.DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(steps, **set_kwargs)
    return scheduler


@pytest.mark.parametrize("case", KERNEL_SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    config, steps, set_kwargs = KERNEL_SWEEP[case]
    table = step_table(_diffusers_scheduler(config, steps, **set_kwargs))
    assert table.any_draws == (config.get("algorithm_type") == "sde-dpmsolver++")
    assert table.reads_previous == (config.get("solver_order", 2) == 2)
    x = fresh_sample(table, torch.Generator().manual_seed(len(case)))
    assert_trajectories_agree(table, x, seed=41)


DIFFUSERS_SWEEP = {  # (config, inference steps)
    "2M": ({}, 5),
    "2M sd karras": (dict(SD, use_karras_sigmas=True), 5),
    "2M v leading lower_order_final off sigma_min": (dict(prediction_type="v_prediction", timestep_spacing="leading",
                                                          lower_order_final=False, final_sigmas_type="sigma_min"), 5),
    "2M heun sample": (dict(solver_type="heun", prediction_type="sample"), 5),
    "2M thresholding": (dict(thresholding=True, dynamic_thresholding_ratio=0.9, prediction_type="sample"), 5),
    "2M 16 steps": ({}, 16),
    "2M beta sigmas zero snr": (dict(use_beta_sigmas=True, rescale_betas_zero_snr=True,
                                     prediction_type="v_prediction", final_sigmas_type="sigma_min"), 5),
    "2M flow dynamic": (dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True), 5),
    "1": (dict(solver_order=1), 4),
    "SDE 2M": (SDE, 5),
    "SDE 2M karras heun": (dict(SDE, **SD, use_karras_sigmas=True, solver_type="heun"), 5),
    "SDE 1 trailing": (dict(SDE, solver_order=1, timestep_spacing="trailing"), 4),
}


@pytest.mark.parametrize("case, backend", [(case, "torch") for case in DIFFUSERS_SWEEP] +  # the interpreter is slow:
                         [(case, "triton") for case, (_, steps) in DIFFUSERS_SWEEP.items() if steps <= 6])  # <= 6 steps
def test_step_matches_diffusers(case, backend):
    config, steps = DIFFUSERS_SWEEP[case]
    set_kwargs = dict(mu=0.7) if config.get("use_dynamic_shifting") else {}
    ours = fs.DPMSolverMultistepScheduler(**config, backend=backend)
    theirs = diffusers.DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(steps, **set_kwargs)
    theirs.set_timesteps(steps, **set_kwargs)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    step_by_step(ours, theirs, x)
    assert ours.lower_order_nums == theirs.lower_order_nums
    assert len(ours.model_outputs) == len(theirs.model_outputs)


def test_run_started_mid_schedule_and_variance_noise_match_diffusers():
    """img2img: a run from step 3 (set_begin_index) is first order there, as diffusers'; the SDE's
    noise given as variance_noise is used as given."""
    for config in ({}, SDE):
        ours, theirs = fs.DPMSolverMultistepScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)
        for s in (ours, theirs):
            s.set_timesteps(8)
            s.set_begin_index(3)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
        for t_ours, t in zip(ours.timesteps[3:], theirs.timesteps[3:]):
            m, z = 0.3 * x + 0.1, torch.randn(SHAPE)
            got = ours.step(m, t_ours, x, variance_noise=z).prev_sample
            want = theirs.step(m, t, x, variance_noise=z).prev_sample
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            x = want


def test_model_outputs_history_is_read_like_diffusers():
    """A caller that sets ``model_outputs`` (as diffusers' own tests do) steps from that history."""
    ours, theirs = fs.DPMSolverMultistepScheduler(), diffusers.DPMSolverMultistepScheduler()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    history = [0.2 * x, 0.1 * x]
    for s in (ours, theirs):
        s.set_timesteps(6)
        s.model_outputs = list(history)
        s.lower_order_nums = 2
        s._step_index = 2
    got = ours.step(0.5 * x, ours.timesteps[2], x).prev_sample
    want = theirs.step(0.5 * x, theirs.timesteps[2], x).prev_sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [dict(solver_order=3),
                                    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                                    dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
                                    dict(variance_type="learned_range")])
def test_unfused_configurations_step_like_diffusers(config):
    """Configurations without a fused table step with diffusers' own step (generator noise), and say why."""
    ours, theirs = fs.DPMSolverMultistepScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)
    assert ours.fused_config is not None
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    channels = 6 if config.get("variance_type") else 3
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t_ours, t in zip(ours.timesteps, theirs.timesteps):
        m = torch.cat([0.4 * x] * (channels // 3), dim=1)
        want = theirs.step(m, t, x, generator=g2).prev_sample
        torch.testing.assert_close(ours.step(m, t_ours, x, generator=g1).prev_sample, want, rtol=0, atol=0)
        x = want
    with pytest.raises(ValueError, match="seed= needs the fused step"):
        ours.step(m, ours.timesteps[0], x, seed=1)


@pytest.mark.parametrize("config", [SDE, dict(SDE, solver_order=1)])
def test_seed_is_batch_invariant(config):
    def make():
        s = fs.DPMSolverMultistepScheduler(**config, backend="triton")
        s.set_timesteps(4)
        return s

    assert_batch_invariant(make, torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(6)), seed=5)


# --- diffusers' own asserted values (tests/schedulers/test_scheduler_dpm_multi.py), ported ---------------------

DIFFUSERS_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        solver_order=2, prediction_type="epsilon", thresholding=False, sample_max_value=1.0,
                        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False,
                        euler_at_final=False, variance_type=None, final_sigmas_type="sigma_min")


DIFFUSERS_VALUES = {  # diffusers' test: 10 steps from its deterministic sample, a generator seeded 0 given to
    # every step; (config changes, loop keywords, |x| sum or None, |x| mean)
    "no noise": ({}, {}, None, 0.3301),
    "with noise": ({}, dict(start=5), 318.4111, 0.4146),
    "no noise thres": (dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5), {}, None,
                       1.1364),
    "v_prediction": (dict(prediction_type="v_prediction"), {}, None, 0.2251),
    "karras v_prediction": (dict(prediction_type="v_prediction", use_karras_sigmas=True), {}, None, 0.2096),
    "lu v_prediction": (dict(prediction_type="v_prediction", use_lu_lambdas=True), {}, None, 0.1554),
}


@pytest.mark.parametrize("case, backend", [(case, "torch") for case in DIFFUSERS_VALUES] +
                         [("no noise thres", "triton"), ("with noise", "triton")])
def test_diffusers_asserted_full_loops(case, backend):
    changes, loop, *values = DIFFUSERS_VALUES[case]
    scheduler = fs.DPMSolverMultistepScheduler(**{**DIFFUSERS_CONFIG, **changes}, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler, seed=0, **loop), *values)


def test_switch_through_compatible_schedulers_keeps_the_values():
    """diffusers' test_switch: the config through DPMSolverSinglestep, UniPC and DEIS and back."""
    scheduler = fs.DPMSolverMultistepScheduler(**DIFFUSERS_CONFIG)
    for cls in (diffusers.DPMSolverSinglestepScheduler, diffusers.UniPCMultistepScheduler,
                diffusers.DEISMultistepScheduler, fs.DPMSolverMultistepScheduler):
        scheduler = cls.from_config(scheduler.config)
    assert type(scheduler) is fs.DPMSolverMultistepScheduler
    assert_abs_sum_mean(diffusers_full_loop(scheduler, seed=0), None, 0.3301)


def test_fp16_with_thresholding():
    """diffusers' test_fp16_support (the sample stays fp16); against diffusers' loop in fp32 the fp16
    loop is no further off than diffusers' own fp16 loop (which forms x0 in fp16 arithmetic; fastgen
    computes in fp32 and rounds once per step)."""
    config = dict(DIFFUSERS_CONFIG, thresholding=True, dynamic_thresholding_ratio=0)
    runs = {}
    for name, cls, dtype in (("ours fp16", fs.DPMSolverMultistepScheduler, torch.float16),
                             ("diffusers fp16", diffusers.DPMSolverMultistepScheduler, torch.float16),
                             ("diffusers fp32", diffusers.DPMSolverMultistepScheduler, torch.float32)):
        s = cls(**config, **(dict(backend="triton") if cls is fs.DPMSolverMultistepScheduler else {}))
        s.set_timesteps(4)
        sample = dummy_sample().half().to(dtype)
        for t in s.timesteps:
            sample = s.step(dummy_model(sample, t), t, sample).prev_sample
        assert sample.dtype == dtype
        runs[name] = sample.float()
    ours, theirs = ((runs[name] - runs["diffusers fp32"]).abs() for name in ("ours fp16", "diffusers fp16"))
    assert ours.max() <= theirs.max() and ours.mean() <= theirs.mean()


# --- bad input -------------------------------------------------------------------------------------------------

def _table(**config):
    return step_table(_diffusers_scheduler(config, 4))


@pytest.mark.parametrize("call, match", [
    (lambda: _table(solver_order=3), "solver_order must be one of 1, 2, got 3"),
    (lambda: _table(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
     "algorithm_type must be one of 'dpmsolver\\+\\+', 'sde-dpmsolver\\+\\+', got 'dpmsolver'"),
    (lambda: _table(variance_type="learned"), "variance_type must be None"),
    (lambda: step_table(_diffusers_scheduler({}, 4), start=-1), "start must be"),
    (lambda: step_table(diffusers.DPMSolverMultistepScheduler()), "set_timesteps"),
    (lambda: fs.DPMSolverMultistepScheduler(final_sigmas_type="one").set_timesteps(4), "'zero', or 'sigma_min'"),
    (lambda: fs.DPMSolverMultistepScheduler(timestep_spacing="even").set_timesteps(4),
     "'linspace', 'leading' or 'trailing'"),
    (lambda: fs.DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="zero"),
     "`final_sigmas_type` zero is not supported"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_algorithm_type_is_diffusers_error():
    with pytest.raises(NotImplementedError, match="unipc"):
        fs.DPMSolverMultistepScheduler(algorithm_type="unipc")
    assert dpm_solver.fused_settings(diffusers.DPMSolverMultistepScheduler(solver_order=3).config).startswith(
        "solver_order must be one of 1, 2")


def test_saved_pipeline_reloads_fastgen_scheduler(tmp_path):
    from tests.test_diffusers_parity import tiny_unet

    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=fs.DPMSolverMultistepScheduler(**SD, **SDE))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == [
        "fastgen", "DPMSolverMultistepScheduler"]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is fastgen.DPMSolverMultistepScheduler
    assert loaded.scheduler.config.algorithm_type == "sde-dpmsolver++"
