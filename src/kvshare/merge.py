"""Build a converted model from a base Llama and a plan; export it as plain Llama when it is one.

Within a layer, the KV heads of a group are mean-pooled (GQA's conversion);
across layers, a layer that reuses an earlier layer's K/V drops its own
projection and the producer's is kept ("copy", dolomite-engine's choice) or set
to the mean of the whole CLA group's ("mean").

Query heads may be reordered so that each KV group's queries are contiguous:
attention is a sum over heads, so permuting q_proj's output heads together
with o_proj's input columns leaves the function unchanged, and it turns equal
groups into the native GQA layout (and a plain Llama checkpoint that standard
serving stacks load when every layer has the same count).
"""

from __future__ import annotations

import torch

from kvshare.errors import KVShareError
from kvshare.modeling import KVShareLlamaConfig, KVShareLlamaForCausalLM
from kvshare.plan import ModelShape, Plan


def _pool(weight: torch.Tensor, groups: tuple[int, ...]) -> torch.Tensor:
    """Mean of the rows of each KV head's block within each group: (n_src*hd, ...) → (n_new*hd, ...)."""
    n_src = len(groups)
    heads = weight.reshape(n_src, -1, *weight.shape[1:])
    pooled = [heads[[s for s in range(n_src) if groups[s] == g]].mean(0) for g in range(max(groups) + 1)]
    return torch.cat(pooled, 0)


def _permute_queries(state: dict, prefix: str, perm: list[int], head_dim: int) -> None:
    """Reorder query heads: q_proj output rows and o_proj input columns, in place in ``state``."""
    idx = torch.tensor(perm)
    for key in (f"{prefix}.q_proj.weight", f"{prefix}.q_proj.bias"):
        if key in state:
            t = state[key]
            state[key] = t.reshape(len(perm), head_dim, *t.shape[1:])[idx].reshape(t.shape)
    o = state[f"{prefix}.o_proj.weight"]
    state[f"{prefix}.o_proj.weight"] = o.reshape(o.shape[0], len(perm), head_dim)[:, idx].reshape(o.shape)


def _contiguous_order(q_to_kv: list[int]) -> list[int]:
    return sorted(range(len(q_to_kv)), key=lambda h: (q_to_kv[h], h))


def convert_model(base, plan: Plan, permute: bool = True) -> KVShareLlamaForCausalLM:
    """The base model with the plan's K/V sharing applied (float weights as in ``base``)."""
    shape = ModelShape.of(base.config)
    if shape != plan.shape:
        raise KVShareError(f"plan is for a model of shape {vars(plan.shape)} but the base model is {vars(shape)}")
    src = base.state_dict()
    state = {k: v.clone() for k, v in src.items() if ".self_attn.k_proj." not in k and ".self_attn.v_proj." not in k}
    maps = []
    for i in range(shape.num_layers):
        prefix = f"model.layers.{i}.self_attn"
        q_to_kv = plan.q_to_kv(i)
        if permute:
            order = _contiguous_order(q_to_kv)
            _permute_queries(state, prefix, order, shape.head_dim)
            q_to_kv = [q_to_kv[h] for h in order]
        maps.append(q_to_kv)
        if not plan.stores_kv(i):
            continue
        members = [m for m in range(shape.num_layers) if plan.kv_layer[m] == i] if plan.cla_init == "mean" else [i]
        for proj in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                keys = [f"model.layers.{m}.self_attn.{proj}.{kind}" for m in members]
                if keys[0] in src:
                    pooled = [_pool(src[k], plan.groups[i]) for k in keys]
                    state[f"{prefix}.{proj}.{kind}"] = torch.stack(pooled).mean(0)
    config = KVShareLlamaConfig(
        **{k: v for k, v in base.config.to_dict().items() if k not in ("model_type", "architectures")},
        q_to_kv=maps,
        kv_layer=list(plan.kv_layer),
    )
    config.num_key_value_heads = max(max(m) + 1 for m in maps)  # informational; layers use q_to_kv
    model = KVShareLlamaForCausalLM(config).to(next(base.parameters()).dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def plain_llama_kv_heads(config: KVShareLlamaConfig) -> int | None:
    """The KV-head count if the model is an ordinary GQA Llama up to query order, else None."""
    if any(j != i for i, j in enumerate(config.kv_layer)):
        return None
    counts = {max(m) + 1 for m in config.q_to_kv}
    if len(counts) != 1:
        return None
    n_kv = counts.pop()
    sizes = {m.count(g) for m in config.q_to_kv for g in range(n_kv)}
    return n_kv if sizes == {config.num_attention_heads // n_kv} else None


def to_plain_llama(model: KVShareLlamaForCausalLM):
    """An exactly equivalent ``LlamaForCausalLM`` (query heads reordered), for models with equal groups everywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_kv = plain_llama_kv_heads(model.config)
    if n_kv is None:
        raise KVShareError(
            "the model has unequal groups, differing counts or cross-layer sharing: it needs kvshare_llama"
        )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, q_to_kv in enumerate(model.config.q_to_kv):
        _permute_queries(state, f"model.layers.{i}.self_attn", _contiguous_order(q_to_kv), model.config.head_dim)
    skip = ("model_type", "architectures", "q_to_kv", "kv_layer")
    config = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k not in skip})
    config.num_key_value_heads = n_kv
    plain = LlamaForCausalLM(config).to(next(model.parameters()).dtype)
    plain.load_state_dict(state, strict=True)
    return plain.eval()
