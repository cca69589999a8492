"""What kvshare.decode_attention's chunk kernel compiles to for an H100 (sm_90), without a GPU: MQA at batch 32's
instance (32 query rows, head_dim 128, blocks of 64 positions) at 2 and 3 stages, and the merge kernel at 1 and 4
warps. Prints shared memory, registers, the PTX's copy/wait/barrier counts and the SASS of the walk's loop.

    PYTHONPATH=src:TRITON_DIR python benchmarks/results/decode_floor/sm90-compile/chunk_loop.py

TRITON_DIR: a Triton of the GPU machine's version (3.6.0: pip install --target DIR triton==3.6.0).
"""

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kvshare.decode_attention as da  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
DIVISIBLE = {"chunk", "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_cb", "stride_nb", "stride_nh",
             "n_heads"}  # fmt: skip


def compile_sm90(fn, signature: dict, constexprs: dict, **options):
    signature = signature | {name: "constexpr" for name in constexprs}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in DIVISIBLE}  # fmt: skip
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)  # fmt: skip


def cuobjdump(kernel, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([CUOBJDUMP, flag, f.name], capture_output=True, text=True).stdout


def loop_sass(sass: str) -> collections.Counter:
    """The opcodes of the longest backward-branching loop."""
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4})\*/\s+(.*?);", sass)]
    loops = [(int(t, 16), a) for a, op in code for t in re.findall(r"BRA\s+0x([0-9a-f]+)", op) if int(t, 16) < a]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", op).split()[0].split(".")[0]
                               for a, op in code if start <= a <= end)  # fmt: skip


def report(name: str, kernel) -> None:
    ptx = kernel.asm["ptx"]
    registers = re.search(r"REG:(\d+)", cuobjdump(kernel, "--dump-resource-usage"))[1]
    counts = {p: ptx.count(p) for p in ("cp.async.cg", "cp.async.wait_group", "bar.sync")}
    waits = sorted(set(re.findall(r"cp.async.wait_group\s+(\d+)", ptx)))
    print(f"{name}: shared {kernel.metadata.shared} B, {registers} registers, {counts}, wait_group {waits}")


pointers = ["q_ptr", "k_ptr", "v_ptr", "pos_ptr", "rows_ptr", "cos_ptr", "sin_ptr", "nk_ptr", "nv_ptr", "o_ptr",
            "lse_ptr"]  # fmt: skip
types = ["*bf16"] * 3 + ["*i64", "*i32"] + ["*bf16"] * 4 + ["*fp32"] * 2
signature = (
    dict(zip(pointers, types, strict=True)) | {"qk_scale": "fp32", "splits": "i32"} | {n: "i32" for n in DIVISIBLE}
)
constexprs = dict(GM=32, HEAD_DIM=128, ROPE=True, STORE=True, DIRECT=False, PDL=False, BLOCK_M=32, BLOCK_N=64)
for stages in (2, 3):
    kernel = compile_sm90(da._partial_kernel, signature, constexprs, num_warps=4, num_stages=stages)
    report(f"chunk kernel, {stages} stages", kernel)
    loop = loop_sass(cuobjdump(kernel, "-sass"))
    print(f"  loop: {sum(loop.values())} instructions, {dict(loop.most_common(6))}, BAR {loop['BAR']}")
signature = {"o_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "n_heads": "i32", "splits": "i32"}
for warps in (1, 4):
    kernel = compile_sm90(da._combine_kernel, signature, dict(HEAD_DIM=128, SPLITS=16, PDL=False, BLOCK_S=16),
                          num_warps=warps)  # fmt: skip
    report(f"merge kernel, {warps} warps", kernel)
