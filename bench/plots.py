"""PNG plots of a results dict (matplotlib, no display needed): per op and variant,
``<op>_<variant>_gbps.png`` (GB/s vs size, one panel per dtype, the copy bandwidth dashed and the
theoretical bandwidth dotted) and ``<op>_<variant>_speedup.png`` (fastgen's speedup over each peer)."""
import os
import re

from fastgen._files import atomic_write


DTYPE_ORDER = ["float32", "float16", "bfloat16"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _series(rows, key):
    """{provider: ([sizes], [values])} sorted by size, rows without ``key`` left out."""
    series = {}
    for r in sorted(rows, key=lambda r: r["size"]):
        if r.get(key) is not None:
            xs, ys = series.setdefault(r["provider"], ([], []))
            xs.append(r["size"])
            ys.append(r[key])
    return series


def _panels(plt, path, dtypes, title, draw):
    """A figure with one panel per dtype, ``draw(ax, dtype)`` filling each (log2 size axis, grid and
    legend added here), saved to ``path`` as a PNG, atomically; returns the path."""
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        draw(ax, dtype)
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_all(result, out_dir) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if "error" not in r]
    device = result["gpu"].get("name") or result["gpu"].get("torch_name") or result["machine"]["cpu"]
    if any(r.get("interpreted") for r in rows):
        device += " (fastgen in the Triton interpreter: a smoke test, not performance)"
    peak = result["gpu"].get("theoretical_bandwidth_gbs")
    files = []
    for op, variant in sorted({(r["op"], r["variant"]) for r in rows}):
        mine = [r for r in rows if r["op"] == op and r["variant"] == variant]
        dtypes = sorted({r["dtype"] for r in mine}, key=lambda d: (DTYPE_ORDER.index(d) if d in DTYPE_ORDER else 9, d))

        def bandwidth(ax, dtype):
            for provider, (xs, ys) in _series([r for r in mine if r["dtype"] == dtype], "gbps").items():
                is_copy = provider.startswith("copy_")
                style = dict(color="black", linestyle="--", marker="") if is_copy else dict(marker="o")
                ax.plot(xs, ys, label=provider, **style)
            if peak:
                ax.axhline(peak, color="red", linestyle=":", label=f"theoretical {peak:.0f} GB/s")
            ax.set(xlabel="elements", ylabel="GB/s", title=f"{op} {variant} {dtype}")

        files.append(_panels(plt, os.path.join(out_dir, f"{_slug(op)}_{_slug(variant)}_gbps.png"), dtypes,
                             f"fastgen {op} ({variant}) on {device}", bandwidth))

        peers = [r for r in mine if r["role"] not in ("fastgen", "copy") and r.get("fastgen_speedup") is not None]
        if not peers:
            continue  # no fastgen row ran (CPU without --quick): nothing to compare

        def speedup(ax, dtype):
            for provider, (xs, ys) in _series([r for r in peers if r["dtype"] == dtype], "fastgen_speedup").items():
                ax.plot(xs, ys, marker="o", label=f"vs {provider}")
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
            ax.set(yscale="log", xlabel="elements", ylabel="speedup (peer time / fastgen time)",
                   title=f"{op} {variant} {dtype}")

        files.append(_panels(plt, os.path.join(out_dir, f"{_slug(op)}_{_slug(variant)}_speedup.png"), dtypes,
                             f"fastgen {op} ({variant}) speedup on {device}", speedup))
    return files
