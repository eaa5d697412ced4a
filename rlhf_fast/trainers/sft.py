"""Supervised fine-tuning of a ``transformers`` causal LM: cross entropy on the response tokens.

Data: ``{"prompt", "completion"}`` rows (loss on the completion), ``{"messages"}`` conversations
(loss on the assistant turns, located through the tokenizer's chat template) or ``{"text"}`` rows
(loss on every token); see :mod:`rlhf_fast.trainers.data`. With ``fused=True`` (the default) the
model only runs up to its final hidden states and :func:`rlhf_fast.linear_cross_entropy` applies
the LM head chunk by chunk, so ``[tokens, vocab]`` logits never exist; ``fused=False`` asks the
model for its logits and uses :func:`rlhf_fast.cross_entropy`, for comparison.

>>> trainer = SFTTrainer(model, tokenizer, [{"prompt": "2+2=", "completion": " 4"}], config={"max_steps": 10})
>>> trainer.train()
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import rlhf_fast as rf
from rlhf_fast.integrations.transformers import final_hidden_states, head_inputs, lm_head
from rlhf_fast.trainers import data
from rlhf_fast.trainers.config import TrainConfig, as_config, option
from rlhf_fast.trainers.loop import Batch, TrainLoop


@dataclass
class SFTConfig(TrainConfig):
    """:class:`TrainConfig` plus the SFT options."""

    output_dir: str = option("runs/sft")
    packing: bool = option(False, doc="concatenate training examples into rows of max_length")
    label_smoothing: float = option(0.0, ge=0.0, le=1.0)


class SFTLoss:
    """Summed next-token cross entropy over the labelled tokens of a batch (the loop's objective).

    ``batch``: ``input_ids``/``labels`` ``[B, T]`` int64 with labels aligned to the inputs, and
    ``attention_mask`` or ``position_ids`` ``[B, T]``.
    """

    unit = "loss_tokens"

    def __init__(self, config: SFTConfig):
        self.config = config

    def count(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        # Position t predicts token t + 1. Shifting the labels rather than slicing the model's output
        # keeps the hidden states (or logits) [B, T, ...] contiguous: no copy; the last position is ignored.
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=data.IGNORE_INDEX)  # [B, T]
        inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        # no KV cache: with one, transformers would not build the block mask of packed rows
        inputs["use_cache"] = False
        if not cfg.fused:
            logits = model(input_ids=batch["input_ids"], **inputs).logits  # [B, T, V]
            loss = rf.cross_entropy(
                logits, targets, reduction="sum", label_smoothing=cfg.label_smoothing, backend=cfg.backend
            )
            return loss, {}
        # the head runs in bf16 under autocast (head_inputs casts), accumulating in float32
        hidden, weight, bias, softcap = head_inputs(model, final_hidden_states(model, batch["input_ids"], **inputs))
        with torch.autocast(hidden.device.type, enabled=False):
            loss = rf.linear_cross_entropy(
                hidden, weight, targets, bias=bias,
                reduction="sum", label_smoothing=cfg.label_smoothing, chunk_bytes=cfg.chunk_bytes, softcap=softcap,
                backend=cfg.backend,
            )  # fmt: skip
        return loss, {}


def _perplexity(metrics: dict[str, float]) -> dict[str, float]:
    return {"eval_ppl": math.exp(min(metrics["eval_loss"], 700.0))}


class SFTTrainer:
    """Supervised fine-tuning: ``SFTTrainer(model, tokenizer, train_data, eval_data, config).train()``.

    Args:
        model: a ``transformers`` causal LM (``PreTrainedModel`` with ``get_output_embeddings()``).
        tokenizer: its tokenizer; ``pad_token_id`` (else ``eos_token_id``) pads; ``chat_template``
            for ``messages`` data.
        train_data / eval_data: a JSONL path, a list of dicts or a ``datasets.Dataset``.
        config: an :class:`SFTConfig` or a dict of its fields.

    Every input is tokenized and checked here, so bad data fails before any training.
    """

    def __init__(self, model, tokenizer, train_data, eval_data=None, config: SFTConfig | Mapping | None = None):
        self.config = as_config(config, SFTConfig)
        self.tokenizer = tokenizer
        cfg = self.config
        examples = data.sft_examples(
            data.load_rows(train_data, "train_data"), tokenizer, max_length=cfg.max_length, name="train_data"
        )
        if not any(label != data.IGNORE_INDEX for ex in examples for label in ex["labels"][1:]):
            raise ValueError(f"train_data has no token to train on within max_length = {cfg.max_length}")
        data.check_vocab(model, (ex["input_ids"] for ex in examples), "train_data")
        eval_examples = None
        if eval_data is not None:
            eval_examples = data.sft_examples(
                data.load_rows(eval_data, "eval_data"), tokenizer, max_length=cfg.max_length, name="eval_data"
            )
            data.check_vocab(model, (ex["input_ids"] for ex in eval_examples), "eval_data")
        if cfg.packing:
            examples = data.pack(examples, cfg.max_length)
        self.loop = TrainLoop(
            model, cfg, SFTLoss(cfg), examples, partial(data.collate, pad_id=data.pad_id_of(tokenizer)),
            eval_examples=eval_examples, eval_extras=_perplexity, save_extras=tokenizer.save_pretrained,
            prepare=lm_head if cfg.fused else None,
        )  # fmt: skip

    @property
    def model(self) -> torch.nn.Module:
        return self.loop.model

    def train(self, resume_from: str | os.PathLike | bool | None = None) -> dict[str, float]:
        """Train (from ``resume_from``: a checkpoint directory, or True for the latest one); returns
        the last metrics. Metrics per step: ``loss``, ``loss_tokens``, ``tokens``, ``lr``,
        ``grad_norm``, ``tokens_per_s``; after evaluations ``eval_loss`` and ``eval_ppl``."""
        return self.loop.train(resume_from)

    def evaluate(self) -> dict[str, float]:
        """``eval_loss`` (mean cross entropy per labelled token) and ``eval_ppl`` on ``eval_data``."""
        return self.loop.evaluate()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """A resumable checkpoint with the tokenizer; ``from_pretrained`` reads the directory too."""
        return self.loop.save(path)
