"""Ranks under ``torchrun``: joining and leaving the process group, and FSDP2's sharding of the model.

``ddp`` keeps a replica of the model on each rank (the wrapper is made in :mod:`.loop`);
``fsdp`` shards parameters, gradients and optimizer state over them, one unit per
decoder layer, for models too big for one GPU. Everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvshare.training.loss import _Objective
    from kvshare.training.settings import TrainSettings


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()  # one process, no process group: the default of functions that take a Dist


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
