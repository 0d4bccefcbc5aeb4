"""fastgen.sample: fused loop vs reference loop, vs the float64 reference sample_loop, vs diffusers
with a generator; batch invariance of the counter-based noise; trajectory, progress, errors.

Tiny shapes and few steps: on a CPU the fused steps run in the Triton interpreter."""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, IPNDMScheduler, LCMScheduler)
from diffusers.utils.torch_utils import randn_tensor

import fastgen
from fastgen.reference import diffusion as ref
from fastgen.reference import random as ref_random
from fastgen.schedules import NoiseSchedule

T = 20


class Toy(torch.nn.Module):
    """An elementwise 'denoiser' (per sample, so batch-invariant to the bit): a x + b sin(x) + c t."""

    def __init__(self, channels_out=None):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.4))
        self.b = torch.nn.Parameter(torch.tensor(0.3))
        self.channels_out = channels_out

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        out = self.a * x + self.b * torch.sin(x) + 0.002 * t
        if self.channels_out:  # learned variance: values in [-1, 1] as the extra channels
            out = torch.cat([out, torch.tanh(x)], dim=1)
        return out


SCHEDULERS = [
    pytest.param(lambda: DDPMScheduler(num_train_timesteps=T), {}, id="ddpm"),
    pytest.param(lambda: DDPMScheduler(num_train_timesteps=T, variance_type="learned_range",
                                       prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"),
                 {}, id="ddpm-learned_range-v"),
    pytest.param(lambda: DDIMScheduler(num_train_timesteps=T), {}, id="ddim"),
    pytest.param(lambda: DDIMScheduler(num_train_timesteps=T, set_alpha_to_one=False, prediction_type="sample",
                                       timestep_spacing="trailing", clip_sample=False), {"eta": 1.0},
                 id="ddim-eta1-sample-trailing"),
]
SIGMA_SCHEDULERS = [  # the StepTable samplers (diffusers' classes: fastgen.sample reads their configs)
    pytest.param(lambda: EulerDiscreteScheduler(num_train_timesteps=T), {}, id="euler"),
    pytest.param(lambda: EulerDiscreteScheduler(num_train_timesteps=T, prediction_type="v_prediction",
                                                use_karras_sigmas=True), {}, id="euler-v-karras"),
    pytest.param(lambda: EulerAncestralDiscreteScheduler(num_train_timesteps=T), {}, id="euler_ancestral"),
    pytest.param(lambda: DPMSolverMultistepScheduler(num_train_timesteps=T), {}, id="dpmsolver++2m"),
    pytest.param(lambda: DPMSolverMultistepScheduler(num_train_timesteps=T, algorithm_type="sde-dpmsolver++",
                                                     use_karras_sigmas=True), {}, id="sde-dpmsolver++2m-karras"),
    pytest.param(lambda: DPMSolverMultistepScheduler(num_train_timesteps=T, thresholding=True, sample_max_value=2.0,
                                                     solver_order=1, final_sigmas_type="sigma_min"),
                 {}, id="dpmsolver++1-thresholding-sigma_min"),
    pytest.param(lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), {}, id="flow_match-shift3"),
]
MORE_SCHEDULERS = [  # the rest of the configurations the torch loop has its own code for
    pytest.param(lambda: DDPMScheduler(num_train_timesteps=T, variance_type="fixed_large", prediction_type="sample",
                                       thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
                 {}, id="ddpm-large-sample-thresholding"),
    pytest.param(lambda: DDPMScheduler(num_train_timesteps=T, variance_type="learned", clip_sample_range=0.5),
                 {}, id="ddpm-learned"),
    pytest.param(lambda: DDIMScheduler(num_train_timesteps=T, prediction_type="v_prediction", thresholding=True,
                                       sample_max_value=3.0),
                 {"eta": 0.4}, id="ddim-eta0.4-v-thresholding"),
    pytest.param(lambda: DDIMScheduler(num_train_timesteps=T, clip_sample_range=0.3), {"eta": 0.7},
                 id="ddim-eta0.7-epsilon-clip"),
]


class Learned(torch.nn.Module):
    """Toy with a positive variance in its extra channels (variance_type="learned" reads a variance)."""

    def __init__(self):
        super().__init__()
        self.toy = Toy()

    def forward(self, x, t):
        return torch.cat([self.toy(x, t), 0.05 + torch.sigmoid(x)], dim=1)


def _model_for(scheduler):
    if scheduler.config.get("variance_type") == "learned":
        return Learned()
    if scheduler.config.get("thresholding"):  # predictions loud enough that the thresholds bite (s > 1)
        toy = Toy()
        return lambda x, t: 4 * toy(x, t)
    return Toy(channels_out=True if scheduler.config.get("variance_type") == "learned_range" else None)


@pytest.mark.parametrize("make_scheduler,kwargs", SCHEDULERS + SIGMA_SCHEDULERS)
def test_fused_loop_matches_reference_loop(make_scheduler, kwargs):
    scheduler = make_scheduler()
    model = _model_for(scheduler)
    shape = (3, 2, 5)
    fused = fastgen.sample(model, shape, scheduler, num_inference_steps=5, seed=11, offset=3, backend="triton", **kwargs)
    reference = fastgen.sample(model, shape, scheduler, num_inference_steps=5, seed=11, offset=3, backend="torch",
                               **kwargs)
    assert fused.shape == shape and fused.dtype == torch.float32
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    # a different seed gives different samples (the noise is really used)
    other = fastgen.sample(model, shape, scheduler, num_inference_steps=5, seed=12, offset=3, backend="torch", **kwargs)
    assert (other - reference).abs().max() > 1e-2


@pytest.mark.parametrize("make_scheduler,kwargs", SCHEDULERS + MORE_SCHEDULERS + SIGMA_SCHEDULERS)
@pytest.mark.parametrize("noise", ["seed", "generator"])
def test_torch_loop_matches_float64_reference_loop(make_scheduler, kwargs, noise):
    """The torch loop (fp32 ops, precomputed coefficients, chunked noise) against every step through
    the float64 reference, 12 steps of a batch whose noise spans several chunks."""
    from fastgen.sampling import _TorchSteps

    scheduler = make_scheduler()
    model = _model_for(scheduler)
    shape = (5, 2, 3)
    noise_args = dict(seed=21, offset=4) if noise == "seed" else {}

    def run(backend):
        if noise == "generator":
            noise_args["generator"] = torch.Generator().manual_seed(3)
        return fastgen.sample(model, shape, scheduler, num_inference_steps=12, backend=backend, **noise_args, **kwargs)

    reference = run("reference")
    chunk = _TorchSteps.NOISE_CHUNK
    try:
        _TorchSteps.NOISE_CHUNK = 2 * torch.Size(shape).numel() + 1  # two steps per noise call
        got = run("torch")
    finally:
        _TorchSteps.NOISE_CHUNK = chunk
    assert torch.isfinite(reference).all()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_reference_loop_is_the_float64_sample_loop():
    """backend="torch" is fastgen.reference.diffusion.sample_loop (float64) up to fp32 rounding."""
    model = Toy()
    shape = (2, 3, 4)
    schedule = NoiseSchedule(num_train_timesteps=12)
    expected = ref.sample_loop(model, shape, schedule, seed=5)
    got = fastgen.sample(model, shape, DDPMScheduler(num_train_timesteps=12), seed=5, backend="torch")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # DDIM with eta: a strided schedule whose steps draw from stream t
    timesteps = [9, 6, 3, 0]
    expected = ref.sample_loop(model, shape, schedule, seed=5, timesteps=timesteps, step=ref.ddim_step, eta=0.7)
    got = fastgen.sample(model, shape, DDIMScheduler(num_train_timesteps=12), num_inference_steps=4, seed=5, eta=0.7,
                         backend="torch")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,batch", [("triton", 8), ("torch", 64)])  # the interpreter runs a program per sample
@pytest.mark.parametrize("make_scheduler", [
    pytest.param(lambda: DDPMScheduler(num_train_timesteps=T), id="ddpm"),
    pytest.param(lambda: EulerAncestralDiscreteScheduler(num_train_timesteps=T), id="euler_ancestral"),
    pytest.param(lambda: DPMSolverMultistepScheduler(num_train_timesteps=T, algorithm_type="sde-dpmsolver++"),
                 id="sde-dpmsolver++2m")])
def test_sample_k_is_the_same_alone_in_a_batch_and_in_shards(backend, batch, make_scheduler):
    model = Toy()
    scheduler = make_scheduler()
    whole = fastgen.sample(model, (batch, 1, 2, 2), scheduler, num_inference_steps=3, seed=3, backend=backend)
    k = batch - 3
    alone = fastgen.sample(model, (1, 1, 2, 2), scheduler, num_inference_steps=3, seed=3, offset=k, backend=backend)
    torch.testing.assert_close(alone[0], whole[k], rtol=0, atol=0)
    half = batch // 2
    shards = [fastgen.sample(model, (half, 1, 2, 2), scheduler, num_inference_steps=3, seed=3, offset=start,
                             backend=backend) for start in (0, half)]
    torch.testing.assert_close(torch.cat(shards), whole, rtol=0, atol=0)


@pytest.mark.parametrize("make_scheduler,kwargs", [SCHEDULERS[0], SCHEDULERS[3], *SIGMA_SCHEDULERS])
@pytest.mark.parametrize("per_sample_generators", [False, True])
def test_generator_gives_the_diffusers_loop(make_scheduler, kwargs, per_sample_generators):
    """With generator=, the noise is diffusers': the result is a hand-written diffusers loop's."""
    scheduler = make_scheduler()
    model = _model_for(scheduler)
    shape = (3, 2, 4)

    def generators():
        if per_sample_generators:
            return [torch.Generator().manual_seed(100 + i) for i in range(shape[0])]
        return torch.Generator().manual_seed(100)

    g = generators()
    scheduler.set_timesteps(4)
    x = randn_tensor(shape, generator=g) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # the pipelines' loop, as they write it
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(scale(x, t), t), t, x, generator=g, **kwargs).prev_sample
    for backend in ("triton", "torch"):
        got = fastgen.sample(model, shape, scheduler, num_inference_steps=4, generator=generators(), backend=backend,
                             **kwargs)
        torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_scheduler,timesteps", [
    pytest.param(lambda: EulerDiscreteScheduler(num_train_timesteps=T), [15, 9, 3], id="euler"),
    pytest.param(lambda: DPMSolverMultistepScheduler(num_train_timesteps=T), [15, 9, 3], id="dpmsolver++2m"),
    pytest.param(lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), [900.0, 500.0, 100.0], id="flow_match"),
    pytest.param(lambda: LCMScheduler(num_train_timesteps=T, original_inference_steps=10), [19, 9, 3], id="lcm"),
])
def test_custom_timesteps_give_the_diffusers_loop(make_scheduler, timesteps):
    """timesteps= is set_timesteps(timesteps=...), then the same loop: a hand-written diffusers loop's result."""
    scheduler = make_scheduler()
    model, shape = Toy(), (3, 2, 4)
    g = torch.Generator().manual_seed(100)
    scheduler.set_timesteps(timesteps=timesteps)
    x = randn_tensor(shape, generator=g) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching has none
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(scale(x, t), t), t, x, generator=g).prev_sample
    for backend in ("triton", "torch"):
        got = fastgen.sample(model, shape, make_scheduler(), timesteps=timesteps, backend=backend,
                             generator=torch.Generator().manual_seed(100))
        torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_trajectory_starts_at_the_stream_T_noise_and_ends_at_the_sample():
    model = Toy()
    shape = (2, 3)
    x, trajectory = fastgen.sample(model, shape, DDIMScheduler(num_train_timesteps=T), num_inference_steps=4, seed=9,
                                   offset=5, return_trajectory=True, backend="triton")
    assert trajectory.shape == (5, *shape)
    expected_noise = ref_random.randn(shape, seed=9, stream=T, offset=5 * 3)
    torch.testing.assert_close(trajectory[0], expected_noise, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(trajectory[-1], x, rtol=0, atol=0)
    assert all((trajectory[i + 1] - trajectory[i]).abs().max() > 0 for i in range(4))


def test_loop_never_reads_a_value_back(monkeypatch):
    """No .item() / .tolist() inside the fused loop (on a GPU either would synchronise)."""
    model = Toy()
    scheduler = DDPMScheduler(num_train_timesteps=T)
    expected = fastgen.sample(model, (2, 3), scheduler, num_inference_steps=3, seed=1, backend="triton")

    def refuse(self, *args):
        raise AssertionError("read back a tensor value inside the sampling loop")

    from fastgen import sampling

    real_run = sampling.Sampler.run

    def guarded_run(self, *args):
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", refuse)
            m.setattr(torch.Tensor, "tolist", refuse)
            return real_run(self, *args)

    monkeypatch.setattr(sampling.Sampler, "run", guarded_run)
    got = fastgen.sample(model, (2, 3), scheduler, num_inference_steps=3, seed=1, backend="triton")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_config_naming_its_class_is_enough():
    got = fastgen.sample(Toy(), (2, 3), _ConfigOnly(), num_inference_steps=4, seed=1, backend="torch")
    expected = fastgen.sample(Toy(), (2, 3), _ddpm(), num_inference_steps=4, seed=1, backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    class Increasing(_ConfigOnly):
        def set_timesteps(self, n):
            self.timesteps = torch.tensor([3, 5])

    with pytest.raises(ValueError, match="scheduler.timesteps must decrease"):
        fastgen.sample(Toy(), (2, 3), Increasing(), num_inference_steps=2)


def test_auto_graph_is_off_on_cpu_and_diffusers_style_outputs_are_read():
    class Output:
        def __init__(self, sample):
            self.sample = sample

    model = Toy()
    scheduler = DDIMScheduler(num_train_timesteps=T)
    plain = fastgen.sample(model, (2, 3), scheduler, num_inference_steps=3, seed=4, cuda_graph=False, backend="torch")
    wrapped = fastgen.sample(lambda x, t: Output(model(x, t)), (2, 3), scheduler, num_inference_steps=3, seed=4,
                             backend="torch")
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)


def test_progress_bar(capsys):
    fastgen.sample(Toy(), (2, 3), DDIMScheduler(num_train_timesteps=T), num_inference_steps=3, progress=True,
                   backend="torch")
    err = capsys.readouterr().err
    assert "ddim sampling" in err and "3/3" in err


def test_default_steps_and_seed_none_follows_torch_manual_seed():
    scheduler = DDIMScheduler(num_train_timesteps=100)
    _, trajectory = fastgen.sample(Toy(), (1, 2), scheduler, return_trajectory=True, backend="torch")
    assert len(trajectory) == 51  # DDIM: 50 steps by default
    torch.manual_seed(0)
    a = fastgen.sample(Toy(), (1, 2), scheduler, num_inference_steps=2, seed=None, backend="torch")
    torch.manual_seed(0)
    b = fastgen.sample(Toy(), (1, 2), scheduler, num_inference_steps=2, seed=None, backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_loop_matches_eager_loop():
    model = Toy().cuda()
    for scheduler, kwargs in ((DDPMScheduler(num_train_timesteps=T), {}), (DDIMScheduler(num_train_timesteps=T),
                                                                           {"eta": 0.5})):
        shape = (4, 1, 8, 8)
        eager = fastgen.sample(model, shape, scheduler, num_inference_steps=7, seed=2, cuda_graph=False, **kwargs)
        graph, trajectory = fastgen.sample(model, shape, scheduler, num_inference_steps=7, seed=2, cuda_graph=True,
                                           return_trajectory=True, **kwargs)
        torch.testing.assert_close(graph, eager, rtol=0, atol=0)
        torch.testing.assert_close(trajectory[-1], graph, rtol=0, atol=0)
        g = lambda: torch.Generator("cuda").manual_seed(0)  # noqa: E731
        eager = fastgen.sample(model, shape, scheduler, num_inference_steps=7, generator=g(), cuda_graph=False, **kwargs)
        graph = fastgen.sample(model, shape, scheduler, num_inference_steps=7, generator=g(), cuda_graph=True, **kwargs)
        torch.testing.assert_close(graph, eager, rtol=0, atol=0)


# --- errors ----------------------------------------------------------------------------------------

def _ddpm():
    return DDPMScheduler(num_train_timesteps=T)


class _ConfigOnly:
    """A scheduler that names its class in its config only (as a diffusers config loaded from disk)."""

    def __init__(self, **config):
        self.config = {"_class_name": "DDPMScheduler", "num_train_timesteps": T, **config}
        self.timesteps = torch.arange(T - 1, -1, -1)
        reference = _ddpm()  # the tables are the scheduler's own: this one carries a DDPMScheduler's
        self.betas, self.alphas_cumprod = reference.betas, reference.alphas_cumprod

    def set_timesteps(self, n):
        self.timesteps = (torch.arange(n) * (T // n)).flip(0)  # diffusers' "leading" spacing


@pytest.mark.parametrize("call,error,match", [
    (lambda: fastgen.sample(lambda x, t: x[:, :1], (2, 3), _ddpm(), backend="torch"), ValueError,
     r"model output must have shape \(2, 3\).*got \(2, 1\)"),
    (lambda: fastgen.sample(lambda x, t: x.half(), (2, 3), _ddpm(), backend="torch"), ValueError,
     "sampling dtype torch.float32"),
    (lambda: fastgen.sample(lambda x, t: x.to("meta"), (2, 3), _ddpm(), backend="torch"), ValueError,
     "sampling device"),
    (lambda: fastgen.sample(lambda x, t: "nope", (2, 3), _ddpm(), backend="torch"), TypeError, "model must return"),
    (lambda: fastgen.sample("model", (2, 3), _ddpm()), TypeError, "model must be callable"),
    (lambda: fastgen.sample(Toy(), (2, 3), IPNDMScheduler()), TypeError,
     "scheduler must be one of DDPMScheduler, DDIMScheduler.*got IPNDMScheduler"),
    (lambda: fastgen.sample(Toy(), (2, 3), object()), TypeError, "scheduler must be a diffusers or fastgen.schedulers scheduler"),
    (lambda: fastgen.sample(Toy(), (2, 3), DDPMScheduler(prediction_type="x0")), ValueError,
     "prediction_type must be one of.*got 'x0'"),
    (lambda: fastgen.sample(Toy(), (2, 3), DDPMScheduler(variance_type="fixed")), ValueError,
     "variance_type must be one of.*got 'fixed'"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), eta=0.5), ValueError, "eta, use_clipped_model_output and set_alpha_to_one are DDIM settings"),
    (lambda: fastgen.sample(Toy(), (2, 3), DDIMScheduler(), eta=1.5), ValueError, r"eta must be in \[0.0, 1.0\], got 1.5"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), num_inference_steps=0), ValueError,
     r"num_inference_steps must be in \[1, num_train_timesteps=20\], got 0"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), num_inference_steps=2.5), TypeError, "num_inference_steps"),
    (lambda: fastgen.sample(Toy(), (0, 3), _ddpm()), ValueError, "shape must be"),
    (lambda: fastgen.sample(Toy(), (2, -3), _ddpm()), ValueError, "shape must have non-negative sizes"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), dtype=torch.float64), ValueError, "dtype must be one of"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), device="meta"), ValueError,
     "device must not be .meta."),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), cuda_graph="yes"), ValueError, "cuda_graph must be"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), offset=-1), ValueError, "offset must be"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), offset=((1 << 63) - 7) // 3 + 1), ValueError,  # in samples
     rf"offset must be an integer in \[0, {((1 << 63) - 7) // 3}\]"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), offset=1, generator=torch.Generator()), ValueError,
     "with generator= it must be 0"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), generator=[torch.Generator()]), ValueError,
     r"one per sample \(batch=2\), got a list of 1"),
    (lambda: fastgen.sample(Toy(), (2, 3), _ddpm(), generator=0), TypeError, "generator must be"),
    (lambda: fastgen.sample(Toy(channels_out=True), (6,), DDPMScheduler(variance_type="learned")), ValueError,
     "channel dimension"),
    (lambda: fastgen.sample(Toy(), (2, 3), DDIMScheduler(), timesteps=[900, 10]), ValueError,
     "timesteps= sets a sigma-space scheduler's steps; DDIMScheduler takes num_inference_steps"),
    (lambda: fastgen.sample(Toy(), (2, 3), EulerAncestralDiscreteScheduler(), timesteps=[900, 10]), ValueError,
     "EulerAncestralDiscreteScheduler does not"),
    (lambda: fastgen.sample(Toy(), (2, 3), EulerDiscreteScheduler(), timesteps=[900, 10], num_inference_steps=2),
     ValueError, "pass num_inference_steps or timesteps, not both"),
    (lambda: fastgen.sample(Toy(), (2, 3), EulerDiscreteScheduler(), timesteps=900), TypeError,
     "timesteps must be a sequence of timesteps, got int"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is about a machine without CUDA")
def test_cuda_graph_true_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device, got device cpu"):
        fastgen.sample(Toy(), (2, 3), _ddpm(), cuda_graph=True)


def test_sampler_captures_once_and_repeats_its_samples():
    from fastgen.sampling import Sampler

    scheduler = DDIMScheduler(num_train_timesteps=T)
    sampler = Sampler(Toy(), (2, 3), scheduler, num_inference_steps=3, seed=8, eta=0.5, backend="torch")
    first, second = sampler(), sampler()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not sampler.captured and sampler.num_inference_steps == 3
    # with a generator every call draws on, as diffusers does
    sampler = Sampler(Toy(), (2, 3), scheduler, num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                      eta=0.5, backend="torch")
    assert (sampler() - sampler()).abs().max() > 1e-3


# --- python -m fastgen sample ------------------------------------------------------------------------

def _read_png(path):
    """(width, height, channels, rows) of an 8-bit grey/RGB PNG, every chunk's CRC checked."""
    import struct
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color = struct.unpack(">IIBB", chunks[0][1][:10])
    channels = {0: 1, 2: 3}[color]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert depth == 8 and len(raw) == height * (width * channels + 1)
    return width, height, channels, raw


def test_sample_command_writes_a_png_grid_and_times_both_paths(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "fastgen", "sample", "--n", "4", "--steps", "3", "--out", str(out),
                           "--scale", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    width, height, channels, raw = _read_png(out)
    assert (width, height, channels) == (2 * (2 * 8 + 1) + 1, 2 * (2 * 8 + 1) + 1, 1)  # 2x2 grid of 16x16
    assert len(set(raw)) > 10  # an image, not a flat colour
    assert "fastgen (torch loop" in proc.stdout and "reference (float64" in proc.stdout and "ms" in proc.stdout
    assert "max |difference|" in proc.stdout
    assert "ddim sampling" in proc.stderr  # the progress bar
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(out) as image:
        assert image.size == (width, height)


def test_sample_command_reports_bad_arguments(tmp_path):
    from fastgen import cli

    assert cli.main(["sample", "--n", "0", "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
    assert not (tmp_path / "x.png").exists()


def test_concurrent_samples_sharing_one_scheduler_do_not_mix_their_timesteps():
    """sample steps a private copy of the scheduler: threads sharing one (each with its own number of
    steps) get exactly what they get alone, and the caller's scheduler keeps its own timesteps."""
    import threading

    scheduler = fastgen.schedulers.DDIMScheduler(num_train_timesteps=T)
    scheduler.set_timesteps(7)
    before = scheduler.timesteps.clone()
    steps = [2, 3, 5, 9]
    alone = {n: fastgen.sample(Toy(), (2, 3), scheduler, num_inference_steps=n, seed=n, backend="torch")
             for n in steps}
    got, errors = {}, []

    def run(n):
        try:
            for _ in range(3):
                got.setdefault(n, []).append(
                    fastgen.sample(Toy(), (2, 3), scheduler, num_inference_steps=n, seed=n, backend="torch"))
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n,)) for n in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for n in steps:
        for x in got[n]:
            assert torch.equal(x, alone[n])
    assert torch.equal(scheduler.timesteps, before) and scheduler.num_inference_steps == 7


# --- classifier-free guidance ------------------------------------------------------------------------

class Conditional(torch.nn.Module):
    """Toy with a class embedding: model(x, t, class_labels) shifts the output by a label's vector."""
    num_classes, null_class_label = 4, 4

    def __init__(self):
        super().__init__()
        self.toy = Toy()
        self.embedding = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 5 * 6).reshape(5, 2, 3))

    def forward(self, x, t, class_labels=None):
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.null_class_label, device=x.device)
        return self.toy(x, t) + self.embedding[class_labels]


GUIDED_SCHEDULERS = [
    pytest.param(lambda: DDPMScheduler(num_train_timesteps=T), {}, id="ddpm"),
    pytest.param(lambda: DDIMScheduler(num_train_timesteps=T, thresholding=True, sample_max_value=2.0), {"eta": 0.6},
                 id="ddim-eta0.6-thresholding"),
    pytest.param(lambda: EulerAncestralDiscreteScheduler(num_train_timesteps=T), {}, id="euler_ancestral"),
    pytest.param(lambda: DPMSolverMultistepScheduler(num_train_timesteps=T, algorithm_type="sde-dpmsolver++",
                                                     thresholding=True, sample_max_value=2.0), {},
                 id="sde-dpmsolver++2m-thresholding"),
    pytest.param(lambda: FlowMatchEulerDiscreteScheduler(), {}, id="flow_match"),
]


@pytest.mark.parametrize("make_scheduler,kwargs", GUIDED_SCHEDULERS)
def test_guided_loop_is_the_loop_on_the_guided_model(make_scheduler, kwargs):
    """Guidance fused into the step (every backend) equals the plain loop on a model that returns
    m_u + w (m_c - m_u) itself (float64 reference), with the doubled batch in one model call."""
    scheduler = make_scheduler()
    model, w, labels = Conditional(), 3.0, torch.tensor([0, 3, 1])
    calls = []

    def combined(x, t):
        null = torch.full((x.shape[0],), 4)
        uncond, cond = model(x, t, class_labels=null), model(x, t, class_labels=labels)
        return uncond + w * (cond - uncond)

    def counting(x, t, class_labels=None):
        calls.append(x.shape[0])
        return model(x, t, class_labels=class_labels)

    shape = (3, 2, 3)
    expected = fastgen.sample(combined, shape, scheduler, num_inference_steps=4, seed=2, offset=1, backend="reference",
                              **kwargs)
    for backend in ("triton", "torch", "reference"):
        calls.clear()
        got = fastgen.sample(counting, shape, scheduler, num_inference_steps=4, seed=2, offset=1, class_labels=labels,
                             guidance_scale=w, null_class_label=4, backend=backend, **kwargs)
        assert calls == [6] * 4  # one call per step on [x; x]
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_class_labels_without_guidance_condition_the_model_in_one_pass():
    model = Conditional()
    scheduler = DDIMScheduler(num_train_timesteps=T)
    got = fastgen.sample(model, (2, 2, 3), scheduler, num_inference_steps=3, seed=1, class_labels=2, backend="torch")
    expected = fastgen.sample(lambda x, t: model(x, t, class_labels=torch.full((2,), 2)), (2, 2, 3), scheduler,
                              num_inference_steps=3, seed=1, backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # w = 1 is the conditional model itself
    same = fastgen.sample(model, (2, 2, 3), scheduler, num_inference_steps=3, seed=1, class_labels=2,
                          guidance_scale=1.0, backend="torch")
    torch.testing.assert_close(same, expected, rtol=0, atol=0)


def test_guided_sample_k_is_the_same_alone_and_in_a_batch():
    model = Conditional()
    scheduler = DDPMScheduler(num_train_timesteps=T)
    labels = torch.tensor([0, 1, 2, 3])
    whole = fastgen.sample(model, (4, 2, 3), scheduler, num_inference_steps=3, seed=4, class_labels=labels,
                           guidance_scale=2.5, backend="triton")
    alone = fastgen.sample(model, (1, 2, 3), scheduler, num_inference_steps=3, seed=4, offset=2, class_labels=2,
                           guidance_scale=2.5, backend="triton")
    torch.testing.assert_close(alone[0], whole[2], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(guidance_scale=2.0), ValueError, "guidance_scale needs class_labels"),
    (dict(class_labels=9), ValueError, r"class_labels must be in \[0, 4\)"),
    (dict(class_labels=torch.tensor([1, 2, 3])), ValueError, r"class_labels must be one int or one per sample \(batch=2\)"),
    (dict(class_labels=torch.tensor([1.0, 2.0])), TypeError, "class_labels must be an int or an integer tensor"),
    (dict(class_labels=1, guidance_scale=float("inf")), ValueError, "guidance_scale must be finite"),
])
def test_guidance_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastgen.sample(Conditional(), (2, 2, 3), DDPMScheduler(num_train_timesteps=T), num_inference_steps=2, **kwargs)


def test_guidance_needs_a_null_label():
    with pytest.raises(ValueError, match="guidance_scale needs null_class_label"):
        fastgen.sample(lambda x, t, class_labels=None: x, (2, 3), DDPMScheduler(num_train_timesteps=T), class_labels=1,
                       guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"model output must have shape \(4, 3\)"):  # a model ignoring the doubling
        fastgen.sample(lambda x, t, class_labels=None: x[:2], (2, 3), DDPMScheduler(num_train_timesteps=T),
                       class_labels=1, guidance_scale=2.0, null_class_label=0, backend="torch")


@pytest.mark.parametrize("make_scheduler,kwargs", [SCHEDULERS[2], SCHEDULERS[3], *SIGMA_SCHEDULERS[2:6]])
@pytest.mark.parametrize("guided", [False, True])
def test_the_captured_body_on_a_device_counter_is_the_eager_loop(make_scheduler, kwargs, guided):
    """What a CUDA graph replays, run here without a GPU: the step reading its timesteps, coefficients
    and input scale at a device step counter (and a multistep solver's previous output from its static
    buffer) gives the eager loop's samples."""
    from fastgen.sampling import Sampler

    model = Conditional()
    guidance = dict(class_labels=torch.tensor([1, 3]), guidance_scale=2.0) if guided else {}
    args = dict(num_inference_steps=4, seed=6, offset=3, backend="triton", **guidance, **kwargs)
    sampler = Sampler(model, (2, 2, 3), make_scheduler(), **args)
    expected = sampler()
    x = sampler._initial_noise()
    counter = torch.zeros(1, dtype=torch.int64)
    with torch.no_grad():
        for _ in range(sampler.num_inference_steps):
            x = sampler.strategy.step_at(counter, sampler.predict(x, counter), x, None)
            counter.add_(1)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
