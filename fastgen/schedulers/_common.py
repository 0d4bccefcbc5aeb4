"""What DDPMScheduler and DDIMScheduler share: diffusers' config machinery (FrozenDict, from_config,
save_config, from_pretrained of a local folder), the output type, ``randn_tensor``, timestep spacing,
``add_noise`` / ``get_velocity`` / ``scale_model_input``, and the checks of a step's arguments.

The coefficient tables come from ``fastgen.NoiseSchedule`` (float64 math, fp32 copies per device);
the steps run the fused ops ``fastgen.ddpm_step`` / ``fastgen.ddim_step`` and ``add_noise`` runs
``fastgen.q_sample``.
"""
import dataclasses
import inspect
import json
import os

import numpy as np
import torch

import fastgen
from fastgen import _checks
from fastgen.backend import BACKENDS
from fastgen.schedules import BETA_SCHEDULES, NoiseSchedule

CONFIG_NAME = "scheduler_config.json"  # diffusers' file name, so either library reads the other's folders
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
NOT_SCHEDULED = -2  # a timestep that is no inference timestep: kernels turn it into NaN (see _prev_lookup)


class FrozenDict(dict):
    """A read-only dict with attribute access: ``scheduler.config.num_train_timesteps`` (diffusers' FrozenDict).
    Change a config by building a new scheduler: ``Scheduler.from_config(scheduler.config, key=value)``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no {name!r}; keys: {', '.join(self)}") from None

    def _immutable(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is immutable; use from_config(config, key=value) for a changed copy")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _immutable
    setdefault = pop = popitem = update = clear = _immutable

    def __reduce__(self):
        return type(self), (dict(self),)


@dataclasses.dataclass
class SchedulerOutput:
    """A step's result: ``prev_sample`` (x_{t-1}, the next model input) and ``pred_original_sample``
    (the predicted x_0). Indexable like diffusers' BaseOutput: ``out[0]``, ``out["prev_sample"]``."""
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normals drawn exactly as diffusers' ``randn_tensor`` draws them: one ``torch.randn``
    with the generator (None: torch's global generator), or, for a list of generators, one draw of
    shape (1, *shape[1:]) per sample from generator b, concatenated. A CPU generator draws on the
    CPU and the result moves to ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if generator is not None:
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if not generators or not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError("generator must be a torch.Generator or a list of them (one per sample), got "
                            f"{type(generator).__name__} {generator!r}")
        gen_device = generators[0].device.type
        if gen_device != device.type and gen_device == "cpu":
            rand_device = torch.device("cpu")
        elif gen_device != device.type:
            raise ValueError(f"generator on {gen_device} cannot draw a tensor on {device}")
        if isinstance(generator, (list, tuple)) and len(generator) == 1:
            generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator must be one torch.Generator or a list of one per sample "
                             f"(batch={shape[0]}), got a list of {len(generator)}")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(rows, 0).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def _choice(value, name: str, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _positive(value, name: str, high=float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not 0 < value <= high:
        raise ValueError(f"{name} must be in (0, {high}], got {value}")
    return float(value)


def _backend(value, name="backend"):
    return _choice(value, name, BACKENDS)


class SchedulerBase:
    """Config handling and the methods DDPMScheduler and DDIMScheduler share (see the module docstring).

    Subclasses call ``_setup(config)`` from a constructor whose arguments are the config; ``backend``
    (keyword-only, not part of the config) picks the ops' backend: "auto" (Triton on CUDA, the
    float64 torch reference elsewhere), "triton" or "torch"; ``step(..., backend=)`` overrides it.
    """
    config_name = CONFIG_NAME
    order = 1
    init_noise_sigma = 1.0
    _compatibles = ["DDPMScheduler", "DDIMScheduler"]

    # --- config --------------------------------------------------------------------------------------

    @classmethod
    def _config_keys(cls):
        params = inspect.signature(cls.__init__).parameters
        return [n for n, p in params.items() if n != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]

    def _setup(self, config: dict, backend):
        config = dict(config)
        self.backend = _backend(backend)
        _choice(config["prediction_type"], "prediction_type", PREDICTION_TYPES)
        _choice(config["timestep_spacing"], "timestep_spacing", TIMESTEP_SPACINGS)
        _checks.nonneg_int(config["steps_offset"], "steps_offset")
        for name in ("clip_sample", "thresholding", "rescale_betas_zero_snr", "set_alpha_to_one"):
            if name in config:
                config[name] = _flag(config[name], name)
        _positive(config["clip_sample_range"], "clip_sample_range")
        _positive(config["dynamic_thresholding_ratio"], "dynamic_thresholding_ratio", high=1.0)
        _positive(config["sample_max_value"], "sample_max_value")
        trained = config["trained_betas"]
        if trained is None:
            _choice(config["beta_schedule"], "beta_schedule", BETA_SCHEDULES)
        else:
            trained = np.asarray(trained, dtype=np.float64)
            if trained.ndim != 1 or trained.size != config["num_train_timesteps"]:
                raise ValueError(f"trained_betas must be a 1-d sequence of num_train_timesteps="
                                 f"{config['num_train_timesteps']} betas, got shape {trained.shape}")
        self.schedule = NoiseSchedule(
            beta_schedule=config["beta_schedule"], num_train_timesteps=config["num_train_timesteps"],
            beta_start=config["beta_start"], beta_end=config["beta_end"],
            trained_betas=None if trained is None else torch.from_numpy(trained),
            rescale_betas_zero_snr=config["rescale_betas_zero_snr"])
        self._internal_dict = FrozenDict(config)
        # diffusers' attributes (fp32 on the CPU), read from the float64 schedule
        self.betas = self.schedule.betas.float()
        self.alphas = self.schedule.alphas.float()
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.one = torch.tensor(1.0)
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(len(self.schedule) - 1, -1, -1, dtype=torch.int64)
        self._prev_of = {}   # inference timestep -> the one after it (-1 at the end)
        self._prev_tables = {}

    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """A scheduler from a config dict (this library's or diffusers': ``DDPMScheduler.from_config(
        diffusers_scheduler.config)``), or from any object with a ``.config``; keyword arguments override
        it. Keys this class does not take (another scheduler's, or diffusers' ``_class_name`` etc.) are
        ignored, as diffusers ignores them."""
        if config is not None and not isinstance(config, dict):
            config = getattr(config, "config", config)
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict or have a .config, got {type(config).__name__}")
        backend = kwargs.pop("backend", "auto")
        keys = cls._config_keys()
        unknown = [k for k in kwargs if k not in keys]
        if unknown:
            raise TypeError(f"{cls.__name__}.from_config got unknown arguments {unknown}; allowed: {keys}")
        values = {k: v for k, v in (config or {}).items() if k in keys}
        values.update(kwargs)
        return cls(**values, backend=backend)

    def save_config(self, save_directory, **kwargs):
        """Writes ``scheduler_config.json`` (diffusers' format: the config plus ``_class_name``)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory!r}")
        os.makedirs(save_directory, exist_ok=True)
        config = {"_class_name": type(self).__name__, **self.config}
        if config.get("trained_betas") is not None:
            config["trained_betas"] = np.asarray(config["trained_betas"], dtype=np.float64).tolist()
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        """A scheduler from a local folder holding ``scheduler_config.json`` (as save_config or diffusers
        writes it). For a Hub id, load it with diffusers and pass its ``.config`` to from_config."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        path = os.path.join(folder, cls.config_name)
        if not os.path.isfile(path):
            raise ValueError(f"pretrained_model_name_or_path must be a local folder with {cls.config_name}, "
                             f"found none at {path!r} (for a Hub id: "
                             f"{cls.__name__}.from_config(diffusers.{cls.__name__}.from_pretrained(id).config))")
        with open(path, encoding="utf-8") as f:
            return cls.from_config(json.load(f), **kwargs)

    def __len__(self):
        return self.config.num_train_timesteps

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "trained_betas")
        return f"fastgen.schedulers.{type(self).__name__}({args})"

    @property
    def compatibles(self):
        return list(self._compatibles)

    # --- timesteps -----------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The sample unchanged (DDPM and DDIM do not scale the model input; kept for interchangeability)."""
        return sample

    def _spaced_timesteps(self, num_inference_steps) -> np.ndarray:
        """Inference timesteps, descending, as diffusers spaces them (Lin et al. 2023, Table 2):
            linspace  round(linspace(0, T - 1, N)) reversed
            leading   arange(N) * (T // N) reversed, + steps_offset
            trailing  round(arange(T, 0, -T / N)) - 1, its first N values (diffusers can append a -1)
        """
        num_train = self.config.num_train_timesteps
        if num_inference_steps is None:
            raise ValueError("num_inference_steps must be given (or custom timesteps), got None")
        n = _checks.as_int(num_inference_steps, "num_inference_steps")
        if not 1 <= n <= num_train:
            raise ValueError(
                f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`: {num_train} "
                f"(must be in [1, {num_train}]) as the unet model trained with this scheduler can only handle "
                f"maximal {num_train} timesteps.")
        spacing = _choice(self.config.timestep_spacing, "timestep_spacing", TIMESTEP_SPACINGS)
        if spacing == "linspace":
            timesteps = np.linspace(0, num_train - 1, n).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            step_ratio = num_train // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
            timesteps += self.config.steps_offset
        else:
            step_ratio = num_train / n
            # the float arange can yield one value too many (round -> 0 -> timestep -1, e.g. T = 999,
            # N = 30, where diffusers then steps at alphas_cumprod[-1]): keep the first N
            timesteps = (np.round(np.arange(num_train, 0, -step_ratio)).astype(np.int64) - 1)[:n]
        if timesteps.max() >= num_train:
            raise ValueError(f"steps_offset={self.config.steps_offset} with num_inference_steps={n} puts timestep "
                             f"{timesteps.max()} outside the schedule [0, {num_train})")
        return timesteps

    def _custom_timesteps(self, timesteps) -> np.ndarray:
        """Custom timesteps, validated as diffusers validates them (and >= 0, which diffusers does not check)."""
        values = [_checks.as_int(t, f"timesteps[{i}]") for i, t in enumerate(timesteps)]
        if not values:
            raise ValueError("timesteps must hold at least one timestep, got an empty sequence")
        for i in range(1, len(values)):
            if values[i] >= values[i - 1]:
                raise ValueError(f"`custom_timesteps` must be in descending order, got timesteps[{i - 1}:{i + 1}] = "
                                 f"{values[i - 1:i + 1]}")
        if values[0] >= self.config.num_train_timesteps:
            raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: "
                             f"{self.config.num_train_timesteps}, got {values[0]}")
        if values[-1] < 0:
            raise ValueError(f"timesteps must be >= 0, got {values[-1]}")
        return np.array(values, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None):
        """The inference timesteps (descending, in ``self.timesteps`` on ``device``): ``num_inference_steps``
        spaced by ``config.timestep_spacing``, or custom ``timesteps`` (descending, in [0, T))."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            self._set(self._custom_timesteps(timesteps), device, custom=True)
        else:
            self._set(self._spaced_timesteps(num_inference_steps), device, custom=False)

    def _set(self, timesteps: np.ndarray, device, custom: bool):
        self.custom_timesteps = custom
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        order = timesteps.tolist()
        self._prev_of = {t: (order[i + 1] if i + 1 < len(order) else -1) for i, t in enumerate(order)}
        self._prev_tables = {}

    def _prev_lookup(self, device) -> torch.Tensor:
        """[T] int64 on ``device``: the inference timestep after each one (-1 after the last); NOT_SCHEDULED
        elsewhere, which the kernels turn into NaN (a device tensor is not checked: that would synchronise)."""
        key = torch.device(device)
        if key not in self._prev_tables:
            table = torch.full((len(self.schedule),), NOT_SCHEDULED, dtype=torch.int64)
            for t, prev in self._prev_of.items():
                table[t] = prev
            self._prev_tables[key] = table.to(device)
        return self._prev_tables[key]

    def _scheduled_prev(self, t):
        """The inference timestep after ``t`` (an int, or an integer tensor on the sample's device)."""
        if isinstance(t, int):
            if t not in self._prev_of:
                raise ValueError(f"timestep must be one of the scheduler's timesteps {list(self._prev_of)}, got {t}")
            return self._prev_of[t]
        prev = self._prev_lookup(t.device)[t]
        if prev.device.type == "cpu" and (prev == NOT_SCHEDULED).any():
            bad = t[prev == NOT_SCHEDULED].flatten()[0].item()
            raise ValueError(f"timestep must be one of the scheduler's timesteps {list(self._prev_of)}, got {bad}")
        return prev

    # --- a step's arguments --------------------------------------------------------------------------

    def _timestep(self, timestep, sample: torch.Tensor):
        """An int in [0, T), or (when it lives on the sample's non-CPU device or holds one per sample) an
        integer tensor of shape [] / [B] on the sample's device. CPU values are range-checked."""
        num_train = len(self.schedule)
        if isinstance(timestep, torch.Tensor):
            if timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool:
                raise TypeError(f"timestep must be an int or an integer tensor, got a tensor of dtype {timestep.dtype}")
            if timestep.numel() == 1 and timestep.dim() <= 1 and (timestep.device.type == "cpu"
                                                                    or timestep.device != sample.device):
                timestep = int(timestep.item())
            elif timestep.dim() == 0 or (timestep.dim() == 1 and timestep.shape[0] == sample.shape[0]):
                timestep = timestep.to(sample.device)
                if timestep.device.type == "cpu" and not ((timestep >= 0) & (timestep < num_train)).all():
                    bad = timestep[(timestep < 0) | (timestep >= num_train)][0].item()
                    raise ValueError(f"timestep must be in [0, {num_train}), got {bad}")
                return timestep
            else:
                raise ValueError(f"timestep must be an int or an integer tensor of shape [] or [batch="
                                 f"{sample.shape[0]}], got shape {tuple(timestep.shape)}")
        timestep = _checks.as_int(timestep, "timestep")
        if not 0 <= timestep < num_train:
            raise ValueError(f"timestep must be in [0, {num_train}), got {timestep}")
        return timestep

    @staticmethod
    def _any_positive(t) -> bool:
        """Whether some sample's timestep is > 0 (synchronises for device tensors, as diffusers' ``if t > 0``)."""
        return t > 0 if isinstance(t, int) else bool((t > 0).any())

    @staticmethod
    def _tensors(model_output, sample, expected_shape, what: str):
        """Checks shapes and devices before any noise is drawn; the model output in the sample's dtype."""
        _checks.float_tensor(sample, "sample")
        _checks.float_tensor(model_output, "model_output")
        if sample.dim() == 0:
            raise ValueError("sample must have a batch dimension first, got a 0-d tensor")
        if model_output.device != sample.device:
            raise ValueError(f"model_output must be on sample's device {sample.device}, got {model_output.device}")
        if model_output.shape != expected_shape:
            raise ValueError(f"model_output must have shape {tuple(expected_shape)} ({what}) for sample of shape "
                             f"{tuple(sample.shape)}, got {tuple(model_output.shape)}")
        return model_output.to(sample.dtype)

    @staticmethod
    def _noise_source(generator, seed, offset):
        if seed is not None and generator is not None:
            raise ValueError("pass either generator (diffusers' noise, drawn with torch.randn) or seed (fastgen's "
                             "in-kernel counter-based noise), not both")
        if seed is None and offset:
            raise ValueError(f"offset only applies to seed= noise, got offset={offset} without a seed")
        return _checks.nonneg_int(offset, "offset")

    # --- the forward process -------------------------------------------------------------------------

    def _per_sample_timesteps(self, timesteps, like: torch.Tensor, name="timesteps"):
        """diffusers' timesteps argument ([B], [1] or [], any integer dtype and device) for the ops."""
        num_train = len(self.schedule)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = _checks.as_int(timesteps, name)
            if not 0 <= timesteps < num_train:
                raise ValueError(f"{name} must be in [0, {num_train}), got {timesteps}")
            return timesteps
        if timesteps.dtype.is_floating_point or timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
            raise TypeError(f"{name} must be integer, got a tensor of dtype {timesteps.dtype}")
        if timesteps.device.type == "cpu" and not ((timesteps >= 0) & (timesteps < num_train)).all():
            bad = timesteps[(timesteps < 0) | (timesteps >= num_train)][0].item()
            raise ValueError(f"{name} must be in [0, {num_train}), got {bad}")
        timesteps = timesteps.to(like.device).flatten()
        if timesteps.numel() == 1:
            return timesteps.reshape(())
        if timesteps.numel() != like.shape[0]:
            raise ValueError(f"{name} must hold one timestep or one per sample (batch={like.shape[0]}), "
                             f"got {timesteps.numel()}")
        return timesteps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4), fused (``fastgen.q_sample``).
        ``timesteps``: one per sample ([B]) or one for all ([] / [1] / int)."""
        _checks.float_tensor(original_samples, "original_samples")
        _checks.float_tensor(noise, "noise")
        t = self._per_sample_timesteps(timesteps, original_samples)
        return fastgen.q_sample(original_samples, t, self.schedule, noise=noise.to(original_samples.dtype),
                                backend=self.backend)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0, the v-prediction target (Salimans & Ho 2022, sec. 4)."""
        _checks.float_tensor(sample, "sample")
        _checks.like(noise, "noise", sample, "sample")
        t = self._per_sample_timesteps(timesteps, sample)
        tables = self.schedule.tables(sample.device)
        shape = (-1,) + (1,) * (sample.dim() - 1)
        a = tables["sqrt_alphas_cumprod"][t].reshape(shape)
        b = tables["sqrt_one_minus_alphas_cumprod"][t].reshape(shape)
        return (a * noise.float() - b * sample.float()).to(sample.dtype)
