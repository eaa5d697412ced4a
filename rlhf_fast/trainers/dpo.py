"""Direct Preference Optimization of a ``transformers`` causal LM against a frozen reference.

Data: ``{"prompt", "chosen", "rejected"}`` rows (see :func:`rlhf_fast.trainers.data.preference_examples`).
Every loss of :func:`rlhf_fast.dpo_loss` is available (``sigmoid``, ``hinge``, ``ipo``, ``robust``,
conservative label smoothing, per-token averaging, the RPO negative log-likelihood term).

The reference is, in order of preference: ``ref_model`` when given; with a PEFT model (anything
with a ``disable_adapter()`` context manager, as ``peft.PeftModel`` has) the same model with its
adapters disabled, so no second copy of the weights exists; otherwise a deep copy of the model taken
when the trainer is built. Its sequence log-probs never change, so they are computed once, before
the first step (or evaluation), over the train and eval pairs, under ``no_grad`` and through the
fused LM-head path, and kept in memory; the trainer then lets go of its reference. Checkpoints
carry them (``reference_logps.safetensors``), so a resumed run needs no reference model and takes
the very next step the interrupted one would have.

Each micro-batch runs the policy once on ``[2B, T]`` (chosen rows, then rejected rows). With
``fused=True`` (the default) the final hidden states go to :func:`rlhf_fast.linear_dpo_loss` with
the model's LM head; ``fused=False`` asks the model for its logits and uses :func:`rlhf_fast.dpo_loss`.

>>> trainer = DPOTrainer(model, tokenizer, pairs, config={"beta": 0.1, "max_steps": 100})
>>> trainer.train()
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import rlhf_fast as rf
from rlhf_fast.integrations.transformers import final_hidden_states, head_inputs, lm_head
from rlhf_fast.ops.policy_losses import DPO_LOSS_TYPES
from rlhf_fast.trainers import data
from rlhf_fast.trainers.config import TrainConfig, as_config, option
from rlhf_fast.trainers.distributed import ProcessGroup
from rlhf_fast.trainers.loop import Batch, TrainLoop, latest_checkpoint

REFERENCE_FILE = "reference_logps.safetensors"
METRICS = {"chosen_rewards": "rewards/chosen", "rejected_rewards": "rewards/rejected",
           "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}  # fmt: skip


@dataclass
class DPOConfig(TrainConfig):
    """:class:`TrainConfig` plus the DPO options (see :func:`rlhf_fast.dpo_loss` for the losses)."""

    output_dir: str = option("runs/dpo")
    beta: float = option(0.1, gt=0.0, doc="inverse temperature of the implicit reward beta * log(pi / pi_ref)")
    loss_type: str = option("sigmoid", choices=DPO_LOSS_TYPES)
    label_smoothing: float = option(0.0, ge=0.0, lt=0.5, doc="assumed share of flipped labels (sigmoid, robust)")
    average_logprobs: bool = option(False, doc="sequence log-prob as the mean over response tokens, not the sum")
    nll_coef: float = option(0.0, ge=0.0, doc="weight of the chosen responses' NLL (RPO), per pair, see DPOLoss")
    max_prompt_length: int | None = option(None, ge=1, doc="prompt tokens kept when truncating; None: max_length/2")
    reference_free: bool = option(False, doc="no reference: the implicit reward is beta * log pi")
    ref_batch_size: int | None = option(None, ge=1, doc="pairs per reference forward; None: the eval batch size")

    def validate(self) -> None:
        super().validate()
        if self.label_smoothing > 0.0 and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(
                f"config field 'label_smoothing' applies to loss_type 'sigmoid' and 'robust', not {self.loss_type!r}"
            )
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"config field 'max_prompt_length' ({self.max_prompt_length}) must be < max_length ({self.max_length})"
            )


def collate_pairs(pairs: Sequence[data.PairExample], pad_id: int) -> Batch:
    """``B`` pairs as one right-padded ``[2B, T]`` batch (chosen rows first, then rejected rows:
    ``input_ids``, ``labels``, ``attention_mask``, int64) and, once cached, the reference sequence
    log-prob sums ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` float32."""
    batch = data.collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
    if "ref_chosen_logps" in pairs[0]:
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[key] = torch.tensor([p[key] for p in pairs], dtype=torch.float32)
    return batch


def _targets(batch: Batch) -> Tensor:
    """Next-token targets ``[2B, T]``: position t predicts token t + 1; the last position is ignored.
    Shifting the labels keeps the hidden states (or logits) contiguous."""
    return F.pad(batch["labels"][:, 1:], (0, 1), value=data.IGNORE_INDEX)


def _head(model, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None, float | None]:
    """``(hidden [2B, T, H], weight [V, H], bias [V] | None, softcap)``: the inputs of a ``linear_*`` op
    that give the model's own logits (logit scale applied to ``hidden``), all in the dtype the model's head
    computes in (the autocast dtype under autocast; see ``head_inputs``)."""
    return head_inputs(model, final_hidden_states(model, batch["input_ids"], batch["attention_mask"], use_cache=False))


class DPOLoss:
    """The DPO loss of a batch of pairs, summed over the pairs (the loop's objective; pairs are its unit).

    ``dpo_loss`` returns a mean over the batch's ``B`` pairs; times ``B`` it is the sum the loop
    divides by the pairs of the whole accumulated step, so any micro-batching gives the same update.

    The ``nll_coef`` term is kept out of ``dpo_loss`` (whose NLL is a token mean over one micro-batch,
    which a split into micro-batches would change) and taken per pair instead: each chosen response's
    mean NLL per token, as RPO does (Pang et al., 2024, length-normalized NLL); summed over pairs it splits exactly.
    It needs the chosen half's token log-probs once more (one more pass over the LM head for B rows).
    """

    unit = "pairs"

    def __init__(self, config: DPOConfig):
        self.config = config

    def count(self, batch: Batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def _reference(self, batch: Batch, targets: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if self.config.reference_free:
            return None, None
        if "ref_chosen_logps" not in batch:
            raise RuntimeError("the reference log-probs are not cached: DPOTrainer computes them before training")
        chosen, rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.config.average_logprobs:
            n = (targets != data.IGNORE_INDEX).sum(-1).clamp(min=1)  # [2B]
            B = chosen.shape[0]
            chosen, rejected = chosen / n[:B], rejected / n[B:]
        return chosen, rejected

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        B = self.count(batch)
        targets = _targets(batch)  # [2B, T]
        ref_chosen, ref_rejected = self._reference(batch, targets)
        kw = dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                  average_logprobs=cfg.average_logprobs)  # fmt: skip
        chosen_logp = None  # [B, T], for the NLL term
        if not cfg.fused:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            # logits: [2B, T, V]; the halves are views, which dpo_loss runs as one op
            loss, stats = rf.dpo_loss(
                logits[:B], targets[:B], logits[B:], targets[B:], ref_chosen, ref_rejected, **kw, backend=cfg.backend
            )
            if cfg.nll_coef > 0.0:
                chosen_logp = rf.token_logprobs(logits[:B], targets[:B], backend=cfg.backend)
        else:
            hidden, weight, bias, softcap = _head(model, batch)  # hidden: [2B, T, H]
            head = dict(bias=bias, chunk_bytes=cfg.chunk_bytes, softcap=softcap, backend=cfg.backend)
            # the head runs in bf16 under autocast (head_inputs casts), accumulating in float32
            with torch.autocast(hidden.device.type, enabled=False):
                loss, stats = rf.linear_dpo_loss(
                    hidden[:B], targets[:B], hidden[B:], targets[B:], weight, ref_chosen, ref_rejected,
                    **kw, **head,
                )  # fmt: skip
                if cfg.nll_coef > 0.0:
                    chosen_logp = rf.linear_token_logprobs(hidden[:B], weight, targets[:B], **head)
        loss = loss * B
        if chosen_logp is not None:
            tokens = (targets[:B] != data.IGNORE_INDEX).sum(-1).clamp(min=1)  # [B]
            loss = loss + cfg.nll_coef * (-chosen_logp.sum(-1) / tokens).sum()
        return loss, {name: stats[key] * B for key, name in METRICS.items()}


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, pairs: Sequence[data.PairExample], *, pad_id: int, batch_size: int, config: TrainConfig,
    device: torch.device, bf16: bool, desc: str = "reference", group: ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Summed response log-probs ``(chosen [N], rejected [N])`` float32 (on CPU) of ``model`` on ``pairs``,
    ``batch_size`` pairs per forward, through the fused LM head (no ``[tokens, vocab]`` logits). With a
    distributed ``group`` the batches are dealt to the processes in turn and every process gets all sums."""
    from tqdm.auto import tqdm

    group = group or ProcessGroup()
    sums = torch.zeros(2, len(pairs), dtype=torch.float32)  # [chosen; rejected], 0 where another process works
    starts = range(0, len(pairs), batch_size)[group.rank :: group.world_size]
    for i in tqdm(starts, desc=desc, disable=not (config.progress_bar and group.is_main), leave=False):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[i : i + batch_size], pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden, weight, bias, softcap = _head(model, batch)
        logp = rf.linear_token_logprobs(
            hidden, weight, _targets(batch), bias=bias, chunk_bytes=config.chunk_bytes, softcap=softcap,
            backend=config.backend,
        )  # fmt: skip
        s = logp.sum(-1).float().cpu()  # logp: [2b, T]; s: b chosen, then b rejected
        b = len(s) // 2
        sums[:, i : i + b] = s.view(2, b)
    if group.distributed:  # each sum is a single process's, the others add zeros: exact
        sums = group.sum(sums.to(device)).cpu()
    return sums[0], sums[1]


def _fingerprint(pairs: Sequence[data.PairExample]) -> str:
    """A digest of the pairs' tokens: which data a set of cached reference log-probs belongs to."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p["chosen"]["input_ids"], p["chosen"]["labels"], p["rejected"]["input_ids"],
                             p["rejected"]["labels"]]).encode())  # fmt: skip
    return h.hexdigest()


class DPOTrainer:
    """DPO: ``DPOTrainer(model, tokenizer, train_data, eval_data, config, ref_model=None).train()``.

    Args:
        model: the policy, a ``transformers`` causal LM (or a PEFT model wrapping one).
        tokenizer: its tokenizer; ``pad_token_id`` (else ``eos_token_id``) pads.
        train_data / eval_data: ``{"prompt", "chosen", "rejected"}`` rows: a JSONL path, a list of
            dicts or a ``datasets.Dataset``.
        config: a :class:`DPOConfig` or a dict of its fields.
        ref_model: the frozen reference (set to eval mode, ``requires_grad=False``, moved to the
            training device). None: the model with its adapters disabled when it has a
            ``disable_adapter()`` context manager (PEFT; ``peft`` itself is not required), else a deep
            copy of ``model`` taken here, before any training. Not used with ``reference_free``.

    Data and config are checked here, so bad input fails before any training. The reference
    log-probs are computed at the first :meth:`train`, :meth:`evaluate` or :meth:`save` (or read
    from the checkpoint a run resumes from), after which the trainer holds no reference model.
    """

    def __init__(
        self, model, tokenizer, train_data, eval_data=None, config: DPOConfig | Mapping | None = None, ref_model=None
    ):
        self.config = cfg = as_config(config, DPOConfig)
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model is the model being trained: pass a separate copy, or None for one made here")
        if ref_model is not None and cfg.reference_free:
            raise ValueError("ref_model is given but config field 'reference_free' is True")
        self.tokenizer = tokenizer
        self.pad_id = data.pad_id_of(tokenizer)
        self.train_pairs = self._pairs(model, train_data, "train_data")
        self.eval_pairs = None if eval_data is None else self._pairs(model, eval_data, "eval_data")
        self.ref_model: torch.nn.Module | None = None
        self.uses_disabled_adapters = False
        if not cfg.reference_free:
            if ref_model is not None:
                self.ref_model = ref_model
            elif callable(getattr(model, "disable_adapter", None)):
                self.uses_disabled_adapters = True
            else:
                self.ref_model = copy.deepcopy(model)
            if self.ref_model is not None:
                self.ref_model.requires_grad_(False).eval()
        self.loop = TrainLoop(
            model, cfg, DPOLoss(cfg), self.train_pairs, partial(collate_pairs, pad_id=self.pad_id),
            eval_examples=self.eval_pairs, save_extras=self._save_extras, prepare=lm_head if cfg.fused else None,
        )  # fmt: skip
        if self.uses_disabled_adapters and self.loop.dist.fsdp:
            raise ValueError(
                "under FSDP the reference cannot be the sharded model with its adapters disabled "
                "(its forward runs outside the training step): pass ref_model, a copy of the base model"
            )

    def _pairs(self, model, rows, name: str) -> list[data.PairExample]:
        pairs = data.preference_examples(
            data.load_rows(rows, name), self.tokenizer, max_length=self.config.max_length,
            max_prompt_length=self.config.max_prompt_length, name=name,
        )  # fmt: skip
        data.check_vocab(model, (p[side]["input_ids"] for p in pairs for side in ("chosen", "rejected")), name)
        return pairs

    @property
    def model(self) -> torch.nn.Module:
        return self.loop.model

    # -- the cached reference log-probs --------------------------------------------------------

    def _datasets(self) -> dict[str, list[data.PairExample]]:
        return {"train": self.train_pairs} | ({"eval": self.eval_pairs} if self.eval_pairs is not None else {})

    @contextmanager
    def _reference(self):
        """The reference, in eval mode on the training device, for the duration of the block."""
        if self.ref_model is not None:
            yield self.ref_model.to(self.loop.device)
            return
        model = self.loop.model
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                yield model
        finally:
            model.train(was_training)

    def _ensure_reference(self) -> None:
        """Compute the reference log-probs of every dataset that has none yet, then drop the reference."""
        if self.config.reference_free:
            return
        missing = {name: pairs for name, pairs in self._datasets().items() if "ref_chosen_logps" not in pairs[0]}
        if missing:
            if self.ref_model is None and not self.uses_disabled_adapters:
                raise RuntimeError("the reference model was released before every reference log-prob was cached")
            cfg = self.config
            size = cfg.ref_batch_size or cfg.eval_batch_size or cfg.micro_batch_size
            with self._reference() as ref:
                for name, pairs in missing.items():
                    chosen, rejected = reference_logps(
                        ref, pairs, pad_id=self.pad_id, batch_size=size, config=cfg, device=self.loop.device,
                        bf16=self.loop.bf16, desc=f"reference log-probs ({name})", group=self.loop.dist,
                    )  # fmt: skip
                    _store(pairs, chosen, rejected)
        self.ref_model = None

    def _save_extras(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory)
        if self.config.reference_free:
            return
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for name, pairs in self._datasets().items():
            tensors[f"{name}_chosen"] = torch.tensor([p["ref_chosen_logps"] for p in pairs], dtype=torch.float32)
            tensors[f"{name}_rejected"] = torch.tensor([p["ref_rejected_logps"] for p in pairs], dtype=torch.float32)
            meta[name] = _fingerprint(pairs)
        save_file(tensors, str(directory / REFERENCE_FILE), metadata=meta)

    def _load_reference(self, path: Path) -> None:
        """Read the cached reference log-probs of a checkpoint; the train set's must be for these very
        pairs. Those of an eval set that changed are computed again."""
        from safetensors import safe_open

        file = path / REFERENCE_FILE
        if not file.is_file():
            raise FileNotFoundError(f"resume_from: {str(path)!r} has no {REFERENCE_FILE} (not a DPO checkpoint?)")
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            for name, pairs in self._datasets().items():
                if meta.get(name) != _fingerprint(pairs):
                    if name == "train":
                        raise ValueError(f"resume_from: {str(path)!r} holds reference log-probs of other train_data")
                    continue
                _store(pairs, f.get_tensor(f"{name}_chosen"), f.get_tensor(f"{name}_rejected"))

    # -- public API ----------------------------------------------------------------------------

    def train(self, resume_from: str | os.PathLike | bool | None = None) -> dict[str, float]:
        """Train (from ``resume_from``: a checkpoint directory, or True for the latest one); returns the
        last metrics. Per step: ``loss``, ``pairs``, ``tokens``, ``lr``, ``grad_norm``, ``tokens_per_s``,
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (means
        over the pairs); after evaluations the same names prefixed ``eval_``."""
        if resume_from is True:
            resume_from = latest_checkpoint(self.config.output_dir)
        if resume_from and not self.config.reference_free:
            self._load_reference(Path(resume_from))
        self._ensure_reference()
        return self.loop.train(resume_from)

    def evaluate(self) -> dict[str, float]:
        """``eval_loss`` and ``eval_rewards/*`` (means over the eval pairs) on ``eval_data``."""
        self._ensure_reference()
        return self.loop.evaluate()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """A resumable checkpoint with the tokenizer and the cached reference log-probs."""
        self._ensure_reference()
        return self.loop.save(path)


def _store(pairs: list[data.PairExample], chosen: Tensor, rejected: Tensor) -> None:
    """Attach reference sequence log-prob sums (``[N]`` float32) to the pairs, where collation finds them."""
    if chosen.shape != (len(pairs),) or rejected.shape != (len(pairs),):
        raise ValueError(f"expected {len(pairs)} reference log-probs, got {tuple(chosen.shape)}")
    for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist(), strict=True):
        p["ref_chosen_logps"], p["ref_rejected_logps"] = c, r
