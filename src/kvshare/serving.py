"""What a serving engine can do with a plan: which form serves it, and what the engine must cache.

Serving engines (llama.cpp, vLLM, transformers) implement grouped-query attention
as *equal* groups: every KV head serves the same number of consecutive query
heads, and every layer caches its own K/V. A kvshare layout (one query→KV map
per layer, the CLA pattern) is therefore:

- ``llama``: equal groups, the same count in every layer, no CLA: plain GQA,
  which every engine serves;
- ``per-layer``: equal groups in each layer, counts that differ between layers,
  no CLA: llama.cpp serves it as its ``deci`` architecture (the Llama graph with
  per-layer ``head_count_kv``; its ``llama`` architecture reads the array but
  sizes every layer by layer 0, so it does not load). llama.cpp caches the
  plan's bytes with flash attention; without it, it pads every layer's V to the
  widest layer's (benchmarks/results/llamacpp_check.md);
- neither (unequal groups, or CLA): no engine serves it as planned. Its
  *deployable* form repeats KV heads until each layer's groups are equal (the
  greatest common divisor of its group sizes) and caches K/V in every layer,
  CLA consumers included; :func:`deployable_kv_bytes_per_token` is what that
  costs, beside the plan's nominal ``Plan.kv_bytes_per_token``.

This module imports nothing heavy: search, evaluate and export read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from kvshare.errors import KVShareError
from kvshare.plan import Plan

FORMS = ("llama", "per-layer")


@dataclass(frozen=True)
class Layout:
    """Per layer, each query head's KV head (in the model's query order) and the layer whose K/V it uses."""

    maps: tuple[tuple[int, ...], ...]
    kv_layer: tuple[int, ...]

    @classmethod
    def of_plan(cls, plan: Plan) -> Layout:
        return cls(tuple(tuple(plan.q_to_kv(i)) for i in range(plan.shape.num_layers)), plan.kv_layer)

    @classmethod
    def of_config(cls, config: dict) -> Layout:
        """The layout of a checkpoint's config.json: a ``kvshare_llama`` config's maps, or plain GQA."""
        heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
        if config.get("q_to_kv") is not None:
            return cls(tuple(tuple(m) for m in config["q_to_kv"]), tuple(config["kv_layer"]))
        size = heads // (config.get("num_key_value_heads") or heads)
        return cls((tuple(h // size for h in range(heads)),) * layers, tuple(range(layers)))

    def sizes(self, layer: int) -> list[int]:
        """Query heads per KV head of the layer."""
        m = self.maps[layer]
        return [m.count(k) for k in range(max(m) + 1)]

    def kv_heads(self, layer: int) -> int:
        return max(self.maps[layer]) + 1

    def padded_kv_heads(self, layer: int) -> int:
        """KV heads once the layer's groups are made equal by repeating KV heads."""
        return len(self.maps[layer]) // gcd(*self.sizes(layer))

    def unequal_layers(self) -> list[int]:
        return [i for i in range(len(self.maps)) if len(set(self.sizes(i))) > 1]

    def cla_layers(self) -> list[int]:
        return [i for i, j in enumerate(self.kv_layer) if j != i]

    def form(self) -> str | None:
        """``llama``, ``per-layer``, or None when no engine serves the layout as it is."""
        if self.unequal_layers() or self.cla_layers():
            return None
        return "llama" if len({self.kv_heads(i) for i in range(len(self.maps))}) == 1 else "per-layer"

    def deployable_kv_heads(self) -> int:
        """KV heads a standard engine caches per token: equal groups in every layer, CLA consumers included."""
        return sum(self.padded_kv_heads(i) for i in range(len(self.maps)))


def deployable_kv_bytes_per_token(plan: Plan, dtype_bytes: int = 2) -> int:
    """K and V bytes a standard engine caches per token to serve ``plan`` (16-bit by default)."""
    return 2 * Layout.of_plan(plan).deployable_kv_heads() * plan.shape.head_dim * dtype_bytes


def _layers(layers: list[int]) -> str:
    text = ",".join(map(str, layers[:6]))
    return f"layer {text}" if len(layers) == 1 else f"layers {text}{',...' if len(layers) > 6 else ''}"


def why_not_servable(layout: Layout, head_dim: int) -> str:
    """One sentence: why no engine serves ``layout``, and its nearest servable forms."""
    nominal = 4 * head_dim * sum(layout.kv_heads(i) for i in range(len(layout.maps)) if layout.kv_layer[i] == i)
    deployable = 4 * head_dim * layout.deployable_kv_heads()
    if layout.cla_layers():
        return (
            f"{_layers(layout.cla_layers())} reuse another layer's K/V (CLA), which no serving engine does: "
            f"the nearest servable form is the same grouping with every layer caching its own K/V "
            f"({deployable} bytes/token in 16 bits against the plan's {nominal}), which is another model: "
            "search and convert the method without +cla<k>"
        )
    unequal = layout.unequal_layers()
    sizes = "+".join(map(str, layout.sizes(unequal[0])))
    return (
        f"{_layers(unequal)} share KV heads between unequal groups of query heads ({sizes} in layer {unequal[0]}), "
        f"which no serving engine does: the nearest servable form repeats KV heads into equal groups "
        f"({deployable} bytes/token in 16 bits against the plan's {nominal}; export.pad=true writes it), "
        "or search the budget again with search.servable=true (equal groups in every layer)"
    )


def check_servable(plan: Plan) -> None:
    """A one-line error unless some engine serves ``plan`` as it is (``search.servable=true``)."""
    layout = Layout.of_plan(plan)
    if layout.form() is None:
        raise KVShareError(f"search.servable=true: {why_not_servable(layout, plan.shape.head_dim)}")
