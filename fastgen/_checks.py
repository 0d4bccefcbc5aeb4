"""Argument validation shared by every public op: each error names the argument and what was expected."""
import math
import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT64_MAX = (1 << 63) - 1


def as_int(value, name: str) -> int:
    """``value`` as a Python int; TypeError for bools, floats and anything else that is not an integer."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def nonneg_int(value, name: str, *, limit: int = INT64_MAX) -> int:
    """An integer in [0, limit]."""
    value = as_int(value, name)
    if not 0 <= value <= limit:
        raise ValueError(f"{name} must be an integer in [0, {limit}], got {value}")
    return value


def sample_offset(offset, shape, name: str = "offset") -> int:
    """The counter element where a draw of ``shape`` starts, from ``offset`` counted in samples (rows
    of dim 0): ``offset * row``, row = prod(shape[1:]) elements (1 for a 0-d or 1-d shape, whose
    samples are single elements). The one rule every public op's ``offset`` follows: a non-negative
    int with ``offset * row + numel <= INT64_MAX``, so no counter element of the draw overflows int64.
    ValueError/TypeError naming ``name`` otherwise."""
    shape = torch.Size(shape)
    row, numel = shape[1:].numel(), shape.numel()
    limit = (INT64_MAX - numel) // row if row else INT64_MAX
    return nonneg_int(offset, name, limit=limit) * row


def finite_float(value, name: str) -> float:
    """A finite real number (int or float, not a bool) as a Python float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def seed64(seed, name: str = "seed") -> int:
    """A 64-bit seed as an int in [0, 2^64): any int torch.manual_seed accepts (negatives wrap).

    ``None`` draws one from torch's default generator, so torch.manual_seed makes runs reproducible.
    """
    if seed is None:
        lo, hi = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
        return (hi << 32) | lo
    seed = as_int(seed, name)
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"{name} must be a 64-bit integer in [-2**63, 2**64), got {seed}")
    return seed & ((1 << 64) - 1)


def shape(value, name: str = "shape") -> torch.Size:
    """An int or a sequence of non-negative ints as a torch.Size."""
    dims = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(value).__name__}") from None
    dims = tuple(as_int(d, f"{name}[{i}]") for i, d in enumerate(dims))
    if any(d < 0 for d in dims):
        raise ValueError(f"{name} must have non-negative sizes, got {dims}")
    return torch.Size(dims)


def float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """One of the floating dtypes fastgen kernels compute in (fp32, fp16, bf16)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype}")
    return dtype


META_UNSUPPORTED = "meta tensors are not supported: they hold no values to compute with"


def device(value, name: str = "device") -> torch.device:
    """A torch.device; None means torch's default device (read as a new tensor's device while
    torch.compile traces, where torch.get_default_device is not traceable)."""
    if value is None:
        return torch.empty(0).device if torch.compiler.is_compiling() else torch.get_default_device()
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} must name a torch device, got {value!r}") from err


def compute_device(value, name: str = "device") -> torch.device:
    """``device``, where an op will compute: not the meta device. "cuda" without an index is the current
    CUDA device, as a tensor made there reports it ("cuda:0"), so the two compare equal."""
    value = device(value, name)
    if value.type == "meta":
        raise ValueError(f"{name} must not be 'meta': {META_UNSUPPORTED}")
    if value.type == "cuda" and value.index is None and not torch.compiler.is_compiling() and torch.cuda.is_available():
        value = torch.device("cuda", torch.cuda.current_device())
    return value


def float_tensor(t, name: str) -> torch.Tensor:
    """A tensor of a dtype fastgen kernels compute in; TypeError/ValueError naming ``name`` otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got dtype {t.dtype}")
    return t


def compute_tensor(t, name: str) -> torch.Tensor:
    """``float_tensor``, holding values an op can compute with: not on the meta device."""
    float_tensor(t, name)
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device: {META_UNSUPPORTED}")
    return t


def like(t, name: str, ref: torch.Tensor, ref_name: str, *, shape: bool = True) -> torch.Tensor:
    """``t`` is a float tensor on ``ref``'s device with its dtype (and shape, unless shape=False)."""
    if isinstance(t, torch.Tensor) and t.device != ref.device:
        meta = f" ({META_UNSUPPORTED})" if t.is_meta else ""
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}{meta}")
    compute_tensor(t, name)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    return t


def timesteps(value, name: str, *, num_steps: int, batch: int, device: torch.device, low: int = 0):
    """Timesteps in [low, num_steps): an int, or a tensor of any integer dtype and shape [] or [batch]
    on ``device``, returned as int64 (so a bound is never squeezed into a narrow dtype). Tensor values
    are checked where that needs no device synchronisation: on the CPU, outside code that torch.compile
    traces (``host_readable``)."""
    if not isinstance(value, torch.Tensor):
        value = as_int(value, name)
        if not low <= value < num_steps:
            raise ValueError(f"{name} must be a timestep in [{low}, {num_steps}), got {value}")
        return value
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an int or an integer tensor, got a tensor of dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} must be on sample's device {device}, got {value.device}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        raise ValueError(f"{name} must be an int or a tensor of shape [] or [batch={batch}], got shape "
                         f"{tuple(value.shape)}")
    on_host = host_readable(value) and value.numel() > 0
    if value.dtype == torch.uint64 and on_host and (value.view(torch.int64) < 0).any():
        raise ValueError(f"{name} must hold timesteps in [{low}, {num_steps}), got a uint64 value >= 2**63")
    value = value.to(torch.int64)
    if on_host and not ((value >= low) & (value < num_steps)).all():
        bad = value[(value < low) | (value >= num_steps)][0].item()
        raise ValueError(f"{name} must hold timesteps in [{low}, {num_steps}), got {bad}")
    return value


def choice(value, name: str, allowed):
    """``value`` if it is one of the strings ``allowed``; ValueError naming them otherwise."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def batched(t, name: str) -> torch.Tensor:
    """A compute tensor with a batch dimension first (not 0-d)."""
    compute_tensor(t, name)
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension first, got a 0-d tensor")
    return t


def noise_schedule(schedule):
    """A fastgen.NoiseSchedule (TypeError naming the argument otherwise)."""
    from fastgen.schedules import NoiseSchedule

    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastgen.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def host_readable(value: torch.Tensor) -> bool:
    """Whether a check may read ``value`` on the host: a CPU tensor (no device synchronisation) while
    torch.compile is not tracing (a data-dependent check would break the graph). Values that are
    not checked make the affected samples NaN in the step (the kernels' rule)."""
    return value.device.type == "cpu" and not torch.compiler.is_compiling()


def prev_below(prev_t, t) -> None:
    """prev_t < t wherever both are known on the host (ints or CPU tensors): a step goes back in time."""
    if not isinstance(prev_t, torch.Tensor) and not isinstance(t, torch.Tensor):
        if not prev_t < t:
            raise ValueError(f"prev_t must be smaller than t, got prev_t={prev_t} and t={t}")
        return
    known = [not isinstance(v, torch.Tensor) or host_readable(v) for v in (prev_t, t)]
    if all(known) and not bool(torch.all(torch.as_tensor(prev_t) < torch.as_tensor(t))):
        raise ValueError(f"prev_t must be smaller than t, got prev_t={prev_t} and t={t}")
