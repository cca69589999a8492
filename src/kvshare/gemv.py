"""A Triton matrix product for decode steps: ``x @ weight.T + bias`` with few rows (a batch of single tokens),
optionally with a residual added.

With a few rows a Linear layer's product is bound by reading its weight once, and cuBLAS's kernels for
these shapes stop short of the GPU's bandwidth (kvshare's decode diagnostic measured 0.73 of it on an H200).
This kernel gives every program a block of output columns for all rows, streams its weight rows through the
whole reduction with software pipelining, and lets Triton's autotuner pick the block sizes per shape (on the
first call of each shape: run it once before capturing a CUDA graph). More rows, or no GPU: the same
operations in PyTorch (:func:`kvshare.decode.linear_reference`).

GraphDecoder uses it (:func:`linear_product`) for the product alone, with the residual added in the
kernel's last step and the norm before and gated activation after it left to inductor's kernels: a 7B step at
batch 1 took 5.20 ms against 5.40 ms with cuBLAS on an H100 (benchmarks/results/decode_floor/h100-product),
mostly by sparing cuBLAS's split-K reductions and the residual's own kernel. Computing the norm and the gated
activation inside the kernel too cost more than it saved (a step took 5.67 ms against 5.45 with cuBLAS,
h100-gemv; our reading, not profiled: every program repeats the work on x, on BLOCK_M rows however few are
real), so that form was removed. Tried again where kernels' fixed cost sets the step (the small shapes, 6 kernels
a layer instead of 9), it was slower there too: 1.05-1.10× the step, 1.08-1.17× with ``pdl`` (h100-fused).

Launched by programmatic dependent launch (``pdl``, kvshare.pdl; GraphDecoder's ``pdl=True`` uses
:func:`linear_product_pdl`), a program asks L2 for its weight's first columns before it waits on x.

:func:`linear` is a torch custom op, so torch.compile leaves it as one opaque call inside a compiled decode
layer. Importing this module needs ``triton`` (shipped with CUDA builds of torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvshare.decode import activate, linear_reference, rms_norm
from kvshare.pdl import launch_options, prefetch_l2, wait_for_inputs

PREFETCH_K = tl.constexpr(1024)  # weight columns a program asks L2 for before it waits (programmatic dependent launch)

MAX_ROWS = 16  # at 32 rows cuBLAS was faster (H100: 4.53 ms against 4.68 bare; a decode step 10.9 against 13.1 fused)

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
def _kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_rm, stride_ym,
            HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if PDL:  # the weight's first columns, up to PREFETCH_K, one 128-byte line (64 bf16) at a time
        lines = tl.minimum(tl.arange(0, PREFETCH_K // 64) * 64, K - 1)
        prefetch_l2(w_ptr + tl.minimum(rn, N - 1)[:, None] * stride_wn + lines[None, :])
        wait_for_inputs()
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(tl.cdiv(K, BLOCK_K)):
        kk = i * BLOCK_K + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)  # fmt: skip
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K),
                    other=0.0)  # fmt: skip
        acc += tl.dot(x.to(dtype), tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)  # rounded before the residual is added, as PyTorch's modules round it
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if RESIDUAL:
        y = y + tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=mask)


def _launch(kernel, x, weight, bias, residual, pdl=False, **config):
    """``kernel`` (the autotuned one, or its plain ``.fn`` given the blocks in ``config``) over x's rows."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    # Any pointer for the operands a flag leaves unread.
    kernel[grid](x, weight, weight if bias is None else bias, y if residual is None else residual, y, m, n, k,
                 x.stride(0), weight.stride(0), 0 if residual is None else residual.stride(0), y.stride(0),
                 HAS_BIAS=bias is not None, RESIDUAL=residual is not None, BLOCK_M=max(16, triton.next_power_of_2(m)),
                 **launch_options(pdl), **config)  # fmt: skip
    return y


@torch.library.custom_op("kvshare::gemv", mutates_args=())
def _gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, pdl: bool
) -> torch.Tensor:
    return _launch(_kernel, x, weight, bias, residual, pdl)


@_gemv.register_fake
def _(x, weight, bias, residual, pdl):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x, weight, bias=None, residual=None, pdl=False):
    """``x @ weight.T + bias`` (+ ``residual``) by the kernel above for up to MAX_ROWS rows on CUDA (contiguous
    weight; ``pdl``: by programmatic dependent launch, kvshare.pdl), else by PyTorch."""
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or not x.is_cuda or not weight.is_contiguous():
        return linear_reference(x, weight, bias, residual=residual)
    flat = x.reshape(rows, x.shape[-1]).contiguous()
    res = None if residual is None else residual.reshape(rows, -1).contiguous()
    return _gemv(flat, weight, bias, res, pdl).view(*x.shape[:-1], weight.shape[0])


def linear_product(x, weight, bias=None, norm=None, eps: float = 0.0, act: str | None = None, residual=None,
                   pdl=False):  # fmt: skip
    """:func:`kvshare.decode.linear_reference` with only the product (and the residual, where no activation
    follows it) computed by :func:`linear`'s kernel: the norm before and the activation after it by PyTorch
    (inductor's kernels, in a compiled decode step)."""
    if norm is not None:
        x = rms_norm(x, norm, eps)
    if act is None:
        return linear(x, weight, bias, residual=residual, pdl=pdl)
    return activate(linear(x, weight, bias, pdl=pdl), act, residual)


def linear_product_pdl(x, weight, bias=None, norm=None, eps: float = 0.0, act: str | None = None, residual=None):
    """:func:`linear_product` by programmatic dependent launch (GraphDecoder's ``pdl``)."""
    return linear_product(x, weight, bias, norm, eps, act, residual, pdl=True)
