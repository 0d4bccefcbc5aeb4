"""fastgen.schedulers against diffusers: config, timesteps, single steps over a sweep of configurations,
whole sampling loops with the same generator, add_noise / get_velocity; the seed= path against the
torch reference and for batch invariance; bad input.

The fused steps run with backend="triton" (the Triton interpreter on CPU). diffusers computes its
schedule in float32 (a float32 cumprod, and beta_{t|s} = 1 - abar_t / abar_s, which cancels at small
t: up to ~1e-3 relative in sigma at t = 1), fastgen in float64. So every step is compared twice:
against diffusers given float64 tables (its own betas, cumprod in float64; everything else, the
elementwise math in the sample's dtype and the noise draws, is diffusers' code) to fp32 rounding
(EXACT), and against stock diffusers to its fp32 schedule error (STOCK)."""
import pickle

import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from tests.utils import FLOAT_DTYPES, TOLERANCES, assert_close, noncontiguous, rand_like_shape

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr  # noqa: E402

EXACT = dict(rtol=1e-5, atol=2e-6)    # vs diffusers with float64 tables: fp32 rounding
STOCK = dict(rtol=1e-3, atol=1e-3)    # vs stock diffusers: its fp32 schedule's error
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
    float64_tables(theirs)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    g = gen(seed)
    sample, out = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(2))
    return ours, theirs, (dict(eta=1.0) if kind == "ddim" else {}), sample, out


def float64_tables(theirs):
    """diffusers' scheduler with its schedule recomputed in float64 from its own betas (the only change;
    zero terminal SNR rescaled again in float64 by diffusers' own function)."""
    if theirs.config.rescale_betas_zero_snr:
        plain = type(theirs).from_config(theirs.config, rescale_betas_zero_snr=False)
        theirs.betas = rescale_zero_terminal_snr(plain.betas.double())
    theirs.betas = theirs.betas.double()
    theirs.alphas = 1.0 - theirs.betas
    theirs.alphas_cumprod = torch.cumprod(theirs.alphas, 0)
    theirs.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(theirs, "final_alpha_cumprod"):
        theirs.final_alpha_cumprod = theirs.one if theirs.config.set_alpha_to_one else theirs.alphas_cumprod[0]
    return theirs


def triple(kind, backend="triton", **config):
    """(fastgen, diffusers with float64 tables, stock diffusers)."""
    ours, stock = pair(kind, backend, **config)
    return ours, float64_tables(PAIRS[kind][1](**config)), stock


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


def assert_outputs(ours, exact, stock=None, tol=EXACT):
    """``ours`` equals diffusers' output with float64 tables to fp32 rounding and stock diffusers' to STOCK."""
    for theirs, tolerance in ((exact, tol), (stock, STOCK)):
        if theirs is not None:
            assert type(ours).__name__ == type(theirs).__name__
            assert_parity(ours.prev_sample, theirs.prev_sample, tolerance)
            assert_parity(ours.pred_original_sample, theirs.pred_original_sample, tolerance)


# --- config and timesteps ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_config_attributes_and_defaults_match_diffusers(kind):
    ours, theirs = pair(kind)
    public = {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    assert dict(ours.config) == public
    assert ours.config.num_train_timesteps == 1000 and ours.config["beta_schedule"] == "linear"
    assert (ours.order, ours.init_noise_sigma, len(ours)) == (theirs.order, theirs.init_noise_sigma, len(theirs))
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == torch.float32
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-4, atol=1e-7)
    sample = torch.randn(2, 3)
    assert ours.scale_model_input(sample, 5) is sample


def test_config_is_frozen_and_round_trips(tmp_path):
    d = diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1,
                                timestep_spacing="trailing", set_alpha_to_one=False)
    ours = fs.DDIMScheduler.from_config(d.config)                       # diffusers' config, _keys ignored
    assert dict(ours.config) == {k: v for k, v in d.config.items() if not k.startswith("_")}
    assert fs.DDPMScheduler.from_config(ours.config).config.prediction_type == "v_prediction"  # across classes
    assert fs.DDIMScheduler.from_config(ours, clip_sample=False).config.clip_sample is False
    with pytest.raises(TypeError, match="immutable"):
        ours.config["steps_offset"] = 0
    with pytest.raises(TypeError, match="immutable"):
        ours.config.steps_offset = 0
    assert pickle.loads(pickle.dumps(ours.config)) == ours.config
    ours.save_config(tmp_path / "ours")                                 # diffusers reads fastgen's folder
    back = diffusers.DDIMScheduler.from_pretrained(tmp_path / "ours")
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == dict(ours.config)
    d.save_config(tmp_path / "theirs")                                  # and fastgen reads diffusers'
    assert fs.DDIMScheduler.from_pretrained(tmp_path / "theirs").config == ours.config
    betas = torch.linspace(1e-4, 0.03, 50).tolist()
    trained = fs.DDPMScheduler(num_train_timesteps=50, trained_betas=betas)
    trained.save_config(tmp_path / "trained")
    assert fs.DDPMScheduler.from_pretrained(tmp_path / "trained").config.trained_betas == pytest.approx(betas)


SPACINGS = [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)]


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing, steps_offset", SPACINGS)
def test_set_timesteps_matches_diffusers(kind, spacing, steps_offset):
    for num_train, steps in [(1000, 10), (1000, 7), (1000, 1000), (1000, 1), (50, 49), (999, 30)]:
        if spacing == "leading" and steps_offset and steps == num_train:
            continue  # diffusers would produce timestep T, which fastgen refuses (tested below)
        ours, theirs = pair(kind, num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=steps_offset)
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        if len(theirs.timesteps) > steps:  # diffusers' float arange appends a timestep -1 (e.g. T=999, N=30)
            assert spacing == "trailing" and theirs.timesteps[steps:].tolist() == [-1]
        assert torch.equal(ours.timesteps, theirs.timesteps[:steps]), (num_train, steps)
        assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == steps


def test_custom_timesteps_match_diffusers():
    ours, theirs = pair("ddpm")
    custom = [999, 800, 500, 120, 3, 0]
    ours.set_timesteps(timesteps=custom)
    theirs.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.custom_timesteps
    for t in custom:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_inference_steps=10, timesteps=[5, 3]), ValueError, "Can only pass one"),
    (dict(timesteps=[5, 7, 3]), ValueError, "descending order"),
    (dict(timesteps=[1000, 3]), ValueError, "must start before"),
    (dict(timesteps=[5, 3, -1]), ValueError, "timesteps must be >= 0"),
    (dict(timesteps=[]), ValueError, "at least one"),
    (dict(timesteps=[5.5, 3]), TypeError, r"timesteps\[0\] must be an integer"),
    (dict(num_inference_steps=1001), ValueError, "cannot be larger"),
    (dict(num_inference_steps=0), ValueError, r"must be in \[1, 1000\]"),
    (dict(), ValueError, "num_inference_steps must be given"),
    (dict(num_inference_steps=2.0), TypeError, "num_inference_steps must be an integer"),
])
def test_set_timesteps_errors(kind, kwargs, error, match):
    ours, _ = pair(kind)
    with pytest.raises(error, match=match):
        ours.set_timesteps(**kwargs)


def test_steps_offset_past_the_schedule_is_refused():
    ours = fs.DDPMScheduler(steps_offset=1)
    with pytest.raises(ValueError, match="steps_offset=1 with num_inference_steps=1000 puts timestep 1000"):
        ours.set_timesteps(1000)


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
    theirs = float64_tables(diffusers.DDPMScheduler(variance_type="fixed_large"))
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
    ours, exact, stock = triple("ddim", **config)
    for s in (ours, exact, stock):
        s.set_timesteps(20)
    g = gen(7)
    for i, t in enumerate(ours.timesteps[[0, 7, -2, -1]]):
        sample, out = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(2))
        timestep = t if i % 2 else int(t)
        kwargs = dict(eta=eta, use_clipped_model_output=use_clipped)
        got = ours.step(out, timestep, noncontiguous(sample) if i % 2 else sample, generator=gen(i), **kwargs)
        assert_outputs(got, exact.step(out, t, sample, generator=gen(i), **kwargs),
                       stock.step(out, t, sample, generator=gen(i), **kwargs), tol=EXACT)


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
    assert_parity(x_ours, x_stock, STOCK)
    after = [torch.rand(4, generator=g) for g in (g_ours, g_theirs, g_stock)]
    assert torch.equal(after[0], after[1]) and torch.equal(after[1], after[2])


def test_auto_backend_and_per_step_override(device):
    """backend="auto" runs the float64 torch reference on CPU tensors; the kernel (on ``device``) agrees with
    it and with diffusers; step(backend=) overrides the constructor's choice."""
    auto, theirs = pair("ddpm", backend="auto")
    float64_tables(theirs)
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
    ref = PAIRS[kind][0](backend="torch")
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


def test_ddim_linspace_quirk_is_matched_and_custom_timesteps_step_along_the_list(device):
    """diffusers' DDIM steps t -> t - T // N whatever the spacing (999 -> 899 under linspace, N = 10,
    though the next timestep is 888); fastgen matches it by default, and custom timesteps (a fastgen
    extension) step to the next timestep in the list."""
    ours, theirs = pair("ddim", timestep_spacing="linspace")
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert ours.timesteps[:2].tolist() == [999, 888] and ours.previous_timestep(999) == 899
    assert ours.previous_timestep(0) == -1
    custom = fs.DDIMScheduler(timestep_spacing="linspace", backend="triton")
    custom.set_timesteps(timesteps=ours.timesteps.tolist())
    assert custom.previous_timestep(999) == 888 and custom.previous_timestep(0) == -1
    g = gen(13)
    sample, out = (rand_like_shape(SHAPE, device=device, generator=g) for _ in range(2))
    got = custom.step(out, 999, sample, eta=0.0)
    want, _ = fastgen.ddim_step(out, 999, 888, sample, custom.schedule, backend="torch")
    assert_close(got.prev_sample, want.double(), dtype=torch.float32, rtol=1e-5)
    quirk = ours.step(out, 999, sample)
    want, _ = fastgen.ddim_step(out, 999, 899, sample, ours.schedule, backend="torch")
    assert_close(quirk.prev_sample, want.double(), dtype=torch.float32, rtol=1e-5)


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
        assert_parity(ours.add_noise(noncontiguous(x0), noise, timesteps), want, STOCK)
        assert_parity(ours.get_velocity(x0, noncontiguous(noise), timesteps), theirs.get_velocity(x0, noise, timesteps),
                      STOCK)
    assert_parity(ours.add_noise(x0, noise, 250), theirs.add_noise(x0, noise, torch.tensor(250)), STOCK)
    exact = float64_tables(PAIRS[kind][1](beta_schedule="squaredcos_cap_v2"))
    t = torch.tensor([999, 3, 500])
    assert_parity(ours.add_noise(x0, noise, t), exact.add_noise(x0.double(), noise.double(), t).float())
    assert_parity(ours.get_velocity(x0, noise, t), exact.get_velocity(x0.double(), noise.double(), t).float())


# --- fastgen's seed= noise -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_seed_kernel_equals_reference_and_is_batch_invariant(device, kind):
    ours = PAIRS[kind][0](backend="triton")
    ref = PAIRS[kind][0](backend="torch")
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
    per_sample = out[0].numel()
    shard = ours.step(out[1:], 800, sample[1:], seed=77, offset=per_sample, **kwargs)
    assert torch.equal(shard.prev_sample, got.prev_sample[1:])          # sample k is the same in any batch
    other = ours.step(out, 800, sample, seed=78, **kwargs)
    assert not torch.allclose(other.prev_sample, got.prev_sample)
    # the noise is the documented counter stream: stream t, element offset + flat index
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
    return [
        ("beta_schedule", lambda: fs.DDPMScheduler(beta_schedule="cosine"), ValueError,
         "beta_schedule must be one of 'linear'.*got 'cosine'"),
        ("prediction_type", lambda: fs.DDIMScheduler(prediction_type="eps"), ValueError,
         "prediction_type must be one of 'epsilon', 'sample', 'v_prediction', got 'eps'"),
        ("variance_type", lambda: fs.DDPMScheduler(variance_type="small"), ValueError,
         "variance_type must be one of 'fixed_small'.*got 'small'"),
        ("timestep_spacing", lambda: fs.DDIMScheduler(timestep_spacing="uniform"), ValueError,
         "timestep_spacing must be one of 'linspace', 'leading', 'trailing', got 'uniform'"),
        ("steps_offset", lambda: fs.DDPMScheduler(steps_offset=-1), ValueError, "steps_offset"),
        ("clip flag", lambda: fs.DDPMScheduler(clip_sample="yes"), TypeError, "clip_sample must be a bool"),
        ("set_alpha_to_one", lambda: fs.DDIMScheduler(set_alpha_to_one=1), TypeError, "set_alpha_to_one"),
        ("ratio", lambda: fs.DDPMScheduler(dynamic_thresholding_ratio=2.0), ValueError, "dynamic_thresholding_ratio"),
        ("trained_betas", lambda: fs.DDPMScheduler(trained_betas=[0.1, 0.2]), ValueError,
         "trained_betas must be a 1-d sequence of num_train_timesteps=1000"),
        ("backend", lambda: fs.DDPMScheduler(backend="cuda"), ValueError, "backend must be one of"),
        ("from_config key", lambda: fs.DDPMScheduler.from_config({}, eta=1.0), TypeError, "unknown arguments"),
        ("from_pretrained", lambda: fs.DDPMScheduler.from_pretrained("/nonexistent"), ValueError, "local folder"),
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
        ("not scheduled tensor", lambda: ddpm_set.step(x, torch.tensor([900, 501]), x), ValueError, "got 501"),
        ("ddim before set_timesteps", lambda: ddim.step(x, 5, x), ValueError, "you need to run 'set_timesteps'"),
        ("generator list", lambda: ddpm.step(x, 5, x, generator=[gen(0)] * 3), ValueError,
         r"one per sample \(batch=2\), got a list of 3"),
        ("generator type", lambda: ddpm.step(x, 5, x, generator=0), TypeError, "generator must be a torch.Generator"),
        ("seed and generator", lambda: ddpm.step(x, 5, x, generator=gen(0), seed=1), ValueError,
         "either generator .* or seed"),
        ("offset without seed", lambda: ddpm.step(x, 5, x, offset=3), ValueError, "offset only applies"),
        ("noise and generator", lambda: ddim_set.step(x, 901, x, eta=0.5, generator=gen(0), variance_noise=x),
         ValueError, "Cannot pass both generator and variance_noise"),
        ("noise shape", lambda: ddim_set.step(x, 901, x, eta=0.5, variance_noise=x[:1]), ValueError,
         "variance_noise must have the sample's shape"),
        ("eta", lambda: ddim_set.step(x, 901, x, eta=1.5), ValueError, "eta"),
        ("eta type", lambda: ddim_set.step(x, 901, x, eta="1"), TypeError, "eta must be a number"),
        ("add_noise timesteps", lambda: ddpm.add_noise(x, x, torch.tensor([1, 2, 3])), ValueError,
         r"one per sample \(batch=2\)"),
        ("add_noise range", lambda: ddpm.add_noise(x, x, torch.tensor([1, 1000])), ValueError,
         r"timesteps must be in \[0, 1000\)"),
        ("velocity shape", lambda: ddpm.get_velocity(x, x[:1], torch.tensor([1, 2])), ValueError, "noise must have"),
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
