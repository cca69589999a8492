"""The names of sharing methods and attention layouts, parsed in one place.

A search method (``search.method``, the keys of a study grid's ``methods``) is a
within-layer method, a cross-layer one, or both joined by ``+``:

- within a layer: ``base`` (nothing merged), ``gqa``, ``mqa``, ``random``,
  ``random-s<seed>``, ``qcqa-ac``, ``qcqa-ec``;
- across layers: ``cla<k>``, every k adjacent layers share the first one's K/V;
- e.g. ``qcqa-ac+cla2``; ``cla2`` alone is ``base+cla2``.

A layout (``pretrain.layout``) names a model trained from scratch: ``mha``,
``mqa`` or ``gqa<k>`` (k KV heads per layer), optionally ``+cla<k>``.

The Snakefile builds its wildcard constraints from :data:`METHOD_PATTERN` and
:data:`LAYOUT_PATTERN`, and the comparisons group methods by :func:`family`.
This module imports nothing heavy: the Snakefile and every stage read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvshare.errors import KVShareError

WITHIN = ("base", "gqa", "mqa", "random", "qcqa-ac", "qcqa-ec")
_CLA = r"cla[1-9][0-9]*"
_WITHIN = r"base|gqa|mqa|random(?:-s[0-9]+)?|qcqa-ac|qcqa-ec"
METHOD_PATTERN = rf"(?:(?:{_WITHIN})(?:\+{_CLA})?|{_CLA})"
LAYOUT_PATTERN = rf"(?:mha|mqa|gqa[1-9][0-9]*)(?:\+{_CLA})?"
SEED = re.compile(r"^(?P<name>.+)-s(?P<seed>[0-9]+)$")  # a seeded baseline: random-s1 → random, seed 1


@dataclass(frozen=True)
class Method:
    """A parsed search method: ``within`` (one of :data:`WITHIN`), CLA factor ``cla`` (1: none), random ``seed``."""

    within: str
    cla: int = 1
    seed: int | None = None


def parse_method(method: str) -> Method:
    """``"qcqa-ac+cla2"`` → Method("qcqa-ac", 2); ``"cla2"`` → Method("base", 2); ``"random-s1"`` → seed 1."""
    text = str(method).lower()
    if not re.fullmatch(METHOD_PATTERN, text):
        raise KVShareError(
            f"search.method={method!r} is not known: use one of {', '.join(WITHIN)}, random-s<seed>, cla<k>, "
            "or <within>+cla<k>"
        )
    within, cla, seed = "base", 1, None
    for part in text.split("+"):
        if part.startswith("cla"):
            cla = int(part[3:])
        elif (m := SEED.match(part)) is not None:
            within, seed = m["name"], int(m["seed"])
        else:
            within = part
    return Method(within, cla, seed)


@dataclass(frozen=True)
class Layout:
    """A parsed pretraining layout: ``kv_heads`` per layer (None: as many as query heads) and CLA factor."""

    name: str
    kv_heads: int | None
    cla: int = 1


def parse_layout(layout: str) -> Layout:
    """``"mqa+cla2"`` → Layout(kv_heads=1, cla=2); ``"mha"`` → kv_heads None; ``"gqa4"`` → 4."""
    text = str(layout).lower()
    if not re.fullmatch(LAYOUT_PATTERN, text):
        raise KVShareError(
            f"pretrain.layout={layout!r} is not known: use mha, mqa or gqa<k>, optionally followed by +cla<k>"
        )
    first, _, cla = text.partition("+")
    kv = None if first == "mha" else 1 if first == "mqa" else int(first[3:])
    return Layout(text, kv, int(cla[3:]) if cla else 1)


def family(method: str) -> str:
    """The family a method is compared as: ``qcqa-ac`` → qcqa, ``random-s2`` → random, ``gqa4`` → gqa,
    ``mqa+cla2`` → mqa, ``cla2`` → cla."""
    within = [p for p in method.split("+") if not p.startswith("cla")]
    return re.match(r"[a-z]+", within[0]).group() if within else "cla"
