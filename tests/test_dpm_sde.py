"""DPMSolverSDEScheduler: the fused stages with counter-based Brownian increments against the float64
reference (fastgen/reference/dpm_sde.py; the kernel in the interpreter on a CPU), the stages' equations
against diffusers' own step on the same increments, the increments' law, batch invariance,
diffusers' own step (its torchsde tree) without seed=, and diffusers' asserted values."""
import math

import diffusers
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from fastgen.reference import dpm_sde
from fastgen.step_table import step_table
from tests.sigma_utils import (DIFFUSERS_TEST_CONFIG, SHAPE, assert_abs_sum_mean, assert_batch_invariant,
                               assert_sample_matches_reference, assert_trajectories_agree, diffusers_full_loop,
                               fresh_sample, model_input, reference_trajectory, seeded_loop, toy_model)

SWEEP = {
    "default": ({}, 6),
    "karras v_prediction": (dict(prediction_type="v_prediction", use_karras_sigmas=True), 8),
    "exponential trailing": (dict(use_exponential_sigmas=True, timestep_spacing="trailing"), 5),
}


def _schedulers(case, backend="torch"):
    config, steps = SWEEP[case]
    ours, theirs = fs.DPMSolverSDEScheduler(**config, backend=backend), diffusers.DPMSolverSDEScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    return ours, theirs


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs = _schedulers(case)
    table = step_table(theirs)
    assert table.reads_previous_noise
    assert_trajectories_agree(table, fresh_sample(table, torch.Generator().manual_seed(len(case))), seed=7)


class _Increments:
    """A stand-in for diffusers' Brownian tree: fixed increments n(sigma, sigma_next) per interval, from
    which fastgen's halves are recovered (``brownian_increments`` inverted)."""

    def __init__(self, shape, seed):
        self.shape, self.generator, self.drawn = shape, torch.Generator().manual_seed(seed), {}

    def __call__(self, sigma, sigma_next):
        key = (f"{float(sigma):.4g}", f"{float(sigma_next):.4g}")  # diffusers' sigmas pass through exp(-(-log)) in fp32
        if key not in self.drawn:
            self.drawn[key] = torch.randn(self.shape, generator=self.generator)
        return self.drawn[key]


@pytest.mark.parametrize("case", SWEEP)
def test_stages_match_diffusers_on_the_same_increments(case):
    """diffusers' step on given increments n_1, n_2 equals fastgen's stage equations on the halves they
    come from (z_1 = n_1, z_2 = (sqrt(d) n_2 - sqrt(d_1) n_1) / sqrt(d_2)), stage by stage."""
    _, theirs = _schedulers(case)
    table = step_table(theirs)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * theirs.init_noise_sigma
    theirs.noise_sampler = increments = _Increments(SHAPE, 3)
    sigmas, start = theirs.sigmas.double().tolist(), None
    for k, t in enumerate(theirs.timesteps):
        first = theirs.state_in_first_order
        m = toy_model(model_input(theirs, x, t), t)
        want = theirs.step(m, t, x).prev_sample
        sigma, sigma_next = (sigmas[k], sigmas[k + 1]) if first else (sigmas[k - 1], sigmas[k])
        z = None
        if sigma_next != 0:
            sigma_mid = math.sqrt(sigma * sigma_next)
            n1 = increments(sigma, sigma_mid).double()
            d1, d2 = sigma - sigma_mid, sigma_mid - sigma_next
            z = n1 if first else ((math.sqrt(d1 + d2) * increments(sigma, sigma_next).double() - math.sqrt(d1) * n1)
                                  / math.sqrt(d2), n1)
        got, _ = table.reference(k, m.double(), x.double(), None if first else start, z)
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5 * scale)
        start = x.double() if first else None  # the step's start, which the second stage steps from
        x = want


def test_increments_are_brownian():
    """n_1, n_2 from independent halves have unit variance and correlation sqrt(d_1 / d) (one path's
    increments over [sigma_m, sigma] and [sigma_next, sigma]), as torchsde's tree gives them."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(400_000, generator=g, dtype=torch.float64), torch.randn(400_000, generator=g,
                                                                                 dtype=torch.float64)
    sigma, sigma_next = 3.0, 0.5
    sigma_mid = math.sqrt(sigma * sigma_next)
    n1, n2 = dpm_sde.brownian_increments(z1, z2, sigma, sigma_mid, sigma_next)
    assert abs(float(n2.var()) - 1) < 0.01 and abs(float(n1.var()) - 1) < 0.01
    correlation = float(torch.corrcoef(torch.stack([n1, n2]))[0, 1])
    assert abs(correlation - math.sqrt((sigma - sigma_mid) / (sigma - sigma_next))) < 0.005


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seeded_step_is_the_reference_and_batch_invariant(backend):
    """step(..., seed=) stage by stage, as a pipeline calls it, equals the float64 reference run on the
    same counter noise, and sample k stepped alone (offset=k) is sample k of the batch."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * 14.6

    def make():
        scheduler = fs.DPMSolverSDEScheduler(backend=backend)
        scheduler.set_timesteps(5)
        return scheduler

    want = reference_trajectory(step_table(make()), x, seed=11)
    got = seeded_loop(make(), x, seed=11)
    torch.testing.assert_close(got, want.float(), rtol=2e-5, atol=2e-5 * float(want.abs().max()))
    assert_batch_invariant(make, x, seed=11)


@pytest.mark.filterwarnings("ignore:Should have")  # torchsde's own, from diffusers' step at the run's ends
def test_without_seed_the_step_is_diffusers_own():
    ours, theirs = (cls(noise_sampler_seed=0) for cls in (fs.DPMSolverSDEScheduler, diffusers.DPMSolverSDEScheduler))
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(4)
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for t in theirs.timesteps:
        x = ours.step(toy_model(model_input(ours, x, t), t), t, x).prev_sample
        y = theirs.step(toy_model(model_input(theirs, y, t), t), t, y).prev_sample
    torch.testing.assert_close(x, y, rtol=0, atol=0)


# diffusers' own test (tests/schedulers/test_scheduler_dpm_sde.py), its CPU values: 10 steps of its dummy model from
# its deterministic sample times init_noise_sigma, the sample replaced by scale_model_input's output each step (the
# model and the step get that), no generator: the Brownian tree seeded by noise_sampler_seed=0. Without seed= the
# step is diffusers' own (torchsde's tree), on either backend; on the CPU, since the tree draws other numbers on
# CUDA (the test asserts other values there). Its full_loop_device test repeats the no-noise loop.
# (config changes, |x| sum, |x| mean[, sum tolerance, mean tolerance])
DIFFUSERS_VALUES = {
    "no noise": ({}, 162.52383422851562, 0.211619570851326),
    "v_prediction": (dict(prediction_type="v_prediction"), 119.8487548828125, 0.1560530662536621),
    "karras sigmas": (dict(use_karras_sigmas=True), 170.3135223388672, 0.23003872730981811, 1e-2, 1e-2),
}


@pytest.mark.filterwarnings("ignore:Should have")  # torchsde's own, from diffusers' step at the run's ends
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DIFFUSERS_VALUES)
def test_diffusers_asserted_full_loops(case, backend):
    config, *values = DIFFUSERS_VALUES[case]
    scheduler = fs.DPMSolverSDEScheduler(**DIFFUSERS_TEST_CONFIG, noise_sampler_seed=0, **config, backend=backend)
    assert_abs_sum_mean(diffusers_full_loop(scheduler, scale="sample", device="cpu"), *values)


def test_noise_tensor_and_generator_are_refused():
    table_scheduler = diffusers.DPMSolverSDEScheduler()
    table_scheduler.set_timesteps(4)
    table = step_table(table_scheduler)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="pass seed=, not a noise tensor"):
        fastgen.ops.samplers.sampler_step(table, 1, x, x, prev_denoised=x, noise=x)
    with pytest.raises(ValueError, match="pass seed=, not generator="):
        fastgen.sample(lambda x, t: x, (2, 4), fs.DPMSolverSDEScheduler(), num_inference_steps=3,
                       generator=torch.Generator().manual_seed(0))


def test_saved_scheduler_reloads_as_fastgen(tmp_path):
    fs.DPMSolverSDEScheduler(use_karras_sigmas=True).save_pretrained(tmp_path)
    reloaded = fs.DPMSolverSDEScheduler.from_pretrained(tmp_path)
    assert type(reloaded) is fs.DPMSolverSDEScheduler and reloaded.config.use_karras_sigmas


def test_sample_runs_dpm_sde():
    assert_sample_matches_reference("dpm_sde", 6)


def test_missing_torchsde_is_named(monkeypatch):
    """diffusers' class needs torchsde: without it fastgen does not export the drop-in, and asking for it
    raises ImportError naming the package (every other scheduler still imports)."""
    import importlib.util

    from fastgen import registry

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "torchsde" else
                        find_spec(name, *args))
    assert not registry.available(registry.BY_NAME["dpm_sde"]) and "dpm_sde" not in [
        sampler.name for sampler in registry.SAMPLERS if sampler.digits and registry.available(sampler)]
    with pytest.raises(ImportError, match="DPMSolverSDEScheduler needs the torchsde package"):
        registry.scheduler_class("DPMSolverSDEScheduler")
