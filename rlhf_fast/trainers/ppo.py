"""RL fine-tuning of a ``transformers`` causal LM: PPO as InstructGPT did it, and the critic-free
GRPO, RLOO and REINFORCE in the same trainer.

Data: prompts only, as strings or ``{"prompt"}`` rows or ``{"messages"}`` conversations (rendered by
the tokenizer's chat template with the generation prompt). Each iteration of :meth:`PPOTrainer.train`:

1. **rollout**: ``prompts_per_iteration`` prompts, each sampled ``num_generations`` times with the
   policy's ``generate`` (temperature, top-p, ``max_new_tokens``; a response ends at its first EOS);
2. **score**: the reward model's scalar at the last token of prompt + response (or a Python
   ``reward_fn(texts)``), minus ``missing_eos_penalty`` for a response cut off before EOS;
3. under ``no_grad``, in micro-batches and through the fused LM-head path: the log-probs of the
   sampled tokens under the rollout policy and the reference, and the critic's values;
4. **advantages**: ``gae`` turns the per-token rewards ``-beta * (logp - ref_logp)`` (+ the score at
   the last token, the InstructGPT objective ``r - beta log(pi / pi_SFT)``) and the values into
   advantages and returns; ``grpo``/``rloo`` use the other samples of the prompt as the baseline and
   ``reinforce`` a running mean; ``kl_penalty="loss"`` moves the KL term from the reward into the loss;
5. **update**: ``ppo_epochs`` passes over the rollout in shuffled mini-batches of
   ``micro_batch_size * grad_accum_steps`` samples, one optimizer step each, with
   :func:`rlhf_fast.linear_ppo_loss` (every option of :func:`rlhf_fast.ppo_loss`), plus ``vf_coef``
   times the clipped value loss and, for PPO-ptx, ``ptx_coef`` times the cross entropy on ``ptx_data``;
6. the KL coefficient beta is fixed, or moved towards ``kl_target`` by the adaptive controller.

**The critic** (``advantage_estimator="gae"`` only) is a separate model with a scalar head, trained
with the policy by the same optimizer: ``value_model`` when given; otherwise a copy of the reward
model, as InstructGPT and TRL initialise it (the reward model already reads the task); with a
``reward_fn`` and no reward model, a :class:`~rlhf_fast.trainers.reward.ValueHeadModel` on a copy of
the policy. A separate critic costs a second backbone but keeps the value loss's gradients out of the
policy. The critic's value at response token ``t`` is its head on the hidden state that predicts the
token, the state before it is emitted.

**The reference** is ``ref_model``, or a copy of the policy taken when the trainer is built (the SFT
model). It and the reward model are frozen and never saved; a run resumes from a checkpoint built as
the original trainer was (the same policy, reference and reward model), as the other trainers do.

Every model runs in eval mode (no dropout), so the rollout's log-probs and the update's agree.
With ``fused=False`` the policy's logits are asked for and :func:`rlhf_fast.ppo_loss` /
:func:`rlhf_fast.token_logprobs_and_entropy` / :func:`rlhf_fast.cross_entropy` compute the same
numbers from them, for comparison.

>>> trainer = PPOTrainer(sft_model, tokenizer, prompts, reward_model=rm, config={"max_steps": 100})
>>> trainer.train()
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rlhf_fast as rf
from rlhf_fast.integrations.transformers import final_hidden_states, head_inputs, lm_head
from rlhf_fast.ops.elementwise import KL_ESTIMATORS
from rlhf_fast.ops.policy_losses import LOSS_AGGS
from rlhf_fast.trainers import data, rl
from rlhf_fast.trainers.config import TrainConfig, as_config, option
from rlhf_fast.trainers.loop import Batch, MicroBatches, TrainLoop, _StopOnInterrupt, latest_checkpoint, seed_everything
from rlhf_fast.trainers.reward import ValueHeadModel, as_reward_model, sequence_rewards
from rlhf_fast.trainers.rollout import (
    Rollout,
    collate_prompts,
    critic_values,
    gather_positions,
    prompt_examples,
    right_pad,
)

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce")
KL_PENALTIES = ("reward", "loss")
STATE_FILE = "ppo_state.json"
POLICY_DIR = "policy"  # the policy's config (and the tokenizer) in a checkpoint

RewardFn = Callable[[list[str]], Sequence[float]]


@dataclass
class PPOConfig(TrainConfig):
    """:class:`TrainConfig` plus the RL options. A *step* (``max_steps``, ``save_every``, the LR
    schedule) is one iteration: a rollout and its ``ppo_epochs`` of updates."""

    output_dir: str = option("runs/ppo")
    advantage_estimator: str = option("gae", choices=ESTIMATORS, doc="gae: PPO with a critic; the rest: no critic")
    # rollout
    prompts_per_iteration: int = option(16, ge=1, doc="prompts sampled per iteration")
    num_generations: int = option(1, ge=1, doc="samples per prompt (the group of grpo/rloo, >= 2 there)")
    max_new_tokens: int = option(32, ge=1)
    temperature: float = option(1.0, gt=0.0, doc="sampling temperature; the losses divide the logits by it too")
    top_p: float = option(1.0, gt=0.0, le=1.0, doc="nucleus sampling (log-probs stay those of the full distribution)")
    missing_eos_penalty: float | None = option(None, ge=0.0, doc="subtracted from the score of a response without EOS")
    max_prompt_length: int | None = option(
        None, ge=1, doc="prompt tokens kept (the end); None: max_length - max_new_tokens"
    )
    generation_batch_size: int | None = option(None, ge=1, doc="samples per generate call; None: all of an iteration")
    # the KL penalty
    kl_coef: float = option(0.05, ge=0.0, doc="beta (the adaptive controller's starting value)")
    kl_penalty: str = option(
        "reward", choices=KL_PENALTIES, doc="reward: -beta*k1 per token in the reward; loss: in the loss"
    )
    kl_estimator: str = option("k3", choices=KL_ESTIMATORS, doc="the KL estimator of kl_penalty='loss'")
    adaptive_kl: bool = option(False, doc="Ziegler et al.'s proportional controller of beta")
    kl_target: float = option(6.0, gt=0.0, doc="the sequence KL (nats) the adaptive controller holds")
    kl_horizon: float = option(10000.0, gt=0.0, doc="the adaptive controller's horizon, in samples")
    # advantages
    gamma: float = option(1.0, ge=0.0, le=1.0)
    lam: float = option(0.95, ge=0.0, le=1.0)
    whiten_advantages: bool = option(True, doc="gae and reinforce: advantages to zero mean, unit variance")
    whiten_rewards: bool = option(False, doc="gae: scale the per-token rewards to unit variance first")
    scale_by_std: bool = option(True, doc="grpo and rloo: divide by the group's reward std")
    baseline_momentum: float = option(0.9, ge=0.0, lt=1.0, doc="reinforce: momentum of the running-mean baseline")
    # the update
    ppo_epochs: int = option(4, ge=1, doc="passes over each rollout")
    clip_eps: float = option(0.2, gt=0.0, lt=1.0)
    clip_eps_high: float | None = option(None, gt=0.0, doc="upper clip range; None: clip_eps")
    dual_clip: float | None = option(None, gt=1.0)
    entropy_coef: float = option(0.0, ge=0.0)
    loss_agg: str = option("token-mean", choices=LOSS_AGGS)
    vf_coef: float = option(0.1, ge=0.0, doc="weight of the value loss")
    cliprange_value: float = option(0.2, gt=0.0)
    value_head_seed: int = option(0, ge=0, doc="seed of a new value head on a copy of the policy")
    ptx_coef: float = option(0.0, ge=0.0, doc="PPO-ptx: weight of the cross entropy on ptx_data")

    def validate(self) -> None:
        super().validate()
        if self.advantage_estimator in ("grpo", "rloo") and self.num_generations < 2:
            raise ValueError(
                f"config field 'num_generations' must be >= 2 for advantage_estimator={self.advantage_estimator!r} "
                f"(the baseline is the other samples of the prompt), got {self.num_generations}"
            )
        samples = self.prompts_per_iteration * self.num_generations
        mini = self.micro_batch_size * self.grad_accum_steps
        if samples % mini:
            raise ValueError(
                f"config fields: prompts_per_iteration * num_generations = {samples} samples per iteration must be a "
                f"multiple of the mini-batch micro_batch_size * grad_accum_steps = {mini}"
            )
        prompt = self.max_prompt_length if self.max_prompt_length is not None else 1
        if prompt + self.max_new_tokens > self.max_length:
            raise ValueError(
                f"config field 'max_length' ({self.max_length}) must hold the prompt ({prompt} tokens at least) and "
                f"max_new_tokens ({self.max_new_tokens})"
            )


# -- the loss ----------------------------------------------------------------------------------------


class PolicyAndCritic(nn.Module):
    """The trained modules, one optimizer over both: ``policy`` (a causal LM) and ``critic`` (a model
    with a scalar head, or None for the critic-free estimators)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None):
        super().__init__()
        self.policy, self.critic = policy, critic


class PPOLoss:
    """The policy (and critic, and ptx) loss of one update micro-batch, summed over its loss units (the
    loop's objective): tokens for ``loss_agg="token-mean"``, sequences otherwise.

    ``batch``: right-padded ``input_ids``/``attention_mask`` ``[n, T]``; ``index`` ``[n, R]`` (the
    position whose hidden state predicts response token ``t``), ``labels`` ``[n, R]`` (the response,
    ``IGNORE_INDEX`` on padding), ``old_logprobs``, ``ref_logprobs``, ``advantages``, and for a critic
    ``old_values`` and ``returns``, all ``[n, R]`` float32; for PPO-ptx ``ptx_input_ids``/``ptx_labels``/
    ``ptx_attention_mask``.

    The value loss is reduced like the policy loss (``loss_agg``), so both come out as the mean over
    the whole mini-batch however it is split; the ptx cross entropy (a mean over each micro-batch's
    ptx tokens) weighs as its micro-batch's share of the mini-batch's loss units.
    """

    def __init__(self, config: PPOConfig):
        self.config = config
        self.unit = "loss_tokens" if config.loss_agg == "token-mean" else "sequences"
        self.kl_coef = config.kl_coef  # the trainer sets the controller's value before each update

    def count(self, batch: Batch) -> int:
        valid = batch["labels"] != data.IGNORE_INDEX
        return int(valid.sum()) if self.config.loss_agg == "token-mean" else int(valid.any(-1).sum())

    def loss(self, model: PolicyAndCritic, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        units = self.count(batch)
        in_loss = cfg.kl_penalty == "loss"
        kw = dict(
            clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip,
            ref_logprobs=batch["ref_logprobs"] if in_loss else None, kl_coef=self.kl_coef if in_loss else 0.0,
            kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
            loss_agg=cfg.loss_agg, backend=cfg.backend,
        )  # fmt: skip
        args = (batch["labels"], batch["old_logprobs"], batch["advantages"])
        inputs = dict(attention_mask=batch["attention_mask"], use_cache=False)
        if cfg.fused:
            hidden = gather_positions(final_hidden_states(model.policy, batch["input_ids"], **inputs), batch["index"])
            hidden, weight, bias, softcap = head_inputs(model.policy, hidden)  # bf16 under autocast
            with torch.autocast(hidden.device.type, enabled=False):
                pg_loss, stats = rf.linear_ppo_loss(
                    hidden, weight, *args, bias=bias, softcap=softcap, chunk_bytes=cfg.chunk_bytes, **kw
                )
        else:
            logits = gather_positions(model.policy(batch["input_ids"], **inputs).logits, batch["index"])
            pg_loss, stats = rf.ppo_loss(logits, *args, **kw)
        loss = pg_loss * units
        # the rollout reports the entropy; kl_ref is the KL-in-loss term's
        kept = ("clip_frac", "approx_kl", "kl_ref") if in_loss else ("clip_frac", "approx_kl")
        extras = {"pg_loss": pg_loss.detach() * units, **{k: stats[k] * units for k in kept}}
        if model.critic is not None:
            values = critic_values(model.critic, batch["input_ids"], batch["attention_mask"], batch["index"])
            mask = batch["labels"] != data.IGNORE_INDEX
            value_loss, value_clip = rl.clipped_value_loss(
                values, batch["old_values"], batch["returns"], mask, cfg.cliprange_value, loss_agg=cfg.loss_agg
            )
            loss = loss + cfg.vf_coef * value_loss * units
            extras.update(value_loss=value_loss.detach() * units, value_clip_frac=value_clip * units)
        if cfg.ptx_coef > 0.0:
            ptx = self._ptx_loss(model.policy, batch)
            loss = loss + cfg.ptx_coef * ptx * units
            extras["ptx_loss"] = ptx.detach() * units
        return loss, extras

    def _ptx_loss(self, policy: nn.Module, batch: Batch) -> Tensor:
        """Mean next-token cross entropy on the micro-batch's ptx rows."""
        cfg = self.config
        targets = F.pad(batch["ptx_labels"][:, 1:], (0, 1), value=data.IGNORE_INDEX)
        inputs = dict(attention_mask=batch["ptx_attention_mask"], use_cache=False)
        if not cfg.fused:
            logits = policy(batch["ptx_input_ids"], **inputs).logits
            return rf.cross_entropy(logits, targets, backend=cfg.backend)
        hidden = final_hidden_states(policy, batch["ptx_input_ids"], **inputs)
        hidden, weight, bias, softcap = head_inputs(policy, hidden)  # bf16 under autocast
        with torch.autocast(hidden.device.type, enabled=False):
            return rf.linear_cross_entropy(
                hidden, weight, targets, bias=bias, softcap=softcap, chunk_bytes=cfg.chunk_bytes, backend=cfg.backend
            )


# -- the trainer -----------------------------------------------------------------------------------


class PPOTrainer:
    """RL fine-tuning: ``PPOTrainer(policy, tokenizer, prompts, reward_model=rm, config=cfg).train()``.

    Args:
        policy: a ``transformers`` causal LM (usually the SFT model); it is trained in place.
        tokenizer: its tokenizer, with an EOS token; ``pad_token_id`` (else EOS) pads.
        prompts: a list of strings, or ``{"prompt"}`` / ``{"messages"}`` rows (list, JSONL path or
            ``datasets.Dataset``).
        reward_model: a sequence classifier with ``num_labels=1`` or a
            :class:`~rlhf_fast.trainers.reward.ValueHeadModel` sharing the tokenizer; frozen.
        reward_fn: instead of a reward model, ``reward_fn(texts) -> list[float]`` on the decoded
            prompt + response of each sample (special tokens skipped).
        ref_model: the frozen reference; default: a copy of ``policy`` taken now.
        value_model: the critic's initialisation (``gae``); default: see the module docstring.
        ptx_data: SFT rows for PPO-ptx (``ptx_coef > 0``), in any format :class:`SFTTrainer` takes.
        true_reward_fn: a reward to report beside the score (``true_reward`` metric), e.g. the demo
            task's lexicon reward while the policy is trained on a learned reward model.
        eval_prompts: held-out prompts for :meth:`evaluate`.
        config: a :class:`PPOConfig` or a dict of its fields.
    """

    def __init__(
        self,
        policy: nn.Module,
        tokenizer,
        prompts,
        reward_model: nn.Module | None = None,
        reward_fn: RewardFn | None = None,
        ref_model: nn.Module | None = None,
        *,
        value_model: nn.Module | None = None,
        ptx_data=None,
        true_reward_fn: RewardFn | None = None,
        eval_prompts=None,
        config: PPOConfig | Mapping | None = None,
    ):
        self.config = cfg = as_config(config, PPOConfig)
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        if true_reward_fn is not None and not callable(true_reward_fn):
            raise TypeError(f"true_reward_fn must be callable, got {type(true_reward_fn).__name__}")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token_id: the rollout needs an EOS to stop at")
        if cfg.ptx_coef > 0.0 and ptx_data is None:
            raise ValueError(f"config field 'ptx_coef' is {cfg.ptx_coef} but no ptx_data was given")
        if value_model is not None and cfg.advantage_estimator != "gae":
            raise ValueError(f"value_model is given but advantage_estimator={cfg.advantage_estimator!r} has no critic")
        self.tokenizer, self.reward_fn, self.true_reward_fn = tokenizer, reward_fn, true_reward_fn
        self.pad_id = data.pad_id_of(tokenizer)
        max_prompt = cfg.max_prompt_length or cfg.max_length - cfg.max_new_tokens
        # a path is a JSONL file of prompt rows
        if isinstance(prompts, (str, os.PathLike)):
            prompts = data.load_rows(prompts, "prompts")
        if isinstance(eval_prompts, (str, os.PathLike)):
            eval_prompts = data.load_rows(eval_prompts, "eval_prompts")
        examples = prompt_examples(prompts, tokenizer, max_prompt_length=max_prompt, name="prompts")
        data.check_vocab(policy, (ex["input_ids"] for ex in examples), "prompts")
        eval_examples = None
        if eval_prompts is not None:
            eval_examples = prompt_examples(eval_prompts, tokenizer, max_prompt_length=max_prompt, name="eval_prompts")
            data.check_vocab(policy, (ex["input_ids"] for ex in eval_examples), "eval_prompts")

        self.ref_model = _frozen(ref_model if ref_model is not None else copy.deepcopy(policy))
        self.reward_model = None if reward_model is None else _frozen(as_reward_model(reward_model))
        critic = None
        if cfg.advantage_estimator == "gae":
            if value_model is not None:
                critic = as_reward_model(value_model, seed=cfg.value_head_seed)
            elif reward_model is not None:
                critic = copy.deepcopy(self.reward_model)
            else:
                critic = ValueHeadModel(copy.deepcopy(policy), seed=cfg.value_head_seed)
            critic.requires_grad_(True)
        self.objective = PPOLoss(cfg)
        self.loop = TrainLoop(
            PolicyAndCritic(policy, critic), cfg, self.objective, examples,
            partial(collate_prompts, pad_id=self.pad_id), eval_examples=eval_examples,
            save_extras=self._save_extras, batch_size=cfg.prompts_per_iteration, batches_per_step=1,
            prepare=(lambda m: lm_head(m.policy)) if cfg.fused else None,
        )  # fmt: skip
        if self.loop.dist.distributed:
            raise ValueError("PPOTrainer runs in a single process; launch it without accelerate/torchrun")
        self.loop.model.eval()
        device = self.loop.device
        self.ref_model.to(device)
        if self.reward_model is not None:
            self.reward_model.to(device)

        self.kl_controller = (
            rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.adaptive_kl
            else rl.FixedKLController(cfg.kl_coef)
        )
        self.baseline = rl.RunningMeanBaseline(cfg.baseline_momentum)
        self.ptx_batches = None
        if cfg.ptx_coef > 0.0:
            ptx = data.sft_examples(data.load_rows(ptx_data, "ptx_data"), tokenizer, max_length=cfg.max_length,
                                    name="ptx_data")  # fmt: skip
            data.check_vocab(policy, (ex["input_ids"] for ex in ptx), "ptx_data")
            self.ptx_batches = MicroBatches(ptx, partial(data.collate, pad_id=self.pad_id), cfg.micro_batch_size,
                                            shuffle=cfg.shuffle, seed=cfg.seed)  # fmt: skip

    @property
    def model(self) -> nn.Module:
        """The policy being trained."""
        return self.loop.model.policy

    @property
    def critic(self) -> nn.Module | None:
        return self.loop.model.critic

    # -- rollout ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, prompts: Batch) -> Tensor:
        """``[N, P + R]`` sampled sequences: ``prompts`` (left-padded ``[N, P]``), then the responses."""
        from transformers import GenerationConfig

        cfg, policy = self.config, self.model
        sampling = GenerationConfig(
            do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id,
        )  # fmt: skip
        size = cfg.generation_batch_size or len(prompts["input_ids"])
        # generate fills what the call leaves unset from the model's own generation config; a blank one
        # in its place keeps a checkpoint's repetition penalty, minimum length, etc. out of the sampling,
        # whose distribution must be the one the losses' log-probs describe
        saved, policy.generation_config = policy.generation_config, GenerationConfig()
        try:
            outs = [
                policy.generate(input_ids=prompts["input_ids"][i : i + size],
                                attention_mask=prompts["attention_mask"][i : i + size], generation_config=sampling)
                for i in range(0, len(prompts["input_ids"]), size)
            ]  # fmt: skip
        finally:
            policy.generation_config = saved
        # calls may stop at different lengths: pad every response to the longest
        width = max(o.shape[1] for o in outs)
        return torch.cat([F.pad(o, (0, width - o.shape[1]), value=self.pad_id) for o in outs])

    @torch.no_grad()
    def _token_stats(self, model: nn.Module, input_ids, attention_mask, index, labels) -> tuple[Tensor, Tensor]:
        """``[n, R]`` float32 log-probs of ``labels`` and entropies at ``index``, through the fused path."""
        cfg = self.config
        inputs = dict(attention_mask=attention_mask, use_cache=False)
        with self.loop._autocast():
            if not cfg.fused:
                logits = gather_positions(model(input_ids, **inputs).logits, index)
                return rf.token_logprobs_and_entropy(logits, labels, temperature=cfg.temperature, backend=cfg.backend)
            hidden = gather_positions(final_hidden_states(model, input_ids, **inputs), index)
            hidden, weight, bias, softcap = head_inputs(model, hidden)  # bf16 under autocast
        return rf.linear_token_logprobs_and_entropy(
            hidden, weight, labels, bias=bias, temperature=cfg.temperature, chunk_bytes=cfg.chunk_bytes,
            softcap=softcap, backend=cfg.backend,
        )  # fmt: skip

    def _scores(self, input_ids: Tensor, attention_mask: Tensor, texts: list[str]) -> Tensor:
        """``[N]`` float32 scores of the samples (before any penalty)."""
        if self.reward_fn is not None:
            return _call_reward("reward_fn", self.reward_fn, texts).to(input_ids.device)
        size = self.loop.eval_size
        with torch.no_grad(), self.loop._autocast():
            return torch.cat([
                sequence_rewards(self.reward_model, input_ids[i : i + size], attention_mask[i : i + size])
                for i in range(0, len(input_ids), size)
            ]).float()  # fmt: skip

    def rollout(self, prompts: Batch, k: int, *, with_values: bool = True) -> Rollout:
        """Sample ``k`` responses per prompt of ``prompts`` (left-padded ``input_ids``/``attention_mask``)
        and compute everything the update needs, without gradients."""
        cfg, device = self.config, self.loop.device
        prompts = {key: t.repeat_interleave(k, dim=0).cpu() for key, t in prompts.items()}
        sequences = self._generate({key: t.to(device) for key, t in prompts.items()}).cpu()
        input_ids, attention_mask, index, labels, eos = (
            t.to(device) for t in right_pad(prompts, sequences, self.tokenizer.eos_token_id, self.pad_id)
        )
        texts = self.tokenizer.batch_decode(
            [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)], skip_special_tokens=True
        )
        score = self._scores(input_ids, attention_mask, texts)
        if cfg.missing_eos_penalty is not None:
            score = score - cfg.missing_eos_penalty * (~eos).float()
        size = self.loop.eval_size
        parts: dict[str, list[Tensor]] = {"logprobs": [], "entropy": [], "ref_logprobs": [], "values": []}
        critic = self.critic if with_values else None
        for i in range(0, len(input_ids), size):
            rows = slice(i, i + size)
            args = (input_ids[rows], attention_mask[rows], index[rows], labels[rows])
            logp, entropy = self._token_stats(self.model, *args)
            parts["logprobs"].append(logp)
            parts["entropy"].append(entropy)
            parts["ref_logprobs"].append(self._token_stats(self.ref_model, *args)[0])
            if critic is not None:
                with torch.no_grad(), self.loop._autocast():
                    parts["values"].append(critic_values(critic, *args[:3]))
        mask = labels != data.IGNORE_INDEX
        cat = {key: torch.cat(ts).float() * mask if ts else None for key, ts in parts.items()}
        return Rollout(input_ids, attention_mask, index, labels, cat["logprobs"], cat["ref_logprobs"], cat["entropy"],
                       cat["values"], score, eos, texts)  # fmt: skip

    # -- advantages ------------------------------------------------------------------------------

    def _advantages(self, ro: Rollout, beta: float) -> tuple[Tensor, Tensor | None]:
        """``[N, R]`` advantages and (with a critic) returns."""
        cfg, mask = self.config, ro.mask
        in_reward = cfg.kl_penalty == "reward"
        if cfg.advantage_estimator == "gae":
            rewards = rl.per_token_rewards(ro.score, ro.logprobs, ro.ref_logprobs, mask, beta if in_reward else 0.0)
            if cfg.whiten_rewards:
                rewards = rl.whiten(rewards, mask, shift_mean=False)
            advantages, returns = rl.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = rl.whiten(advantages, mask)
            return advantages, returns
        reward = ro.score - beta * (ro.logprobs - ro.ref_logprobs).sum(-1) if in_reward else ro.score
        if cfg.advantage_estimator == "reinforce":
            adv = self.baseline.advantages(reward)
            if cfg.whiten_advantages:
                adv = rl.whiten(adv, torch.ones_like(adv))
        else:
            adv = rl.group_advantages(reward, cfg.num_generations, kind=cfg.advantage_estimator,
                                      scale_by_std=cfg.scale_by_std)  # fmt: skip
        return adv[:, None] * mask, None

    # -- one iteration ---------------------------------------------------------------------------

    def _iteration(self) -> dict[str, float]:
        cfg, loop = self.config, self.loop
        t0 = time.perf_counter()
        beta = self.kl_controller.value
        ro = self.rollout(next(loop.train_batches), cfg.num_generations)
        advantages, returns = self._advantages(ro, beta)
        t_rollout = time.perf_counter() - t0

        per_token = {"advantages": advantages}
        if returns is not None:
            per_token["returns"] = returns
        self.objective.kl_coef = beta
        N, mini = len(ro.input_ids), cfg.micro_batch_size * cfg.grad_accum_steps
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + loop.step)
        sums: dict[str, float] = {}
        units = steps = 0
        loss_sum = grad_norm = 0.0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(N, generator=g).to(ro.input_ids.device)
            for start in range(0, N, mini):
                picks = order[start : start + mini]
                batches = []
                for j in range(0, len(picks), cfg.micro_batch_size):
                    batch = ro.rows(picks[j : j + cfg.micro_batch_size], **per_token)
                    if self.ptx_batches is not None:
                        batch.update({f"ptx_{key}": t for key, t in next(self.ptx_batches).items()})
                    batches.append(batch)
                step_loss, step_units, _, step_norm, extras = loop.optimizer_step(batches)
                loss_sum, units, grad_norm, steps = (
                    loss_sum + step_loss,
                    units + step_units,
                    grad_norm + step_norm,
                    steps + 1,
                )
                for key, val in extras.items():
                    sums[key] = sums.get(key, 0.0) + val
        lr = loop.scheduler.get_last_lr()[0]
        loop.scheduler.step()
        loop.step += 1
        tokens = int(ro.attention_mask.sum())
        loop.tokens_seen += tokens
        elapsed = time.perf_counter() - t0

        mask = ro.mask
        seq_kl = (ro.logprobs - ro.ref_logprobs).sum(-1)  # [N], k1 summed: an unbiased sequence-KL estimate
        self.kl_controller.update(float(seq_kl.mean()), N)
        record = {
            "loss": loss_sum / max(units, 1),
            **{key: val / max(units, 1) for key, val in sums.items()},
            "score": float(ro.score.mean()),
            "score_std": float(ro.score.std()) if N > 1 else 0.0,
            "kl": float(seq_kl.mean()),
            "kl_coef": beta,
            "entropy": float(rl.masked_mean(ro.entropy, mask)),
            "response_length": float(mask.sum(-1).float().mean()),
            "eos_frac": float(ro.eos.float().mean()),
            "advantages_abs": float(rl.masked_mean(advantages.abs(), mask)),
            "grad_norm": grad_norm / max(steps, 1),
            "lr": lr,
            "tokens": tokens,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "rollout_s": t_rollout,
            "update_s": elapsed - t_rollout,
        }
        if ro.values is not None:
            record["explained_variance"] = float(rl.explained_variance(ro.values, returns, mask))
            record["value_mean"] = float(rl.masked_mean(ro.values, mask))
        if self.true_reward_fn is not None:
            record["true_reward"] = float(_call_reward("true_reward_fn", self.true_reward_fn, ro.texts).mean())
        return record

    # -- public API ------------------------------------------------------------------------------

    def train(self, resume_from: str | os.PathLike | bool | None = None) -> dict[str, float]:
        """Run iterations up to ``total_steps`` (from ``resume_from``: a checkpoint directory, or True for
        the latest one); returns the last metrics.

        Metrics per iteration: ``score`` (mean, with ``score_std``), ``true_reward`` (with a
        ``true_reward_fn``), ``kl`` (mean sequence KL to the reference, the summed k1 estimate),
        ``kl_coef`` (beta), ``entropy`` (mean per response token at rollout), ``response_length``,
        ``eos_frac``; from the update, averaged over its loss units: ``loss``, ``pg_loss``,
        ``clip_frac``, ``approx_kl`` (KL to the rollout policy), ``kl_ref`` (with ``kl_penalty="loss"``),
        ``value_loss``, ``value_clip_frac``, ``ptx_loss``; ``explained_variance`` and ``value_mean`` of
        the critic; ``grad_norm``, ``lr``, ``tokens``, ``tokens_per_s``, ``rollout_s``, ``update_s``.
        """
        from tqdm.auto import tqdm

        cfg, loop = self.config, self.loop
        loop.output_dir.mkdir(parents=True, exist_ok=True)
        (loop.output_dir / "trainer_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if resume_from is True:
            resume_from = latest_checkpoint(loop.output_dir)
        if resume_from:
            self.load(resume_from)
        else:
            seed_everything(cfg.seed)
            loop.metrics_path.unlink(missing_ok=True)
        bar = tqdm(
            total=loop.total_steps, initial=loop.step, disable=not cfg.progress_bar, desc=cfg.advantage_estimator
        )
        last: dict[str, float] = {}
        try:
            with _StopOnInterrupt(bar.write) as stop:
                while loop.step < loop.total_steps:
                    record = self._iteration()
                    last.update(record)
                    bar.update(1)
                    bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.2f}")
                    final = loop.step == loop.total_steps
                    if loop.step % cfg.log_every == 0 or final:
                        loop._log(record)
                    every = cfg.eval_every
                    if loop.eval_examples is not None and ((every and loop.step % every == 0) or final):
                        record = self.evaluate()
                        last.update(record)
                        loop._log(record)
                    if (cfg.save_every and loop.step % cfg.save_every == 0) or final or stop.requested:
                        self.save()
                    if stop.requested and not final:
                        raise KeyboardInterrupt
        finally:
            bar.close()
        return last

    def evaluate(self, prompts=None) -> dict[str, float]:
        """One sample per held-out prompt (``prompts``, else ``eval_prompts``), at the training
        temperature from a fixed seed (the training RNG is left alone): ``eval_score``,
        ``eval_true_reward`` (with a ``true_reward_fn``), ``eval_kl`` (mean sequence KL to the
        reference) and ``eval_response_length``."""
        cfg, loop = self.config, self.loop
        if prompts is not None:
            max_prompt = cfg.max_prompt_length or cfg.max_length - cfg.max_new_tokens
            examples = prompt_examples(prompts, self.tokenizer, max_prompt_length=max_prompt, name="prompts")
        elif loop.eval_examples is not None:
            examples = loop.eval_examples
        else:
            raise ValueError("no eval prompts: pass eval_prompts to the trainer or prompts to evaluate()")
        size = cfg.prompts_per_iteration
        score, kl, length, true = [], [], [], []
        devices = [loop.device] if loop.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            for i in range(0, len(examples), size):
                ro = self.rollout(collate_prompts(examples[i : i + size], self.pad_id), 1, with_values=False)
                score.append(ro.score)
                kl.append((ro.logprobs - ro.ref_logprobs).sum(-1))
                length.append(ro.mask.sum(-1).float())
                if self.true_reward_fn is not None:
                    true.append(_call_reward("true_reward_fn", self.true_reward_fn, ro.texts))
        out = {"eval_score": float(torch.cat(score).mean()), "eval_kl": float(torch.cat(kl).mean()),
               "eval_response_length": float(torch.cat(length).mean())}  # fmt: skip
        if true:
            out["eval_true_reward"] = float(torch.cat(true).mean())
        return out

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """A resumable checkpoint: the policy and critic (``model.safetensors``, keys ``policy.*`` and
        ``critic.*``), optimizer, schedule, RNG and data position, the tokenizer and the policy's config
        in ``policy/``, and ``ppo_state.json`` (beta, the REINFORCE baseline, the ptx data position)."""
        return self.loop.save(path)

    def _save_extras(self, path: Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.model.config.save_pretrained(path / POLICY_DIR)
        state = {"kl_controller": self.kl_controller.state_dict(), "baseline": self.baseline.state_dict(),
                 "ptx_data": None if self.ptx_batches is None else self.ptx_batches.state_dict()}  # fmt: skip
        (path / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save` into this trainer."""
        self.loop.load(path)
        state = json.loads((Path(path) / STATE_FILE).read_text())
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.baseline.load_state_dict(state["baseline"])
        if self.ptx_batches is not None and state["ptx_data"] is not None:
            self.ptx_batches.load_state_dict(state["ptx_data"])


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def _call_reward(name: str, fn: RewardFn, texts: list[str]) -> Tensor:
    """``[N]`` float32 values of ``fn(texts)``, checked: one finite number per text."""
    values = list(fn(texts))
    if len(values) != len(texts):
        raise ValueError(f"{name} returned {len(values)} values for {len(texts)} texts")
    out = torch.tensor([float(x) for x in values], dtype=torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} returned a value that is not finite")
    return out
