"""Training data for the trainers: rows in, tokenized examples out, micro-batches of tensors at the end.

Rows come from a JSONL file, a list of dicts or a ``datasets.Dataset``. An SFT row is one of
``{"messages": [...]}`` (chat template; loss on the assistant turns), ``{"prompt", "completion"}``
(loss on the completion) or ``{"text"}`` (loss on every token); a preference row is
``{"prompt", "chosen", "rejected"}`` (:func:`preference_examples`). Examples are lists of token ids
with labels that carry ``IGNORE_INDEX`` where no loss is taken; labels are aligned with the inputs
(the causal shift happens in the loss). Packing concatenates examples into rows of ``max_length``
with ``position_ids`` restarting at each example, from which ``transformers`` builds a
block-diagonal causal mask: a packed row gives the loss of its examples run one by one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from rlhf_fast.jsonl import read_jsonl

IGNORE_INDEX = -100
SFT_FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}

Example = dict[str, list[int]]


def load_rows(data, name: str) -> list[dict]:
    """Rows of ``data``: a JSONL path, a sequence of mappings, or a ``datasets.Dataset`` (any iterable
    of mappings). ``name`` is the argument's name in error messages."""
    if isinstance(data, (str, os.PathLike)):
        if not os.path.isfile(data):
            raise FileNotFoundError(f"{name}: no such JSONL file: {os.fspath(data)!r}")
        rows = read_jsonl(data, name)
    elif isinstance(data, Iterable) and not isinstance(data, (bytes, Mapping)):
        rows = []
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise TypeError(f"{name}[{i}] must be a mapping (a dict of columns), got {type(row).__name__}")
            rows.append(dict(row))
    else:
        raise TypeError(
            f"{name} must be a JSONL path, a list of dicts or a datasets.Dataset, got {type(data).__name__}"
        )
    if not rows:
        raise ValueError(f"{name} is empty")
    return rows


def sft_format(rows: Sequence[Mapping], name: str) -> str:
    """The SFT format of ``rows`` (a key of ``SFT_FORMATS``), chosen by the first row and required of
    every row: a missing column is a ``ValueError`` naming it and the row."""
    keys = set(rows[0])
    if "messages" in keys:
        fmt = "messages"
    elif "prompt" in keys or "completion" in keys:
        fmt = "prompt_completion"
    elif "text" in keys:
        fmt = "text"
    else:
        raise ValueError(
            f"{name}[0] has columns {sorted(keys)}; SFT needs a 'messages' column, 'prompt' and 'completion' "
            "columns, or a 'text' column"
        )
    for i, row in enumerate(rows):
        for col in SFT_FORMATS[fmt]:
            if col not in row:
                raise ValueError(f"{name}[{i}] is missing column {col!r} (needed by the {fmt!r} format)")
            if col != "messages" and not isinstance(row[col], str):
                raise TypeError(f"{name}[{i}][{col!r}] must be a string, got {type(row[col]).__name__}")
    return fmt


def check_vocab(model, sequences: Iterable[Sequence[int]], name: str) -> None:
    """A ``ValueError`` naming ``name`` when a token id of ``sequences`` is beyond the vocabulary of
    ``model``'s input embeddings (a tokenizer that does not belong to the model)."""
    vocab = model.get_input_embeddings().num_embeddings
    top = max((max(ids, default=0) for ids in sequences), default=0)
    if top >= vocab:
        raise ValueError(f"{name}: the tokenizer produced token id {top}, beyond the model's vocabulary of {vocab}")


def _ids(tokenizer, texts: list[str], *, special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return [*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens (a BOS, for most)."""
    return _ids(tokenizer, prompts, special=True)


def tokenize_responses(tokenizer, responses: list[str]) -> list[list[int]]:
    """Token ids of each response (completion), without special tokens, ended by EOS (when the tokenizer
    has one and the response does not end with it already): the model learns to stop."""
    return [_with_eos(ids, tokenizer.eos_token_id) for ids in _ids(tokenizer, responses, special=False)]


def _chat_ids(tokenizer, messages, **kw) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    return _ids(tokenizer, [text], special=False)[0]


def _messages_example(tokenizer, messages, where: str) -> Example:
    """Tokens of a conversation by the chat template; labels on the assistant turns only.

    The span of turn ``i`` is found by tokenizing two prefixes of the conversation: up to the
    assistant's header (``add_generation_prompt=True``) and up to the end of the turn. Both must be
    token prefixes of the whole conversation, which holds for templates that render turns one after
    another; a template that does not is reported rather than mislabelled.
    """
    if not isinstance(messages, list) or not messages:
        raise TypeError(f"{where}['messages'] must be a non-empty list of {{'role', 'content'}} dicts")
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}['messages'][{j}] must be a dict with 'role' and 'content'")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where} has 'messages' but the tokenizer has no chat_template")
    ids = _chat_ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        upto = _chat_ids(tokenizer, messages[: i + 1])
        start = len(head)
        if upto != ids[: len(upto)] or head != ids[:start] or start > len(upto):
            raise ValueError(
                f"{where}: the chat template does not render turn {i} as a token prefix of the whole "
                "conversation, so the assistant's tokens cannot be located"
            )
        labels[start : len(upto)] = ids[start : len(upto)]
    return {"input_ids": ids, "labels": labels}


def sft_examples(rows: Sequence[Mapping], tokenizer, *, max_length: int, name: str) -> list[Example]:
    """Tokenized SFT examples of ``rows`` (format by :func:`sft_format`), truncated to ``max_length``.

    The EOS token ends every completion and text, so that the model learns to stop. The first label
    of an example is always ignored: nothing in the example predicts it, and in a packed row the
    token before it belongs to another example.
    """
    fmt = sft_format(rows, name)
    eos = tokenizer.eos_token_id
    if fmt == "messages":
        examples = [_messages_example(tokenizer, row["messages"], f"{name}[{i}]") for i, row in enumerate(rows)]
    elif fmt == "prompt_completion":
        prompts = tokenize_prompts(tokenizer, [row["prompt"] for row in rows])
        completions = tokenize_responses(tokenizer, [row["completion"] for row in rows])
        examples = []
        for p, c in zip(prompts, completions, strict=True):
            examples.append({"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c})
    else:
        texts = _ids(tokenizer, [row["text"] for row in rows], special=True)
        examples = [{"input_ids": _with_eos(t, eos), "labels": _with_eos(t, eos)} for t in texts]
    for ex in examples:
        for key in ex:
            ex[key] = ex[key][:max_length]
        if ex["labels"]:
            ex["labels"][0] = IGNORE_INDEX
    return examples


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Examples concatenated in order into rows of at most ``max_length`` tokens, with
    ``position_ids`` that restart at 0 at each example (every example must fit ``max_length``)."""
    rows: list[Example] = []
    row: Example = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of max_length = {max_length}")
        if len(row["input_ids"]) + n > max_length:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id (its EOS id when it has none)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id: set tokenizer.pad_token")
    return pad


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded int64 ``[B, T]`` tensors, ``T`` the longest example: ``input_ids``, ``labels``
    (``IGNORE_INDEX`` on padding) and either ``attention_mask`` or, for packed rows,
    ``position_ids`` (the padding counts as one more sequence, after the real ones)."""
    T = max(len(ex["input_ids"]) for ex in examples)
    packed = "position_ids" in examples[0]
    ids, labels, extra = [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        ids.append(ex["input_ids"] + [pad_id] * (T - n))
        labels.append(ex["labels"] + [IGNORE_INDEX] * (T - n))
        extra.append(ex["position_ids"] + list(range(T - n)) if packed else [1] * n + [0] * (T - n))
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    batch["position_ids" if packed else "attention_mask"] = torch.tensor(extra)
    return batch


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
# {"chosen": Example, "rejected": Example}; the DPO trainer attaches its cached reference log-probs as floats
PairExample = dict[str, Example | float]


def _keep_prompt_end(prompt: list[int], keep: int, bos: int | None) -> list[int]:
    """The last ``keep`` tokens of ``prompt``, and its leading BOS (counted in ``keep``) if it has one."""
    if len(prompt) <= keep:
        return prompt
    if bos is not None and prompt[0] == bos:
        return [bos, *prompt[len(prompt) - keep + 1 :]] if keep > 1 else [bos]
    return prompt[len(prompt) - keep :]


def preference_examples(
    rows: Sequence[Mapping], tokenizer, *, max_length: int, max_prompt_length: int | None = None, name: str
) -> list[PairExample]:
    """Tokenized ``{"prompt", "chosen", "rejected"}`` rows: ``{"chosen": Example, "rejected": Example}``,
    each the prompt followed by the response and EOS, labelled on the response tokens only.

    Truncation, when the prompt and the longer response exceed ``max_length``: the prompt keeps its
    end (the tokens next to the response) and its BOS, at least ``max_prompt_length`` tokens of it
    (default ``max_length // 2``) or as many as the longer response leaves room for, and then each
    response is cut at the end. Both responses follow the same truncated prompt, and each keeps at
    least one token. A missing column, a value that is not a string, or a response with no token to
    score is an error naming the row.
    """
    for i, row in enumerate(rows):
        for col in PREFERENCE_COLUMNS:
            if col not in row:
                raise ValueError(f"{name}[{i}] is missing column {col!r} (preference data needs {PREFERENCE_COLUMNS})")
            if not isinstance(row[col], str):
                raise TypeError(f"{name}[{i}][{col!r}] must be a string, got {type(row[col]).__name__}")
    prompt_budget = max_prompt_length if max_prompt_length is not None else max_length // 2
    if not 1 <= prompt_budget < max_length:
        raise ValueError(f"max_prompt_length must be in [1, max_length = {max_length}), got {prompt_budget}")
    bos = tokenizer.bos_token_id
    prompts = tokenize_prompts(tokenizer, [row["prompt"] for row in rows])
    responses = {col: tokenize_responses(tokenizer, [row[col] for row in rows]) for col in ("chosen", "rejected")}
    examples = []
    for i, prompt in enumerate(prompts):
        pair = {col: responses[col][i] for col in responses}
        longest = max(len(ids) for ids in pair.values())
        prompt = _keep_prompt_end(prompt, max(prompt_budget, max_length - longest), bos)
        example: PairExample = {}
        for col, response in pair.items():
            labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
            # position 0 is predicted by nothing (an empty prompt without BOS)
            if all(label == IGNORE_INDEX for label in labels[1:]):
                raise ValueError(f"{name}[{i}][{col!r}] has no token to score after the prompt")
            example[col] = {"input_ids": (prompt + response)[:max_length], "labels": labels}
        examples.append(example)
    return examples
