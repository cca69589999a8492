"""A Triton matrix product for decode steps: ``x @ weight.T + bias`` with few rows (a batch of single tokens).

With a few rows a Linear layer's product is bound by reading its weight once, and cuBLAS's kernels for
these shapes stop short of the GPU's bandwidth (kvshare's decode diagnostic measured 0.73 of it on an H200).
This kernel gives every program a block of output columns for all rows, streams its weight rows through the
whole reduction with software pipelining, and lets Triton's autotuner pick the block sizes per shape (on the
first call of each shape: run it once before capturing a CUDA graph). More rows, or no GPU: ``F.linear``.

:func:`linear` is a torch custom op, so torch.compile leaves it as one opaque call inside a compiled decode
layer. Importing this module needs ``triton`` (shipped with CUDA builds of torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 16  # at 32 rows cuBLAS was as fast (H100, benchmarks/results/decode_floor)

CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in [
        (16, 256, 4, 4),
        (16, 512, 4, 3),
        (32, 256, 4, 4),
        (32, 256, 8, 4),
        (32, 512, 8, 3),
        (64, 128, 4, 4),
        (64, 256, 8, 3),
        (16, 128, 4, 6),
    ]  # fmt: skip
]


@triton.autotune(configs=CONFIGS, key=["M", "N", "K"])
@triton.jit
def _kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_ym,
            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(tl.cdiv(K, BLOCK_K)):
        kk = i * BLOCK_K + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
        )
        w = tl.load(
            w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0
        )
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("kvshare::gemv", mutates_args=())
def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = max(16, triton.next_power_of_2(m))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    b = bias if bias is not None else weight  # any pointer: not read without HAS_BIAS
    _kernel[grid](x, weight, b, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
                  HAS_BIAS=bias is not None, BLOCK_M=block_m)  # fmt: skip
    return y


@_gemv.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that runs the kernel above for up to MAX_ROWS rows on CUDA (contiguous weight)."""
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or not x.is_cuda or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    return _gemv(x.reshape(rows, x.shape[-1]).contiguous(), weight, bias).view(*x.shape[:-1], weight.shape[0])
