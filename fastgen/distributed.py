"""Sampling on torch.distributed: the same samples for any number of processes, resumable.

    # my_sampling.py, started by: torchrun --nproc_per_node 4 my_sampling.py
    import torch.distributed as dist
    import fastgen.distributed
    from fastgen.models import pretrained_denoiser
    from fastgen.schedulers import DDIMScheduler

    dist.init_process_group("gloo")                  # "nccl" with one GPU per rank
    model = pretrained_denoiser()
    x = fastgen.distributed.sample(model, (1, 8, 8), DDIMScheduler(**model.scheduler_config),
                                   n=100_000, seed=0, num_inference_steps=50, shard_dir="run1")
    # rank 0: the [100000, 1, 8, 8] samples; every other rank: None

Which sample is which. Sample k (0 <= k < n) is sample k of ``fastgen.sample``'s counter-based stream
for ``seed``: its noise is a function of (seed, k) alone. The n samples are cut into batches of
B = min(batch_size, n) on one fixed grid, batch j holding samples [jB, (j + 1)B), and each batch is one
``fastgen.sample(model, (B, *sample_shape), scheduler, seed=seed, offset=jB, **sample_kwargs)`` call;
the last batch is padded to B with the stream's samples n, n + 1, ... (computed, then dropped), so
every call has the same shape (one CUDA graph shape per rank). Every batch is the same call whichever
rank makes it, so the result is the same bit for bit for any world size, and for a run resumed from
a shard directory. A model's arithmetic may depend on its batch (a CPU matmul picks its blocking by
the number of rows), so another ``batch_size`` may change samples at float rounding: ``batch_size``
is part of the configuration.

Work. The units of work are the batches, or with ``shard_dir`` the shards: blocks of ``shard_size``
samples (a multiple of B) on the same grid. The units still to do are split among the ranks in
contiguous runs, rank r taking units [r U / W, (r + 1) U / W) of the U, so rank r samples a contiguous
share [start_r, end_r) of the n samples (of the unfinished ones, when resuming).

Agreement. Before any work every rank describes its configuration (model weights' SHA-256 for a
torch.nn.Module, else its qualified name; scheduler class and config, less diffusers' bookkeeping
entries named "_..."; sample shape; n; seed; batch and
shard size; the other sampling arguments; device type; backend; fastgen's version) and the ranks
exchange the descriptions. An argument one rank refuses, or any difference, raises on every rank: a
ValueError naming the rank and what differs.

Failures. A rank whose work raises tells the others at the next exchange, where they raise
``DistributedError`` naming it. A rank that dies (killed, out of memory, Ctrl-C) or never arrives makes
the others' collectives fail: with gloo as soon as its connections close, otherwise (NCCL, a peer that
hangs, a missing rendezvous) after the process group's ``timeout``, so create the group with one (the
CLI's ``--dist-timeout``); they raise ``DistributedError``. Nothing is returned or written whole unless
every rank finished; shards already written stay, for a rerun.

Shard directories. With ``shard_dir`` rank 0 first writes ``manifest.json`` (atomically): fastgen's
version, the configuration and its hash, seed, n, batch and shard size, and every shard's file and
sample range [start, end), in order. Each rank writes each shard it finishes as ``shard-<index>.npz``
(atomically: float32 ``samples`` [end - start, *sample_shape] in the model's value range, with its
``start``, ``end`` and ``config_hash``), then that file's SHA-256 beside it as
``shard-<index>.npz.sha256`` (the format of ``sha256sum``; a file of its own because any rank writes
any shard, while the manifest has one writer). A shard counts as finished only if its file has the
recorded digest and holds the manifest's range, the right shape and the configuration's hash: a rerun
with the same configuration, on any number of ranks, skips those and samples the rest again (a shard
rewritten, damaged or unreadable included, with a warning). A directory written with another
configuration is refused with an error naming what differs, and a manifest whose shard list is not
the run's grid in order (shard i, file shard-<i>.npz, samples [i S, min((i + 1) S, n))) is refused, so
its shards can never be read in the wrong order. The directory must be visible to every rank (a shared
filesystem across nodes).
"""
import hashlib
import io
import json
import os
import warnings
import zipfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from fastgen import _checks
from fastgen._files import atomic_write, prepare_output

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fastgen-shards/1"
DEFAULT_BATCH_SIZE = 256
DEFAULT_SHARD_BATCHES = 16  # shard_size default: 16 batches (4096 samples with the default batch size)
DEFAULT_TIMEOUT_S = 1800
# fastgen.sample arguments this layer sets itself, per batch
RESERVED = ("shape", "offset", "seed", "generator", "progress", "return_trajectory")


class DistributedError(RuntimeError):
    """Another rank failed, died or never arrived (or the rendezvous failed): raised on every rank
    still alive, naming what happened."""


# --- the process group ------------------------------------------------------------------------------

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher setting the same variables:
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def local_device(device_type: str) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for "cuda" (one GPU per rank on a node), else the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env(device: torch.device, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Initialise the default process group from the launcher's variables: gloo for a CPU ``device``,
    NCCL for a CUDA one (made this process's current device), ``timeout_s`` seconds for the rendezvous
    and every collective. Returns whether it initialised one (False when not launched or already
    initialised); a failed rendezvous raises ``DistributedError``."""
    if not launched() or dist.is_initialized():
        return False
    timeout = timedelta(seconds=timeout_s)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    except RuntimeError as err:  # DistStoreError, DistNetworkError, ...: RuntimeErrors
        raise DistributedError(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: no rendezvous with the other "
                               f"ranks at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                               f"{timeout_s:g} s ({_one_line(err)})") from err
    return True


def _one_line(err) -> str:
    return " ".join(str(err).split())[:500]


class _Ranks:
    """This rank and the group's exchanges, every collective's failure raised as DistributedError."""

    def __init__(self, group):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        if group is not None and not self.active:
            raise ValueError("group must be None when torch.distributed is not initialised, got a group")
        self.rank = dist.get_rank(group) if self.active else 0
        if self.rank < 0:
            raise ValueError("group must hold this process: call fastgen.distributed.sample on the group's ranks only")
        self.size = dist.get_world_size(group) if self.active else 1
        nccl = self.active and "nccl" in str(dist.get_backend(group))
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _collective(self, what, run):
        try:
            return run()
        except RuntimeError as err:
            raise DistributedError(f"rank {self.rank} of {self.size}: {what} with the other ranks failed: a rank died, "
                                   f"was interrupted or did not arrive within the process group's timeout "
                                   f"({_one_line(err)})") from err

    def exchange(self, payload: dict, what: str) -> list:
        """Every rank's JSON-able ``payload``, in rank order, on every rank."""
        if self.size == 1:
            return [payload]
        data = torch.frombuffer(bytearray(json.dumps(payload).encode()), dtype=torch.uint8)

        def run():
            lengths = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
            dist.all_gather(lengths, torch.tensor([len(data)], device=self.device), group=self.group)
            longest = max(int(n) for n in lengths)
            padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
            padded[:len(data)] = data.to(self.device)
            gathered = [torch.empty_like(padded) for _ in range(self.size)]
            dist.all_gather(gathered, padded, group=self.group)
            return [json.loads(bytes(g[:int(n)].cpu().tolist())) for g, n in zip(gathered, lengths)]

        return self._collective(what, run)

    def gather(self, share: torch.Tensor, lengths: list) -> torch.Tensor:
        """Every rank's ``share`` ([lengths[r], ...], padded here to the longest) concatenated on rank 0."""
        if self.size == 1:
            return share
        padded = share.new_zeros((max(lengths), *share.shape[1:]))
        padded[:len(share)] = share
        gathered = [torch.empty_like(padded) for _ in range(self.size)] if self.rank == 0 else None

        def run():
            dist.gather(padded, gathered, group=self.group, group_dst=0)

        self._collective("gathering the samples", run)
        return torch.cat([g[:n] for g, n in zip(gathered, lengths)]) if self.rank == 0 else None


# --- configuration ------------------------------------------------------------------------------------

def _tensor_digest(tensor: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
    h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(model) -> str:
    """What identifies ``model`` across processes and runs: for a torch.nn.Module its class and the
    SHA-256 of its state dict (names, dtypes, shapes, bytes: the checkpoint it holds), else its
    qualified name (a plain function's weights are not visible)."""
    if isinstance(model, torch.nn.Module):
        h = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            h.update(f"{name} {_tensor_digest(tensor)}\n".encode())
        return f"{type(model).__qualname__} state_dict sha256:{h.hexdigest()}"
    kind = model if callable(model) and hasattr(model, "__qualname__") else type(model)
    return f"{kind.__module__}.{kind.__qualname__}"


def _describe(value):
    """A JSON-able description of a sampling argument, equal for equal arguments on any rank."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return f"tensor sha256:{_tensor_digest(value)}"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, torch.nn.Module) or callable(value):
        return model_identity(value)
    return repr(value)


def _hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


class _Run:
    """A run's arguments checked on this rank, its configuration and its units of work."""

    def __init__(self, model, sample_shape, scheduler, *, n, seed, batch_size, shard_dir, shard_size, sample_kwargs):
        from fastgen import __version__, sampling

        reserved = sorted(set(sample_kwargs) & set(RESERVED))
        if reserved:
            raise TypeError(f"fastgen.distributed.sample sets {', '.join(reserved)} itself (per batch); "
                            f"got {', '.join(reserved)} among the sampling arguments")
        self.sample_shape = tuple(_checks.shape(sample_shape, "sample_shape"))
        self.n = _checks.as_int(n, "n")
        if self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n}")
        if seed is None:
            raise ValueError("seed must be an integer, the same on every rank, got None")
        self.seed = _checks.seed64(seed)
        batch_size = _checks.as_int(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
        self.batch = batch = min(batch_size, self.n)
        self.shard_dir = None if shard_dir is None else prepare_output(shard_dir, folder=True, name="shard_dir")
        unit = batch
        if shard_dir is not None:
            unit = batch * DEFAULT_SHARD_BATCHES if shard_size is None else _checks.as_int(shard_size, "shard_size")
            if unit < 1 or unit % batch:
                raise ValueError(f"shard_size must be a positive multiple of the batch size {batch} "
                                 f"(min(batch_size, n)), got {unit}")
        elif shard_size is not None:
            raise ValueError("shard_size needs a shard_dir")
        self.units = _grid(self.n, unit)
        self.model, self.scheduler, self.sample_kwargs = model, scheduler, dict(sample_kwargs)
        self.labels = self._per_sample_labels()
        # the first batch's sampler checks every argument fastgen.sample checks, before any work
        probe = sampling.Sampler(model, (batch, *self.sample_shape), scheduler, seed=self.seed,
                                 **self.batch_kwargs(0))
        self.device, self.dtype = probe.device, probe.dtype
        # as resolved (a default and the same value given explicitly agree); the device by its type
        resolved = {"device", "dtype", "backend", "num_inference_steps"}
        described = {k: _describe(v) for k, v in sample_kwargs.items() if k not in resolved}  # labels included
        self.config = json.loads(json.dumps({
            "fastgen": __version__, "model": model_identity(model),
            "scheduler": {"class": type(scheduler).__qualname__, "config": _describe(
                {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")})},
            "sample_shape": list(self.sample_shape), "n": self.n, "seed": self.seed, "batch_size": batch,
            "shard_size": unit if shard_dir is not None else None, "sampling": described,
            "num_inference_steps": probe.num_inference_steps, "dtype": str(self.dtype),
            "device_type": self.device.type, "backend": probe.backend,
        }))
        self.config_hash = _hash(self.config)

    def batches(self, start, end):
        """(offset, count) of each batch of [start, end): whole batches of the grid, the last one's
        count cut at n (the call still samples B)."""
        return [(offset, min(self.batch, end - offset)) for offset in range(start, end, self.batch)]

    def _per_sample_labels(self):
        """``class_labels`` given one per sample (a [n] tensor): taken out of the shared arguments and
        sliced per batch (``batch_kwargs``); None for one label for all (an int), which passes as it is."""
        labels = self.sample_kwargs.get("class_labels")
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0 or labels.numel() == 1:
            return None
        if labels.shape != (self.n,):
            raise ValueError(f"class_labels must be one int or one per sample (n={self.n}), got shape "
                             f"{tuple(labels.shape)}")
        return self.sample_kwargs.pop("class_labels").to("cpu", torch.int64)

    def batch_kwargs(self, offset):
        """The sampling arguments of the batch at ``offset``: per-sample labels sliced (the padding
        past n repeats the last label; those samples are dropped)."""
        if self.labels is None:
            return self.sample_kwargs
        labels = self.labels[offset:offset + self.batch]
        labels = torch.cat([labels, labels[-1:].expand(self.batch - len(labels))])
        return dict(self.sample_kwargs, class_labels=labels)

    def sample_batch(self, offset, count):
        import fastgen

        x = fastgen.sample(self.model, (self.batch, *self.sample_shape), self.scheduler, seed=self.seed,
                           offset=offset, **self.batch_kwargs(offset))
        return x[:count]


def _differences(mine, theirs, prefix="") -> list:
    """'entry (a vs b)' for each configuration entry that differs, nested entries named by their path
    (scheduler.config.beta_end), values cut to 60 characters."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        return [d for key in sorted(set(mine) | set(theirs))
                for d in _differences(mine.get(key), theirs.get(key), f"{prefix}{key}.")]
    if mine == theirs:
        return []

    def short(value):
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{prefix[:-1]} ({short(mine)} vs {short(theirs)})"]


def _error_payload(err):
    return None if err is None else {"type": type(err).__name__, "message": _one_line(err)}


def _raise_reported(replies, ranks, own_error, what):
    """Raise on every rank if any rank reported an error: a rank re-raises its own; the others raise
    the same kind (ValueError / TypeError, else DistributedError) naming the first failing rank."""
    failed = [(r, reply["error"]) for r, reply in enumerate(replies) if reply.get("error")]
    if not failed:
        return
    if own_error is not None:
        raise own_error
    rank, error = failed[0]
    kind = {"ValueError": ValueError, "TypeError": TypeError}.get(error["type"], DistributedError)
    raise kind(f"rank {rank} of {ranks.size} {what}: {error['type']}: {error['message']}")


# --- shard directories --------------------------------------------------------------------------------

DIGEST_SUFFIX = ".sha256"  # beside each shard: its SHA-256, as sha256sum writes it


def _grid(n: int, unit: int) -> list:
    """The (start, end) of each unit of ``unit`` samples of ``n``, in order; the last one cut at n."""
    return [(start, min(start + unit, n)) for start in range(0, n, unit)]


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.npz"


def _shard_list(n: int, shard_size: int) -> list:
    """The manifest's list of shards of a run of ``n`` samples in shards of ``shard_size``."""
    return [{"index": i, "start": start, "end": end, "file": _shard_name(i)}
            for i, (start, end) in enumerate(_grid(n, shard_size))]


def load_manifest(shard_dir) -> dict:
    """The manifest of a shard directory; ValueError when it is missing, not a fastgen shard manifest,
    or lists other shards than its configuration's grid in order."""
    path = os.path.join(os.fspath(shard_dir), MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"shard_dir must hold a {MANIFEST}, got {os.fspath(shard_dir)!r} without one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"shard_dir {os.fspath(shard_dir)!r}: {MANIFEST} is not a fastgen shard manifest "
                         f"({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"shard_dir {os.fspath(shard_dir)!r}: {MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    config = manifest.get("config")
    n, size = (config.get("n"), config.get("shard_size")) if isinstance(config, dict) else (None, None)
    valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n, size))
    if not valid or manifest.get("shards") != _shard_list(n, size):
        raise ValueError(f"shard_dir {os.fspath(shard_dir)!r}: the shards of {MANIFEST} are not those of its "
                         f"configuration (n={n}, shard_size={size}) in order; the manifest was edited or damaged")
    return manifest


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_shard(shard_dir, shard, sample_shape, config_hash) -> np.ndarray:
    """The samples of a finished shard of this run, read once: the file's SHA-256 must be the one
    recorded beside it, and it must hold float32 samples [end - start, *sample_shape] with the manifest's
    range and the configuration's hash. ValueError saying why otherwise (FileNotFoundError when the
    shard's file is missing, OSError and zipfile's errors when it cannot be read)."""
    path = os.path.join(shard_dir, shard["file"])
    with open(path, "rb") as f:
        data = f.read()
    try:
        with open(path + DIGEST_SUFFIX, encoding="ascii") as f:
            recorded = f.read().split()[:1]
    except FileNotFoundError:
        raise ValueError(f"no recorded digest ({shard['file']}{DIGEST_SUFFIX} is missing)") from None
    if recorded != [_digest(data)]:
        raise ValueError("its SHA-256 is not the one recorded when it was written (the file was rewritten or damaged)")
    with np.load(io.BytesIO(data)) as arrays:
        samples = arrays["samples"]
        marks = (int(arrays["start"]), int(arrays["end"]), str(arrays["config_hash"]))
    if (samples.shape != (shard["end"] - shard["start"], *sample_shape) or samples.dtype != np.float32
            or marks != (shard["start"], shard["end"], config_hash)):
        raise ValueError(f"it is not this run's shard {shard['index']} (shape {samples.shape}, range {marks[:2]})")
    return samples


UNREADABLE = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)  # what _read_shard raises


def _shard_problem(shard_dir, shard, sample_shape, config_hash):
    """None when the shard's file is a finished shard of this run (``_read_shard``), else why not:
    "missing", or what is wrong with the file."""
    try:
        _read_shard(shard_dir, shard, sample_shape, config_hash)
    except FileNotFoundError:
        return "missing"
    except UNREADABLE as err:
        return f"{shard['file']} is unreadable or not this run's ({_one_line(err)})"
    return None


def _finished_shards(shard_dir, shards, sample_shape, config_hash) -> list:
    """The indices of the finished ``shards``; a file that is there but is not finished gets a warning
    saying why, as it is sampled again."""
    finished = []
    for shard in shards:
        problem = _shard_problem(shard_dir, shard, sample_shape, config_hash)
        if problem is None:
            finished.append(shard["index"])
        elif problem != "missing":
            warnings.warn(f"shard_dir {shard_dir!r}: {problem}; sampling it again", RuntimeWarning, stacklevel=4)
    return finished


def _open_shard_dir(run) -> list:
    """On rank 0: the indices of the finished shards of ``run.shard_dir``, after writing its manifest
    (a new directory) or checking it (a rerun). ValueError for a directory of another configuration,
    one whose manifest lists other shards, or one holding files but no manifest."""
    shard_dir = run.shard_dir
    shards = _shard_list(run.n, run.config["shard_size"])
    if os.path.exists(os.path.join(shard_dir, MANIFEST)):
        manifest = load_manifest(shard_dir)
        differ = _differences(run.config, manifest.get("config", {}))
        if differ:
            raise ValueError(f"shard_dir {shard_dir!r} holds shards of another configuration; it differs in "
                             f"{'; '.join(differ)} (this run vs the directory's): use another directory, or "
                             f"the arguments it was written with")
        return _finished_shards(shard_dir, shards, run.sample_shape, run.config_hash)
    entries = [e for e in os.listdir(shard_dir) if not e.startswith(".")]
    if entries:
        raise ValueError(f"shard_dir must be empty or hold the {MANIFEST} of an earlier run, got {shard_dir!r} "
                         f"with {len(entries)} entries (e.g. {sorted(entries)[0]!r}) and no {MANIFEST}")
    from fastgen import __version__

    manifest = {"format": MANIFEST_FORMAT, "fastgen_version": __version__, "config_hash": run.config_hash,
                "seed": run.seed, "n": run.n, "batch_size": run.batch, "shard_size": run.config["shard_size"],
                "sample_shape": list(run.sample_shape), "storage": "float32, the model's value range",
                "config": run.config, "shards": shards}
    with atomic_write(os.path.join(shard_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return []


def _write_shard(run, index, start, end, samples: torch.Tensor):
    """The shard's .npz, then its SHA-256 beside it (each atomically): a shard is finished once both are there."""
    buffer = io.BytesIO()
    np.savez(buffer, samples=samples.detach().float().cpu().numpy(), start=np.int64(start), end=np.int64(end),
             config_hash=np.str_(run.config_hash))
    data, name = buffer.getvalue(), _shard_name(index)
    with atomic_write(os.path.join(run.shard_dir, name), "wb") as f:
        f.write(data)
    with atomic_write(os.path.join(run.shard_dir, name + DIGEST_SUFFIX), "w", encoding="ascii") as f:
        f.write(f"{_digest(data)}  {name}\n")


def iter_shards(shard_dir):
    """The samples of a finished shard directory, shard by shard in order: float32 CPU tensors
    [end - start, *sample_shape]. ValueError (before the first) if a shard is missing or not whole
    (``_read_shard``), or if one changes while they are read."""
    shard_dir = os.fspath(shard_dir)
    manifest = load_manifest(shard_dir)
    sample_shape, config_hash = tuple(manifest["config"]["sample_shape"]), _hash(manifest["config"])
    problems = [(s["index"], problem) for s in manifest["shards"]
                if (problem := _shard_problem(shard_dir, s, sample_shape, config_hash)) is not None]
    if problems:
        raise ValueError(f"shard_dir {shard_dir!r} is not finished: {len(problems)} of {len(manifest['shards'])} "
                         f"shards missing or damaged (first: shard {problems[0][0]}, {problems[0][1]}); rerun the "
                         f"sampling to complete it")
    for shard in manifest["shards"]:
        try:
            yield torch.from_numpy(_read_shard(shard_dir, shard, sample_shape, config_hash))
        except UNREADABLE as err:
            raise ValueError(f"shard_dir {shard_dir!r}: {shard['file']} changed while it was read "
                             f"({_one_line(err)}); rerun the sampling to complete it") from None


# --- sampling -------------------------------------------------------------------------------------------

def sample(model, sample_shape, scheduler, *, n, seed=0, batch_size=DEFAULT_BATCH_SIZE, shard_dir=None,
           shard_size=None, gather=True, group=None, progress=False, callback=None, **sample_kwargs):
    """``n`` samples of ``model`` with ``scheduler`` shared among the ranks of ``group`` (the module
    docstring says which sample is which, how the work is split, and what happens on failures).
    Call it on every rank with the same arguments; without an initialised torch.distributed it runs
    in this process alone, with the same result.

    Args:
        model, scheduler: as for ``fastgen.sample`` (any scheduler it accepts).
        sample_shape: one sample's shape, e.g. (C, H, W).
        n: the number of samples.
        seed: the counter-based noise's seed (an int; the same on every rank).
        batch_size: samples per ``fastgen.sample`` call (B = min(batch_size, n)); changing it may
            change samples at float rounding, so it is part of the configuration.
        shard_dir: a folder for a resumable run (see the module docstring), visible to every rank.
        shard_size: samples per shard, a multiple of B (default 16 B); only with ``shard_dir``.
        gather: return the samples on rank 0; False: return None everywhere (with ``shard_dir``: the
            shards are the result, read them with ``iter_shards``).
        group: the process group (default: the default group).
        progress: a tqdm bar of this rank's share (pass ``rank == 0``).
        callback: called on this rank as ``callback(index, start, end)`` after each unit it finishes
            (a shard when written, else a batch); an exception in it fails the run like any other.
        **sample_kwargs: passed to every ``fastgen.sample`` call (num_inference_steps, eta, device,
            dtype, backend, cuda_graph, ...; not shape, offset, seed, generator, progress,
            return_trajectory, which are set per batch or not shardable).
    Returns the [n, *sample_shape] samples on rank 0, on the sampling device in the sampling dtype
    (None on the other ranks, and everywhere with ``gather=False``).
    """
    from tqdm.auto import tqdm

    ranks = _Ranks(group)
    run, finished, error = None, [], None
    try:
        run = _Run(model, sample_shape, scheduler, n=n, seed=seed, batch_size=batch_size, shard_dir=shard_dir,
                   shard_size=shard_size, sample_kwargs=sample_kwargs)
        if run.shard_dir is not None and ranks.rank == 0:
            finished = _open_shard_dir(run)
    except Exception as err:  # noqa: BLE001  (told to every rank, then raised here)
        error = err
    replies = ranks.exchange({"error": _error_payload(error), "config": run and run.config, "finished": finished},
                             "checking the arguments")
    _raise_reported(replies, ranks, error, "refused the arguments")
    differ = [f"rank {r} differs from rank 0 in " + "; ".join(_differences(reply["config"], replies[0]["config"]))
              for r, reply in enumerate(replies) if reply["config"] != replies[0]["config"]]
    if differ:
        raise ValueError("fastgen.distributed.sample needs the same arguments on every rank: " + ", ".join(differ))

    done = set(replies[0]["finished"])
    todo = [i for i in range(len(run.units)) if i not in done]
    share = todo[ranks.rank * len(todo) // ranks.size:(ranks.rank + 1) * len(todo) // ranks.size]
    mine = []
    try:
        total = sum(run.units[i][1] - run.units[i][0] for i in share)
        desc = f"sampling (rank {ranks.rank} of {ranks.size})" if ranks.size > 1 else "sampling"
        with tqdm(total=total, disable=not progress, desc=desc, unit="sample", dynamic_ncols=True) as bar:
            for index in share:
                start, end = run.units[index]
                unit = []
                for offset, count in run.batches(start, end):
                    unit.append(run.sample_batch(offset, count))
                    bar.update(count)
                unit = torch.cat(unit)
                if run.shard_dir is not None:
                    _write_shard(run, index, start, end, unit)
                else:
                    mine.append(unit)
                if callback is not None:
                    callback(index, start, end)
    except Exception as err:  # noqa: BLE001  (told to every rank, then raised here)
        error = err
    replies = ranks.exchange({"error": _error_payload(error)}, "finishing the samples")
    _raise_reported(replies, ranks, error, "failed while sampling")

    if not gather:
        return None
    if run.shard_dir is not None:
        if ranks.rank != 0:
            return None
        return torch.cat(list(iter_shards(run.shard_dir))).to(run.device, run.dtype)
    lengths = []
    for r in range(ranks.size):
        units = todo[r * len(todo) // ranks.size:(r + 1) * len(todo) // ranks.size]
        lengths.append(sum(run.units[i][1] - run.units[i][0] for i in units))
    local = torch.cat(mine) if mine else torch.empty((0, *run.sample_shape), dtype=run.dtype, device=run.device)
    return ranks.gather(local, lengths)
