"""KDPM2AncestralDiscreteScheduler: both stages fused, the ancestral noise in the second, against the
float64 reference (fastgen/reference/karras.py's kdpm2_ancestral_stage, the same counter noise; the
kernel in the interpreter), against diffusers' own step from the same generator, counter noise
batch-invariant, and in fastgen.sample."""
import diffusers
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from fastgen.step_table import step_table
from tests.sigma_utils import SHAPE, assert_batch_invariant, assert_trajectories_agree, fresh_sample, toy_model
from tests.utils import assert_close

# (scheduler config, inference steps)
SWEEP = {
    "epsilon": ({}, 6),
    "v_prediction karras": (dict(prediction_type="v_prediction", use_karras_sigmas=True), 5),
    "trailing": (dict(timestep_spacing="trailing"), 3),
}


def _pair(case, backend):
    config, steps = SWEEP[case]
    ours = fs.KDPM2AncestralDiscreteScheduler(**config, backend=backend)
    theirs = diffusers.KDPM2AncestralDiscreteScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    return ours, theirs


@pytest.mark.parametrize("case", SWEEP)
def test_kernel_trajectory_matches_float64_reference(case):
    _, theirs = _pair(case, "torch")
    table = step_table(theirs)
    assert table.any_draws and table.generator_draws.tolist() == [k % 2 == 1 for k in range(table.num_steps)]
    assert_trajectories_agree(table, fresh_sample(table, torch.Generator().manual_seed(len(case))), seed=17)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", SWEEP)
def test_step_matches_diffusers_to_fp32_rounding(case, backend):
    """Both sides step from diffusers' output at every stage, the generators seeded alike."""
    ours, theirs = _pair(case, backend)
    g_ours, g_theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * theirs.init_noise_sigma
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        m = toy_model(theirs.scale_model_input(x, t_theirs), t_theirs)
        ours.scale_model_input(x, t_ours)
        got, want = ours.step(m, t_ours, x, generator=g_ours), theirs.step(m, t_theirs, x, generator=g_theirs)
        scale = max(1.0, float(x.abs().max()))
        assert_close(got.prev_sample, want.prev_sample, rtol=1e-5, atol=2e-6 * scale)
        assert_close(got.pred_original_sample, want.pred_original_sample, rtol=1e-5, atol=2e-6 * scale)
        x = want.prev_sample


def test_seed_is_batch_invariant():
    def make():
        s = fs.KDPM2AncestralDiscreteScheduler(backend="triton")
        s.set_timesteps(3)
        return s

    assert_batch_invariant(make, torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5)), seed=80)


def test_sample_runs_kdpm2_ancestral():
    class Model(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return 0.5 * torch.tanh(x)

    scheduler = fastgen.sampling.make_scheduler("kdpm2_ancestral")
    fast = fastgen.sample(Model(), (2, 8), scheduler, num_inference_steps=4, seed=3, backend="torch")
    ref = fastgen.sample(Model(), (2, 8), scheduler, num_inference_steps=4, seed=3, backend="reference")
    torch.testing.assert_close(fast, ref.float(), rtol=1e-5, atol=1e-5)
