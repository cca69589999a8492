"""The model families kvshare converts, and what differs between them.

Llama (1/2/3, rope scaling included), Mistral and Qwen2 decoders are the same
computation (pre-norm, RMSNorm, rotary positions, SwiGLU MLP) apart from where
the attention projections carry biases: Llama's ``attention_bias`` puts one on
q, k, v and o; Mistral has none; Qwen2 has them on q, k and v only. So one
runtime (:mod:`kvshare.modeling`) serves all three, and an equal-group plan is
exported as the source's own architecture.

Sliding-window attention is refused: kvshare's runtime attends over the whole
context, so a converted model would compute something else.
"""

from __future__ import annotations

from kvshare.errors import KVShareError

FAMILIES = ("llama", "mistral", "qwen2")
SLIDING_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def check_family(config: dict, where: str) -> str:
    """The model type of a source config, or a one-line error naming what kvshare converts."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise KVShareError(
            f"{where} is a {kind!r} model: kvshare converts {', '.join(FAMILIES)} models (Llama-family decoders)"
        )
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", kind == "mistral")  # Qwen2 has a window but off by default
    if window is not None and uses_window and window < config.get("max_position_embeddings", window + 1):
        raise KVShareError(
            f"{where} uses sliding-window attention (sliding_window={window}): kvshare's runtime attends over the "
            "whole context; convert a checkpoint without it (e.g. Mistral-7B-v0.2 or later)"
        )
    return kind


def biases(config: dict) -> tuple[bool, bool]:
    """(bias on q, k and v; bias on o) of a family's attention projections."""
    kind = config.get("model_type")
    if kind == "qwen2":
        return True, False
    if kind == "mistral":
        return False, False
    qkv = bool(config.get("attention_bias", False))
    o = config.get("o_proj_bias")
    return qkv, qkv if o is None else bool(o)
