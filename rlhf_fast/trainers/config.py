"""The configuration every trainer shares: a dataclass whose values are checked when it is built.

A config comes from code (``SFTConfig(lr=1e-4)``) or from a mapping (YAML, command-line overrides)
through :meth:`TrainConfig.from_dict`, which rejects unknown keys and converts strings such as
YAML's ``"1e-4"``. Either way every value is checked before any training, and an error names the
field. A trainer's config subclasses :class:`TrainConfig` and declares its own fields with
:func:`option`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BACKENDS = ("cpp", "torch", "triton")


def option(default, *, ge=None, gt=None, le=None, lt=None, choices=None, doc: str = ""):
    """A config field with its bounds (``ge``/``gt``/``le``/``lt``) or allowed ``choices``."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _union_args(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _parse_scalar(kind: type, value: str):
    """``value`` (a string from YAML or the command line) as an int, float or bool."""
    if kind is bool:
        low = value.strip().lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError
    return kind(value)


def _coerce(name: str, hint, value):
    """``value`` converted to the type ``hint`` allows, or a ``TypeError`` naming the field."""
    allowed = _union_args(hint)
    if value is None:
        if type(None) in allowed:
            return None
        raise TypeError(f"config field {name!r} must not be None")
    for kind in allowed:
        origin = typing.get_origin(kind)
        if origin is tuple and isinstance(value, (list, tuple)):
            inner = typing.get_args(kind)
            if len(value) != len(inner):
                raise ValueError(f"config field {name!r} must have {len(inner)} elements, got {len(value)}")
            return tuple(_coerce(f"{name}[{i}]", t, x) for i, (t, x) in enumerate(zip(inner, value, strict=True)))
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    if isinstance(value, str):  # YAML reads "1e-4" as a string; overrides arrive as strings
        for kind in allowed:
            if kind in (bool, int, float):
                try:
                    return _parse_scalar(kind, value)
                except ValueError:
                    continue
        if type(None) in allowed and value.strip().lower() in ("none", "null"):
            return None
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise TypeError(f"config field {name!r} must be {names}, got {value!r} ({type(value).__name__})")


@dataclass
class TrainConfig:
    """Fields every trainer shares. Steps are optimizer steps; a step sees
    ``micro_batch_size * grad_accum_steps * world_size`` examples (rows, when packing), ``world_size``
    being the number of processes (1 unless launched by ``accelerate launch`` or ``torchrun``)."""

    output_dir: str = option("runs/run", doc="run directory: config, metrics.jsonl, checkpoints")
    seed: int = option(0, ge=0, doc="seeds the data order, and torch, random and numpy (process r: seed + r)")
    device: str = option("auto", doc='"auto" (CUDA when available, else CPU) or a torch device string')
    # optimizer and schedule
    lr: float = option(1e-4, gt=0.0, doc="peak learning rate of AdamW")
    weight_decay: float = option(0.0, ge=0.0, doc="decoupled weight decay, on matrices only (not biases, norms)")
    betas: tuple[float, float] = option((0.9, 0.999), doc="AdamW betas, each in [0, 1)")
    adam_eps: float = option(1e-8, gt=0.0)
    warmup_steps: int = option(0, ge=0, doc="linear warm-up steps (or set warmup_ratio)")
    warmup_ratio: float = option(0.0, ge=0.0, lt=1.0, doc="warm-up as a share of the total steps")
    min_lr_ratio: float = option(0.0, ge=0.0, le=1.0, doc="cosine decays to lr * min_lr_ratio")
    max_steps: int = option(-1, ge=-1, doc="optimizer steps; -1: as many as `epochs` take")
    epochs: float = option(1.0, gt=0.0, doc="passes over the training data when max_steps is -1")
    micro_batch_size: int = option(8, ge=1, doc="examples per micro-batch of each process")
    grad_accum_steps: int = option(1, ge=1)
    eval_batch_size: int | None = option(None, ge=1, doc="default: micro_batch_size")
    max_grad_norm: float | None = option(1.0, gt=0.0, doc="clip the global gradient norm; None: no clipping")
    shuffle: bool = option(True, doc="reshuffle the training data every epoch (from the seed)")
    # numerics and the loss path
    bf16: bool | None = option(None, doc="bfloat16 autocast; None: where the device supports it (not on CPU)")
    fused: bool = option(True, doc="loss from hidden states and the LM-head weight; False: from model logits")
    chunk_bytes: int | None = option(None, gt=0, doc="memory budget of one chunk of logits in the fused path")
    backend: str | None = option(None, choices=BACKENDS, doc="rlhf_fast backend; None: chosen per device")
    max_length: int = option(512, ge=2, doc="tokens per sequence (longer ones are truncated)")
    # logging and checkpoints
    log_every: int = option(1, ge=1, doc="steps between metrics.jsonl records")
    eval_every: int = option(0, ge=0, doc="steps between evaluations; 0: only at the end")
    save_every: int = option(0, ge=0, doc="steps between checkpoints; 0: only at the end")
    progress_bar: bool = option(True, doc="tqdm bar with the live loss")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f.name, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            self._check_bounds(f, value)
        self.validate()

    @staticmethod
    def _check_bounds(f: dataclasses.Field, value) -> None:
        if value is None or isinstance(value, (bool, str, tuple)):
            choices = f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"config field {f.name!r} must be one of {choices}, got {value!r}")
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config field {f.name!r} must be finite, got {value}")
        for key, ok, word in (
            ("ge", lambda b: value >= b, ">="),
            ("gt", lambda b: value > b, ">"),
            ("le", lambda b: value <= b, "<="),
            ("lt", lambda b: value < b, "<"),
        ):
            bound = f.metadata.get(key)
            if bound is not None and not ok(bound):
                raise ValueError(f"config field {f.name!r} must be {word} {bound}, got {value}")

    def validate(self) -> None:
        """Rules between fields; subclasses extend it (and call ``super().validate()``)."""
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"config field 'betas' must hold values in [0, 1), got betas[{i}] = {b}")
        if self.warmup_steps > 0 and self.warmup_ratio > 0.0:
            raise ValueError("config fields 'warmup_steps' and 'warmup_ratio' are exclusive: set one of them")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"config field 'device' is not a torch device: {self.device!r} ({e})") from None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a mapping; an unknown key is a ``ValueError`` that names it (and the closest field)."""
        if not isinstance(values, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a mapping, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown config key {key!r} for {cls.__name__}{hint}; known keys: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def as_config(config, cls: type[TrainConfig]):
    """``config`` as a ``cls``: None gives the defaults, a mapping goes through :meth:`TrainConfig.from_dict`."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        return cls.from_dict(config)
    raise TypeError(f"config must be a {cls.__name__} or a dict of its fields, got {type(config).__name__}")
