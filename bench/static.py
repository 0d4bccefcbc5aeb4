"""What the compiled kernels do, without a GPU: every kernel variant ``validate`` launches, compiled
for sm_90 (H100/H200) and read back from its PTX and cubin.

Two steps, each in its own process, because TRITON_INTERPRET is read when triton is imported:

    python -m fastgen.bench.static record OUT.json [--quick] [--execute]
        interpreter: run ``validate`` (full, or --quick) and record every launch: the kernel, its
        constexprs and the specialisation Triton's own binder gives its arguments for an sm_90 launch
        (types; "D" where a pointer is 16-byte aligned or an integer a multiple of 16; integers equal
        to 1 become constexprs). Without --execute the launches are recorded, not run: only their
        arguments matter, so the full ``validate`` records in seconds.
    python -m fastgen.bench.static build IN.json OUT.json
        compiled mode, into an empty Triton cache: build each recorded variant for sm_90 as it was
        launched and read its code (below); OUT.json also lists every ``*_kernel`` of fastgen.kernels
        and the variants that failed to compile (tests/test_compile.py checks both).

A variant is compiled with the specialisation its launch gets on a GPU: the binder sees the same
sizes, and CPU tensors are aligned as CUDA ones are (at least 64 bytes), so a pointer is 16-byte
aligned and an integer a multiple of 16 exactly when they would be on a GPU. ``validate`` covers
sizes that are multiples of 16 (real images and latents) and odd ones; an odd-sized sample compiles
to its own variant, with scalar accesses where a vector would straddle its end.
``python -m fastgen bench --static`` (``run``) records the full ``validate``. Per variant it writes
to static.json and static.md:

  registers per thread   from ptxas's log of the compile, with its spill stores + loads and stack
                         frame (bytes per thread)
  shared memory          bytes per program, as Triton launches it
  occupancy              resident warps per SM on an H100/H200 by the CUDA occupancy rules (OCCUPANCY)
  widest load / store    bits of the widest global data access in the PTX (ld.global.v4.b32 = 128);
                         data accesses are those whose address depends on the thread; broadcast
                         (per-program) loads and libdevice's constant tables are counted apart
  PTX per element        PTX instructions per output element, both for the whole kernel and for its
                         fast path (the shortest way through its branches: the branches of these
                         kernels guard slow paths, such as libdevice's reduction of huge sin/cos
                         arguments, that sampled data never takes); an output element is one of the
                         program's BLOCK (or ROWS x CHUNK) elements
  bound on an H200       bytes per element at 4.8 TB/s against the fast path's instructions at the
                         issue and pipe rates of H200 (see H200), as a time per element each

The PTX figures are estimates from static code: a PTX instruction is not exactly one SASS instruction
(ptxas fuses some, expands others such as div.rn.f32), and the time estimate ignores latency.
"""
import argparse
import collections
import heapq
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

TARGET = ("cuda", 90, 32)  # H100/H200: sm_90, 32 threads per warp
# CUDA occupancy rules of compute capability 9.0 (CUDA C Programming Guide, "Compute Capabilities").
OCCUPANCY = dict(registers_per_sm=65536, max_threads_per_sm=2048, max_warps_per_sm=64, max_blocks_per_sm=32,
                 register_allocation_unit=256, max_registers_per_thread=255, shared_memory_per_sm=228 * 1024,
                 shared_memory_reserved_per_block=1024)
# The H200 the estimate assumes: HBM3e bandwidth, and per SM and clock: 4 schedulers issuing one warp
# instruction each (128 thread-instructions), 128 fp32 lanes, 64 int32 lanes (add, logic, shift,
# multiply), 16 special-function lanes (MUFU: sin, cos, lg2, ex2, rsqrt, rcp; sqrt.rn and div.rn
# start with one) and 16 conversion lanes (int <-> float). Boost clock 1.98 GHz, 132 SMs.
H200 = dict(sms=132, clock_hz=1.98e9, hbm_bytes_per_s=4.8e12, issue_per_sm_clock=128,
            lanes_per_sm_clock={"fp32": 128, "int": 64, "mufu": 16, "cvt": 16})
TILE_CONSTEXPRS = (("BLOCK",), ("ROWS", "CHUNK"))  # a program's output tile: BLOCK, or ROWS x CHUNK
STATIC_SCHEMA = 1


# --- recording the launches (interpreter process) ----------------------------------------------------

def _plain(value):
    """A constexpr value as JSON can hold it (tl.constexpr objects unwrapped)."""
    value = getattr(value, "value", value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _binder(fn, kwargs, cache={}):  # noqa: B006 - a per-process cache of Triton binders
    """Triton's own argument binder for ``fn`` on an sm_90 target: the function a real launch runs
    to choose the compiled variant (types, alignment and divisibility, value-1 integers)."""
    if fn not in cache:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        jit = JITFunction(fn, **{k: v for k, v in kwargs.items()
                                 if k in ("do_not_specialize", "do_not_specialize_on_alignment")})
        cache[fn] = (jit, create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget(*TARGET))))
    return cache[fn]


def launch_record(interpreted, args, kwargs) -> dict:
    """The variant one launch of an interpreted kernel selects: module, name, {param: type},
    {param: constexpr value}, {param: "D" | "" | None} (None: never specialised), and the launch
    options (num_warps, ...)."""
    jit, binder = _binder(interpreted.fn, interpreted.kwargs)
    _, specialization, options = binder(*args, **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for param, (kind, attr) in zip(jit.params, specialization):
        name = param.name
        if kind == "constexpr":
            constexprs[name] = _plain(attr)
        else:
            signature[name], attrs[name] = kind, attr
    return dict(module=interpreted.fn.__module__, name=interpreted.fn.__name__, signature=signature,
                constexprs=constexprs, attrs=attrs, options={k: _plain(v) for k, v in sorted(options.items())})


def record(path, *, quick=False, execute=False):
    """Run ``validate`` under the interpreter and write every distinct launch to ``path`` (JSON)."""
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launch = launch_record(self, args, kwargs)
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs) if execute else None

    InterpretedFunction.run = run
    import fastgen.kernels
    from fastgen import validate

    fastgen.kernels.INTERPRETER_BLOCK = 1  # launch with the GPU's block sizes: those are what get compiled
    lines = []
    ok = validate.run(device="cpu", quick=quick, out=lines.append)
    with open(path, "w") as f:
        json.dump({"validate_ok": ok if execute else None, "quick": quick,
                   "launches": [launches[k] for k in sorted(launches)]}, f)


# --- compiling (compiled-mode process) -----------------------------------------------------------------

def kernel_names() -> list:
    """Every ``*_kernel`` JIT function in fastgen.kernels, as module.name."""
    import fastgen.kernels
    from triton.runtime.jit import JITFunction

    return sorted(f"{m.name}.{name}" for m in pkgutil.iter_modules(fastgen.kernels.__path__, "fastgen.kernels.")
                  for name, obj in vars(importlib.import_module(m.name)).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel"))


def compile_launch(launch: dict):
    """The triton.compile'd kernel of one recorded variant, for sm_90."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    names = kernel.arg_names
    attrs = {(names.index(n),): BaseBackend.parse_attr(a) for n, a in launch["attrs"].items() if a}
    signature = {**launch["signature"], **{k: "constexpr" for k in launch["constexprs"]}}
    src = ASTSource(fn=kernel, signature=signature, constexprs=launch["constexprs"], attrs=attrs)
    return triton.compile(src, target=GPUTarget(*TARGET), options=launch.get("options") or None)


# --- reading the compiled code ------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*)$")
_REGISTER = re.compile(r"%[A-Za-z_]\w*(?:\.[xyz])?")
_THREAD_SPECIAL = re.compile(r"^%(tid|laneid|warpid)\b")
_NO_DESTINATION = ("st.", "bra", "ret", "exit", "bar.", "barrier", "fence", "membar", "red.", "trap", "prefetch")
_MUFU = ("sin.", "cos.", "lg2.", "ex2.", "rsqrt.", "rcp.", "sqrt.", "div.rn.f32", "div.full.f32", "tanh.")
_INT_OPS = ("add", "sub", "mul", "mad", "and", "or", "xor", "not", "shl", "shr", "min", "max", "setp", "selp",
            "lop3", "shf", "prmt", "bfe", "bfi", "neg", "abs", "mul24", "mad24", "popc", "clz", "brev")
_FP_OPS = ("add", "sub", "mul", "fma", "mad", "min", "max", "setp", "selp", "neg", "abs", "copysign", "testp")


def _split_operands(text: str) -> list:
    """Top-level comma-separated operands of a PTX instruction (braces and brackets kept whole)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + ([current.strip()] if current.strip() else [])


def _pipe(opcode: str) -> str:
    """The H200 pipe a PTX instruction mostly occupies: mufu, cvt, fp32, int, or other (moves,
    memory, control: issue slots only)."""
    parts = opcode.split(".")
    if opcode.startswith(_MUFU):
        return "mufu"
    if parts[0] == "cvt":
        kinds = {p[0] for p in parts[1:] if re.fullmatch(r"[usbf]\d+", p)}
        return "cvt" if "f" in kinds and kinds & {"u", "s"} else "other"
    types = [p for p in parts[1:] if re.fullmatch(r"[usbf]\d+|pred", p)]
    if parts[0] in _FP_OPS and types and types[-1] in ("f32", "f16", "bf16", "f16x2", "bf16x2"):
        return "fp32"
    if parts[0] in _INT_OPS and types and types[-1][0] in "usb":
        return "int"
    return "other"


def _access_width(opcode: str) -> int:
    """Bits moved by one ld/st.global: vector length x element bits (ld.global.v4.b32 = 128)."""
    parts = opcode.split(".")
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[usbf]\d+", p))
    return vector * bits


def parse_ptx(ptx: str) -> list:
    """The kernel body's statements in order as (label, opcode, operands, predicated): a label has
    opcode None, an instruction label None."""
    body = ptx[ptx.index(".entry"):]
    body = body[body.index("{") + 1:body.rindex("}")]
    items = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        for statement in filter(None, (s.strip() for s in line.split(";"))):
            if statement.endswith(":"):
                items.append((statement[:-1], None, [], False))
                continue
            if statement.startswith((".", "{", "}")):  # declarations, inline-asm scopes
                statement = statement.lstrip("{}").strip()
                if not statement or statement.startswith("."):
                    continue
            match = _INSTRUCTION.match(statement)
            if match:
                items.append((None, match.group(1), _split_operands(match.group(2)), statement.startswith("@")))
    return items


def _taint(instructions, module_symbols) -> dict:
    """{register: {"thread", "table"}}: whether a register depends on the thread index, and whether it
    holds an address derived from a module-level symbol (libdevice's constant tables)."""
    taint = collections.defaultdict(set)
    changed = True
    while changed:  # to a fixed point: loops carry taint backwards
        changed = False
        for _, opcode, operands, _ in instructions:
            if opcode is None or not operands or opcode.startswith(_NO_DESTINATION):
                continue
            sources = set()
            for operand in operands[1:]:
                for token in _REGISTER.findall(operand):
                    sources |= {"thread"} if _THREAD_SPECIAL.match(token) else taint.get(token, set())
                if any(re.search(rf"(?<![\w$]){re.escape(s)}(?![\w$])", operand) for s in module_symbols):
                    sources.add("table")
            for dest in _REGISTER.findall(operands[0]):
                if not sources <= taint[dest]:
                    taint[dest] |= sources
                    changed = True
    return taint


def _fast_path(instructions) -> list:
    """Indices of the instructions on the shortest way from the entry to a ret (by instruction count)."""
    blocks, labels, current = [], {}, []
    for i, (label, opcode, _, _) in enumerate(instructions):
        if label is not None:
            if current:
                blocks.append(current)
            current = []
            labels[label] = len(blocks)
            continue
        current.append(i)
        if opcode.startswith(("bra", "ret", "exit")):
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    labels = {name: min(b, len(blocks) - 1) for name, b in labels.items()}

    def successors(b):
        _, opcode, operands, predicated = instructions[blocks[b][-1]] if blocks[b] else (None, "", [], False)
        if opcode.startswith(("ret", "exit")) and not predicated:
            return []
        nexts = [b + 1] if b + 1 < len(blocks) else []
        if opcode.startswith("bra"):
            nexts = nexts + [labels[operands[0]]] if predicated else [labels[operands[0]]]
        return nexts

    best = {0: len(blocks[0])}
    previous = {}
    heap = [(len(blocks[0]), 0)]
    while heap:
        cost, b = heapq.heappop(heap)
        if cost > best.get(b, float("inf")):
            continue
        if not successors(b) and blocks[b] and instructions[blocks[b][-1]][1].startswith(("ret", "exit")):
            path = [b]
            while path[-1] in previous:
                path.append(previous[path[-1]])
            return sorted(i for block in path for i in blocks[block])
        for n in successors(b):
            if cost + len(blocks[n]) < best.get(n, float("inf")):
                best[n] = cost + len(blocks[n])
                previous[n] = b
                heapq.heappush(heap, (best[n], n))
    return [i for block in blocks for i in block]


def analyse_ptx(ptx: str) -> dict:
    """Instruction counts (all and fast path, by pipe) and the global accesses of one kernel's PTX."""
    module_symbols = re.findall(r"^\s*\.(?:global|const)\s[^;]*?([A-Za-z_$][\w$]*)\s*(?:\[|=|;)", ptx, re.M)
    instructions = parse_ptx(ptx)
    taint = _taint(instructions, module_symbols)
    fast = _fast_path(instructions)
    counted = [i for i, item in enumerate(instructions) if item[1] is not None]
    pipes = collections.Counter(_pipe(instructions[i][1]) for i in fast if instructions[i][1] is not None)
    accesses = {"load": collections.Counter(), "store": collections.Counter()}
    broadcast_loads = table_loads = 0
    for _, opcode, operands, _ in instructions:
        if opcode is None or not opcode.startswith(("ld.global", "st.global")):
            continue
        address = next(op for op in operands if op.startswith("["))
        kinds = set().union(*(taint.get(r, set()) for r in _REGISTER.findall(address)))
        if "table" in kinds or any(s in address for s in module_symbols):
            table_loads += 1
        elif "thread" not in kinds:
            broadcast_loads += opcode.startswith("ld")
        else:
            accesses["load" if opcode.startswith("ld") else "store"][_access_width(opcode)] += 1
    return dict(instructions=len(counted), fast_path_instructions=sum(pipes.values()), fast_path_pipes=dict(pipes),
                loads={str(k): v for k, v in sorted(accesses["load"].items())},
                stores={str(k): v for k, v in sorted(accesses["store"].items())},
                data_bits_per_thread=sum(w * n for kind in accesses.values() for w, n in kind.items()),
                broadcast_loads=broadcast_loads, table_loads=table_loads)


def _ptxas_usage(log: str) -> dict:
    """{registers, spill_bytes, stack_bytes} from ptxas -v's log of one kernel."""
    def number(pattern):
        match = re.search(pattern, log)
        if match is None:
            raise RuntimeError(f"ptxas log without {pattern!r}:\n{log[-1500:]}")
        return int(match.group(1))
    return dict(registers=number(r"Used (\d+) registers"),
                spill_bytes=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
                stack_bytes=number(r"(\d+) bytes stack frame"))


def occupancy(registers: int, threads_per_block: int, shared_bytes: int, rules=OCCUPANCY) -> dict:
    """Resident blocks and warps per SM (the CUDA occupancy calculator's rules) and what limits them."""
    warps_per_block = -(-threads_per_block // 32)
    unit = rules["register_allocation_unit"]
    registers_per_warp = -(-registers * 32 // unit) * unit
    limits = {
        "warps": rules["max_warps_per_sm"] // warps_per_block,
        "threads": rules["max_threads_per_sm"] // threads_per_block,
        "blocks": rules["max_blocks_per_sm"],
        "registers": (rules["registers_per_sm"] // registers_per_warp) // warps_per_block if registers else 10 ** 9,
        "shared memory": rules["shared_memory_per_sm"] // (shared_bytes + rules["shared_memory_reserved_per_block"]),
    }
    blocks = min(limits.values())
    limited_by = sorted(name for name, value in limits.items() if value == blocks)
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps_per_block,
                occupancy=blocks * warps_per_block / rules["max_warps_per_sm"], limited_by=limited_by)


def tile_elements(constexprs: dict):
    """Output elements per program (BLOCK, or ROWS x CHUNK), or None for a kernel with neither."""
    for names in TILE_CONSTEXPRS:
        if all(isinstance(constexprs.get(n), int) for n in names):
            product = 1
            for n in names:
                product *= constexprs[n]
            return product
    return None


def bound_estimate(bytes_per_element: float, pipes_per_element: dict, device=H200) -> dict:
    """Seconds per element for the memory traffic and for the instructions on an H200, and the verdict."""
    per_sm_second = device["sms"] * device["clock_hz"]
    total = sum(pipes_per_element.values())
    cycles = {"issue": total / device["issue_per_sm_clock"]}
    for pipe, lanes in device["lanes_per_sm_clock"].items():
        cycles[pipe] = pipes_per_element.get(pipe, 0.0) / lanes
    alu_limit = max(cycles, key=cycles.get)
    alu_s = cycles[alu_limit] / per_sm_second
    memory_s = bytes_per_element / device["hbm_bytes_per_s"]
    return dict(memory_ns_per_1k=1e12 * memory_s, alu_ns_per_1k=1e12 * alu_s, alu_limit=alu_limit,
                bound="memory" if memory_s >= alu_s else "ALU", alu_over_memory=alu_s / memory_s if memory_s else None)


# --- the report -----------------------------------------------------------------------------------------

def element_dtype(launch: dict) -> str:
    """The dtype of the variant's data: the most common pointer element type among its arguments."""
    pointers = collections.Counter(t[1:] for t in launch["signature"].values() if t.startswith("*"))
    return pointers.most_common(1)[0][0] if pointers else "-"


def label(launch: dict) -> str:
    constexprs = " ".join(f"{k}={v}" for k, v in launch["constexprs"].items() if v is not None)
    return f"{launch['name']} {element_dtype(launch)} {constexprs}".strip()


def analyse(launch: dict) -> dict:
    """Every figure of one variant (compiled with its recorded specialisation). Triton's own ptxas run
    prints its log (registers, spills, stack) because ``build`` compiles into an empty cache."""
    import contextlib
    import io

    from triton import knobs

    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        kernel = compile_launch(launch)
    meta = kernel.metadata
    usage = _ptxas_usage(log.getvalue())
    ptx = analyse_ptx(kernel.asm["ptx"])
    threads = 32 * meta.num_warps
    tile = tile_elements(launch["constexprs"])
    row = dict(kernel=f"{launch['module']}.{launch['name']}", name=launch["name"], dtype=element_dtype(launch),
               constexprs=launch["constexprs"], signature=launch["signature"], attrs=launch["attrs"],
               num_warps=meta.num_warps, threads=threads, tile_elements=tile, shared_bytes=meta.shared, **usage,
               **ptx, **occupancy(usage["registers"], threads, meta.shared))
    row["widest_load_bits"] = max(map(int, ptx["loads"]), default=0)
    row["widest_store_bits"] = max(map(int, ptx["stores"]), default=0)
    row["narrowest_load_bits"] = min(map(int, ptx["loads"]), default=0)
    row["narrowest_store_bits"] = min(map(int, ptx["stores"]), default=0)
    if tile:
        per_element = threads / tile  # thread-instructions per output element = per-thread count x threads / tile
        row["ptx_per_element"] = ptx["instructions"] * per_element
        row["fast_path_ptx_per_element"] = ptx["fast_path_instructions"] * per_element
        row["bytes_per_element"] = ptx["data_bits_per_thread"] / 8 * per_element
        row.update(bound_estimate(row["bytes_per_element"],
                                  {k: v * per_element for k, v in ptx["fast_path_pipes"].items()}))
    return row


def _versions() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = subprocess.run([get_ptxas(TARGET[1]).path, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", ptxas)
    return {"triton": triton.__version__, "ptxas": release.group(1) if release else ptxas.strip()[-40:]}


def philox_cost(rows) -> dict:
    """Fast-path PTX instructions per normal: a Philox-4x32-10 call (from the raw-bits kernel, one
    call per element there) over its four normals, and a whole fp32 normal of randn (Box-Muller,
    store) as a launch on real tensors compiles it (size a multiple of 16, draw on a Philox block);
    with the ALU budget per element at the H200's bandwidth."""
    def real(name, dtype):
        candidates = [r for r in rows if r["name"] == name and r["dtype"] == dtype and "fast_path_ptx_per_element" in r]
        return min(candidates, key=lambda r: (sum(a != "D" for a in r["attrs"].values() if a is not None),
                                              r["constexprs"].get("PHASE0") is False), default=None)
    philox, randn = real("_philox_kernel", "i32"), real("_randn_kernel", "fp32")
    cost = {}
    if philox:
        cost["philox_call"] = philox["fast_path_ptx_per_element"]
        cost["philox_per_normal"] = philox["fast_path_ptx_per_element"] / 4
    if randn:
        cost["randn_fp32_per_normal"] = randn["fast_path_ptx_per_element"]
        cost["randn_fp32_bound"] = randn["bound"]
        cost["randn_fp32_alu_over_memory"] = randn["alu_over_memory"]
        # thread-instructions an H200 issues in the time its HBM moves one fp32 element
        issue_per_s = H200["sms"] * H200["clock_hz"] * H200["issue_per_sm_clock"]
        cost["budget_per_fp32_element"] = issue_per_s * 4 / H200["hbm_bytes_per_s"]
    return cost


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    from fastgen._table import markdown_table

    rows = report["variants"]
    table = markdown_table(
        ["kernel", "dtype", "constexprs", "x16", "regs", "spill B", "stack B", "smem B", "warps/SM (limit)", "ld bits", "st bits",
         "PTX/elem (fast)", "B/elem", "H200 bound (ALU/mem)"],
        [[r["name"], r["dtype"], " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if v is not None),
          _divisible(r),
          r["registers"], r["spill_bytes"], r["stack_bytes"], r["shared_bytes"],
          f"{r['warps_per_sm']} ({', '.join(r['limited_by'])})",
          _widths(r["loads"]), _widths(r["stores"]),
          f"{_fmt(r.get('ptx_per_element'))} ({_fmt(r.get('fast_path_ptx_per_element'))})",
          _fmt(r.get("bytes_per_element")),
          f"{r['bound']} ({_fmt(r['alu_over_memory'], 2)})" if r.get("bound") else "-"] for r in rows])
    cost = report["philox"]
    lines = [
        "# fastgen static report: the compiled sm_90 code of every kernel variant `validate` launches",
        "",
        f"triton {report['versions']['triton']}, ptxas {report['versions']['ptxas']}, target sm_90 "
        f"(H100/H200); {len(rows)} variants of {len({r['kernel'] for r in rows})} kernels. Regenerate: "
        "`python -m fastgen bench --static --out DIR`.",
        "",
        f"Each variant as `validate{' --quick' if report['validate'] == 'quick' else ''}` launches it, with "
        "the specialisation the launch gets on a GPU: 'x16' names the integer arguments that are multiples "
        "of 16 (and any pointer not 16-byte aligned). Sizes that are multiples of 16, as real images and "
        "latents have, compile to vector accesses; odd sizes to another variant, with scalar ones.",
        "",
        "Columns: registers per thread; spill stores + loads and stack frame, bytes per thread (ptxas); "
        "shared memory per program; resident warps per SM of 64 and what limits them; global data loads "
        "and stores as bits x count per thread (thread-dependent addresses; broadcast loads and constant "
        "tables apart); PTX instructions per output element, whole kernel (fast path); data bytes per "
        "element; the H200 estimate.",
        "",
        table,
        "",
        "## Counter-based noise: the cost of Philox",
        "",
    ]
    if cost:
        lines += [
            f"- One Philox-4x32-10 call: {_fmt(cost.get('philox_call'))} PTX instructions (fast path), "
            f"{_fmt(cost.get('philox_per_normal'))} per normal (one call yields four).",
            f"- A normal of `randn` (Philox, Box-Muller, conversion, store), fp32: "
            f"{_fmt(cost.get('randn_fp32_per_normal'))} PTX instructions; estimate on an H200: "
            f"{cost.get('randn_fp32_bound', '-')}-bound, ALU time / memory time = "
            f"{_fmt(cost.get('randn_fp32_alu_over_memory'), 2)}.",
            f"- The budget: in the time an H200 streams one 4-byte element it issues "
            f"{_fmt(cost.get('budget_per_fp32_element'))} thread-instructions (half that for a 2-byte one). "
            "Philox alone takes about that much per normal, and Box-Muller's accurate libdevice log, sqrt, "
            "sin and cos the rest, so the kernels that only draw noise (randn, latents) are ALU-bound by "
            "this estimate, while those that also read and write tensors (the diffusion steps, "
            "reparameterize) come close to balance or stay memory-bound. Memory-bound noise would need "
            "fewer instructions per normal: the MUFU approximations (lg2.approx, sin.approx, cos.approx) "
            "instead of libdevice, or fewer Philox rounds; both change the numbers drawn, which are a "
            "contract (the reference reproduces them), so neither is done. Otherwise the noise can only be "
            "amortised: drawn inside the kernel that consumes it, as the fused steps do, never stored.",
            "",
        ]
    lines += [
        "## The estimate",
        "",
        f"Memory: data bytes per element at {H200['hbm_bytes_per_s'] / 1e12:.1f} TB/s (H200 HBM3e). ALU: the "
        f"fast path's PTX instructions per element on {H200['sms']} SMs at {H200['clock_hz'] / 1e9:.2f} GHz, "
        f"each SM issuing {H200['issue_per_sm_clock']} thread-instructions per clock (4 schedulers x 1 warp "
        "instruction x 32 lanes) with per-pipe limits per clock: "
        + ", ".join(f"{k} {v}" for k, v in H200["lanes_per_sm_clock"].items())
        + " lanes; the tightest of these limits is the ALU time. 'ALU/mem' is ALU time over memory time: "
        "below 1 the kernel can stream at full bandwidth. A static estimate: it ignores latency, ptxas's "
        "rewriting of PTX and cache effects.",
        "",
        f"Occupancy rules (compute capability 9.0): {OCCUPANCY['registers_per_sm']} registers, "
        f"{OCCUPANCY['max_threads_per_sm']} threads, {OCCUPANCY['max_warps_per_sm']} warps and "
        f"{OCCUPANCY['max_blocks_per_sm']} blocks per SM; registers allocated per warp in units of "
        f"{OCCUPANCY['register_allocation_unit']}; {OCCUPANCY['shared_memory_per_sm'] // 1024} KB shared memory "
        f"per SM with {OCCUPANCY['shared_memory_reserved_per_block']} bytes reserved per block.",
        "",
    ]
    return "\n".join(lines)


def _divisible(row: dict) -> str:
    """The integer arguments specialised as multiples of 16, and any pointer not 16-byte aligned."""
    sizes = [n for n, a in row["attrs"].items() if a == "D" and not row["signature"][n].startswith("*")]
    unaligned = [n for n, a in row["attrs"].items() if a == "" and row["signature"][n].startswith("*")]
    return " ".join(sizes + [f"unaligned:{n}" for n in unaligned]) or "-"


def _widths(counts: dict) -> str:
    return " ".join(f"{w}x{n}" for w, n in sorted(counts.items(), key=lambda kv: -int(kv[0]))) or "-"


def build(launches_path) -> dict:
    """The report of every recorded variant, specialised as on real tensors (compiled-mode process,
    compiling into a fresh cache so that every variant goes through ptxas and logs its resources)."""
    os.environ.pop("TRITON_INTERPRET", None)
    with open(launches_path) as f:
        recorded = json.load(f)
    variants = {json.dumps(launch, sort_keys=True): launch for launch in recorded["launches"]}
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="fastgen-static-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        for key in sorted(variants, key=lambda k: (variants[k]["module"], variants[k]["name"], k)):
            try:
                rows.append(analyse(variants[key]))
            except Exception as err:
                failures.append(f"{label(variants[key])}: {type(err).__name__}: {str(err)[-800:]}")
    return dict(schema=STATIC_SCHEMA, versions=_versions(), target=list(TARGET), occupancy_rules=OCCUPANCY,
                device_model=H200, kernels=kernel_names(), validate_ok=recorded["validate_ok"],
                validate="quick" if recorded["quick"] else "full", launches=len(recorded["launches"]),
                variants=rows, philox=philox_cost(rows), failures=failures)


def step_environment(step: str) -> dict:
    """The environment of a ``record`` or ``build`` process. TRITON_INTERPRET is read when triton is
    imported, and importing fastgen imports triton (its ops register with torch.library), before
    this module runs: the record process must start with it "1", the build process with it "0" (unset,
    ``import fastgen`` would choose the interpreter on a CPU build of torch)."""
    return {**os.environ, "TRITON_INTERPRET": "1" if step == "record" else "0"}


def _subprocess(*args):
    proc = subprocess.run([sys.executable, "-m", "fastgen.bench.static", *args], capture_output=True, text=True,
                          env=step_environment(args[0]))
    if proc.returncode != 0:
        raise RuntimeError(f"fastgen.bench.static {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run(out: str, *, quick=False, progress=print) -> dict:
    """Record ``validate``'s launches, build the report, write out/static.json and out/static.md."""
    from fastgen._files import atomic_write

    with tempfile.TemporaryDirectory() as tmp:
        launches = os.path.join(tmp, "launches.json")
        progress(f"recording the kernel launches of `validate{' --quick' if quick else ''}` (interpreter) ...")
        _subprocess("record", launches, *(["--quick"] if quick else []))
        progress("compiling every variant for sm_90 and reading its code ...")
        report_path = os.path.join(tmp, "static.json")
        _subprocess("build", launches, report_path)
        with open(report_path) as f:
            report = json.load(f)
    with atomic_write(os.path.join(out, "static.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    with atomic_write(os.path.join(out, "static.md"), "w") as f:
        f.write(markdown(report))
    return report


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastgen.bench.static")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("record")
    p.add_argument("out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--execute", action="store_true")
    p = commands.add_parser("build")
    p.add_argument("launches")
    p.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.out, quick=args.quick, execute=args.execute)
    else:
        report = build(args.launches)
        with open(args.out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    _main()
