"""Quality measures on held-out tokens: perplexity, and agreement with the base model.

Both use the same non-overlapping windows of the held-out split. KL(base ‖
variant) of next-token distributions and top-1 agreement still separate
variants where a small model's zero-shot accuracy sits near chance.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kvshare.errors import KVShareError


def windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens from the start of ``tokens``: (n, seq_len)."""
    n = min(max_windows, len(tokens) // seq_len)
    if n < 1:
        raise KVShareError(f"evaluate.seq_len={seq_len} is longer than the {len(tokens)} held-out tokens: lower it")
    return torch.from_numpy(np.asarray(tokens[: n * seq_len], dtype=np.int64).reshape(n, seq_len))


@torch.no_grad()
def perplexity_and_agreement(model, batches: torch.Tensor, batch_size: int, base=None, device="cpu") -> dict:
    """Perplexity of ``model`` on every next token of each window; with ``base``, also KL and top-1 agreement."""
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for i in range(0, len(batches), batch_size):
        x = batches[i : i + batch_size].to(device)
        logp = F.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
        if base is not None:
            base_logp = F.log_softmax(base(input_ids=x).logits[:, :-1].float(), -1)
            kl += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "eval_tokens": count}
    if base is not None:
        out |= {"kl_to_base": kl / count, "top1_agreement": agree / count}
    return out
