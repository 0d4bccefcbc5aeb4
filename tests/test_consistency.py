"""Consistency sampling: CMStochasticIterativeScheduler (Song et al. 2023, Algorithm 1) and LCMScheduler
(Luo et al. 2023) as rows of the sigma-space samplers' kernel. The kernel against each sampler's
float64 reference (fastgen/reference/consistency.py, the paper's equations, not the affine map),
step by step and over whole stochastic trajectories with counter-based noise; batch invariance;
diffusers' asserted loop values and step-by-step parity with diffusers' classes on the same generator;
fastgen.sample on both; bad input named."""
import diffusers
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from fastgen.ops.samplers import sampler_step
from fastgen.reference import consistency as ref
from fastgen.schedulers._sigma import step_table
from tests.test_diffusers_parity import assert_abs_stats, plain_config, ramp, toy_model
from tests.utils import FLOAT_DTYPES, assert_close, rand_like_shape

CM_CONFIG = dict(num_train_timesteps=201, sigma_min=0.002, sigma_max=80.0)  # diffusers' test configuration
LCM_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}  # rtol, atol


def cm(backend="torch", **changes):
    return fs.CMStochasticIterativeScheduler(**{**CM_CONFIG, **changes}, backend=backend)


def lcm(backend="torch", **changes):
    return fs.LCMScheduler(**{**LCM_CONFIG, **changes}, backend=backend)


# --- diffusers' asserted values --------------------------------------------------------------------

def cm_loop(scheduler, sample, timesteps):
    generator = torch.manual_seed(0)
    for t in timesteps:
        residual = toy_model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(residual, t, sample, generator=generator).prev_sample
    return sample


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cm_diffusers_loops(backend):
    """diffusers' test_scheduler_consistency_model.py: one step, custom timesteps [106, 0], and 2 steps
    from a noised sample (t_start 8 of 10)."""
    s = cm(backend)
    s.set_timesteps(1)
    assert_abs_stats(cm_loop(s, ramp() * s.init_noise_sigma, s.timesteps), 192.7614, 0.2510)
    s = cm(backend)
    s.set_timesteps(timesteps=[106, 0])
    assert s.num_inference_steps is None  # diffusers leaves it unset for custom timesteps: the run is the timesteps
    assert_abs_stats(cm_loop(s, ramp() * s.init_noise_sigma, s.timesteps), 347.6357, 0.4527)
    s = cm(backend)
    s.set_timesteps(10)
    timesteps = s.timesteps[8:]
    noised = s.add_noise(ramp() * s.init_noise_sigma, ramp(reverse=True), timesteps[:1])
    assert_abs_stats(cm_loop(s, noised, timesteps), 763.9186, 0.9947)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("steps, total, mean", [(1, 18.7097, 0.0244), (10, 197.7616, 0.2575)])
def test_lcm_diffusers_loops(backend, steps, total, mean):
    """diffusers' test_scheduler_lcm.py: full loops of 1 and 10 steps (noise from torch.manual_seed(0))."""
    s = lcm(backend)
    s.set_timesteps(steps)
    sample, generator = ramp(), torch.manual_seed(0)
    for t in s.timesteps:
        sample = s.step(toy_model(sample, t), t, sample, generator).prev_sample
    assert abs(sample.abs().sum().item() - total) < 1e-3 and abs(sample.abs().mean().item() - mean) < 1e-3


def test_cm_steps_before_set_timesteps_like_diffusers():
    """diffusers' step runs on the constructor's Karras sigmas (its common tests step at sigma_max)."""
    ours, theirs = cm(), diffusers.CMStochasticIterativeScheduler(**CM_CONFIG)
    t = ours.sigma_to_t(ours.config.sigma_max)
    x, f = ramp(), 0.1 * ramp()
    for s in (ours, theirs):
        s.scale_model_input(x, t)
    got = ours.step(f, t, x, generator=torch.manual_seed(0)).prev_sample
    want = theirs.step(f, t, x, generator=torch.manual_seed(0)).prev_sample
    assert_close(got, want, dtype=torch.float32, rtol=1e-5, atol=1e-5)


# --- the kernel against the float64 reference ----------------------------------------------------

CASES = {
    "cm": (cm, {}),
    "cm-noclip": (cm, dict(clip_denoised=False, s_noise=1.003)),
    "lcm-epsilon": (lcm, {}),
    "lcm-v-clip": (lcm, dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=0.8)),
    "lcm-sample-threshold": (lcm, dict(prediction_type="sample", thresholding=True, sample_max_value=1.5,
                                       dynamic_thresholding_ratio=0.9)),
}


def made(case, backend="torch", steps=4):
    make, changes = CASES[case]
    s = make(backend, **changes)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kernel_step_matches_reference(case, dtype, device):
    """Every step of a 4-step run: the fused kernel (counter noise, seed and offset) against the
    sampler's own float64 equations on the same noise; the denoised output too."""
    table = step_table(made(case))
    g = torch.Generator().manual_seed(7)
    x = rand_like_shape((3, 2, 5, 5), dtype, device, generator=g, scale=3.0)
    f = rand_like_shape((3, 2, 5, 5), dtype, device, generator=g)
    rtol, atol = TOL[dtype]
    for i in range(table.num_steps):
        got, got_d = sampler_step(table, i, f, x, seed=5, offset=3, backend="triton")
        want, want_d = sampler_step(table, i, f, x, seed=5, offset=3, backend="reference")
        assert want.dtype == dtype and torch.isfinite(want).all()
        assert_close(got, want, dtype=dtype, rtol=rtol, atol=atol * max(1.0, table.row(i)["noise"]))
        assert_close(got_d, want_d, dtype=dtype, rtol=rtol, atol=atol)


def test_reference_is_the_papers_step():
    """The reference's own equations against hand-written values: f(x, eps) = x (the boundary
    condition), the re-noising scale, and LCM's x0 / boundary / re-noise for one element."""
    x, f = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.7], dtype=torch.float64)
    assert torch.equal(ref.consistency_function(f, x, 0.002, 0.002), x)
    out, d = ref.consistency_step(f, x, 2.0, 0.5, sigma_min=0.002, sigma_max=80.0, clip_denoised=False,
                                  noise=torch.ones(1, dtype=torch.float64))
    c_skip, c_out = 0.25 / (1.998**2 + 0.25), 1.998 * 0.5 / (4.0 + 0.25) ** 0.5
    assert torch.allclose(d, c_skip * x + c_out * f) and torch.allclose(out, d + (0.25 - 0.002**2) ** 0.5)
    a_t, a_s = 0.3, 0.6
    out, d = ref.lcm_step(f, x, 10, alpha_prod_t=a_t, alpha_prod_prev=a_s, last=False,
                          noise=torch.ones(1, dtype=torch.float64))
    x0 = (x - (1 - a_t) ** 0.5 * f) / a_t**0.5
    c_skip, c_out = 0.25 / (100**2 + 0.25), 100 / (100**2 + 0.25) ** 0.5
    assert torch.allclose(d, c_skip * x + c_out * x0) and torch.allclose(out, a_s**0.5 * d + (1 - a_s) ** 0.5)


def reference_model(x, t):
    """A smooth stand-in network: output depends on x and t."""
    return torch.tanh(0.5 * x) + 1e-3 * t.to(x.dtype).reshape(-1, *(1,) * (x.dim() - 1))


@pytest.mark.parametrize("case", ["cm", "lcm-v-clip", "lcm-sample-threshold"])
def test_stochastic_trajectory_kernel_equals_reference(case, device):
    """Whole 4-step runs through the scheduler with counter noise (seed, offset): the kernel's
    trajectory follows the float64 reference's."""
    g = torch.Generator().manual_seed(1)
    x0 = rand_like_shape((2, 1, 4, 4), torch.float32, device, generator=g)
    runs = {}
    for backend in ("triton", "reference"):
        s, x = made(case, backend), x0.clone()
        x = x * s.init_noise_sigma
        for t in s.timesteps:
            x = s.step(reference_model(s.scale_model_input(x, t), t), t, x, seed=9, offset=4).prev_sample
        runs[backend] = x
    assert_close(runs["triton"], runs["reference"], dtype=torch.float32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["cm", "lcm-sample-threshold"])
def test_batch_invariance(case, device):
    """Sample k stepped alone with offset=k equals sample k of the batch (counter noise per sample)."""
    g = torch.Generator().manual_seed(2)
    x0 = rand_like_shape((3, 1, 4, 4), torch.float32, device, generator=g)

    def run(x, offset):
        s = made(case, "triton", steps=2)
        x = x * s.init_noise_sigma
        for t in s.timesteps:
            x = s.step(reference_model(s.scale_model_input(x, t), t), t, x, seed=3, offset=offset).prev_sample
        return x

    batch = run(x0, 0)
    for k in range(3):
        assert torch.equal(run(x0[k:k + 1], k), batch[k:k + 1])


# --- step by step parity with diffusers' classes -----------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_by_step_parity_with_diffusers(case, backend):
    """fastgen's class and diffusers' own, same config and generator: the same x after every step
    (fp32 rounding), LCM's denoised output too."""
    ours = made(case, backend)
    make, changes = CASES[case]
    theirs = getattr(diffusers, type(ours).__name__)(**dict(ours.config))
    theirs.set_timesteps(4)
    g = torch.Generator().manual_seed(4)
    x = torch.randn((2, 3, 4, 4), generator=g) * ours.init_noise_sigma
    y = x.clone()
    g_ours, g_theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        a = ours.step(reference_model(ours.scale_model_input(x, t_ours), t_ours), t_ours, x, generator=g_ours)
        b = theirs.step(reference_model(theirs.scale_model_input(y, t_theirs), t_theirs), t_theirs, y,
                        generator=g_theirs)
        assert type(a) is type(b)
        scale = max(1.0, float(y.abs().max()))
        assert_close(a.prev_sample, b.prev_sample, dtype=torch.float32, rtol=1e-5, atol=2e-6 * scale)
        if hasattr(b, "denoised"):
            assert_close(a.denoised, b.denoised, dtype=torch.float32, rtol=1e-5, atol=2e-6 * scale)
        x, y = a.prev_sample, b.prev_sample


def test_lcm_foreign_timestep_runs_diffusers_step():
    """A timestep that is not the one at the step index (after set_begin_index) gets diffusers' step."""
    ours, theirs = lcm(), diffusers.LCMScheduler(**LCM_CONFIG)
    for s in (ours, theirs):
        s.set_timesteps(4)
        s.set_begin_index(0)
    t = ours.timesteps[2]
    x = ramp()
    got = ours.step(0.1 * x, t, x, generator=torch.manual_seed(0)).prev_sample
    want = theirs.step(0.1 * x, t, x, generator=torch.manual_seed(0)).prev_sample
    assert torch.equal(got, want) and ours.step_index == 1
    ours.set_timesteps(4)
    ours.set_begin_index(0)
    with pytest.raises(ValueError, match="not the timestep of step 0"):
        ours.step(0.1 * x, t, x, seed=0)


def test_tables_follow_the_conventions():
    """streams[i] = i, init stream N, the model's timesteps and input scales diffusers' pipelines use,
    diffusers' draws (CM: every step of a multistep run; LCM: all but the last)."""
    s = cm()
    s.set_timesteps(3)
    table = step_table(s)
    assert table.streams.tolist() == [0, 1, 2] and table.init_stream == 3 and table.init_noise_sigma == 80.0
    assert torch.equal(table.model_timesteps, s.timesteps)
    want = [1 / (sig**2 + 0.25) ** 0.5 for sig in s.sigmas[:3].double().tolist()]
    assert torch.allclose(table.model_input_scales, torch.tensor(want, dtype=torch.float64))
    assert table.generator_draws.tolist() == [True] * 3 and [table.draws(i) for i in range(3)] == [True, True, False]
    s.set_timesteps(1)
    assert step_table(s).generator_draws.tolist() == [False]
    s = lcm()
    s.set_timesteps(3)
    table = step_table(s)
    assert table.generator_draws.tolist() == [True, True, False] and table.model_input_scales.tolist() == [1.0] * 3
    assert torch.equal(table.model_timesteps, s.timesteps)


# --- fastgen.sample --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["cm", "lcm-epsilon"])
def test_sample_runs_the_schedulers(case):
    """fastgen.sample with either scheduler: the triton loop equals the reference loop; sample k alone
    (offset=k) equals sample k of the batch; with a generator it follows diffusers' own loop."""
    s = made(case)
    shape = (3, 1, 4, 4)
    kwargs = dict(num_inference_steps=3, seed=6)
    fused = fastgen.sample(reference_model, shape, s, backend="triton", **kwargs)
    want = fastgen.sample(reference_model, shape, s, backend="reference", **kwargs)
    assert_close(fused, want, dtype=torch.float32, rtol=1e-4, atol=1e-4)
    alone = fastgen.sample(reference_model, (1, 1, 4, 4), s, backend="triton", offset=2, **kwargs)
    assert_close(alone, fused[2:], dtype=torch.float32, rtol=1e-6, atol=1e-6)
    theirs = getattr(diffusers, type(s).__name__)(**dict(s.config))
    theirs.set_timesteps(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        x = theirs.step(reference_model(theirs.scale_model_input(x, t), t.expand(3)), t, x, generator=g).prev_sample
    got = fastgen.sample(reference_model, shape, s, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert_close(got, x, dtype=torch.float32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [cm, lcm])
def test_exported_saved_and_reloaded_as_fastgen(make, tmp_path):
    """fastgen.<Class> is fastgen.schedulers' class; a saved config reloads it with the same config."""
    s = make(clip_denoised=False) if make is cm else make(prediction_type="v_prediction")
    assert getattr(fastgen, type(s).__name__) is type(s) and type(s).__module__ == "fastgen"
    s.save_pretrained(tmp_path)
    loaded = type(s).from_pretrained(tmp_path)
    assert type(loaded) is type(s) and plain_config(loaded.config) == plain_config(s.config)


# --- bad input -------------------------------------------------------------------------------------

def test_bad_input_is_named():
    s = cm()
    s.set_timesteps(2)
    x = ramp()
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x, 3, x)
    with pytest.raises(ValueError, match="model_output must have shape"):
        s.step(x[:1], s.timesteps[0], x)
    with pytest.raises(ValueError, match="pass one noise source"):
        s.step(x, s.timesteps[0], x, generator=torch.manual_seed(0), seed=1)
    with pytest.raises(ValueError, match="timestep must be one of the scheduler's timesteps"):
        s.step(x, 1.5, x)
    with pytest.raises(ValueError, match="backend must be one of"):
        s.step(x, s.timesteps[0], x, backend="cuda")
    with pytest.raises(TypeError, match="sample must be"):
        s.step(x, s.timesteps[0], x.long())
    with pytest.raises(ValueError, match="Number of inference steps is 'None'"):
        lcm().step(x, 999, x)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        step_table(_bad_lcm())
    with pytest.raises(ValueError, match="offset only applies to seed"):
        s = lcm()
        s.set_timesteps(2)
        s.step(x, s.timesteps[0], x, offset=1)


def _bad_lcm():
    """An LCMScheduler whose config was changed to a prediction type LCM does not know."""
    s = lcm()
    s.register_to_config(prediction_type="flow")
    s.set_timesteps(2)
    return s


# --- consistency distillation (fastgen/models/consistency.py) -------------------------------------

from fastgen.models import consistency as cd  # noqa: E402
from fastgen.models import denoisers  # noqa: E402


def tiny_teacher(prediction_type="epsilon", num_classes=0):
    torch.manual_seed(0)
    net = denoisers.MLPDenoiser(hidden=16, depth=1, time_dim=8, prediction_type=prediction_type,
                                num_classes=num_classes)
    with torch.no_grad():  # a teacher that is not zero (the MLP's init is), so x0 depends on its output
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.scheduler_config = dict(denoisers.DIGITS_SCHEDULER_CONFIG, prediction_type=prediction_type)
    return net.eval().requires_grad_(False)


def test_teacher_time_maps_sigmas_to_timesteps():
    time = cd.TeacherTime(denoisers.DIGITS_SCHEDULER_CONFIG)
    abar = fastgen.NoiseSchedule().alphas_cumprod.double()
    t = torch.tensor([0, 1, 250, 998, 999])
    sigma = ((1 - abar[t]) / abar[t]).sqrt()
    assert torch.allclose(time.timestep(sigma), t.float(), atol=1e-3)
    middle = (sigma[2] * sigma[2] * ((1 - abar[251]) / abar[251])).sqrt() ** 0.5  # log-midpoint of 250, 251
    assert abs(time.timestep(middle.reshape(1)).item() - 250.5) < 1e-3
    assert time.timestep(torch.tensor([1e-6, 1e6], dtype=torch.float64)).tolist() == [0.0, 999.0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_student_starts_as_the_teacher(prediction_type):
    """At initialisation c_skip^EDM x + c_out^EDM F is the teacher's x0; the consistency function
    meets the boundary condition f(x, eps) = x; the teacher's DDIM step is DDIM's equation (12) in VP."""
    teacher = tiny_teacher(prediction_type)
    student = cd.ConsistencyModel(teacher, teacher.scheduler_config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 64), generator=g) * 2
    sigma = torch.tensor([0.05, 1.3, 40.0], dtype=torch.float64)
    with torch.no_grad():
        f = student(x / (sigma**2 + 0.25).sqrt().float()[:, None], 250 * sigma.log())
        x0 = cd.teacher_x0(teacher, x, sigma, time=student.time, clip=False)
        edm = (0.25 / (sigma**2 + 0.25)).float()[:, None] * x + (0.5 * sigma / (sigma**2 + 0.25).sqrt()).float()[:, None] * f
        assert_close(edm, x0, dtype=torch.float32, rtol=1e-4, atol=1e-4 * float(sigma.max()))
        eps = student.time.sigma_min
        assert torch.equal(student.denoise(x, torch.full((3,), eps, dtype=torch.float64), sigma_min=eps), x)
    # DDIM (eta 0) from timestep 600 to 400 in VP terms, against the VE step
    abar = fastgen.NoiseSchedule().alphas_cumprod.double()
    a_t, a_s = abar[600], abar[400]
    s_t, s_s = ((1 - a_t) / a_t).sqrt(), ((1 - a_s) / a_s).sqrt()
    x_t = torch.randn((2, 64), generator=g, dtype=torch.float64).float()
    with torch.no_grad():
        m = teacher(x_t, torch.full((2,), 600.0))
        x0 = denoisers_x0(m, x_t.double(), a_t, prediction_type)
        want = a_s.sqrt() * x0 + (1 - a_s).sqrt() * (x_t.double() - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        got = cd.ddim_step(teacher, x_t * (1 + s_t**2).sqrt().float(), s_t.expand(2), s_s.expand(2),
                           time=student.time, clip=False)
    assert_close(got / (1 + s_s**2).sqrt().float(), want.float(), dtype=torch.float32, rtol=1e-4, atol=1e-4)


def denoisers_x0(m, x_t, a_t, prediction_type):
    """x0 from a VP model output (hand-written, float64)."""
    m = m.double()
    if prediction_type == "epsilon":
        return (x_t - (1 - a_t).sqrt() * m) / a_t.sqrt()
    if prediction_type == "v_prediction":
        return a_t.sqrt() * x_t - (1 - a_t).sqrt() * m
    return m


def test_teacher_trajectories_are_the_teachers_ddim_solution():
    """Each trajectory starts at sigma_0 z (z from stream 1, whatever the batch), solving onward from any
    stored point with the teacher's DDIM reaches its end, and the labels are dropped at the given rate."""
    teacher = tiny_teacher(num_classes=10)
    time = cd.TeacherTime(teacher.scheduler_config)
    sigmas = cd.karras_sigmas(5, time.sigma_min, 80.0)
    args = dict(substeps=2, label_dropout=0.5, seed=3, time=time, clip=True)
    points, ends, labels = cd.teacher_trajectories(teacher, 400, sigmas, (64,), batch_size=128, **args)
    assert points.shape == (400, 4, 64) and ends.shape == (400, 64) and ends.abs().max() <= 1.0
    assert torch.equal(points[:, 0], fastgen.randn((400, 64), seed=3, stream=1) * 80.0)
    again = cd.teacher_trajectories(teacher, 400, sigmas, (64,), batch_size=300, **args)
    assert torch.equal(again[2], labels) and torch.equal(again[0][:, 0], points[:, 0])
    for a, b in zip(again[:2], (points, ends)):  # the batch's size may change the matmuls' roundings
        assert_close(a, b, dtype=torch.float32, rtol=1e-5, atol=1e-5)
    assert 0.4 < (labels == teacher.null_class_label).float().mean() < 0.6 and labels.max() <= 10
    fine = cd.karras_sigmas(9, time.sigma_min, 80.0)
    assert torch.equal(fine[::2], sigmas)
    for k in range(4):  # from the point at sigma_k on: the rest of the fine grid, then x0 at epsilon
        x = points[:5, k]
        for j in range(2 * k, 8):
            x = cd.ddim_step(teacher, x, fine[j].expand(5), fine[j + 1].expand(5), labels[:5], time=time, clip=True)
        want = cd.teacher_x0(teacher, x, fine[-1].expand(5), labels[:5], time=time, clip=True).clamp(-1, 1)
        assert_close(ends[:5], want, dtype=torch.float32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("run", [dict(objective="trajectory"), dict(objective="consistency"),
                                 dict(objective="trajectory", distribution_matching=2.0)])
def test_distill_writes_resumes_and_samples(tmp_path, monkeypatch, run):
    """A few distillation steps: the checkpoint loads as (model, scheduler) for fastgen.sample, whose
    result equals the plain scheduler loop; a run interrupted after its periodic checkpoint and
    resumed ends bit for bit where the uninterrupted run ends (the fake denoiser included)."""
    teacher = tiny_teacher(num_classes=10)
    settings = dict(**run, steps=4, num_scales=6, batch_size=8, checkpoint_every=2, threads=None,
                    progress=False, quality_samples=4, search_samples=8, trajectories=24)
    whole = cd.distill(teacher, tmp_path / "whole.pt", **settings)
    two_step = tuple(whole["model"].metadata["two_step_timesteps"])
    assert set(whole["quality"]) == {1, 2, two_step, 4} and len(whole["loss"]) == 4
    assert two_step[1] == 0 and 1 <= two_step[0] <= 4
    saved = []
    real_save = cd.save_checkpoint

    def interrupted(path, model, config, **kwargs):
        real_save(path, model, config, **kwargs)
        saved.append(kwargs.get("step"))
        raise KeyboardInterrupt

    monkeypatch.setattr(cd, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cd.distill(teacher, tmp_path / "part.pt", **settings)
    monkeypatch.setattr(cd, "save_checkpoint", real_save)
    assert saved == [2]
    resumed = cd.distill(teacher, tmp_path / "part.pt", resume=True, **{k: v for k, v in settings.items()
                                                                        if k != "steps"})
    assert resumed["loss"] == whole["loss"][2:]
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("whole.pt", "part.pt"))
    names = ("student", "target", "ema") + (("fake",) if run.get("distribution_matching") else ())
    assert ("fake" in a["training"]) == ("fake" in names)
    for name in names:
        assert all(torch.equal(a["training"][name][k], b["training"][name][k]) for k in a["training"][name])
    model, scheduler = cd.consistency_sampler(tmp_path / "whole.pt", backend="torch")
    assert type(scheduler) is fs.CMStochasticIterativeScheduler and scheduler.config.num_train_timesteps == 6
    assert scheduler.config.sigma_min == pytest.approx(cd.TeacherTime(teacher.scheduler_config).sigma_min)
    x = fastgen.sample(model, (3, 1, 8, 8), scheduler, num_inference_steps=2, seed=4)
    loop = cd.sample_loop(model, cd.make_scheduler(model.scheduler_config), 2, (3, 1, 8, 8), seed=4)
    assert_close(x, loop, dtype=torch.float32, rtol=1e-5, atol=1e-5)
    assert x.abs().max() <= 1.0  # clip_denoised


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_sample_runs_custom_timesteps(backend):
    """fastgen.sample(timesteps=...) runs the scheduler's custom timesteps (as diffusers' pipelines pass
    them to set_timesteps): the plain loop of the same schedule, a 2-step and a 3-step one."""
    teacher = tiny_teacher()
    student = cd.ConsistencyModel(teacher, teacher.scheduler_config)
    student.scheduler_config = cd.scheduler_config(teacher.scheduler_config, 18)
    for schedule in ((12, 0), (15, 9, 3)):
        scheduler = cd.make_scheduler(student.scheduler_config)
        x = fastgen.sample(student, (3, 64), scheduler, timesteps=list(schedule), seed=5, backend=backend)
        loop = cd.sample_loop(student, cd.make_scheduler(student.scheduler_config, backend="torch"), schedule,
                              (3, 64), seed=5)
        assert_close(x, loop, dtype=torch.float32, rtol=1e-4, atol=1e-4)  # reference: float64 steps
    assert cd.schedule_sigmas(student, (12, 0))[1] == pytest.approx(float(cd.karras_sigmas(
        18, student.scheduler_config["sigma_min"], 80.0)[12]))


def test_search_two_step_keeps_the_smallest_mmd(monkeypatch):
    """The candidates are (j, 0) for j = 1..N-2, each scored on the search's own samples and seed; the
    one with the smallest MMD^2 wins, whatever the confidences say."""
    from fastgen.quality import Quality

    teacher = tiny_teacher()
    student = cd.ConsistencyModel(teacher, teacher.scheduler_config)
    student.scheduler_config = cd.scheduler_config(teacher.scheduler_config, 6)
    seen = {}

    def scored(model, *, schedules, n, seed, backend):
        seen.update(schedules=list(schedules), n=n, seed=seed)
        mmd = {(1, 0): 0.3, (2, 0): 0.2, (3, 0): 0.1, (4, 0): 0.4}
        return {k: (Quality(1.0 - mmd[k], mmd[k], (0,) * 10), 0.0) for k in schedules}

    monkeypatch.setattr(cd, "sample_quality", scored)
    best, scores = cd.search_two_step(student, n=7, seed=9)
    assert best == (3, 0) and set(scores) == {(1, 0), (2, 0), (3, 0), (4, 0)}
    assert seen == dict(schedules=[(1, 0), (2, 0), (3, 0), (4, 0)], n=7, seed=9)


def test_quality_table_lists_student_and_teacher(tmp_path):
    teacher = tiny_teacher()
    student = cd.ConsistencyModel(teacher, teacher.scheduler_config)
    student.scheduler_config = cd.scheduler_config(teacher.scheduler_config, 6)
    rows = cd.quality_table(student, teacher, n=4, schedules=(1, 2, (4, 0)),
                            teacher_samplers=(("ddim", 3), ("ddpm", 5)))
    sigmas = cd.karras_sigmas(6, student.scheduler_config["sigma_min"], 80.0)
    assert [r["sampler"] for r in rows] == [
        "consistency 1-step (sigma 80)", f"consistency 2-step (sigma 80 -> {float(sigmas[3]):.3g})",
        f"consistency 2-step [4, 0] (sigma 80 -> {float(sigmas[4]):.3g})", "teacher DDIM-3", "teacher DDPM-5"]
    table = cd.markdown_table(rows).splitlines()
    assert len(table) == 7 and all(r["seconds"] > 0 and sum(r["quality"].class_counts) == 4 for r in rows)


def test_distribution_matching_gradient():
    """The student's loss has gradient g = (x0_fake - x0_teacher) / mean|x - x0_teacher| at x + s eps, s the
    sigma of a teacher time in [0.02 T, 0.98 T); g is 0 while the fake denoiser is the teacher, and a
    NaN sample stays NaN."""
    teacher = tiny_teacher(num_classes=10)
    time = cd.TeacherTime(teacher.scheduler_config)
    matching = cd.DistributionMatching(teacher, time, lr=1e-3)
    t = matching.times(100000, torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 979
    gen = torch.Generator().manual_seed(1)
    x, eps = torch.randn(5, 64, generator=gen), torch.randn(5, 64, generator=gen)
    labels, t = torch.tensor([0, 3, 10, 7, 10]), torch.tensor([20, 100, 400, 700, 979])
    assert matching.gradient(x, labels, t, eps).abs().max() == 0
    with torch.no_grad():
        for p in matching.fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    sigma = time.log_sigmas[t].exp()
    x_s = x + sigma[:, None].float() * eps
    with torch.no_grad():
        real = cd.teacher_x0(teacher, x_s, sigma, labels, time=time, clip=False)
        fake = cd.teacher_x0(matching.fake, x_s, sigma, labels, time=time, clip=False)
    want = (fake - real) / (x - real).abs().mean(dim=1, keepdim=True)
    x.requires_grad_(True)
    matching.student_loss(x, labels, t, eps).sum().backward()
    assert want.abs().max() > 1e-3
    assert_close(x.grad, want, dtype=torch.float32, rtol=1e-5, atol=1e-6)
    x_nan = x.detach().clone()
    x_nan[2, 5] = float("nan")
    loss = matching.student_loss(x_nan, labels, t, eps)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4]]).all()


def test_distribution_matching_trains_the_fake_on_the_teachers_loss():
    """One fake step: its loss is the teacher's own (training_target at q_sample), it moves the fake
    denoiser and leaves the teacher as it was."""
    teacher = tiny_teacher(prediction_type="v_prediction", num_classes=10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    time = cd.TeacherTime(teacher.scheduler_config)
    matching = cd.DistributionMatching(teacher, time, lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    x0, eps, t = torch.rand(6, 64, generator=gen) * 2 - 1, torch.randn(6, 64, generator=gen), torch.arange(6) * 150
    labels = torch.tensor([1, 2, 10, 4, 10, 9])
    abar = time.schedule.alphas_cumprod[t][:, None].float()
    want_target = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    with torch.no_grad():
        want = (teacher(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t, labels) - want_target).square().mean()
    assert float(matching.update_fake(x0, labels, t, eps, lr=1e-3)) == pytest.approx(float(want), rel=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in matching.fake.state_dict().items())


def test_distill_starts_from_init(tmp_path):
    """init: the student starts from a distilled checkpoint's weights (0 steps give them back); one of
    another num_scales is refused by name."""
    teacher = tiny_teacher(num_classes=10)
    settings = dict(num_scales=6, batch_size=4, threads=None, progress=False, quality_samples=4, search_samples=4,
                    trajectories=8)
    first = cd.distill(teacher, tmp_path / "first.pt", steps=2, **settings)["model"]
    again = cd.distill(teacher, tmp_path / "again.pt", steps=0, init=tmp_path / "first.pt", **settings)["model"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert cd.load_checkpoint(tmp_path / "again.pt").metadata["init"] == str(tmp_path / "first.pt")
    with pytest.raises(ValueError, match="init must be a consistency checkpoint .* num_scales=5"):
        cd.distill(teacher, tmp_path / "b.pt", steps=1, init=tmp_path / "first.pt", **dict(settings, num_scales=5))
    with pytest.raises(FileNotFoundError):
        cd.distill(teacher, tmp_path / "b.pt", steps=1, init=tmp_path / "missing.pt", **settings)


def test_distill_bad_input(tmp_path):
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="distance_kind must be one of"):
        cd.distill(teacher, tmp_path / "a.pt", steps=1, distance_kind="lpips")
    with pytest.raises(ValueError, match="num_scales must be >= 2"):
        cd.distill(teacher, tmp_path / "a.pt", steps=1, num_scales=1)
    with pytest.raises(ValueError, match="objective must be one of"):
        cd.distill(teacher, tmp_path / "a.pt", steps=1, objective="progressive")
    for name in ("trajectories", "substeps", "batch_size"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            cd.distill(teacher, tmp_path / "a.pt", steps=1, **{name: 0})
    with pytest.raises(FileNotFoundError, match="resume=True needs the checkpoint"):
        cd.distill(teacher, tmp_path / "missing.pt", resume=True)
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="distribution_matching must be a finite weight >= 0"):
            cd.distill(teacher, tmp_path / "a.pt", steps=1, distribution_matching=weight)
    with pytest.raises(ValueError, match="distribution_matching > 0 needs objective='trajectory'"):
        cd.distill(teacher, tmp_path / "a.pt", steps=1, distribution_matching=1.0, objective="consistency")
    with pytest.raises(ValueError, match="batch_size >= 2"):
        cd.distill(teacher, tmp_path / "a.pt", steps=1, distribution_matching=1.0, batch_size=1)
    with pytest.raises(ValueError, match="fastgen-consistency/1 checkpoint"):
        cd.load_checkpoint(denoisers_checkpoint(teacher, tmp_path))
    if not cd.pretrained_path().is_file():  # until a distilled model is shipped, the default says so
        with pytest.raises(FileNotFoundError, match="pass checkpoint="):
            cd.consistency_sampler()


def denoisers_checkpoint(teacher, tmp_path):
    path = tmp_path / "teacher.pt"
    denoisers.save_checkpoint(path, teacher, teacher.scheduler_config)
    return path


def test_cli_train_consistency(tmp_path, capsys):
    from fastgen import cli

    teacher = denoisers_checkpoint(tiny_teacher(), tmp_path)
    out = tmp_path / "student.pt"
    assert cli.main(["train", "consistency", "--teacher", str(teacher), "--steps", "2", "--num-scales", "4",
                     "--batch-size", "4", "--trajectories", "8", "--out", str(out), "--no-progress",
                     "--threads", "1"]) == 0
    assert "consistency model" in capsys.readouterr().out
    assert cd.load_checkpoint(out).metadata["objective"] == "trajectory"
    tuned = tmp_path / "tuned.pt"
    assert cli.main(["train", "consistency", "--teacher", str(teacher), "--steps", "2", "--num-scales", "4",
                     "--batch-size", "4", "--trajectories", "8", "--init", str(out), "--distribution-matching", "4",
                     "--ema-decay", "0.99", "--out", str(tuned), "--no-progress", "--threads", "1"]) == 0
    metadata = cd.load_checkpoint(tuned).metadata
    assert (metadata["distribution_matching"], metadata["init"], metadata["ema_decay"]) == (4.0, str(out), 0.99)
    capsys.readouterr()
    for bad in (["--distribution-matching", "-1"], ["--init", str(tmp_path / "nope.pt")]):
        assert cli.main(["train", "consistency", "--teacher", str(teacher), "--out", str(tuned), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("python -m fastgen train") and "\n" not in err
    assert cli.main(["train", "consistency", "--teacher", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m fastgen train: error:") and "\n" not in err


def test_shipped_consistency_model():
    """The shipped student: distilled from the shipped teacher (same schedule), and its 1-step and
    searched 2-step samples (null label) score as its metadata records, within sampling noise of 200
    samples."""
    from fastgen import quality

    model, scheduler = cd.consistency_sampler(backend="torch")
    assert model.teacher_scheduler_config == denoisers.pretrained_denoiser().scheduler_config
    assert scheduler.config.sigma_min == pytest.approx(cd.TeacherTime(model.teacher_scheduler_config).sigma_min)
    for schedule in (1, tuple(model.metadata["two_step_timesteps"])):
        x = fastgen.sample(model, (200, 1, 8, 8), scheduler, seed=0, **cd.sampling_arguments(schedule))
        score, recorded = quality.digits_quality(x, value_range=(-1, 1)), model.metadata[cd.schedule_name(schedule)]
        assert score.confidence > recorded["confidence"] - 0.05 and score.mmd < recorded["mmd"] + 0.01
