"""The training loop of ``kvshare.finetune`` and ``kvshare.pretrain``: fast, resumable, one or many GPUs.

Not a stage itself: the stages build the model and call :func:`train`; so does
``benchmarks/finetune_bench.py``. It needs only torch, numpy, tqdm and
transformers (the last imported where it is used), so it runs where Hydra and
MLflow are not installed.

- Data: the training split cut into non-overlapping windows of ``seq_len + 1``
  tokens, visited in a seeded random order, epoch after epoch
  (:class:`kvshare.data.Windows`). The windows of step ``s`` depend on (seed, s)
  alone, so a resumed run, a run on any number of GPUs and every model trained
  on the same token files see the same tokens.
- Step: ``global_batch`` windows; ``micro_batch`` per forward on each rank,
  gradients accumulated over the rest (and averaged over ranks under
  ``torchrun``). AdamW (fused on CUDA), weight decay on matrices only, linear
  warmup then cosine decay, gradient clipping, bf16 autocast.
- Ranks (``parallel``): ``ddp`` keeps a replica of the model on each;
  ``fsdp`` shards parameters, gradients and optimizer state over them (FSDP2,
  one unit per decoder layer), for models too big for one GPU.
- Memory (``activation_checkpointing``): each decoder layer's activations are
  recomputed in the backward pass instead of kept (per layer, non-reentrant),
  for about a third more compute; with cross-layer K/V sharing, compile, DDP
  and FSDP alike (:mod:`.activations`).
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

Modules: :mod:`.settings` (TrainSettings, the schedule), :mod:`.loss`,
:mod:`.distributed` (ranks, FSDP), :mod:`.checkpoints`, :mod:`.accounting`
(FLOPs, MFU), :mod:`.activations` (activation checkpointing, and the K/V
hand-over of cross-layer sharing) and :mod:`.loop` (:func:`train`).
"""

from kvshare.training.accounting import flops_per_token, matmul_flops
from kvshare.training.checkpoints import clear_checkpoints, latest_checkpoint
from kvshare.training.distributed import Dist, barrier, leave_distributed, setup_distributed, trained_model
from kvshare.training.loop import TrainResult, train
from kvshare.training.loss import lm_loss
from kvshare.training.settings import TrainSettings

__all__ = [
    "Dist",
    "TrainResult",
    "TrainSettings",
    "barrier",
    "clear_checkpoints",
    "flops_per_token",
    "latest_checkpoint",
    "leave_distributed",
    "lm_loss",
    "matmul_flops",
    "setup_distributed",
    "train",
    "trained_model",
]
