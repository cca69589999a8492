"""Activation checkpointing: each decoder layer's activations are recomputed in the backward pass instead of kept.

Per layer and non-reentrant (``torch.utils.checkpoint``, ``use_reentrant=False``), through the
switch transformers gives each decoder layer (``GradientCheckpointingLayer``). It checkpoints
the layer's ``forward``, not its ``__call__``, so FSDP's hooks around a layer stay outside the
checkpoint and do not run again in the recompute; and torch.compile of a layer traces the
checkpoint into the layer's graph, whose backward then recomputes what it did not keep.
A layer then keeps only its input for the backward pass: about a third more compute for a
fraction of the activation memory.

Cross-layer attention (CLA) needs care. In a training forward a layer that stores K/V hands
them to the later layers that reuse them through the cache object (``final_hidden`` in
:mod:`.loss`, ``SharedKVAttention.forward`` in :mod:`kvshare.modeling`). transformers drops
the cache of a checkpointed layer, and a DynamicCache's ``update`` appends, so the recompute
of a storing layer in the backward pass would append its K/V a second time. So the cache of a
training forward is a :class:`KVHandover`, whose ``update`` overwrites a layer's K/V instead
(the recompute writes equal ones again, after the layers that read them were recomputed, as
the backward pass runs from the last layer down), and checkpointed layers are told to keep it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from kvshare.errors import KVShareError


class _HandoverLayer(DynamicLayer):
    """One layer's K/V in a training forward: those of the last update, overwritten rather than appended to."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states


class KVHandover(Cache):
    """The cache of a training forward: how a layer hands its K/V to the later layers that reuse them (CLA)."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[_HandoverLayer() for _ in range(num_layers)])


def checkpoint_layers(model, section: str = "finetune", compiled: bool = False) -> None:
    """Recompute each of ``model``'s decoder layers in the backward pass from now on (in train mode, with gradients).

    ``compiled``: the layers will be compiled (torch.compile), which CLA needs told (below).
    """
    layers = model.model.layers
    other = next((type(layer).__name__ for layer in layers if not isinstance(layer, GradientCheckpointingLayer)), None)
    if other is not None:
        raise KVShareError(
            f"{section}.activation_checkpointing=true needs transformers' checkpointable decoder layers, "
            f"not {other}: set it to false"
        )
    shares = getattr(model, "shares_across_layers", False)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        if shares:  # keep past_key_values: the KVHandover that carries K/V between layers
            layer._can_checkpoint_with_cache = True
    if shares and compiled:
        # torch.compile traces a checkpointed layer as a region it may replay in the backward pass, and
        # refuses one that writes to a Python object, as a storing layer's write into the handover
        # does (it falls back to running that layer uncompiled), unless told that the write need not
        # be replayed in the backward: it need not, the handover holds those K/V already. This is
        # process-wide, but changes only checkpointed regions that write Python state.
        import torch._dynamo

        if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
