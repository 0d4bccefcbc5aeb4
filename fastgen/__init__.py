"""fastgen: fused Triton kernels for sampling from generative models, each checked against a torch reference."""
from fastgen.backend import resolve_backend
from fastgen.ops import randn
from fastgen.ops import ddim_step, ddpm_step, q_sample
from fastgen.schedules import NoiseSchedule

__version__ = "0.1.0"

__all__ = ["randn", "resolve_backend", "__version__"]
__all__ += ["NoiseSchedule", "q_sample", "ddpm_step", "ddim_step"]
