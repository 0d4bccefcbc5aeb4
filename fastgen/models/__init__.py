"""Reference generative models in plain torch (the VAE can run on fastgen's fused ops)."""
from fastgen.models import gan  # noqa: F401
from fastgen.models.vae import VAE

__all__ = ["VAE", "gan"]
from fastgen.models import denoisers  # noqa: F401
from fastgen.models.denoisers import MLPDenoiser, UNetDenoiser, pretrained_denoiser

__all__ += ["denoisers", "MLPDenoiser", "UNetDenoiser", "pretrained_denoiser"]
from fastgen.models import flows  # noqa: F401
from fastgen.models.flows import Flow, pretrained_flow

__all__ += ["flows", "Flow", "pretrained_flow"]
