"""fastgen: fused Triton kernels for sampling from generative models, each checked against a torch reference."""
from fastgen.backend import resolve_backend
from fastgen.ops import randn
from fastgen.ops import latents
from fastgen.ops import gaussian_kl, reparameterize, reparameterize_with_kl
from fastgen.ops import ddim_step, ddpm_step, q_sample
from fastgen.schedules import NoiseSchedule

__version__ = "0.1.0"

__all__ = ["randn", "resolve_backend", "__version__"]
__all__ += ["latents"]
__all__ += ["gaussian_kl", "reparameterize", "reparameterize_with_kl"]
__all__ += ["NoiseSchedule", "q_sample", "ddpm_step", "ddim_step"]
from fastgen.sampling import sample

__all__ += ["sample"]
