"""The process group a training loop runs in: one process, or several under ``accelerate launch``
(or ``torchrun``), data-parallel with PyTorch's DDP.

The launcher only sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; the
group is joined here with plain ``torch.distributed`` (NCCL on CUDA, gloo on CPU), so a
single-process run never needs ``accelerate``. A group the script already made (for instance by
building ``accelerate.PartialState()``) is used as it is. On CPUs, launch with
``accelerate launch --multi_gpu --num_processes N script.py``: ``--multi_gpu`` selects accelerate's
``torch.distributed.run`` launcher (processes then join with gloo), while ``--cpu`` starts a single
process unless MPI is configured.

Only DDP is supported. A launch with FSDP or DeepSpeed (``accelerate launch --use_fsdp`` /
``--use_deepspeed``) is refused with an error rather than silently run as DDP: the fused LM-head
path reads the head's weight outside the model's forward, where FSDP holds only a shard of it.
"""

from __future__ import annotations

import atexit
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# environment variables by which `accelerate launch` asks for an engine other than DDP
_OTHER_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                  "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}  # fmt: skip


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class ProcessGroup:
    """Rank and size of the default process group (``world_size == 1``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes metrics, checkpoints and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def join(cls, device: torch.device) -> ProcessGroup:
        """The current process group: the initialized default group, else the one the launcher's
        environment describes (joined here, NCCL for a CUDA ``device`` and gloo otherwise), else a
        single process. For CUDA, the process's device must already be set (see :func:`local_device`)."""
        for var, engine in _OTHER_ENGINES.items():
            if _flag(var):
                raise ValueError(
                    f"this run was launched with {engine} ({var}=true), but the trainers train with DDP only: "
                    "launch with `accelerate launch --multi_gpu` (plain DDP) instead"
                )
        initialized = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not initialized:
            if not dist.is_available():
                raise RuntimeError(f"WORLD_SIZE is {world} but this torch build has no torch.distributed")
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            atexit.register(_destroy)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))

    # -- collectives (no-ops in a single process) ------------------------------------------------

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the ranks (in place; returned)."""
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def any(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` is True on some rank."""
        if not self.distributed:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=device)).item() > 0)

    def broadcast(self, obj):
        """Rank 0's ``obj`` (a small picklable value: a list of metric names) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``range(n)``: shares differ in size by at most one, and
        every rank has one item at least when ``n >= world_size``."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` in DDP. ``find_unused_parameters``: an objective may leave trainable
        parameters out of its graph (a value head on a causal LM never uses the LM head). Buffers
        (rotary tables) are synchronized once, when wrapping, not at every forward."""
        from torch.nn.parallel import DistributedDataParallel

        # newer torch calls broadcast_buffers forward_sync_buffers (and deprecates the old name)
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_forward_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
            **no_forward_sync,
        )  # fmt: skip


def local_device(device: torch.device) -> torch.device:
    """Under a launcher, a CUDA device without an index becomes the process's own (``LOCAL_RANK``),
    made the current device, as NCCL needs; other devices are returned as they are."""
    if device.type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
