"""Programmatic dependent launch (Hopper and later) for a decode step's Triton kernels: each starts while the
kernel before it ends, asks L2 for what no kernel of the step writes (its weight, the cached K/V) and only then
waits (gdc_wait) for the output it reads (GraphDecoder's ``pdl``; inductor's kernels take part by its
``triton.enable_pdl``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def supported(device) -> bool:
    """Whether kernels on ``device`` can be launched so (a CUDA GPU of compute capability 9.0 or later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(pdl: bool) -> dict:
    """The launch options of a kernel with a ``PDL`` flag."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at ``ptrs`` (no value comes back, so no register is held for it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@triton.jit
def wait_for_inputs():
    """Wait for the kernel before (its writes visible), then let the kernel after start."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
