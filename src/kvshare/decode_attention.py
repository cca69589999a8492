"""Triton split-KV ("flash-decoding") attention for one decode token per sequence, query heads grouped onto
KV heads in unequal, non-contiguous groups.

A decode step's attention is bound by reading the cached K/V, and one program per (sequence, KV head) leaves
most of the GPU idle at small batch; torch's kernels also want equal, contiguous groups (GQA), so kvshare's
groups cost a gather of the query rows before and a scatter after. Here each program gathers its KV head's
query rows itself (by ``rows``), rotating them by the position's rotary cos/sin as it loads them (so a step
has no kernel of its own for that), walks one chunk of the context with an online softmax, reading that K/V
once for all of them, and writes a partial output with its log-sum-exp; a second kernel merges the chunks
into each query head's output, in the query's own head order. Where one chunk is the whole context (large
batches) the first kernel writes the output itself: the merge read and wrote every output again for nothing
(5.1 of a 59.5 ms step, MQA at batch 1959 on an H100). The position is read on the device and the grid
depends on shapes alone, so a CUDA graph can replay the step at any position.

Given the position's new key and value, the program whose chunk holds the position writes them into the cache
(the key rotated) before reading it, its threads waiting on a barrier: two kernels a layer fewer than
inductor's rotation and writes (on an H100, 1-3% off a 7B step at batch 1 and 32). Merging the chunks in the
attention kernel's last program instead, by an atomic count, measured slower there (MQA at batch 1: 5.03
against 4.67 ms), so the merge keeps its own kernel.

Launched by programmatic dependent launch (``pdl``, kvshare.pdl), the chunk kernel asks L2 for its chunk's first
entries before it waits on the q/k/v product, and the merge kernel starts as the chunk kernel ends.

:func:`attention` is a torch custom op, so torch.compile leaves it as one opaque call inside a compiled decode
layer. Importing this module needs ``triton`` (shipped with CUDA builds of torch).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvshare.pdl import launch_options, prefetch_l2, wait_for_inputs

BLOCK_N = 64  # context positions per step of a chunk's walk
WARPS, STAGES = 4, 2  # the partial kernel's warps and software-pipelining stages
SMS = 132  # an H100's or H200's multiprocessors: the count off CUDA (Triton's interpreter)
BLOCK_S = 16  # chunks the merge reads per step
PREFETCH_N = tl.constexpr(128)  # cached positions a program asks L2 for before it waits (programmatic dependent launch)


@triton.jit
def _rotated(row, rd, cos, sin, mask, HEAD_DIM: tl.constexpr):
    """x·cos + rotate_half(x)·sin in float32 for the rows x at ``row`` (pointers [rows, 1]), rotate_half(x) =
    [-x[d/2:], x[:d/2]] (transformers' Llama)."""
    half = HEAD_DIM // 2
    x = tl.load(row + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    turned = tl.load(row + ((rd + half) % HEAD_DIM)[None, :], mask=mask, other=0.0).to(tl.float32)
    turned = tl.where(rd[None, :] < half, -turned, turned)
    return x * cos[None, :] + turned * sin[None, :]


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, rows_ptr, cos_ptr, sin_ptr, nk_ptr, nv_ptr, o_ptr, lse_ptr,
                    qk_scale, n_heads, splits, chunk, stride_qb, stride_qh, stride_kb, stride_kh, stride_cb,
                    stride_nb, stride_nh, GM: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr,
                    STORE: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # a large cache's offsets pass 2**31
    kv = tl.program_id(1)
    split = tl.program_id(2)
    pos = tl.load(pos_ptr)  # written by the step before
    if PDL:  # the chunk's first PREFETCH_N cached entries (no kernel of this step writes them but this one)
        at = tl.minimum(split * chunk + tl.arange(0, PREFETCH_N), tl.minimum(pos, (split + 1) * chunk - 1))
        lines = b * stride_kb + kv * stride_kh + at[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM // 64)[None, :] * 64
        prefetch_l2(k_ptr + lines)
        prefetch_l2(v_ptr + lines)
        wait_for_inputs()
    rm = tl.arange(0, BLOCK_M)
    rd = tl.arange(0, HEAD_DIM)
    head = tl.load(rows_ptr + kv * GM + rm, mask=rm < GM, other=-1)
    live = head >= 0  # padding rows compute on zeros and are not stored
    q_row = q_ptr + b * stride_qb + head[:, None] * stride_qh
    if ROPE:
        cos = tl.load(cos_ptr + b * stride_cb + rd).to(tl.float32)
        sin = tl.load(sin_ptr + b * stride_cb + rd).to(tl.float32)
        q = _rotated(q_row, rd, cos, sin, live[:, None], HEAD_DIM)
    else:
        q = tl.load(q_row + rd[None, :], mask=live[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    start = split * chunk
    end = tl.minimum(start + chunk, pos + 1)  # a chunk past pos takes no step
    k_ptr += b * stride_kb + kv * stride_kh
    v_ptr += b * stride_kb + kv * stride_kh
    if STORE:  # the chunk holding pos writes its new entry (key rotated) before reading it, all threads waiting
        if (start <= pos) & (pos < end):
            new = b * stride_nb + kv * stride_nh
            key = _rotated(nk_ptr + new + tl.zeros((1, 1), tl.int64), rd, cos, sin, rd[None, :] >= 0, HEAD_DIM)
            tl.store(k_ptr + pos * HEAD_DIM + rd[None, :], key.to(k_ptr.dtype.element_ty))
            tl.store(v_ptr + pos * HEAD_DIM + rd, tl.load(nv_ptr + new + rd))
        tl.debug_barrier()
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for n in range(start, end, BLOCK_N):
        rn = n + tl.arange(0, BLOCK_N)
        valid = rn < end  # positions past pos may hold anything: not even loaded
        kv_off = rn[:, None] * HEAD_DIM + rd[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
        qk = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: a step's first position is valid
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # a chunk past pos: output 0 and log-sum-exp -inf, which the merge ignores
    row = (b * n_heads + head) * splits + split
    if not DIRECT:  # one chunk (DIRECT): o is the output, nothing to merge
        tl.store(lse_ptr + row, m_i + tl.log2(l_safe), mask=live)
    out = (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + row[:, None] * HEAD_DIM + rd[None, :], out, mask=live[:, None])


@triton.jit
def _combine_kernel(o_ptr, lse_ptr, out_ptr, n_heads, splits, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                    PDL: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    if PDL:  # all it reads is the chunk kernel's output
        wait_for_inputs()
    bh = tl.program_id(0).to(tl.int64) * n_heads + tl.program_id(1)
    rd = tl.arange(0, HEAD_DIM)
    rs = tl.arange(0, BLOCK_S)
    all_s = tl.arange(0, SPLITS)
    m = tl.max(tl.load(lse_ptr + bh * splits + all_s, mask=all_s < splits, other=float("-inf")), 0)
    acc = tl.zeros((BLOCK_S, HEAD_DIM), tl.float32)
    den = tl.zeros((BLOCK_S,), tl.float32)
    for s in range(0, splits, BLOCK_S):  # in steps: all chunks' outputs at once would spill registers
        rows = bh * splits + s + rs
        mask = s + rs < splits
        w = tl.exp2(tl.load(lse_ptr + rows, mask=mask, other=float("-inf")) - m)
        acc += w[:, None] * tl.load(o_ptr + rows[:, None] * HEAD_DIM + rd[None, :], mask=mask[:, None], other=0.0)
        den += w
    out = tl.sum(acc, 0) / tl.sum(den, 0)
    tl.store(out_ptr + bh * HEAD_DIM + rd, out.to(out_ptr.dtype.element_ty))


def _merge_warps(splits: int) -> int:
    """The merge kernel's warps: one where a program merges its chunks in one step, so the sum over chunks stays
    in the warp (compiled for sm_90: no shared memory and no barrier, against 2 KB and 4 with 4 warps; MQA at
    batch 32 on an H100, 11 chunks: 2.5 µs a layer against 4.5), else 4 (batch 1's 33 chunks: with 1 or 2 warps
    the merge took 3-13% longer)."""
    return 1 if splits <= BLOCK_S else 4


def _programs(device) -> int:
    """Partial-kernel programs to aim for: two per multiprocessor."""
    return 2 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else SMS)


def _splits(batch: int, n_kv: int, max_len: int, programs: int) -> tuple[int, int]:
    """The number of chunks and each one's length."""
    blocks = triton.cdiv(max_len, BLOCK_N)
    # From static shapes alone (a CUDA graph replays it at every position): whole blocks of BLOCK_N positions a
    # chunk, as many as still leave batch × n_kv × chunks at least ``programs`` (one block a chunk where the context
    # is too short for that), and no chunk starting past max_len.
    per_chunk = max(1, blocks // triton.cdiv(programs, batch * n_kv))
    return triton.cdiv(blocks, per_chunk), per_chunk * BLOCK_N


@torch.library.custom_op("kvshare::decode_attention", mutates_args=("keys", "values"))
def attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor,
    scaling: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Each query head's attention over its KV head's cache up to ``pos`` (inclusive). query [batch, n_heads,
    head_dim], each head's values contiguous (a slice of a fused q/k/v product will do); keys and values [batch,
    n_kv, max_len, head_dim], contiguous; pos a 1-element long tensor on the device; rows int32 [n_kv, GM]: the
    query heads that read each KV head, padded with -1; cos and sin [batch, 1, head_dim], each row contiguous
    (transformers' rotary embedding of the position): given, the query is rotated by them first; key and value
    [batch, n_kv, head_dim], each head contiguous, alike in strides: the position's new entry, which the kernel
    writes into the cache at pos (the key rotated by cos and sin) before attending to it; pdl: launch the kernels
    by programmatic dependent launch (kvshare.pdl). Returns [batch, n_heads, head_dim] in the query's dtype and
    head order."""
    batch, n_heads, d = query.shape
    n_kv, max_len = keys.shape[1], keys.shape[2]
    gm = rows.shape[1]
    if d & (d - 1):
        raise ValueError(f"decode attention needs a power-of-2 head_dim, got {d}")
    if query.stride(2) != 1 or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError(
            "decode attention reads each query head, the keys and the values as contiguous: pass .contiguous()"
        )
    rope = cos is not None
    if rope != (sin is not None):
        raise ValueError("decode attention rotates the query by both cos and sin or by neither: pass both or None")
    if rope and not (cos.shape == sin.shape == (batch, 1, d) and cos.stride() == sin.stride() and cos.stride(2) == 1):
        raise ValueError(
            f"decode attention's cos and sin are [batch, 1, head_dim] = ({batch}, 1, {d}), alike and each row "
            f"contiguous, got {tuple(cos.shape)} and {tuple(sin.shape)}: pass transformers' rotary embedding of "
            "the position"
        )
    store = key is not None
    if store and not (rope and value is not None and key.shape == value.shape == (batch, n_kv, d)
                      and key.stride() == value.stride() and key.stride(2) == 1):  # fmt: skip
        raise ValueError(
            f"decode attention writes a new entry given key and value of shape ({batch}, {n_kv}, {d}), alike in "
            f"strides with each head contiguous, and cos and sin to rotate the key: got key "
            f"{None if key is None else tuple(key.shape)} and value {None if value is None else tuple(value.shape)}"
        )
    splits, chunk = _splits(batch, n_kv, max_len, _programs(query.device))
    out = query.new_empty(batch, n_heads, d)
    direct = splits == 1
    o = out if direct else torch.empty(batch, n_heads, splits, d, dtype=torch.float32, device=query.device)
    lse = out if direct else torch.empty(batch, n_heads, splits, dtype=torch.float32, device=query.device)
    cos, sin = (cos, sin) if rope else (query, query)  # not read
    key, value = (key, value) if store else (query, query)
    launch = launch_options(pdl)
    _partial_kernel[(batch, n_kv, splits)](query, keys, values, pos, rows, cos, sin, key, value, o, lse,
                                           scaling * math.log2(math.e), n_heads, splits, chunk, query.stride(0),
                                           query.stride(1), keys.stride(0), keys.stride(1), cos.stride(0),
                                           key.stride(0), key.stride(1), GM=gm, HEAD_DIM=d, ROPE=rope, STORE=store,
                                           DIRECT=direct, BLOCK_M=max(16, triton.next_power_of_2(gm)), BLOCK_N=BLOCK_N,
                                           num_warps=WARPS, num_stages=STAGES, **launch)  # fmt: skip
    if not direct:
        _combine_kernel[(batch, n_heads)](o, lse, out, n_heads, splits, HEAD_DIM=d,
                                          SPLITS=triton.next_power_of_2(splits), BLOCK_S=BLOCK_S,
                                          num_warps=_merge_warps(splits), **launch)  # fmt: skip
    return out


@attention.register_fake
def _(query, keys, values, pos, rows, scaling, cos=None, sin=None, key=None, value=None, pdl=False):
    return query.new_empty(query.shape)
