"""The samples of an RL iteration: prompts in, right-padded rollouts out, and the per-position
reads of the policy and critic that :mod:`rlhf_fast.trainers.ppo` builds on.

Layout. Prompts are left-padded for ``generate`` (:func:`collate_prompts`); its output is turned into
right-padded rows of prompt + response (:func:`right_pad`), the layout the models were trained on,
and every per-token quantity lives in an ``[N, R]`` tensor over the response tokens, with
``index[b, t]`` the position whose hidden state predicts response token ``t``
(:func:`gather_positions` reads them). Nothing here runs a whole-vocabulary op: the LM head is
applied by the fused ``rlhf_fast.linear_*`` ops to the gathered hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf_fast.integrations.transformers import final_hidden_states
from rlhf_fast.trainers import data
from rlhf_fast.trainers.loop import Batch
from rlhf_fast.trainers.reward import _scalar_head


def prompt_examples(rows: Sequence, tokenizer, *, max_prompt_length: int, name: str) -> list[dict[str, list[int]]]:
    """Token ids ``{"input_ids"}`` of each prompt: a string, a ``{"prompt"}`` row (with the tokenizer's
    special tokens) or a ``{"messages"}`` row (chat template with the generation prompt); the last
    ``max_prompt_length`` tokens, and the BOS if the prompt starts with one."""
    if isinstance(rows, (str, bytes)):
        raise TypeError(f"{name} must be a list of prompts, not a single string")
    rows = [{"prompt": r} if isinstance(r, str) else r for r in rows]
    rows = data.load_rows(rows, name)
    bos = tokenizer.bos_token_id
    examples = []
    for i, row in enumerate(rows):
        if "messages" in row:
            ids = data._chat_ids(tokenizer, row["messages"], add_generation_prompt=True)
        elif "prompt" in row:
            if not isinstance(row["prompt"], str):
                raise TypeError(f"{name}[{i}]['prompt'] must be a string, got {type(row['prompt']).__name__}")
            ids = tokenizer(row["prompt"])["input_ids"]
        else:
            raise ValueError(f"{name}[{i}] has columns {sorted(row)}; a prompt row needs 'prompt' or 'messages'")
        if not ids:
            raise ValueError(f"{name}[{i}] tokenizes to no token: generation needs at least one")
        examples.append({"input_ids": data._keep_prompt_end(ids, max_prompt_length, bos)})
    return examples


def collate_prompts(examples: Sequence[dict[str, list[int]]], pad_id: int) -> Batch:
    """Left-padded int64 ``input_ids`` and ``attention_mask`` ``[N, P]``, as ``generate`` wants them."""
    P = max(len(ex["input_ids"]) for ex in examples)
    ids = [[pad_id] * (P - len(ex["input_ids"])) + ex["input_ids"] for ex in examples]
    mask = [[0] * (P - len(ex["input_ids"])) + [1] * len(ex["input_ids"]) for ex in examples]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def gather_positions(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, t]]``: ``[N, T, D]`` and ``[N, R]`` -> ``[N, R, D]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def critic_values(critic: nn.Module, input_ids: Tensor, attention_mask: Tensor, index: Tensor) -> Tensor:
    """``[n, R]`` float32 values: the critic's scalar head on its hidden states at ``index`` ``[n, R]``."""
    backbone, head = _scalar_head(critic)
    hidden = final_hidden_states(backbone, input_ids, attention_mask, use_cache=False)
    return head(gather_positions(hidden, index)).squeeze(-1).float()


@dataclass
class Rollout:
    """The samples of one iteration, right-padded; ``N`` samples, ``T`` tokens, ``R`` response tokens.

    ``input_ids``/``attention_mask`` ``[N, T]`` hold prompt + response (up to and including EOS);
    ``index`` ``[N, R]`` the position predicting each response token; ``labels`` ``[N, R]`` the
    response (``IGNORE_INDEX`` after it); ``logprobs``/``ref_logprobs``/``entropy``/``values`` ``[N, R]``
    float32 (0 on padding; ``values`` None without a critic); ``score`` ``[N]`` float32 (penalty
    included); ``eos`` ``[N]`` bool; ``texts`` the decoded prompt + response of each sample.
    """

    input_ids: Tensor
    attention_mask: Tensor
    index: Tensor
    labels: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    entropy: Tensor
    values: Tensor | None
    score: Tensor
    eos: Tensor
    texts: list[str]

    @property
    def mask(self) -> Tensor:
        return self.labels != data.IGNORE_INDEX

    def rows(self, picks: Tensor, **per_token: Tensor) -> Batch:
        """An update micro-batch of the samples ``picks``, trimmed to their longest sequence and
        response; ``per_token`` adds ``[N, R]`` tensors (advantages, returns, ...)."""
        mask = self.attention_mask[picks]
        T = int(mask.sum(-1).max())
        R = int(self.mask[picks].sum(-1).max())
        batch = {
            "input_ids": self.input_ids[picks, :T],
            "attention_mask": mask[:, :T],
            "index": self.index[picks, :R].clamp(max=T - 1),
            "labels": self.labels[picks, :R],
            "old_logprobs": self.logprobs[picks, :R],
            "ref_logprobs": self.ref_logprobs[picks, :R],
        }
        if self.values is not None:
            batch["old_values"] = self.values[picks, :R]
        batch.update({k: v[picks, :R] for k, v in per_token.items()})
        return batch


def right_pad(prompts: Batch, sequences: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, ...]:
    """``generate``'s output (left-padded prompts of width ``P``, then responses) as right-padded rows.

    Returns ``input_ids``/``attention_mask`` ``[N, T]``, ``index``/``labels`` ``[N, R]`` and ``eos`` ``[N]``:
    each response runs to its first EOS (included) or to the end.
    """
    P = prompts["input_ids"].shape[1]
    responses = sequences[:, P:]  # [N, R]
    N, R = responses.shape
    is_eos = responses == eos_id
    eos = is_eos.any(-1)
    resp_len = torch.where(eos, is_eos.int().argmax(-1) + 1, R)  # [N]
    prompt_len = prompts["attention_mask"].sum(-1)  # [N]
    T = int((prompt_len + resp_len).max())
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((N, T), dtype=torch.long)
    for i in range(N):
        p, r = int(prompt_len[i]), int(resp_len[i])
        input_ids[i, :p] = prompts["input_ids"][i, P - p :]
        input_ids[i, p : p + r] = responses[i, :r]
        attention_mask[i, : p + r] = 1
    steps = torch.arange(R)
    index = (prompt_len[:, None] - 1 + steps).clamp(max=T - 1)
    labels = responses.masked_fill(steps >= resp_len[:, None], data.IGNORE_INDEX)
    return input_ids, attention_mask, index, labels, eos
