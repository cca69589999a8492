"""Llama with per-layer KV heads: any query→KV-head mapping, and K/V shared across layers (CLA).

The model is transformers' Llama with each attention module swapped for
:class:`SharedKVAttention`, which

* holds ``n_kv[i]`` K/V heads in layer ``i`` (any count, differing by layer),
* maps query head ``h`` to KV head ``q_to_kv[i][h]`` (unequal group sizes allowed),
* stores no K/V projection or cache at all when the layer reuses an earlier
  layer's K/V (``kv_layer[i] < i``); it reads that layer's cache entry instead.

The cache therefore holds exactly the K/V the plan promises: one entry per
storing layer, with that layer's own KV heads (never per-query-head copies).
:class:`KVShareStaticCache` preallocates those entries for a batch and a
maximum length, so a cache never grows or re-allocates during generation.
Attention never copies K/V per query head either: unequal or scattered groups
are regrouped by KV head and padded to the largest group, so the backend sees
equal groups, which it shares natively (sdpa's GQA, when there is no mask).
Where sdpa or eager would instead repeat K/V per query head (a mask: chunked
prefill, a static cache, padding), one decoded token's group becomes query rows
of its KV head, and a longer input attends once per group member.

With sdpa (the default) two cases take a faster path: a decode step calls sdpa
once on those query rows, with no Python work that depends on the step, so a
compiled step (kvshare.decode.compile_for_decode) is one CUDA graph; and an
input with nothing cached before it and no padding (a prefill) runs causal
attention without a mask, one sdpa per distinct group size on the query heads
of the KV heads of that size, so no padded head is computed.

This module imports only torch and transformers so it can be shipped beside a
checkpoint as remote code (``trust_remote_code=True``); importing ``kvshare``
registers it with the Auto classes instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Cache, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import StaticLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward, rotate_half


class KVShareLlamaConfig(LlamaConfig):
    """A Llama config plus, per layer, the query→KV-head map and the layer whose K/V it uses.

    ``attention_bias`` puts biases on q, k and v, and on o unless ``o_proj_bias`` says otherwise (Qwen2 has
    them on q, k and v only); ``source_model_type`` is the family the model was converted from.
    """

    model_type = "kvshare_llama"

    def __init__(
        self,
        q_to_kv: list[list[int]] | None = None,
        kv_layer: list[int] | None = None,
        o_proj_bias: bool | None = None,
        source_model_type: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.o_proj_bias = o_proj_bias
        self.source_model_type = source_model_type
        layers, heads = self.num_hidden_layers, self.num_attention_heads
        if q_to_kv is None:  # plain Llama layout
            per_kv = heads // (self.num_key_value_heads or heads)
            q_to_kv = [[h // per_kv for h in range(heads)]] * layers
        self.q_to_kv = [list(m) for m in q_to_kv]
        self.kv_layer = list(kv_layer) if kv_layer is not None else list(range(layers))
        if len(self.q_to_kv) != layers or len(self.kv_layer) != layers:
            raise ValueError(f"q_to_kv/kv_layer must have one entry per layer ({layers})")
        for i, (m, j) in enumerate(zip(self.q_to_kv, self.kv_layer, strict=True)):
            if len(m) != heads or sorted(set(m)) != list(range(max(m) + 1)):
                raise ValueError(f"q_to_kv[{i}]={m} must map {heads} query heads onto KV heads 0..k-1")
            if not 0 <= j <= i or self.kv_layer[j] != j or self.q_to_kv[j] != m:
                raise ValueError(f"layer {i} cannot use layer {j}'s K/V (must be an earlier storing layer, same map)")

    def n_kv(self, layer: int) -> int:
        return max(self.q_to_kv[layer]) + 1

    def cache_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V bytes the cache holds per token, per sequence."""
        stored = sum(self.n_kv(i) for i in range(self.num_hidden_layers) if self.kv_layer[i] == i)
        return 2 * stored * self.head_dim * dtype_bytes

    def read_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V bytes a decode step's attention reads per cached token, per sequence: every layer reads the
        entry it attends to, so a CLA layer reads its producer's again."""
        return 2 * sum(self.n_kv(self.kv_layer[i]) for i in range(self.num_hidden_layers)) * self.head_dim * dtype_bytes


def kv_groups(q_to_kv: list[int]) -> list[list[int]]:
    """Each KV head's query heads, in head order."""
    return [[h for h, k in enumerate(q_to_kv) if k == g] for g in range(max(q_to_kv) + 1)]


def _equal_contiguous(q_to_kv: list[int]) -> int | None:
    """The group size if query heads map to KV heads in equal contiguous blocks (native GQA), else None."""
    n_kv = max(q_to_kv) + 1
    size = len(q_to_kv) // n_kv
    return size if q_to_kv == [h // size for h in range(len(q_to_kv))] else None


# Keyword the model's forward passes to its attention layers: nothing was cached before this input and it has no
# padding, so attention is causal over exactly its tokens (a static cache's mask would say so only as a mask).
FROM_START = "kvshare_from_start"


def _span(values: list[int]) -> slice | list[int]:
    """A slice where the indices are consecutive (a view: no copy), else the list."""
    return slice(values[0], values[-1] + 1) if values == list(range(values[0], values[0] + len(values))) else values


def _size_buckets(q_to_kv: list[int]) -> list[tuple[int, slice | list[int], slice | list[int]]]:
    """Per distinct group size: (size, its KV heads, their query heads KV head by KV head). Slices when the
    conversion ordered the heads by group size (kvshare.merge.kv_order), else index lists."""
    n_kv, heads = max(q_to_kv) + 1, len(q_to_kv)
    by_size: dict[int, list[int]] = {}
    for g in range(n_kv):
        by_size.setdefault(q_to_kv.count(g), []).append(g)
    out = []
    for size, kv_heads in sorted(by_size.items()):
        q_heads = [h for g in kv_heads for h in range(heads) if q_to_kv[h] == g]
        out.append((size, _span(kv_heads), _span(q_heads)))
    return out


def _bucket_indices(buckets) -> dict[str, list[int]]:
    """Index lists of the buckets' query and KV heads that are not slices, and "unorder", which puts the
    buckets' outputs back in query-head order."""
    out: dict[str, list[int]] = {}
    order = []
    for i, (_, kv_heads, q_heads) in enumerate(buckets):
        if isinstance(kv_heads, list):
            out[f"kv{i}"] = kv_heads
        if isinstance(q_heads, list):
            out[f"q{i}"] = q_heads
        order += q_heads if isinstance(q_heads, list) else list(range(q_heads.start, q_heads.stop))
    if order != list(range(len(order))):
        out["unorder"] = sorted(range(len(order)), key=order.__getitem__)
    return out


def _matmul_attention(rows, key, value, mask, scaling):
    """Attention of a few query rows per KV head as two matmuls (K and V read once each); softmax in float32."""
    scores = torch.matmul(rows, key.transpose(-1, -2)).float() * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)


class SharedKVAttention(nn.Module):
    """Llama attention whose K/V heads are per-layer and possibly another layer's."""

    def __init__(self, config: KVShareLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kv_layer = config.kv_layer[layer_idx]
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        heads, hidden, bias = config.num_attention_heads, config.hidden_size, config.attention_bias
        q_to_kv = config.q_to_kv[layer_idx]
        self.n_kv = max(q_to_kv) + 1
        # Query heads per KV head as the backend sees them (num_key_value_groups, set per call).
        self._gmax = max(q_to_kv.count(g) for g in range(self.n_kv))
        self.num_key_value_groups = self._gmax
        self._q_to_kv, self._slots, self._unslots = None, None, None
        if _equal_contiguous(q_to_kv) is None:
            # Unequal or non-contiguous groups: query head slots, KV head by KV head, each padded to the largest group.
            slots = []
            for members in kv_groups(q_to_kv):
                slots += members + members[:1] * (self._gmax - len(members))
            self._q_to_kv, self._slots, self._unslots = list(q_to_kv), slots, [slots.index(h) for h in range(heads)]
        # "pad" (the default, above) or "gather": copy each query head's K/V head before attention (slower; a reference).
        self.kv_layout = "pad"
        self._buckets = _size_buckets(q_to_kv)
        self._bucket_lists = _bucket_indices(self._buckets)
        # The decode step's attention: "sdpa" (torch picks the kernel), or "matmul" (two batched matmuls and a
        # float32 softmax, which torch.compile fuses; a decode-shaped alternative to compare on a given GPU).
        self.decode_attention = "sdpa"
        # A prefill of unequal groups: "buckets" (one sdpa per distinct group size, native GQA) or "gather" (K/V
        # copied per query head for this input only, then one sdpa over all heads: one kernel, no small launches).
        self.prefill_attention = "buckets"
        # Index tensors made here, on the CPU, and remade wherever the module moves (_apply), so that no forward
        # creates one: a compiled graph that made its own would differ from the one that reads it, and a
        # recomputed checkpointed layer would save other tensors than its forward did. Not buffers:
        # from_pretrained builds modules on the meta device and would leave those unset.
        self._index = self._make_indices("cpu")
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        if self.kv_layer == layer_idx:
            self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        o_bias = getattr(config, "o_proj_bias", None)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=bias if o_bias is None else o_bias)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        from_start = kwargs.pop(FROM_START, False)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        if self.kv_layer == self.layer_idx:
            key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
        else:
            # The producer ran earlier in this forward and already holds the current tokens.
            query = query * cos.unsqueeze(1) + rotate_half(query) * sin.unsqueeze(1)
            shared = past_key_values.layers[self.kv_layer]
            key, value = shared.keys, shared.values
        impl, q_len = self.config._attn_implementation, query.shape[2]
        out = None
        if impl == "sdpa" and self.kv_layout == "pad":
            if q_len == 1:
                out = self._decode_sdpa(query, key, value, attention_mask)
            elif from_start or (attention_mask is None and key.shape[2] == q_len):
                # Causal attention over exactly these tokens (nothing cached before them, no padding): no mask.
                out = self._causal_sdpa(query, key[:, :, :q_len], value[:, :, :q_len])
        weights = None
        if out is None:
            out, weights = self._attend(query, key, value, attention_mask, impl, kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    def _dropout(self) -> float:
        return 0.0 if not self.training else self.attention_dropout

    def _decode_sdpa(self, query, key, value, mask):
        """One new token: each KV head's query heads (padded to the largest group) are its query rows, so K/V
        are read once, as stored, by one sdpa call with no per-call index work but two tiny gathers."""
        batch, d = query.shape[0], self.head_dim
        if self._slots is not None:
            query = query.index_select(1, self._indices("slots", self._slots, query.device))
        rows = query.reshape(batch, self.n_kv, self._gmax, d)
        if self.decode_attention == "matmul":
            out = _matmul_attention(rows, key, value, mask, self.scaling)
        else:
            out = F.scaled_dot_product_attention(
                rows, key, value, attn_mask=mask, dropout_p=self._dropout(), scale=self.scaling
            )
        out = out.reshape(batch, -1, 1, d)
        if self._slots is not None:
            out = out.index_select(1, self._indices("unslots", self._unslots, out.device))
        return out.transpose(1, 2)

    def _causal_sdpa(self, query, key, value):
        """Causal attention from position 0, one sdpa (native GQA) per distinct group size: the query heads of
        the KV heads with that many members, so no padded head is computed; or, with ``prefill_attention`` "gather"
        and unequal groups, one sdpa over K/V copied per query head."""
        if self._slots is not None and self.prefill_attention == "gather":
            index = self._indices("gather", self._q_to_kv, key.device)
            key, value = key.index_select(1, index), value.index_select(1, index)
            out = F.scaled_dot_product_attention(
                query, key, value, dropout_p=self._dropout(), is_causal=True, scale=self.scaling
            )
            return out.transpose(1, 2)
        outs = []
        for i, (size, kv_heads, q_heads) in enumerate(self._buckets):
            if isinstance(q_heads, slice):
                q = query[:, q_heads]
            else:
                q = query.index_select(1, self._indices(f"q{i}", q_heads, query.device))
            if isinstance(kv_heads, slice):
                k, v = key[:, kv_heads], value[:, kv_heads]
            else:
                index = self._indices(f"kv{i}", kv_heads, key.device)
                k, v = key.index_select(1, index), value.index_select(1, index)
            outs.append(
                F.scaled_dot_product_attention(
                    q, k, v, dropout_p=self._dropout(), is_causal=True, scale=self.scaling, enable_gqa=size > 1
                )
            )
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        if "unorder" in self._bucket_lists:
            out = out.index_select(1, self._indices("unorder", self._bucket_lists["unorder"], out.device))
        return out.transpose(1, 2)

    def _attend(self, query, key, value, attention_mask, impl, kwargs):
        """Any backend, any mask (the reference path): padded groups, or K/V gathered per query head."""
        batch, q_len, d = query.shape[0], query.shape[2], self.head_dim
        groups = self._gmax
        if self._slots is not None and self.kv_layout == "gather":
            index = self._indices("gather", self._q_to_kv, key.device)
            key, value = key.index_select(1, index), value.index_select(1, index)
            groups = 1
        elif self._slots is not None:
            query = query.index_select(1, self._indices("slots", self._slots, query.device))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)

        def attend(q, n_groups, mask, **extra):
            self.num_key_value_groups = n_groups
            dropout = self._dropout()
            return attention(self, q, key, value, mask, dropout=dropout, scaling=self.scaling, **kwargs, **extra)

        # sdpa with a mask, and eager always, would copy K/V per query head (repeat_kv) for groups > 1.
        no_repeat = groups > 1 and impl in ("sdpa", "eager")
        if no_repeat and q_len == 1:
            # One query token sees every cached key: a group's query heads become its KV head's query rows.
            out, weights = attend(query.reshape(batch, self.n_kv, groups, d), 1, attention_mask, is_causal=False)
            out = out.transpose(1, 2).reshape(batch, 1, -1, d)  # (batch, groups, n_kv, d) → slot order
            weights = None if weights is None else weights.reshape(batch, -1, 1, weights.shape[-1])
        elif no_repeat and attention_mask is not None:
            # Attend once per group member (the j-th query head of every group): K/V and mask are read as they are.
            parts = [attend(query[:, j::groups], 1, attention_mask) for j in range(groups)]
            out = torch.stack([o for o, _ in parts], 3).reshape(batch, q_len, -1, d)
            weights = None if parts[0][1] is None else torch.stack([w for _, w in parts], 2).flatten(1, 2)
        else:
            out, weights = attend(query, groups, attention_mask)
        if self._slots is not None and self.kv_layout != "gather":
            unslots = self._indices("unslots", self._unslots, out.device)
            out = out.index_select(2, unslots)
            weights = None if weights is None else weights.index_select(1, unslots)
        return out, weights

    def _make_indices(self, device) -> dict[str, torch.Tensor]:
        lists = {} if self._slots is None else {"gather": self._q_to_kv, "slots": self._slots, "unslots": self._unslots}
        lists |= self._bucket_lists
        index = {name: torch.tensor(values, device=device) for name, values in lists.items()}
        if not torch.compiler.is_compiling():
            for t in index.values():  # fixed addresses: a CUDA graph reads them in place instead of copying them in
                torch._dynamo.mark_static_address(t)
        return index

    def _apply(self, fn, recurse=True):
        # to(), cuda(), to_empty(), ...: the indices follow to the device the function sends tensors to.
        self._index = self._make_indices(fn(torch.zeros(0, dtype=torch.long)).device)
        return super()._apply(fn, recurse)

    def _indices(self, name: str, values: list[int], device) -> torch.Tensor:
        index = self._index.get(name)
        if index is None or index.device != device:
            index = self._index[name] = torch.tensor(values, device=device)
        return index


class KVShareLlamaForCausalLM(LlamaForCausalLM):
    config_class = KVShareLlamaConfig

    def __init__(self, config: KVShareLlamaConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = SharedKVAttention(config, i)
        self.post_init()

    @property
    def shares_across_layers(self) -> bool:
        return any(j != i for i, j in enumerate(self.config.kv_layer))

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        # logits_to_keep is named so that generate() sees it and asks for the last position's logits only
        # (not a vocabulary-wide row for every prompt token).
        kwargs["logits_to_keep"] = logits_to_keep
        # Layers that reuse another's K/V read it from the cache, so a forward without
        # one (training) still gets a throwaway cache to pass K/V between layers.
        if past_key_values is None and self.shares_across_layers:
            keep = use_cache if use_cache is not None else self.config.use_cache
            past_key_values = DynamicCache(config=self.config)
            out = super().forward(input_ids=input_ids, past_key_values=past_key_values, use_cache=keep, **kwargs)
            if not keep:
                out.past_key_values = None
            return out
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if FROM_START not in kwargs and _starts_fresh(past_key_values, kwargs.get("attention_mask"), x):
            kwargs[FROM_START] = True
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        # generate() turns the 2D mask into a 4D one for a static cache; whether it pads anything is seen here.
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, **kwargs
        )
        x = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        if _starts_fresh(past_key_values, attention_mask, x):
            inputs[FROM_START] = True
        return inputs

    def get_compiled_call(self, compile_config):
        """generate()'s compiled forward (decode steps), with the static cache's bookkeeping done before each call,
        outside the graph."""
        compiled = super().get_compiled_call(compile_config)

        def call(*args, **kwargs):
            cache = kwargs.get("past_key_values")
            x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
            if isinstance(cache, KVShareStaticCache) and x is not None:
                cache.advance(x.shape[0], x.shape[1])
            return compiled(*args, **kwargs)

        return call


def _starts_fresh(cache, attention_mask, x) -> bool:
    """Whether a multi-token input ``x`` goes into an empty static cache without padding (a 2D mask of ones or
    none; checked eagerly: one sync per prefill), so its attention needs no mask. Other caches show it by
    having no mask."""
    if torch.compiler.is_compiling() or x is None or x.shape[1] < 2 or not isinstance(cache, KVShareStaticCache):
        return False
    if cache.length != 0:
        return False
    return attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))


class _StaticKV(StaticLayer):
    """transformers' StaticLayer (K/V written in place) that names what is wrong instead of an index error.

    Writing past the end would otherwise fail inside index_copy_ (on CUDA, a device-side assert
    that takes the process down). The length is kept as a Python int so checking it needs no
    device sync.
    """

    def __init__(self, max_cache_len: int):
        super().__init__(max_cache_len)
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        # A compiled forward must not branch on or change Python state (each new value would be a recompile):
        # there the caller advances the cache before the call (KVShareLlamaForCausalLM.get_compiled_call).
        if not torch.compiler.is_compiling():
            self.advance(key_states.shape[0], key_states.shape[-2])
        return super().update(key_states, value_states, *args, **kwargs)

    def advance(self, batch: int, tokens: int) -> None:
        """Check that ``tokens`` more tokens of a batch of ``batch`` fit, and count them."""
        end = self.length + tokens
        if end > self.max_cache_len:
            raise ValueError(
                f"the static KV cache holds max_cache_len={self.max_cache_len} tokens but this step needs {end}: "
                "build KVShareStaticCache with max_cache_len >= prompt + new tokens"
            )
        if batch != self.batch_size:
            raise ValueError(
                f"the static KV cache was built for batch_size={self.batch_size} but got a batch of "
                f"{batch}: build KVShareStaticCache with batch_size={batch}"
            )
        self.length = end

    def reset(self) -> None:
        super().reset()
        self.length = 0


class KVShareStaticCache(Cache):
    """A preallocated KV cache for a kvshare model (pass it to ``generate`` or ``forward`` as ``past_key_values``).

    Each storing layer gets one ``[batch_size, n_kv(layer), max_cache_len, head_dim]`` K and V
    buffer, allocated here and written in place; a layer that reuses another's K/V (CLA) holds
    nothing. So it holds ``batch_size × max_cache_len × config.cache_bytes_per_token(dtype bytes)``
    bytes from the start, and generation never re-allocates it. Layers are transformers'
    StaticLayer, whose shapes come from the tensors they are initialised with, so each layer has
    its own KV-head count.
    """

    def __init__(self, config: KVShareLlamaConfig, max_cache_len: int, batch_size: int, dtype, device=None):
        if not isinstance(config, KVShareLlamaConfig):
            raise TypeError(
                f"KVShareStaticCache needs a kvshare_llama config, got model_type={config.model_type!r}: "
                "for a plain model use transformers.StaticCache"
            )
        # A layer that reads another's K/V is a StaticLayer that is never written, so never allocated.
        layers = [
            _StaticKV(max_cache_len) if j == i else StaticLayer(max_cache_len) for i, j in enumerate(config.kv_layer)
        ]
        super().__init__(layers=layers)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, _StaticKV):
                empty = torch.empty(batch_size, config.n_kv(i), 0, config.head_dim, dtype=dtype, device=device)
                layer.lazy_initialization(empty, empty)

    @property
    def length(self) -> int:
        """Tokens written so far (a Python int: reading it needs no device sync)."""
        return self.layers[0].length  # layer 0 always stores its own K/V

    def advance(self, batch: int, tokens: int) -> None:
        """What the layers' updates do outside a compiled forward: check room and batch, count the tokens."""
        for layer in self.layers:
            if isinstance(layer, _StaticKV):
                layer.advance(batch, tokens)


def cache_bytes(cache) -> int:
    """Bytes of K/V tensors a transformers cache holds right now (a static cache: all of its buffers)."""
    tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


AutoConfig.register(KVShareLlamaConfig.model_type, KVShareLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(KVShareLlamaConfig, KVShareLlamaForCausalLM, exist_ok=True)
