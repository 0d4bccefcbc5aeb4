"""fastgen.step_spec.StepSpec: one frozen, validated value carries a step's settings from a scheduler's
config to the ops, the reference and the kernels' constexprs."""
import dataclasses

import pytest
import torch

from fastgen.step_spec import PREDICTION_TYPES, VARIANCE_TYPES, StepSpec


def test_defaults_are_diffusers_and_the_spec_is_frozen():
    spec = StepSpec()
    assert (spec.kind, spec.prediction_type, spec.variance_type, spec.clip_sample) == ("ddpm", "epsilon",
                                                                                         "fixed_small", True)
    assert (spec.dynamic_thresholding_ratio, spec.sample_max_value, spec.eta) == (0.995, 1.0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.eta = 0.5
    assert spec.replace(prediction_type="sample").prediction_type == "sample"


def test_from_config_reads_a_scheduler_config_and_overrides_win():
    from fastgen.schedulers import DDIMScheduler, DDPMScheduler

    ddim = StepSpec.from_scheduler(DDIMScheduler(prediction_type="v_prediction", clip_sample=False,
                                                 set_alpha_to_one=False), eta=0.3)
    assert (ddim.kind, ddim.prediction_type, ddim.clip_sample, ddim.set_alpha_to_one, ddim.eta) == (
        "ddim", "v_prediction", False, False, 0.3)
    ddpm = StepSpec.from_scheduler(DDPMScheduler(variance_type="learned_range", thresholding=True))
    assert ddpm.learned_variance and ddpm.thresholding
    assert StepSpec.from_config("ddpm", {"_class_name": "DDPMScheduler", "variance_type": None}).variance_type == \
        "fixed_small"


def test_output_shape_rule():
    assert StepSpec().model_output_shape((2, 3, 4)) == torch.Size((2, 3, 4))
    assert StepSpec(variance_type="learned").model_output_shape((2, 3, 4)) == torch.Size((2, 6, 4))
    with pytest.raises(ValueError, match="channel dimension"):
        StepSpec(variance_type="learned_range").model_output_shape((5,))


def test_previous_timestep_rule_on_lists_and_tensors():
    ddpm, ddim = StepSpec(), StepSpec("ddim")
    assert ddpm.prev_timesteps([900, 600, 100], 1000) == [600, 100, -1]
    assert ddpm.prev_timesteps(torch.tensor([900, 600, 100]), 1000).tolist() == [600, 100, -1]
    assert ddim.prev_timesteps([999, 888, 10], 1000) == [666, 555, -1]       # t - T // N, whatever the spacing
    assert ddim.prev_timesteps(torch.tensor([999, 888, 10]), 1000).tolist() == [666, 555, -1]
    assert ddim.prev_timesteps([40], 1000, num_inference_steps=50) == [20]


def test_generator_draws_follow_diffusers():
    assert StepSpec().generator_draws(1) and not StepSpec().generator_draws(0)
    assert StepSpec("ddim", eta=0.5).generator_draws(0) and not StepSpec("ddim").generator_draws(500)
    assert StepSpec().adds_noise and not StepSpec("ddim").adds_noise


def test_the_kernel_codes_cover_exactly_the_allowed_names():
    from fastgen.kernels import diffusion as k_diffusion

    assert tuple(k_diffusion.PREDICTION) == PREDICTION_TYPES
    assert tuple(k_diffusion.VARIANCE) == VARIANCE_TYPES


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kind="euler"), ValueError, "kind must be one of 'ddpm', 'ddim', got 'euler'"),
    (dict(prediction_type="eps"), ValueError, "prediction_type must be one of 'epsilon', 'sample', 'v_prediction'"),
    (dict(variance_type="small"), ValueError, "variance_type must be one of 'fixed_small'"),
    (dict(clip_sample="yes"), TypeError, "clip_sample must be a bool"),
    (dict(clip_sample_range=0), ValueError, r"clip_sample_range must be in \(0.0, inf\]"),
    (dict(dynamic_thresholding_ratio=1.5), ValueError, "dynamic_thresholding_ratio"),
    (dict(kind="ddim", eta=1.5), ValueError, r"eta must be in \[0.0, 1.0\], got 1.5"),
    (dict(kind="ddim", eta="1"), TypeError, "eta must be a number"),
    (dict(kind="ddim", eta=float("nan")), ValueError, "eta must be in"),
    (dict(eta=0.5), ValueError, "are DDIM settings"),
    (dict(kind="ddim", variance_type="learned"), ValueError, "variance_type is a DDPM setting"),
])
def test_bad_settings_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        StepSpec(**kwargs)


def test_ops_take_a_spec_or_keywords_not_both():
    import fastgen
    from fastgen.schedules import NoiseSchedule

    x = torch.randn(2, 3)
    schedule = NoiseSchedule(num_train_timesteps=10)
    a, _ = fastgen.ddpm_step(x, 5, x, schedule, spec=StepSpec(clip_sample=False), noise=x, backend="torch")
    b, _ = fastgen.ddpm_step(x, 5, x, schedule, clip_sample=False, noise=x, backend="torch")
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="either as spec= or as keywords"):
        fastgen.ddpm_step(x, 5, x, schedule, spec=StepSpec(), clip_sample=False, backend="torch")
    with pytest.raises(ValueError, match="kind 'ddim' for ddim_step"):
        fastgen.ddim_step(x, 5, 4, x, schedule, spec=StepSpec(), backend="torch")
