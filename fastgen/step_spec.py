"""The step specification: every setting of a reverse diffusion step, validated once, in one frozen value.

    spec = StepSpec("ddim", prediction_type="v_prediction", clip_sample=False, eta=0.5)
    spec = StepSpec.from_scheduler(scheduler)     # diffusers' or fastgen's DDPMScheduler / DDIMScheduler
    fastgen.ddim_step(model_output, t, prev_t, sample, schedule, spec=spec)

A spec is built once (by a scheduler, ``fastgen.sample`` or an op called with keyword settings) and
handed down unchanged: scheduler -> op -> launcher (its constexprs) or reference. It owns the allowed
values of every setting and their defaults (diffusers' defaults), the rule for the model output's
shape (learned variances carry 2C channels on dim 1), the rule for the timestep a step lands on, and
whether a step draws noise. The kernels own their constexpr codes (kernels/diffusion.py), and their
launchers translate a spec's names into them in one place (``_spec_constexprs`` there).
"""
import dataclasses
import math

import torch

from fastgen import _checks

KINDS = ("ddpm", "ddim")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _number_in(value, name: str, low: float, high: float, *, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    inside = (value > low if low_open else value >= low) and value <= high and value == value  # NaN is not inside
    if not inside:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The settings of one DDPM or DDIM step (diffusers' names and defaults; see the module docstring).

    kind: "ddpm" or "ddim".
    prediction_type: "epsilon", "sample" or "v_prediction".
    variance_type (DDPM): one of VARIANCE_TYPES; "learned"/"learned_range" read 2C model channels.
    clip_sample, clip_sample_range: clamp the predicted x0 to +-range.
    thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding (takes
        precedence over clip_sample, as in diffusers).
    eta (DDIM): in [0, 1], the weight of the noise; use_clipped_model_output (DDIM): eps from the
        clipped x0; set_alpha_to_one (DDIM): abar after the last step is 1, else abar_0.
    """
    kind: str = "ddpm"
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    eta: float = 0.0
    use_clipped_model_output: bool = False
    set_alpha_to_one: bool = True

    def __post_init__(self):
        _checks.choice(self.kind, "kind", KINDS)
        _checks.choice(self.prediction_type, "prediction_type", PREDICTION_TYPES)
        _checks.choice(self.variance_type, "variance_type", VARIANCE_TYPES)
        for name in ("clip_sample", "thresholding", "use_clipped_model_output", "set_alpha_to_one"):
            _flag(getattr(self, name), name)
        numbers = dict(clip_sample_range=(0.0, math.inf, True), dynamic_thresholding_ratio=(0.0, 1.0, True),
                       sample_max_value=(0.0, math.inf, True), eta=(0.0, 1.0, False))
        for name, (low, high, low_open) in numbers.items():
            object.__setattr__(self, name, _number_in(getattr(self, name), name, low, high, low_open=low_open))
        if self.kind == "ddim" and self.variance_type != "fixed_small":
            raise ValueError(f"variance_type is a DDPM setting; a DDIM step's variance is eta's, got variance_type="
                             f"{self.variance_type!r}")
        if self.kind == "ddpm" and (self.eta or self.use_clipped_model_output or not self.set_alpha_to_one):
            raise ValueError("eta, use_clipped_model_output and set_alpha_to_one are DDIM settings; a DDPM step "
                             f"takes their defaults, got eta={self.eta}, use_clipped_model_output="
                             f"{self.use_clipped_model_output}, set_alpha_to_one={self.set_alpha_to_one}")

    @classmethod
    def from_config(cls, kind: str, config, **overrides) -> "StepSpec":
        """The spec of a scheduler config (a dict or diffusers' FrozenDict): the keys this spec has are
        taken (missing ones keep their defaults), ``overrides`` win (e.g. a step's ``eta``)."""
        fields = set(SETTINGS)
        if kind == "ddpm":
            fields -= {"eta", "use_clipped_model_output", "set_alpha_to_one"}
        else:
            fields -= {"variance_type"}
        values = {name: config[name] for name in fields if name in config and config[name] is not None}
        for name in ("clip_sample", "thresholding", "set_alpha_to_one"):  # JSON configs may hold numpy bools
            if name in values and not isinstance(values[name], bool) and values[name] in (0, 1):
                values[name] = bool(values[name])
        return cls(kind=kind, **{**values, **overrides})

    @classmethod
    def from_scheduler(cls, scheduler, **overrides) -> "StepSpec":
        """The spec of a DDPMScheduler or DDIMScheduler (diffusers' or fastgen's, or any object whose
        config names one of them in ``_class_name``)."""
        kinds = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
        config = dict(getattr(scheduler, "config", None) or {})
        name = type(scheduler).__name__ if type(scheduler).__name__ in kinds else config.get("_class_name")
        if name not in kinds:
            raise ValueError(f"scheduler must be one of {sorted(kinds)}, got {type(scheduler).__name__}")
        return cls.from_config(kinds[name], config, **overrides)

    def replace(self, **changes) -> "StepSpec":
        """A copy with some settings changed, validated again."""
        return dataclasses.replace(self, **changes)

    # --- the rules ------------------------------------------------------------------------------------

    @property
    def learned_variance(self) -> bool:
        return self.kind == "ddpm" and self.variance_type in LEARNED_VARIANCES

    def model_output_shape(self, sample_shape) -> torch.Size:
        """The model output's shape for a sample of ``sample_shape``: the same, or 2C channels on dim 1
        for a learned variance (diffusers' convention: prediction first, then the variance)."""
        sample_shape = torch.Size(sample_shape)
        if not self.learned_variance:
            return sample_shape
        if len(sample_shape) < 2:
            raise ValueError(f"sample must have a channel dimension (dim 1) for variance_type={self.variance_type!r}, "
                             f"got shape {tuple(sample_shape)}")
        return torch.Size((sample_shape[0], 2 * sample_shape[1], *sample_shape[2:]))

    def check_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        """ValueError unless ``model_output`` has the shape ``model_output_shape`` says."""
        expected = self.model_output_shape(sample.shape)
        if model_output.shape != expected:
            what = " (prediction and variance channels)" if self.learned_variance else ""
            raise ValueError(f"model_output must have shape {tuple(expected)}{what} for sample of shape "
                             f"{tuple(sample.shape)} and {self.kind} variance_type={self.variance_type!r}, got "
                             f"{tuple(model_output.shape)}")

    def prev_timesteps(self, timesteps, num_train_timesteps: int, num_inference_steps: int = None):
        """The timestep each step of a chain lands on, -1 at the end, for a list of ints or an integer
        tensor (the result is of the same kind). DDPM: the next one in ``timesteps`` (the chain,
        descending). DDIM: t - T // N for every spacing (diffusers' rule; N = num_inference_steps,
        default len(timesteps)), for any timesteps."""
        is_tensor = isinstance(timesteps, torch.Tensor)
        if self.kind == "ddpm":
            return torch.cat([timesteps[1:], timesteps.new_full((1,), -1)]) if is_tensor else [*timesteps[1:], -1]
        stride = num_train_timesteps // (len(timesteps) if num_inference_steps is None else num_inference_steps)
        return (timesteps - stride).clamp_min(-1) if is_tensor else [max(t - stride, -1) for t in timesteps]

    def generator_draws(self, t: int) -> bool:
        """Whether a step at (host) timestep t draws noise from diffusers' generator: DDPM where t > 0,
        DDIM wherever eta > 0 (at t = 0 too, though no noise is added there)."""
        return t > 0 if self.kind == "ddpm" else self.eta > 0

    @property
    def adds_noise(self) -> bool:
        """Whether any step of this spec adds noise (DDIM with eta = 0 never does)."""
        return self.kind == "ddpm" or self.eta > 0

    def final_alpha_cumprod(self, schedule) -> float:
        """abar after the last step (s = -1): 1, or abar_0 for DDIM with set_alpha_to_one=False."""
        return 1.0 if self.set_alpha_to_one else schedule.first_alpha_cumprod


SETTINGS = tuple(f.name for f in dataclasses.fields(StepSpec) if f.name != "kind")  # a spec's settings, by name
