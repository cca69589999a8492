"""The training loop, in the shape of nanoGPT's: :func:`train` and the steps it is made of.

:func:`train` checks the settings, sets the run up (compile, DDP or FSDP, the optimizer),
resumes from the newest checkpoint if there is one, then for each step takes this rank's
windows, runs forward and backward over its micro-batches, clips, checks and steps the
optimizer, logs, and now and then evaluates on held-out windows and writes a checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kvshare.data import Windows, heldout_windows
from kvshare.errors import KVShareError
from kvshare.training.accounting import flops_per_token, matmul_flops
from kvshare.training.checkpoints import latest_checkpoint, load_checkpoint, rng_state, run_fingerprint, save_checkpoint
from kvshare.training.distributed import SINGLE, Dist, _all_mean, _fully_shard
from kvshare.training.loss import _Objective, final_hidden
from kvshare.training.settings import TrainSettings, lr_at


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
    peak_memory_gib: float | None = None  # the most GPU memory this process held (None on a CPU)

    def summary(self, wall_seconds: float) -> dict:
        """The run's summary metrics, as the stages log them."""
        return {
            "heldout_loss_before": self.heldout_loss_before,
            "heldout_loss_after": self.heldout_loss_after,
            "train_tokens": self.tokens,
            "tokens_per_second_median": self.tokens_per_second,
            "mfu_median": self.mfu,
            "peak_flops": self.peak_flops,
            "peak_memory_gib": self.peak_memory_gib,
            "resumed_from_step": self.resumed_from,
            "wall_seconds": wall_seconds,
        }


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
    accum = _check(s, dist, teacher)
    torch.manual_seed(s.seed)
    windows = Windows(train_tokens, s.seq_len, s.seed, s.section)
    heldout = heldout_windows(val_tokens, s.seq_len, s.eval_windows) if s.eval_windows else None
    run = _setup(model, s, device, dist, teacher, accum)
    fp = run_fingerprint(s, len(train_tokens), fingerprint)
    start, tokens_seen, history = _resume(run, fp)
    if "heldout_loss_before" not in history:
        history["heldout_loss_before"] = _evaluate(run, heldout)
    flops, peak = _flops(run)
    per_rank = s.global_batch // dist.world
    last_ckpt = latest_checkpoint(s.resume_dir)
    bar = tqdm(total=s.steps, initial=start, desc=s.section, disable=not (s.progress and dist.main), mininterval=2)
    clock = _Clock(s.global_batch * s.seq_len)
    for step in range(start, s.steps):
        batch = windows.batch(step * s.global_batch + dist.rank * per_rank, per_rank)
        lr = run.sched.get_last_lr()[0]
        stats, norm = _optimizer_step(run, batch, step, last_ckpt)
        tokens_seen += s.global_batch * s.seq_len
        rate = clock.lap(counted=step > start)  # the first step of a process includes compilation and warm-up
        metrics = {
            "train_loss": stats[0],
            "lr": lr,
            "grad_norm": norm,
            "tokens": tokens_seen,
            "tokens_per_second": rate,
            "mfu": rate / dist.world * flops / peak,
        }
        if teacher is not None:
            metrics |= {"train_ce": stats[1], "distill_kl": stats[2]}
        done = step + 1
        if s.eval_interval and done % s.eval_interval == 0 and done < s.steps:
            metrics["heldout_loss"] = _evaluate(run, heldout)
            clock.restart()  # evaluation time is not training throughput
        if s.checkpoint_interval and done % s.checkpoint_interval == 0 and s.resume_dir is not None:
            last_ckpt = _checkpoint(run, done, tokens_seen, history, fp) or last_ckpt
            clock.restart()  # nor is checkpoint time
        if dist.main:
            bar.set_postfix(loss=f"{stats[0]:.3f}", tok_s=f"{rate:,.0f}", mfu=f"{metrics['mfu']:.1%}", refresh=False)
            bar.update()
            if log is not None:
                log(metrics, done)
    bar.close()
    after = _evaluate(run, heldout)
    rate = clock.median()
    mfu = rate / dist.world * flops / peak
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return TrainResult(s.steps, tokens_seen, history["heldout_loss_before"], after, rate, mfu, peak, start, memory)


# --- setup ----------------------------------------------------------------------


@dataclass
class _Run:
    """What the steps of one run share: its settings, the model and its wrappers, the optimizer, where it runs."""

    s: TrainSettings
    model: nn.Module
    objective: _Objective  # windows -> loss
    step_fn: nn.Module  # what each micro-batch calls: the objective, or DDP's wrapper of it
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    dist: Dist
    teacher: nn.Module | None
    accum: int  # micro-batches per optimizer step on each rank
    autocast: Callable  # () -> the forward's autocast context

    @property
    def sharded(self) -> bool:
        return self.s.parallel == "fsdp"


def _check(s: TrainSettings, dist: Dist, teacher) -> int:
    """Micro-batches per step on each rank; a KVShareError if the settings cannot run."""
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
    return accum


def _setup(model, s: TrainSettings, device: torch.device, dist: Dist, teacher, accum: int) -> _Run:
    """The model on ``device`` in train mode, compiled and wrapped (DDP, FSDP) as ``s`` asks, and its optimizer."""
    sharded = s.parallel == "fsdp"
    if not sharded:  # fully_shard moves each shard to the device: the whole model need not fit one
        model.to(device)
    model.train()
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=s.bf16)
    if s.activation_checkpointing:  # before compiling, which traces the checkpoints into each layer's graph
        from kvshare.training.activations import checkpoint_layers

        checkpoint_layers(model, s.section, s.compile)
    if s.compile:  # before sharding, so FSDP's hooks stay outside each compiled layer
        _compile(model, sharded)
        if teacher is not None:
            _compile(teacher)
    objective = _Objective(model, s, autocast)
    step_fn = objective
    if sharded:
        _fully_shard(objective, s, device)
    elif dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_fn = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    opt, sched = _optimizer(model, s, device)
    return _Run(s, model, objective, step_fn, opt, sched, device, dist, teacher, accum, autocast)


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
        # Regional: layers of one shape share one compiled graph, so compiling takes seconds; it also ran
        # faster than compiling the decoder whole (benchmarks/results/finetune_bench.md).
        for layer in model.model.layers:
            layer.compile()
        # Layers whose groupings differ (QCQA-AC) each need a graph of their own, and under activation
        # checkpointing a second one for the recompute; beyond dynamo's recompile limit (8) the rest would run
        # eagerly, and a layer recomputed eagerly after a compiled forward fails the checkpoint's checks.
        import torch._dynamo.config

        shapes = {repr(vars(layer.self_attn).get("_slots")) + repr(vars(layer.self_attn).get("n_kv"))
                  for layer in model.model.layers}  # fmt: skip
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(shapes) + 8)


def _resume(run: _Run, fp: dict) -> tuple[int, int, dict]:
    """(step, tokens seen, history) of the newest checkpoint, loaded into the run; (0, 0, {}) on a fresh start."""
    found = latest_checkpoint(run.s.resume_dir)
    if found is None:
        return 0, 0, {}
    state = load_checkpoint(found, fp, run.s.resume_dir, run.model, run.opt, run.sched, run.device, run.sharded)
    return state["step"], state["tokens"], state["history"]


def _flops(run: _Run) -> tuple[float, float]:
    """Training FLOPs per token (with the teacher's forward) and the peak FLOP/s per GPU: MFU's two halves."""
    flops = flops_per_token(run.model, run.s.seq_len)
    peak = run.s.peak_flops or matmul_flops(run.device)
    if run.teacher is not None:  # its forward pass is a third of a training step's work
        flops += flops_per_token(run.teacher, run.s.seq_len) / 3
    return flops, peak


# --- one step -------------------------------------------------------------------


def _optimizer_step(run: _Run, batch: torch.Tensor, step: int, last_ckpt: Path | None) -> tuple[list[float], float]:
    """One optimizer step on this rank's ``batch``: (loss, ce, kl) averaged over its windows and all ranks, and the
    gradient norm.

    Stops with a KVShareError before updating when the loss or gradient is not finite, and on CUDA out-of-memory.
    """
    s = run.s
    try:
        sums = _forward_backward(run, batch)
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), s.grad_clip)
        if run.sharded:  # a DTensor, already reduced over ranks
            norm = norm.full_tensor()
        stats = _all_mean(sums / run.accum, run.dist).tolist()
        if not (math.isfinite(stats[0]) and math.isfinite(norm.item())):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise KVShareError(
                f"{s.section}: loss {stats[0]:.4g}, gradient norm {norm.item():.4g} at step {step + 1}; stopped "
                f"before updating ({where}): lower {s.section}.lr={s.lr} or raise warmup_fraction, then rerun"
            )
        run.opt.step()  # inside: the first step allocates AdamW's state
    except torch.OutOfMemoryError:
        raise KVShareError(
            f"CUDA ran out of memory at {s.section}.micro_batch={s.micro_batch}, seq_len={s.seq_len}: "
            f"lower micro_batch (global_batch={s.global_batch} is kept by accumulating gradients) or seq_len"
        ) from None
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    return stats, norm.item()


def _forward_backward(run: _Run, batch: torch.Tensor) -> torch.Tensor:
    """Accumulate the gradients of ``batch``'s mean loss, micro-batch by micro-batch; the summed (loss, ce, kl)."""
    mb_size = run.s.micro_batch
    loss_sum = ce_sum = kl_sum = torch.zeros((), device=run.device)
    for m in range(run.accum):
        mb = batch[m * mb_size : (m + 1) * mb_size].to(run.device, non_blocking=True)
        # DDP reduces the last micro-batch's gradients only; FSDP reduces each one, so that no
        # unsharded gradient outlives its layer's backward (the memory FSDP is for).
        defer = run.dist.world > 1 and not run.sharded and m < run.accum - 1
        with run.step_fn.no_sync() if defer else nullcontext():
            loss, ce, kl = run.step_fn(mb, _teacher_hidden(run, mb))
            (loss / run.accum).backward()
        loss_sum, ce_sum, kl_sum = loss_sum + loss.detach(), ce_sum + ce, kl_sum + kl
    return torch.stack([loss_sum, ce_sum, kl_sum])


def _teacher_hidden(run: _Run, batch: torch.Tensor):
    """The teacher's last hidden states and LM head on ``batch``, as the loss takes them (None without a teacher)."""
    if run.teacher is None:
        return None
    with torch.no_grad(), run.autocast():
        h = final_hidden(run.teacher, batch[:, :-1])
    dtype = torch.bfloat16 if run.s.bf16 else h.dtype
    return h.flatten(0, 1).to(dtype), run.teacher.get_output_embeddings().weight.to(dtype)


# --- evaluation, checkpoints, throughput ----------------------------------------


@torch.no_grad()
def _evaluate(run: _Run, heldout: torch.Tensor | None) -> float | None:
    """Mean loss over the held-out windows (None without them); the model goes back to train mode."""
    if heldout is None:
        return None
    run.model.eval()
    total_loss = 0.0
    for chunk in heldout.split(run.s.micro_batch):
        total_loss += run.objective(chunk.to(run.device))[1].item() * len(chunk)
    run.model.train()
    return total_loss / len(heldout)


def _checkpoint(run: _Run, done: int, tokens_seen: int, history: dict, fp: dict) -> Path | None:
    """Write the checkpoint after step ``done`` (every rank takes part); the folder, on the ranks that wrote it."""
    state = {
        "scheduler": run.sched.state_dict(),
        "rng": rng_state(run.device),
        "step": done,
        "tokens": tokens_seen,
        "history": history,
        "fingerprint": fp,
    }
    resume_dir, keep = Path(run.s.resume_dir), run.s.keep_checkpoints
    return save_checkpoint(resume_dir, done, state, keep, run.model, run.opt, run.dist, run.sharded)


class _Clock:
    """Training throughput: tokens per second of each step, with evaluation and checkpoint time left out."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.rates, self.last = tokens_per_step, [], time.perf_counter()

    def lap(self, counted: bool = True) -> float:
        """Tokens per second since the last lap (or restart); the ``counted`` ones make the median."""
        now = time.perf_counter()
        rate = self.tokens_per_step / (now - self.last)
        self.last = now
        if counted:
            self.rates.append(rate)
        return rate

    def restart(self) -> None:
        """The next lap starts now: the time since the last one was not training."""
        self.last = time.perf_counter()

    def median(self) -> float:
        return float(np.median(self.rates)) if self.rates else 0.0
