"""Apply a plan to a base model's weights: tensor by tensor, so a 7B model converts in bounded memory.

Within a layer, the KV heads of a group are mean-pooled (GQA's conversion),
weights and biases alike; across layers, a layer that reuses an earlier layer's
K/V drops its own projection and the producer's is kept ("copy",
dolomite-engine's choice) or set to the mean of the whole CLA group's ("mean").
Means are taken in float32 and stored in the output dtype.

Query heads may be reordered so that each KV group's queries are contiguous:
attention is a sum over heads, so permuting q_proj's output heads together
with o_proj's input columns leaves the function unchanged, and it turns equal
groups into the native GQA layout. A plan with the same number of equal groups
in every layer and no cross-layer sharing is then written as the source's own
architecture (Llama, Mistral or Qwen2 with fewer KV heads), which transformers
loads as is (llama.cpp through :mod:`kvshare.export`); any other plan as ``kvshare_llama`` (:mod:`kvshare.modeling`).

:func:`convert_tensors` streams the converted weights from any name → tensor
reader (a checkpoint on disk, or a model's state dict); :func:`convert_model`
builds the model in memory for tests and benchmarks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from kvshare.checkpoint import KVSHARE_MODEL_TYPE, auto_map
from kvshare.errors import KVShareError
from kvshare.families import SLIDING_KEYS, biases
from kvshare.plan import ModelShape, Plan

ATTENTION = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)$")


def contiguous_order(q_to_kv: list[int]) -> list[int]:
    """Query heads sorted by their KV head (stable): the order that makes every group contiguous."""
    return sorted(range(len(q_to_kv)), key=lambda h: (q_to_kv[h], h))


def kv_order(q_to_kv: list[int]) -> list[int]:
    """KV heads by group size (stable): the order that makes the KV heads of each size contiguous, and with
    :func:`contiguous_order` their query heads too, so a prefill attends one slice per size (no copies)."""
    return sorted(range(max(q_to_kv) + 1), key=lambda g: (q_to_kv.count(g), g))


def sized_labels(q_to_kv: list[int]) -> list[int]:
    """``q_to_kv`` with the KV heads renumbered in :func:`kv_order` (unchanged for equal groups)."""
    new = {old: i for i, old in enumerate(kv_order(q_to_kv))}
    return [new[g] for g in q_to_kv]


def query_maps(plan: Plan, permute: bool = True) -> list[list[int]]:
    """Per layer, the KV head of each query head in the converted model's query (and KV head) order."""
    maps = []
    for i in range(plan.shape.num_layers):
        q_to_kv = sized_labels(plan.q_to_kv(i)) if permute else plan.q_to_kv(i)
        maps.append([q_to_kv[h] for h in contiguous_order(q_to_kv)] if permute else q_to_kv)
    return maps


def plain_kv_heads(maps: list[list[int]], kv_layer: list[int]) -> int | None:
    """The KV-head count if the layout is ordinary GQA in every layer (equal contiguous groups, no CLA), else None."""
    if any(j != i for i, j in enumerate(kv_layer)):
        return None
    counts = {max(m) + 1 for m in maps}
    if len(counts) != 1:
        return None
    n_kv = counts.pop()
    size = len(maps[0]) // n_kv
    return n_kv if all(m == [h // size for h in range(len(m))] for m in maps) else None


KVSHARE_KEYS = ("q_to_kv", "kv_layer", "o_proj_bias", "source_model_type", "auto_map")


def plain_config(config: dict, n_kv: int) -> dict:
    """A config of the source's own architecture with ``n_kv`` KV heads per layer (from a source or a
    ``kvshare_llama`` config whose layout is plain GQA)."""
    out = {k: v for k, v in config.items() if k not in KVSHARE_KEYS}
    if config.get("model_type") == KVSHARE_MODEL_TYPE:
        kind = config.get("source_model_type") or "llama"
        out["model_type"] = kind
        out["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                 "qwen2": "Qwen2ForCausalLM"}[kind]]  # fmt: skip
    out["num_key_value_heads"] = n_kv
    return out


def kvshare_config(source: dict, maps: list[list[int]], kv_layer: list[int]) -> dict:
    """A ``kvshare_llama`` config: the source's, with per-layer query→KV maps, the CLA pattern and its biases."""
    qkv_bias, o_bias = biases(source)
    config = {k: v for k, v in source.items() if k not in SLIDING_KEYS}
    config.update(
        model_type=KVSHARE_MODEL_TYPE,
        architectures=["KVShareLlamaForCausalLM"],
        source_model_type=source.get("source_model_type", source.get("model_type")),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        q_to_kv=maps,
        kv_layer=list(kv_layer),
        num_key_value_heads=max(max(m) + 1 for m in maps),  # informational: layers use q_to_kv
        auto_map=auto_map(),
    )
    return config


def converted_config(source: dict, plan: Plan, maps: list[list[int]], dtype: str | None = None) -> dict:
    """The converted model's config.json: plain GQA layouts keep the source's architecture, others are
    ``kvshare_llama``; ``dtype`` (e.g. "bfloat16") when the weights are stored in another dtype than the source's."""
    source = dict(source)
    if dtype is not None:
        source["dtype"] = dtype
        source.pop("torch_dtype", None)
    n_kv = plain_kv_heads(maps, list(plan.kv_layer))
    return plain_config(source, n_kv) if n_kv is not None else kvshare_config(source, maps, list(plan.kv_layer))


def _pool(weight, groups: tuple[int, ...]):
    """Mean of each group's KV-head blocks, in float32: (n_src * hd, ...) → (n_new * hd, ...)."""
    import torch

    heads = weight.float().reshape(len(groups), -1, *weight.shape[1:])
    index = [[s for s in range(len(groups)) if groups[s] == g] for g in range(max(groups) + 1)]
    return torch.cat([heads[members].mean(0) for members in index], 0)


def _permute(tensor, order: list[int], head_dim: int, columns: bool):
    """Query heads reordered: q_proj's output rows (and bias), or o_proj's input columns."""
    import torch

    idx = torch.tensor(order)
    if columns:
        return tensor.reshape(tensor.shape[0], len(order), head_dim)[:, idx].reshape(tensor.shape)
    return tensor.reshape(len(order), head_dim, *tensor.shape[1:])[idx].reshape(tensor.shape)


def layer_attention(plan: Plan, layer: int, get: Callable, permute: bool, dtype) -> dict:
    """The converted attention tensors of one layer, by name; ``get(name)`` reads a source tensor (None if absent).

    A layer that reuses another's K/V has no k_proj / v_proj.
    """
    shape = plan.shape
    prefix = f"model.layers.{layer}.self_attn"
    out = {}
    order = contiguous_order(sized_labels(plan.q_to_kv(layer))) if permute else list(range(shape.num_heads))
    for proj, kind in (("q", "weight"), ("q", "bias"), ("o", "weight"), ("o", "bias")):
        t = get(f"{prefix}.{proj}_proj.{kind}")
        if t is not None:
            columns = proj == "o" and kind == "weight"
            # o_proj's bias is added after the heads are summed: it does not depend on their order.
            keep = proj == "o" and kind == "bias"
            out[f"{prefix}.{proj}_proj.{kind}"] = (t if keep else _permute(t, order, shape.head_dim, columns)).to(dtype)
    if plan.stores_kv(layer):
        members = (
            [m for m in range(shape.num_layers) if plan.kv_layer[m] == layer] if plan.cla_init == "mean" else [layer]
        )
        for proj in ("k", "v"):
            for kind in ("weight", "bias"):
                parts = [get(f"model.layers.{m}.self_attn.{proj}_proj.{kind}") for m in members]
                if parts[0] is not None:
                    import torch

                    pooled = torch.stack([_pool(p, plan.groups[layer]) for p in parts]).mean(0)
                    if permute:  # KV heads in the order of sized_labels
                        heads = kv_order(plan.q_to_kv(layer))
                        pooled = pooled.reshape(len(heads), -1, *pooled.shape[1:])[heads].reshape(pooled.shape)
                    out[f"{prefix}.{proj}_proj.{kind}"] = pooled.to(dtype)
    return out


def convert_tensors(plan: Plan, names: Iterable[str], get: Callable, permute: bool = True, dtype=None) -> Iterator:
    """``(name, tensor)`` of the converted model, in the order of the source's ``names``; non-attention tensors
    pass through (cast to ``dtype`` when given). Holds one layer's attention tensors at a time."""
    pending: dict[str, object] = {}
    done: set[int] = set()
    for name in names:
        m = ATTENTION.match(name)
        if m is None:
            t = get(name)
            yield name, t if dtype is None else t.to(dtype)
            continue
        layer = int(m[1])
        if layer >= plan.shape.num_layers:
            raise KVShareError(f"the checkpoint has {name} but the plan covers {plan.shape.num_layers} layers")
        if layer not in done:
            source_dtype = get(f"model.layers.{layer}.self_attn.q_proj.weight").dtype
            pending |= layer_attention(plan, layer, get, permute, dtype or source_dtype)
            done.add(layer)
        if name in pending:  # absent: the K/V of a layer that reuses another's
            yield name, pending.pop(name)


def convert_model(base, plan: Plan, permute: bool = True, export: bool = False):
    """The converted model in memory (the base model's dtype), for tests and benchmarks: a ``kvshare_llama`` model,
    or with ``export`` what the convert stage writes (the source's architecture for plain GQA layouts)."""
    import torch

    shape = ModelShape.of(base.config)
    if shape != plan.shape:
        raise KVShareError(f"plan is for a model of shape {vars(plan.shape)} but the base model is {vars(shape)}")
    state = base.state_dict()
    source = base.config.to_dict()
    maps = query_maps(plan, permute)
    config = converted_config(source, plan, maps) if export else kvshare_config(source, maps, list(plan.kv_layer))
    model = _build(config, next(base.parameters()).dtype)
    with torch.no_grad():
        model.load_state_dict(dict(convert_tensors(plan, list(state), state.get, permute)), strict=True)
    return model.eval()


def _build(config: dict, dtype):
    """A model of ``config`` built in ``dtype``: no float32 copy of a large model, and the rotary frequencies
    kept as computed (a cast after building would round them as it rounds the weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import kvshare.modeling  # noqa: F401  (registers kvshare_llama)

    config = {k: v for k, v in config.items() if k != "dtype"}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config), dtype=dtype)


def to_plain(model):
    """A ``kvshare_llama`` model whose layout is plain GQA as the equivalent model of its source's architecture
    (pretraining trains every layout as kvshare_llama and exports MHA, GQA and MQA this way)."""
    import torch

    c = model.config
    n_kv = plain_kv_heads(c.q_to_kv, c.kv_layer)
    if n_kv is None:
        raise KVShareError(
            "the model has unequal groups, differing counts or cross-layer sharing: it stays kvshare_llama"
        )
    plain = _build(plain_config(c.to_dict(), n_kv), next(model.parameters()).dtype)
    with torch.no_grad():
        plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()
