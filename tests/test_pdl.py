"""kvshare.pdl: the decode kernels' programmatic dependent launch, checked without a GPU by compiling them for an
H100 (sm_90) with Triton's own ptxas: the launch waits on the kernel before only after its L2 prefetches and
leaves as many programs on a multiprocessor. tests/test_decode.py checks that GraphDecoder refuses pdl=True where
it cannot run; on an H100, benchmarks/decode_options_bench.py compares its outputs and speed with pdl=False."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Compiled in a fresh interpreter: the tests' Triton runs kernels by its CPU interpreter (tests/conftest.py), which
# does not compile them.
COMPILE = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kvshare.decode_attention as attention
import kvshare.gemv as gemv

ptr = lambda t: {"signature": "*" + t, "div": True}
i32 = lambda div: {"signature": "i32", "div": div}
KERNELS = {
    "partial": (attention._partial_kernel, {
        **{n: ptr("bf16") for n in ["q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "nk_ptr", "nv_ptr"]},
        "pos_ptr": ptr("i64"), "rows_ptr": ptr("i32"), "o_ptr": ptr("fp32"), "lse_ptr": ptr("fp32"),
        "qk_scale": {"signature": "fp32", "div": False}, "n_heads": i32(True), "splits": i32(False),
        **{n: i32(True) for n in ["chunk", "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_cb",
                                  "stride_nb", "stride_nh"]}},
        dict(GM=32, HEAD_DIM=128, ROPE=True, STORE=True, DIRECT=False, BLOCK_M=32, BLOCK_N=64),
        dict(num_warps=4, num_stages=2)),
    # The merge of 11 chunks (MQA at batch 32), one step of BLOCK_S, and of 33 (batch 1), in steps.
    **{name: (attention._combine_kernel, {
        "o_ptr": ptr("fp32"), "lse_ptr": ptr("fp32"), "out_ptr": ptr("bf16"), "n_heads": i32(True),
        "splits": i32(False)}, dict(HEAD_DIM=128, SPLITS=triton.next_power_of_2(splits), BLOCK_S=attention.BLOCK_S),
        dict(num_warps=attention._merge_warps(splits))) for name, splits in [("combine", 11), ("combine steps", 33)]},
    "gemv": (gemv._kernel.fn, {
        **{n: ptr("bf16") for n in ["x_ptr", "w_ptr", "b_ptr", "r_ptr", "y_ptr"]}, "M": i32(False),
        **{n: i32(True) for n in ["N", "stride_xm", "stride_wn", "stride_rm", "stride_ym"]}},
        dict(K=4096, HAS_BIAS=False, RESIDUAL=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256),
        dict(num_warps=4, num_stages=4)),
}
cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
out = {}
for name, (fn, args, consts, options) in KERNELS.items():
    for pdl in (False, True):
        constexprs = dict(consts, PDL=pdl)
        signature = {n: a["signature"] for n, a in args.items()} | {n: "constexpr" for n in constexprs}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, a in args.items() if a["div"]}
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                options=dict(options, launch_pdl=pdl))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        out[f"{name} {pdl}"] = {"ptx": kernel.asm["ptx"], "registers": int(re.search(r"REG:(\d+)", usage)[1]),
                                "stack": int(re.search(r"STACK:(\d+)", usage)[1]), "warps": kernel.metadata.num_warps,
                                "shared": kernel.metadata.shared}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("kernel", ["partial", "combine", "combine steps", "gemv"])
def test_waits_after_its_prefetches_at_no_cost_in_occupancy(compiled, kernel):
    off, on = compiled[f"{kernel} False"], compiled[f"{kernel} True"]
    assert "griddepcontrol" not in off["ptx"] and "prefetch.global.L2" not in off["ptx"]
    wait, launch = on["ptx"].find("griddepcontrol.wait"), on["ptx"].find("griddepcontrol.launch_dependents")
    assert 0 < wait < launch
    prefetches = on["ptx"].count("prefetch.global.L2")
    if kernel.startswith("combine"):  # all it reads is the kernel before's output
        assert prefetches == 0
    else:  # the weight's or the cache's lines, asked for before the wait
        assert prefetches > 0 and on["ptx"].rfind("prefetch.global.L2") < wait
    assert on["stack"] <= off["stack"] and programs_per_multiprocessor(on) == programs_per_multiprocessor(off)


def programs_per_multiprocessor(kernel) -> int:
    """As an H100's 64K registers allow: each thread's allocated in steps of 8."""
    return 65536 // (32 * kernel["warps"] * -(-kernel["registers"] // 8) * 8)


@pytest.mark.parametrize("pdl", [False, True])
def test_a_merge_in_one_step_sums_within_its_one_warp(compiled, pdl):
    """kvshare.decode_attention's merge of up to BLOCK_S chunks runs as one warp, so its sum over the chunks needs
    no shared memory and no barrier (on an H100 it took MQA's merge at batch 32 from 4.5 to 2.5 µs a layer);
    more chunks keep 4 warps, whose sum crosses warps."""
    one, steps = compiled[f"combine {pdl}"], compiled[f"combine steps {pdl}"]
    assert one["warps"] == 1 and one["shared"] == 0 and "bar.sync" not in one["ptx"]
    assert steps["warps"] == 4 and steps["shared"] > 0 and "bar.sync" in steps["ptx"]
