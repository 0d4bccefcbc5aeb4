"""Reference generative models built on fastgen's ops."""
from fastgen.models.vae import VAE

__all__ = ["VAE"]
