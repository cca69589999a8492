"""Quality measures on held-out tokens: perplexity, and agreement with the base model.

Both use the same windows of the held-out split (:func:`kvshare.data.strided_windows`):
``seq_len`` tokens each, starting every ``stride`` tokens; when windows overlap, only the tokens past the
previous window are scored, so every token is scored once and with the longest
context the window allows (the usual sliding-window perplexity). KL(base ‖
variant) of next-token distributions and top-1 agreement still separate
variants where a small model's zero-shot accuracy sits near chance.

The base model's logits come from the base model itself, resident beside the
variant, or from :func:`base_logits`, taken in a pass of their own and kept on
the host in the model's dtype (bf16 logits are stored exactly), when the two
models do not fit the device together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def base_logits(base, batches: torch.Tensor, batch_size: int, device="cpu") -> list[torch.Tensor]:
    """The base model's next-token logits for each batch of windows, on the host, in the model's own dtype."""
    return [base(input_ids=batches[i : i + batch_size].to(device)).logits[:, :-1].cpu()
            for i in range(0, len(batches), batch_size)]  # fmt: skip


@torch.no_grad()
def perplexity_and_agreement(
    model, batches: torch.Tensor, batch_size: int, base=None, device="cpu", stride: int | None = None
) -> dict:
    """Perplexity of ``model`` on the scored next tokens of each window; with ``base``, also KL and top-1 agreement.

    ``base`` is the base model, or its logits per batch (:func:`base_logits`, same ``batch_size``).
    The first window scores every prediction; later ones only their last ``stride`` (new) tokens.
    """
    seq_len = batches.shape[1]
    stride = stride or seq_len
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for i in range(0, len(batches), batch_size):
        x = batches[i : i + batch_size].to(device)
        # Window k predicts targets k*stride+1 .. k*stride+seq_len-1; those past the previous window are new.
        scored = torch.zeros(x.shape[0], seq_len - 1, dtype=torch.bool, device=device)
        for row in range(x.shape[0]):
            scored[row, 0 if i + row == 0 else max(0, seq_len - 1 - stride) :] = True
        logp = F.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        nll -= logp.gather(-1, x[:, 1:, None]).squeeze(-1)[scored].sum().item()
        count += int(scored.sum())
        if base is not None:
            logits = base[i // batch_size].to(device) if isinstance(base, list) else base(input_ids=x).logits[:, :-1]
            base_logp = F.log_softmax(logits.float(), -1)
            kl += F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1)[scored].sum().item()
            agree += (logp.argmax(-1) == base_logp.argmax(-1))[scored].sum().item()
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "eval_tokens": count}
    if base is not None:
        out |= {"kl_to_base": kl / count, "top1_agreement": agree / count}
    return out
