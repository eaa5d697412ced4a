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
  Ctrl-C finishes the current step, saves a checkpoint and then raises ``KeyboardInterrupt``.
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
    """bfloat16 autocast: as configured, or (``bf16=None``) on CUDA devices that support it."""
    if config.bf16 is not None:
        return config.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


class MicroBatches:
    """An endless, resumable stream of micro-batches: epoch ``e`` visits the examples in a permutation
    drawn from ``(seed, e)``; the position is ``(epoch, micro-batch index)``, so a stream rebuilt
    from a checkpoint yields the very batches the interrupted one would have."""

    def __init__(self, examples: Sequence, collate: Callable[[list], Batch], size: int, *, shuffle: bool, seed: int):
        self.examples, self.collate, self.size = examples, collate, size
        self.shuffle, self.seed = shuffle, seed
        self.per_epoch = math.ceil(len(examples) / size)
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
        picks = self._order[self.index * self.size : (self.index + 1) * self.size]
        self.index += 1
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


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, ints and tuples (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "python": (version, list(mt), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    ):
        self.config, self.objective = config, objective
        self.device = resolve_device(config)
        self.bf16 = use_bf16(config, self.device)
        self.model = model.to(self.device)
        self.train_batches = MicroBatches(
            train_examples, collate, config.micro_batch_size, shuffle=config.shuffle, seed=config.seed
        )
        if config.eval_every and eval_examples is None:
            raise ValueError(f"config field 'eval_every' is {config.eval_every} but there is no eval data")
        self.eval_examples, self.collate = eval_examples, collate
        self.eval_size = config.eval_batch_size or config.micro_batch_size
        self.eval_extras, self.save_extras = eval_extras, save_extras
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(1, math.ceil(config.epochs * self.train_batches.per_epoch / config.grad_accum_steps))
        warmup = config.warmup_steps or int(config.warmup_ratio * self.total_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameter with requires_grad=True: nothing to train")
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.adam_eps
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
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the summed loss, loss
        units, input tokens, gradient norm and summed extra metrics."""
        batches = [next(self.train_batches) for _ in range(self.config.grad_accum_steps)]
        units = sum(self.objective.count(b) for b in batches)
        # every micro-batch's summed loss over the step's units: the step's mean, whatever the split
        scale = 1.0 / max(units, 1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        extras: dict[str, Tensor] = {}
        tokens = 0
        for batch in batches:
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            batch = self._to_device(batch)
            with self._autocast():
                loss, more = self.objective.loss(self.model, batch)
            (loss * scale).backward()
            loss_sum += loss.detach()
            for k, val in more.items():
                extras[k] = extras.get(k, 0.0) + val.detach().float()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        return float(loss_sum), units, tokens, float(grad_norm), {k: float(val) for k, val in extras.items()}

    # -- public API --------------------------------------------------------------------------

    def train(self, resume_from: str | os.PathLike | bool | None = None) -> dict[str, float]:
        """Train to ``total_steps``; returns the last train and eval metrics.

        Args:
            resume_from: a checkpoint directory, or True for the latest one under ``output_dir``
                (a fresh start when there is none).
        """
        from tqdm.auto import tqdm

        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "trainer_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        if resume_from is True:
            resume_from = latest_checkpoint(self.output_dir)
        if resume_from:
            self.load(resume_from)
        else:
            seed_everything(self.config.seed)
            self.metrics_path.unlink(missing_ok=True)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.config.progress_bar, desc="train")
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
                    if (self.config.save_every and self.step % self.config.save_every == 0) or final or stop.requested:
                        self.save()
                    if stop.requested and not final:
                        raise KeyboardInterrupt
        finally:
            bar.close()
        return last

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (and extras) averaged over every loss unit of the eval set, keys prefixed ``eval_``."""
        if self.eval_examples is None:
            raise ValueError("no eval data: pass eval_data to the trainer")
        was_training = self.model.training
        self.model.eval()
        loss_sum, units, sums = 0.0, 0, {}
        for i in range(0, len(self.eval_examples), self.eval_size):
            batch = self.collate(list(self.eval_examples[i : i + self.eval_size]))
            units += self.objective.count(batch)
            with self._autocast():
                loss, more = self.objective.loss(self.model, self._to_device(batch))
            loss_sum += float(loss)
            for k, val in more.items():
                sums[k] = sums.get(k, 0.0) + float(val)
        self.model.train(was_training)
        out = {"eval_loss": loss_sum / max(units, 1)}
        out.update({f"eval_{k}": val / max(units, 1) for k, val in sums.items()})
        if self.eval_extras is not None:
            out.update(self.eval_extras(out))
        return out

    def _log(self, values: dict[str, float]) -> None:
        record = {"step": self.step, "epoch": round(self.train_batches.epochs_done, 6), **values}
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write a checkpoint (default ``output_dir/checkpoints/step-NNNNNNNN``) and return its directory.

        Files: ``model.safetensors`` (and the model's ``config.json``, so ``from_pretrained`` reads
        the directory), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (tensors and plain containers
        only) and ``trainer_state.json`` (step, data position). Written to a temporary directory and
        renamed, so a crash never leaves half a checkpoint.
        """
        from safetensors.torch import save_model

        final = Path(path) if path is not None else self.output_dir / CHECKPOINT_DIR / f"step-{self.step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.model, str(tmp / "model.safetensors"))
        if hasattr(self.model, "config") and hasattr(self.model.config, "save_pretrained"):
            self.model.config.save_pretrained(tmp)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.train_batches.state_dict(),
                 "config": self.config.to_dict()}  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        if self.save_extras is not None:
            self.save_extras(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save`; nothing in it is unpickled as an object
        (safetensors for the weights, ``torch.load(weights_only=True)`` for the states)."""
        from safetensors.torch import load_model

        path = Path(path)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume_from: {str(path)!r} is not a checkpoint (no trainer_state.json)")
        load_model(self.model, str(path / "model.safetensors"), strict=True, device=str(self.device))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.train_batches.load_state_dict(state["data"])
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop records past the resumed step (logged after the checkpoint by the interrupted run)."""
        if not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
