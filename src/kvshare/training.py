"""The training loop of ``kvshare.finetune`` and ``kvshare.pretrain``: fast, resumable, one or many GPUs.

Not a stage itself: the stages build the model and call :func:`train`; so does
``benchmarks/finetune_bench.py``. It imports only torch, numpy, tqdm and
transformers, so it runs where Hydra and MLflow are not installed.

- Data: the training split cut into non-overlapping windows of ``seq_len + 1``
  tokens, visited in a seeded random order, epoch after epoch. The windows of
  step ``s`` depend on (seed, s) alone, so a resumed run, a run on any number
  of GPUs and every model trained on the same token files see the same tokens.
- Step: ``global_batch`` windows; ``micro_batch`` per forward on each rank,
  gradients accumulated over the rest (and averaged over ranks under
  ``torchrun``). AdamW (fused on CUDA), weight decay on matrices only, linear
  warmup then cosine decay, gradient clipping, bf16 autocast.
- Ranks (``parallel``): ``ddp`` keeps a replica of the model on each;
  ``fsdp`` shards parameters, gradients and optimizer state over them (FSDP2,
  one unit per decoder layer), for models too big for one GPU.
- Loss: the LM head and cross-entropy run together in chunks of tokens
  (:func:`lm_loss`), so full float32 logits over a large vocabulary never exist;
  optionally mixed with a teacher's distillation KL.
- Checkpoints: every ``checkpoint_interval`` steps, model, optimizer, scheduler,
  step and RNG state go atomically to ``resume_dir/step-NNNNNNNN`` (under FSDP
  the model and optimizer as each rank's shards, torch.distributed.checkpoint);
  rerunning the same command resumes from the newest, and continues the loss
  curve exactly.
- Failures end with one line (:class:`KVShareError`): a non-finite loss or
  gradient stops before the update and names the last good checkpoint; CUDA
  out-of-memory names the batch settings to lower.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kvshare.data import Windows, heldout_windows
from kvshare.errors import KVShareError
from kvshare.io import atomic_dir, atomic_write_text

LATEST = "latest"
SHARDS = "shards"  # under FSDP: the folder of model and optimizer shards inside a checkpoint


@dataclass(frozen=True)
class TrainSettings:
    """One run's training settings; ``section`` names the config section in error messages."""

    section: str = "finetune"
    seq_len: int = 512
    micro_batch: int = 8  # windows per forward pass on one rank
    global_batch: int = 8  # windows per optimizer step, over all ranks and accumulation
    max_steps: int = 100
    tokens: int | None = None  # token budget; when set it decides the number of steps
    lr: float = 1e-4
    min_lr_fraction: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = False
    compile: bool = False
    loss_chunk: int = 4096  # tokens per chunk of the fused LM head + loss
    distill_weight: float = 0.0  # share of the teacher's KL in the loss (needs a teacher)
    distill_temperature: float = 1.0
    eval_interval: int = 0  # steps between held-out evaluations; 0: only before and after
    eval_windows: int = 8  # held-out windows of seq_len (from the split's start); 0: no evaluation
    checkpoint_interval: int = 0  # steps between resumable checkpoints; 0: none
    keep_checkpoints: int = 1
    resume_dir: str | None = None
    peak_flops: float | None = None  # per GPU, for MFU; None: measured here (matmul_flops)
    seed: int = 0
    progress: bool = True
    parallel: str = "ddp"  # under torchrun: ddp (a replica per rank) | fsdp (sharded, for models too big for one GPU)

    @classmethod
    def from_cfg(cls, section: str, node, **overrides) -> TrainSettings:
        """Settings from a config section (keys not named here are ignored), plus ``overrides``."""
        known = {k: node[k] for k in cls.__dataclass_fields__ if k in node}
        if "betas" in known:
            known["betas"] = tuple(float(b) for b in known["betas"])
        return cls(section=section, **{**known, **overrides})

    @property
    def steps(self) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.global_batch * self.seq_len)))
        return self.max_steps


def lr_at(step: int, max_steps: int, warmup: int, min_fraction: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine from 1 to ``min_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


# --- loss -------------------------------------------------------------------


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
    kwargs = {"use_cache": False}  # a training forward needs no cache...
    if getattr(model, "shares_across_layers", False):
        # ...except that cross-layer sharing passes K/V between layers through it (kvshare.modeling).
        from transformers import DynamicCache

        kwargs = {"past_key_values": DynamicCache(config=model.config), "use_cache": True}
    return model.model(input_ids=input_ids, **kwargs).last_hidden_state


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


# --- accounting -------------------------------------------------------------


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


# --- distributed --------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); each rank gets its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    import torch.distributed as tdist

    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def leave_distributed(dist: Dist) -> None:
    """Leave the process group (after the output is written), as torch expects before exit."""
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()


def _all_mean(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world > 1:
        import torch.distributed as tdist

        x = x.clone()
        tdist.all_reduce(x)
        x /= dist.world
    return x


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def _fully_shard(objective: _Objective, s: TrainSettings, device: torch.device) -> None:
    """FSDP2: each decoder layer is one unit of all-gather and reduce-scatter; the root holds the rest.

    The root is the objective, not the model: FSDP gathers the root's parameters around the root's
    forward, and the loss reads the LM head outside the model's forward.
    """
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    # With bf16: layers gather bf16 copies of their float32 shards and compute in them (so unlike DDP's
    # autocast, the residual stream is bf16 too); gradients are reduced and kept in float32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if s.bf16 else None, reduce_dtype=torch.float32)
    for layer in objective.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(objective, mesh=mesh, mp_policy=mp)


def _is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def trained_model(model, dist: Dist):
    """The trained ``model`` whole, in float32 on CPU, on rank 0 (None elsewhere); every rank must call it.

    Under FSDP, rank 0 gathers the shards and loads them into a fresh copy of the model.
    """
    if dist.world == 1 or not _is_sharded(model):
        return model.to(torch.float32).cpu() if dist.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.main:
        return None
    copy = type(model).from_pretrained(None, config=model.config, state_dict=full, dtype=torch.float32)
    copy.generation_config = model.generation_config
    return copy


# --- checkpoints --------------------------------------------------------------


def latest_checkpoint(resume_dir: str | Path | None) -> Path | None:
    if resume_dir is None:
        return None
    pointer = Path(resume_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(resume_dir) / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def _save_checkpoint(resume_dir: Path, step: int, state: dict, keep: int, dist: Dist = Dist(), shards=None) -> Path:
    """Rank 0 writes ``state``; with ``shards`` (FSDP) every rank must call it and writes its own part."""
    name = f"step-{step:08d}"
    with atomic_dir(resume_dir / name) if dist.main else nullcontext() as tmp:
        if shards is not None:
            import torch.distributed as tdist
            import torch.distributed.checkpoint as dcp

            folder = [tmp]
            tdist.broadcast_object_list(folder)  # rank 0's temporary folder
            dcp.save(shards, checkpoint_id=folder[0] / SHARDS)  # returns once every rank's part is written
        if dist.main:
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, "tokens": state["tokens"]}) + "\n")
    if dist.main:
        # The pointer moves only once the new folder is whole, so a kill at any moment leaves a good one.
        atomic_write_text(resume_dir / LATEST, name + "\n")
        for old in sorted(resume_dir.glob("step-*"))[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    return resume_dir / name


def _shards(model, opt) -> dict:
    """Model and optimizer state as this rank's shards, keyed by parameter name (torch.distributed.checkpoint)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, opt)
    return {"model": model_state, "optimizer": optimizer_state}


def _load_shards(model, opt, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    shards = _shards(model, opt)
    dcp.load(shards, checkpoint_id=folder)  # reshards if the number of ranks changed
    set_state_dict(model, opt, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    # CPU tensors whatever map_location put them on: torch accepts no other RNG state.
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# --- the loop -------------------------------------------------------------------


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
    dist: Dist = Dist(),
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


def clear_checkpoints(resume_dir: str | Path | None) -> None:
    """Remove a finished run's resume folder (call after its output is safely written)."""
    if resume_dir is not None and Path(resume_dir).exists():
        shutil.rmtree(resume_dir)
