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


def floor_seconds(weight_bytes: int, kv_per_token: int, batch: int, context: int, bandwidth: float) -> float:
    """The memory-bound floor of one decode step: every weight and every cached K/V read once."""
    return (weight_bytes + batch * context * kv_per_token) / bandwidth
