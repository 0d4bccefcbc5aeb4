"""Validate every kernel against its torch reference on one device and tabulate the result.

Each op family registers a check: a function (device, quick) -> rows of Case results. The kernel
runs with outputs poisoned (NaN) so an unwritten element fails; the reference runs in float64 on
the CPU, so a GPU result is also checked against a different device.
"""
import dataclasses
import itertools
import math
import time

import torch

from fastgen import testing
from fastgen._alloc import poisoned_outputs
from fastgen._table import markdown_table

CHECKS = {}


@dataclasses.dataclass
class Case:
    op: str
    case: str
    dtype: str
    result: testing.Comparison


def check(name):
    """Register ``fn(device, quick) -> list[Case]`` as the validation of op family ``name``."""
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


def _kernel_case(op, case, dtype, run, expected) -> Case:
    """A kernel's output (``run()``, outputs poisoned) compared with its float64 reference ``expected``."""
    with poisoned_outputs():
        actual = run()
    return Case(op, case, str(dtype).removeprefix("torch."), testing.compare(actual, expected, dtype=dtype))


@check("randn")
def _check_randn(device, quick):
    from fastgen.kernels import random as k_random
    from fastgen.ops import randn
    from fastgen.reference import random as ref

    cases = []
    seed = 0x9E3779B97F4A7C15  # above 2^63: exercises the full 64-bit key
    blocks = torch.empty(4099, 4, dtype=torch.int32, device=device)
    k_random.philox_bits(blocks, seed, 7, (1 << 32) - 2048)  # counter crosses 2^32
    expected = torch.stack(ref.philox_blocks(seed, 7, torch.arange((1 << 32) - 2048, (1 << 32) + 2051)), 1)
    exact = testing.compare_exact(blocks.long() & ref.MASK32, expected)
    cases.append(Case("philox4x32", "4099 blocks x 4 words, bit-exact", "uint32", exact))
    shapes = ([(1,), (7, 129), (5, 123, 123), (2, 3, 16, 16)] if quick
              else [(1,), (3, 5), (7, 129), (5, 123, 123), (16, 7, 57, 32, 29)])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in shapes:
            offset, stream = 4 * len(shape) + 1, len(shape)  # offset in rows; the reference counts elements
            cases.append(_kernel_case(
                "randn", f"{tuple(shape)} offset={offset} stream={stream}", dtype,
                lambda: randn(shape, seed=seed, stream=stream, offset=offset, device=device, dtype=dtype,
                              backend="triton"),
                ref.randn(shape, seed=seed, stream=stream, offset=offset * math.prod(shape[1:]),
                          dtype=torch.float64)))
    return cases


@check("latents")
def _check_latents(device, quick):
    from fastgen.ops import latents
    from fastgen.reference import latents as ref

    cases = []
    seed = 0x9E3779B97F4A7C15
    sizes = [(1, 1), (37, 19), (512, 128)] if quick else [(1, 1), (3, 5), (37, 19), (512, 128), (4096, 512)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for truncation in (None, 0.5, 2.0):
            for n, dim in sizes:
                offset = n + 1
                cases.append(_kernel_case(
                    "latents", f"({n}, {dim}) offset={offset} truncation={truncation}", dtype,
                    lambda: latents(n, dim, seed=seed, offset=offset, truncation=truncation, device=device,
                                    dtype=dtype, backend="triton"),
                    ref.latents(n, dim, seed=seed, offset=offset, truncation=truncation, dtype=torch.float64)))
    return cases


@check("gaussian")
def _check_gaussian(device, quick):
    from fastgen import ops
    from fastgen.reference import gaussian as ref
    from fastgen.reference import random as ref_random

    cases = []
    seed, offset = 0x9E3779B97F4A7C15, 3  # in rows of mu; the reference noise counts elements
    shapes = ([(1,), (7, 129), (5, 33, 37), (8, 16, 16)] if quick
              else [(1,), (3, 5), (7, 129), (5, 123, 123), (16, 7, 57, 32, 29)])
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for shape in shapes:
            mu64, logvar64, mu2_64 = (torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(3))
            logvar64 = 0.5 * logvar64
            mu64, logvar64, mu2_64 = (t.to(dtype).double() for t in (mu64, logvar64, mu2_64))  # representable
            mu, logvar, mu2 = (t.to(device, dtype).requires_grad_() for t in (mu64, logvar64, mu2_64))
            eps = ref_random.randn(shape, seed=seed, offset=offset * math.prod(shape[1:]), dtype=torch.float64)
            label = f"{tuple(shape)}"

            def add(op, case, actual, expected):
                cases.append(Case(op, f"{label} {case}".strip(), name, testing.compare(actual, expected, dtype=dtype)))

            with poisoned_outputs():
                z = ops.reparameterize(mu, logvar, seed=seed, offset=offset, backend="triton")
                g_mu, g_logvar = torch.autograd.grad(z, (mu, logvar), torch.ones_like(z))
            leaves = [t.clone().requires_grad_() for t in (mu64, logvar64)]
            z64 = ref.reparameterize(*leaves, eps)
            r_mu, r_logvar = torch.autograd.grad(z64, leaves, torch.ones_like(z64))
            add("reparameterize", f"offset={offset}", z, z64)
            add("reparameterize", "grad logvar", g_logvar, r_logvar)
            for reduction in ("none", "per_sample", "sum", "batchmean"):
                with poisoned_outputs():
                    kl = ops.gaussian_kl(mu, logvar, reduction=reduction, backend="triton")
                add("gaussian_kl", reduction, kl, ref.reduce(ref.gaussian_kl(mu64, logvar64), reduction))
            prior = mu2[0] if len(shape) > 1 else mu2
            with poisoned_outputs():
                kl = ops.gaussian_kl(mu, logvar, prior, logvar, backend="triton")
                grads = torch.autograd.grad(kl, (mu, logvar), torch.ones_like(kl))
            leaves = [t.clone().requires_grad_() for t in (mu64, logvar64)]
            kl64 = ref.reduce(ref.gaussian_kl(leaves[0], leaves[1], mu2_64[0] if len(shape) > 1 else mu2_64,
                                              leaves[1]), "per_sample")
            ref_grads = torch.autograd.grad(kl64, leaves, torch.ones_like(kl64))
            add("gaussian_kl", "prior mu2=mu2[0], logvar2=logvar", kl, kl64)
            add("gaussian_kl", "prior: grad mu", grads[0], ref_grads[0])
            add("gaussian_kl", "prior: grad logvar", grads[1], ref_grads[1])
            with poisoned_outputs():
                z, kl = ops.reparameterize_with_kl(mu, logvar, seed=seed, offset=offset, backend="triton")
            z64, kl64 = ref.reparameterize_with_kl(mu64, logvar64, eps)
            add("reparameterize_with_kl", "z", z, z64)
            add("reparameterize_with_kl", "kl", kl, kl64)
    return cases


@check("flows")
def _check_flows(device, quick):
    """The fused affine coupling, forward and reverse: (y, logdet) and the gradients of x, log_scale, shift."""
    from fastgen.ops.flows import affine_coupling
    from fastgen.reference import flows as ref

    shapes = [(1,), (5, 3, 7), (16, 4, 4, 4)] if quick else [(1,), (3, 5), (5, 3, 7), (16, 4, 4, 4), (64, 2, 57, 31)]
    gen = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for shape in shapes:
            x64, s64, t64, g64 = (torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype).double()
                                  for _ in range(4))
            s64 = (0.5 * s64).to(dtype).double()
            gl64 = torch.randn(shape[:1], dtype=torch.float64, generator=gen).to(dtype).double()
            for reverse in (False, True):
                leaves = [t.to(device, dtype).requires_grad_() for t in (x64, s64, t64)]
                with poisoned_outputs():
                    y, logdet = affine_coupling(*leaves, reverse=reverse, backend="triton")
                    grads = torch.autograd.grad((y, logdet), leaves, (g64.to(device, dtype), gl64.to(device, dtype)))
                leaves64 = [t.clone().requires_grad_() for t in (x64, s64, t64)]
                y64, logdet64 = (ref.affine_coupling_inverse if reverse else ref.affine_coupling)(*leaves64)
                grads64 = torch.autograd.grad((y64, logdet64), leaves64, (g64, gl64))
                label = f"{tuple(shape)} {'reverse' if reverse else 'forward'}"
                for what, actual, expected in (("y", y, y64), ("logdet", logdet, logdet64),
                                               *zip(("grad x", "grad log_scale", "grad shift"), grads, grads64)):
                    cases.append(Case("affine_coupling", f"{label} {what}", name,
                                      testing.compare(actual, expected, dtype=dtype)))
    return cases


@check("samplers")
def _check_samplers(device, quick):
    """The sigma-space samplers' step (kernels/samplers.py): random affine rows against the map itself,
    then every registered sampler (its diffusers default config) step by step against its own float64
    reference, with counter noise and with fused classifier-free guidance."""
    from fastgen.ops.samplers import COLUMNS, HISTORY_COLUMNS, affine_table, sampler_step
    from fastgen.sampling import SCHEDULERS, _sigma_tables, make_scheduler
    from fastgen.schedulers._sigma import step_table

    seed, offset, w = 0x9E3779B97F4A7C15, 2, 3.0
    shapes = [(3, 2, 5, 7), (2, 4, 16, 16)] if quick else [(3, 2, 5, 7), (4, 3, 32, 32)]
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, len(COLUMNS), generator=g, dtype=torch.float64)
    for k, name in enumerate(HISTORY_COLUMNS, start=1):  # step i reads its i previous denoised outputs
        rows[:k, COLUMNS.index(name)] = 0.0
    rows[0, COLUMNS.index("noise_prev")] = 0.0  # and from step 1 on the previous step's noise again
    tables = {"affine rows": affine_table(rows)}
    registered = _sigma_tables()
    for kind, (name, _) in SCHEDULERS.items():
        if name in registered:
            scheduler = make_scheduler(kind)
            scheduler.set_timesteps(4 if quick else 10)
            tables[kind] = step_table(scheduler)
    cases = []
    for (label, table), shape in itertools.product(tables.items(), shapes):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else testing.tolerance(dtype)
            fp32_ulp = 2.0 ** -23
            x = (table.init_noise_sigma * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)
            kept = None  # the kernel's last denoised outputs: D', or the ring of the last H
            if table.reads_previous:
                kept = torch.zeros(shape if table.history == 1 else (table.history, *shape), dtype=dtype,
                                   device=device)
            for i in range(table.num_steps):
                kept_reference = None if kept is None else kept.cpu().clone()  # one step from the same inputs
                guidance = w if i % 2 else None
                m = torch.randn((2 * shape[0], *shape[1:]) if guidance else shape, generator=g, dtype=torch.float64)
                m = m.to(device, dtype)
                kwargs = dict(seed=seed, offset=offset, guidance_scale=guidance)
                # the affine map's terms may be far larger than its result (x0 = x / alpha - ... at high
                # noise; DEIS's eps = (x - alpha x0) / sigma): the kernel computes in fp32 whatever the
                # storage dtype and rounds each term, so the absolute error scales with the largest of them
                terms = float(table.coefficients[i].abs().max()) * (float(x.abs().max()) + float(m.abs().max()))
                step_atol = max(atol, 4 * fp32_ulp * terms)
                with poisoned_outputs():
                    out, denoised = sampler_step(table, i, m, x, backend="triton", prev_denoised=kept,
                                                 denoised_out=kept, **kwargs)
                want, want_denoised = sampler_step(table, i, m.cpu(), x.cpu(), backend="reference",
                                                   prev_denoised=kept_reference, denoised_out=kept_reference, **kwargs)
                case = f"{label} {shape} step {i}{' guided' if guidance else ''}"
                cases.append(Case("sampler_step", case, name,
                                  testing.compare(out, want.double(), dtype=dtype, rtol=rtol, atol=step_atol)))
                cases.append(Case("sampler_step", f"{case} denoised", name,
                                  testing.compare(denoised, want_denoised.double(), dtype=dtype, rtol=rtol,
                                                  atol=step_atol)))
                x = out
    return cases


# Every family's quick shapes include one whose sizes are multiples of 16, as real images and latents
# are: `python -m fastgen bench --static --quick` compiles the variants those get (vector accesses).


def run(device=None, quick=False, ops=None, out=print) -> bool:
    """Run the registered checks (all, or those named in ``ops``) and print one table; True if all pass."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = sorted(set(ops or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"ops must name registered checks {sorted(CHECKS)}, got unknown {unknown}")
    start = time.perf_counter()
    rows, failures = [], []
    for name, fn in CHECKS.items():
        if ops and name not in ops:
            continue
        for c in fn(device, quick):
            r = c.result
            rows.append([c.op, c.case, c.dtype, f"{r.max_abs_err:.2e}", f"{r.max_rel_err:.2e}",
                         f"{r.worst_ratio:.2f}", r.n_nonfinite_mismatch, "PASS" if r.ok else "FAIL"])
            if not r.ok:
                failures.append(f"{c.op} {c.case} {c.dtype}:\n{r.describe()}")
    out(f"fastgen validate: Triton kernels vs float64 torch reference on {device}"
        + (" (Triton interpreter)" if device.type == "cpu" else ""))
    out(markdown_table(["op", "case", "dtype", "max abs err", "max rel err", "err/tol", "NaN/inf mismatch",
                        "status"], rows))
    for f in failures:
        out(f)
    out(f"{len(rows) - len(failures)}/{len(rows)} cases pass in {time.perf_counter() - start:.1f}s")
    return not failures


@check("diffusion")
def _check_diffusion(device, quick):
    from fastgen.ops import ddim_step, ddpm_step, q_sample
    from fastgen.reference import diffusion as ref
    from fastgen.schedules import NoiseSchedule

    schedule = NoiseSchedule()
    seed, offset = 0x9E3779B97F4A7C15, 7  # in samples; the reference counts elements (offset * n)
    shapes = [(3, 2, 5, 7), (2, 3, 16, 16)] if quick else [(3, 2, 5, 7), (4, 3, 32, 32), (2, 4, 57, 31)]
    ddpm_variants = [dict(prediction_type="epsilon", variance_type="fixed_small"),
                     dict(prediction_type="v_prediction", variance_type="learned_range", thresholding=True,
                          dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
                     dict(prediction_type="sample", variance_type="fixed_large", clip_sample=False)]
    g = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for shape in shapes:
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            eps = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            frac = torch.rand(shape, generator=g, dtype=torch.float64).mul(2).sub(1).to(device=device, dtype=dtype)
            t = torch.arange(shape[0], device=device) * 331 % 1000
            with poisoned_outputs():
                x_t = q_sample(x, t, schedule, seed=seed, offset=offset, backend="triton")
            start = offset * math.prod(shape[1:])
            expected = ref.q_sample(x.cpu(), t.cpu(), schedule, ref.noise_like(shape, t.cpu(), seed=seed, offset=start))
            cases.append(Case("q_sample", f"{shape} per-sample t", name, testing.compare(x_t, expected, dtype=dtype)))
            for kwargs in ddpm_variants:
                learned = kwargs["variance_type"].startswith("learned")
                out = torch.cat([eps, frac], 1) if learned else eps
                with poisoned_outputs():
                    prev, x0 = ddpm_step(out, t, x, schedule, seed=seed, offset=offset, backend="triton", **kwargs)
                prev_ref, x0_ref = ref.ddpm_step(out.cpu(), t.cpu(), x.cpu(), schedule, seed=seed, offset=start,
                                                 **kwargs)
                label = f"{shape} {kwargs['prediction_type']}/{kwargs['variance_type']}" + (
                    " threshold" if kwargs.get("thresholding") else "")
                cases.append(Case("ddpm_step", label, name, testing.compare(prev, prev_ref, dtype=dtype)))
                cases.append(Case("ddpm_step x0", label, name, testing.compare(x0, x0_ref, dtype=dtype)))
            with poisoned_outputs():
                prev, _ = ddim_step(eps, t, (t - 20).clamp_min(-1), x, schedule, eta=1.0, seed=seed, backend="triton")
            prev_ref, _ = ref.ddim_step(eps.cpu(), t.cpu(), (t.cpu() - 20).clamp_min(-1), x.cpu(), schedule, eta=1.0, seed=seed)
            cases.append(Case("ddim_step", f"{shape} eta=1", name, testing.compare(prev, prev_ref, dtype=dtype)))
    return cases



@check("sampling")
def _check_sampling(device, quick):
    """Whole loops: fastgen.sample (fused steps; on CUDA a captured graph) vs the float64 reference
    sample_loop, with an elementwise model. Per-step fp32 rounding feeds back through the model and
    accumulates over the steps, so the tolerance is the loop's (1e-5), not one step's."""
    from fastgen.reference import diffusion as ref
    from fastgen.sampling import sample
    from fastgen.schedulers import DDIMScheduler, DDPMScheduler
    from fastgen.schedulers._common import schedule_of

    def model(x, t):
        return 0.4 * x + 0.3 * torch.sin(x) + 0.002 * t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    T, seed = 16, 0x9E3779B97F4A7C15
    ddpm, ddim = DDPMScheduler(num_train_timesteps=T), DDIMScheduler(num_train_timesteps=T)
    schedule = schedule_of(ddpm)  # the tables the loop reads: the scheduler's own
    shapes = [(3, 2, 5)] if quick else [(3, 2, 5), (8, 3, 16, 16)]
    cases = []
    for shape in shapes:
        with poisoned_outputs():
            x = sample(model, shape, ddpm, seed=seed, device=device, backend="triton")
        expected = ref.sample_loop(lambda x, t: model(x, torch.tensor(t)), shape, schedule, seed=seed)
        cases.append(Case("sample", f"{shape} DDPM {T} steps", "float32",
                          testing.compare(x, expected, rtol=1e-5, atol=1e-5)))
        with poisoned_outputs():
            x = sample(model, shape, ddim, num_inference_steps=4, eta=0.5, seed=seed,
                       device=device, backend="triton")
        expected = ref.sample_loop(lambda x, t: model(x, torch.tensor(t)), shape, schedule, seed=seed,
                                   timesteps=[12, 8, 4, 0], step=ref.ddim_step, eta=0.5)
        cases.append(Case("sample", f"{shape} DDIM 4 steps eta=0.5", "float32",
                          testing.compare(x, expected, rtol=1e-5, atol=1e-5)))
    return cases
