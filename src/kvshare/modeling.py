"""Llama with per-layer KV heads: any query→KV-head mapping, and K/V shared across layers (CLA).

The model is transformers' Llama with each attention module swapped for
:class:`SharedKVAttention`, which

* holds ``n_kv[i]`` K/V heads in layer ``i`` (any count, differing by layer),
* maps query head ``h`` to KV head ``q_to_kv[i][h]`` (unequal group sizes allowed),
* stores no K/V projection or cache at all when the layer reuses an earlier
  layer's K/V (``kv_layer[i] < i``); it reads that layer's cache entry instead.

The cache therefore holds exactly the K/V the plan promises: one entry per
storing layer, with that layer's own KV heads (never per-query-head copies).
Contiguous equal groups take the native GQA path of the attention backend.
Other mappings never copy K/V: the query heads are regrouped by KV head and
padded to the largest group, so the backend sees equal groups; when one token
is decoded (sdpa, eager) each group's query heads instead become query rows of
its KV head, so each KV head is read once per step whatever the group sizes.

This module imports only torch and transformers so it can be shipped beside a
checkpoint as remote code (``trust_remote_code=True``); importing ``kvshare``
registers it with the Auto classes instead.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward, rotate_half


class KVShareLlamaConfig(LlamaConfig):
    """A Llama config plus, per layer, the query→KV-head map and the layer whose K/V it uses."""

    model_type = "kvshare_llama"

    def __init__(self, q_to_kv: list[list[int]] | None = None, kv_layer: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
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


def _equal_contiguous(q_to_kv: list[int]) -> int | None:
    """The group size if query heads map to KV heads in equal contiguous blocks (native GQA), else None."""
    n_kv = max(q_to_kv) + 1
    size = len(q_to_kv) // n_kv
    return size if q_to_kv == [h // size for h in range(len(q_to_kv))] else None


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
        group = _equal_contiguous(q_to_kv)
        # Backends read num_key_value_groups to share K/V heads among query heads.
        self.num_key_value_groups = group or 1
        self._q_to_kv = None if group is not None else list(q_to_kv)
        # Unequal or non-contiguous groups: query head slots, KV head by KV head, each padded to the largest group.
        self._gmax = max(q_to_kv.count(g) for g in range(self.n_kv))
        slots = []
        for g in range(self.n_kv):
            members = [h for h, k in enumerate(q_to_kv) if k == g]
            slots += members + members[:1] * (self._gmax - len(members))
        self._slots, self._unslots = slots, [slots.index(h) for h in range(heads)]
        # "pad" (the default, above) or "gather": copy each query head's K/V head before attention (slower; a reference).
        self.kv_layout = "pad"
        # Not buffers: from_pretrained builds modules on the meta device and would leave them unset.
        self._index = {}
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        if self.kv_layer == layer_idx:
            self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=bias)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
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
        impl = self.config._attn_implementation
        batch, q_len = query.shape[0], query.shape[2]
        layout = None if self._q_to_kv is None else self.kv_layout
        if layout == "gather":
            index = self._indices("gather", self._q_to_kv, key.device)
            key, value = key.index_select(1, index), value.index_select(1, index)
            self.num_key_value_groups = 1
        elif layout == "pad":
            query = query.index_select(1, self._indices("slots", self._slots, query.device))
            self.num_key_value_groups = self._gmax
            if q_len == 1 and impl in ("sdpa", "eager"):
                # One query token sees every cached key: a group's query heads become its KV head's query rows.
                layout = "pack"
                query = query.view(batch, self.n_kv, self._gmax, self.head_dim)
                self.num_key_value_groups = 1
                kwargs = {**kwargs, "is_causal": False}
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        if layout in ("pad", "pack"):
            unslots = self._indices("unslots", self._unslots, out.device)
            if layout == "pack":  # (batch, gmax, n_kv, d) → (batch, 1, n_kv * gmax, d)
                out = out.transpose(1, 2).reshape(batch, 1, -1, self.head_dim)
                weights = None if weights is None else weights.reshape(batch, -1, 1, weights.shape[-1])
            out = out.index_select(2, unslots)
            weights = None if weights is None else weights.index_select(1, unslots)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

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
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache, **kwargs)


def cache_bytes(cache) -> int:
    """Bytes of K/V tensors a transformers cache holds right now."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total


AutoConfig.register(KVShareLlamaConfig.model_type, KVShareLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(KVShareLlamaConfig, KVShareLlamaForCausalLM, exist_ok=True)
