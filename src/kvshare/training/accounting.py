"""What a training step costs: FLOPs per token, and the FLOP/s of the device it runs on (MFU's two halves)."""

from __future__ import annotations

import time

import numpy as np
import torch


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight used in matmuls, plus attention's 12 * layers * q-width * seq_len."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    if not c.tie_word_embeddings:  # the input embedding is a lookup, not a matmul
        n -= model.get_input_embeddings().weight.numel()
    return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def matmul_flops(device: torch.device, reps: int = 10) -> float:
    """FLOP/s of one large matrix product on ``device``: MFU's denominator, measured where the training runs.

    On a GPU a bf16 8192^3 product (729 TFLOP/s on the lent H100, 783 on an H200, against
    989 on their datasheets); on a CPU a float32 512^3 one, cheap, so CPU runs still log a
    (meaningless but finite) MFU. Median of ``reps`` timed products after two warm-ups.
    """
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times))
