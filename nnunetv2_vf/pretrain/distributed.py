"""Single process or torch DDP started by ``torchrun``: rank, device, process group, the few collectives the
pretraining needs. (nnU-Net's own DDP set-up lives inside ``run_training``'s spawned workers and ``nnUNetTrainer``,
not in a function a torchrun process could call.)"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Distributed"]


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    _owns_group: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls) -> "Distributed":
        """The process' place as torchrun describes it (a plain start: one process)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def is_ddp(self) -> bool:
        return self.world_size > 1

    def setup_device(self, want: str) -> torch.device:
        """Joins the process group (NCCL on GPUs, gloo on CPUs) and returns this rank's device."""
        if want == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
        if self.is_ddp and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want == "cuda" else "gloo")
            self._owns_group = True
        if want == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.is_ddp:
            dist.barrier()

    def union(self, values: set) -> set:
        """The union of every rank's ``values``."""
        if not self.is_ddp:
            return set(values)
        every = [None] * self.world_size
        dist.all_gather_object(every, sorted(values))
        return set().union(*every)

    def wrap(self, network: nn.Module, device: torch.device) -> nn.Module:
        """What the training step calls: the network itself, or its DDP wrapper that averages the gradients."""
        if not self.is_ddp:
            return network
        return nn.parallel.DistributedDataParallel(network, device_ids=[self.local_rank]
                                                   if device.type == "cuda" else None)

    def teardown(self) -> None:
        """Leaves the process group this object joined (one joined by the caller stays theirs)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False
