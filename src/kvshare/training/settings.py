"""One run's training settings, and the learning-rate schedule they describe."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in the backward pass
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

    @classmethod
    def of_stage(cls, section: str, node, device, seed: int) -> TrainSettings:
        """A stage's settings: its config section, where ``auto`` switches (bf16, compile) mean "on CUDA", the
        distillation weight counts only with a teacher, and checkpoints default to ``<out>.resume``."""

        def switch(value) -> bool:
            return device.type == "cuda" if value == "auto" else bool(value)

        distill = node.get("distill") or {}
        return cls.from_cfg(
            section,
            node,
            bf16=switch(node.bf16),
            compile=switch(node.compile),
            distill_weight=float(distill.get("weight", 0.0)) if distill.get("teacher") else 0.0,
            distill_temperature=float(distill.get("temperature", 1.0)),
            seed=seed,
            resume_dir=str(node.resume_dir or f"{node.out}.resume"),
        )

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
