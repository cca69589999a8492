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

import time

from omegaconf import DictConfig

from kvshare.checkpoint import SPEC, read_config, read_spec, spec_text
from kvshare.cli import entry
from kvshare.errors import KVShareError
from kvshare.tracking import stage_run


def _teacher(path: str, device, bf16: bool, vocab_size: int):
    """The frozen distillation teacher, replicated on every rank (also under FSDP): frozen and in bf16 it takes
    2 bytes a weight (7B: 14 GB), against the 16 of a trained one, and needs no all-gathers."""
    import torch

    from kvshare.checkpoint import load_model

    teacher, _ = load_model(path, device, torch.bfloat16 if bf16 else torch.float32)
    teacher.requires_grad_(False)
    if teacher.config.vocab_size != vocab_size:
        raise KVShareError(
            f"finetune.distill.teacher={path} has vocabulary {teacher.config.vocab_size}, the student {vocab_size}: "
            "distil from the model the checkpoint was converted from"
        )
    return teacher


def run(cfg: DictConfig) -> dict:
    import torch

    from kvshare import training
    from kvshare.checkpoint import load_model, save_model
    from kvshare.data import load_tokens
    from kvshare.devices import resolve_device

    f = cfg.finetune
    spec = read_spec(f.checkpoint)
    dist, device = training.setup_distributed(resolve_device(cfg.device))
    s = training.TrainSettings.of_stage("finetune", f, device, cfg.seed)
    train_tokens, val = load_tokens(f.data_dir, "train"), load_tokens(f.data_dir, "val")
    # float32 master weights; FSDP moves each rank's shards to its GPU, so the whole model need only fit the host.
    model, tok = load_model(f.checkpoint, "cpu" if s.parallel == "fsdp" else device, torch.float32)
    teacher = _teacher(f.distill.teacher, device, s.bf16, model.config.vocab_size) if f.distill.teacher else None
    tags = {"model": spec["model"], "method": spec["method"], "budget": spec["budget"]}
    with stage_run(cfg, "finetune", tags, enabled=dist.main) as mlrun:
        mlrun.set_tags({"kvshare.input_runs": spec["runs"].get("convert", "")})
        t0 = time.perf_counter()
        inputs = {"checkpoint": str(f.checkpoint), "data_dir": str(f.data_dir), "teacher": f.distill.teacher}
        result = training.train(model, train_tokens, val, s, device, dist, teacher, mlrun.log_metrics, inputs)
        model = training.trained_model(model, dist)
        if dist.main:
            mlrun.log_metrics(result.summary(time.perf_counter() - t0))
            spec = {**spec, "runs": {**spec["runs"], "finetune": mlrun.run_id}, "finetune_tokens": result.tokens}
            # Trained in float32, stored as the checkpoint was: a bf16 7B model stays 14 GB, not 28.
            stored = read_config(f.checkpoint).get("dtype") or "float32"
            save_model(model.to(getattr(torch, stored)), tok, f.out, {SPEC: spec_text(spec)})
            training.clear_checkpoints(s.resume_dir)
    training.leave_distributed(dist)
    return {"heldout_loss_before": result.heldout_loss_before, "heldout_loss_after": result.heldout_loss_after}


main = entry("finetune", run)

if __name__ == "__main__":
    main()
