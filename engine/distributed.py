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

Sharded models (FSDP2's ``fully_shard``, any DTensor parameter) hold part of each weight on
each rank: a forward gathers the rest from every rank, so it cannot run on one rank alone, and
no single rank's copy is the model. Their probes evaluate an unsharded copy whose weights every
rank gathers when a probe is due (probescope.gather); ``check_sharded`` refuses what cannot
work that way, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from probescope.kernels.mlp import unwrap, wrapper_names

__all__ = ["Placement", "check_sharded", "placement", "sharding", "unwrap", "wrapper_names"]


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


def check_sharded(
    reason: str | None, where: Placement, probes, unsharded, snapshot_params, snapshot: str
) -> None:
    """Raise a clear ValueError where the Monitor cannot probe a sharded model as asked
    (``reason``: why it is sharded, from ``sharding``; None: it is not, and ``unsharded``, which
    is given, has no use)."""
    if reason is None:
        raise ValueError(
            "Monitor: unsharded= is for a model sharded across ranks (FSDP2's fully_shard, "
            "DTensor parameters); this one is whole, and probes evaluate it as it is"
        )
    head = f"Monitor: the model is sharded across the job's {where.world_size} ranks ({reason})"
    if "FullyShardedDataParallel" in reason:
        raise ValueError(
            f"{head}; probescope gathers the weights of models sharded by fully_shard (FSDP2) or "
            "made of DTensor parameters, not those of the FullyShardedDataParallel wrapper: shard "
            "the model with torch.distributed.fsdp.fully_shard"
        )
    evaluating = [f"{type(p).__name__} {p.name!r}" for p in probes if p.reads_model]
    if evaluating and unsharded is None:
        raise ValueError(
            f"{head}: a forward on one rank cannot run, so probes that evaluate the model "
            f"({', '.join(evaluating)}) run an unsharded copy that every rank gathers the weights "
            "for when one is due. Give the model as defined before sharding: "
            "Monitor(..., unsharded=lambda: MyModel(...)) (built on the meta device: it costs no "
            "memory), or train it with DistributedDataParallel"
        )
    problems = []
    loading = [p.name for p in probes if getattr(p, "load_best", False)]
    if loading:
        problems.append(
            f"{', '.join(loading)} would load the best weights into the model on one rank: give "
            "load_best=False and load the saved file on every rank "
            "(torch.distributed.checkpoint.state_dict.set_model_state_dict)"
        )
    if snapshot_params not in (None, "trainable"):
        problems.append(
            "snapshot_params: the gathered copy holds the whole model (snapshot_params='trainable' "
            "gathers the frozen parameters once and the rest at every gather)"
        )
    if snapshot == "live":
        problems.append("snapshot='live' reads the model in place: use 'copy' (the default) or 'sync'")
    if problems:
        raise ValueError(f"{head}; " + "; ".join(problems))
