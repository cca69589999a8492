"""The loss: the decoder's last hidden states, then the LM head and cross-entropy fused in chunks of tokens.

Full float32 logits over a large vocabulary never exist: :func:`lm_loss` makes each
chunk's logits, its loss and its gradients in the forward pass and keeps only the
gradients. :class:`_Objective` (windows → loss) is the module DDP and FSDP wrap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvshare.training.settings import TrainSettings


def _chunk_loss_and_grad(logits, targets, teacher_logits, weight: float, temperature: float, scale: float):
    """Summed CE (and KL) of one chunk and d(loss)/d(logits) times ``scale``, in the logits' dtype."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits, float32 softmax
    lse = torch.logsumexp(z, -1, keepdim=True)
    ce = (lse.squeeze(-1) - z.gather(-1, targets[:, None]).squeeze(-1)).sum()
    is_target = torch.arange(z.shape[-1], device=z.device)[None] == targets[:, None]
    grad = torch.exp(z - lse) - is_target.to(z.dtype)
    kl = torch.zeros((), dtype=z.dtype, device=z.device)
    if teacher_logits is not None:
        log_s = torch.log_softmax(z / temperature, -1)
        log_t = torch.log_softmax(teacher_logits.to(z.dtype) / temperature, -1)
        p_t = log_t.exp()
        kl = (p_t * (log_t - log_s)).sum()
        # d/dz of T^2 * KL(p_t || softmax(z/T)) is T * (softmax(z/T) - p_t).
        grad = (1 - weight) * grad + weight * temperature * (log_s.exp() - p_t)
    return ce, kl, (grad * scale).to(logits.dtype)


_compiled_chunk = None


def _chunk_fn(compiled: bool):
    global _compiled_chunk
    if not compiled:
        return _chunk_loss_and_grad
    if _compiled_chunk is None:
        # Fuses softmax, target subtraction and the cast into a couple of passes over each chunk.
        _compiled_chunk = torch.compile(_chunk_loss_and_grad)
    return _compiled_chunk


class _FusedLMLoss(torch.autograd.Function):
    """LM head + loss by chunks of tokens; gradients are made in the forward pass so no logits are kept."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, t_hidden, t_weight, distill_weight, temperature, chunk, compiled):
        n = hidden.shape[0]
        fn = _chunk_fn(compiled)
        grad_h = torch.empty_like(hidden)
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        ce = kl = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk]
            t_logits = None if t_hidden is None else t_hidden[s : s + chunk] @ t_weight.T
            c, k, g = fn(h @ weight.T, targets[s : s + chunk], t_logits, distill_weight, temperature, 1.0 / n)
            ce, kl = ce + c, kl + k
            grad_h[s : s + chunk] = g @ weight
            grad_w += (g.T @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ce, kl = ce / n, kl / n
        # A fresh tensor: the loss is differentiable, the ce and kl reports are not.
        loss = ce.clone() if t_hidden is None else (1 - distill_weight) * ce + distill_weight * temperature**2 * kl
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None, None, None, None, None


def lm_loss(hidden, weight, targets, teacher=None, distill_weight=0.0, temperature=1.0, chunk=4096, compiled=False):
    """Mean loss over tokens of ``hidden`` (N, H) against ``targets`` (N,) through the LM head ``weight`` (V, H).

    Without a teacher the loss is cross-entropy; with ``teacher = (hidden, weight)`` it is
    ``(1 - w) * CE + w * T^2 * KL(teacher || student)`` at temperature T. Returns (loss, ce, kl).
    """
    t_hidden, t_weight = teacher if teacher is not None else (None, None)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLMLoss.apply(
            hidden, weight, targets, t_hidden, t_weight, distill_weight, temperature, chunk, compiled
        )
    n, ce, kl = hidden.shape[0], 0.0, 0.0
    acc = torch.promote_types(hidden.dtype, torch.float32)
    for s in range(0, n, chunk):
        logits = (hidden[s : s + chunk] @ weight.T).to(acc)
        ce = ce + F.cross_entropy(logits, targets[s : s + chunk], reduction="sum")
        if t_hidden is not None:
            log_t = torch.log_softmax((t_hidden[s : s + chunk] @ t_weight.T).to(acc) / temperature, -1)
            log_s = torch.log_softmax(logits / temperature, -1)
            kl = kl + (log_t.exp() * (log_t - log_s)).sum()
    ce, kl = torch.as_tensor(ce / n), torch.as_tensor(kl / n)
    loss = ce if t_hidden is None else (1 - distill_weight) * ce + distill_weight * temperature**2 * kl
    return loss, ce, kl


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (B, S, H), without the LM head."""
    cache = None  # a training forward needs no cache...
    if getattr(model, "shares_across_layers", False):
        # ...except that cross-layer sharing passes K/V between layers through it (kvshare.modeling):
        # one that a layer recomputed by activation checkpointing may write again (.activations).
        from kvshare.training.activations import KVHandover

        cache = KVHandover(model.config.num_hidden_layers)
    return model.model(input_ids=input_ids, past_key_values=cache, use_cache=False).last_hidden_state


class _Objective(nn.Module):
    """Windows → loss; the module DDP wraps, so gradient sync sees every trained parameter."""

    def __init__(self, model, s: TrainSettings, autocast: Callable):
        super().__init__()
        self.model, self.s, self.autocast = model, s, autocast

    def forward(self, windows, teacher=None):
        x, y = windows[:, :-1], windows[:, 1:]
        with self.autocast():
            h = final_hidden(self.model, x)
        w = self.model.get_output_embeddings().weight
        dtype = torch.bfloat16 if self.s.bf16 else h.dtype
        return lm_loss(
            h.flatten(0, 1).to(dtype),
            w.to(dtype),
            y.flatten(),
            teacher,
            self.s.distill_weight,
            self.s.distill_temperature,
            self.s.loss_chunk,
            self.s.compile,
        )
