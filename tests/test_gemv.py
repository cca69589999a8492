"""kvshare.gemv's Triton kernel computes what kvshare.decode.linear_reference does: x @ W.T + b, alone or with
the RMSNorm before it, the gated activation of its [gate; up] halves or the residual after it (run by Triton's CPU interpreter,
float32; skipped where triton is not installed, as in CI: its bf16 agreement with cuBLAS on a GPU is recorded by
benchmarks/decode_kernels_bench.py)."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: the kernel runs on the CPU
triton = pytest.importorskip("triton")


@pytest.mark.parametrize(
    ("rows", "n", "k", "bias", "fused"),
    [(1, 40, 300, False, ""), (3, 64, 512, True, ""), (16, 100, 256, True, ""), (2, 48, 200, True, "norm"),
     (5, 33, 128, False, "act"), (2, 40, 300, True, "norm act"), (1, 64, 256, True, "residual")],
)  # fmt: skip
def test_kernel_equals_reference(rows, n, k, bias, fused):
    import kvshare.gemv as gemv
    from kvshare.decode import linear_reference

    torch.manual_seed(0)
    fused = fused.split()
    x, w = torch.randn(rows, k), torch.randn(2 * n if "act" in fused else n, k)
    b = torch.randn(w.shape[0]) if bias else None
    norm = torch.randn(k) if "norm" in fused else None
    act = "silu" if "act" in fused else None
    res = torch.randn(rows, n) if "residual" in fused else None
    y = torch.empty(rows, n)
    grid = (triton.cdiv(n, 16),)
    gemv._kernel.fn[grid](x, w, w if b is None else b, w if norm is None else norm, y if res is None else res, y,
                          rows, n, k, x.stride(0), w.stride(0), 0 if res is None else res.stride(0), y.stride(0),
                          1e-5, HAS_BIAS=bias, NORM=norm is not None, GLU=act is not None, RESIDUAL=res is not None,
                          BLOCK_M=16, BLOCK_N=16, BLOCK_K=128)  # fmt: skip
    want = linear_reference(x, w, b, norm, 1e-5, act, res)
    assert (y - want).abs().max() <= 1e-4 * want.abs().max()
