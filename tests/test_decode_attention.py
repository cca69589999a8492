"""kvshare.decode_attention's split-KV kernels equal a plain softmax attention per query head, over the cache up to
pos, for equal, unequal and single KV-head groups (run by Triton's CPU interpreter, which tests/conftest.py turns
on)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _scalar_index(monkeypatch):
    """Triton 3.5's interpreter makes a loop bound an int by int() of a 1-element array, which numpy 2.4 refuses (the
    kernel's loop is bounded by its program id and pos); later Triton takes the element."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor):
        patch(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.item())

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


GQA = [[0, 1], [2, 3], [4, 5], [6, 7]]
UNEQUAL = [[5, 0, 2], [1], [3, 4, 6, 7]]
MQA = [list(range(8))]


def _rows(groups):
    gm = max(len(g) for g in groups)
    return torch.tensor([g + [-1] * (gm - len(g)) for g in groups], dtype=torch.int32)


def _reference(query, keys, values, pos, groups, scaling):
    out = torch.empty_like(query)
    for kv, group in enumerate(groups):
        k, v = keys[:, kv, : pos + 1], values[:, kv, : pos + 1]
        for h in group:
            scores = torch.einsum("bd,bnd->bn", query[:, h], k) * scaling
            out[:, h] = torch.einsum("bn,bnd->bd", scores.softmax(-1), v)
    return out


def _check(groups, batch=1, max_len=128, pos=70, d=16):
    from kvshare.decode_attention import attention

    torch.manual_seed(0)
    n_heads = sum(len(g) for g in groups)
    query = torch.randn(batch, n_heads, d)
    keys, values = torch.randn(2, batch, len(groups), max_len, d).unbind(0)
    keys[:, :, pos + 1 :], values[:, :, pos + 1 :] = float("nan"), float("inf")  # unwritten cache: never read
    out = attention(query, keys, values, torch.tensor([pos]), _rows(groups), d**-0.5)
    assert out.shape == query.shape and not out.isnan().any()
    assert (out - _reference(query, keys, values, pos, groups, d**-0.5)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    ("groups", "batch", "max_len", "pos", "d"),
    [
        (GQA, 1, 128, 70, 16),
        (UNEQUAL, 1, 200, 0, 16),  # max_len not a multiple of BLOCK_N; all but the first chunk past pos
        (UNEQUAL, 2, 200, 100, 32),
        (UNEQUAL, 1, 200, 199, 16),
        (MQA, 2, 130, 129, 16),
    ],
)
def test_equals_reference(groups, batch, max_len, pos, d):
    _check(groups, batch, max_len, pos, d)


def test_long_chunks_and_merge_steps(monkeypatch):
    """Chunks of several blocks (few programs wanted), and more chunks than the merge reads in one step."""
    import kvshare.decode_attention as da

    monkeypatch.setattr(da, "BLOCK_N", 16)
    monkeypatch.setattr(da, "BLOCK_S", 4)
    assert da._splits(1, 3, 200, da._programs(torch.device("cpu"))) == (13, 16)
    _check(UNEQUAL, max_len=200, pos=150)
    monkeypatch.setattr(da, "SMS", 6)
    assert da._splits(1, 3, 200, da._programs(torch.device("cpu"))) == (5, 48)
    _check(UNEQUAL, max_len=200, pos=150)
    _check(UNEQUAL, max_len=200, pos=40)


def test_one_chunk_writes_the_output_itself(monkeypatch):
    """Where one chunk covers the context (few programs wanted: large batches), the first kernel writes the output
    without the merge."""
    import kvshare.decode_attention as da

    monkeypatch.setattr(da, "SMS", 1)
    assert da._splits(2, 4, 128, da._programs(torch.device("cpu")))[0] == 1
    _check(GQA, batch=2, max_len=128, pos=90)
    _check(UNEQUAL, batch=2, max_len=200, pos=0)


def test_splits_fill_the_gpu_from_shapes():
    from kvshare.decode_attention import BLOCK_N, _splits

    assert _splits(1, 8, 4096, 264) == (64, BLOCK_N)  # 33 chunks wanted of 64 blocks: one a chunk
    assert _splits(4, 8, 4096, 264) == (10, 7 * BLOCK_N)  # 9 wanted: 7 blocks a chunk
    assert _splits(64, 8, 4096, 264) == (1, 4096)
    assert _splits(1, 1, 100, 264) == (2, BLOCK_N)  # at most one chunk a block
    assert _splits(1, 8, 4096, 216) == (32, 2 * BLOCK_N)  # an A100's 108 multiprocessors: 27 wanted
    splits, chunk = _splits(2, 3, 5000, 264)
    assert 2 * 3 * splits >= 264 and chunk % BLOCK_N == 0 and (splits - 1) * chunk < 5000 <= splits * chunk


def test_rotates_a_strided_query_as_transformers_does():
    """Given cos and sin, the query (here a slice of a wider fused product's rows) is rotated as transformers'
    Llama rotates it before attending; one of the two alone is refused."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvshare.decode_attention import attention

    torch.manual_seed(0)
    batch, d, pos = 2, 16, 50
    fused = torch.randn(batch, 8 * d + 5)  # the query's heads, then other columns
    query = fused[:, : 8 * d].view(batch, 8, d)
    angle = torch.rand(batch, 1, d // 2) * 6
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    keys, values = torch.randn(2, batch, len(UNEQUAL), 64, d).unbind(0)
    out = attention(query, keys, values, torch.tensor([pos]), _rows(UNEQUAL), 0.25, cos, sin)
    turned = apply_rotary_pos_emb(query.unsqueeze(2), query.unsqueeze(2), cos, sin)[0].squeeze(2)
    assert (out - _reference(turned, keys, values, pos, UNEQUAL, 0.25)).abs().max() <= 1e-4
    assert (out - _reference(query, keys, values, pos, UNEQUAL, 0.25)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="both cos and sin"):
        attention(query, keys, values, torch.tensor([pos]), _rows(UNEQUAL), 0.25, cos)
    with pytest.raises(ValueError, match=r"\(2, 1, 8\)"):
        attention(query, keys, values, torch.tensor([pos]), _rows(UNEQUAL), 0.25, cos[..., :8], sin[..., :8])


@pytest.mark.parametrize("pos", [0, 37, 63])
def test_writes_the_new_entry_then_attends_to_it(pos):
    """Given the position's key and value, the kernel writes them into the cache at pos (the key rotated as
    transformers rotates it) and attends to them; every other position of the cache is left as it was."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvshare.decode_attention import attention

    torch.manual_seed(0)
    batch, d, groups = 2, 16, UNEQUAL
    fused = torch.randn(batch, (8 + 2 * len(groups)) * d)  # q, k and v heads of one fused product
    query, key, value = (t.view(batch, -1, d) for t in fused.split([8 * d, len(groups) * d, len(groups) * d], -1))
    angle = torch.rand(batch, 1, d // 2) * 6
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    keys, values = torch.randn(2, batch, len(groups), 64, d).unbind(0)
    before_k, before_v = keys.clone(), values.clone()
    out = attention(query, keys, values, torch.tensor([pos]), _rows(groups), 0.25, cos, sin, key, value)
    turned_key = apply_rotary_pos_emb(key.unsqueeze(2), key.unsqueeze(2), cos, sin)[0].squeeze(2)
    assert (keys[:, :, pos] - turned_key).abs().max() <= 1e-5 and torch.equal(values[:, :, pos], value)
    others = torch.arange(64) != pos
    assert torch.equal(keys[:, :, others], before_k[:, :, others])
    assert torch.equal(values[:, :, others], before_v[:, :, others])
    turned = apply_rotary_pos_emb(query.unsqueeze(2), query.unsqueeze(2), cos, sin)[0].squeeze(2)
    assert (out - _reference(turned, keys, values, pos, groups, 0.25)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match=r"key and value of shape \(2, 3, 16\)"):
        attention(query, keys, values, torch.tensor([pos]), _rows(groups), 0.25, cos, sin, key)


def test_half_precision():
    """fp16 (the interpreter's tl.dot reads bf16 as integers: bf16 is left to the GPU)."""
    from kvshare.decode_attention import attention

    torch.manual_seed(0)
    query, keys, values = torch.randn(1, 4, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    rows = _rows([[0, 3], [1, 2]])
    out = attention(query.half(), keys.half(), values.half(), torch.tensor([40]), rows, 0.25)
    assert out.dtype == torch.float16
    ref = _reference(query, keys, values, 40, [[0, 3], [1, 2]], 0.25)
    assert (out.float() - ref).abs().max() <= 1e-2


def test_head_dim_power_of_two():
    from kvshare.decode_attention import attention

    x = torch.zeros(1, 2, 24)
    with pytest.raises(ValueError, match="24"):
        attention(x, x.view(1, 1, 2, 24), x.view(1, 1, 2, 24), torch.tensor([0]), _rows([[0, 1]]), 1.0)


@pytest.mark.parametrize("method", ["gqa", "qcqa-ac", "qcqa-ec", "cla2", "mqa", "qcqa-ac+cla2"])
@torch.no_grad()
def test_graph_decoder_with_the_kernel_equals_reference(method, monkeypatch):
    """GraphDecoder(attention="triton") passes each layer's query heads, cache and groups to the kernel as it
    expects, the new K/V entries written by it, its chunks merged: the reference path's tokens and last-step
    logits (eager layers, the kernel interpreted)."""
    import kvshare.decode_attention as da
    from kvshare.decode import GraphDecoder
    from kvshare.merge import convert_model
    from kvshare.plan import ModelShape
    from tests.builders import tiny_llama
    from tests.test_decode import reference
    from tests.test_modeling import greedy, plans, tokens

    base = tiny_llama(heads=8, kv_heads=4, layers=4)
    plan = plans(ModelShape.of(base.config))[method]
    monkeypatch.setattr(da, "BLOCK_N", 16)  # several chunks of this short cache, so they are merged
    x, new = tokens(batch=2, length=40), 4
    assert da._splits(2, 4, x.shape[1] + new - 1, da._programs(torch.device("cpu")))[0] == 3
    expected = greedy(reference(base, plan), x, new)
    decoder = GraphDecoder(convert_model(base, plan), 2, x.shape[1] + new - 1, attention="triton", backend=None)
    assert torch.equal(decoder.generate(x, new), expected.sequences)
    cached = x.shape[1] + new - 1
    logits = decoder.step(expected.sequences[:, cached - 1 : cached], torch.tensor([cached - 1]))
    assert (logits - expected.logits[-1]).abs().max() <= 1e-4
