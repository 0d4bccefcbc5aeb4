"""The end of a sampling chain stays finite: the last DDIM step to abar_0 (set_alpha_to_one=False,
Stable Diffusion's scheduler config) on the torch and reference loops."""
import pytest
import torch

import fastgen
from fastgen.schedulers import DDIMScheduler

LATENT_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                   set_alpha_to_one=False)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_ddim_chain_ending_at_abar_0_is_finite(backend, eta):
    scheduler = DDIMScheduler(**LATENT_DDIM)
    x = fastgen.sample(lambda x, t: 0.1 * x, (2, 1, 4, 4), scheduler, num_inference_steps=10, seed=0, eta=eta,
                       backend=backend)
    assert torch.isfinite(x).all()
