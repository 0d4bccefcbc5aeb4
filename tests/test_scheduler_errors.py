"""Bad input to fastgen's drop-in schedulers, refused where it is given and named, and the places where
diffusers' own behaviour is kept although an earlier fastgen check could have refused it: the config
at construction (prediction_type, the length of trained_betas), keys a config object cannot hold,
set_timesteps' num_inference_steps, a list of generators against the batch, a missing local folder in
from_pretrained; DDPM's step before set_timesteps and add_noise's broadcasting, against diffusers."""
import inspect
import json
import os

import diffusers
import numpy as np
import pytest
import torch

import fastgen
import fastgen.schedulers as fs
from fastgen.schedulers._common import local_path
from tests.utils import assert_close

CLASSES = [fs.DDPMScheduler, fs.DDIMScheduler, fs.EulerDiscreteScheduler, fs.EulerAncestralDiscreteScheduler,
           fs.DPMSolverMultistepScheduler, fs.FlowMatchEulerDiscreteScheduler, fs.LCMScheduler,
           fs.CMStochasticIterativeScheduler]
WITH_PREDICTION_TYPE = [cls for cls in CLASSES if "prediction_type" in cls().config]
WITH_TRAINED_BETAS = [cls for cls in CLASSES if "trained_betas" in cls().config]
CAPPED = {fs.DDPMScheduler, fs.DDIMScheduler, fs.LCMScheduler, fs.CMStochasticIterativeScheduler}  # diffusers: N <= T


def ids(classes):
    return [cls.__name__ for cls in classes]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- the config, at construction -----------------------------------------------------------------------

def test_every_scheduler_with_a_prediction_type_is_covered():
    assert set(ids(WITH_PREDICTION_TYPE)) == {"DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                               "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                               "LCMScheduler"}


@pytest.mark.parametrize("cls", WITH_PREDICTION_TYPE, ids=ids(WITH_PREDICTION_TYPE))
def test_unknown_prediction_type_is_refused_at_construction(cls):
    """diffusers accepts any prediction_type and fails at the first step; fastgen names it and the
    values this scheduler's step knows when it is constructed, also from a config."""
    allowed = ", ".join(map(repr, cls._prediction_types))
    with pytest.raises(ValueError, match=f"prediction_type must be one of {allowed}, got 'eps'"):
        cls(prediction_type="eps")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        cls.from_config({"prediction_type": "x0"})
    for prediction_type in cls._prediction_types:
        assert cls(prediction_type=prediction_type).config.prediction_type == prediction_type


def test_prediction_types_are_the_steps_own():
    assert fs.DDPMScheduler._prediction_types == fastgen.step_spec.PREDICTION_TYPES
    assert "flow_prediction" in fs.DPMSolverMultistepScheduler._prediction_types
    with pytest.raises(ValueError, match="'epsilon', 'v_prediction', got 'sample'"):  # diffusers' step has no "sample"
        fs.EulerAncestralDiscreteScheduler(prediction_type="sample")


@pytest.mark.parametrize("cls", WITH_TRAINED_BETAS, ids=ids(WITH_TRAINED_BETAS))
def test_trained_betas_of_another_length_are_refused(cls, tmp_path):
    """diffusers takes trained_betas as the betas and num_train_timesteps as the number of timesteps:
    with two betas and T = 1000 its timesteps index far outside the tables. fastgen asks for one beta
    per training timestep before it makes a schedule to sample with (set_timesteps), from the
    constructor's config and from a saved one."""
    match = r"trained_betas must hold one beta per training timestep to sample, num_train_timesteps=1000, got 2 betas"
    mismatched = cls(trained_betas=np.array([0.1, 0.3]))  # constructs, saves and loads, as in diffusers
    with pytest.raises(ValueError, match=match):
        mismatched.set_timesteps(2)
    matching = cls(trained_betas=[0.1, 0.2, 0.3], num_train_timesteps=3)
    assert matching.betas.tolist() == pytest.approx([0.1, 0.2, 0.3])
    config = dict(matching.config, num_train_timesteps=1000)
    (tmp_path / cls.config_name).write_text(json.dumps({k: v for k, v in config.items() if k != "_use_default_values"}))
    with pytest.raises(ValueError, match=r"num_train_timesteps=1000, got 3 betas"):
        cls.from_pretrained(tmp_path).set_timesteps(2)


def test_trained_betas_step_as_diffusers():
    betas = np.linspace(1e-3, 0.05, 50)
    ours = fs.DDPMScheduler(trained_betas=betas, num_train_timesteps=50, backend="torch")
    theirs = diffusers.DDPMScheduler(trained_betas=betas, num_train_timesteps=50)
    x, out = torch.randn(2, 3, 4, generator=gen(0)), torch.randn(2, 3, 4, generator=gen(1))
    for t in (49, 20, 0):
        assert_close(ours.step(out, t, x, generator=gen(t)).prev_sample,
                     theirs.step(out, t, x, generator=gen(t)).prev_sample.double(), dtype=torch.float32)


@pytest.mark.parametrize("cls", [fs.DDIMScheduler, fs.EulerDiscreteScheduler], ids=ids([fs.DDIMScheduler,
                                                                                        fs.EulerDiscreteScheduler]))
def test_config_keys_a_config_cannot_hold_are_ignored(cls, tmp_path):
    """diffusers keeps every unknown config key on its config object, as an attribute: '__class__'
    raises a TypeError from inside diffusers' config code and 'items' breaks the config. fastgen
    ignores such keys (with diffusers' warning for unexpected keys) and keeps the rest as diffusers."""
    config = {**cls().config, "__class__": "x", "items": 3, "unknown": 5}
    s = cls.from_config(config)
    assert "__class__" not in s.config and "items" not in s.config and s.config["unknown"] == 5
    assert dict(s.config.items())["num_train_timesteps"] == 1000
    saved = {k: v for k, v in config.items() if k != "_use_default_values"}
    (tmp_path / cls.config_name).write_text(json.dumps(saved))
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls and "__class__" not in loaded.config and loaded.config["unknown"] == 5
    assert cls.from_config(cls().config).config == cls().config  # nothing to drop: the config as it is


# --- set_timesteps -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", CLASSES, ids=ids(CLASSES))
def test_set_timesteps_refuses_bad_num_inference_steps(cls):
    """0 (diffusers: ZeroDivisionError), a negative count (DDIM: accepted, an empty run), a float,
    None without a custom schedule, and more steps than training timesteps where diffusers requires
    at most that many: named, before diffusers runs."""
    s = cls()
    before = s.timesteps.clone()
    for bad in (0, -5, None, *([s.config.num_train_timesteps + 1] if cls in CAPPED else [])):
        with pytest.raises(ValueError, match=r"num_inference_steps must be (a positive int|an int in \[1, "
                                             rf"num_train_timesteps={s.config.num_train_timesteps}\]).*got {bad}"):
            s.set_timesteps(bad)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="num_inference_steps must be an integer"):
            s.set_timesteps(bad)
    assert torch.equal(s.timesteps, before)
    s.set_timesteps(np.int64(3))
    assert s.num_inference_steps == 3


@pytest.mark.parametrize("cls", CLASSES, ids=ids(CLASSES))
def test_set_timesteps_keeps_diffusers_signature(cls):
    """Pipelines inspect set_timesteps for timesteps= / sigmas=: the wrapper shows diffusers' signature."""
    base = next(c for c in cls.__mro__ if c.__module__.startswith("diffusers."))
    assert inspect.signature(cls.set_timesteps) == inspect.signature(base.set_timesteps)


CUSTOM = [(fs.DDPMScheduler, dict(timesteps=[900, 400, 0])), (fs.EulerDiscreteScheduler, dict(sigmas=[5.0, 1.0, 0.0])),
          (fs.EulerDiscreteScheduler, dict(timesteps=[900, 400, 0])),
          (fs.FlowMatchEulerDiscreteScheduler, dict(sigmas=[1.0, 0.5, 0.2])),
          (fs.LCMScheduler, dict(timesteps=[999, 499])), (fs.CMStochasticIterativeScheduler, dict(timesteps=[39, 0])),
          (fs.DPMSolverMultistepScheduler, dict(timesteps=[900, 400, 0]))]


@pytest.mark.parametrize("cls, custom", CUSTOM, ids=[f"{c.__name__}-{next(iter(k))}" for c, k in CUSTOM])
def test_custom_schedules_pass_num_inference_steps_none(cls, custom):
    ours, theirs = cls(), getattr(diffusers, cls.__name__)()
    ours.set_timesteps(num_inference_steps=None, **custom)
    theirs.set_timesteps(num_inference_steps=None, **custom)
    assert torch.equal(ours.timesteps, theirs.timesteps)


# --- a step's generators --------------------------------------------------------------------------------------

def _stepper(name):
    """(scheduler after set_timesteps, step kwargs that make it draw noise) of one class."""
    s = getattr(fs, name)(backend="torch")
    s.set_timesteps(4)
    return s, (dict(eta=1.0) if name == "DDIMScheduler" else {})


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler"])
def test_generator_list_must_hold_one_per_sample(name):
    """diffusers' randn_tensor raises IndexError for a short list (and ignores the surplus of a long
    one); fastgen names the list's length and the batch size before any draw or step index moves.
    A list of 1 serves the whole batch, as in diffusers."""
    s, kwargs = _stepper(name)
    x = torch.randn(3, 2, 4)
    t = s.timesteps[0]
    for count in (2, 4):
        generators = [gen(i) for i in range(count)]
        with pytest.raises(ValueError, match=f"generator must be .* list of one per sample \\(batch size 3.*got a "
                                             f"list of {count}"):
            s.step(x, t, x, generator=generators, **kwargs)
        assert all(torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=gen(i)))
                   for i, g in enumerate(generators))
    assert getattr(s, "step_index", None) is None
    theirs = getattr(diffusers, name)()
    theirs.set_timesteps(4)
    got = s.step(x, t, x, generator=[gen(7)], **kwargs).prev_sample
    assert_close(got, theirs.step(x, t, x, generator=[gen(7)], **kwargs).prev_sample.double(), dtype=torch.float32)


# --- from_pretrained ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [fs.DDIMScheduler, fs.EulerDiscreteScheduler, fs.LCMScheduler],
                         ids=ids([fs.DDIMScheduler, fs.EulerDiscreteScheduler, fs.LCMScheduler]))
def test_from_pretrained_names_a_missing_local_folder(cls, tmp_path, monkeypatch):
    """diffusers tries the Hub for a local path that does not exist and reports a failed connection;
    fastgen names the folder. A Hub id ("name", "owner/name") is left to diffusers."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in (str(tmp_path / "nope"), "./nope", "../nope", "~/surely-no-such-folder-here", "a/b/c",
                    "runs/nope", tmp_path / "nope"):
        with pytest.raises(FileNotFoundError, match=f"no such folder '{os.fspath(missing)}'"):
            cls.from_pretrained(missing)
    for hub_id in ("google/ddpm-cifar10-32", "gpt2"):
        assert local_path(hub_id) == hub_id


def test_from_pretrained_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fs.DDIMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "sched")
    assert fs.DDIMScheduler.from_pretrained("~/sched").config.prediction_type == "v_prediction"


# --- DDPM before set_timesteps --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("config", [dict(), dict(variance_type="learned_range", prediction_type="v_prediction"),
                                    dict(num_train_timesteps=20, variance_type="fixed_large", clip_sample=False)])
def test_ddpm_step_before_set_timesteps_is_diffusers(backend, config):
    """Before set_timesteps diffusers' DDPM steps t -> t - 1: the same samples from the same generator
    (and from torch's global generator), at the first, a middle, the second-to-last and the last step."""
    ours, theirs = fs.DDPMScheduler(**config, backend=backend), diffusers.DDPMScheduler(**config)
    channels = 2 * 3 if config.get("variance_type", "").startswith("learned") else 3
    last = ours.config.num_train_timesteps - 1
    for t in (last, last // 2, 1, 0):
        x, out = torch.randn(2, 3, 4, generator=gen(t)), torch.randn(2, channels, 4, generator=gen(t + 1))
        got, want = ours.step(out, t, x, generator=gen(9)), theirs.step(out, t, x, generator=gen(9))
        assert_close(got.prev_sample, want.prev_sample.double(), dtype=torch.float32)
        assert_close(got.pred_original_sample, want.pred_original_sample.double(), dtype=torch.float32)
        torch.manual_seed(3)
        got = ours.step(out, ours.timesteps[last - t], x).prev_sample
        torch.manual_seed(3)
        want = theirs.step(out, theirs.timesteps[last - t], x).prev_sample
        assert_close(got, want.double(), dtype=torch.float32)


# --- add_noise broadcasting -------------------------------------------------------------------------------------

BROADCASTS = [((1, 4, 3, 3), (2, 4, 3, 3), [10]),        # one sample, a batch of noise (Kandinsky 2.2 inpainting)
              ((1, 4, 3, 3), (1, 4, 3, 3), [10, 20, 30]),  # one sample, one noise, three timesteps
              ((2, 4, 3, 3), (1, 4, 3, 3), [999]),
              ((2, 4, 3, 3), (2, 1, 3, 3), [10, 20])]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["DDPMScheduler", "DDIMScheduler"])
def test_add_noise_broadcasts_as_diffusers(kind, backend):
    ours, theirs = getattr(fs, kind)(backend=backend), getattr(diffusers, kind)()
    for sample_shape, noise_shape, timesteps in BROADCASTS:
        x, noise = torch.randn(sample_shape, generator=gen(0)), torch.randn(noise_shape, generator=gen(1))
        t = torch.tensor(timesteps)
        got, want = ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t)
        assert got.shape == want.shape
        assert_close(got, want.double(), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"noise must have sample's shape \(1, 4\), got \(2, 4\)"):
        fastgen.q_sample(torch.randn(1, 4), 5, ours.schedule, noise=torch.randn(2, 4))  # the op stays strict
    with pytest.raises(ValueError, match=r"batch=2\], got shape \(3,\)"):  # no broadcast: fastgen's error
        ours.add_noise(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([1, 2, 3]))


# --- fastgen.sample: a run that would give NaN samples is refused ----------------------------------

class _Half(torch.nn.Module):
    def forward(self, x, t, class_labels=None):
        return 0.5 * x


@pytest.mark.parametrize("scheduler, steps", [
    (lambda: fastgen.DPMSolverMultistepScheduler(), 1000),     # as many steps as training timesteps
    (lambda: fastgen.FlowMatchEulerDiscreteScheduler(shift=0.0), 10),
])
def test_sample_refuses_a_degenerate_run(scheduler, steps):
    with pytest.raises(ValueError, match="degenerate: step .* coefficients are not finite"):
        fastgen.sample(_Half(), (2, 4), scheduler(), num_inference_steps=steps, seed=0)


@pytest.mark.parametrize("scale", [1e39, -1e7])
def test_a_guidance_scale_beyond_fp32_use_is_refused(scale):
    with pytest.raises(ValueError, match="guidance_scale must be in"):
        fastgen.sample(_Half(), (2, 4), fastgen.EulerDiscreteScheduler(), num_inference_steps=2, seed=0,
                       class_labels=torch.tensor([1, 2]), null_class_label=0, guidance_scale=scale)
