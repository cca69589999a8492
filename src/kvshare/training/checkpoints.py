"""Resumable checkpoints: model, optimizer, scheduler, step and RNG state, written atomically.

Every ``checkpoint_interval`` steps a run writes ``resume_dir/step-NNNNNNNN`` and then
points ``resume_dir/latest`` at it; under FSDP the model and optimizer go as each
rank's shards (torch.distributed.checkpoint). Rerunning the same command resumes
from the newest, and continues the loss curve exactly.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from kvshare.errors import KVShareError
from kvshare.io import atomic_dir, atomic_write_text
from kvshare.training.distributed import SINGLE, Dist, barrier
from kvshare.training.settings import TrainSettings

LATEST = "latest"
SHARDS = "shards"  # under FSDP: the folder of model and optimizer shards inside a checkpoint


def latest_checkpoint(resume_dir: str | Path | None) -> Path | None:
    if resume_dir is None:
        return None
    pointer = Path(resume_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(resume_dir) / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def run_fingerprint(s: TrainSettings, train_tokens: int, extra: dict | None = None) -> dict:
    """Everything a resumed run must share with the original for its losses to continue exactly (JSON-able).

    ``extra`` names what else must match (input paths, say). Settings that change speed or memory but not the
    losses (micro_batch, compile, activation_checkpointing, the number of GPUs) may differ: a run that ran out of
    memory can resume with a smaller micro-batch, say.
    """
    keys = ("seq_len", "global_batch", "lr", "min_lr_fraction", "warmup_fraction", "weight_decay", "betas")
    fp = {k: getattr(s, k) for k in keys} | {"steps": s.steps, "seed": s.seed, "distill": s.distill_weight}
    if s.parallel == "fsdp":  # its checkpoints hold shards, not whole state dicts
        fp["parallel"] = s.parallel
    return json.loads(json.dumps({**fp, "train_tokens": train_tokens, **(extra or {})}))


def save_checkpoint(
    resume_dir: Path, step: int, state: dict, keep: int, model, opt, dist: Dist = SINGLE, sharded: bool = False
) -> Path | None:
    """Write checkpoint ``step``: ``state`` plus the model and optimizer. Every rank must call it.

    Returns the folder written, or None on a rank that wrote nothing (all but rank 0, unless ``sharded``).
    """
    path = None
    if sharded:
        path = _write(resume_dir, step, state, keep, dist, _shards(model, opt))
    elif dist.main:
        path = _write(resume_dir, step, state | {"model": model.state_dict(), "optimizer": opt.state_dict()}, keep)
    barrier(dist)
    return path


def _write(resume_dir: Path, step: int, state: dict, keep: int, dist: Dist = SINGLE, shards=None) -> Path:
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


def load_checkpoint(folder: Path, fp: dict, resume_dir, model, opt, sched, device: torch.device, sharded: bool) -> dict:
    """Load checkpoint ``folder`` into the model, optimizer, scheduler and RNGs; return its state (step, tokens, ...).

    Refuses one written by a run of another fingerprint (:func:`run_fingerprint`).
    """
    state = torch.load(folder / "state.pt", map_location=device, weights_only=False)
    if state["fingerprint"] != fp:
        diff = sorted(k for k in fp.keys() | state["fingerprint"].keys() if fp.get(k) != state["fingerprint"].get(k))
        raise KVShareError(
            f"{folder} was written by a run with other settings ({', '.join(diff)}): "
            f"restore them, or delete {resume_dir} to start afresh"
        )
    if sharded:
        _load_shards(model, opt, folder / SHARDS)
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"], device)
    return state


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


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    # CPU tensors whatever map_location put them on: torch accepts no other RNG state.
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def clear_checkpoints(resume_dir: str | Path | None) -> None:
    """Remove a finished run's resume folder (call after its output is safely written)."""
    if resume_dir is not None and Path(resume_dir).exists():
        shutil.rmtree(resume_dir)
