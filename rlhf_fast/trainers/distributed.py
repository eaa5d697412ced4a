"""The process group a training loop runs in: one process, or several under ``accelerate launch``
(or ``torchrun``), data-parallel with PyTorch's DDP or fully sharded with FSDP2 (``fully_shard``).

The launcher only sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; the
group is joined here with plain ``torch.distributed`` (NCCL on CUDA, gloo on CPU), so a
single-process run never needs ``accelerate``. A group the script already made (for instance by
building ``accelerate.PartialState()``) is used as it is. On CPUs, launch with
``accelerate launch --multi_gpu --num_processes N script.py``: ``--multi_gpu`` selects accelerate's
``torch.distributed.run`` launcher (processes then join with gloo), while ``--cpu`` starts a single
process unless MPI is configured.

``accelerate launch --use_fsdp`` (which sets ``ACCELERATE_USE_FSDP=true``; with ``torchrun``, set
it yourself) shards the model with PyTorch's FSDP2: each transformer block (the classes the model
lists in ``_no_split_modules``) is its own ``fully_shard`` unit, and the root unit is the module
whose forward computes the objective's loss, so the embeddings and the LM head are gathered for
the whole of that forward, fused head included, and again for its backward. accelerate's other
FSDP options (wrap policy, CPU offload, sharding strategy) are not read: the sharding is always
full (ZeRO-3 like), parameters resharded after the forward. DeepSpeed and Megatron-LM launches are
refused with an error rather than silently run as DDP.
"""

from __future__ import annotations

import atexit
import inspect
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# environment variables by which `accelerate launch` asks for an engine other than DDP
_OTHER_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
FSDP_ENV_VAR = "ACCELERATE_USE_FSDP"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class ProcessGroup:
    """Rank and size of the default process group (``world_size == 1``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    engine: str = "ddp"  # "ddp" | "fsdp"; meaningful when distributed

    @property
    def is_main(self) -> bool:
        """True on the process that writes metrics, checkpoints and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def fsdp(self) -> bool:
        """True when the model is sharded (FSDP2): its parameters are then DTensors, readable only
        inside the forward (and backward) of the wrapped module."""
        return self.distributed and self.engine == "fsdp"

    @classmethod
    def join(cls, device: torch.device) -> ProcessGroup:
        """The current process group: the initialized default group, else the one the launcher's
        environment describes (joined here, NCCL for a CUDA ``device`` and gloo otherwise), else a
        single process. For CUDA, the process's device must already be set (see :func:`local_device`)."""
        for var, engine in _OTHER_ENGINES.items():
            if _flag(var):
                raise ValueError(
                    f"this run was launched with {engine} ({var}=true), but the trainers train with DDP or FSDP "
                    "only: launch with `accelerate launch --multi_gpu` (DDP) or `--use_fsdp` instead"
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
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, "fsdp" if _flag(FSDP_ENV_VAR) else "ddp")

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
        """``module`` in DDP, or sharded in place with FSDP2 (see the module doc).

        DDP: ``find_unused_parameters``, as an objective may leave trainable parameters out of its
        graph (a value head on a causal LM never uses the LM head); buffers (rotary tables) are
        synchronized once, when wrapping, not at every forward."""
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            blocks = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
            for sub in module.modules():
                if type(sub).__name__ in blocks:
                    fully_shard(sub)
            return fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel

        # newer torch calls broadcast_buffers forward_sync_buffers (and deprecates the old name)
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_forward_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
            **no_forward_sync,
        )  # fmt: skip


def gradient_sync(wrapped: torch.nn.Module | None, sync: bool):
    """Context for one micro-batch's forward and backward: with ``sync`` False, the gradients stay on
    this process (accumulated locally) and are reduced with a later micro-batch's."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2: a switch, set for every micro-batch
        wrapped.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if wrapped is None or sync else wrapped.no_sync()  # DDP


def as_float(value: Tensor) -> float:
    """A 0-d tensor as a float, gathering it first if it is a DTensor (a gradient norm under FSDP)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def fsdp_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full (unsharded) model and optimizer state dicts of an FSDP-sharded ``model``, on CPU, keyed
    by parameter name. Collective: every process calls it; rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def fsdp_load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """Load full state dicts (as :func:`fsdp_full_state` returns them, read by every process) into an
    FSDP-sharded ``model`` and its ``optimizer``; each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)


def local_device(device: torch.device) -> torch.device:
    """In a process of a distributed run, a CUDA device without an index becomes the process's own, made the
    current device, as NCCL needs: ``LOCAL_RANK``'s under a launcher; in a process group the caller joined
    without one, the device it made current. Other devices are returned as they are."""
    if device.type != "cuda":
        return device
    initialized = dist.is_available() and dist.is_initialized()
    if (dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))) <= 1:
        return device
    if device.index is None:
        local_rank = os.environ.get("LOCAL_RANK")
        device = torch.device("cuda", int(local_rank) if local_rank is not None else torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
