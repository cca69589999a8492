"""The training loop: :func:`train` and the optimizer it steps."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvshare.data import Windows, heldout_windows
from kvshare.errors import KVShareError
from kvshare.training.accounting import flops_per_token, matmul_flops
from kvshare.training.checkpoints import (
    SHARDS,
    _load_shards,
    _rng_state,
    _save_checkpoint,
    _set_rng_state,
    _shards,
    latest_checkpoint,
)
from kvshare.training.distributed import SINGLE, Dist, _all_mean, _fully_shard, barrier
from kvshare.training.loss import _Objective, final_hidden
from kvshare.training.settings import TrainSettings, lr_at


def _optimizer(model, s: TrainSettings, device: torch.device):
    """AdamW (weight decay on matrices only) and its warmup + cosine schedule over ``s.steps``."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=s.betas,
        fused=device.type == "cuda",
    )
    total, warmup = s.steps, max(1, int(s.warmup_fraction * s.steps))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(i, total, warmup, s.min_lr_fraction))


def _compile(model, sharded: bool = False) -> None:
    if getattr(model, "shares_across_layers", False) and not sharded:
        # Each layer reads its own slot of the K/V-passing cache, so per-layer graphs cannot be
        # shared (one guarded recompile per layer, slow to dispatch): compile the decoder whole.
        # Not under FSDP: its hooks around each layer are hidden from dynamo, so a decoder-wide
        # graph would break at every layer and fall back to eager, compiling layer by layer anyway.
        model.model.compile()
    else:
        # Regional: all layers share one compiled graph, so compiling takes seconds; it also ran
        # faster than compiling the decoder whole (benchmarks/results/finetune_bench.md).
        for layer in model.model.layers:
            layer.compile()


@dataclass
class TrainResult:
    steps: int
    tokens: int
    heldout_loss_before: float | None
    heldout_loss_after: float | None
    tokens_per_second: float  # all ranks together, over this process's steps after its first
    mfu: float
    peak_flops: float  # MFU's denominator, per GPU
    resumed_from: int  # the step the run continued from (0: a fresh start)


def train(
    model,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    s: TrainSettings,
    device: torch.device,
    dist: Dist = SINGLE,
    teacher=None,
    log: Callable[[dict, int], None] | None = None,
    fingerprint: dict | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``s.steps`` optimizer steps (resuming from ``s.resume_dir`` if it holds one).

    ``log(metrics, step)`` gets every step's metrics on rank 0. ``fingerprint`` (JSON-able)
    names what else must match for a checkpoint to be resumed (input paths, say).
    """
    accum, rest = divmod(s.global_batch, s.micro_batch * dist.world)
    if accum < 1 or rest:
        raise KVShareError(
            f"{s.section}.global_batch={s.global_batch} must be a multiple of micro_batch={s.micro_batch} "
            f"x {dist.world} GPU(s)"
        )
    if s.seq_len < 2 or s.steps < 1 or not 0 <= s.distill_weight <= 1:
        raise KVShareError(
            f"{s.section}: seq_len={s.seq_len} must be >= 2, steps={s.steps} >= 1, distill_weight in [0, 1]"
        )
    if s.distill_weight > 0 and teacher is None:
        raise KVShareError(f"{s.section}.distill_weight={s.distill_weight} needs a teacher model")
    if s.parallel not in ("ddp", "fsdp"):
        raise KVShareError(f"{s.section}.parallel={s.parallel!r} is not one of: ddp, fsdp")
    if s.parallel == "fsdp" and dist.world == 1:
        raise KVShareError(
            f"{s.section}.parallel=fsdp shards the model over several processes: start them with "
            f"torchrun --nproc_per_node=N (N >= 2), or use {s.section}.parallel=ddp on one"
        )
    torch.manual_seed(s.seed)
    windows = Windows(train_tokens, s.seq_len, s.seed, s.section)
    heldout = heldout_windows(val_tokens, s.seq_len, s.eval_windows) if s.eval_windows else None
    total = s.steps
    sharded = s.parallel == "fsdp"
    if not sharded:  # fully_shard moves each shard to the device: the whole model need not fit one
        model.to(device)
    model.train()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16)

    if s.compile:  # before sharding, so FSDP's hooks stay outside each compiled layer
        _compile(model, sharded)
        if teacher is not None:
            _compile(teacher)
    objective = _Objective(model, s, autocast)
    step_fn = objective  # what each micro-batch calls
    if sharded:
        _fully_shard(objective, s, device)
    elif dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_fn = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    opt, sched = _optimizer(model, s, device)

    # Everything a resumed run must share with the original for its losses to continue exactly.
    keys = ("seq_len", "global_batch", "lr", "min_lr_fraction", "warmup_fraction", "weight_decay", "betas")
    fp = {k: getattr(s, k) for k in keys} | {"steps": total, "seed": s.seed, "distill": s.distill_weight}
    if sharded:  # its checkpoints hold shards, not whole state dicts
        fp["parallel"] = s.parallel
    fp = json.loads(json.dumps({**fp, "train_tokens": len(train_tokens), **(fingerprint or {})}))
    start, tokens_seen, history = 0, 0, {}
    found = latest_checkpoint(s.resume_dir)
    if found is not None:
        state = torch.load(found / "state.pt", map_location=device, weights_only=False)
        if state["fingerprint"] != fp:
            diff = sorted(
                k for k in fp.keys() | state["fingerprint"].keys() if fp.get(k) != state["fingerprint"].get(k)
            )
            raise KVShareError(
                f"{found} was written by a run with other settings ({', '.join(diff)}): "
                f"restore them, or delete {s.resume_dir} to start afresh"
            )
        if sharded:
            _load_shards(model, opt, found / SHARDS)
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], device)
        start, tokens_seen, history = state["step"], state["tokens"], state["history"]

    @torch.no_grad()
    def evaluate() -> float | None:
        if heldout is None:
            return None
        model.eval()
        total_loss = 0.0
        for chunk in heldout.split(s.micro_batch):
            total_loss += objective(chunk.to(device))[1].item() * len(chunk)
        model.train()
        return total_loss / len(heldout)

    def teacher_of(batch):
        if teacher is None:
            return None
        with torch.no_grad(), autocast():
            h = final_hidden(teacher, batch[:, :-1])
        dtype = torch.bfloat16 if s.bf16 else h.dtype
        return h.flatten(0, 1).to(dtype), teacher.get_output_embeddings().weight.to(dtype)

    if "heldout_loss_before" not in history:
        history["heldout_loss_before"] = evaluate()
    flops = flops_per_token(model, s.seq_len)
    peak = s.peak_flops or matmul_flops(device)
    if teacher is not None:  # its forward pass is a third of a training step's work
        flops += flops_per_token(teacher, s.seq_len) / 3
    per_rank = s.global_batch // dist.world
    last_ckpt = latest_checkpoint(s.resume_dir)
    bar = tqdm(total=total, initial=start, desc=s.section, disable=not (s.progress and dist.main), mininterval=2)
    rates: list[float] = []
    t_last = time.perf_counter()
    for step in range(start, total):
        batch = windows.batch(step * s.global_batch + dist.rank * per_rank, per_rank)
        loss_sum = ce_sum = kl_sum = torch.zeros((), device=device)
        lr = sched.get_last_lr()[0]
        try:
            for m in range(accum):
                mb = batch[m * s.micro_batch : (m + 1) * s.micro_batch].to(device, non_blocking=True)
                # DDP reduces the last micro-batch's gradients only; FSDP reduces each one, so that no
                # unsharded gradient outlives its layer's backward (the memory FSDP is for).
                defer = dist.world > 1 and not sharded and m < accum - 1
                with step_fn.no_sync() if defer else nullcontext():
                    loss, ce, kl = step_fn(mb, teacher_of(mb))
                    (loss / accum).backward()
                loss_sum, ce_sum, kl_sum = loss_sum + loss.detach(), ce_sum + ce, kl_sum + kl
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            if sharded:  # a DTensor, already reduced over ranks
                norm = norm.full_tensor()
            stats = _all_mean(torch.stack([loss_sum, ce_sum, kl_sum]) / accum, dist).tolist()
            if not (math.isfinite(stats[0]) and math.isfinite(norm.item())):
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise KVShareError(
                    f"{s.section}: loss {stats[0]:.4g}, gradient norm {norm.item():.4g} at step {step + 1}; stopped "
                    f"before updating ({where}): lower {s.section}.lr={s.lr} or raise warmup_fraction, then rerun"
                )
            opt.step()  # inside: the first step allocates AdamW's state
        except torch.OutOfMemoryError:
            raise KVShareError(
                f"CUDA ran out of memory at {s.section}.micro_batch={s.micro_batch}, seq_len={s.seq_len}: "
                f"lower micro_batch (global_batch={s.global_batch} is kept by accumulating gradients) or seq_len"
            ) from None
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += s.global_batch * s.seq_len
        now = time.perf_counter()
        rate = s.global_batch * s.seq_len / (now - t_last)
        t_last = now
        if step > start:  # the first step of a process includes compilation and warm-up
            rates.append(rate)
        metrics = {
            "train_loss": stats[0],
            "lr": lr,
            "grad_norm": norm.item(),
            "tokens": tokens_seen,
            "tokens_per_second": rate,
            "mfu": rate / dist.world * flops / peak,
        }
        if teacher is not None:
            metrics |= {"train_ce": stats[1], "distill_kl": stats[2]}
        done = step + 1
        if s.eval_interval and done % s.eval_interval == 0 and done < total:
            metrics["heldout_loss"] = evaluate()
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if s.checkpoint_interval and done % s.checkpoint_interval == 0 and s.resume_dir is not None:
            state = {
                "scheduler": sched.state_dict(),
                "rng": _rng_state(device),
                "step": done,
                "tokens": tokens_seen,
                "history": history,
                "fingerprint": fp,
            }
            if sharded:
                last_ckpt = _save_checkpoint(
                    Path(s.resume_dir), done, state, s.keep_checkpoints, dist, _shards(model, opt)
                )
            else:
                state |= {"model": model.state_dict(), "optimizer": opt.state_dict()}
                if dist.main:
                    last_ckpt = _save_checkpoint(Path(s.resume_dir), done, state, s.keep_checkpoints)
            barrier(dist)
            t_last = time.perf_counter()  # nor is checkpoint time
        if dist.main:
            bar.set_postfix(loss=f"{stats[0]:.3f}", tok_s=f"{rate:,.0f}", mfu=f"{metrics['mfu']:.1%}", refresh=False)
            bar.update()
            if log is not None:
                log(metrics, done)
    bar.close()
    after = evaluate()
    rate = float(np.median(rates)) if rates else 0.0
    return TrainResult(
        total,
        tokens_seen,
        history["heldout_loss_before"],
        after,
        rate,
        rate / dist.world * flops / peak,
        peak,
        start,
    )
