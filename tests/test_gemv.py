"""kvshare.gemv's Triton kernel computes x @ W.T + b (run by Triton's CPU interpreter, float32; skipped where
triton is not installed, as in CI: its bf16 agreement with cuBLAS on a GPU is recorded by
benchmarks/decode_kernels_bench.py)."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: the kernel runs on the CPU
triton = pytest.importorskip("triton")


@pytest.mark.parametrize(("rows", "n", "k", "bias"), [(1, 40, 300, False), (3, 64, 512, True), (16, 100, 256, True)])
def test_kernel_equals_linear(rows, n, k, bias):
    import kvshare.gemv as gemv

    torch.manual_seed(0)
    x, w = torch.randn(rows, k), torch.randn(n, k)
    b = torch.randn(n) if bias else None
    y = torch.empty(rows, n)
    grid = (triton.cdiv(n, 16),)
    gemv._kernel.fn[grid](x, w, w if b is None else b, y, rows, n, k, x.stride(0), w.stride(0), y.stride(0),
                          HAS_BIAS=bias, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128)  # fmt: skip
    assert (y - torch.nn.functional.linear(x, w, b)).abs().max() <= 1e-4
