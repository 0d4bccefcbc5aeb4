"""The compiled sm_90 code, without a GPU (fastgen.bench.static): no variant spills, and the contiguous
elementwise kernels move 128-bit vectors wherever their launch allows it. Plus the report's own rules
(occupancy, PTX access widths, the fast path) on known inputs."""
import pytest

from fastgen.bench import static

# The contiguous elementwise kernels, with the integer arguments whose divisibility by 16 makes their
# tiles 16-byte aligned (a sample's or a row's size; the kernels' own strides).
ELEMENTWISE_SIZES = {
    "_randn_kernel": ("n",),
    "_truncated_latents_kernel": ("n",),
    "_q_sample_kernel": ("n",),
    "_ddpm_step_kernel": ("n", "model_stride"),
    "_ddim_step_kernel": ("n",),
    "_sampler_step_kernel": ("n", "half"),
    "_gaussian_fwd_kernel": ("row_len",),
    "_gaussian_bwd_kernel": ("row_len",),
}
VECTOR_BITS = 128
DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}


def _gated(row) -> bool:
    """A variant that can and so must move 128-bit vectors: an elementwise kernel launched with its
    pointers aligned and its sizes multiples of 16, on a tile that gives each thread at least 128 bits
    of consecutive elements."""
    sizes = ELEMENTWISE_SIZES.get(row["name"])
    if sizes is None or row["dtype"] not in DTYPE_BITS or not row["tile_elements"]:
        return False
    # a pointer that is never specialised (a timestep tensor read once per program) has attr None
    pointers_aligned = all(a != "" for n, a in row["attrs"].items() if row["signature"][n].startswith("*"))
    sizes_divisible = all(row["attrs"].get(n) == "D" for n in sizes)
    run = row["constexprs"].get("CHUNK", row["constexprs"].get("BLOCK"))
    bits = DTYPE_BITS[row["dtype"]]
    per_thread = row["tile_elements"] * bits // row["threads"]
    return pointers_aligned and sizes_divisible and per_thread >= VECTOR_BITS and run * bits >= VECTOR_BITS


def _per_row(row) -> set:
    """The access kinds ("load", "store") that also touch one value per row (a row sum stored, a
    per-row gradient loaded): the PTX does not say which access is which, so those go unchecked."""
    constexprs = row["constexprs"]
    return ({"store"} if constexprs.get("STORE_PARTIAL") else set()) | (
        {"load"} if constexprs.get("GRAD_KL") == 2 else set())


def test_no_variant_spills(static_report):
    _, report = static_report
    spilling = [f"{static.label(r)}: {r['spill_bytes']} bytes" for r in report["variants"] if r["spill_bytes"]]
    assert not spilling, spilling


def test_contiguous_elementwise_kernels_move_128_bit_vectors(static_report):
    _, report = static_report
    gated = [r for r in report["variants"] if _gated(r)]
    gated_kernels = {r["name"] for r in gated}
    assert gated_kernels == set(ELEMENTWISE_SIZES), (
        f"validate --quick launches no vectorisable variant of {sorted(set(ELEMENTWISE_SIZES) - gated_kernels)}")
    narrow = []
    for r in gated:
        for kind, counts in (("load", r["loads"]), ("store", r["stores"])):
            if counts and kind not in _per_row(r) and min(map(int, counts)) != VECTOR_BITS:
                narrow.append(f"{static.label(r)}: {kind}s {counts} (bits: count per thread)")
    assert not narrow, "\n".join(narrow)


def test_occupancy_follows_the_cuda_rules():
    # 64 registers x 128 threads: 2048 registers per warp, 32 warps by registers = 8 blocks of 4 warps
    assert static.occupancy(64, 128, 0) == dict(blocks_per_sm=8, warps_per_sm=32, occupancy=0.5,
                                                limited_by=["registers"])
    # 32 registers: threads and warps limit first (16 blocks of 128 threads = 2048 threads)
    assert static.occupancy(32, 128, 0)["warps_per_sm"] == 64
    # 33 registers round up to 40 per thread (1280 per warp, a multiple of 256): 51 warps -> 12 blocks
    assert static.occupancy(33, 128, 0)["blocks_per_sm"] == 12
    # shared memory: 100 KB + 1 KB reserved per block -> 2 blocks in 228 KB
    assert static.occupancy(16, 128, 100 * 1024)["blocks_per_sm"] == 2


PTX = """
.version 8.7
.target sm_90a
.global .align 4 .b8 __cudart_i2opi_f[24] = {65, 144};
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0
)
{
	.reg .pred 	%p<3>;
	ld.param.b64 	%rd1, [k_param_0];
	mov.u32 	%r1, %tid.x;
	mul.wide.u32 	%rd2, %r1, 16;
	add.s64 	%rd3, %rd1, %rd2;
	ld.global.b32 	%r9, [%rd1];
	// begin inline asm
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd3 + 0 ];
	// end inline asm
	setp.gt.f32 	%p2, %f1, 0f47CE4780;
	@%p2 bra 	$L__BB0_2;
	sin.approx.f32 	%f2, %f1;
	bra.uni 	$L__BB0_3;
$L__BB0_2:
	mov.b64 	%rd4, __cudart_i2opi_f;
	ld.global.nc.b32 	%r6, [%rd4];
	add.s32 	%r7, %r6, 1;
	add.s32 	%r7, %r7, 1;
	add.s32 	%r7, %r7, 1;
$L__BB0_3:
	st.global.v2.b16 	[ %rd3 + 0 ], { %rs1, %rs2 };
	ret;
}
"""


def test_ptx_analysis_reads_widths_tables_and_the_fast_path():
    figures = static.analyse_ptx(PTX)
    assert figures["loads"] == {"128": 1} and figures["stores"] == {"32": 1}  # v4.b32; v2.b16
    assert figures["broadcast_loads"] == 1 and figures["table_loads"] == 1  # [%rd1]; __cudart_i2opi_f
    assert figures["instructions"] == 17
    # the fast path skips the 5-instruction slow block: 17 - 5
    assert figures["fast_path_instructions"] == 12
    assert figures["fast_path_pipes"]["mufu"] == 1 and figures["fast_path_pipes"]["fp32"] == 1


@pytest.mark.parametrize("opcode, bits", [("ld.global.v4.b32", 128), ("st.global.v2.b32", 64),
                                          ("ld.global.nc.L1::evict_last.b16", 16), ("st.global.v8.b16", 128),
                                          ("ld.global.b64", 64)])
def test_access_width(opcode, bits):
    assert static._access_width(opcode) == bits
