"""fastgen.schedulers against diffusers: single steps over a sweep of configurations, whole sampling
loops with the same generator, add_noise / get_velocity; the seed= path against the torch reference
and for batch invariance; bad input. (diffusers' own asserted values, save/load and pipelines:
tests/test_diffusers_parity.py.)

The fused steps run with backend="triton" (the Triton interpreter on CPU). fastgen's schedulers read
diffusers' own float32 tables, so every step equals stock diffusers' to fp32 rounding (EXACT)."""
import diffusers  # a dependency of fastgen.schedulers: never skipped
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from tests.utils import FLOAT_DTYPES, TOLERANCES, assert_close, noncontiguous, rand_like_shape

EXACT = dict(rtol=2e-5, atol=4e-6)    # vs diffusers: fp32 rounding
STOCK = dict(rtol=1e-3, atol=1e-3)    # vs diffusers where its float32 coefficient cancels (DDIM, eta = 1)
SHAPE = (3, 2, 5, 7)                  # [B, C, H, W], 70 elements per sample
PAIRS = {"ddpm": (fs.DDPMScheduler, diffusers.DDPMScheduler), "ddim": (fs.DDIMScheduler, diffusers.DDIMScheduler)}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def pair(kind, backend="triton", **config):
    ours, theirs = PAIRS[kind]
    return ours(**config, backend=backend), theirs(**config)


def noisy_step_setup(kind, steps, device, *, seed):
    """(ours, theirs, step kwargs that make the step draw noise, sample, model output): a pair with
    float64 tables for diffusers and ``steps`` timesteps set on both, random inputs from ``seed``."""
    ours, theirs = pair(kind)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    g = gen(seed)
    sample, out = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(2))
    return ours, theirs, (dict(eta=1.0) if kind == "ddim" else {}), sample, out


def float64_math(theirs):
    """diffusers' scheduler with its own float32 tables taken to float64 as they are: its step is then
    its formula in (nearly) exact arithmetic on the tables fastgen reads."""
    theirs.alphas_cumprod = theirs.alphas_cumprod.double()
    for name in ("one", "final_alpha_cumprod"):
        if hasattr(theirs, name):
            setattr(theirs, name, getattr(theirs, name).double())
    return theirs


def triple(kind, backend="triton", **config):
    """(fastgen, diffusers, diffusers): the second steps beside fastgen, the third on its own."""
    ours, stock = pair(kind, backend, **config)
    return ours, stock, PAIRS[kind][1](**config)


def model_output_for(variance_type, shape, g, device):
    out = rand_like_shape(shape, device=device, generator=g)
    if variance_type == "learned":
        return torch.cat([out, (torch.rand(shape, generator=g) * 1e-2 + 1e-4).to(device)], 1)
    if variance_type == "learned_range":
        return torch.cat([out, (torch.rand(shape, generator=g) * 2 - 1).to(device)], 1)
    return out


def assert_parity(ours, theirs, tol=EXACT):
    assert ours.dtype == theirs.dtype
    assert_close(ours, theirs, dtype=torch.float32, **tol)


def assert_outputs(ours, *theirs, tol=EXACT):
    """``ours`` equals each of diffusers' outputs to fp32 rounding, field by field, and has its type."""
    for want in theirs:
        assert type(ours) is type(want)
        assert_parity(ours.prev_sample, want.prev_sample, tol)
        assert_parity(ours.pred_original_sample, want.pred_original_sample, tol)


# --- single steps over a sweep of configurations -------------------------------------------------------

CLIPS = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
         "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)}
DDPM_SWEEP = [  # (prediction_type, variance_type, clip, beta_schedule, rescale_betas_zero_snr)
    ("epsilon", "fixed_small", "clip", "linear", False),
    ("epsilon", "fixed_small_log", "none", "scaled_linear", False),
    ("epsilon", "fixed_large", "threshold", "squaredcos_cap_v2", False),
    ("epsilon", "learned", "clip", "linear", False),
    ("epsilon", "learned_range", "none", "sigmoid", False),
    ("sample", "fixed_small", "threshold", "linear", False),
    ("sample", "fixed_large", "none", "laplace", False),
    ("sample", "learned_range", "clip", "squaredcos_cap_v2", False),
    ("v_prediction", "fixed_small", "none", "linear", True),
    ("v_prediction", "fixed_small_log", "clip", "scaled_linear", True),
    ("v_prediction", "learned", "threshold", "linear", False),
    ("v_prediction", "fixed_large", "clip", "squaredcos_cap_v2", False),
]


@pytest.mark.parametrize("prediction_type, variance_type, clip, beta_schedule, zero_snr", DDPM_SWEEP)
def test_ddpm_step_matches_diffusers(device, prediction_type, variance_type, clip, beta_schedule, zero_snr):
    config = dict(prediction_type=prediction_type, variance_type=variance_type, beta_schedule=beta_schedule,
                  rescale_betas_zero_snr=zero_snr, **CLIPS[clip])
    ours, exact, stock = triple("ddpm", **config)
    g = gen(len(prediction_type) * 100 + len(variance_type) * 10 + len(clip))
    for i, t in enumerate([998 if zero_snr else 999, 421, 1, 0]):  # zero SNR: abar_999 = 0, eps undefined
        sample = rand_like_shape(SHAPE, device=device, generator=g)
        out = model_output_for(variance_type, SHAPE, g, device)
        timestep = torch.tensor(t) if i % 2 else t                     # int and 0-d tensor timesteps
        s_ours = noncontiguous(sample) if i % 2 else sample            # contiguous and not
        got = ours.step(out, timestep, s_ours, generator=gen(t))
        assert_outputs(got, exact.step(out, t, sample, generator=gen(t)), stock.step(out, t, sample, generator=gen(t)))


def test_ddpm_fixed_large_log_is_fixed_large(device):
    """diffusers' fixed_large_log takes sqrt(log beta) (NaN for t > 0); fastgen uses the variance the name
    means, beta_t, as fixed_large does (documented in fastgen/schedulers/ddpm.py)."""
    ours = fs.DDPMScheduler(variance_type="fixed_large_log", backend="triton")
    theirs = diffusers.DDPMScheduler(variance_type="fixed_large")
    g = gen(3)
    sample, out = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(2))
    got = ours.step(out, 500, sample, generator=gen(1))
    assert torch.isfinite(got.prev_sample).all()
    assert_outputs(got, theirs.step(out, 500, sample, generator=gen(1)))


DDIM_SWEEP = [  # (prediction_type, clip, eta, use_clipped_model_output, set_alpha_to_one, spacing, offset, schedule)
    ("epsilon", "clip", 0.0, False, True, "leading", 1, "linear"),
    ("epsilon", "clip", 1.0, True, True, "linspace", 0, "scaled_linear"),
    ("epsilon", "threshold", 0.5, True, False, "trailing", 0, "squaredcos_cap_v2"),
    ("epsilon", "none", 0.3, False, False, "leading", 0, "linear"),
    ("sample", "clip", 0.0, True, True, "trailing", 0, "linear"),
    ("sample", "none", 1.0, False, False, "linspace", 0, "squaredcos_cap_v2"),
    ("v_prediction", "none", 0.0, False, True, "trailing", 0, "zero_snr"),
    ("v_prediction", "clip", 0.7, True, True, "leading", 1, "scaled_linear"),
    ("v_prediction", "threshold", 0.6, False, False, "linspace", 0, "zero_snr"),  # eta = 1 here: see ddim.py
]


@pytest.mark.parametrize("prediction_type, clip, eta, use_clipped, set_alpha_to_one, spacing, offset, schedule",
                         DDIM_SWEEP)
def test_ddim_step_matches_diffusers(device, prediction_type, clip, eta, use_clipped, set_alpha_to_one, spacing, offset,
                                     schedule):
    zero_snr = schedule == "zero_snr"
    config = dict(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing,
                  steps_offset=offset, beta_schedule="linear" if zero_snr else schedule,
                  rescale_betas_zero_snr=zero_snr, **CLIPS[clip])
    ours, stock, exact = triple("ddim", **config)
    float64_math(exact)  # DDIM's sqrt(1 - abar_s - sigma^2) cancels in diffusers' float32 (eta = 1)
    for s in (ours, exact, stock):
        s.set_timesteps(20)
    g = gen(7)
    for i, t in enumerate(ours.timesteps[[0, 7, -2, -1]]):
        sample, out = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(2))
        timestep = t if i % 2 else int(t)
        kwargs = dict(eta=eta, use_clipped_model_output=use_clipped)
        got = ours.step(out, timestep, noncontiguous(sample) if i % 2 else sample, generator=gen(i), **kwargs)
        assert_outputs(got, exact.step(out, t, sample, generator=gen(i), **kwargs))
        assert_outputs(got, stock.step(out, t, sample, generator=gen(i), **kwargs), tol=STOCK)


def test_ddim_variance_noise_matches_diffusers(device):
    ours, theirs, stock = triple("ddim")
    for s in (ours, theirs, stock):
        s.set_timesteps(10)
    g = gen(11)
    sample, out, z = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(3))
    got = ours.step(out, 501, sample, eta=0.8, variance_noise=noncontiguous(z))
    assert_outputs(got, theirs.step(out, 501, sample, eta=0.8, variance_noise=z),
                   stock.step(out, 501, sample, eta=0.8, variance_noise=z))
    plain = ours.step(out, 501, sample, eta=0.0, variance_noise=z)  # eta = 0: the noise is not used
    assert_outputs(plain, theirs.step(out, 501, sample, eta=0.0))


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_generator_list_and_return_dict(device, kind):
    """One generator per sample draws as diffusers does, so sample b is the step of sample b alone with
    generator b; return_dict=False gives the same pair as a tuple."""
    ours, theirs, kwargs, sample, out = noisy_step_setup(kind, 25, device, seed=5)
    t = ours.timesteps[3]
    got = ours.step(out, t, sample, generator=[gen(b) for b in range(3)], **kwargs)
    assert_outputs(got, theirs.step(out, t, sample, generator=[gen(b) for b in range(3)], **kwargs))
    alone = ours.step(out[1:2], t, sample[1:2], generator=[gen(1)], return_dict=False, **kwargs)
    assert isinstance(alone, tuple) and len(alone) == 2
    assert_close(alone[0], got.prev_sample[1:2], dtype=torch.float32)
    assert torch.equal(got[0], got["prev_sample"]) and got.to_tuple()[1] is got.pred_original_sample


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_no_generator_follows_torch_manual_seed_like_diffusers(device, kind):
    ours, theirs, kwargs, sample, out = noisy_step_setup(kind, 10, device, seed=8)
    torch.manual_seed(1234)
    got = ours.step(out, 700, sample, **kwargs)
    after_ours = torch.rand(3)
    torch.manual_seed(1234)
    want = theirs.step(out, 700, sample, **kwargs)
    assert_outputs(got, want)
    assert torch.equal(after_ours, torch.rand(3))  # the same number of draws from the global generator


# --- whole loops -------------------------------------------------------------------------------------

LOOPS = [
    ("ddpm", dict(), dict(num_inference_steps=15)),
    ("ddpm", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
                  rescale_betas_zero_snr=True, clip_sample=False), dict(num_inference_steps=12)),
    ("ddpm", dict(beta_schedule="scaled_linear", variance_type="fixed_large", steps_offset=1, thresholding=True),
     dict(num_inference_steps=12)),
    ("ddpm", dict(variance_type="learned_range", prediction_type="sample"),
     dict(timesteps=[999, 900, 700, 640, 300, 120, 50, 9, 1, 0])),
    ("ddim", dict(timestep_spacing="linspace"), dict(num_inference_steps=15, eta=0.0)),
    ("ddim", dict(timestep_spacing="linspace", beta_schedule="scaled_linear"), dict(num_inference_steps=15, eta=1.0)),
    ("ddim", dict(prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1, clip_sample=False),
     dict(num_inference_steps=20, eta=0.5, use_clipped_model_output=True)),
]


@pytest.mark.parametrize("kind, config, loop", LOOPS, ids=[f"{k}{i}" for i, (k, _, _) in enumerate(LOOPS)])
def test_whole_loop_follows_diffusers_trajectory(device, kind, config, loop):
    """A fixed random linear "model", the same generator: fastgen's trajectory is diffusers' (each step
    compared, so drift cannot hide), and both generators end in the same state."""
    loop = dict(loop)
    set_kwargs = {k: loop.pop(k) for k in ("num_inference_steps", "timesteps") if k in loop}
    ours, theirs, stock = triple(kind, **config)
    for s in (ours, theirs, stock):
        s.set_timesteps(**set_kwargs, device=device)  # on a GPU the loop steps with 0-d device tensors
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.device.type == torch.device(device).type
    g = gen(21)
    channels = 4 if config.get("variance_type", "").startswith("learned") else 2
    weight = (torch.randn(channels, 2, generator=g) * 0.5).to(device)
    weight[2:] = weight[2:].clamp(-0.9, 0.9)

    def model(x, t):
        out = torch.einsum("oc,bc...->bo...", weight, x) + 1e-3 * t
        return torch.cat([out[:, :2], out[:, 2:].tanh()], 1) if channels == 4 else out

    x = torch.randn(SHAPE, generator=g).to(device) * ours.init_noise_sigma
    x_ours, x_theirs, x_stock = x.clone(), x.clone(), x.clone()
    g_ours, g_theirs, g_stock = gen(99), gen(99), gen(99)
    for t in ours.timesteps:
        got = ours.step(model(ours.scale_model_input(x_ours, t), t), t, x_ours, generator=g_ours, **loop)
        want = theirs.step(model(x_theirs, t), t, x_theirs, generator=g_theirs, **loop)
        assert_outputs(got, want, tol=dict(rtol=2e-5, atol=5e-6))
        x_ours, x_theirs = got.prev_sample, want.prev_sample
        x_stock = stock.step(model(x_stock, t), t, x_stock, generator=g_stock, **loop).prev_sample
    assert_parity(x_ours, x_stock, dict(rtol=1e-4, atol=1e-4))
    after = [torch.rand(4, generator=g) for g in (g_ours, g_theirs, g_stock)]
    assert torch.equal(after[0], after[1]) and torch.equal(after[1], after[2])


def test_auto_backend_and_per_step_override(device):
    """backend="auto" runs the fp32 torch step on CPU tensors; the kernel (on ``device``) agrees with
    it and with diffusers; step(backend=) overrides the constructor's choice."""
    auto, theirs = pair("ddpm", backend="auto")
    fused = fs.DDPMScheduler(backend="triton")
    g = gen(4)
    sample, out = rand_like_shape(SHAPE, generator=g), rand_like_shape(SHAPE, generator=g)
    a = auto.step(out, 321, sample, generator=gen(0))
    assert_outputs(a, theirs.step(out, 321, sample, generator=gen(0)))
    b = fused.step(out.to(device), 321, sample.to(device), generator=gen(0))
    assert_close(b.prev_sample, a.prev_sample.double(), dtype=torch.float32, rtol=1e-5)
    c = auto.step(out.to(device), 321, sample.to(device), generator=gen(0), backend="triton")
    assert torch.equal(c.prev_sample, b.prev_sample)
    r = fused.step(out, 321, sample, generator=gen(0), backend="torch")
    assert torch.equal(r.prev_sample, a.prev_sample)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[1:])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_half_precision_kernel_matches_reference(device, kind, dtype):
    ours = PAIRS[kind][0](backend="triton")
    ref = PAIRS[kind][0](backend="reference")
    for s in (ours, ref):
        s.set_timesteps(10)
    kwargs = dict(eta=1.0) if kind == "ddim" else {}
    g = gen(6)
    sample, out = rand_like_shape(SHAPE, dtype, device, generator=g), rand_like_shape(SHAPE, dtype, device, generator=g)
    got = ours.step(out, 600, sample, generator=gen(2), **kwargs)
    assert got.prev_sample.dtype == dtype
    want = ref.step(out, 600, sample, generator=gen(2), **kwargs)  # same noise, rounded the same way
    # both rounded to ``dtype`` once, from fp32 and float64 math: at most one ulp apart
    assert_close(got.prev_sample, want.prev_sample.double(), dtype=dtype, rtol=2 * TOLERANCES[dtype][0])


def test_ddim_linspace_quirk_is_matched(device):
    """diffusers' DDIM steps t -> t - T // N whatever the spacing (999 -> 899 under linspace, N = 10,
    though the next timestep is 888), and from any t in [0, T), scheduled or not; fastgen matches it."""
    ours, theirs = pair("ddim", timestep_spacing="linspace")
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert ours.timesteps[:2].tolist() == [999, 888]
    g = gen(13)
    sample, out = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(2))
    quirk = ours.step(out, 999, sample)
    want, _ = fastgen.ddim_step(out, 999, 899, sample, ours.schedule, backend="reference")
    assert_close(quirk.prev_sample, want.double(), dtype=torch.float32, rtol=1e-5)
    for t in (999, 421, 5):
        assert_outputs(ours.step(out, t, sample), theirs.step(out, t, sample))


# --- per-sample timesteps, add_noise, get_velocity ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_per_sample_timesteps_equal_separate_steps(device, kind):
    """A [B] timestep tensor (fastgen extension; prev timesteps gathered on the device) steps each sample
    as its own scalar step would."""
    ours = PAIRS[kind][0](backend="triton")
    ours.set_timesteps(50)
    kwargs = dict(eta=0.7) if kind == "ddim" else {}
    g = gen(9)
    sample, out = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(2))
    ts = ours.timesteps[[0, 17, -1]]
    got = ours.step(out, ts.to(device), sample, generator=[gen(b) for b in range(3)], **kwargs)
    for b in range(3):
        alone = ours.step(out[b:b + 1], int(ts[b]), sample[b:b + 1], generator=gen(b), **kwargs)
        assert_close(got.prev_sample[b:b + 1], alone.prev_sample.double(), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_add_noise_and_get_velocity_match_diffusers(device, kind):
    ours, theirs = pair(kind, beta_schedule="squaredcos_cap_v2")
    g = gen(10)
    x0, noise = rand_like_shape(SHAPE, device=device, generator=g), rand_like_shape(SHAPE, device=device, generator=g)
    for timesteps in (torch.tensor([999, 3, 500]), torch.tensor([17], dtype=torch.int32), torch.tensor(0)):
        want = theirs.add_noise(x0, noise, timesteps)
        assert_parity(ours.add_noise(noncontiguous(x0), noise, timesteps), want)
        assert_parity(ours.get_velocity(x0, noncontiguous(noise), timesteps), theirs.get_velocity(x0, noise, timesteps))
    assert_parity(ours.add_noise(x0, noise, 250), theirs.add_noise(x0, noise, torch.tensor(250)))


# --- fastgen's seed= noise -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_seed_kernel_equals_reference_and_is_batch_invariant(device, kind):
    ours = PAIRS[kind][0](backend="triton")
    ref = PAIRS[kind][0](backend="reference")
    for s in (ours, ref):
        s.set_timesteps(10)
    kwargs = dict(eta=1.0) if kind == "ddim" else {}
    g = gen(12)
    sample, out = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(2))
    state = torch.get_rng_state()
    got = ours.step(out, 800, sample, seed=77, **kwargs)
    assert torch.equal(state, torch.get_rng_state())  # seed= never draws from torch's generators
    want = ref.step(out, 800, sample, seed=77, **kwargs)
    assert_close(got.prev_sample, want.prev_sample.double(), dtype=torch.float32, rtol=1e-5)
    for k in (1, 2):  # offset counts samples: sample k is the same in any batch
        shard = ours.step(out[k:], 800, sample[k:], seed=77, offset=k, **kwargs)
        assert torch.equal(shard.prev_sample, got.prev_sample[k:])
        assert torch.equal(shard.pred_original_sample, got.pred_original_sample[k:])
    other = ours.step(out, 800, sample, seed=78, **kwargs)
    assert not torch.allclose(other.prev_sample, got.prev_sample)
    # the noise is the documented counter stream: stream t, counter element (offset + b) n + g
    z = fastgen.randn(SHAPE, seed=77, stream=800, backend="torch").to(device)
    explicit = ours.step(out, 800, sample, variance_noise=z, **kwargs) if kind == "ddim" else None
    if explicit is not None:
        assert_close(explicit.prev_sample, got.prev_sample.double(), dtype=torch.float32, rtol=1e-5)


# --- bad input ---------------------------------------------------------------------------------------------

def _bad_calls():
    x = torch.randn(2, 3, 4)
    ddpm = fs.DDPMScheduler(backend="torch")
    ddim = fs.DDIMScheduler(backend="torch")
    ddim_set = fs.DDIMScheduler(backend="torch")
    ddim_set.set_timesteps(10)
    ddpm_set = fs.DDPMScheduler(backend="torch")
    ddpm_set.set_timesteps(10)
    learned = fs.DDPMScheduler(variance_type="learned", backend="torch")
    bad_variance = fs.DDPMScheduler(variance_type="small", backend="torch")
    return [
        # diffusers' own check, kept: an unknown schedule at construction
        ("beta_schedule", lambda: fs.DDPMScheduler(beta_schedule="cosine"), NotImplementedError, "cosine"),
        # a prediction type diffusers accepts in a config (and refuses at a step) is refused at construction
        ("prediction_type", lambda: fs.DDIMScheduler(prediction_type="eps"), ValueError,
         "prediction_type must be one of 'epsilon', 'sample', 'v_prediction', got 'eps'"),
        # a value diffusers accepts in a config raises when a step needs it
        ("variance_type", lambda: bad_variance.step(x, 5, x), ValueError,
         "variance_type must be one of 'fixed_small'.*got 'small'"),
        ("betas above 1", lambda: fs.DDPMScheduler(beta_start=0.1, beta_end=2.0), ValueError,
         r"betas must be in \[0, 1\].*betas\[\d+\] = 1\.0"),
        ("alphas_cumprod underflow", lambda: fs.DDIMScheduler(beta_start=0.01, beta_end=0.2), ValueError,
         "alphas_cumprod underflows to 0 in float32 at t = 959 < T - 1 = 999"),
        ("backend", lambda: fs.DDPMScheduler(backend="cuda"), ValueError, "backend must be one of"),
        ("step backend", lambda: ddpm.step(x, 5, x, backend="gpu"), ValueError, "backend must be one of"),
        ("shape", lambda: ddpm.step(torch.randn(2, 3, 5), 5, x), ValueError,
         r"model_output must have shape \(2, 3, 4\)"),
        ("learned channels", lambda: learned.step(x, 5, x), ValueError, r"must have shape \(2, 6, 4\)"),
        ("ddim shape", lambda: ddim_set.step(torch.randn(3, 3, 4), 901, x), ValueError, "model_output must have"),
        ("device", lambda: ddpm.step(x.to("meta"), 5, x), ValueError, "model_output must be on sample's device"),
        ("int sample", lambda: ddpm.step(x, 5, x.long()), TypeError, "sample must be a float"),
        ("timestep range", lambda: ddpm.step(x, 1000, x), ValueError, r"timestep must be in \[0, 1000\), got 1000"),
        ("timestep tensor range", lambda: ddpm.step(x, torch.tensor([3, -1]), x), ValueError, "got -1"),
        ("timestep float", lambda: ddpm.step(x, torch.tensor(3.0), x), TypeError, "integer tensor"),
        ("timestep batch", lambda: ddpm.step(x, torch.tensor([3, 4, 5]), x), ValueError, "batch=2"),
        ("not scheduled", lambda: ddpm_set.step(x, 501, x), ValueError, "timestep must be one of the scheduler's"),
        ("ddim before set_timesteps", lambda: ddim.step(x, 5, x), ValueError, "you need to run 'set_timesteps'"),
        ("seed and generator", lambda: ddpm.step(x, 5, x, generator=gen(0), seed=1), ValueError,
         "pass one noise source.*got generator and seed"),
        ("offset without seed", lambda: ddpm.step(x, 5, x, offset=3), ValueError, "offset only applies"),
        ("noise and generator", lambda: ddim_set.step(x, 901, x, eta=0.5, generator=gen(0), variance_noise=x),
         ValueError, "pass one noise source.*got generator and variance_noise"),
        ("noise shape", lambda: ddim_set.step(x, 901, x, eta=0.5, variance_noise=x[:1]), ValueError,
         "variance_noise must have sample's shape"),
        ("eta", lambda: ddim_set.step(x, 901, x, eta=1.5), ValueError, r"eta must be in \[0.0, 1.0\], got 1.5"),
        ("eta type", lambda: ddim_set.step(x, 901, x, eta="1"), TypeError, "eta must be a number"),
        ("add_noise timesteps", lambda: ddpm.add_noise(x, x, torch.tensor([1, 2, 3])), ValueError,
         r"batch=2\], got shape \(3,\)"),
        ("add_noise range", lambda: ddpm.add_noise(x, x, torch.tensor([1, 1000])), ValueError,
         r"in \[0, 1000\), got 1000"),
    ]


@pytest.mark.parametrize("call, error, match", [pytest.param(*c[1:], id=c[0]) for c in _bad_calls()])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_errors_come_before_any_noise_is_drawn():
    """A rejected step leaves the generator untouched (the check runs before randn_tensor)."""
    ddpm = fs.DDPMScheduler(backend="torch")
    g = gen(0)
    with pytest.raises(ValueError):
        ddpm.step(torch.randn(2, 3, 5), 5, torch.randn(2, 3, 4), generator=g)
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=gen(0)))


@pytest.mark.parametrize("bad", [dict(eta=2.0), dict(eta=0.5, use_clipped_model_output="yes"),
                                 dict(eta=0.5, variance_noise=torch.randn(1, 3, 4))])
def test_ddim_rejects_bad_step_arguments_before_drawing_noise(bad):
    """eta and the other step arguments are validated before the generator is touched: a rejected
    step leaves the caller's generator where it was."""
    ddim = fs.DDIMScheduler(backend="torch")
    ddim.set_timesteps(10)
    g = gen(0)
    with pytest.raises((ValueError, TypeError)):
        ddim.step(torch.randn(2, 3, 4), 901, torch.randn(2, 3, 4), generator=g if "variance_noise" not in bad else None,
                  **bad)
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=gen(0)))
