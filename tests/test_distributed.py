"""fastgen.distributed: gloo process groups of 1, 2 and 3 CPU processes gather the same samples bit for
bit as single-process ``fastgen.sample`` calls on the same batch grid, for every sampler kind; arguments
that differ between ranks, a rank whose work fails and a rank that dies raise on every rank; a shard
directory resumes a killed run to the uninterrupted result and refuses another configuration; the
CLI writes .npz arrays and runs under torchrun.

Kept small: the shipped digits denoiser, a few steps, n = 9 in batches of 2 (an uneven split on 2 and
3 ranks, a padded last batch), backend "torch".
"""
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch

import fastgen
from fastgen import distributed, registry, sampling
from fastgen.cli import main
from fastgen.models import pretrained_denoiser, views

# Every sampler fastgen.sample accepts, by name: (scheduler kind, sampling arguments). A new sampler
# kind is one more entry; every test below runs on each.
SAMPLERS = {
    "ddpm": ("ddpm", dict(num_inference_steps=4)),
    "ddim": ("ddim", dict(num_inference_steps=5, eta=0.5)),  # eta > 0: noise in every step, not only x_T
    "euler": ("euler", dict(num_inference_steps=4)),
    "euler_ancestral": ("euler_ancestral", dict(num_inference_steps=4)),  # noise in every step
    "sde-dpmsolver++": ("sde-dpmsolver++", dict(num_inference_steps=4)),  # multistep, noise in every step
    "flow_match": ("flow_match", dict(num_inference_steps=4)),
    "tcd": ("tcd", dict(num_inference_steps=3)),  # noise in every step but the last
    "edm_sde-dpmsolver++": ("edm_sde-dpmsolver++", dict(num_inference_steps=4)),  # EDM view, noise every step
    "lms": ("lms", dict(num_inference_steps=5)),  # the last three derivatives in the history ring
    "dpm_sde": ("dpm_sde", dict(num_inference_steps=3)),  # two noisy stages, the second reading the first's noise
    # noise in every second stage; fewer steps from the digits schedule's sigma_max are degenerate (sigma_down 0)
    "kdpm2_ancestral": ("kdpm2_ancestral", dict(num_inference_steps=10)),
}
# and every other sampler that runs on the digits denoiser (fastgen.registry), 4 steps
SAMPLERS.update({name: (name, dict(num_inference_steps=4)) for name in registry.DIGITS_SAMPLERS if name not in SAMPLERS})
N, BATCH, SHARD = 9, 2, 4  # 5 batches; shards [0, 4), [4, 8), [8, 9)
SHAPE = (1, 8, 8)
SEED = 11
WORLD_SIZES = (1, 2, 3)
TIMEOUT_S = 60


def _setup(kind):
    """(the digits denoiser as ``kind`` sees it, its scheduler, sampling arguments)."""
    scheduler_kind, kwargs = SAMPLERS[kind]
    model, scheduler = views.for_sampler(pretrained_denoiser(), scheduler_kind)
    return model, scheduler, dict(kwargs, backend="torch")


def _reference(kind, n=N, seed=SEED):
    """Single-process fastgen.sample calls on the batch grid, each batch of BATCH at its offset."""
    model, scheduler, kwargs = _setup(kind)
    return torch.cat([fastgen.sample(model, (BATCH, *SHAPE), scheduler, seed=seed, offset=offset, **kwargs)
                      for offset in range(0, n, BATCH)])[:n]


def _outcome(run):
    """('ok', result) or ('error', exception class name, message) of ``run()``."""
    try:
        return ("ok", run())
    except Exception as err:  # noqa: BLE001  (the test compares what every rank raised)
        return ("error", type(err).__name__, str(err))


def _scenarios(rank, world, group, folder):
    """Every scenario on the ``world`` ranks of ``group``: this rank's outcomes."""
    results = {}
    for kind in SAMPLERS:
        model, scheduler, kwargs = _setup(kind)
        common = dict(n=N, seed=SEED, batch_size=BATCH, group=group, **kwargs)
        results[kind] = _outcome(lambda: distributed.sample(model, SHAPE, scheduler, **common))
        shards = os.path.join(folder, f"shards-{kind}")
        results[kind, "shards"] = _outcome(lambda: distributed.sample(model, SHAPE, scheduler, shard_dir=shards,
                                                                      shard_size=SHARD, **common))
        if world > 1:
            mismatch = dict(common, seed=SEED + rank)  # rank r: another seed
            results[kind, "mismatch"] = _outcome(lambda: distributed.sample(model, SHAPE, scheduler, **mismatch))
            refused = dict(common, n=0 if rank == world - 1 else N)  # one rank refuses its arguments
            results[kind, "refused"] = _outcome(lambda: distributed.sample(model, SHAPE, scheduler, **refused))

            # a run whose last rank fails after its first shard; every rank raises, then a rerun completes
            resumed, sampled = os.path.join(folder, f"resumed-{kind}"), []

            def fail_after_first(index, start, end):
                if rank == world - 1:
                    raise RuntimeError(f"stopped after shard {index}")

            results[kind, "failed"] = _outcome(lambda: distributed.sample(
                model, SHAPE, scheduler, shard_dir=resumed, shard_size=BATCH, callback=fail_after_first, **common))
            results[kind, "resumed"] = _outcome(lambda: distributed.sample(
                model, SHAPE, scheduler, shard_dir=resumed, shard_size=BATCH,
                callback=lambda index, start, end: sampled.append(index), **common))
            results[kind, "resampled"] = sampled
    return results


def _worker(rank, world, rendezvous, folder):
    """One of 3 ranks: the scenarios on the groups of ranks [0], [0, 1] and [0, 1, 2] (the default group)
    one after the other, this rank's outcomes saved to folder/rank<r>.pt; at last, in the group [0, 1],
    rank 1 dies (exit code 3) after its first shard and rank 0 saves what it raised."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                                         timeout=timedelta(seconds=TIMEOUT_S))
    groups = {1: torch.distributed.new_group([0]), 2: torch.distributed.new_group([0, 1]), 3: None}
    results = {}
    for size in WORLD_SIZES:
        if rank < size:
            results[size] = _scenarios(rank, size, groups[size], os.path.join(folder, f"world{size}"))
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    if rank < 2:
        results["died"] = _die_after_first_shard(rank, groups[2], folder)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))


def _die_after_first_shard(rank, group, folder):
    """Rank 1 exits (as a killed process would) after its first shard; rank 0 returns what it raised."""
    model, scheduler, kwargs = _setup("ddim")

    def die(index, start, end):
        if rank == 1:
            os._exit(3)

    return _outcome(lambda: distributed.sample(model, SHAPE, scheduler, n=N, seed=SEED, batch_size=BATCH,
                                               shard_dir=os.path.join(folder, "died"), shard_size=BATCH,
                                               callback=die, group=group, **kwargs))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ranks")


@pytest.fixture(scope="module")
def worlds(root):
    """{world size: [each rank's outcomes]}, from one launch of 3 spawned ranks."""
    context = multiprocessing.get_context("spawn")
    rendezvous = "file://" + str(root / "rendezvous")
    processes = [context.Process(target=_worker, args=(rank, 3, rendezvous, str(root))) for rank in range(3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(240)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank did not finish in 240 s")
    assert [p.exitcode for p in processes] == [0, 3, 0]
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(3)]
    return {size: [r[size] for r in ranks[:size]] for size in WORLD_SIZES} | {"died": ranks[0]["died"]}


@pytest.fixture(scope="module")
def references():
    return {kind: _reference(kind) for kind in SAMPLERS}


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_gathered_samples_are_the_same_bits_for_any_world_size(worlds, references, kind, world):
    reference = references[kind]
    assert reference.shape == (N, *SHAPE) and torch.isfinite(reference).all() and reference.std() > 0.1
    for key in (kind, (kind, "shards")):
        outcomes = [ranks[key] for ranks in worlds[world]]
        assert all(o[0] == "ok" for o in outcomes), outcomes
        assert torch.equal(outcomes[0][1], reference)  # bit for bit
        assert all(o[1] is None for o in outcomes[1:])  # the samples are returned on rank 0 only


@pytest.mark.parametrize("kind", SAMPLERS)
def test_samples_do_not_depend_on_the_batch_but_for_the_model_rounding(references, kind):
    """The noise of sample k is the same in any batch; only the model's arithmetic may differ (a CPU
    matmul blocks by the number of rows), by float rounding."""
    model, scheduler, kwargs = _setup(kind)
    one_batch = fastgen.sample(model, (N, *SHAPE), scheduler, seed=SEED, **kwargs)
    # the two-stage samplers call the model twice a step from sigma_max ~ 2e4 in 4 steps: the rounding
    # grows by about 10 over the run (seen: 4e-4 on one element of 576)
    tolerance = 1e-3 if kind in ("heun", "kdpm2") else 1e-4
    torch.testing.assert_close(one_batch, references[kind], rtol=tolerance, atol=tolerance)
    assert not torch.allclose(one_batch, _reference(kind, seed=SEED + 1), atol=1e-2)


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("world", WORLD_SIZES[1:])
def test_arguments_that_differ_between_ranks_raise_on_every_rank(worlds, kind, world):
    outcomes = [ranks[kind, "mismatch"] for ranks in worlds[world]]
    for outcome in outcomes:
        assert outcome[:2] == ("error", "ValueError"), outcome
        assert "needs the same arguments on every rank" in outcome[2]
        assert f"rank 1 differs from rank 0 in seed ({SEED + 1} vs {SEED})" in outcome[2]
    refused = [ranks[kind, "refused"] for ranks in worlds[world]]
    for rank, outcome in enumerate(refused):
        assert outcome[:2] == ("error", "ValueError"), outcome
        assert "n must be an integer >= 1, got 0" in outcome[2]
        if rank != world - 1:  # the others name the rank that refused
            assert f"rank {world - 1} of {world} refused the arguments" in outcome[2]


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("world", WORLD_SIZES[1:])
def test_a_failed_rank_raises_on_every_rank_and_a_rerun_resumes_it(worlds, references, kind, world):
    ranks = worlds[world]
    failed = [r[kind, "failed"] for r in ranks]
    assert failed[-1][:2] == ("error", "RuntimeError") and "stopped after shard" in failed[-1][2]
    for outcome in failed[:-1]:
        assert outcome[:2] == ("error", "DistributedError"), outcome
        assert f"rank {world - 1} of {world} failed while sampling: RuntimeError: stopped after shard" in outcome[2]
    resumed = [r[kind, "resumed"] for r in ranks]
    assert torch.equal(resumed[0][1], references[kind])
    # the failing rank's later shards, and nothing finished before, were sampled again
    shards = -(-N // BATCH)
    last_share = range(shards * (world - 1) // world, shards)
    resampled = sorted(i for r in ranks for i in r[kind, "resampled"])
    assert resampled == list(last_share)[1:]


def test_a_rank_that_dies_fails_the_others_and_the_run_resumes_on_one_process(worlds, root, references):
    outcome = worlds["died"]
    assert outcome[:2] == ("error", "DistributedError"), outcome
    assert "rank 0 of 2: finishing the samples with the other ranks failed: a rank died" in outcome[2]
    # rank 0 finished its shards 0-1, rank 1 its shard 2 before dying: one process completes the rest
    sampled = []
    model, scheduler, kwargs = _setup("ddim")
    x = distributed.sample(model, SHAPE, scheduler, n=N, seed=SEED, batch_size=BATCH,
                           shard_dir=root / "died", shard_size=BATCH,
                           callback=lambda index, start, end: sampled.append(index), **kwargs)
    assert sampled == [3, 4]
    assert torch.equal(x, references["ddim"])


# --- shard directories in one process ---------------------------------------------------------------

def test_per_sample_class_labels_follow_their_samples_across_batches():
    """class_labels of shape [n] are sliced with the batch grid: sample k is guided towards label k,
    as in one fastgen.sample call on the batch that holds it."""
    def model(x, t, class_labels=None):
        return 0.3 * x + 0.05 * class_labels.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))

    scheduler = sampling.make_scheduler("ddim")
    labels = torch.arange(N) % 4
    common = dict(num_inference_steps=3, guidance_scale=2.0, null_class_label=9, backend="torch")
    got = distributed.sample(model, SHAPE, scheduler, n=N, seed=SEED, batch_size=BATCH, class_labels=labels, **common)
    batches = []
    for offset in range(0, N, BATCH):
        batch_labels = labels[offset:offset + BATCH]
        batch_labels = torch.cat([batch_labels, batch_labels[-1:].expand(BATCH - len(batch_labels))])
        batches.append(fastgen.sample(model, (BATCH, *SHAPE), scheduler, seed=SEED, offset=offset,
                                      class_labels=batch_labels, **common))
    torch.testing.assert_close(got, torch.cat(batches)[:N], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"class_labels must be one int or one per sample \(n=9\)"):
        distributed.sample(model, SHAPE, scheduler, n=N, seed=SEED, batch_size=BATCH, class_labels=labels[:4],
                           **common)


def test_a_shard_directory_of_another_configuration_is_refused(tmp_path):
    model, scheduler, kwargs = _setup("ddim")
    common = dict(n=5, seed=SEED, batch_size=BATCH, shard_dir=tmp_path / "run", **kwargs)
    x = distributed.sample(model, SHAPE, scheduler, **common)
    manifest = distributed.load_manifest(tmp_path / "run")
    assert manifest["n"] == 5 and manifest["seed"] == SEED and manifest["fastgen_version"] == fastgen.__version__
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [(0, 5)]  # default: 16 batches a shard
    for change, named in ((dict(seed=SEED + 1), f"seed ({SEED + 1} vs {SEED})"),
                          (dict(num_inference_steps=4), "num_inference_steps (4 vs 5)"),
                          (dict(batch_size=1), "batch_size (1 vs 2)")):
        with pytest.raises(ValueError, match="holds shards of another configuration") as info:
            distributed.sample(model, SHAPE, scheduler, **{**common, **change})
        assert named in str(info.value)
    other = pretrained_denoiser()
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match=r"model \(.*state_dict sha256"):
        distributed.sample(other, SHAPE, scheduler, **common)
    assert torch.equal(distributed.sample(model, SHAPE, scheduler, **common), x)  # the same arguments reuse it
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="shard_dir must be empty or hold the manifest.json of an earlier run"):
        distributed.sample(model, SHAPE, scheduler, **{**common, "shard_dir": tmp_path / "busy"})


def test_a_damaged_shard_is_sampled_again(tmp_path):
    model, scheduler, kwargs = _setup("ddim")
    common = dict(n=5, seed=SEED, batch_size=BATCH, shard_dir=tmp_path, shard_size=BATCH, **kwargs)
    x = distributed.sample(model, SHAPE, scheduler, **common)
    (tmp_path / "shard-000001.npz").write_bytes(b"not a zip")
    os.remove(tmp_path / "shard-000002.npz")
    sampled = []
    with pytest.warns(RuntimeWarning, match="shard-000001.npz is unreadable"):
        y = distributed.sample(model, SHAPE, scheduler, callback=lambda i, s, e: sampled.append(i), **common)
    assert sampled == [1, 2] and torch.equal(x, y)


def _rewrite_samples(path, samples):
    """Write the shard ``path`` again with other ``samples`` and its own start, end and config_hash: a shard
    whose header and marks still look right."""
    with np.load(path) as arrays:
        marks = {key: arrays[key] for key in ("start", "end", "config_hash")}
    np.savez(path, samples=samples, **marks)


def _flip_a_sample_byte(path):
    """Bit rot: one byte of the stored samples changes, the zip directory and the .npy header stay valid."""
    data = bytearray(path.read_bytes())
    at = data.index(b"samples.npy") + 200  # past the member's name and the .npy header, inside the floats
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["rewritten", "bit rot", "no digest"])
def test_a_shard_that_fails_its_digest_is_sampled_again(tmp_path, damage):
    model, scheduler, kwargs = _setup("ddim")
    common = dict(n=5, seed=SEED, batch_size=BATCH, shard_dir=tmp_path, shard_size=BATCH, **kwargs)
    x = distributed.sample(model, SHAPE, scheduler, **common)
    shard = tmp_path / "shard-000001.npz"
    if damage == "rewritten":
        _rewrite_samples(shard, np.zeros((2, *SHAPE), np.float32))
    elif damage == "bit rot":
        _flip_a_sample_byte(shard)
    else:
        os.remove(tmp_path / "shard-000001.npz.sha256")
    with pytest.raises(ValueError, match="is not finished: 1 of 3 shards missing or damaged .first: shard 1, "
                                         "shard-000001.npz is unreadable or not this run's"):
        list(distributed.iter_shards(tmp_path))  # never read as it is
    sampled = []
    with pytest.warns(RuntimeWarning, match="shard-000001.npz is unreadable or not this run's .* sampling it again"):
        y = distributed.sample(model, SHAPE, scheduler, callback=lambda i, s, e: sampled.append(i), **common)
    assert sampled == [1] and torch.equal(x, y)
    assert torch.equal(torch.cat(list(distributed.iter_shards(tmp_path))), x)


def test_a_manifest_with_its_shards_out_of_order_is_refused(tmp_path):
    import json

    model, scheduler, kwargs = _setup("ddim")
    common = dict(n=5, seed=SEED, batch_size=BATCH, shard_dir=tmp_path, shard_size=BATCH, **kwargs)
    distributed.sample(model, SHAPE, scheduler, **common)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0], manifest["shards"][1] = manifest["shards"][1], manifest["shards"][0]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for read in (lambda: list(distributed.iter_shards(tmp_path)),
                 lambda: distributed.sample(model, SHAPE, scheduler, **common)):
        with pytest.raises(ValueError, match=r"the shards of manifest.json are not those of its configuration "
                                             r"\(n=5, shard_size=2\) in order"):
            read()


def test_the_command_line_resamples_a_damaged_shard_without_a_traceback(tmp_path, capsys):
    run = ["sample", "--n", "4", "--steps", "2", "--batch-size", "2", "--shard-size", "2", "--shard-dir",
           str(tmp_path / "shards"), "--no-progress"]
    assert main([*run, "--out", str(tmp_path / "a.npz")]) == 0
    _flip_a_sample_byte(tmp_path / "shards" / "shard-000001.npz")
    with pytest.warns(RuntimeWarning, match="sampling it again"):
        assert main([*run, "--out", str(tmp_path / "b.npz")]) == 0
    assert np.array_equal(_cli_samples(tmp_path / "a.npz"), _cli_samples(tmp_path / "b.npz"))


@pytest.mark.parametrize("arguments, message", [
    (dict(n=0), "n must be an integer >= 1, got 0"),
    (dict(seed=None), "seed must be an integer"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(shard_size=3), "shard_size needs a shard_dir"),
    (dict(offset=4), "sets offset itself"),
    (dict(generator=torch.Generator()), "sets generator itself"),
    (dict(num_inference_steps=0), "num_inference_steps must be in"),
])
def test_bad_arguments_are_refused_before_any_work(arguments, message):
    model, scheduler, kwargs = _setup("ddim")
    with pytest.raises((ValueError, TypeError), match=message):
        distributed.sample(model, SHAPE, scheduler, **{**dict(n=5, batch_size=BATCH, **kwargs), **arguments})


def test_shard_size_must_be_whole_batches(tmp_path):
    model, scheduler, kwargs = _setup("ddim")
    with pytest.raises(ValueError, match="shard_size must be a positive multiple of the batch size 2"):
        distributed.sample(model, SHAPE, scheduler, n=5, batch_size=BATCH, shard_dir=tmp_path, shard_size=3, **kwargs)
    assert not os.listdir(tmp_path)


# --- the command line -------------------------------------------------------------------------------

def _cli_samples(path):
    with np.load(path) as arrays:
        assert arrays.files == ["samples"]
        return arrays["samples"]


def test_sample_writes_npz_of_pixels_in_0_1(tmp_path, capsys):
    assert main(["sample", "--n", "5", "--steps", "5", "--sampler", "ddim", "--seed", str(SEED), "--batch-size",
                 str(BATCH), "--out", str(tmp_path / "x.npz"), "--no-progress"]) == 0
    x = _cli_samples(tmp_path / "x.npz")
    assert x.shape == (5, *SHAPE) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    model, scheduler, _ = _setup("ddim")
    expected = distributed.sample(model, SHAPE, scheduler, n=5, seed=SEED, batch_size=BATCH, num_inference_steps=5)
    assert np.array_equal(x, ((expected + 1) / 2).clamp(0, 1).numpy())
    assert "wrote" in capsys.readouterr().out
    # the single-call timing run writes .npz too
    assert main(["sample", "--n", "3", "--steps", "2", "--out", str(tmp_path / "y.npz"), "--no-progress",
                 "--no-reference"]) == 0
    y = _cli_samples(tmp_path / "y.npz")
    assert y.shape == (3, *SHAPE) and 0 <= y.min() and y.max() <= 1 and y.std() > 0.05


@pytest.mark.parametrize("arguments, message", [
    (["--out", "x.jpg"], "--out must end in .png or .npz (a PNG grid, or the samples as a NumPy array), got 'x.jpg'"),
    (["--out", "x.jpg", "--model", "flow"], "--out must end in .png or .npz"),
    (["--shard-size", "4", "--out", "x.npz"], "--shard-size needs --shard-dir"),
    (["--model", "flow", "--batch-size", "4"], "--batch-size, --shard-dir and torchrun need --model ddpm"),
])
def test_sample_refuses_bad_outputs_in_one_line(tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--n", "2", "--no-progress", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m fastgen sample: error: ") and message in err
    assert not os.listdir(tmp_path)


def test_sample_refuses_a_shard_directory_of_another_run_in_one_line(tmp_path, capsys):
    run = ["sample", "--n", "4", "--steps", "2", "--batch-size", "2", "--shard-dir", str(tmp_path / "shards"),
           "--no-progress"]
    assert main([*run, "--out", str(tmp_path / "a.npz")]) == 0
    assert sorted(os.listdir(tmp_path / "shards")) == ["manifest.json", "shard-000000.npz", "shard-000000.npz.sha256"]
    assert main([*run, "--seed", "1", "--out", str(tmp_path / "b.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds shards of another configuration; it differs in seed (1 vs 0)" in err
    assert not (tmp_path / "b.npz").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_rendezvous_is_one_line_and_no_output(tmp_path, capsys, monkeypatch):
    """Launched as rank 0 of 2 whose peer never comes: the rendezvous times out."""
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    assert main(["sample", "--n", "2", "--steps", "1", "--device", "cpu", "--dist-timeout", "2", "--out",
                 str(tmp_path / "x.npz"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank 0 of 2: no rendezvous with the other ranks at 127.0.0.1:" in err
    assert not torch.distributed.is_initialized() and not os.listdir(tmp_path)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="needs torchrun")
def test_torchrun_two_processes_write_the_one_process_samples(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    args = ["sample", "--n", "5", "--steps", "3", "--sampler", "ddpm", "--batch-size", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fastgen", "--", *args,
                           "--out", str(tmp_path / "two.npz")], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 processes on cpu: wrote" in done.stdout
    assert main([*args, "--out", str(tmp_path / "one.npz")]) == 0
    assert np.array_equal(_cli_samples(tmp_path / "two.npz"), _cli_samples(tmp_path / "one.npz"))
