"""The KV-sharing plan: which query heads share a KV head, and which layer's KV each layer uses.

A plan is the search stage's result, the convert stage's input, the saved
artifact and the logged summary. It is expressed against the *source* model:
``groups[i][s]`` is the new KV head that source KV head ``s`` of layer ``i``
merges into (for an MHA source a KV head is a query head; for a GQA source it
is an existing KV head together with its query heads). ``kv_layer[i]`` is the
layer whose K/V layer ``i`` attends with (cross-layer attention, CLA); a layer
that uses another's K/V must use that layer's grouping too, because its query
heads attend to those very heads.

Plans validate themselves when built, so a plan that exists is consistent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvshare.errors import KVShareError
from kvshare.io import atomic_write_text

PLAN_FORMAT = "kvshare.plan/1"


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of the source model a plan applies to."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        """Shape of a Hugging Face Llama-family config (an object, or the dict of its config.json)."""
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        heads = get("num_attention_heads")
        kv = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or get("hidden_size") // heads
        if heads % kv:
            raise KVShareError(
                f"num_key_value_heads={kv} does not divide num_attention_heads={heads}: "
                "kvshare needs a model whose K/V heads each serve a whole set of query heads"
            )
        return cls(get("num_hidden_layers"), heads, kv, head_dim)

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


def canonical(groups: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Relabel group ids in order of first appearance, so equal partitions compare equal."""
    seen: dict[int, int] = {}
    return tuple(seen.setdefault(int(g), len(seen)) for g in groups)


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    groups: tuple[tuple[int, ...], ...]
    kv_layer: tuple[int, ...]
    method: str
    cla_init: str = "copy"  # "copy": a shared K/V starts as its producer's; "mean": as the group's mean
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        s = self.shape
        if len(self.groups) != s.num_layers or len(self.kv_layer) != s.num_layers:
            raise KVShareError(
                f"plan has {len(self.groups)} layers but the model has {s.num_layers}: "
                "the plan was made for another model"
            )
        object.__setattr__(self, "groups", tuple(canonical(g) for g in self.groups))
        for i, g in enumerate(self.groups):
            if len(g) != s.num_kv_heads:
                raise KVShareError(
                    f"layer {i} of the plan groups {len(g)} KV heads but the model has "
                    f"{s.num_kv_heads}: the plan was made for another model"
                )
        for i, j in enumerate(self.kv_layer):
            if not 0 <= j <= i:
                raise KVShareError(
                    f"layer {i} uses the K/V of layer {j}: a layer can only use its own or an earlier layer's K/V"
                )
            if self.kv_layer[j] != j:
                raise KVShareError(
                    f"layer {i} uses the K/V of layer {j}, which itself uses layer "
                    f"{self.kv_layer[j]}'s: point it at the layer that stores the K/V"
                )
            if self.groups[i] != self.groups[j]:
                raise KVShareError(
                    f"layer {i} shares layer {j}'s K/V but groups its heads differently "
                    f"({list(self.groups[i])} vs {list(self.groups[j])})"
                )
        if self.cla_init not in ("copy", "mean"):
            raise KVShareError(f"cla_init={self.cla_init!r} is not known; use 'copy' or 'mean'")

    # --- derived quantities -------------------------------------------------
    def stores_kv(self, layer: int) -> bool:
        return self.kv_layer[layer] == layer

    def n_kv(self, layer: int) -> int:
        """Number of KV heads layer ``layer`` attends with (stored here or in its producer)."""
        return max(self.groups[layer]) + 1

    def q_to_kv(self, layer: int) -> list[int]:
        """For each query head of the layer, the new KV head it attends with."""
        g, q = self.groups[layer], self.shape.queries_per_kv
        return [g[h // q] for h in range(self.shape.num_heads)]

    def is_grouped(self, layer: int) -> bool:
        return self.n_kv(layer) < self.shape.num_kv_heads

    @property
    def stored_kv_heads(self) -> int:
        return sum(self.n_kv(i) for i in range(self.shape.num_layers) if self.stores_kv(i))

    @property
    def kv_fraction(self) -> float:
        """KV-cache size relative to the source model."""
        return self.stored_kv_heads / (self.shape.num_layers * self.shape.num_kv_heads)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V bytes cached per token (CLA paper's measure; 16-bit by default)."""
        return 2 * self.stored_kv_heads * self.shape.head_dim * dtype_bytes

    # --- construction ---------------------------------------------------------
    @classmethod
    def identity(cls, shape: ModelShape, method: str = "base") -> Plan:
        ident = tuple(range(shape.num_kv_heads))
        return cls(shape, (ident,) * shape.num_layers, tuple(range(shape.num_layers)), method)

    def with_cla(self, kv_layer: list[int] | tuple[int, ...], cla_init: str = "copy") -> Plan:
        """This plan with layers sharing K/V across layers; consumers take their producer's grouping."""
        groups = tuple(self.groups[j] for j in kv_layer)
        return Plan(self.shape, groups, tuple(kv_layer), self.method, cla_init, dict(self.meta))

    # --- serialisation ------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "method": self.method,
            "shape": vars(self.shape),
            "cla_init": self.cla_init,
            "kv_fraction": self.kv_fraction,
            "kv_bytes_per_token_16bit": self.kv_bytes_per_token(2),
            "layers": [
                {
                    "groups": list(g),
                    "kv_layer": j,
                    "n_kv": self.n_kv(i),
                    "grouped": self.is_grouped(i),
                }
                for i, (g, j) in enumerate(zip(self.groups, self.kv_layer, strict=True))
            ],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict, expect: ModelShape | None = None) -> Plan:
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise KVShareError(f"plan format {got!r} is not {PLAN_FORMAT!r}: regenerate it with kvshare.search")
        try:
            shape = ModelShape(**d["shape"])
            layers = d["layers"]
            plan = cls(
                shape,
                tuple(tuple(int(x) for x in layer["groups"]) for layer in layers),
                tuple(int(layer["kv_layer"]) for layer in layers),
                str(d["method"]),
                d.get("cla_init", "copy"),
                d.get("meta", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, KVShareError):
                raise
            raise KVShareError(
                f"plan is missing or has a malformed field ({e}): regenerate it with kvshare.search"
            ) from e
        if expect is not None and expect != shape:
            raise KVShareError(f"plan is for a model of shape {vars(shape)} but this model is {vars(expect)}")
        return plan

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, expect: ModelShape | None = None) -> Plan:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise KVShareError(f"plan file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise KVShareError(f"plan file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(d, expect)


def cla_pattern(num_layers: int, spec: str | int | list[int]) -> list[int]:
    """The producer of each layer for a CLA spec: ``2`` or ``"cla2"`` (pairs), ``3``, or an explicit list."""
    if isinstance(spec, (list, tuple)):
        pattern = [int(x) for x in spec]
        if len(pattern) != num_layers:
            raise KVShareError(f"CLA pattern has {len(pattern)} entries but the model has {num_layers} layers")
        return pattern
    try:
        k = int(spec[3:] if isinstance(spec, str) and spec.lower().startswith("cla") else spec)
    except (TypeError, ValueError):
        raise KVShareError(
            f"CLA spec {spec!r} is not known; use cla2, cla3, ... or a list of producer layers"
        ) from None
    if k < 1:
        raise KVShareError(f"CLA sharing factor {k} must be >= 1")
    return [i - i % k for i in range(num_layers)]
