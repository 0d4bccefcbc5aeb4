"""The benchmark harness (bench/, installed as fastgen.bench): the quick CPU smoke run of
``python -m fastgen bench`` and its outputs, the figures derived from the timings, input rotation,
the registration API's checks and NVML telemetry (with a stand-in NVML module). No timed assertion:
only the consistency of the figures is checked, never their size."""
import csv
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from fastgen import cli
from fastgen.bench import harness, registry, report, telemetry
from fastgen.bench.registry import Op, Provider, compiled, fastgen, peer, reference

REPO = Path(__file__).resolve().parents[1]
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m fastgen bench --quick`` in a subprocess: (completed process, output folder). Without
    plots (two PNGs per op and variant take longer than the interpreted runs); test_quick_run_plots
    draws them for a few ops from this run's results."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "fastgen", "bench", "--quick", "--no-plots", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


def _table_rows(stdout, columns=11):
    """The randn rows of the printed table with ``columns`` columns (11: results, 7: summary)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| randn")]
    return [r for r in rows if len(r) == columns]


def test_quick_run_prints_a_row_per_provider_and_the_copy_limit(quick_run):
    proc, _ = quick_run
    rows = _table_rows(proc.stdout)
    randn = registry.OPS["randn"] if "randn" in registry.OPS else registry.load_all()["randn"]
    cases = {(r[2], r[3]) for r in rows}
    assert cases == {(str(s), report.dtype_name(d)) for s in randn.quick_sizes for d in randn.quick_dtypes}
    providers = {r[4] for r in rows}
    fastgen_label = "fastgen" if torch.cuda.is_available() else "fastgen (interpreter)"
    assert providers == {fastgen_label, "reference", "torch.randn", "copy_ (limit)"}
    for r in rows:
        assert float(r[5]) > 0 and float(r[8]) > 0 and r[9].endswith("%")
        if r[4] in ("reference", "torch.randn"):
            assert r[10].endswith("x") and float(r[10][:-1]) > 0
    summary = _table_rows(proc.stdout, columns=7)
    assert {r[3] for r in summary} == {"reference", "torch.randn"} and all(r[4].endswith("x") for r in summary)
    assert "torch.compile(reference) skipped in --quick" in proc.stdout
    assert "No GPU telemetry" in proc.stdout or "Theoretical memory bandwidth" in proc.stdout
    assert "fastgen bench" in proc.stderr  # the progress bar


def _same_case(a, b):
    return all(a[k] == b[k] for k in ("op", "variant", "size", "dtype"))


def test_quick_run_results_json_holds_consistent_figures(quick_run):
    _, out = quick_run
    result = json.loads((out / "results.json").read_text())
    assert result["schema"] == report.SCHEMA and result["quick"] is True and result["ok"] is True
    assert result["machine"]["versions"]["torch"] == torch.__version__
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["python"]
    if not torch.cuda.is_available():
        assert result["gpu"]["available"] is False and "no CUDA" in result["gpu"]["reason"]
    rows = result["results"]
    assert rows and not any("error" in r for r in rows)
    copies = {c["bytes"]: c for c in result["copy"]}
    for r in rows:
        for key in ("median_ms", "p20_ms", "p80_ms", "gbps", "copy_gbps", "fraction_of_copy"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["fraction_of_copy"] == pytest.approx(r["gbps"] / r["copy_gbps"])
        if r["role"] == "copy":
            assert r["bytes"] in copies and r["fraction_of_copy"] == 1.0
            continue
        if r["op"] == "randn":
            assert r["bytes"] == r["size"] * ELEMENT_BYTES[r["dtype"]]  # randn writes n elements, reads nothing
            assert r["shape"] == [r["size"]]
        assert r["reps"] >= 3 and r["first_call_ms"] > 0
        fastgen_row = next(f for f in rows if f["role"] == "fastgen" and _same_case(f, r))
        assert r["fastgen_speedup"] == pytest.approx(r["median_ms"] / fastgen_row["median_ms"])
        if r["role"] != "fastgen":
            assert fastgen_row["speedup_vs"][r["provider"]] == pytest.approx(r["fastgen_speedup"])
    summary = result["summary"]
    assert {(s["dtype"], s["peer"]) for s in summary} == {(r["dtype"], r["provider"]) for r in rows
                                                        if r["role"] in ("reference", "peer")}
    for s in summary:
        speedups = [r["fastgen_speedup"] for r in rows if r["provider"] == s["peer"] and r["dtype"] == s["dtype"]
                    and r["op"] == s["op"] and r["variant"] == s["variant"]]
        assert s["sizes"] == len(speedups) and s["min_speedup"] == min(speedups) and s["max_speedup"] == max(speedups)
        assert s["geomean_speedup"] == pytest.approx(math.prod(speedups) ** (1 / len(speedups)))


def test_quick_run_writes_csv_markdown_and_valid_pngs(quick_run, tmp_path):
    from PIL import Image

    from fastgen.bench import plots

    _, out = quick_run
    result = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["results"]) and float(rows[0]["median_ms"]) > 0
    assert rows[0]["hardware"] and rows[0]["date_utc"] == result["machine"]["date_utc"]
    assert "| randn" in (out / "results.md").read_text() and not list(out.glob("*.png"))  # --no-plots
    some = {**result, "results": [r for r in result["results"] if r["op"] in ("randn", "reparameterize")]}
    files = plots.plot_all(some, str(tmp_path))
    names = ["randn_fwd_gbps.png", "randn_fwd_speedup.png", "reparameterize_fwd_gbps.png",
             "reparameterize_fwd_bwd_gbps.png", "reparameterize_fwd_bwd_speedup.png"]
    assert set(names) <= {os.path.basename(f) for f in files}
    for name in names:
        with Image.open(tmp_path / name) as image:
            image.verify()
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


# The op families of bench_gaussian.py, bench_diffusion.py, bench_latents.py and bench_flows.py: for each op, the
# providers of a CPU quick run and the traffic of each variant as (E, R, T): multiples of one tensor
# of the op's main shape (E), of one per-sample [B] result (R) and of the int64 timesteps [B] (T).
_DIFFUSERS = {"diffusers"} if importlib.util.find_spec("diffusers") else set()
NEW_FAMILIES = {
    "gaussian": {
        "reparameterize": ({"reference", "torch.randn_like"}, {"fwd": (3, 0, 0), "fwd+bwd": (6, 0, 0)}),
        "reparameterize_noise": ({"reference"}, {"fwd": (4, 0, 0), "fwd+bwd": (8, 0, 0)}),
        "gaussian_kl_none": ({"reference"}, {"fwd": (3, 0, 0), "fwd+bwd": (8, 0, 0)}),
        "gaussian_kl_per_sample": ({"reference"}, {"fwd": (2, 1, 0), "fwd+bwd": (6, 2, 0)}),
        "gaussian_kl_prior_none": ({"reference"}, {"fwd": (5, 0, 0), "fwd+bwd": (14, 0, 0)}),
        "gaussian_kl_prior_per_sample": ({"reference"}, {"fwd": (4, 1, 0), "fwd+bwd": (12, 2, 0)}),
        "reparameterize_with_kl": ({"reference", "torch.randn_like"}, {"fwd": (3, 1, 0), "fwd+bwd": (8, 2, 0)}),
    },
    "diffusion": {
        "q_sample": ({"reference"} | _DIFFUSERS, {"fwd": (2, 0, 1)}),
        "ddpm_step": ({"reference"} | _DIFFUSERS, {"fwd": (4, 0, 0)}),
        "ddim_step_eta0": ({"reference"} | _DIFFUSERS, {"fwd": (4, 0, 0)}),
        "ddim_step_eta1": ({"reference"} | _DIFFUSERS, {"fwd": (4, 0, 0)}),
    },
    "latents": {
        "latents": ({"reference", "torch.randn"}, {"fwd": (1, 0, 0)}),
        "latents_truncated": ({"reference", "torch.randn+clamp", "torch.randn resample"}, {"fwd": (1, 0, 0)}),
    },
    "flows": {
        "affine_coupling": ({"reference"}, {"fwd": (4, 1, 0), "fwd+bwd": (9, 2, 0)}),
        "affine_coupling_reverse": ({"reference"}, {"fwd": (4, 1, 0), "fwd+bwd": (11, 2, 0)}),
    },
}


def _expected_shape(family, size):
    if family in ("gaussian", "flows"):
        return [size // 1024, 4, 16, 16]  # [B, 4, 16, 16] latents / activations
    if family == "latents":
        return [size // 512, 512]
    batch = min(16, size // 4096)  # [B, 4, h, w] images, 4096 elements per sample below 16 samples
    return [batch, 4, 32, size // (batch * 4 * 32)] if batch < 16 else None


@pytest.mark.parametrize("family", sorted(NEW_FAMILIES))
def test_quick_run_covers_the_op_families(quick_run, family):
    """Every op of the family: a row per variant x quick size x quick dtype x CPU provider, with the
    documented traffic (the docstrings of bench/bench_<family>.py) and the documented shape."""
    proc, out = quick_run
    result = json.loads((out / "results.json").read_text())
    ops = {name: op for name, op in registry.load_all().items() if op.family == family}
    assert set(ops) == set(NEW_FAMILIES[family])
    rows = [r for r in result["results"] if r["family"] == family]
    assert rows and not any("error" in r for r in rows)
    for name, (peers, traffic) in NEW_FAMILIES[family].items():
        op = ops[name]
        assert set(op.variants) == set(traffic)
        cases = {(r["variant"], r["size"], r["dtype"]) for r in rows if r["op"] == name}
        assert cases == {(v, s, report.dtype_name(d)) for v in op.variants for s in op.quick_sizes
                         for d in op.quick_dtypes}
        for variant, size, dtype in cases:
            case_rows = [r for r in rows if (r["op"], r["variant"], r["size"], r["dtype"]) == (name, variant, size, dtype)]
            assert {r["provider"] for r in case_rows} == {"fastgen", "copy_ (limit)"} | peers
            shape = case_rows[0]["shape"]
            assert math.prod(shape) == size and all(r["shape"] == shape for r in case_rows)
            assert _expected_shape(family, size) in (None, shape)
            e, n_rows = size * ELEMENT_BYTES[dtype], shape[0]
            e_units, r_units, t_units = traffic[variant]
            expected = e_units * e + r_units * n_rows * ELEMENT_BYTES[dtype] + t_units * n_rows * 8
            for r in case_rows:
                if r["role"] != "copy":
                    assert r["bytes"] == expected, (r["op"], r["variant"], r["provider"])
                    assert r["reps"] >= 3 and r["median_ms"] > 0 and r["fastgen_speedup"] > 0
        assert f"{name}: torch.compile(reference) skipped in --quick" in proc.stdout
    table_ops = {line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert set(NEW_FAMILIES[family]) <= table_ops


def test_pytest_collects_the_bench_files():
    """``pytest bench/`` runs the pytest-benchmark tests declared by each bench_<family>.py (once each here)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "--benchmark-disable",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FASTGEN_BENCH_QUICK": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    device = harness.default_device()
    expected = sum(len(op.quick_sizes) * len(op.quick_dtypes) * len(op.variants)
                   * sum(p.runs_on(device, True) and p.role != "compiled" for p in op.providers)
                   for op in registry.load_all().values())  # randn: fastgen, reference, torch.randn; ...
    assert re.search(rf"\b{expected} passed", proc.stdout), proc.stdout


def _bench_samplers():
    from fastgen.bench import bench_samplers

    return bench_samplers


@pytest.mark.parametrize("name", _bench_samplers().SAMPLERS)
def test_bench_samplers_steps_every_sampler_at_its_middle_step(name):
    """bench_samplers.py builds every sampler's providers (fastgen, seed noise where the run draws noise,
    diffusers) at the middle of its run; every call steps that same step (its state restored before
    each) and gives a finite step of the sample's shape."""
    bench = _bench_samplers()
    shape = bench.QUICK_SHAPES[0]
    calls = bench.calls_for(name, shape, torch.device("cpu"))
    assert {"fastgen", "diffusers"} <= set(calls)
    for provider, stepper in calls.items():
        after = []
        for _ in range(2):
            out = stepper()[0]
            assert out.shape == shape and torch.isfinite(out).all(), provider
            scheduler = stepper.scheduler  # diffusers' PNDM counts its calls instead of a step index
            after.append(scheduler.step_index if hasattr(scheduler, "step_index") else scheduler.counter)
        assert after == [after[0]] * 2 and after[0] > 0, provider


# A toy op with a backward pass: y = 2 x. Its "fastgen" provider is plain torch, so it runs anywhere.
def _double_inputs(size, dtype, device, generator):
    return {"x": registry.random_tensor((size,), dtype, device, generator)}


def _toy_op(**kw):
    args = dict(name="double", make_inputs=_double_inputs, sizes=[64], quick_sizes=[64, 256],
                quick_dtypes=[torch.float32], grad_inputs=("x",),
                providers=[Provider("fastgen", lambda x: x * 2, role="fastgen"), reference(lambda x: x + x),
                           peer("mul", lambda x: x.mul(2))])
    args.update(kw)
    return Op(**args)


def test_measure_times_forward_and_backward_variants():
    op = _toy_op()
    cases, _ = report.plan([op], torch.device("cpu"), quick=True)
    assert sorted({(c[1], c[3]) for c in cases}) == [("fwd", 64), ("fwd", 256), ("fwd+bwd", 64), ("fwd+bwd", 256)]
    assert [p.name for p in cases[0][4]] == ["fastgen", "reference", "mul"]
    rows, copies = report.measure(cases, torch.device("cpu"), harness.TimerConfig.quick(), progress=False)
    assert not any("error" in r for r in rows) and len(copies) == 4  # 4 distinct traffic volumes
    for r in rows:
        if r["role"] == "copy":
            continue
        n_bytes = 4 * r["size"]
        # fwd: x read + y written; fwd+bwd adds grad_y read, x read again, grad_x written
        assert r["bytes"] == (2 * n_bytes if r["variant"] == "fwd" else 5 * n_bytes)
        assert r["fastgen_speedup"] > 0 and r["gbps"] > 0
    # without --quick a CPU run leaves out fastgen's Triton kernel (on CPU only interpreted), and says so
    triton_op = _toy_op(providers=[fastgen(lambda x: x * 2), reference(lambda x: x + x)])
    cases, notes = report.plan([triton_op], torch.device("cpu"), quick=False)
    assert [p.name for p in cases[0][4]] == ["reference"]
    assert any("fastgen skipped on CPU" in n for n in notes)


def test_a_provider_failing_while_timed_errs_on_its_own_row():
    """A provider that raises only after its first calls (inside the interleaved timing) gets an error
    row; the providers timed beside it still get their timings."""
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("flaky provider broke")
        return x * 2

    op = _toy_op(providers=[Provider("fastgen", lambda x: x * 2, role="fastgen"), peer("flaky", flaky)],
                 quick_sizes=[64], grad_inputs=())
    cases, _ = report.plan([op], torch.device("cpu"), quick=True)
    rows, _ = report.measure(cases, torch.device("cpu"), harness.TimerConfig.quick(), progress=False)
    by_provider = {r["provider"]: r for r in rows if r["variant"] == "fwd"}
    assert "flaky provider broke" in by_provider["flaky"]["error"] and "median_ms" not in by_provider["flaky"]
    assert "error" not in by_provider["fastgen"] and by_provider["fastgen"]["median_ms"] > 0


def test_compiled_provider_runs_through_torch_compile():
    """The compiled role goes through torch.compile (here its cheap "eager" backend) in both variants."""
    op = _toy_op(providers=[fastgen(lambda x: x * 2),
                            compiled(lambda x: x * 2, compile_options={"backend": "eager"})])
    cases, _ = report.plan([op], torch.device("cpu"), quick=True, providers=["compiled", "fastgen"])
    rows, _ = report.measure(cases, torch.device("cpu"), harness.TimerConfig.quick(), progress=False)
    compiled_rows = [r for r in rows if r["role"] == "compiled"]
    assert len(compiled_rows) == 4 and not any("error" in r for r in rows)
    assert all(r["median_ms"] > 0 and r["fastgen_speedup"] > 0 for r in compiled_rows)


def test_forward_backward_callable_computes_gradients():
    case = harness.Case(_toy_op(), "fwd+bwd", 64, torch.float32, "cpu")
    call = case.callable(case.op.providers[2], n_sets=2)
    y = call()
    x = case.inputs(0)["x"]
    assert torch.equal(y, 2 * x.detach()) and x.grad is not None and bool(x.grad.abs().sum() > 0)
    first_grad = x.grad.clone()
    call(), call()  # back to set 0: its gradient is written afresh, not accumulated
    assert torch.equal(x.grad, first_grad)


def test_inputs_rotate_over_the_sets():
    seen = []
    case = harness.Case(_toy_op(providers=[fastgen(lambda x: seen.append(x.data_ptr()) or x)]),
                        "fwd", 1 << 12, torch.float32, "cpu")
    n_sets = case.n_sets()
    assert n_sets >= 2 and n_sets * case.set_bytes() >= min(2 * harness.CPU_CACHE_BYTES, 8 * case.set_bytes())
    call = case.callable(case.op.providers[0], n_sets)
    for _ in range(2 * n_sets):
        call()
    assert len(set(seen)) == n_sets and seen[:n_sets] == seen[n_sets:]
    assert harness.rotation_sets(0, torch.device("cpu")) == 1  # nothing to rotate for ops that read no tensor


def test_cpu_timer_reports_ordered_quantiles():
    timing = harness.time_call(lambda: torch.ones(100).sum(), torch.device("cpu"), harness.TimerConfig.quick())
    s = timing.summary()
    assert s["reps"] >= 3 and 0 < s["min_ms"] <= s["p20_ms"] <= s["median_ms"] <= s["p80_ms"]
    assert s["first_call_ms"] > 0 and s["method"].startswith("time.perf_counter")



def test_cpu_timer_interleaves_the_calls_of_a_case_in_rounds():
    """A slow and a fast call timed together: every round runs both (the fast one back to back for about
    the slow one's time), so a drift in the machine's speed reaches both alike; the warm-up calls
    come first and are not counted."""
    log = []

    def slow():
        log.append("slow")
        time.sleep(0.004)

    def fast():
        log.append("fast")

    config = harness.TimerConfig(cpu_warmup_s=0.0, cpu_min_reps=4, cpu_min_time_s=0.016, cpu_max_reps=400)
    timings = harness.time_calls({"slow": slow, "fast": fast}, torch.device("cpu"), config, warmup_calls=1)
    assert log[:4] == ["slow", "slow", "fast", "fast"]  # first call + one warm-up each
    timed = log[4:]
    runs = [(name, len(list(group))) for name, group in itertools.groupby(timed)]
    assert [name for name, _ in runs[:8]] == ["slow", "fast"] * 4  # alternating rounds
    assert all(n == 1 for name, n in runs if name == "slow") and all(n > 1 for name, n in runs if name == "fast")
    assert timings["slow"].summary()["reps"] == timed.count("slow") >= 4
    assert timings["fast"].summary()["reps"] == timed.count("fast") <= 400
    assert timings["slow"].summary()["median_ms"] >= 4.0 > timings["fast"].summary()["median_ms"]
    assert "interleaved" in timings["fast"].method

def test_all_zero_inputs_are_refused():
    op = _toy_op(make_inputs=lambda size, dtype, device, generator: {"x": torch.zeros(size, dtype=dtype)})
    with pytest.raises(ValueError, match="all-zero tensor 'x'"):
        harness.Case(op, "fwd", 16, torch.float32, "cpu").inputs(0)


@pytest.mark.parametrize("change, error, match", [
    (dict(providers=[reference(lambda x: x)]), ValueError, "exactly one with role 'fastgen'"),
    (dict(providers=[fastgen(lambda x: x), peer("fastgen", lambda x: x)]), ValueError, "provider names must be unique"),
    (dict(sizes=[0]), ValueError, "sizes must be a non-empty list of positive ints"),
    (dict(quick_sizes=[]), ValueError, "quick_sizes must be"),
    (dict(dtypes=["float32"]), TypeError, "dtypes must be a non-empty list of torch.dtype"),
    (dict(make_inputs=None), TypeError, "make_inputs must be callable"),
])
def test_op_declaration_errors_name_the_field(change, error, match):
    with pytest.raises(error, match=match):
        _toy_op(**change)


def test_provider_declaration_errors_name_the_field():
    with pytest.raises(ValueError, match="role must be one of"):
        Provider("x", lambda: None, role="eager")
    with pytest.raises(ValueError, match="cpu must be"):
        Provider("x", lambda: None, cpu="sometimes")
    with pytest.raises(TypeError, match="fn must be callable"):
        Provider("x", 3)
    assert compiled(lambda: None).role == "compiled" and fastgen(lambda: None).cpu == "quick"


def test_register_names_the_family_after_the_file():
    assert registry.load_all()["randn"].family == "random"
    assert report.select_ops(["random"]) == report.select_ops(["randn"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(ops=["no_such_op"]), "ops must name registered ops"),
    (dict(dtypes=["float64"]), "dtypes must be among"),
    (dict(sizes=["0"]), "sizes must be positive"),
    (dict(sizes=["lots"]), "sizes must be positive element counts"),
    (dict(providers=["nobody"]), "providers must name providers"),
    (dict(device="meta"), "device must be cpu or an available cuda device"),
])
def test_bad_report_arguments_are_named(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        report.run(out=str(tmp_path), quick=True, progress=False, plots=False, echo=lambda line: None, **kwargs)


def test_cli_reports_bad_arguments_with_status_2(capsys, tmp_path):
    assert cli.main(["bench", "--quick", "--ops", "no_such_op", "--out", str(tmp_path / "results")]) == 2
    assert "ops must name registered ops" in capsys.readouterr().err


def test_sizes_parse_like_people_write_them():
    assert [report.parse_size(s) for s in ("4096", "2**20", "1e6", "16M", "4k", 7)] == \
        [4096, 1 << 20, 1_000_000, 16 << 20, 4096, 7]


class _FakeNVML(types.SimpleNamespace):
    """The pynvml calls telemetry makes, answering like an H100 SXM; power usage is 'not supported'."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 2, 0

    def nvmlDeviceGetName(self, h): return b"NVIDIA H100 80GB HBM3"
    def nvmlSystemGetDriverVersion(self): return "550.54.15"
    def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(total=80 << 30)
    def nvmlDeviceGetMaxClockInfo(self, h, kind): return {0: 1980, 2: 2619}[kind]
    def nvmlDeviceGetClockInfo(self, h, kind): return {0: 1755, 2: 2619}[kind]
    def nvmlDeviceGetMemoryBusWidth(self, h): return 5120
    def nvmlDeviceGetEnforcedPowerLimit(self, h): return 700_000
    def nvmlDeviceGetPowerUsage(self, h): raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
    def nvmlDeviceGetTemperature(self, h, sensor): return 41
    def nvmlDeviceGetUtilizationRates(self, h): return types.SimpleNamespace(gpu=97)
    def nvmlDeviceGetCurrentClocksEventReasons(self, h): return 0


def test_nvml_telemetry_and_theoretical_bandwidth():
    nv = _FakeNVML()
    static = telemetry.nvml_static(nv, object())
    assert static["name"] == "NVIDIA H100 80GB HBM3" and static["driver"] == "550.54.15"
    assert static["memory_total_bytes"] == 80 << 30 and static["power_limit_w"] == pytest.approx(700)
    assert static["theoretical_bandwidth_gbs"] == pytest.approx(2619e6 * 2 * 5120 / 8 / 1e9)  # 3352 GB/s
    sample = telemetry.nvml_sample(nv, object())
    assert sample["sm_clock_mhz"] == 1755 and sample["temperature_c"] == 41 and sample["utilization_percent"] == 97
    assert sample["power_w"] is None  # unsupported queries are recorded, not fatal
    assert telemetry.theoretical_bandwidth_gbs(None, 384) is None


def test_cpu_run_says_there_is_no_gpu():
    gpu = telemetry.GPU("cpu")
    assert gpu.static() == {"available": False, "reason": "no CUDA device: CPU run"} and gpu.sample() == {}
