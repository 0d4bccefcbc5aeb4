"""DDPMScheduler: diffusers' DDPMScheduler whose step is one fused pass (``fastgen.ddpm_step``).

Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239. A step from
timestep t to s (the next inference timestep; t - 1 before ``set_timesteps``; s = -1 at the end,
abar_{-1} = 1), with beta_{t|s} = 1 - abar_t / abar_s:

    x0  = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                    epsilon         eq. (15)
        = model output                                                   sample
        = sqrt(abar_t) x_t - sqrt(1 - abar_t) v                          v_prediction    (Salimans & Ho 2022)
    x0  = clamp(x0, -s_b, s_b) / s_b (dynamic thresholding, Imagen)  or  clamp(x0, -r, r) (clip_sample)
    mu  = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x0 + sqrt(abar_t / abar_s) (1 - abar_s) / (1 - abar_t) x_t
                                                                                         eq. (7)
    x_s = mu + [t > 0] sigma z,  z ~ N(0, I)                                             Algorithm 2
    sigma^2 = beta~ = (1 - abar_s) / (1 - abar_t) beta_{t|s}  (>= 1e-20)   fixed_small(_log)   eq. (7)
            = beta_{t|s}                                                fixed_large(_log)   sec. 3.2
            = v (the model's second C channels)                         learned
            = exp(f log beta_{t|s} + (1 - f) log beta~), f = (v + 1) / 2  learned_range (Nichol & Dhariwal eq. 15)

abar is the scheduler's own ``alphas_cumprod`` (diffusers' float32 values), so a step equals
diffusers' to fp32 rounding. Noise: by default z is drawn exactly as diffusers draws it
(``randn_tensor(model_output.shape, generator=...)``, only when t > 0). ``step(..., seed=)``
instead draws z in the kernel from fastgen's counter-based stream (stream t, counter element
(offset + b) n + g, n = elements per sample): no noise tensor, and sample k is the same in any batch
(``offset`` counts samples: ``offset=k`` for a shard from sample k).

Where this differs from diffusers on purpose:
  * variance_type="fixed_large_log": diffusers takes the square root of log(beta) and returns NaN for
    every t > 0; here it is the same variance as "fixed_large" (what the name means).
  * an unknown variance_type raises ValueError when a step needs the variance (diffusers silently
    uses "fixed_small"); an unknown prediction_type raises ValueError at construction (diffusers:
    at every step).
  * a timestep that is no inference timestep and a model output of the wrong shape raise ValueError
    instead of an IndexError or a broadcast deep inside the step.
  * what every fastgen scheduler refuses (``fastgen.schedulers``): trained_betas of a length other
    than num_train_timesteps, a bad num_inference_steps, a generator list not of the batch size, a
    missing local folder in ``from_pretrained``.
"""
import diffusers
import torch

import fastgen
from fastgen.schedulers._common import FusedStepMixin, with_backend
from fastgen.step_spec import VARIANCE_TYPES, StepSpec

NOT_SCHEDULED = -2  # in the device table of next timesteps: no inference timestep (the kernels give NaN)


class DDPMScheduler(FusedStepMixin, diffusers.DDPMScheduler):
    """diffusers' DDPMScheduler (same arguments, defaults, config, save/load and timesteps) with a fused
    ``step`` and ``add_noise``; ``backend`` (keyword-only, not part of the config): "auto" (Triton on
    CUDA, fp32 torch ops elsewhere), "triton", "torch" or "reference" (float64), as for every op."""

    __init__ = with_backend(diffusers.DDPMScheduler)
    _inference_steps_capped = True  # diffusers' set_timesteps: num_inference_steps <= num_train_timesteps
    __module__ = "fastgen"  # what a saved pipeline's model_index.json records: ["fastgen", "DDPMScheduler"]

    def _next_timestep(self, spec, t, t_host):
        """The timestep a step from t lands on, without a host synchronisation: None for t - 1 (no
        set_timesteps), a host int, or a device lookup of the next inference timestep."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return None
        if t_host is None:
            return self._prev_table(t.device).index_select(0, t.reshape(-1)).reshape(t.shape)
        order = self._host_timesteps.tolist()
        if t_host not in order:
            raise ValueError(f"timestep must be one of the scheduler's timesteps {order}, got {t_host}")
        return spec.prev_timesteps(order, self.config.num_train_timesteps)[order.index(t_host)]  # the first occurrence

    def _prev_table(self, device) -> torch.Tensor:
        """The device table of the timestep each inference timestep steps to (NOT_SCHEDULED elsewhere), made
        once per run and device (``set_timesteps`` makes it on the timesteps' device: a step traced by
        torch.compile only reads it)."""
        device = torch.device(device)
        if device not in self._prev_tables:
            order = self._host_timesteps.tolist()
            following = StepSpec("ddpm").prev_timesteps(order, self.config.num_train_timesteps)
            table = torch.full((self.num_schedule_timesteps,), NOT_SCHEDULED, dtype=torch.int64)
            for step_t, prev in reversed(list(zip(order, following))):  # the first occurrence wins
                if 0 <= step_t < len(table):
                    table[step_t] = prev
            self._prev_tables[device] = table.to(device)
        return self._prev_tables[device]

    def _prepare_tables(self):
        """After ``set_timesteps`` (FastgenMixin wraps diffusers' own): the table of next timesteps on the
        timesteps' device, which a step traced by torch.compile only reads."""
        self._prev_table(self.timesteps.device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, seed=None, offset: int = 0, backend=None):
        """x_t -> x_{prev} (module docstring), one fused pass.

        Args:
            model_output: the model's prediction, like ``sample`` ([B, 2C, ...] for learned variances).
            timestep: int, or an integer tensor of shape [] (e.g. an element of ``self.timesteps``) or
                [B] (one timestep per sample, a fastgen extension).
            sample: x_t, [B, C, ...] fp32/fp16/bf16 (the step runs in its dtype).
            generator: a torch.Generator or a list of B of them: the noise diffusers would draw.
            return_dict: False returns the tuple (prev_sample, pred_original_sample).
            seed, offset: fastgen's in-kernel counter-based noise instead (not with ``generator``);
                offset counts samples, as in ``fastgen.ddpm_step``.
            backend: overrides the scheduler's backend for this step.
        Returns DDPMSchedulerOutput(prev_sample, pred_original_sample).
        """
        backend = self._backend_arg(backend)
        offset = self._noise_source(generator, seed, offset, sample=sample)
        t, t_host = self._timestep(timestep, sample)
        # an unknown variance_type only matters where the step adds noise (diffusers then uses fixed_small)
        needs_variance = t_host != 0 or self.config.variance_type in VARIANCE_TYPES
        spec = StepSpec.from_config("ddpm", self.config, **({} if needs_variance else {"variance_type": "fixed_small"}))
        noise_dtype = getattr(model_output, "dtype", None)  # diffusers draws in the model output's dtype
        model_output = self._tensors(model_output, sample, spec.model_output_shape(sample.shape),
                                     f"variance_type={spec.variance_type!r}")
        prev_t = self._next_timestep(spec, t, t_host)
        noise = None
        if seed is None:
            seed = 0  # no in-kernel noise; never touches torch's global generator
            # diffusers' `if t > 0` (for a device tensor of per-sample timesteps: a synchronising check; while
            # torch.compile traces the step, a draw every step: the step adds no noise where t = 0)
            if t_host is not None:
                draws = spec.generator_draws(t_host)
            else:
                draws = torch.compiler.is_compiling() or bool((t > 0).any())
            if draws:
                noise = self._draw(sample.shape, generator, sample, noise_dtype)
        prev_sample, pred_original_sample = fastgen.ddpm_step(
            model_output, t, sample, self.schedule, prev_t=prev_t, spec=spec, seed=seed, noise=noise, offset=offset,
            backend=backend)
        if not return_dict:
            return prev_sample, pred_original_sample
        return diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample)
