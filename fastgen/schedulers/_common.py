"""What fastgen's schedulers add to diffusers' own classes: ``FastgenMixin`` for every one of them,
``FusedStepMixin`` for DDPMScheduler and DDIMScheduler (the sigma-space ones: _sigma.py).

diffusers provides the config (``register_to_config``, ``from_config``, ``save_pretrained`` /
``from_pretrained``), ``set_timesteps``, ``previous_timestep``, ``_get_variance``, ``compatibles``,
the output classes and the tables (``alphas_cumprod`` in float32). fastgen adds:

- ``step`` through a fused op (``fastgen.ddpm_step`` / ``fastgen.ddim_step``) reading per-step
  coefficients from a device table made once from the scheduler's own ``alphas_cumprod``: the
  values diffusers steps with, so results equal diffusers' to fp32 rounding of the same formula;
- ``add_noise`` through ``fastgen.q_sample`` on the same table;
- counter-based noise (``step(..., seed=, offset=)``, offset counted in samples) and a ``backend``
  (constructor keyword, ``from_config`` keyword, attribute, or per ``step``);
- checks diffusers leaves to a step, or to an error deep inside its own code, made where the value
  is given (``FastgenMixin``): the config at construction (``prediction_type``, the length of
  ``trained_betas``), ``num_inference_steps`` in ``set_timesteps``, a list of generators against
  the batch in ``step``, a missing local folder in ``from_pretrained``; config keys diffusers'
  config object cannot hold are ignored as diffusers ignores any unknown key.

No step synchronises with the host: a timestep read from ``self.timesteps`` (``for t in
scheduler.timesteps``) is located by its place in that tensor, whatever its device, so the
per-step decisions diffusers makes on the host (does this step draw noise? which timestep
comes next?) are made from host copies or on the device.
"""
import functools
import inspect
import os

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.configuration_utils import logger as _config_logger

import fastgen
from fastgen import _checks
from fastgen.backend import BACKENDS
from fastgen.schedules import NoiseSchedule
from fastgen.step_spec import PREDICTION_TYPES


def with_backend(diffusers_class):
    """``diffusers_class.__init__`` plus the keyword-only ``backend`` ("auto", "triton", "torch", "reference"),
    which is not part of the config. The signature is diffusers' with ``backend`` appended, so
    ``from_config(config, backend="torch")`` passes it through and the config keys stay diffusers'."""
    base_init = diffusers_class.__init__

    @functools.wraps(base_init)
    def __init__(self, *args, backend="auto", **kwargs):
        self._constructing = True  # diffusers' __init__ may call set_timesteps (Heun, KDPM2): not a run yet
        base_init(self, *args, **kwargs)
        self._constructing = False
        self._check_config()
        self.backend = backend
        self._setup_fused()

    signature = inspect.signature(base_init)
    backend_param = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto")
    __init__.__signature__ = signature.replace(parameters=[*signature.parameters.values(), backend_param])
    del __init__.__wrapped__  # inspect must read __signature__, not diffusers' own
    return __init__


def schedule_of(scheduler) -> NoiseSchedule:
    """The NoiseSchedule of a diffusers scheduler's own tables: its float32 ``alphas_cumprod`` as they
    are, and as the one-step beta_t the value its step computes, 1 - abar_t / abar_{t-1} in float32
    (diffusers' rounding included: near t = 0 that difference cancels, and diffusers' asserted
    results carry its rounding). Wider steps use the cancellation-free 1 - abar_t / abar_s of
    fastgen's ops, which agrees with diffusers' to its float32 rounding."""
    given = scheduler.betas.detach().cpu().double()
    if not torch.isfinite(given).all() or not ((given >= 0) & (given <= 1)).all():
        bad = int((~torch.isfinite(given) | (given < 0) | (given > 1)).nonzero()[0])
        raise ValueError(f"the scheduler's betas must be in [0, 1] (alpha_t = 1 - beta_t is a probability), "
                         f"got betas[{bad}] = {given[bad].item()} from its config")
    abar = scheduler.alphas_cumprod.detach().cpu().float()
    vanished = (abar[:-1] == 0).nonzero()
    if vanished.numel():
        t = int(vanished[0])
        raise ValueError(f"the scheduler's alphas_cumprod underflows to 0 in float32 at t = {t} < T - 1 = "
                         f"{len(abar) - 1} (its config's betas are too large for that many steps): x_0 = x_t / "
                         "sqrt(alphabar_t) is undefined from there on, every sampling chain is NaN "
                         "(degenerate schedule)")
    betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return NoiseSchedule.from_alphas_cumprod(abar, betas)


def checked_set_timesteps(set_timesteps):
    """``set_timesteps`` that checks num_inference_steps before it runs (``check_inference_steps``) and
    calls ``_prepare_tables`` after; ``inspect.signature`` still reads diffusers' signature (pipelines
    inspect it for ``timesteps`` / ``sigmas``)."""
    signature = inspect.signature(set_timesteps)
    custom = tuple(name for name in ("timesteps", "sigmas") if name in signature.parameters)

    @functools.wraps(set_timesteps)
    def checked(self, *args, **kwargs):
        if not getattr(self, "_constructing", False):
            check_trained_betas(self.config)
        check_inference_steps(self, signature.bind(self, *args, **kwargs).arguments, custom)
        result = set_timesteps(self, *args, **kwargs)
        self._prepare_tables()
        return result

    checked.checks_inference_steps = True
    return checked


def check_trained_betas(config):
    """One trained beta per training timestep before a schedule of inference steps is made: diffusers
    takes ``trained_betas`` as the betas and ``num_train_timesteps`` as the number of timesteps, and
    where they disagree its timesteps index outside the tables or skip part of them. (Such a config
    still constructs, saves and loads, as in diffusers: only sampling with it is refused.)"""
    betas = config.get("trained_betas")
    if betas is not None and np.size(betas) != config.num_train_timesteps:
        raise ValueError(f"trained_betas must hold one beta per training timestep to sample, num_train_timesteps="
                         f"{config.num_train_timesteps}, got {np.size(betas)} betas (pass num_train_timesteps="
                         f"{np.size(betas)} with them)")


def check_inference_steps(scheduler, arguments, custom=()):
    """num_inference_steps of a ``set_timesteps`` call (its bound ``arguments``): a positive int, at most
    the config's num_train_timesteps where diffusers' class requires it; None only beside a custom
    schedule (one of the argument names ``custom``: timesteps= or sigmas=, diffusers' own to check).
    TypeError / ValueError naming it otherwise, before diffusers divides by it or indexes with it."""
    steps = arguments.get("num_inference_steps")
    if steps is None and any(arguments.get(name) is not None for name in custom):
        return
    limit = scheduler.config.num_train_timesteps if scheduler._inference_steps_capped else None
    allowed = "a positive int" if limit is None else f"an int in [1, num_train_timesteps={limit}]"
    if custom:
        allowed += f" (or None with custom {' or '.join(name + '=' for name in custom)})"
    if steps is None:
        raise ValueError(f"num_inference_steps must be {allowed}, got None")
    steps = _checks.as_int(steps, "num_inference_steps")
    if steps < 1 or (limit is not None and steps > limit):
        raise ValueError(f"num_inference_steps must be {allowed}, got {steps}")


UNSTORABLE_KEYS = frozenset(dir(FrozenDict))  # config keys FrozenDict cannot set as attributes (its own names)


def storable_config(config: dict, cls) -> dict:
    """``config`` without the keys diffusers' config object cannot hold: Python's own names (``__class__``,
    any ``__...``) and FrozenDict's attribute names (``items``, ``get``, ...), which diffusers would set
    as attributes and fail on, or break the config with. They are no scheduler setting: ignored with
    the warning diffusers gives for every unexpected key."""
    dropped = {key: value for key, value in config.items()
               if not isinstance(key, str) or key.startswith("__") or key in UNSTORABLE_KEYS}
    if not dropped:
        return config
    _config_logger.warning(f"The config attributes {dropped} were passed to {cls.__name__}, but are not expected and "
                           f"will be ignored. Please verify your {cls.config_name} configuration file.")
    return {key: value for key, value in config.items() if key not in dropped}


def local_path(path):
    """``pretrained_model_name_or_path`` as diffusers should read it: ``~`` expanded where that names an
    existing file or folder. FileNotFoundError naming it where it is meant as a local path
    (``looks_local``) and does not exist, before diffusers turns to the Hub; a Hub repository id
    ("name" or "owner/name") is returned as it is."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    text = os.fspath(path)
    if not isinstance(text, str):
        return path
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        return path if expanded == text else expanded
    if looks_local(path):
        raise FileNotFoundError(f"pretrained_model_name_or_path: no such folder {text!r} (a local path; a Hub "
                                "repository id is 'name' or 'owner/name')")
    return path


def looks_local(path) -> bool:
    """Whether ``path`` names a local file or folder rather than a Hub repository id: a path object; text
    that begins with '/', './', '../' or '~' (or is '.' / '..'); holds a separator other than '/'
    (Windows' '\\'); holds more than one '/' (a Hub id has at most one); or 'folder/name' where
    folder exists here. ('/' itself, the separator on POSIX, is also the Hub's owner/name separator.)"""
    if not isinstance(path, str):
        return True
    if path.startswith(("/", "./", "../", "~")) or path in (".", ".."):
        return True
    if any(sep and sep != "/" and sep in path for sep in (os.sep, os.altsep)):
        return True
    parts = path.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


class FastgenMixin:
    """What every fastgen scheduler adds to its diffusers base class: the backend, an atomic config
    file, the checks of its config, of ``set_timesteps``' num_inference_steps and of a step's
    tensors and noise arguments, diffusers' noise draw, and loading that names a missing local
    folder. Listed before diffusers' class in the bases, so these methods take precedence."""

    _prediction_types = PREDICTION_TYPES  # the config's prediction types this scheduler's step knows
    _inference_steps_capped = False  # True where diffusers' set_timesteps requires num_inference_steps <= T

    def __init_subclass__(cls, **kwargs):
        """Every scheduler's ``set_timesteps`` (diffusers', or a subclass's own) checks its
        num_inference_steps before it runs and makes the step's device tables after it."""
        super().__init_subclass__(**kwargs)
        set_timesteps = getattr(cls, "set_timesteps", None)
        if set_timesteps is not None and not getattr(set_timesteps, "checks_inference_steps", False):
            cls.set_timesteps = checked_set_timesteps(set_timesteps)

    def _prepare_tables(self):
        """Makes the device tables a step reads for the timesteps just set (none here), so that a step
        traced by torch.compile only reads them."""

    # --- config ----------------------------------------------------------------------------------------

    def _check_config(self):
        """The config values a step relies on, checked at construction (diffusers finds a bad one at a
        step, or never): a prediction type this step knows."""
        config = self.config
        if "prediction_type" in config:
            _checks.choice(config.prediction_type, "prediction_type", self._prediction_types)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``; a key that cannot be a config attribute (``storable_config``) is
        ignored with diffusers' warning for unexpected keys, as every other unknown key is."""
        if isinstance(config, dict):
            config = storable_config(config, cls)
        return super().from_config(config, return_unused_kwargs, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False,
                        **kwargs):
        """diffusers' ``from_pretrained``; a local path that does not exist raises FileNotFoundError
        naming it (``local_path``) instead of diffusers' failed Hub lookup, and ``~`` is expanded."""
        return super().from_pretrained(local_path(pretrained_model_name_or_path), subfolder=subfolder,
                                       return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value):
        if not isinstance(value, str) or value not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
        self._backend = value

    def to_json_file(self, json_file_path):
        """diffusers' config file (what ``save_config`` / ``save_pretrained`` write), written whole or
        not at all: a failing write leaves the file that was there."""
        from fastgen._files import atomic_write

        with atomic_write(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    # --- a step's arguments --------------------------------------------------------------------------

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
    def _noise_source(generator, seed, offset, variance_noise=None, *, sample):
        """Checks the noise arguments (before any draw): one of generator / variance_noise / seed; a
        list of generators holds one per sample of ``sample`` (or one for all, as diffusers takes it)."""
        given = [name for name, value in (("generator", generator), ("variance_noise", variance_noise),
                                          ("seed", seed)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"pass one noise source: generator (diffusers' noise), variance_noise (the noise itself)"
                             f" or seed (fastgen's in-kernel counter-based noise), got {' and '.join(given)}")
        if seed is None and offset:
            raise ValueError(f"offset only applies to seed= noise, got offset={offset} without a seed")
        if isinstance(generator, list) and isinstance(sample, torch.Tensor) and sample.dim() > 0:
            batch = sample.shape[0]
            if len(generator) not in (1, batch):
                raise ValueError(f"generator must be a torch.Generator or a list of one per sample (batch size "
                                 f"{batch}; a list of 1 serves the whole batch), got a list of {len(generator)}")
        return _checks.nonneg_int(offset, "offset")

    def _backend_arg(self, backend):
        if backend is None:
            return self.backend
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        return backend

    @staticmethod
    def _draw(shape, generator, like: torch.Tensor, dtype):
        """diffusers' noise: ``randn_tensor`` exactly as its step calls it, in the sample's dtype."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=like.device, dtype=dtype).to(like.dtype)


class FusedStepMixin(FastgenMixin):
    """The parts of a fused scheduler that DDPMScheduler and DDIMScheduler share (module docstring)."""

    def _setup_fused(self):
        self.schedule = schedule_of(self)

    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value):
        """Assigned by diffusers' ``__init__`` / ``set_timesteps`` (or by a caller): a host copy is taken
        here, once (what ``step`` reads instead of synchronising), and the device lookup tables of the
        next timesteps are dropped."""
        self._timesteps = value
        self._host_timesteps = np.asarray(torch.as_tensor(value).cpu().tolist(), dtype=np.int64).reshape(-1)
        self._prev_tables = {}

    @property
    def num_schedule_timesteps(self) -> int:
        """T of the tables (``len(alphas_cumprod)``; diffusers' ``len(scheduler)`` is the config's value)."""
        return self.schedule.num_train_timesteps

    # --- timesteps -----------------------------------------------------------------------------------

    def _host_timestep(self, timestep):
        """``timestep`` as a Python int when that costs no synchronisation: an int, a CPU tensor, or an
        element of ``self.timesteps`` on any device (found by its place in that tensor); else None."""
        if not isinstance(timestep, torch.Tensor):
            return _checks.as_int(timestep, "timestep")
        if timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool:
            raise TypeError(f"timestep must be an int or an integer tensor, got a tensor of dtype {timestep.dtype}")
        if timestep.numel() != 1 or torch.compiler.is_compiling():  # traced: no host read (module docstring)
            return None
        if timestep.device.type == "cpu":
            return int(timestep.reshape(()).item())
        table = self.timesteps
        if (isinstance(table, torch.Tensor) and timestep.dtype == table.dtype and timestep.device == table.device
                and table.dim() == 1 and table.stride(0) == 1
                and timestep.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()):
            index = timestep.storage_offset() - table.storage_offset()
            if 0 <= index < len(self._host_timesteps):
                return int(self._host_timesteps[index])
        return None

    def _timestep(self, timestep, sample: torch.Tensor):
        """(t for the op, t as a host int or None): an int in [0, T) where it is known on the host,
        else an integer tensor of shape [] or [B] on the sample's device (checked by the kernels:
        a timestep outside the schedule makes that sample NaN)."""
        num_steps = self.num_schedule_timesteps
        host = self._host_timestep(timestep)
        if host is not None:
            if not 0 <= host < num_steps:
                raise ValueError(f"timestep must be in [0, {num_steps}), got {host}")
            return host, host
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, sample.shape[0])):
            raise ValueError(f"timestep must be an int or an integer tensor of shape [] or [batch="
                             f"{sample.shape[0]}], got shape {tuple(timestep.shape)}")
        timestep = timestep.to(sample.device, torch.int64)
        return (timestep.reshape(()) if timestep.numel() == 1 else timestep), None

    # --- the forward process -------------------------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4), fused (``fastgen.q_sample``).
        ``timesteps``: one per sample ([B]) or one for all ([] / [1] / int), any integer dtype and device.
        x_0, noise and the per-timestep coefficients broadcast as in diffusers' ``add_noise`` (e.g. one
        sample with a batch of noise: pipelines rely on it; ``broadcast_like_diffusers``)."""
        _checks.float_tensor(original_samples, "original_samples")
        _checks.float_tensor(noise, "noise")
        t, count = timesteps, None
        if isinstance(t, torch.Tensor):
            t = t.to(original_samples.device).flatten()
            count = t.numel()
            t = t.reshape(()) if count == 1 else t
        original_samples, noise = broadcast_like_diffusers(original_samples, noise, count)
        return fastgen.q_sample(original_samples, t, self.schedule, noise=noise.to(original_samples.dtype),
                                backend=self.backend)


def broadcast_like_diffusers(original_samples: torch.Tensor, noise: torch.Tensor, count):
    """(x_0, noise) expanded to the shape diffusers' ``add_noise`` returns: torch's broadcast of x_0, the
    noise and its coefficients, ``count`` timesteps (None: an int, one) shaped [count, 1, ...] to x_0's
    dimensions. Shapes that do not broadcast are returned as they are, for ``fastgen.q_sample``'s
    check (which stays strict for its own callers) to name."""
    coefficients = (count or 1,) + (1,) * (original_samples.dim() - 1)
    try:
        shape = torch.broadcast_shapes(original_samples.shape, noise.shape, coefficients)
    except RuntimeError:
        return original_samples, noise
    return original_samples.expand(shape), noise.expand(shape)
