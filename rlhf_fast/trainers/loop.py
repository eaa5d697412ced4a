"""The training loop every trainer composes: optimizer, schedule, accumulation, checkpoints, metrics.

A trainer hands :class:`TrainLoop` its model, config, examples, a collate function and an
:class:`Objective` (what one micro-batch costs); the loop owns everything else:

* AdamW (weight decay on matrices only) with linear warm-up and cosine decay;
* gradient accumulation in which each micro-batch's *summed* loss is divided by the number of
  loss units (tokens, pairs) in the whole accumulated step, so ``1 x 8`` and ``4 x 2`` micro-batching
  make the same update;
* gradient clipping, bfloat16 autocast, seeding;
* ``metrics.jsonl``, a tqdm bar with the live loss;
* checkpoints that resume bit for bit: weights in safetensors, optimizer/scheduler/RNG states as
  plain tensors and dicts (read back with ``weights_only=True``), step and data position in JSON.
  Ctrl-C finishes the current step, saves a checkpoint and then raises ``KeyboardInterrupt``;
* data parallelism under ``accelerate launch`` or ``torchrun`` (:mod:`rlhf_fast.trainers.distributed`):
  ``micro_batch_size`` is per process, so a step sees ``micro_batch_size * grad_accum_steps *
  world_size`` examples. Every process draws the same global micro-batch of ``micro_batch_size *
  world_size`` examples and takes its own contiguous share; the loss units are summed over the
  processes, so a step makes the update of one process with ``micro_batch_size * world_size`` (to
  rounding). The model trains in DDP, synchronizing gradients on each step's last micro-batch only;
  rank 0 alone writes metrics, checkpoints and the progress bar; each process keeps its own RNG
  (seeded ``seed + rank``, saved in the checkpoint), and a checkpoint resumes with as many processes
  as wrote it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from rlhf_fast.trainers.config import TrainConfig
from rlhf_fast.trainers.distributed import (
    ProcessGroup,
    as_float,
    fsdp_full_state,
    fsdp_load_full_state,
    gradient_sync,
    local_device,
)

Batch = dict[str, Tensor]
CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Objective(Protocol):
    """What a trainer computes on one micro-batch."""

    unit: str  # name of the loss units in the metrics: "loss_tokens", "pairs", ...

    def count(self, batch: Batch) -> int:
        """Loss units in ``batch`` (valid target tokens, pairs, ...): the normalizer, summed over the step."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The 0-d float32 loss *summed* over the batch's units, and other per-unit metrics, also summed."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the global generator is the one user code draws from)
    torch.manual_seed(seed)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): linear from ``1/warmup`` to 1 over ``warmup``
    steps, then a half cosine from 1 down to ``min_ratio`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bfloat16 autocast: as configured, or (``bf16=None``) on GPUs with bfloat16 arithmetic: sm_80 or newer
    on CUDA (``torch.cuda.is_bf16_supported()`` also says yes to the emulation of older ones, T4 and V100,
    where bfloat16 is slower than float32), any ROCm device."""
    if config.bf16 is not None:
        return config.bf16
    if device.type != "cuda":
        return False
    if torch.version.hip is not None:
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device) >= (8, 0)


class MicroBatches:
    """An endless, resumable stream of micro-batches: epoch ``e`` visits the examples in a permutation
    drawn from ``(seed, e)``; the position is ``(epoch, micro-batch index)``, so a stream rebuilt
    from a checkpoint yields the very batches the interrupted one would have.

    With ``world_size`` processes, every process walks the same permutation in global micro-batches
    of ``size * world_size`` examples and yields its contiguous share (``rank``) of each. The last
    global micro-batch of an epoch may be short; one shorter than ``world_size`` is topped up from
    the start of the epoch's permutation, so that no process goes without an example.
    """

    def __init__(self, examples: Sequence, collate: Callable[[list], Batch], size: int, *, shuffle: bool, seed: int,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        self.examples, self.collate, self.size = examples, collate, size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = math.ceil(len(examples) / (size * world_size))
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def __next__(self) -> Batch:
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        width = self.size * self.world_size
        picks = self._order[self.index * width : (self.index + 1) * width]
        self.index += 1
        if self.world_size > 1:
            picks += [self._order[i % len(self._order)] for i in range(self.world_size - len(picks))]
            n = len(picks)
            picks = picks[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]
        return self.collate([self.examples[i] for i in picks])

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.index / self.per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


class _StopOnInterrupt:
    """Ctrl-C during training asks for a stop at the next step boundary, where the state is whole and
    a checkpoint resumes exactly; a second Ctrl-C interrupts at once. Only the main thread gets
    signals, so elsewhere this does nothing."""

    def __init__(self, note: Callable[[str], None]):
        self.requested = False
        self._note = note
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._note("interrupted: saving a checkpoint after this step (Ctrl-C again to abort without one)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator's state as tensors, ints and tuples (loadable with ``weights_only=True``); of the GPUs',
    the training ``device``'s only (a run may resume on a machine that shows fewer GPUs)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "python": (version, list(mt), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    cuda = state.get("cuda") if device.type == "cuda" else None
    if isinstance(cuda, (list, tuple)):  # written when every visible GPU's state was kept: this device's
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _rng_file(rank: int) -> str:
    """The checkpoint file of process ``rank``'s generators (``rng.pt`` for a single process)."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest step under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / CHECKPOINT_DIR
    steps = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


class _Window:
    """Sums over the steps between two metrics records."""

    def __init__(self, unit: str):
        self.unit = unit
        self.loss = self.units = self.tokens = self.seconds = self.grad_norm = 0.0
        self.steps = 0
        self.extras: dict[str, float] = {}

    def add(self, loss_sum, units, tokens, seconds, grad_norm, extras):
        self.loss += loss_sum
        self.units += units
        self.tokens += tokens
        self.seconds += seconds
        self.grad_norm += grad_norm
        self.steps += 1
        for k, val in extras.items():
            self.extras[k] = self.extras.get(k, 0.0) + val

    def record(self) -> dict[str, float]:
        units = max(self.units, 1.0)
        out = {
            "loss": self.loss / units,
            self.unit: self.units,
            "tokens": self.tokens,
            "grad_norm": self.grad_norm / self.steps,
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
        }
        out.update({k: val / units for k, val in self.extras.items()})
        return out


def _shared_names(model: torch.nn.Module) -> dict[str, str]:
    """Tied parameters: every name of a shared parameter except the first in sorted order -> that one
    (the name safetensors' ``save_model`` keeps)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {other: min(names) for names in groups.values() for other in names if other != min(names)}


def _untied(model: torch.nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """A full state dict with one entry per tied group, as ``save_model`` writes it."""
    drop = _shared_names(model)
    return {k: v.contiguous() for k, v in weights.items() if k not in drop}


def _tied(model: torch.nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`_untied`: every name of a tied group back in."""
    return {**weights, **{other: weights[kept] for other, kept in _shared_names(model).items() if kept in weights}}


class _ObjectiveModule(torch.nn.Module):
    """The objective's loss as the forward of a module that holds the model, for DDP: DDP synchronizes
    gradients only in a backward that follows its own forward, and objectives call into the model's
    parts (final hidden states, LM head), not its forward. Returns ``objective.loss(model, batch)``."""

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.objective.loss(self.model, batch)


class TrainLoop:
    """Optimizer, schedule, accumulation, evaluation, metrics and checkpoints for one model.

    Args:
        model: the module to train (moved to the config's device); only parameters with
            ``requires_grad`` are optimized.
        config: a :class:`TrainConfig` (or subclass).
        objective: the per-micro-batch loss, see :class:`Objective`.
        train_examples / eval_examples: whatever ``collate`` takes a list of (eval may be None).
        collate: list of examples -> batch of tensors (on CPU; the loop moves them).
        eval_extras: derived eval metrics from the averaged ones (e.g. perplexity from the loss).
        save_extras: writes trainer-specific files (e.g. the tokenizer) into a checkpoint directory.
        batch_size: examples per batch of the training stream (default ``config.micro_batch_size``).
        batches_per_step: batches of the stream per step (default ``config.grad_accum_steps``); the
            step count of an epoch follows from both. PPO draws one batch of prompts per iteration.
        prepare: called with the model once it is on its device, before any DDP/FSDP wrapping (the fused
            trainers check there that their LM head reproduces the model's logits).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        objective: Objective,
        train_examples: Sequence,
        collate: Callable[[list], Batch],
        *,
        eval_examples: Sequence | None = None,
        eval_extras: Callable[[dict[str, float]], dict[str, float]] | None = None,
        save_extras: Callable[[Path], None] | None = None,
        batch_size: int | None = None,
        batches_per_step: int | None = None,
        prepare: Callable[[torch.nn.Module], None] | None = None,
    ):
        self.config, self.objective = config, objective
        self.device = local_device(resolve_device(config))
        self.dist = ProcessGroup.join(self.device)
        self.bf16 = use_bf16(config, self.device)
        self.model = model.to(self.device)
        if prepare is not None:  # on its device, before any DDP/FSDP wrapping
            prepare(self.model)
        self.batches_per_step = batches_per_step or config.grad_accum_steps
        self.train_batches = MicroBatches(
            train_examples, collate, batch_size or config.micro_batch_size, shuffle=config.shuffle, seed=config.seed,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )  # fmt: skip
        if config.eval_every and eval_examples is None:
            raise ValueError(f"config field 'eval_every' is {config.eval_every} but there is no eval data")
        self.eval_examples, self.collate = eval_examples, collate
        self.eval_size = config.eval_batch_size or config.micro_batch_size
        self.eval_extras, self.save_extras = eval_extras, save_extras
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(1, math.ceil(config.epochs * self.train_batches.per_epoch / self.batches_per_step))
        warmup = config.warmup_steps or int(config.warmup_ratio * self.total_steps)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no parameter with requires_grad=True: nothing to train")
        # the objective's loss as a module in DDP or FSDP, None in a single process. FSDP swaps the
        # model's parameters for sharded ones in place, so the optimizer is built after this.
        self._wrapped = None
        if self.dist.distributed:
            self._wrapped = self.dist.wrap(_ObjectiveModule(self.model, objective), self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # the fused kernel (CPU and CUDA) updates every tensor in one pass: the per-tensor loop of the
        # default implementation was 3-5x slower and held ~6 bytes of temporaries per parameter on CPU
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.params)
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.adam_eps, fused=fused
        )
        total, min_ratio = self.total_steps, config.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup=warmup, total=total, min_ratio=min_ratio)
        )
        self.step = 0
        self.tokens_seen = 0
        self.output_dir = Path(config.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"

    # -- one optimizer step ------------------------------------------------------------------

    def _autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _train_step(self) -> tuple[float, int, int, float, dict[str, float]]:
        """One step over ``batches_per_step`` micro-batches of the stream: :meth:`optimizer_step`, then
        the schedule and the step count move on."""
        out = self.optimizer_step([next(self.train_batches) for _ in range(self.batches_per_step)])
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += out[2]
        return out

    def optimizer_step(self, batches: Sequence[Batch]) -> tuple[float, int, int, float, dict[str, float]]:
        """Accumulate the objective's gradient over ``batches`` (each micro-batch's summed loss divided
        by the units of all of them), clip, and take one optimizer step; the LR schedule and the step
        count are left alone. Returns the summed loss, loss units, input tokens, gradient norm and
        summed extra metrics.

        Under DDP, ``batches`` are this process's share of the step and every process passes as many;
        the units, and the returned sums, are over all processes."""
        units = sum(self.objective.count(b) for b in batches)
        units = int(self.dist.sum(torch.tensor([units], device=self.device)).item())
        # every micro-batch's summed loss over the step's units: the step's mean, whatever the split;
        # DDP averages the processes' gradients, and the world size turns that mean back into their sum
        scale = self.dist.world_size / max(units, 1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        extras: dict[str, Tensor] = {}
        tokens = 0
        for i, batch in enumerate(batches):
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            batch = self._to_device(batch)
            # the gradients are reduced over the processes in the backward of the step's last micro-batch only
            with gradient_sync(self._wrapped, i == len(batches) - 1):
                with self._autocast():
                    loss, more = self._loss(batch)
                (loss * scale).backward()
            loss_sum += loss.detach()
            for k, val in more.items():
                extras[k] = extras.get(k, 0.0) + val.detach().float()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        grad_norm = as_float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.dist.distributed:
            return float(loss_sum), units, tokens, grad_norm, {k: float(val) for k, val in extras.items()}
        names = sorted(extras)  # every process's objective reports the same metrics
        sums = torch.stack([loss_sum, torch.tensor(float(tokens), device=self.device), *(extras[k] for k in names)])
        sums = self.dist.sum(sums.double()).tolist()
        return sums[0], units, int(sums[1]), grad_norm, dict(zip(names, sums[2:], strict=True))

    def _loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on one batch, through the DDP/FSDP module when there is one (FSDP gathers the
        sharded parameters in its forward only)."""
        return self._wrapped(batch) if self._wrapped is not None else self.objective.loss(self.model, batch)

    # -- public API --------------------------------------------------------------------------

    def train(self, resume_from: str | os.PathLike | bool | None = None) -> dict[str, float]:
        """Train to ``total_steps``; returns the last train and eval metrics.

        Args:
            resume_from: a checkpoint directory, or True for the latest one under ``output_dir``
                (a fresh start when there is none).
        """
        from tqdm.auto import tqdm

        main = self.dist.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "trainer_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        if resume_from is True:
            resume_from = latest_checkpoint(self.output_dir)
        if resume_from:
            self.load(resume_from)
        else:
            seed_everything(self.config.seed + self.dist.rank)
            if main:
                self.metrics_path.unlink(missing_ok=True)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.config.progress_bar and main),
                   desc="train")  # fmt: skip
        last: dict[str, float] = {}
        window = _Window(self.objective.unit)
        try:
            with _StopOnInterrupt(bar.write) as stop:
                while self.step < self.total_steps:
                    lr = self.scheduler.get_last_lr()[0]
                    t0 = time.perf_counter()
                    loss_sum, units, tokens, grad_norm, extras = self._train_step()
                    window.add(loss_sum, units, tokens, time.perf_counter() - t0, grad_norm, extras)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / max(units, 1):.4f}", lr=f"{lr:.2e}")
                    if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                        record = {**window.record(), "lr": lr}
                        last.update(record)
                        self._log(record)
                        window = _Window(self.objective.unit)
                    final = self.step == self.total_steps
                    every = self.config.eval_every
                    if self.eval_examples is not None and ((every and self.step % every == 0) or final):
                        record = self.evaluate()
                        last.update(record)
                        self._log(record)
                    # a Ctrl-C reaches the processes at different moments: all stop after the same step
                    stopping = self.dist.any(stop.requested, self.device)
                    if (self.config.save_every and self.step % self.config.save_every == 0) or final or stopping:
                        self.save()
                    if stopping and not final:
                        raise KeyboardInterrupt
        finally:
            bar.close()
        return last

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (and extras) averaged over every loss unit of the eval set, keys prefixed ``eval_``.
        Under DDP the eval batches are dealt to the processes in turn and the sums gathered."""
        if self.eval_examples is None:
            raise ValueError("no eval data: pass eval_data to the trainer")
        was_training = self.model.training
        self.model.eval()
        loss_sum, units, sums = 0.0, 0, {}
        starts = range(0, len(self.eval_examples), self.eval_size)
        mine = list(starts[self.dist.rank :: self.dist.world_size])
        # under FSDP every forward gathers parameters with all processes: all run as many, the ones
        # short of a batch repeating the first and dropping its result
        rounds = math.ceil(len(starts) / self.dist.world_size) if self.dist.fsdp else len(mine)
        for j in range(rounds):
            i = mine[j] if j < len(mine) else starts[0]
            batch = self.collate(list(self.eval_examples[i : i + self.eval_size]))
            with self._autocast():
                loss, more = self._loss(self._to_device(batch))
            if j >= len(mine):
                continue
            units += self.objective.count(batch)
            loss_sum += float(loss)
            for k, val in more.items():
                sums[k] = sums.get(k, 0.0) + float(val)
        self.model.train(was_training)
        if self.dist.distributed:
            names = self.dist.broadcast(sorted(sums))  # rank 0 has the first batch, so every metric
            totals = torch.tensor([loss_sum, units, *(sums[k] for k in names)], dtype=torch.float64, device=self.device)
            loss_sum, units, *rest = self.dist.sum(totals).tolist()
            sums = dict(zip(names, rest, strict=True))
        out = {"eval_loss": loss_sum / max(units, 1)}
        out.update({f"eval_{k}": val / max(units, 1) for k, val in sums.items()})
        if self.eval_extras is not None:
            out.update(self.eval_extras(out))
        return out

    def _log(self, values: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        record = {"step": self.step, "epoch": round(self.train_batches.epochs_done, 6), **values}
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write a checkpoint (default ``output_dir/checkpoints/step-NNNNNNNN``) and return its directory.

        Files: ``model.safetensors`` (and the model's ``config.json``, so ``from_pretrained`` reads
        the directory), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (tensors and plain containers
        only) and ``trainer_state.json`` (step, data position, world size). Written to a temporary
        directory and renamed, so a crash never leaves half a checkpoint.

        Under DDP every process calls it: the states are the same on all of them and rank 0 writes
        them, but each process writes its own generators' state (``rng-rank<r>.pt`` for ``r > 0``),
        so the directory must be on a file system that all processes see.
        """
        from safetensors.torch import save_file, save_model

        main = self.dist.is_main
        final = Path(path) if path is not None else self.output_dir / CHECKPOINT_DIR / f"step-{self.step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()  # the directory exists for every process
        torch.save(_rng_state(self.device), tmp / _rng_file(self.dist.rank))
        if self.dist.fsdp:  # gathering the shards is collective; rank 0 writes
            weights, optimizer_state = fsdp_full_state(self.model, self.optimizer)
        if main:
            if self.dist.fsdp:
                save_file(_untied(self.model, weights), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            else:
                save_model(self.model, str(tmp / "model.safetensors"))
                optimizer_state = self.optimizer.state_dict()
            if hasattr(self.model, "config") and hasattr(self.model.config, "save_pretrained"):
                self.model.config.save_pretrained(tmp)
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.train_batches.state_dict(),
                     "world_size": self.dist.world_size, "engine": self._engine,
                     "config": self.config.to_dict()}  # fmt: skip
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            if self.save_extras is not None:
                self.save_extras(tmp)
        self.dist.barrier()  # every process's file is in before the rename
        if main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.dist.barrier()  # no process goes on before the checkpoint exists
        return final

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save`; nothing in it is unpickled as an object
        (safetensors for the weights, ``torch.load(weights_only=True)`` for the states)."""
        from safetensors.torch import load_file, load_model

        path = Path(path)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume_from: {str(path)!r} is not a checkpoint (no trainer_state.json)")
        state = json.loads((path / "trainer_state.json").read_text())
        written_by = int(state.get("world_size", 1))
        if written_by != self.dist.world_size:
            raise ValueError(
                f"resume_from: {str(path)!r} was written by {written_by} process(es) and this run has "
                f"{self.dist.world_size}: resume with {written_by} (the data shards and RNG states are per process)"
            )
        engine = state.get("engine", "ddp" if written_by > 1 else "single")
        if engine != self._engine:
            raise ValueError(
                f"resume_from: {str(path)!r} was written by a {engine} run and this one is {self._engine}: "
                "the optimizer state is laid out differently"
            )
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if self.dist.fsdp:
            fsdp_load_full_state(self.model, self.optimizer, _tied(self.model, load_file(path / "model.safetensors")),
                                 optimizer_state)  # fmt: skip
        else:
            load_model(self.model, str(path / "model.safetensors"), strict=True, device=str(self.device))
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        _set_rng_state(torch.load(path / _rng_file(self.dist.rank), map_location="cpu", weights_only=True), self.device)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.train_batches.load_state_dict(state["data"])
        self._truncate_metrics()

    @property
    def _engine(self) -> str:
        return "single" if not self.dist.distributed else self.dist.engine

    def _truncate_metrics(self) -> None:
        """Drop records past the resumed step (logged after the checkpoint by the interrupted run)."""
        if not self.dist.is_main or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
