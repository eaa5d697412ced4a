"""Reward-model training: a scalar score per sequence, fitted to preferences (Bradley–Terry).

Model: a ``transformers`` ``...ForSequenceClassification`` with ``num_labels=1`` (its ``score``
head), or a causal LM, which gets a :class:`ValueHeadModel` around it (a ``Linear(H, 1)`` on its
final hidden states, saved with every checkpoint). The reward of a sequence is the head's output at
its last attended token, found from the attention mask, so right padding never changes it.

Data, one format per dataset (see :func:`preference_format`):

* pairs ``{"prompt", "chosen", "rejected"}``, optionally ``"margin"`` (a required reward gap, as in
  Llama 2), trained with :func:`rlhf_fast.reward_loss`;
* K-way rankings ``{"prompt", "responses": [best, ..., worst]}``, trained with
  :func:`rlhf_fast.ranking_loss` (InstructGPT): every ordered pair of a ranking counts.

A sequence is the prompt's tokens (with the tokenizer's special tokens) followed by the response's
and an EOS. All responses of a micro-batch go through the model in one ``[B * K, T]`` forward. The
loss unit is the pair (``K(K-1)/2`` per ranking), so accumulated steps average over all pairs.

>>> trainer = RewardTrainer(model, tokenizer, pairs, eval_pairs, config={"max_steps": 100})
>>> trainer.train()["eval_accuracy"]
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

import rlhf_fast as rf
from rlhf_fast.integrations.transformers import final_hidden_states
from rlhf_fast.trainers import data
from rlhf_fast.trainers.config import TrainConfig, as_config, option
from rlhf_fast.trainers.loop import Batch, TrainLoop

PREFERENCE_FORMATS = {"pairwise": ("prompt", "chosen", "rejected"), "ranking": ("prompt", "responses")}
BACKBONE_DIR = "backbone"  # where a ValueHeadModel checkpoint keeps its backbone's config


@dataclass
class RewardConfig(TrainConfig):
    """:class:`TrainConfig` plus the reward-model options. ``fused=False`` applies the head at every
    position and then picks the last one, as ``transformers``' sequence classifiers do."""

    output_dir: str = option("runs/rm")
    center_rewards_coef: float = option(
        0.0, ge=0.0, doc="adds coef * (r_i + r_j)^2 per pair, pulling rewards towards zero mean; 0: off"
    )


class ValueHeadModel(nn.Module):
    """A causal LM with a scalar value head on its final hidden states.

    ``reward = value_head(h[last attended token])`` with ``value_head = Linear(H, 1)``, initialised
    ``N(0, initializer_range)`` (the backbone config's, else 0.02) from ``seed``, bias 0. The LM and
    its head are kept whole (``backbone``), so the checkpoint holds both.

    Args:
        backbone: a ``transformers`` causal LM (``base_model`` gives the final hidden states).
        seed: seed of the head's initialisation.
    """

    def __init__(self, backbone: nn.Module, *, seed: int = 0):
        super().__init__()
        config = backbone.config.get_text_config()
        self.backbone = backbone
        self.value_head = nn.Linear(config.hidden_size, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.value_head.weight.normal_(0.0, getattr(config, "initializer_range", 0.02), generator=g)
            self.value_head.bias.zero_()
        weight = self.get_input_embeddings().weight
        self.value_head.to(device=weight.device, dtype=weight.dtype)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[N]`` float32 rewards of ``input_ids`` ``[N, T]`` (``attention_mask`` ``[N, T]``, 1 on tokens)."""
        return sequence_rewards(self, input_ids, attention_mask)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> ValueHeadModel:
        """The model saved in a :class:`RewardTrainer` checkpoint directory, on CPU."""
        import transformers
        from safetensors.torch import load_model

        path = Path(path)
        config = transformers.AutoConfig.from_pretrained(path / BACKBONE_DIR)
        model = cls(transformers.AutoModelForCausalLM.from_config(config))
        load_model(model, str(path / "model.safetensors"), strict=True)
        return model


def _scalar_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(module whose base_model gives the hidden states, Linear(H, 1) head)`` of a reward model."""
    if isinstance(model, ValueHeadModel):
        return model.backbone, model.value_head
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            if head.out_features != 1:
                raise ValueError(
                    f"model's {name!r} head has {head.out_features} outputs; a reward model needs one (num_labels=1)"
                )
            return model, head
    raise TypeError(
        "model must be a transformers ...ForSequenceClassification with num_labels=1, a causal LM or a "
        f"ValueHeadModel, got {type(model).__name__}"
    )


def as_reward_model(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """``model`` itself when it has a scalar head, else a causal LM inside a :class:`ValueHeadModel`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        _scalar_head(model)
    except TypeError:
        if getattr(model, "get_output_embeddings", lambda: None)() is None:
            raise
        return ValueHeadModel(model, seed=seed)
    return model


def sequence_rewards(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                     fused: bool = True) -> Tensor:  # fmt: skip
    """``[N]`` float32 reward of each sequence: the scalar head at its last attended token.

    Args:
        model: a sequence classifier with ``num_labels=1`` or a :class:`ValueHeadModel`.
        input_ids: ``[N, T]`` int64 token ids. attention_mask: ``[N, T]``, 1 on tokens, 0 on (right)
            padding; None: no padding.
        fused: apply the head to the last hidden state only; False: to every position, then pick.
    """
    backbone, head = _scalar_head(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden = final_hidden_states(backbone, input_ids, attention_mask, use_cache=False)  # [N, T, H]
    N, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device)
    last = (attention_mask.ne(0) * positions).argmax(dim=1)  # [N], the rightmost attended position
    rows = torch.arange(N, device=input_ids.device)
    scores = head(hidden[rows, last]) if fused else head(hidden)[rows, last]  # [N, 1]
    return scores.squeeze(-1).float()


# -- data ------------------------------------------------------------------------------------------


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def preference_format(rows: Sequence[Mapping], name: str) -> str:
    """``"pairwise"`` or ``"ranking"``, chosen by the first row and required of every row.

    A missing column, a row of the other format, a ranking of another size ``K`` than the first
    row's, or a ``"margin"`` on some pairs only is a ``ValueError`` naming the row.
    """
    first = set(rows[0])
    if "responses" in first:
        fmt, foreign = "ranking", ("chosen", "rejected", "margin")
    elif "chosen" in first or "rejected" in first:
        fmt, foreign = "pairwise", ("responses",)
    else:
        raise ValueError(
            f"{name}[0] has columns {sorted(first)}; a reward model needs 'prompt', 'chosen' and 'rejected' "
            "columns (pairs, optionally 'margin') or 'prompt' and 'responses' columns (rankings, best first)"
        )
    k = None
    with_margin = "margin" in first
    for i, row in enumerate(rows):
        where = f"{name}[{i}]"
        for col in foreign:
            if col in row:
                raise ValueError(
                    f"{where} has a {col!r} column, but {name}[0] is a {fmt} row: a dataset holds either pairs "
                    "('chosen', 'rejected', optional 'margin') or rankings ('responses'), not both"
                )
        for col in PREFERENCE_FORMATS[fmt]:
            if col not in row:
                raise ValueError(f"{where} is missing column {col!r} (needed by the {fmt!r} format)")
        texts = [(f"{where}[{col!r}]", row[col]) for col in PREFERENCE_FORMATS[fmt] if col != "responses"]
        if fmt == "pairwise":
            if ("margin" in row) != with_margin:
                has, first_has = ("lacks", "has") if with_margin else ("has", "does not")
                raise ValueError(
                    f"{where} {has} a 'margin' column but {name}[0] {first_has}: give every pair a margin or none"
                )
            if with_margin:
                _number(row["margin"], f"{where}['margin']")
        else:
            responses = row["responses"]
            if not isinstance(responses, (list, tuple)) or len(responses) < 2:
                raise ValueError(f"{where}['responses'] must be a list of at least 2 strings, best first")
            k = len(responses) if k is None else k
            if len(responses) != k:
                raise ValueError(f"{where}['responses'] holds {len(responses)} responses but {name}[0]['responses'] "
                                 f"holds {k}: every ranking of a dataset needs the same number")  # fmt: skip
            texts += [(f"{where}['responses'][{j}]", r) for j, r in enumerate(responses)]
        for what, text in texts:
            if not isinstance(text, str):
                raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    return fmt


def preference_examples(rows: Sequence[Mapping], tokenizer, *, max_length: int, name: str) -> list[dict]:
    """Tokenized examples ``{"responses": [ids, ...]}`` (best first) of ``rows``; pairs also carry
    ``"margin"`` (0.0 without the column). Each sequence is prompt + response + EOS, tokenized as the
    DPO pairs are (:func:`rlhf_fast.trainers.data.tokenize_prompts`, ``tokenize_responses``), its first
    ``max_length`` tokens: unlike a DPO pair, a reward model's sequence carries no labels, the data may
    be rankings, and truncation cuts the end (a score of the prompt and the response's start)."""
    fmt = preference_format(rows, name)
    texts = [[row["chosen"], row["rejected"]] if fmt == "pairwise" else list(row["responses"]) for row in rows]
    prompts = data.tokenize_prompts(tokenizer, [row["prompt"] for row in rows])
    flat = data.tokenize_responses(tokenizer, [t for ts in texts for t in ts])
    examples, at = [], 0
    for i, (row, prompt, ts) in enumerate(zip(rows, prompts, texts, strict=True)):
        sequences = []
        for ids in flat[at : at + len(ts)]:
            sequence = (prompt + ids)[:max_length]
            if not sequence:
                raise ValueError(f"{name}[{i}] tokenizes to an empty sequence (and the tokenizer has no EOS)")
            sequences.append(sequence)
        at += len(ts)
        example = {"responses": sequences}
        if fmt == "pairwise":
            example["margin"] = float(row.get("margin", 0.0))
        examples.append(example)
    return examples


def collate_preferences(examples: Sequence[dict], pad_id: int) -> Batch:
    """Right-padded ``input_ids`` and ``attention_mask`` int64 ``[B, K, T]`` (``T`` the longest
    sequence), and for pairs ``margin`` float32 ``[B]``."""
    B, K = len(examples), len(examples[0]["responses"])
    sequences = [s for ex in examples for s in ex["responses"]]
    T = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in sequences]).view(B, K, T)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in sequences]).view(B, K, T)
    batch = {"input_ids": ids, "attention_mask": mask}
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float32)
    return batch


# -- the objective -----------------------------------------------------------------------------------


class RewardLoss:
    """Summed Bradley–Terry loss over the pairs of a batch (the loop's objective).

    ``batch``: ``input_ids``/``attention_mask`` ``[B, K, T]``; with ``margin`` ``[B]`` it is a batch
    of pairs (``K = 2``, :func:`rlhf_fast.reward_loss`), else of rankings (:func:`rlhf_fast.ranking_loss`).
    Metrics, summed over pairs (the loop divides by the pair count): ``accuracy`` (share of pairs the
    model orders right, ties wrong), ``reward_margin`` (mean ``r_better - r_worse``), ``reward_mean``
    (mean reward) and ``reward_std`` (the reward spread within each micro-batch, averaged).
    """

    unit = "pairs"

    def __init__(self, config: RewardConfig):
        self.config = config

    def count(self, batch: Batch) -> int:
        B, K, _ = batch["input_ids"].shape
        return B * K * (K - 1) // 2

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        B, K, T = batch["input_ids"].shape
        pairs = B * K * (K - 1) // 2
        rewards = sequence_rewards(model, batch["input_ids"].view(B * K, T), batch["attention_mask"].view(B * K, T),
                                   fused=self.config.fused).view(B, K)  # fmt: skip
        # both losses are means over pairs: times the pair count they are sums, as the loop needs
        if "margin" in batch:
            loss = rf.reward_loss(rewards[:, 0], rewards[:, 1], margin=batch["margin"]) * pairs
        else:
            loss = rf.ranking_loss(rewards) * pairs
        i, j = torch.triu_indices(K, K, offset=1, device=rewards.device)
        better, worse = rewards[:, i], rewards[:, j]  # [B, K(K-1)/2]
        if self.config.center_rewards_coef > 0.0:
            loss = loss + self.config.center_rewards_coef * (better + worse).square().sum()
        with torch.no_grad():
            stats = {
                "accuracy": (better > worse).sum().float(),
                "reward_margin": (better - worse).sum(),
                # a response is in K - 1 pairs, so sum(r) * (K - 1) / 2 over the pair count is mean(r)
                "reward_mean": rewards.sum() * (K - 1) / 2,
                "reward_std": rewards.std(correction=0) * pairs,
            }
        return loss, stats


# -- the trainer -------------------------------------------------------------------------------------


class RewardTrainer:
    """Reward-model training: ``RewardTrainer(model, tokenizer, train_data, eval_data, config).train()``.

    Args:
        model: a ``transformers`` ``...ForSequenceClassification`` with ``num_labels=1``, a causal LM
            (wrapped in a :class:`ValueHeadModel`, its head initialised from ``config.seed``) or a
            :class:`ValueHeadModel`.
        tokenizer: its tokenizer; ``pad_token_id`` (else ``eos_token_id``) pads.
        train_data / eval_data: a JSONL path, a list of dicts or a ``datasets.Dataset`` of pairs or of
            rankings (:func:`preference_format`); the two may differ in format.
        config: a :class:`RewardConfig` or a dict of its fields.

    Every input is tokenized and checked here, so bad data fails before any training.
    """

    def __init__(self, model, tokenizer, train_data, eval_data=None, config: RewardConfig | Mapping | None = None):
        self.config = cfg = as_config(config, RewardConfig)
        self.tokenizer = tokenizer
        model = as_reward_model(model, seed=cfg.seed)
        examples = preference_examples(
            data.load_rows(train_data, "train_data"), tokenizer, max_length=cfg.max_length, name="train_data"
        )
        data.check_vocab(model, (s for ex in examples for s in ex["responses"]), "train_data")
        eval_examples = None
        if eval_data is not None:
            eval_examples = preference_examples(
                data.load_rows(eval_data, "eval_data"), tokenizer, max_length=cfg.max_length, name="eval_data"
            )
            data.check_vocab(model, (s for ex in eval_examples for s in ex["responses"]), "eval_data")
        self.loop = TrainLoop(
            model, cfg, RewardLoss(cfg), examples, partial(collate_preferences, pad_id=data.pad_id_of(tokenizer)),
            eval_examples=eval_examples, save_extras=self._save_extras,
        )  # fmt: skip

    def _save_extras(self, path: Path) -> None:
        self.tokenizer.save_pretrained(path)
        if isinstance(self.model, ValueHeadModel):
            self.model.backbone.config.save_pretrained(path / BACKBONE_DIR)

    @property
    def model(self) -> nn.Module:
        return self.loop.model

    def train(self, resume_from: str | os.PathLike | bool | None = None) -> dict[str, float]:
        """Train (from ``resume_from``: a checkpoint directory, or True for the latest one); returns
        the last metrics. Per step: ``loss`` (mean over pairs), ``pairs``, ``accuracy``,
        ``reward_mean``, ``reward_std``, ``reward_margin``, ``tokens``, ``lr``, ``grad_norm``,
        ``tokens_per_s``; after evaluations the same with an ``eval_`` prefix."""
        return self.loop.train(resume_from)

    def evaluate(self) -> dict[str, float]:
        """On ``eval_data``: ``eval_loss`` and ``eval_accuracy`` (held-out pairwise accuracy, over
        every pair of every ranking) and the ``eval_reward_*`` statistics."""
        return self.loop.evaluate()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """A resumable checkpoint with the tokenizer (and, for a value head, the backbone's config in
        ``backbone/``: :meth:`ValueHeadModel.from_checkpoint` reads it)."""
        return self.loop.save(path)
