"""Distributed training: which rank probes, and which module a probe runs.

Under ``torch.distributed`` data parallelism (DistributedDataParallel) every rank holds the
same weights after each optimizer step, so one rank's probes show the model. The Monitor on
the probing rank (rank 0 unless told otherwise) probes and records; on every other rank it is
inert: no snapshot, no thread, no run directory, no viewer, and a step costs a counter. Only
the probing rank pays for probes, and since the others wait for it at the next gradient
all-reduce, that is the whole job's cost (budget mode measures it there).

Probes never call a wrapper's forward: DistributedDataParallel's starts collectives (a buffer
broadcast) that the other ranks would not join, so a probe evaluating it on one rank could
hang the job. The Monitor takes the module inside the wrappers that only change how a model
runs (DDP, DataParallel, ``torch.compile``; see ``unwrap``) and everything (probes, snapshot,
``model.pt``, module names for hook patterns) refers to that module.

Sharded models (FSDP, FSDP2's ``fully_shard``, any DTensor parameter) hold part of each
weight on each rank: a forward gathers the rest from every rank, so it cannot run on one rank
alone, and no single rank's copy is the model. The Monitor refuses them with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from probescope.kernels.mlp import unwrap, wrapper_names

__all__ = ["Placement", "check_probeable", "placement", "sharding", "unwrap", "wrapper_names"]


@dataclass(frozen=True)
class Placement:
    """Where this process stands in a distributed job (rank 0 of 1 outside one)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "backend": self.backend}


def placement() -> Placement:
    """This process's rank and the world size, from the initialised default process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Placement()
    return Placement(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def sharding(model: nn.Module) -> str | None:
    """Why ``model``'s weights are sharded across ranks (FSDP, FSDP2, DTensor parameters), or
    None when every parameter is whole on this rank."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support shards nothing
        return None
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            return f"module {name or '(root)'!r} is wrapped in FullyShardedDataParallel"
        if isinstance(module, FSDPModule):
            return f"module {name or '(root)'!r} was sharded by fully_shard (FSDP2)"
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            return f"parameter {name!r} is a DTensor ({param.placements})"
    return None


def check_probeable(model: nn.Module, where: Placement) -> None:
    """Raise a clear ValueError if the Monitor's probes cannot evaluate ``model`` on one rank."""
    reason = sharding(model)
    if reason is not None:
        raise ValueError(
            f"Monitor: the model is sharded across the job's {where.world_size} ranks ({reason}); a probe "
            "on one rank cannot run its forward (every rank would have to join each gather), so "
            "probescope does not probe sharded models. Probe an unsharded copy of the model, or "
            "train it with DistributedDataParallel."
        )
