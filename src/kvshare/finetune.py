"""Stage ``finetune``: uptrain a converted checkpoint on a token corpus with the LM loss.

    python -m kvshare.finetune finetune.checkpoint=.../converted finetune.data_dir=resources/data/tiny/pydoc \
        finetune.out=.../finetuned finetune.max_steps=100

AdamW with linear warmup then cosine decay to ``min_lr_fraction`` of the peak,
gradient clipping, bf16 autocast on CUDA. Batches are random windows of the
training split (seeded). Held-out loss is measured at the end on the first
windows of the held-out split. Writes a checkpoint in the same format convert
writes (the spec gains the finetune run id), so evaluate takes either.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from kvshare.cli import entry
from kvshare.convert import SPEC, read_spec
from kvshare.data import load_tokens
from kvshare.errors import KVShareError
from kvshare.models import load_model, resolve_device, save_model
from kvshare.tracking import stage_run


def lr_at(step: int, max_steps: int, warmup: int, min_fraction: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine from 1 to ``min_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def random_windows(tokens: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    if len(tokens) <= seq_len + 1:
        raise KVShareError(f"finetune.seq_len={seq_len} needs more than {len(tokens)} training tokens: lower it")
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def heldout_loss(model, tokens: np.ndarray, seq_len: int, windows: int, device, autocast) -> float:
    model.eval()
    n = min(windows, (len(tokens) - 1) // seq_len)
    total = 0.0
    for w in range(n):
        x = torch.from_numpy(tokens[w * seq_len : (w + 1) * seq_len + 1].astype(np.int64))[None].to(device)
        with autocast():
            total += model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.item()
    model.train()
    return total / max(n, 1)


def run(cfg: DictConfig) -> dict:
    f = cfg.finetune
    spec = read_spec(f.checkpoint)
    device = resolve_device(cfg.device)
    if f.max_steps < 1 or f.batch_size < 1 or f.seq_len < 2:
        raise KVShareError(
            f"finetune.max_steps={f.max_steps}, batch_size={f.batch_size}, seq_len={f.seq_len} must be positive"
        )
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train, val = load_tokens(f.data_dir, "train"), load_tokens(f.data_dir, "val")
    model, tok = load_model(f.checkpoint, device)
    use_bf16 = device.type == "cuda" if f.bf16 == "auto" else bool(f.bf16)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    tags = {"model": spec["model"], "method": spec["method"], "budget": spec["budget"]}
    with stage_run(cfg, "finetune", tags) as mlrun:
        mlrun.set_tags({"kvshare.input_runs": spec["runs"].get("convert", "")})
        opt = torch.optim.AdamW(
            model.parameters(), lr=f.lr, betas=tuple(f.betas), weight_decay=f.weight_decay, fused=device.type == "cuda"
        )
        warmup = max(1, int(f.warmup_fraction * f.max_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, f.max_steps, warmup, f.min_lr_fraction))
        loss0 = heldout_loss(model, val, f.seq_len, 8, device, autocast)
        model.train()
        t0, tokens_seen = time.perf_counter(), 0
        for step in tqdm(range(f.max_steps), desc="finetune", mininterval=5):
            x = random_windows(train, f.batch_size, f.seq_len, rng).to(device)
            with autocast():
                loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
            if not torch.isfinite(loss):
                raise KVShareError(f"loss became {loss.item()} at step {step}: lower finetune.lr={f.lr}")
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), f.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            tokens_seen += x[:, :-1].numel()
            elapsed = time.perf_counter() - t0
            mlrun.log_metrics(
                {
                    "train_loss": loss.item(),
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": norm.item(),
                    "tokens_per_second": tokens_seen / elapsed,
                },
                step=step,
            )
        loss1 = heldout_loss(model, val, f.seq_len, 8, device, autocast)
        mlrun.log_metrics(
            {
                "heldout_loss_before": loss0,
                "heldout_loss_after": loss1,
                "train_tokens": tokens_seen,
                "wall_seconds": time.perf_counter() - t0,
            }
        )
        spec = {**spec, "runs": {**spec["runs"], "finetune": mlrun.run_id}, "finetune_tokens": tokens_seen}
        extra = {SPEC: json.dumps(spec, indent=1) + "\n"}
        remote = Path(f.checkpoint) / "modeling_kvshare.py"
        if remote.exists():
            extra[remote.name] = remote.read_text()
        save_model(model.to(torch.float32).cpu(), tok, f.out, extra)
    return {"heldout_loss_before": loss0, "heldout_loss_after": loss1}


main = entry("finetune", run)

if __name__ == "__main__":
    main()
