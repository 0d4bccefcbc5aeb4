"""fastgen.schedulers as diffusers itself checks its schedulers: the values diffusers' own DDPM and DDIM
scheduler tests assert (for stock diffusers), on the same deterministic inputs and configurations;
the config and save/load machinery the classes inherit; diffusers' DDPMPipeline and DDIMPipeline with
their scheduler swapped for fastgen's; the stated differences from diffusers; and that ``step``
never reads a tensor's value on the host (the timesteps of ``scheduler.timesteps`` are located by
their place in that tensor).

The inputs are ramps: 0 .. n-1 divided by n, laid out [C, H, W, B] and moved to [B, C, H, W] (the
noise is the same ramp reversed), and the toy model is x * t / (t + 1). Steps run with
backend="torch" (what "auto" picks on a CPU) and backend="triton" (the Triton interpreter on a CPU,
compiled on a GPU), except the 1000-step DDPM loops, which take ~30 s each in the interpreter and run
with the torch backend only (tests/test_schedulers.py checks the kernel against diffusers per step).
"""
import contextlib
import functools
import inspect
import json

import numpy as np
import pytest
import torch

import fastgen

import diffusers  # a dependency of fastgen.schedulers: never skipped
import fastgen.schedulers as fs  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402

BACKENDS = ["torch", "triton"]
SHAPE = (4, 3, 8, 8)  # [B, C, H, W]
DDPM_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                   variance_type="fixed_small", clip_sample=True)
DDIM_CONFIG = {k: v for k, v in DDPM_CONFIG.items() if k != "variance_type"}
CLASSES = {"ddpm": (fs.DDPMScheduler, diffusers.DDPMScheduler, DDPM_CONFIG),
           "ddim": (fs.DDIMScheduler, diffusers.DDIMScheduler, DDIM_CONFIG)}


def ramp(reverse=False):
    """The deterministic sample (reverse=True: the deterministic noise) of SHAPE, values in [0, 1)."""
    b, c, h, w = SHAPE
    values = torch.arange(b * c * h * w)
    if reverse:
        values = values.flip(0)
    return (values.reshape(c, h, w, b) / values.numel()).permute(3, 0, 1, 2)


def toy_model(sample, t):
    """x * t / (t + 1), with t (an int or a tensor of shape [] or [B]) as a float per sample."""
    t = torch.as_tensor(t, device=sample.device).to(sample.dtype).reshape(-1, *(1,) * (sample.dim() - 1))
    return sample * t / (t + 1)


def scheduler(kind, backend="torch", **changes):
    ours, _, config = CLASSES[kind]
    return ours(**{**config, **changes}, backend=backend)


def run_loop(scheduler, sample, timesteps, **step_kwargs):
    """The toy model stepped over ``timesteps``, noise from ``torch.manual_seed(0)``."""
    generator = torch.manual_seed(0)
    for t in timesteps:
        sample = scheduler.step(toy_model(sample, t), t, sample, generator=generator, **step_kwargs).prev_sample
    return sample


def assert_abs_stats(sample, total, mean):
    """sum |x| within 1e-2 and mean |x| within 1e-3 of diffusers' asserted values; finite everywhere."""
    assert torch.isfinite(sample).all()
    assert abs(sample.abs().sum().item() - total) < 1e-2
    assert abs(sample.abs().mean().item() - mean) < 1e-3


# --- DDPM: diffusers' asserted values ------------------------------------------------------------------

DDPM_LOOPS = {"epsilon": (258.9606, 0.3372), "v_prediction": (202.0296, 0.2631)}  # sum |x|, mean |x|


@pytest.mark.parametrize("prediction_type", DDPM_LOOPS)
def test_ddpm_full_loop(prediction_type):
    """All 1000 training timesteps (no set_timesteps), torch backend only (module docstring)."""
    total, mean = DDPM_LOOPS[prediction_type]
    s = scheduler("ddpm", prediction_type=prediction_type)
    assert_abs_stats(run_loop(s, ramp(), s.timesteps), total, mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddpm_loop_from_noised_sample(backend):
    """add_noise at the first of the last two timesteps, then those two steps."""
    s = scheduler("ddpm", backend)
    timesteps = s.timesteps[998:]
    sample = s.add_noise(ramp(), ramp(reverse=True), timesteps[:1])
    assert_abs_stats(run_loop(s, sample, timesteps), 387.9466, 0.5051)


def test_ddpm_variance():
    s = scheduler("ddpm")
    for t, want in ((0, 0.0), (487, 0.00979), (999, 0.02)):
        assert abs(float(s._get_variance(t)) - want) < 1e-5


# --- DDIM: diffusers' asserted values ------------------------------------------------------------------

DDIM_LOOPS = {  # name: (config changes, sum |x|, mean |x|) after 10 steps, eta = 0
    "epsilon": (dict(), 172.0067, 0.223967),
    "v_prediction": (dict(prediction_type="v_prediction"), 52.5302, 0.0684),
    "alpha_to_one": (dict(set_alpha_to_one=True, beta_start=0.01), 149.8295, 0.1951),
    # the last step lands on abar_0 instead of 1: every value came out NaN in fastgen before the fix
    "final_abar_0": (dict(set_alpha_to_one=False, beta_start=0.01), 149.0784, 0.1941),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DDIM_LOOPS)
def test_ddim_full_loop(case, backend):
    changes, total, mean = DDIM_LOOPS[case]
    s = scheduler("ddim", backend, **changes)
    s.set_timesteps(10)
    assert_abs_stats(run_loop(s, ramp(), s.timesteps, eta=0.0), total, mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_loop_from_noised_sample(backend):
    """10 inference steps, started at the 9th: add_noise there, then the last two steps."""
    s = scheduler("ddim", backend)
    s.set_timesteps(10)
    timesteps = s.timesteps[8:]
    sample = s.add_noise(ramp(), ramp(reverse=True), timesteps[:1])
    assert_abs_stats(run_loop(s, sample, timesteps, eta=0.0), 354.5418, 0.4616)


def test_ddim_variance_and_timesteps():
    s = scheduler("ddim")
    for (t, prev_t), want in (((420, 400), 0.14771), ((980, 960), 0.32460), ((487, 486), 0.00979),
                              ((999, 998), 0.02)):
        assert abs(float(s._get_variance(t, prev_t)) - want) < 1e-5
    offset = scheduler("ddim", steps_offset=1)
    offset.set_timesteps(5)
    assert offset.timesteps.tolist() == [801, 601, 401, 201, 1]


# --- config, save / load, outputs ------------------------------------------------------------------------

def plain_config(config):
    """A config as comparable plain values, without diffusers' bookkeeping of defaults."""
    return {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v
            for k, v in config.items() if k != "_use_default_values"}


@pytest.mark.parametrize("kind", CLASSES)
def test_save_load_round_trip(kind, tmp_path):
    """save_pretrained + from_pretrained give the same class and config; trained betas survive (diffusers'
    own test: two trained betas with num_train_timesteps=1000, which construct, save and load; only
    set_timesteps refuses them)."""
    for changes in (dict(prediction_type="v_prediction", steps_offset=1), dict(trained_betas=np.array([0.1, 0.3]))):
        s = scheduler(kind, **changes)
        s.save_pretrained(tmp_path / str(len(changes)))
        loaded = type(s).from_pretrained(tmp_path / str(len(changes)))
        assert type(loaded) is type(s) and plain_config(loaded.config) == plain_config(s.config)
    assert loaded.config.trained_betas == [0.1, 0.3]
    assert torch.equal(loaded.betas, torch.tensor([0.1, 0.3])) and loaded.num_schedule_timesteps == 2


@pytest.mark.parametrize("kind", CLASSES)
def test_backend_is_no_config_key(kind, tmp_path):
    """backend is a constructor keyword: from_config passes it through, the saved config never has it."""
    s = scheduler(kind, "triton")
    assert type(s).from_config(s.config, backend="torch").backend == "torch"
    assert type(s).from_config(s.config).backend == "auto"
    s.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "backend" not in saved and saved["_class_name"] == type(s).__name__


@pytest.mark.parametrize("kind", CLASSES)
def test_compatibles_load_the_config(kind):
    s = scheduler(kind)
    assert CLASSES[kind][1] in s.compatibles
    for compatible in s.compatibles:
        assert inspect.isclass(compatible) and issubclass(compatible, diffusers.SchedulerMixin)
        assert isinstance(compatible.from_config(s.config), compatible)


@pytest.mark.parametrize("kind", CLASSES)
def test_step_output_is_diffusers_output(kind):
    s = scheduler(kind)
    s.set_timesteps(10)
    sample = ramp()
    out = s.step(toy_model(sample, 500), 500, sample, generator=torch.manual_seed(0))
    assert isinstance(out, BaseOutput)
    assert out[0] is out.prev_sample and out["prev_sample"] is out.prev_sample
    assert [a is b for a, b in zip(out.to_tuple(), (out.prev_sample, out.pred_original_sample))] == [True, True]
    plain = s.step(toy_model(sample, 500), 500, sample, generator=torch.manual_seed(0), return_dict=False)
    assert isinstance(plain, tuple) and all(torch.equal(a, b) for a, b in zip(plain, out.to_tuple()))


@pytest.mark.parametrize("kind", CLASSES)
def test_unknown_config_attribute_warns(kind):
    """diffusers' deprecation of config values read as attributes reaches fastgen's classes too."""
    s = scheduler(kind)
    s.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning):
        assert s.test_attribute == 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", CLASSES)
def test_one_training_timestep(kind, backend):
    """num_train_timesteps=1 is a config diffusers accepts: the step at t = 0 is diffusers'."""
    ours, theirs = scheduler(kind, backend, num_train_timesteps=1), CLASSES[kind][1](num_train_timesteps=1)
    if kind == "ddim":
        ours.set_timesteps(1)
        theirs.set_timesteps(1)
    sample = ramp() * 2 - 1
    got = ours.step(-sample, 0, sample).prev_sample
    want = theirs.step(-sample, 0, sample).prev_sample
    assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


# --- stated differences from diffusers ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", CLASSES)
def test_betas_above_one_are_refused(kind):
    """diffusers' betas test includes beta_start=0.1, beta_end=2: the linear betas pass 1 at index 474,
    so from there alpha_t = 1 - beta_t is negative, abar_t alternates in sign and each diffusers step
    takes the square root of a negative abar (NaN). fastgen refuses the schedule at construction and
    names the first bad beta."""
    with pytest.raises(ValueError, match=r"betas\[474\] = 1\.0"):
        scheduler(kind, beta_start=0.1, beta_end=2.0)
    theirs = CLASSES[kind][1](beta_start=0.1, beta_end=2.0)
    if kind == "ddim":
        theirs.set_timesteps(10)
    sample = ramp()
    assert torch.isnan(theirs.step(sample, 901, sample).prev_sample).all()


def test_ddpm_fixed_large_log_is_finite():
    """diffusers' variance_type="fixed_large_log" takes the square root of log(beta_t) (negative), so
    every step with t > 0 is NaN there; fastgen uses the variance the name means, beta_t, as
    "fixed_large" does."""
    ours = scheduler("ddpm", variance_type="fixed_large_log")
    theirs = diffusers.DDPMScheduler(**{**DDPM_CONFIG, "variance_type": "fixed_large_log"})
    sample = ramp()
    got, want = (s.step(toy_model(sample, 500), 500, sample, generator=torch.manual_seed(0)).prev_sample
                 for s in (ours, theirs))
    assert torch.isfinite(got).all() and torch.isnan(want).all()


# --- diffusers' pipelines --------------------------------------------------------------------------------

@functools.cache
def tiny_unet(out_channels=3):
    """A random 2-level UNet2DModel on [B, 3, 8, 8] images (6 output channels: learned variances)."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4).eval()


def images(pipe, **call):
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np", **call).images


SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
PIPELINES = {  # name: (kind, scheduler config, pipeline call, fastgen backend)
    "ddim default call": ("ddim", {}, dict(num_inference_steps=5), "torch"),
    "ddim eta 0.5": ("ddim", {}, dict(num_inference_steps=5, eta=0.5), "torch"),
    "ddpm default": ("ddpm", {}, dict(num_inference_steps=5), "torch"),
    "ddpm learned_range": ("ddpm", dict(variance_type="learned_range"), dict(num_inference_steps=5), "torch"),
    "ddpm v_prediction": ("ddpm", dict(prediction_type="v_prediction"), dict(num_inference_steps=5), "torch"),
    "ddim v_prediction": ("ddim", dict(prediction_type="v_prediction"), dict(num_inference_steps=5, eta=1.0),
                          "torch"),
    "ddim trailing zero snr": ("ddim", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                            prediction_type="v_prediction"), dict(num_inference_steps=6), "torch"),
    "ddim sd offset 0": ("ddim", SD, dict(num_inference_steps=8, eta=0.3), "torch"),
    "ddim sd offset 1": ("ddim", dict(SD, steps_offset=1), dict(num_inference_steps=8), "torch"),
    "ddim triton": ("ddim", SD, dict(num_inference_steps=4, eta=1.0, use_clipped_model_output=True), "triton"),
    "ddpm triton": ("ddpm", dict(variance_type="learned_range"), dict(num_inference_steps=4), "triton"),
}


@pytest.mark.parametrize("case", PIPELINES)
def test_pipeline_with_fastgen_scheduler(case):
    """The stock pipeline, then the same pipeline with fastgen's scheduler assigned (DDIMPipeline's
    constructor turns any scheduler into diffusers' DDIMScheduler, so fastgen's is set afterwards):
    the same images to 1e-4 from the same generator."""
    kind, config, call, backend = PIPELINES[case]
    ours, stock, _ = CLASSES[kind]
    pipeline = diffusers.DDIMPipeline if kind == "ddim" else diffusers.DDPMPipeline
    unet = tiny_unet(6 if config.get("variance_type") == "learned_range" else 3)
    pipe = pipeline(unet=unet, scheduler=stock(**config))
    want = images(pipe, **call)
    pipe.scheduler = ours.from_config(pipe.scheduler.config, backend=backend)
    assert type(pipe.scheduler) is ours and pipe.scheduler.backend == backend
    got = images(pipe, **call)
    assert not np.isnan(got).any() and not np.isnan(want).any()
    assert np.abs(got - want).max() <= 1e-4


def test_ddim_pipeline_constructor_converts_the_scheduler():
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=fs.DDIMScheduler())
    assert type(pipe.scheduler) is diffusers.DDIMScheduler


def test_saved_pipeline_reloads_fastgen_scheduler(tmp_path):
    """A pipeline saved with fastgen's scheduler records it as ("fastgen", "DDPMScheduler") in
    model_index.json (the top-level package re-exports the class and SchedulerMixin, which diffusers
    looks up there) and loads it back, with the same images."""
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=fs.DDPMScheduler(backend="torch"))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["fastgen", "DDPMScheduler"]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is fastgen.DDPMScheduler is fs.DDPMScheduler
    assert np.abs(images(loaded, num_inference_steps=4) - images(pipe, num_inference_steps=4)).max() <= 1e-6


def test_from_pretrained_keeps_a_given_fastgen_scheduler(tmp_path):
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    given = fs.DDPMScheduler(backend="torch")
    assert diffusers.DDPMPipeline.from_pretrained(tmp_path, scheduler=given).scheduler is given


# --- no host synchronisation in step ---------------------------------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def host_reads_raise():
    """Every way Python reads a tensor's value on the host raises inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a tensor's value on the host")
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


NOISE = {"generator": lambda: dict(generator=torch.Generator().manual_seed(0)), "seed": lambda: dict(seed=7)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("kind", CLASSES)
def test_step_reads_no_tensor_value(monkeypatch, kind, noise, backend):
    """What this proves on a CPU-only machine: the scheduler's part of a step (all of it but the fused
    op) reads no tensor's value, so it cannot synchronise with a device. The timesteps, sample and
    model output are on the meta device (tensors without data, standing in for a GPU here) and every
    host read of a tensor raises; in a pipeline's loop (``for t in scheduler.timesteps``) the scheduler
    still hands the op each timestep and the one it steps to as host ints, found by the element's place
    in ``scheduler.timesteps``, and the noise as a tensor (generator) or a seed. The op is replaced by a
    recorder: it cannot run on meta tensors, and it checks values only of CPU tensors (by design: a CPU
    read is no synchronisation). Meta storages all sit at address 0, so this does not test that a
    foreign tensor is told apart from an element of ``scheduler.timesteps``; the CUDA test below runs
    the whole step, op included, under torch's sync debug mode."""
    s = scheduler(kind, backend)
    s.set_timesteps(10)
    timesteps = s.timesteps.tolist()
    s._timesteps = s.timesteps.to("meta")  # as set_timesteps(device=) leaves it (host copy taken then)
    op_name = f"{kind}_step"
    signature, calls = inspect.signature(getattr(fastgen, op_name)), []

    def record(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return calls[-1]["sample"], calls[-1]["sample"]

    monkeypatch.setattr(fastgen, op_name, record)
    sample = torch.empty(SHAPE, device="meta")
    with host_reads_raise():
        for t in s.timesteps:
            sample = s.step(torch.empty(SHAPE, device="meta"), t, sample, **NOISE[noise](),
                            **(dict(eta=1.0) if kind == "ddim" else {})).prev_sample
    assert [c["t"] for c in calls] == timesteps and all(type(c["t"]) is int for c in calls)
    stride = 1000 // 10
    prev = timesteps[1:] + [-1] if kind == "ddpm" else [max(t - stride, -1) for t in timesteps]
    assert [c["prev_t"] for c in calls] == prev
    assert all(c.get("backend") == backend for c in calls)
    drawn = [c.get("noise") is not None for c in calls]
    if noise == "generator":  # diffusers' noise, drawn where the step adds noise (DDPM: not at t = 0)
        assert drawn == [kind == "ddim" or t > 0 for t in timesteps]
        assert all(c["noise"].device.type == "meta" for c in calls if c.get("noise") is not None)
    else:
        assert not any(drawn) and all(c["seed"] == 7 for c in calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("noise", ["generator", "seed"])
@pytest.mark.parametrize("kind", CLASSES)
def test_cuda_step_does_not_synchronize(kind, noise):
    """A pipeline's loop on CUDA (backend "auto": the fused Triton step, timesteps set on the device)
    runs under torch's sync debug mode "error", so no step waits for the device. One step runs first,
    outside the check: it compiles the kernel and copies the tables to the device (once per scheduler).
    The generator is a CUDA one: with a CPU generator diffusers' randn_tensor draws on the CPU and
    copies to the device, which synchronises (in stock diffusers too)."""
    s = scheduler(kind, "auto")
    s.set_timesteps(10, device="cuda")
    noise_kwargs = dict(generator=torch.Generator("cuda").manual_seed(0)) if noise == "generator" else dict(seed=7)
    step_kwargs = dict(noise_kwargs, **(dict(eta=1.0) if kind == "ddim" else {}))
    sample = ramp().cuda()
    t = s.timesteps[0]
    s.step(toy_model(sample, t), t, sample, **step_kwargs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in s.timesteps:
            sample = s.step(toy_model(sample, t), t, sample, **step_kwargs).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(sample).all()


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    """A scheduler's config file is written whole or not at all: a save that fails while writing
    leaves the saved file byte for byte and no temporary beside it."""
    import os

    scheduler = fastgen.schedulers.DDIMScheduler()
    scheduler.save_pretrained(tmp_path)
    path = tmp_path / scheduler.config_name
    before = path.read_bytes()

    def broken(self):
        raise OSError("no space left on device")

    monkeypatch.setattr(type(scheduler), "to_json_string", broken)
    with pytest.raises(OSError, match="no space left"):
        fastgen.schedulers.DDIMScheduler(beta_schedule="scaled_linear").save_pretrained(tmp_path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == [scheduler.config_name]
