"""``python -m fastgen <command>``.

    validate   check every Triton kernel against its torch reference on this device, print a table
    bench      time every op against its peers and the copy bandwidth: table, results.json, plots
    train      train a reference model on the built-in data and save a checkpoint (gan, ddpm, flow, consistency)
    sample     sample digits with the shipped DDPM: a PNG grid or a .npz array, time per step of the fused and
               reference loops; in batches, resumable (--shard-dir) and on many processes (torchrun)
"""
import argparse
import math
import os
import sys

from fastgen import registry
from fastgen._files import prepare_output

# What a user gets wrong (a bad argument, a path that cannot be read or written): one line, exit 2.
USER_ERRORS = (ValueError, TypeError, ImportError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
               PermissionError)
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _require_kernels_runnable(device):
    """Without a GPU the kernels run only in the Triton interpreter, which ``import fastgen`` chooses
    for a CPU build of torch; a CUDA build on a machine without a GPU needs TRITON_INTERPRET=1 set."""
    import torch

    from fastgen.backend import triton_interpreting

    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if on_cpu and not triton_interpreting():
        raise ValueError("the kernels need a GPU or the Triton interpreter: run with TRITON_INTERPRET=1 set "
                         "(this torch is a CUDA build, and no GPU was found)")


def _validate(args) -> int:
    _require_kernels_runnable(args.device)
    from fastgen import validate

    return 0 if validate.run(device=args.device, quick=args.quick, ops=args.ops) else 1


def _bench(args) -> int:
    if args.static:
        return _bench_static(args)
    from fastgen.bench import report

    prepare_output(args.out, folder=True, name="--out")
    result = report.run(ops=args.ops, sizes=args.sizes, dtypes=args.dtypes, providers=args.providers,
                        device=args.device, out=args.out, quick=args.quick, progress=not args.no_progress,
                        plots=not args.no_plots)
    return 0 if result["ok"] else 1


def _bench_static(args) -> int:
    """The static report: every kernel variant `validate` launches, compiled for sm_90 (no GPU needed)."""
    from fastgen.bench import static

    prepare_output(args.out, folder=True, name="--out")
    report = static.run(args.out, quick=args.quick, progress=lambda line: print(line, file=sys.stderr))
    print(static.markdown(report))
    print(f"wrote {os.path.join(args.out, 'static.json')} and static.md")
    return 1 if report["failures"] else 0


def _train_gan(args) -> int:
    from fastgen.models import gan

    out = prepare_output(args.out or "gan_digits.pt", name="--out")
    steps = 8000 if args.steps is None else args.steps  # generator updates; ~3 min on one CPU core
    result = gan.train_gan(out, architecture=args.architecture, latent_dim=args.latent_dim, loss=args.loss, steps=steps,
                           batch_size=args.batch_size, d_steps=args.d_steps, seed=args.seed, resume=args.resume,
                           checkpoint_every=args.checkpoint_every, slim=args.slim, threads=args.threads,
                           device=args.device, progress=not args.no_progress)
    settings = result["history"]["settings"]
    print(f"trained {type(result['generator']).__name__} ({settings['loss']}) for {settings['steps']} steps in "
          f"{result['seconds']:.0f}s; 1000 samples: {result['quality']}; saved {out}")
    return 0


def _train_ddpm(args) -> int:
    from fastgen.models import denoisers

    out = prepare_output(args.out or "ddpm_digits.pt", name="--out")
    scheduler_config = dict(denoisers.DIGITS_SCHEDULER_CONFIG, beta_schedule=args.beta_schedule,
                            prediction_type=args.prediction_type, clip_sample=args.clip_sample)
    width = {"mlp": "hidden", "unet": "channels"}[args.denoiser]
    depth = {"mlp": "depth", "unet": "num_res_blocks"}[args.denoiser]
    model_config = {k: v for k, v in ((width, args.width), (depth, args.depth)) if v is not None}
    result = denoisers.train_ddpm(out, architecture=args.denoiser, model_config=model_config,
                                  conditional=args.conditional, scheduler_config=scheduler_config,
                                  steps=10000 if args.steps is None else args.steps, batch_size=args.batch_size,
                                  lr=2e-3 if args.lr is None else args.lr,
                                  ema_decay=0.995 if args.ema_decay is None else args.ema_decay,
                                  label_dropout=args.label_dropout,
                                  seed=args.seed, resume=args.resume, checkpoint_every=args.checkpoint_every,
                                  slim=args.slim, threads=args.threads, device=args.device,
                                  progress=not args.no_progress)
    model = result["model"]
    print(f"trained the digits denoiser ({type(model).__name__}, {model.scheduler_config['prediction_type']}"
          f"{', conditional' if model.num_classes else ''}) in {result['seconds']:.0f}s; "
          f"500 samples (50 DDIM steps{', null label' if model.num_classes else ''}): "
          f"{result['quality']}; saved {out}")
    return 0


def _train_flow(args) -> int:
    from fastgen.models import flows

    out = prepare_output(args.out or "flow_digits.pt", name="--out")
    result = flows.train_flow(out, steps=3000 if args.steps is None else args.steps,
                              seed=args.seed, resume=args.resume, batch_size=args.batch_size, threads=args.threads,
                              progress=not args.no_progress, checkpoint_every=args.checkpoint_every, slim=args.slim)
    print(f"trained the digits flow in {result['seconds']:.0f}s; held-out {result['test_bits_per_dim']:.3f} bits/dim "
          f"(per-pixel categorical: {result['categorical_bits_per_dim']:.3f}); saved {out}")
    return 0


def _train_consistency(args) -> int:
    from fastgen.models import consistency, denoisers

    out = prepare_output(args.out or "consistency_digits.pt", name="--out")
    teacher = denoisers.load_checkpoint(args.teacher) if args.teacher else denoisers.pretrained_denoiser()
    result = consistency.distill(teacher, out, objective=args.objective,
                                 steps=4000 if args.steps is None else args.steps, num_scales=args.num_scales,
                                 batch_size=args.batch_size,
                                 lr=4e-4 if args.lr is None else args.lr, distance_kind=args.distance,
                                 trajectories=args.trajectories,
                                 first_sigma_share=args.first_sigma_share,
                                 distribution_matching=args.distribution_matching, init=args.init,
                                 ema_decay=0.999 if args.ema_decay is None else args.ema_decay,
                                 label_dropout=args.label_dropout, seed=args.seed, resume=args.resume,
                                 checkpoint_every=args.checkpoint_every, slim=args.slim, threads=args.threads,
                                 progress=not args.no_progress)
    scores = "; ".join(f"{consistency.schedule_name(k)}: {q}" for k, (q, _) in result["quality"].items())
    print(f"distilled {args.teacher or 'the shipped digits denoiser'} into a consistency model in "
          f"{result['seconds']:.0f}s; 500 samples: {scores}; saved {out}")
    return 0


TRAIN_TARGETS = {"gan": _train_gan, "ddpm": _train_ddpm, "flow": _train_flow, "consistency": _train_consistency}
# sample --sampler: the samplers of fastgen.registry that run on the digits denoiser (fastgen.models.views)
SAMPLERS = registry.DIGITS_SAMPLERS


def _train(args) -> int:
    return TRAIN_TARGETS[args.target](args)


def _timed_sample(sampler, device, progress, repeats):
    """(samples, seconds of each timed call) of a prepared ``fastgen.sampling.Sampler``: a first,
    untimed call warms up (on CUDA it compiles the kernels and captures the graph), then ``repeats``
    timed calls, each drawing the same samples."""
    import time

    import torch

    def call(show):
        start = time.perf_counter()
        x = sampler(progress=show)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return x, time.perf_counter() - start

    call(False)
    runs = [call(progress and i == 0) for i in range(repeats)]
    return runs[-1][0], [seconds for _, seconds in runs]


def _spread(seconds) -> tuple:
    """(median, min, max) of repeated timings."""
    import statistics

    return statistics.median(seconds), min(seconds), max(seconds)


# sample options that apply to one model only, each with its default (argparse's default is None, so that
# an option the user gave to the other model is told apart from one left out)
MODEL_OPTIONS = {"temperature": ("flow", 1.0), "sampler": ("ddpm", "ddim"), "steps": ("ddpm", None),
                 "eta": ("ddpm", 0.0), "label": ("ddpm", None), "guidance_scale": ("ddpm", None)}


def _apply_model_options(args) -> None:
    """Refuse a sample option given for the model it does not apply to (ValueError naming both), then
    fill in the defaults of those left out."""
    for dest, (model, default) in MODEL_OPTIONS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
        elif args.model != model:
            raise ValueError(f"--{dest.replace('_', '-')} does not apply to --model {args.model} "
                             f"(it is an option of --model {model})")


def _sample_flow(args) -> int:
    from fastgen.models import flows

    out = prepare_output(args.out, name="--out")
    result = flows.sample_flow(out, n=args.n, seed=args.seed, temperature=args.temperature,
                               checkpoint=args.checkpoint, device=args.device, scale=args.scale)
    print(f"{args.n} samples of the digits flow, seed {args.seed}, temperature {args.temperature}: wrote {out} "
          f"in {result['seconds']:.2f} s; {result['quality']}")
    return 0


def _denoiser_run(args, device):
    """(model, scheduler, steps, shape, run) of ``sample --model ddpm``'s arguments; run: the sampling
    arguments of --steps (num_inference_steps, or the distilled model's searched 2-step timesteps),
    --label and --guidance-scale. Flow matching samples the denoiser as a velocity model, the EDM
    samplers as an EDM-preconditioned network (fastgen.models.views)."""
    from fastgen.models import denoisers, views

    if args.sampler == "consistency":  # the distilled student (--checkpoint: another one) and its scheduler
        from fastgen.models import consistency

        model, scheduler = consistency.consistency_sampler(args.checkpoint, device=device)
        steps = args.steps if args.steps is not None else 2
        two_step = model.metadata.get("two_step_timesteps")  # recorded by the distillation's search
        run = consistency.sampling_arguments(tuple(two_step) if steps == 2 and two_step else steps)
        return model, scheduler, steps, (args.n, 1, 8, 8), {**run, **_guidance_arguments(args, model)}
    model = (denoisers.load_checkpoint(args.checkpoint, device=device) if args.checkpoint
             else denoisers.pretrained_denoiser(device=device))
    guidance = _guidance_arguments(args, model)
    if isinstance(model, denoisers.UNetDenoiser):
        shape = (args.n, model.in_channels, model.image_size, model.image_size)
    else:  # the MLP sees square grey images flattened
        side = math.isqrt(model.dim)
        shape = (args.n, 1, side, side)
    model, scheduler = views.for_sampler(model, args.sampler)
    steps = args.steps if args.steps is not None else (1000 if args.sampler == "ddpm" else 50)
    return model, scheduler, steps, shape, {"num_inference_steps": steps, **guidance}


def _steps_text(args, steps, run) -> str:
    """"2 CONSISTENCY steps (timesteps [12, 0])": what the run steps with, for the report line."""
    custom = f" (timesteps {run['timesteps']})" if "timesteps" in run else ""
    return f"{steps} {args.sampler.upper()} steps{custom}"


def _guidance_arguments(args, model) -> dict:
    """fastgen.sample's class_labels / guidance_scale from --label / --guidance-scale, checked against the model."""
    if args.label is None:
        if args.guidance_scale is not None:
            raise ValueError("--guidance-scale needs --label (the digit to guide towards)")
        return {}
    classes = getattr(model, "num_classes", None)
    if not classes:
        raise ValueError("--label needs a class-conditional denoiser (python -m fastgen train ddpm --conditional); "
                         "this checkpoint is unconditional")
    if not 0 <= args.label < classes:
        raise ValueError(f"--label must be in [0, {classes}) (the model's classes), got {args.label}")
    guidance = {"class_labels": args.label}
    if args.guidance_scale is not None:
        guidance["guidance_scale"] = args.guidance_scale
    return guidance


def _sample_distributed(args) -> int:
    """``sample`` in batches through ``fastgen.distributed.sample``: on every rank of a torchrun launch
    (the process group initialised here from its variables), or alone with --batch-size / --shard-dir;
    rank 0 writes --out (from the shards with --shard-dir, streamed for a .npz)."""
    import time

    import torch
    import torch.distributed as dist

    from fastgen import distributed, images

    if args.shard_size is not None and args.shard_dir is None:
        raise ValueError("--shard-size needs --shard-dir")
    rank = int(os.environ.get("RANK", "0")) if distributed.launched() else 0
    out = prepare_output(args.out, name="--out") if rank == 0 else args.out
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed.launched():
        device = distributed.local_device(device.type)  # one GPU per rank: cuda:LOCAL_RANK
    initialised = distributed.init_from_env(device, timeout_s=args.dist_timeout)
    try:
        world = dist.get_world_size() if dist.is_initialized() else 1
        model, scheduler, steps, shape, run = _denoiser_run(args, device)
        began = time.perf_counter()
        x = distributed.sample(model, shape[1:], scheduler, n=args.n, seed=args.seed,
                               batch_size=args.batch_size or distributed.DEFAULT_BATCH_SIZE, shard_dir=args.shard_dir,
                               shard_size=args.shard_size, gather=args.shard_dir is None,
                               progress=rank == 0 and not args.no_progress, eta=args.eta, device=device, **run)
        seconds = time.perf_counter() - began
        if rank == 0:
            samples = x if args.shard_dir is None else distributed.iter_shards(args.shard_dir)
            images.save_samples(samples, out, value_range=(-1, 1), scale=args.scale, shape=shape)
            print(f"{args.n} samples, {_steps_text(args, steps, run)}, seed {args.seed}, batches of "
                  f"{min(args.batch_size or distributed.DEFAULT_BATCH_SIZE, args.n)}, {world} process"
                  f"{'es' if world > 1 else ''} on {device.type}: wrote {out}; {seconds:.2f} s, "
                  f"{args.n / seconds:.1f} samples/s{' (shards finished earlier included)' if args.shard_dir else ''}")
    finally:
        if initialised:
            dist.destroy_process_group()
    return 0


def _sample(args) -> int:
    import torch

    from fastgen import distributed, images, sampling

    images.check_samples_path(args.out, "--out")
    _apply_model_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    batched = (distributed.launched() or args.shard_dir is not None or args.batch_size is not None
               or args.shard_size is not None)
    if args.model == "flow":
        if batched:
            raise ValueError("--batch-size, --shard-dir and torchrun need --model ddpm (the flow samples in one call)")
        return _sample_flow(args)
    if batched:
        return _sample_distributed(args)
    out = prepare_output(args.out, name="--out")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, scheduler, steps, shape, run = _denoiser_run(args, device)
    common = dict(seed=args.seed, eta=args.eta, device=device, **run)
    fast = sampling.Sampler(model, shape, scheduler, **common)  # what fastgen.sample runs on this device
    x, seconds = _timed_sample(fast, device, not args.no_progress, args.repeats)
    label = ("fastgen (fused Triton, " + ("CUDA graph)" if fast.captured else "eager)")
             if fast.backend == "triton" else "fastgen (torch loop, fp32)")
    paths = [(label, seconds, x)]
    if args.reference:
        reference = sampling.Sampler(model, shape, scheduler, backend="reference", **common)
        x_ref, seconds = _timed_sample(reference, device, not args.no_progress, args.repeats)
        paths.append(("reference (float64 steps)", seconds, x_ref))
    images.save_samples(paths[0][2].reshape(shape), out, value_range=(-1, 1), scale=args.scale)
    print(f"{args.n} samples, {_steps_text(args, steps, run)}, seed {args.seed}, on {device}"
          + (f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else "") + f": wrote {out}")
    print(f"after a warm-up call, {args.repeats} timed call{'s' * (args.repeats > 1)} each: median (min - max)")
    print(f"{'path':<40} {'per step':<28} {'total'}")
    for label, seconds, _ in paths:
        median, low, high = _spread(seconds)
        per_step = f"{1e3 * median / steps:.2f} ms ({1e3 * low / steps:.2f} - {1e3 * high / steps:.2f})"
        print(f"{label:<40} {per_step:<28} {median:.2f} s ({low:.2f} - {high:.2f})")
    compile_seconds = getattr(fast.strategy, "compile_seconds", None)
    if compile_seconds is not None:  # the compiled CPU loop: its one-time cost, apart from the timings above
        print(f"compiled CPU loop: the warm-up call spent {compile_seconds:.1f} s compiling (inductor keeps the "
              "code for later runs)")
    if len(paths) == 2:
        diff = (paths[0][2].double() - paths[1][2].double()).abs().max().item()
        print(f"fastgen vs reference: max |difference| {diff:.2e} (same seed, same noise)")
    return 0


# --- argument types: argparse reports their errors as "prog: error: argument --x: <message>" ---------

def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def _number_in(low: float, high: float, *, low_open: bool, describe: str):
    """An argparse type: a number in [low, high] (or (low, high] when ``low_open``), NaN refused."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe}, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and value <= high  # NaN fails both
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {describe}, got {text}")
        return value
    return parse


_unit_interval = _number_in(0.0, 1.0, low_open=False, describe="a number in [0, 1]")
_positive_float = _number_in(0.0, sys.float_info.max, low_open=True, describe="a finite number > 0")
_finite_float = _number_in(-sys.float_info.max, sys.float_info.max, low_open=False, describe="a finite number")
_nonneg_float = _number_in(0.0, sys.float_info.max, low_open=False, describe="a finite number >= 0")


def _device(text):
    """An argparse type: "cpu", or "cuda" / "cuda:N" naming a GPU this machine has. Returns the text."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} needs CUDA, which this machine lacks (torch {torch.__version__}); "
                                         f"use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r} names a GPU this machine lacks: it has "
                                         f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return text


class _UsageError(Exception):
    """An argument argparse refused: ``prog`` is the command's name, the message says why."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, with an error reported as one line (``prog: error: message``) by ``main``, not as the usage
    block and a SystemExit. Subcommand parsers are of this class too."""

    def error(self, message):
        raise _UsageError(self.prog, message)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _add_validate(commands):
    p = commands.add_parser("validate", help="check every kernel against its reference, print a table")
    p.add_argument("--device", type=_device, default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--ops", nargs="+", default=None, help="only these op families")
    p.set_defaults(run=_validate)


def _add_bench(commands):
    p = commands.add_parser("bench", help="benchmark ops against peers and the copy bandwidth; table, JSON, plots")
    p.add_argument("--ops", nargs="+", default=None, help="only these ops or op families")
    p.add_argument("--sizes", nargs="+", default=None, help="element counts (4096 2**20 16M); default: each op's sweep")
    p.add_argument("--dtypes", nargs="+", default=None, help="float32 float16 bfloat16 (or fp32 fp16 bf16)")
    p.add_argument("--providers", nargs="+", default=None,
                   help="only these providers, by name or role (fastgen reference compiled peer)")
    p.add_argument("--device", type=_device, default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--out", default="bench-results", help="output folder (default: ./bench-results)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny sizes, no torch.compile; on CPU the Triton kernels are interpreted")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--static", action="store_true",
                   help="no timing: compile every kernel variant `validate` launches for sm_90 and write "
                        "static.json / static.md (registers, spills, vector widths, occupancy, H200 bound); "
                        "with --quick, the variants of `validate --quick`")
    p.set_defaults(run=_bench)


def _add_train(commands):
    p = commands.add_parser("train", help="train a reference model on the built-in digits, save a checkpoint")
    p.add_argument("target", choices=sorted(TRAIN_TARGETS), help="the model to train")
    p.add_argument("--out", default=None, help="checkpoint path (default: <target>_digits.pt here)")
    p.add_argument("--steps", type=_int_at_least(0), default=None,
                   help="training steps (default: the target's; gan: 8000)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--loss", default="nonsaturating", choices=["hinge", "minimax", "nonsaturating", "wgan-gp"],
                   help="gan: the game (fastgen.reference.gan.LOSSES)")
    p.add_argument("--architecture", default="dcgan", choices=["dcgan", "mlp"], help="gan: the networks")
    p.add_argument("--latent-dim", type=_int_at_least(1), default=32, help="gan: size of z")
    p.add_argument("--d-steps", type=_int_at_least(1), default=1,
                   help="gan: discriminator updates per generator update")
    p.add_argument("--denoiser", default="mlp", choices=["mlp", "unet"], help="ddpm: the denoiser (fastgen.models)")
    p.add_argument("--width", type=_int_at_least(1), default=None,
                   help="ddpm: the MLP's hidden size or the UNet's base channels (default: the model's)")
    p.add_argument("--depth", type=_int_at_least(1), default=None,
                   help="ddpm: the MLP's blocks or the UNet's residual blocks per level (default: the model's)")
    p.add_argument("--conditional", action="store_true",
                   help="ddpm: class-conditional on the digit (label embedding with a null label)")
    p.add_argument("--label-dropout", type=_unit_interval, default=0.15,
                   help="ddpm --conditional, consistency (a conditional teacher): probability of training on "
                        "the null label instead (default: 0.15)")
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"],
                   help="ddpm: what the denoiser predicts (default: epsilon)")
    p.add_argument("--beta-schedule", default="linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
                   help="ddpm: the noise schedule (default: linear)")
    p.add_argument("--no-clip-sample", dest="clip_sample", action="store_false",
                   help="ddpm: the checkpoint's scheduler does not clip the predicted x_0 to [-1, 1]")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="ddpm, consistency: Adam's peak learning rate (default: ddpm 2e-3, consistency 4e-4)")
    p.add_argument("--ema-decay", type=_unit_interval, default=None,
                   help="ddpm, consistency: decay of the weights' moving average that is saved "
                        "(default: ddpm 0.995, consistency 0.999)")
    p.add_argument("--teacher", default=None,
                   help="consistency: the denoiser checkpoint to distil (default: the shipped digits denoiser)")
    p.add_argument("--num-scales", type=_int_at_least(2), default=18,
                   help="consistency: N, the Karras sigmas of the distillation (default: 18)")
    p.add_argument("--objective", default="trajectory", choices=["trajectory", "consistency"],
                   help="consistency: regress on the teacher's ODE trajectories, or Algorithm 2 of Song et al. "
                        "(default: trajectory)")
    p.add_argument("--trajectories", type=_int_at_least(1), default=122880,
                   help="consistency --objective trajectory: teacher trajectories to distil from (default: 122880)")
    p.add_argument("--first-sigma-share", type=_unit_interval, default=None,
                   help="consistency: share of the samples drawn at the largest sigma, where every sampler starts "
                        "(default: 0.3 with --objective trajectory, 0 with --objective consistency)")
    p.add_argument("--distribution-matching", type=_nonneg_float, default=0.0,
                   help="consistency --objective trajectory: weight of the distribution-matching term of the "
                        "1-step samples (a fake denoiser trained online; default: 0, none)")
    p.add_argument("--init", default=None,
                   help="consistency: start the student from this distilled checkpoint instead of the teacher")
    p.add_argument("--distance", default="pseudo-huber", choices=["pseudo-huber", "l2"],
                   help="consistency: the distance between student and target outputs (default: pseudo-huber)")
    p.add_argument("--resume", action="store_true",
                   help="gan, ddpm, flow, consistency: continue an interrupted run from the checkpoint at --out "
                        "(with that run's settings)")
    p.add_argument("--slim", action="store_true",
                   help="gan, ddpm, flow, consistency: leave the training state out of the final checkpoint "
                        "(cannot be resumed)")
    p.add_argument("--checkpoint-every", type=_int_at_least(1), default=500,
                   help="gan, ddpm, flow, consistency: save the checkpoint (atomically) every this many steps "
                        "(default: 500)")
    p.set_defaults(run=_train)


def _add_sample(commands):
    p = commands.add_parser("sample", help="sample digits with the shipped DDPM: PNG grid, fastgen vs reference time")
    p.add_argument("--model", default="ddpm", choices=["ddpm", "flow"],
                   help="the shipped model to sample (default: ddpm; flow: the normalizing flow)")
    p.add_argument("--temperature", type=_positive_float, default=None, help="flow: the latent's scale (default: 1)")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="ddpm: the scheduler (default: ddim); flow_match samples the denoiser as a velocity model, "
                        "edm_* as an EDM-preconditioned network, consistency the distilled student "
                        "(default 2 steps)")
    p.add_argument("--label", type=_int_at_least(0), default=None,
                   help="ddpm: the digit to sample (a class-conditional denoiser, train ddpm --conditional)")
    p.add_argument("--guidance-scale", type=_finite_float, default=None,
                   help="ddpm: classifier-free guidance towards --label (w; 1: the conditional model alone)")
    p.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="ddpm: sampling steps (default: ddim 50, ddpm 1000, consistency 2)")
    p.add_argument("--n", type=_int_at_least(1), default=64, help="number of samples (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the counter-based noise (default: 0)")
    p.add_argument("--eta", type=_unit_interval, default=None, help="ddpm --sampler ddim: eta in [0, 1] (default: 0)")
    p.add_argument("--out", default="grid.png",
                   help="the output: .png a grid, .npz the samples [N, C, H, W] as float32 in [0, 1] under the key "
                        "'samples' (default: ./grid.png)")
    p.add_argument("--scale", type=_int_at_least(1), default=4,
                   help="pixels per sample pixel in the PNG (default: 4)")
    p.add_argument("--checkpoint", default=None, help="a denoiser checkpoint (default: the shipped digits one)")
    p.add_argument("--device", type=_device, default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference loop (its time and the comparison)")
    p.add_argument("--repeats", type=_int_at_least(1), default=3,
                   help="timed calls of each loop after an untimed warm-up; the median and min-max are printed "
                        "(default: 3)")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=_int_at_least(1), default=None,
                   help="samples per sampling call; the same samples for any number of processes (default with "
                        "torchrun or --shard-dir: 256; without any of them, all --n in one call, timed)")
    p.add_argument("--shard-dir", default=None,
                   help="a folder for a resumable run: each finished shard saved there, a rerun skips them")
    p.add_argument("--shard-size", type=_int_at_least(1), default=None,
                   help="samples per shard, a multiple of the batch size (default: 16 batches)")
    p.add_argument("--dist-timeout", type=_positive_float, default=1800.0,
                   help="torchrun: seconds to wait for the other ranks at the rendezvous and each exchange "
                        "(default: 1800)")
    p.set_defaults(run=_sample)


def _build_parser() -> argparse.ArgumentParser:
    """The ``python -m fastgen`` parser: one subcommand per command, each with its argument types."""
    parser = _Parser(prog="python -m fastgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_validate, _add_bench, _add_train, _add_sample):
        add(commands)
    return parser


def main(argv=None) -> int:
    """Run one command. A user error (a bad argument, a path that cannot be read or written, a file that is
    not a checkpoint) prints one line ``python -m fastgen <command>: error: ...`` on stderr and returns 2;
    Ctrl-C prints one line and returns 130 (outputs are replaced only whole, so none is left half written);
    another rank's failure in a torchrun launch (``fastgen.distributed.DistributedError``) one line and 1."""
    parser = _build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun -m fastgen -- sample ...` passes the rest; `python -m fastgen -- sample` too
        argv = argv[1:]
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(f"{err.prog}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    prog = f"{parser.prog} {args.command}"
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output was left half written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as err:  # another rank failed, died or never arrived: one line on every rank
        distributed = sys.modules.get("fastgen.distributed")
        if distributed is None or not isinstance(err, distributed.DistributedError):
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
