"""Decoding at the memory-bandwidth bound: a static cache and a compiled (CUDA-graph) decode step, in one call.

A decode step reads every weight and every cached K/V once, so its floor is
``(weight bytes + batch × context × KV bytes per token) / bandwidth``
(:func:`floor_seconds`). Eager PyTorch spends most of a small-batch step launching
kernels; ``generate`` with a static cache and a compiled forward (torch.compile's
"reduce-overhead" mode: CUDA graphs) replays the whole step as one graph instead.

    model = compile_for_decode(model)                       # once
    cache = static_cache(model, batch_size=8, max_cache_len=prompt + new)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new, do_sample=False)

Prefill runs eagerly (its shape changes from call to call); the decode steps run the
compiled graph. Works for kvshare models (:class:`kvshare.modeling.KVShareStaticCache`)
and plain Llama-family models (transformers' ``StaticCache``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple


def compile_for_decode(
    model, backend: str = "inductor", mode: str | None = "reduce-overhead", all_devices=False, attention=None
):
    """Make ``generate`` with a static cache compile the decode step, as one graph (fullgraph: a graph break
    raises rather than silently splitting the CUDA graph). ``all_devices`` also compiles off CUDA (tests: CPU with
    ``backend="eager"``); ``attention`` ("sdpa" or "matmul") picks a kvshare model's decode attention. Returns
    the model."""
    from transformers import CompileConfig

    from kvshare.modeling import SharedKVAttention

    for module in model.modules():
        if attention is not None and isinstance(module, SharedKVAttention):
            module.decode_attention = attention

    config = CompileConfig(fullgraph=True, backend=backend, mode=mode)
    if all_devices:
        config._compile_all_devices = True
    model.generation_config.compile_config = config
    return model


def static_cache(model, batch_size: int, max_cache_len: int):
    """A preallocated cache for ``model``: KVShareStaticCache for a kvshare model (exactly the plan's K/V bytes),
    transformers' StaticCache for any other."""
    from transformers import StaticCache

    from kvshare.modeling import KVShareLlamaConfig, KVShareStaticCache

    dtype, device = model.dtype, model.device
    if isinstance(model.config, KVShareLlamaConfig):
        return KVShareStaticCache(model.config, max_cache_len, batch_size, dtype, device)
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    cache.early_initialization(batch_size, model.config.num_key_value_heads, model.config.head_dim, dtype, device)
    return cache


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V bytes one sequence caches per token: kvshare's per-layer counts, or a plain model's."""
    if hasattr(config, "cache_bytes_per_token"):
        return config.cache_bytes_per_token(dtype_bytes)
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes


def kv_read_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V bytes a decode step's attention reads per cached token: more than the cache holds where CLA layers
    attend to an earlier layer's entry (a floor counting them: ``floor_seconds`` with this as ``kv_per_token``)."""
    if hasattr(config, "read_bytes_per_token"):
        return config.read_bytes_per_token(dtype_bytes)
    return kv_bytes_per_token(config, dtype_bytes)


def floor_seconds(weight_bytes: int, kv_per_token: int, batch: int, context: int, bandwidth: float) -> float:
    """The memory-bound floor of one decode step: every weight and every cached K/V read once."""
    return (weight_bytes + batch * context * kv_per_token) / bandwidth


class LayerSpec(NamedTuple):
    """What a decode layer's kernels depend on besides its tensors: layers alike in these share one compile."""

    stores: bool  # writes its own K/V (else reads an earlier layer's: CLA)
    n_kv: int
    gmax: int  # query rows per KV head (the largest group; smaller ones padded)
    head_dim: int
    scaling: float
    eps: float
    qkv_sizes: tuple[int, ...]
    act: str  # the MLP's activation, a transformers ACT2FN name
    attention: str
    linear: Callable  # linear_reference or kvshare.gemv.linear_product(_pdl)
    pdl: bool  # the attention's kernels by programmatic dependent launch (kvshare.pdl)


def _fuse(linears) -> tuple:
    """Linear layers that read one input as one weight (and bias), their rows in order: one matrix product per
    step instead of one per layer. The layers' parameters become views of it, so fusing costs no memory and
    the model computes exactly as before."""
    import torch
    from torch import nn

    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start : start + n], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + n], requires_grad=m.bias.requires_grad)
        start += n
    return weight, bias


def rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm."""
    import torch

    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def linear_reference(x, weight, bias=None, norm=None, eps: float = 0.0, act: str | None = None, residual=None):
    """A Linear layer's product with what surrounds it in a decoder layer: ``x`` RMS-normed by ``norm`` (weight,
    ``eps``) first; with ``act``, the weight's rows are [gate; up] and the output ``act(gate) * up``;
    ``residual`` added last, as PyTorch's modules compute it."""
    import torch.nn.functional as F

    if norm is not None:
        x = rms_norm(x, norm, eps)
    return activate(F.linear(x, weight, bias), act, residual)


def activate(y, act: str | None, residual=None):
    """What follows a product in linear_reference: with ``act``, y's halves are [gate; up] and the output
    ``act(gate) * up``; ``residual`` added last."""
    from transformers.activations import ACT2FN

    if act is not None:
        gate, up = y.chunk(2, -1)
        y = ACT2FN[act](gate) * up
    return y if residual is None else residual + y


def _decode_attention(rows, keys, values, pos, spec: LayerSpec):
    """One token's query rows per KV head [batch, n_kv, gmax, d] over the whole cache, positions after ``pos``
    masked, each KV head read once."""
    import torch
    import torch.nn.functional as F

    from kvshare.modeling import _matmul_attention

    if spec.attention == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        def up_to_pos(score, b, h, q, kv):
            return torch.where(kv <= pos[0], score, -float("inf"))

        # As one query token per query head, grouped onto its KV head (GQA): FlexAttention's decode kernel, which
        # splits the context across the GPU (rows as a query length of gmax would not split it: 88 µs a layer
        # at batch 1 against 5.8 µs of reading on an H100, benchmarks/results/decode_floor).
        batch, n_kv, gmax, d = rows.shape
        one = rows.reshape(batch, n_kv * gmax, 1, d)
        out = flex_attention(one, keys, values, score_mod=up_to_pos, scale=spec.scaling, enable_gqa=gmax > 1)
        return out.view(batch, n_kv, gmax, d)
    valid = (torch.arange(keys.shape[2], device=keys.device) <= pos).view(1, 1, 1, -1)
    if spec.attention == "matmul":
        return _matmul_attention(rows, keys, values, valid, spec.scaling)
    return F.scaled_dot_product_attention(rows, keys, values, attn_mask=valid, scale=spec.scaling)


def _torch_attention(query, new, pos, cos, sin, keys, values, slots, unslots, spec: LayerSpec):
    """The step's attention by torch (``spec.attention`` flex, sdpa or matmul): the query [batch, heads × head_dim]
    and, in a layer that stores its own K/V (``new``: key and value; empty in a CLA reader), the key rotated by
    cos and sin, the new entry written at ``pos``, then each KV head's query rows (unequal groups padded) over the
    cache. Returns [batch, heads, head_dim] in the query's head order."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, d = query.shape[0], spec.head_dim
    query = query.view(batch, 1, -1, d).transpose(1, 2)
    if new:
        key, value = (p.view(batch, 1, -1, d).transpose(1, 2) for p in new)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        keys.index_copy_(2, pos, key)
        values.index_copy_(2, pos, value)
    else:
        query = apply_rotary_pos_emb(query, query, cos, sin)[0]
    if slots is not None:
        query = query.index_select(1, slots)
    out = _decode_attention(query.reshape(batch, spec.n_kv, spec.gmax, d), keys, values, pos, spec)
    out = out.reshape(batch, -1, d)
    return out if unslots is None else out.index_select(1, unslots)


def _decode_layer(x, pos, cos, sin, keys, values, w: tuple, spec: LayerSpec):
    """One decoder layer for one token per sequence, x [batch, 1, hidden]; writes the layer's K/V at ``pos``.
    ``w``: input norm, fused q/k/v weight and bias, query slot and unslot indices (unequal groups; else None),
    each KV head's query heads (``rows``, for attention "triton"), o weight and bias, post-attention norm, fused
    gate/up weight and bias, down weight and bias."""
    ln1, qkv_w, qkv_b, slots, unslots, rows, o_w, o_b, ln2, gu_w, gu_b, down_w, down_b = w
    batch, d = x.shape[0], spec.head_dim
    query, *new = spec.linear(x, qkv_w, qkv_b, ln1, spec.eps).split(spec.qkv_sizes, -1)
    if spec.attention == "triton":  # rotates the query, writes the new K/V and gathers each KV head's rows itself
        from kvshare.decode_attention import attention

        new = [p.view(batch, -1, d) for p in new]
        query = query.view(batch, -1, d)
        out = attention(query, keys, values, pos, rows, spec.scaling, cos, sin, *new, pdl=spec.pdl)
    else:
        out = _torch_attention(query, new, pos, cos, sin, keys, values, slots, unslots, spec)
    x = spec.linear(out.reshape(batch, 1, -1), o_w, o_b, residual=x)
    hidden = spec.linear(x, gu_w, gu_b, ln2, spec.eps, act=spec.act)
    return spec.linear(hidden, down_w, down_b, residual=x)


def _check_pdl(device, batch_size: int, attention: str, gemv: str) -> None:
    """Refuse GraphDecoder's pdl=True where it cannot run, and beyond kvshare.gemv's rows: there cuBLAS's products
    and inductor's norms ran no faster so launched, and at the 7B shape their outputs differed from the plain
    launch's by up to 0.10 in logits of about 5.5, for a reason not established (H100,
    benchmarks/results/decode_floor/h100-pdl)."""
    from kvshare.pdl import supported

    if not (supported(device) and attention == "triton" and gemv == "triton"):
        raise ValueError(
            f"pdl=True launches the triton attention's and gemv's kernels on a GPU of compute capability 9.0 or "
            f"later, but attention={attention!r}, gemv={gemv!r} on {device}: pass pdl=False"
        )
    from kvshare.gemv import MAX_ROWS

    if batch_size > MAX_ROWS:
        raise ValueError(
            f"pdl=True is for batches of up to {MAX_ROWS} (kvshare.gemv's products), got batch_size={batch_size}: "
            "pass pdl=False"
        )


class GraphDecoder:
    """Greedy decoding of a kvshare model at the memory-bandwidth bound: each decode step is a fixed sequence of
    kernels replayed from a CUDA graph, several steps per graph, with no Python work and no device sync per token.

        decoder = GraphDecoder(model, batch_size=8, max_cache_len=prompt + new)   # once: fuses, compiles, captures
        out = decoder.generate(ids, max_new_tokens=new)                           # as generate(do_sample=False)

    The prefill is the model's own forward into a :class:`kvshare.modeling.KVShareStaticCache` (``decoder.cache``:
    exactly the plan's K/V bytes). A decode step reads the model's weights and that cache as they are: q/k/v and
    gate/up projections fused into one product each (:func:`_fuse`); each KV head's query heads, unequal groups
    padded to the largest, are the query rows of one attention over its cached K/V, so every KV head is read
    once (``attention``: "triton", the default on CUDA, kvshare.decode_attention's split-context kernel, which
    gathers each KV head's query heads itself, with no padding; "flex", the default elsewhere, torch's
    FlexAttention, whose decode kernel splits the context across the GPU; "sdpa" or "matmul" as in
    kvshare.modeling); a CLA layer reads its producer's entry. The
    position is a device tensor the graph advances, and each step writes its token into a device buffer.

    Each layer is compiled on its own (``backend``; None runs eagerly), so layers alike share one compile, or the
    whole step as one (``compile_unit="step"``: fewer kernels, as each residual joins the next norm, but a slower
    step on an H100, 5.45 against 5.32 ms at batch 1). The model stays a transformers model (``generate`` still
    works); build the decoder after moving the model to its device, since the graphs hold the addresses of its
    weights. Off CUDA (tests) the steps run without a graph.
    ``gemv`` picks the decode step's matrix products on CUDA: "triton", the default (kvshare.gemv's kernel for up
    to 16 rows, torch's beyond, the residuals added inside it, the norms and activation by inductor's kernels
    around it: a 7B step at batch 1 took 5.20 ms against 5.40 with "cublas" on an H100) or "cublas" (torch's).
    ``pdl=True`` (a GPU of compute capability 9.0 or later, both "triton" options, batches of up to 16) launches
    the step's kernels by programmatic dependent launch (kvshare.pdl), each starting while the one before ends:
    on an H100 a small model's step at batch 1 took 0.79× the time (SmolLM2-135M) or 0.85-0.87× (12 MHA layers),
    0.83-0.89× at batch 16, with outputs equal bit for bit, but a 7B step 1.00-1.01× at batch 1 and 1.02× at 16
    (benchmarks/results/decode_floor/h100-pdl): so it is off unless asked for.
    """

    def __init__(self, model, batch_size, max_cache_len, attention=None, steps_per_graph=8, backend="inductor",
                 gemv="triton", compile_unit="layer", pdl=False):  # fmt: skip
        import torch

        from kvshare.modeling import KVShareLlamaConfig, KVShareStaticCache

        if not isinstance(model.config, KVShareLlamaConfig):
            raise TypeError(
                f"GraphDecoder needs a kvshare model, got model_type={model.config.model_type!r}: "
                "convert it with kvshare.merge.convert_model, or use compile_for_decode with generate"
            )
        if attention is None:  # the fastest measured on CUDA (H100, batch 1 and 32); the others run anywhere
            attention = "triton" if model.device.type == "cuda" else "flex"
        if attention not in ("flex", "sdpa", "matmul", "triton"):
            raise ValueError(f"attention={attention!r} is not one of flex, sdpa, matmul, triton")
        if attention == "triton" and model.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"attention='triton' runs on CUDA (or under TRITON_INTERPRET=1), but the model is on "
                f"{model.device}: move it to a GPU, or pick attention='flex', 'sdpa' or 'matmul'"
            )
        if gemv not in ("cublas", "triton"):
            raise ValueError(f"gemv={gemv!r} is not one of cublas, triton")
        if compile_unit not in ("layer", "step"):
            raise ValueError(f"compile_unit={compile_unit!r} is not one of layer, step")
        if pdl:
            _check_pdl(model.device, batch_size, attention, gemv)
        self.model, self.steps_per_graph, self.device = model, steps_per_graph, model.device
        self.cache = KVShareStaticCache(model.config, max_cache_len, batch_size, model.dtype, self.device)
        linear = linear_reference
        if gemv == "triton" and self.device.type == "cuda":
            from kvshare import gemv as products

            linear = products.linear_product_pdl if pdl else products.linear_product
        self.layers = [self._layer_inputs(layer, attention, linear, pdl) for layer in model.model.layers]
        self.linear = linear
        long = dict(dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(batch_size, 1, **long)  # the token each step feeds
        self.pos = torch.zeros(1, **long)  # its position
        self.seq = torch.zeros(batch_size, max_cache_len + 1, **long)  # every token, by position
        compiled = dict(backend=backend, fullgraph=True, dynamic=False)
        if backend == "inductor" and pdl:  # its kernels too, each waiting where it reads the kernel before's output
            compiled["options"] = {"triton.enable_pdl": True}
        # Each decoder adds its own compiled entries of these functions (guards name its shapes).
        torch._dynamo.config.recompile_limit += 8
        self._layer, self._ends, self._step = _decode_layer, self._ends_eager, self._step_eager
        if backend and compile_unit == "layer":
            self._layer = torch.compile(_decode_layer, **compiled)
            self._ends = torch.compile(self._ends_eager, **compiled)
        elif backend:  # one graph: fusions across layers (residual and next norm), a longer compile per decoder
            self._step = torch.compile(self._step_eager, **compiled)
        self._graphs, self._at = {}, 0

    def _layer_inputs(self, layer, attention: str, linear, pdl: bool) -> tuple:
        import torch

        from kvshare.modeling import kv_groups

        attn, mlp, config = layer.self_attn, layer.mlp, self.model.config
        stores = attn.kv_layer == attn.layer_idx
        qkv_w, qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj] if stores else [attn.q_proj])
        gu_w, gu_b = _fuse([mlp.gate_proj, mlp.up_proj])
        slots = attn._index["slots"] if attn._slots is not None else None
        unslots = attn._index["unslots"] if attn._slots is not None else None
        rows = [group + [-1] * (attn._gmax - len(group)) for group in kv_groups(config.q_to_kv[attn.layer_idx])]
        rows = torch.tensor(rows, dtype=torch.int32, device=self.device)
        sizes = (config.num_attention_heads * attn.head_dim,) + (attn.n_kv * attn.head_dim,) * (2 if stores else 0)
        spec = LayerSpec(stores, attn.n_kv, attn._gmax, attn.head_dim, attn.scaling, config.rms_norm_eps, sizes,
                         config.hidden_act, attention, linear, pdl)  # fmt: skip
        w = (layer.input_layernorm.weight, qkv_w, qkv_b, slots, unslots, rows, attn.o_proj.weight, attn.o_proj.bias,
             layer.post_attention_layernorm.weight, gu_w, gu_b, mlp.down_proj.weight, mlp.down_proj.bias)  # fmt: skip
        return attn.kv_layer, w, spec

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_cache_len(self) -> int:
        return self.seq.shape[1] - 1

    def _ends_eager(self, x, tokens, pos, last: bool):
        """The step's first part (embedding, rotary cos/sin) or, with ``last``, its logits."""
        inner = self.model.model
        if last:
            head = self.model.lm_head
            return self.linear(x[:, -1], head.weight, head.bias, inner.norm.weight, inner.norm.variance_epsilon)
        x = inner.embed_tokens(tokens)
        return x, *inner.rotary_emb(x, pos.view(1, 1).expand(tokens.shape[0], 1))

    def step(self, tokens, pos):
        """Logits of one decode step, [batch, vocab]: ``tokens`` [batch, 1] at position ``pos`` (a one-element
        device tensor), whose K/V it writes into the cache."""
        return self._step(tokens, pos)

    def _step_eager(self, tokens, pos):
        x, cos, sin = self._ends(None, tokens, pos, False)
        for kv_layer, w, spec in self.layers:
            entry = self.cache.layers[kv_layer]
            x = self._layer(x, pos, cos, sin, entry.keys, entry.values, w, spec)
        return self._ends(x, tokens, pos, True)

    def _next(self) -> None:
        """One greedy step from (tokens, pos): its K/V written, the next token written at pos + 1 and fed next."""
        nxt = self.step(self.tokens, self.pos).argmax(-1, keepdim=True)
        self.pos.add_(1)
        self.seq.index_copy_(1, self.pos, nxt)
        self.tokens.copy_(nxt)

    def _steps(self, n: int) -> None:
        for _ in range(n):
            self._next()

    def _graph(self, n: int):
        """The CUDA graph of ``n`` steps, captured once (after warm-up runs that compile; they write K/V at
        positions 0..n-1, which the next prefill overwrites)."""
        import torch

        if n not in self._graphs:
            self.pos.zero_()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    self._steps(n)
                    self.pos.zero_()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                self._steps(n)
            self._graphs[n] = graph
        return self._graphs[n]

    def warm_up(self) -> None:
        """Compile and capture now (the first generate would otherwise)."""
        if self.device.type == "cuda":
            self._graph(self.steps_per_graph)
            self._graph(1)

    def decode(self, n: int) -> None:
        """``n`` decode steps from the current tokens and position (no sync: the work is queued)."""
        import torch

        if self._at + n > self.max_cache_len:
            raise ValueError(
                f"{n} steps from position {self._at} need a cache of {self._at + n} tokens, but this decoder's holds "
                f"max_cache_len={self.max_cache_len}: build GraphDecoder with max_cache_len >= {self._at + n}"
            )
        self._at += n
        full, rest = divmod(n, self.steps_per_graph)
        with torch.no_grad():
            if self.device.type != "cuda":
                self._steps(n)
                return
            graph = self._graph(self.steps_per_graph)
            for _ in range(full):
                graph.replay()
            for _ in range(rest):
                self._graph(1).replay()

    def start(self, tokens, pos: int) -> None:
        """Set the token fed next and its position (the cache holding positions before it)."""
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        self._at = pos  # the position on the host: decode() checks the room left without a sync

    def generate(self, input_ids, max_new_tokens: int, eos_token_id=None, pad_token_id: int = 0):
        """``input_ids`` followed by ``max_new_tokens`` greedy tokens, as ``model.generate(do_sample=False)``
        returns them: after a row's ``eos_token_id``, ``pad_token_id``; columns where every row has ended cut."""
        import torch

        batch, prompt = input_ids.shape
        if batch != self.batch_size or prompt + max_new_tokens - 1 > self.max_cache_len:
            raise ValueError(
                f"this decoder holds batch_size={self.batch_size} and max_cache_len={self.max_cache_len}, but "
                f"got a batch of {batch} with {prompt} + {max_new_tokens} tokens: build GraphDecoder with "
                f"batch_size={batch} and max_cache_len >= {prompt + max_new_tokens - 1}"
            )
        self.warm_up()  # before the prefill: warming up writes the cache
        self.cache.reset()
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, past_key_values=self.cache, logits_to_keep=1).logits
        first = logits[:, -1].argmax(-1, keepdim=True)
        self.seq[:, :prompt] = input_ids
        self.seq[:, prompt : prompt + 1] = first
        self.start(first, prompt)
        self.decode(max_new_tokens - 1)
        self.cache.advance(batch, max_new_tokens - 1)
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(prompt + max_new_tokens - 1)
        return _after_eos(self.seq[:, : prompt + max_new_tokens].clone(), prompt, eos_token_id, pad_token_id)


def _after_eos(seq, prompt: int, eos_token_id, pad_token_id: int):
    """``pad_token_id`` after each row's first ``eos_token_id`` among the new tokens; trailing columns where
    every row has ended are cut, as generate stops when all have."""
    if eos_token_id is None:
        return seq
    new = seq[:, prompt:]
    hit = (new == eos_token_id).int()
    done_before = hit.cumsum(1) - hit > 0
    new[done_before] = pad_token_id
    alive = (~done_before).any(0)
    keep = int(alive.nonzero().max()) + 1 if alive.any() else 0
    return seq[:, : prompt + keep]
