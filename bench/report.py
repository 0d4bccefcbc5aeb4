"""The report runner behind ``python -m fastgen bench``: every registered op x variant x dtype x size x
provider, each beside the copy bandwidth of the same traffic, then a table, results.json,
results.csv, results.md and PNG plots.

Row figures: median time with its 20th-80th percentile spread, bytes moved, GB/s, the fraction of
the device-to-device copy bandwidth at the same traffic (the achievable limit), and fastgen's
speedup over that row's provider (peer median / fastgen median; > 1 means fastgen is faster).
"""
import csv
import json
import math
import os
import sys
import time

import torch

from fastgen._files import atomic_write, prepare_output
from fastgen._table import markdown_table
from fastgen.bench import harness, registry, telemetry

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
COPY = "copy_ (limit)"
SCHEMA = 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtypes(names):
    if names is None:
        return None
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise ValueError(f"dtypes must be among {sorted(DTYPES)}, got {unknown}")
    return [DTYPES[n] for n in names]


def parse_size(text) -> int:
    """An element count: 4096, 2**20, 1e6, 4k, 16M (k, M, G: powers of 2^10)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip()
        try:
            if "**" in s:
                base, exp = s.split("**")
                value = int(base) ** int(exp)
            elif s[-1:] in "kKmMgG" and s[:-1].isdigit():
                value = int(s[:-1]) << {"k": 10, "m": 20, "g": 30}[s[-1].lower()]
            else:
                number = float(s)
                if number != int(number):
                    raise ValueError
                value = int(number)
        except (ValueError, IndexError):
            raise ValueError("sizes must be positive element counts like 4096, 2**20, 1e6 or 16M, "
                             f"got {text!r}") from None
    if value <= 0:
        raise ValueError(f"sizes must be positive element counts, got {text!r}")
    return value


def select_ops(names):
    """The registered ops named (by op or by family) in ``names``; all when None."""
    ops = registry.load_all()
    if not names:
        return list(ops.values())
    families = {op.family for op in ops.values()}
    unknown = sorted(set(names) - set(ops) - families)
    if unknown:
        raise ValueError(f"ops must name registered ops {sorted(ops)} or families {sorted(families)}, got {unknown}")
    return [op for op in ops.values() if op.name in names or op.family in names]


def plan(ops, device, *, quick, sizes=None, dtypes=None, providers=None):
    """(cases, notes): the (op, variant, dtype, size, providers) to run and why anything was left out."""
    notes, cases = [], []
    if providers:
        known = {p.name for op in ops for p in op.providers} | set(registry.ROLES)
        unknown = sorted(set(providers) - known)
        if unknown:
            raise ValueError(f"providers must name providers {sorted(known - set(registry.ROLES))} "
                             f"or roles {list(registry.ROLES)}, got {unknown}")
    for op in ops:
        chosen = []
        for p in op.providers:
            if providers and p.name not in providers and p.role not in providers:
                continue
            if not p.runs_on(device, quick):
                notes.append(f"{op.name}: {p.name} skipped on CPU" + (f" ({p.note})" if p.note else "")
                             + ("; it runs in --quick under the Triton interpreter" if p.cpu == "quick" else ""))
                continue
            if p.role == "compiled" and quick and not providers:
                notes.append(f"{op.name}: {p.name} skipped in --quick (compiling takes minutes on CPU); "
                             f"name it with --providers to include it")
                continue
            if p.cpu == "quick" and device.type == "cpu":
                notes.append(f"{op.name}: {p.name} on CPU runs in the Triton interpreter: its times test the "
                             "harness, they are not performance")
            chosen.append(p)
        if chosen and not any(p.role == "fastgen" for p in chosen):
            notes.append(f"{op.name}: no fastgen row here, so no speedups")
        op_dtypes = dtypes or (op.quick_dtypes if quick else op.dtypes)
        skipped = [d for d in op_dtypes if d not in op.dtypes]
        if skipped:
            notes.append(f"{op.name}: dtypes {[dtype_name(d) for d in skipped]} not declared by the op, skipped")
        op_sizes = sizes or (op.quick_sizes if quick else op.sizes)
        for variant in op.variants:
            for dtype in [d for d in op_dtypes if d in op.dtypes]:
                for size in op_sizes:
                    if chosen:
                        cases.append((op, variant, dtype, size, chosen))
    return cases, notes


def _gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else None


def measure(cases, device, config, *, progress=True):
    """Run every case; returns (rows, copies). Errors of one provider become a row with "error"."""
    from tqdm.auto import tqdm

    total = sum(len(c[4]) + 1 for c in cases)
    rows, copies = [], {}
    with tqdm(total=total, desc="fastgen bench", unit="run", disable=not progress, file=sys.stderr) as bar:
        for op, variant, dtype, size, providers in cases:
            case = harness.Case(op, variant, size, dtype, device)
            base = {"op": op.name, "family": op.family, "variant": variant, "size": size,
                    "dtype": dtype_name(dtype), "device": str(device)}
            try:
                base["shape"] = list(case.shape)
                n_sets = min(case.n_sets(), config.max_input_sets)
            except Exception as e:  # the op's make_inputs failed: one error row for the case
                rows.append({**base, "provider": "(inputs)", "role": "error", "error": f"{type(e).__name__}: {e}"})
                bar.update(len(providers) + 1)
                continue
            case_rows, nbytes, calls = [], None, {}
            for p in providers:  # each called once: bytes, finiteness, errors
                bar.set_postfix_str(f"{op.name} {variant} {base['dtype']} {size} {p.name}", refresh=False)
                row = {**base, "provider": p.name, "role": p.role}
                if p.cpu == "quick" and device.type == "cpu":
                    row["interpreted"] = True  # Triton interpreter: tests the harness, not the kernel's speed
                try:
                    call = case.callable(p, n_sets)
                    outputs = call()
                    if nbytes is None:
                        nbytes = case.bytes_moved(outputs)
                    if not harness.all_finite(outputs):
                        raise RuntimeError("non-finite outputs")
                    calls[len(case_rows)] = call
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                case_rows.append(row)
            grads = case.grad_tensors() if variant == "fwd+bwd" else None
            try:  # together: on a CPU in rounds, so the providers of a case see the same machine
                timings = harness.time_calls(calls, device, config, input_sets=n_sets, grad_to_none=grads)
            except Exception:  # one failed while timed: each alone, so the error lands on its own row
                timings = {}
                for i, call in calls.items():
                    try:
                        timings[i] = harness.time_call(call, device, config, input_sets=n_sets, grad_to_none=grads)
                    except Exception as e:
                        case_rows[i]["error"] = f"{type(e).__name__}: {e}"
            for i, timing in timings.items():
                case_rows[i].update(timing.summary(), bytes=nbytes)
            bar.update(len(providers))
            if nbytes is not None:
                if nbytes not in copies:
                    bar.set_postfix_str(f"copy_ {nbytes} B", refresh=False)
                    call, copy_bytes, sets = harness.copy_callable(nbytes, device)
                    timing = harness.time_call(call, device, config, input_sets=sets)
                    copies[nbytes] = {"bytes": copy_bytes, **timing.summary()}
                    copies[nbytes]["gbps"] = _gbps(copy_bytes, copies[nbytes]["median_ms"])
                copy = copies[nbytes]
                fastgen_row = next((r for r in case_rows if r["role"] == "fastgen" and "error" not in r), None)
                for row in case_rows:
                    if "error" in row:
                        continue
                    row["gbps"] = _gbps(row["bytes"], row["median_ms"])
                    row["copy_gbps"] = copy["gbps"]
                    row["fraction_of_copy"] = row["gbps"] / copy["gbps"] if copy["gbps"] else None
                    if fastgen_row is not None:
                        row["fastgen_speedup"] = row["median_ms"] / fastgen_row["median_ms"]
                if fastgen_row is not None:
                    fastgen_row["speedup_vs"] = {r["provider"]: r["fastgen_speedup"] for r in case_rows
                                                 if r is not fastgen_row and "fastgen_speedup" in r}
                case_rows.append({**base, "provider": COPY, "role": "copy", "bytes": copy["bytes"],
                                  "median_ms": copy["median_ms"], "p20_ms": copy["p20_ms"],
                                  "p80_ms": copy["p80_ms"], "gbps": copy["gbps"], "copy_gbps": copy["gbps"],
                                  "fraction_of_copy": 1.0})
            bar.update(1)
            rows.extend(case_rows)
    return rows, sorted(copies.values(), key=lambda c: c["bytes"])


def _us(ms):
    us = ms * 1e3
    return f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def _bytes(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def table(rows) -> str:
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["op"], r["variant"], "x".join(map(str, r.get("shape", []))), r["dtype"], r["provider"],
                         "ERROR", r["error"][:60], "", "", "", ""])
            continue
        speedup = ""
        if r["role"] == "fastgen":
            speedup = "-"
        elif r.get("fastgen_speedup") is not None:
            speedup = f"{r['fastgen_speedup']:.3g}x"
        provider = r["provider"] + (" (interpreter)" if r.get("interpreted") else "")
        body.append([r["op"], r["variant"], "x".join(map(str, r["shape"])), r["dtype"], provider,
                     _us(r["median_ms"]), f"{_us(r['p20_ms'])}-{_us(r['p80_ms'])}", _bytes(r["bytes"]),
                     f"{r['gbps']:.3g}", f"{100 * r['fraction_of_copy']:.3g}%", speedup])
    return markdown_table(["op", "variant", "shape", "dtype", "provider", "median us", "p20-p80 us", "bytes",
                           "GB/s", "of copy", "fastgen speedup"], body)


def summarize(rows) -> list:
    """Per op, variant, dtype and peer: the geometric mean, min and max of fastgen's speedup over the
    sizes, and fastgen's best fraction of the copy bandwidth."""
    groups = {}
    for r in rows:
        if r.get("fastgen_speedup") is not None and r["role"] not in ("fastgen", "copy"):
            groups.setdefault((r["op"], r["variant"], r["dtype"], r["provider"]), []).append(r["fastgen_speedup"])
    best = {}
    for r in rows:
        if r["role"] == "fastgen" and r.get("fraction_of_copy") is not None:
            key = (r["op"], r["variant"], r["dtype"])
            best[key] = max(best.get(key, 0.0), r["fraction_of_copy"])
    return [{"op": op, "variant": variant, "dtype": dtype, "peer": peer, "sizes": len(values),
             "geomean_speedup": math.exp(sum(map(math.log, values)) / len(values)),
             "min_speedup": min(values), "max_speedup": max(values),
             "fastgen_best_fraction_of_copy": best.get((op, variant, dtype))}
            for (op, variant, dtype, peer), values in groups.items()]


def summary_table(summary) -> str:
    return markdown_table(
        ["op", "variant", "dtype", "fastgen vs", "geomean speedup", "min-max", "fastgen best of copy"],
        [[s["op"], s["variant"], s["dtype"], s["peer"], f"{s['geomean_speedup']:.3g}x",
          f"{s['min_speedup']:.3g}x-{s['max_speedup']:.3g}x",
          f"{100 * s['fastgen_best_fraction_of_copy']:.3g}%" if s["fastgen_best_fraction_of_copy"] else ""]
         for s in summary])


CSV_FIELDS = ["op", "family", "variant", "shape", "size", "dtype", "device", "provider", "role", "median_ms",
              "p20_ms", "p80_ms", "min_ms", "mean_ms", "reps", "first_call_ms", "input_sets", "bytes", "gbps",
              "copy_gbps", "fraction_of_copy", "fraction_of_theoretical", "fastgen_speedup", "error", "hardware",
              "date_utc", "git_commit"]


def _finite_or_none(obj):
    """JSON has no NaN/inf: replace them by None (null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def header(result) -> list:
    gpu, m = result["gpu"], result["machine"]
    device = result["device"]
    where = (f"{gpu.get('name') or gpu.get('torch_name')} ({device})" if device.startswith("cuda")
             else f"CPU {m['cpu']} ({m['cpu_count']} cores)")
    lines = [f"fastgen bench on {where}: torch {m['versions']['torch']}, triton {m['versions']['triton']}"
             + (", quick smoke run" if result["quick"] else "")]
    if not gpu["available"]:
        lines.append(f"No GPU telemetry: {gpu['reason']}. CPU providers only; real numbers come from GPU runs.")
    elif gpu.get("theoretical_bandwidth_gbs"):
        lines.append(f"Theoretical memory bandwidth {gpu['theoretical_bandwidth_gbs']:.0f} GB/s "
                     f"({gpu['max_memory_clock_mhz']} MHz x 2 x {gpu['memory_bus_width_bits']} bit); "
                     f"driver {gpu['driver']}")
    return lines


def write_outputs(result, out_dir, *, plots=True) -> list:
    """results.json, results.csv, results.md (and the PNG plots) in ``out_dir``, each written atomically;
    returns their paths."""
    prepare_output(out_dir, folder=True, name="out")
    files = []
    path = os.path.join(out_dir, "results.json")
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(_finite_or_none(result), f, indent=1)
    files.append(path)
    path = os.path.join(out_dir, "results.csv")
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        m = result["machine"]
        run = {"hardware": result["gpu"].get("name") or result["gpu"].get("torch_name") or m["cpu"],
               "date_utc": m["date_utc"], "git_commit": m["git_commit"]}
        for r in result["results"]:
            writer.writerow({**r, **run, "shape": "x".join(map(str, r.get("shape", [])))})
    files.append(path)
    path = os.path.join(out_dir, "results.md")
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("# " + "\n\n".join(header(result)) + "\n\n")
        f.write(table(result["results"]) + "\n\n")
        if result["summary"]:
            f.write(summary_table(result["summary"]) + "\n\n")
        f.write("".join(f"- {n}\n" for n in result["notes"]))
        f.write(f"\nGPU before/after: {json.dumps(result['gpu_before'])} / {json.dumps(result['gpu_after'])}\n")
    files.append(path)
    if plots:
        from fastgen.bench import plots as plotting

        files += plotting.plot_all(result, out_dir)
    return files


def run(ops=None, sizes=None, dtypes=None, providers=None, device=None, out="bench-results", quick=False,
        progress=True, plots=True, echo=print) -> dict:
    """Benchmark, print the table, write the files; returns the results dict (``result["ok"]``: no errors).
    The output folder ``out`` is checked (created if missing, writable, not a file) before anything is timed."""
    device = torch.device(device) if device is not None else harness.default_device()
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"device must be cpu or an available cuda device, got {device}")
    sizes = [parse_size(s) for s in sizes] if sizes else None
    dtypes = parse_dtypes(dtypes)
    selected = select_ops(ops)
    cases, notes = plan(selected, device, quick=quick, sizes=sizes, dtypes=dtypes, providers=providers)
    if not cases:
        raise ValueError("nothing to run: no op has a provider that runs here with these options")
    prepare_output(out, folder=True, name="out")
    gpu = telemetry.GPU(device)
    result = {"schema": SCHEMA, "quick": quick, "device": str(device), "argv": sys.argv,
              "machine": telemetry.machine(), "gpu": gpu.static(), "gpu_before": gpu.sample()}
    config = harness.TimerConfig.quick() if quick else harness.TimerConfig()
    result["timer"] = vars(config)
    start = time.perf_counter()
    rows, copies = measure(cases, device, config, progress=progress)
    result.update(wall_s=time.perf_counter() - start, gpu_after=gpu.sample(), results=rows, copy=copies)
    peak = result["gpu"].get("theoretical_bandwidth_gbs")
    for row in rows:
        if peak and row.get("gbps") is not None:
            row["fraction_of_theoretical"] = row["gbps"] / peak
    result["summary"] = summarize(rows)
    gpu.close()
    result["notes"] = sorted(set(notes), key=notes.index)
    result["ok"] = not any("error" in r for r in rows)
    result["files"] = write_outputs(result, out, plots=plots)
    for line in header(result):
        echo(line)
    echo(table(rows))
    if result["summary"]:
        echo(summary_table(result["summary"]))
    for n in result["notes"]:
        echo(f"note: {n}")
    echo(f"{len(rows)} rows in {result['wall_s']:.1f}s; wrote {', '.join(result['files'])}")
    return result
