"""Stage ``finetune``: uptrain a converted checkpoint on a token corpus, optionally distilling from the base model.

    python -m kvshare.finetune finetune.checkpoint=.../converted finetune.data_dir=resources/data/tiny/pydoc \
        finetune.out=.../finetuned finetune.tokens=2000000 finetune.distill.teacher=resources/models/tiny

    torchrun --nproc_per_node=2 -m kvshare.finetune ...   # the same on 2 GPUs (DDP)
    torchrun --nproc_per_node=8 -m kvshare.finetune finetune.parallel=fsdp ...   # sharded (FSDP)

The loop is :func:`kvshare.training.train` (see it for data order, batching,
schedule, checkpoints and failure messages). Resumable checkpoints go to
``finetune.resume_dir`` every ``checkpoint_interval`` steps: rerunning the same
command after a kill continues where it stopped; the folder is removed once
the output is written. Writes a checkpoint in the format convert writes (the
spec gains the finetune run id), so evaluate takes either.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from kvshare.cli import entry
from kvshare.convert import SPEC, read_spec
from kvshare.data import load_tokens
from kvshare.errors import KVShareError
from kvshare.models import load_model, resolve_device, save_model
from kvshare.training import (
    Dist,
    TrainResult,
    TrainSettings,
    clear_checkpoints,
    leave_distributed,
    setup_distributed,
    train,
    trained_model,
)


def settings(section: str, node, cfg: DictConfig, device: torch.device) -> TrainSettings:
    """Training settings from a stage's config section; ``auto`` switches mean: on CUDA."""

    def switch(value) -> bool:
        return device.type == "cuda" if value == "auto" else bool(value)

    distill = node.get("distill") or {}
    return TrainSettings.from_cfg(
        section,
        node,
        bf16=switch(node.bf16),
        compile=switch(node.compile),
        distill_weight=float(distill.get("weight", 0.0)) if distill.get("teacher") else 0.0,
        distill_temperature=float(distill.get("temperature", 1.0)),
        seed=cfg.seed,
        resume_dir=str(node.resume_dir or f"{node.out}.resume"),
    )


class _NoRun:
    """What ranks other than 0 get instead of an MLflow run."""

    run_id = None

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass


@contextmanager
def tracked(cfg: DictConfig, stage: str, tags: dict, dist: Dist):
    """The stage's MLflow run on rank 0; a stand-in elsewhere, so only one run is recorded."""
    if not dist.main:
        yield _NoRun()
        return
    from kvshare.tracking import stage_run

    with stage_run(cfg, stage, tags) as mlrun:
        yield mlrun


def log_summary(mlrun, result: TrainResult, wall: float) -> None:
    mlrun.log_metrics(
        {
            "heldout_loss_before": result.heldout_loss_before,
            "heldout_loss_after": result.heldout_loss_after,
            "train_tokens": result.tokens,
            "tokens_per_second_median": result.tokens_per_second,
            "mfu_median": result.mfu,
            "peak_flops": result.peak_flops,
            "resumed_from_step": result.resumed_from,
            "wall_seconds": wall,
        }
    )


def run(cfg: DictConfig) -> dict:
    f = cfg.finetune
    spec = read_spec(f.checkpoint)
    dist, device = setup_distributed(resolve_device(cfg.device))
    s = settings("finetune", f, cfg, device)
    train_tokens, val = load_tokens(f.data_dir, "train"), load_tokens(f.data_dir, "val")
    # FSDP moves each rank's shards to its GPU, so the whole model need only fit in host memory.
    model, tok = load_model(f.checkpoint, "cpu" if s.parallel == "fsdp" else device)
    teacher = None
    if f.distill.teacher:
        # Replicated on every rank, also under FSDP: frozen and in bf16 it takes 2 bytes a weight
        # (7B: 14 GB), against the 16 of a trained one, and needs no all-gathers.
        teacher, _ = load_model(f.distill.teacher, device, torch.bfloat16 if s.bf16 else torch.float32)
        teacher.requires_grad_(False)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise KVShareError(
                f"finetune.distill.teacher={f.distill.teacher} has vocabulary {teacher.config.vocab_size}, "
                f"the student {model.config.vocab_size}: distil from the model the checkpoint was converted from"
            )
    tags = {"model": spec["model"], "method": spec["method"], "budget": spec["budget"]}
    with tracked(cfg, "finetune", tags, dist) as mlrun:
        mlrun.set_tags({"kvshare.input_runs": spec["runs"].get("convert", "")})
        t0 = time.perf_counter()
        inputs = {"checkpoint": str(f.checkpoint), "data_dir": str(f.data_dir), "teacher": f.distill.teacher}
        result = train(model, train_tokens, val, s, device, dist, teacher, mlrun.log_metrics, inputs)
        model = trained_model(model, dist)
        if dist.main:
            log_summary(mlrun, result, time.perf_counter() - t0)
            spec = {**spec, "runs": {**spec["runs"], "finetune": mlrun.run_id}, "finetune_tokens": result.tokens}
            extra = {SPEC: json.dumps(spec, indent=1) + "\n"}
            remote = Path(f.checkpoint) / "modeling_kvshare.py"
            if remote.exists():
                extra[remote.name] = remote.read_text()
            save_model(model, tok, f.out, extra)
            clear_checkpoints(s.resume_dir)
    leave_distributed(dist)
    return {"heldout_loss_before": result.heldout_loss_before, "heldout_loss_after": result.heldout_loss_after}


main = entry("finetune", run)

if __name__ == "__main__":
    main()
