"""Euler and Euler ancestral (fastgen/reference/karras.py, fastgen/schedulers/euler*.py): the fused step
against the float64 reference over whole trajectories (churn and ancestral noise from the same counter
stream), fastgen's classes against diffusers' step by step from the same generator, batch invariance
with seed=, the values diffusers' own tests assert, bad input, and save/load in a pipeline."""
import json
import math

import diffusers
import numpy as np
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from fastgen.reference import karras
from fastgen.schedulers._sigma import step_table
from tests.sigma_utils import (DIFFUSERS_TEST_CONFIG, SHAPE, assert_abs_sum_mean, assert_batch_invariant,
                               assert_trajectories_agree, diffusers_full_loop, fresh_sample, step_by_step)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CHURN = dict(s_churn=2.0, s_tmin=0.05, s_tmax=8.0, s_noise=1.003)

# (class name, scheduler config, step settings, inference steps)
KERNEL_SWEEP = {
    "euler epsilon": ("EulerDiscreteScheduler", {}, {}, 5),
    "euler v karras": ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True),
                       {}, 5),
    "euler sample exponential sigma_min": ("EulerDiscreteScheduler", dict(prediction_type="sample",
                                           use_exponential_sigmas=True, final_sigmas_type="sigma_min"), {}, 4),
    "euler churn": ("EulerDiscreteScheduler", SD, CHURN, 6),
    "euler v churn beta trailing": ("EulerDiscreteScheduler", dict(prediction_type="v_prediction",
                                    use_beta_sigmas=True, timestep_spacing="trailing"), CHURN, 5),
    "euler log_linear": ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"), {}, 4),
    "ancestral epsilon": ("EulerAncestralDiscreteScheduler", SD, {}, 6),
    "ancestral v zero snr trailing": ("EulerAncestralDiscreteScheduler", dict(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"), {}, 5),
}


def _diffusers_scheduler(name, config, steps):
    scheduler = getattr(diffusers, name)(**config)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("case", KERNEL_SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    """The fused kernel (Triton, interpreter on a CPU) over a whole run equals the sampler's float64
    equations, the churn / ancestral noise drawn from the same counter streams on both sides."""
    name, config, settings, steps = KERNEL_SWEEP[case]
    table = step_table(_diffusers_scheduler(name, config, steps), **settings)
    assert table.any_draws == (name.startswith("EulerAncestral") or bool(settings))
    x = fresh_sample(table, torch.Generator().manual_seed(len(case)))
    assert_trajectories_agree(table, x, seed=17)


DIFFUSERS_SWEEP = {  # (class name, config, step kwargs)
    "euler epsilon": ("EulerDiscreteScheduler", {}, {}),
    "euler sample leading": ("EulerDiscreteScheduler", dict(prediction_type="sample", timestep_spacing="leading",
                                                            steps_offset=1), {}),
    "euler v continuous": ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_type="continuous"),
                           {}),
    "euler karras sigma_min": ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True,
                                                               final_sigmas_type="sigma_min"), {}),
    "euler exponential trailing": ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True,
                                                                   timestep_spacing="trailing"), {}),
    "euler beta": ("EulerDiscreteScheduler", dict(use_beta_sigmas=True), {}),
    "euler log_linear": ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"), {}),
    "euler churn": ("EulerDiscreteScheduler", SD, CHURN),
    "euler v churn zero snr": ("EulerDiscreteScheduler", dict(prediction_type="v_prediction",
                                                              rescale_betas_zero_snr=True), dict(s_churn=1.0)),
    "ancestral epsilon": ("EulerAncestralDiscreteScheduler", {}, {}),
    "ancestral v leading": ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction",
                                                                    timestep_spacing="leading"), {}),
    "ancestral sd trailing": ("EulerAncestralDiscreteScheduler", dict(SD, timestep_spacing="trailing"), {}),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_SWEEP)
def test_step_matches_diffusers(case, backend):
    name, config, step_kwargs = DIFFUSERS_SWEEP[case]
    ours = getattr(fs, name)(**config, backend=backend)
    theirs = getattr(diffusers, name)(**config)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * theirs.init_noise_sigma
    step_by_step(ours, theirs, x, step_kwargs=step_kwargs)


def test_custom_sigmas_and_half_precision_match_diffusers():
    """Custom sigmas (set_timesteps(sigmas=)) and an fp16 loop, as diffusers steps them."""
    sigmas = [14.0, 7.5, 3.0, 1.1, 0.3, 0.0]
    ours, theirs = fs.EulerDiscreteScheduler(backend="triton"), diffusers.EulerDiscreteScheduler()
    ours.set_timesteps(sigmas=sigmas)
    theirs.set_timesteps(sigmas=sigmas)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * 14.0
    step_by_step(ours, theirs, x)
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    step_by_step(ours, theirs, x.half(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name, settings", [("EulerAncestralDiscreteScheduler", {}),
                                            ("EulerDiscreteScheduler", CHURN)])
def test_seed_is_batch_invariant(name, settings):
    """With seed=, sample k is the same alone (offset=k) as in the batch: the same seed, the same image."""
    def make():
        s = getattr(fs, name)(**SD, backend="triton")
        s.set_timesteps(4)
        return s

    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5)) * make().init_noise_sigma
    assert_batch_invariant(make, x, seed=123, step_kwargs=settings)


def test_seed_step_equals_reference_with_counter_noise():
    """The class's seeded step is the table's step: the kernel and the float64 reference agree, and
    the noise is not torch's global generator's (changing torch.manual_seed changes nothing)."""
    ours = fs.EulerAncestralDiscreteScheduler(backend="triton")
    ours.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6)) * ours.init_noise_sigma
    outs = []
    for backend, torch_seed in (("triton", 0), ("triton", 1), ("reference", 0)):
        ours.set_timesteps(4)
        torch.manual_seed(torch_seed)
        t = ours.timesteps[0]
        outs.append(ours.step(0.5 * x, t, x, seed=9, offset=2, backend=backend).prev_sample)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)


# --- diffusers' own asserted values (tests/schedulers/test_scheduler_euler*.py), ported -------------------

# diffusers' loop: the sample times init_noise_sigma, replaced by scale_model_input's output each step, a generator
# seeded 0 given to every step; (class, config changes, loop keywords, |x| sum, |x| mean)
DIFFUSERS_VALUES = {
    "euler no noise": ("EulerDiscreteScheduler", {}, {}, 10.0807, 0.0131),
    "euler v_prediction": ("EulerDiscreteScheduler", dict(prediction_type="v_prediction"), {}, 0.0002, 2.2676e-06),
    "euler karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), {}, 124.52299499511719,
                     0.16213932633399963),
    "euler with noise": ("EulerDiscreteScheduler", {}, dict(start=8), 57062.9297, 74.3007),
    "ancestral no noise": ("EulerAncestralDiscreteScheduler", {}, {}, 152.3192, 0.1983),
    "ancestral v_prediction": ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction"), {},
                               108.4439, 0.1412),
    "ancestral with noise": ("EulerAncestralDiscreteScheduler", {}, dict(start=8), 56163.0508, 73.1290),
}


KERNEL_LOOPS = ("euler karras", "ancestral with noise")  # the interpreter is slow: the kernel on two of them


@pytest.mark.parametrize("case, backend", [(case, "torch") for case in DIFFUSERS_VALUES] +
                         [(case, "triton") for case in KERNEL_LOOPS])
def test_diffusers_asserted_full_loops(case, backend):
    name, config, loop, *values = DIFFUSERS_VALUES[case]
    scheduler = getattr(fs, name)(**DIFFUSERS_TEST_CONFIG, **config, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler, scale="sample", seed=0, **loop), *values)


# --- bad input ---------------------------------------------------------------------------------------------

def _stepped(name, config=None, **step_kwargs):
    s = getattr(fs, name)(**(config or {}))
    s.set_timesteps(3)
    x = torch.randn(SHAPE)
    return s.step(x, s.timesteps[0], x, **step_kwargs)


@pytest.mark.parametrize("call, error, match", [
    (lambda: _stepped("EulerDiscreteScheduler", dict(prediction_type="noise")), ValueError,
     "prediction_type must be one of 'epsilon', 'v_prediction', 'sample'"),
    (lambda: _stepped("EulerAncestralDiscreteScheduler", dict(prediction_type="sample")), ValueError,
     "prediction_type must be one of 'epsilon', 'v_prediction', got 'sample'"),
    (lambda: _stepped("EulerDiscreteScheduler", s_churn=-1.0), ValueError, "s_churn must be >= 0"),
    (lambda: _stepped("EulerDiscreteScheduler", s_noise=float("nan")), ValueError, "s_noise"),
    (lambda: _stepped("EulerDiscreteScheduler", s_churn=1.0, seed=1, generator=torch.Generator()), ValueError,
     "pass one noise source"),
    (lambda: _stepped("EulerAncestralDiscreteScheduler", offset=2), ValueError, "offset only applies to seed"),
    (lambda: fs.EulerDiscreteScheduler(final_sigmas_type="one").set_timesteps(4), ValueError, "'zero', or 'sigma_min'"),
    (lambda: fs.EulerDiscreteScheduler(interpolation_type="cubic").set_timesteps(4), ValueError,
     "'linear' or 'log_linear'"),
    (lambda: fs.EulerAncestralDiscreteScheduler(timestep_spacing="even").set_timesteps(4), ValueError,
     "'linspace', 'leading' or 'trailing'"),
    (lambda: fs.EulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True), ValueError, "Only one of"),
    (lambda: fs.EulerDiscreteScheduler(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_integer_timestep_and_wrong_shape_are_refused():
    s = fs.EulerDiscreteScheduler()
    s.set_timesteps(3)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="Passing integer indices"):
        s.step(x, 3, x)
    with pytest.raises(ValueError, match="model_output must have shape"):
        s.step(x[:1], s.timesteps[0], x)


# --- the drop-in: outputs, save/load, pipelines ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_saved_pipeline_reloads_fastgen_scheduler(name, tmp_path):
    """A pipeline holding fastgen's scheduler records ["fastgen", "<Class>"] and loads it back; the
    top-level package exports the class."""
    from tests.test_diffusers_parity import tiny_unet

    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=getattr(fs, name)(**SD, backend="torch"))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["fastgen", name]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is getattr(fastgen, name) is getattr(fs, name)
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    out = loaded.scheduler.step  # diffusers' output class
    loaded.scheduler.set_timesteps(2)
    x = torch.randn(SHAPE)
    result = out(x, loaded.scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert type(result).__module__.startswith("diffusers.") and np.isfinite(result.prev_sample.numpy()).all()


def test_reference_module_builders_are_registered_for_diffusers_classes():
    """The table of diffusers' own class and of fastgen's subclass is the same builder's."""
    for name, builder in (("EulerDiscreteScheduler", karras.euler_table),
                          ("EulerAncestralDiscreteScheduler", karras.euler_ancestral_table)):
        theirs, ours = getattr(diffusers, name)(), getattr(fs, name)()
        theirs.set_timesteps(3)
        ours.set_timesteps(3)
        a, b = step_table(theirs), step_table(ours)
        assert torch.equal(a.coefficients, b.coefficients) and torch.equal(a.coefficients, builder(theirs).coefficients)
        assert a.streams.tolist() == [0, 1, 2] and a.init_stream == 3
        assert torch.equal(a.model_timesteps, theirs.timesteps)
        assert a.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma))


# --- fastgen.sample's churn: Karras et al.'s Algorithm 2 as written ----------------------------------

class _TanhModel(torch.nn.Module):
    def forward(self, x, t, class_labels=None):
        return 0.5 * torch.tanh(x) + 1e-4 * t.float().reshape(-1, *[1] * (x.dim() - 1))


def _algorithm_2(shape, steps, seed, s_churn):
    """Karras et al. Alg. 2 without the second-order correction, in float64, written from the paper: the
    denoiser evaluated at the churned sample x^ at sigma^ (its timestep by diffusers' interpolation),
    z_i the counter stream i, x_N from stream N."""
    scheduler = fs.EulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double().tolist()
    abar = scheduler.alphas_cumprod.double().numpy()
    log_sigmas = np.log(((1 - abar) / abar) ** 0.5)
    x = fastgen.randn(shape, seed=seed, stream=steps, backend="reference").double() * float(scheduler.init_noise_sigma)
    for i in range(steps):
        sigma_hat = sigmas[i] * (1 + min(s_churn / steps, 2 ** 0.5 - 1))
        z = fastgen.randn(shape, seed=seed, stream=i, backend="reference").double()
        x_hat = x + math.sqrt(sigma_hat ** 2 - sigmas[i] ** 2) * z                                # l. 6
        t = torch.tensor(float(scheduler._sigma_to_t(np.array(sigma_hat), log_sigmas)), dtype=torch.float32)
        f = _TanhModel()((x_hat / math.sqrt(sigma_hat ** 2 + 1)).float(), t.expand(shape[0])).double()
        denoised = x_hat - sigma_hat * f                                                          # D(x^; sigma^)
        x = x_hat + (sigmas[i + 1] - sigma_hat) * (x_hat - denoised) / sigma_hat                # l. 7-8
    return x


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_sample_churn_is_algorithm_2(backend):
    shape, steps, seed = (3, 8), 6, 5
    got = fastgen.sample(_TanhModel(), shape, fs.EulerDiscreteScheduler(), num_inference_steps=steps, seed=seed,
                         s_churn=4.0, backend=backend)
    want = _algorithm_2(shape, steps, seed, 4.0)
    torch.testing.assert_close(got.double() / want.abs().max(), want / want.abs().max(), rtol=0, atol=2e-6)


def test_sample_churn_zero_is_no_churn_and_other_schedulers_refuse_it():
    kwargs = dict(num_inference_steps=4, seed=1)
    plain = fastgen.sample(_TanhModel(), (2, 4), fs.EulerDiscreteScheduler(), **kwargs)
    torch.testing.assert_close(fastgen.sample(_TanhModel(), (2, 4), fs.EulerDiscreteScheduler(), s_churn=0.0, **kwargs),
                               plain, rtol=0, atol=0)
    churned = fastgen.sample(_TanhModel(), (2, 4), fs.EulerDiscreteScheduler(), s_churn=3.0,
                             generator=torch.Generator().manual_seed(0), num_inference_steps=4)
    assert torch.isfinite(churned).all() and not torch.allclose(churned, plain)
    with pytest.raises(ValueError, match="s_churn applies to EulerDiscreteScheduler"):
        fastgen.sample(_TanhModel(), (2, 4), fs.EulerAncestralDiscreteScheduler(), s_churn=1.0, **kwargs)
