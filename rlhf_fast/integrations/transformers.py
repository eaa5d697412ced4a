"""Hugging Face ``transformers`` causal LMs through the fused-linear ops: the model is run up to its
final hidden states and its own LM head is applied chunk by chunk, so ``[tokens, vocab]`` logits are
never asked for.
"""

from __future__ import annotations

from torch import Tensor

from rlhf_fast.ops import linear


def lm_head(model):
    """``(weight [V, H], bias [V] | None, logit scale | None, soft cap | None)`` of a causal LM's head.

    The logits the model's own forward computes are ``softcap(scale * (hidden @ weight.T + bias))``:
    feed ``weight``/``bias`` to a ``rlhf_fast.linear_*`` op with ``hidden * scale`` and ``softcap=``.
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (get_output_embeddings())")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)  # Cohere: logits = lm_head(h) * logit_scale
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
    return head.weight, getattr(head, "bias", None), scale, softcap


def final_hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None = None, **model_kwargs) -> Tensor:
    """``[B, T, H]`` hidden states after the model's final norm: what its LM head would read.

    A ``peft`` model is unwrapped with ``get_base_model()`` first (its ``base_model`` is the adapter
    wrapper, whose forward would return logits); the adapters stay injected and active."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def lm_head_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    chunk_bytes: int | None = None,
    backend=None,
    **model_kwargs,
):
    """Next-token log-probs of a ``transformers`` causal LM, without materializing its logits.

    Position ``t`` of the result is ``log p(labels[:, t + 1] | tokens[:, : t + 1])`` (the usual shift
    of causal LM training). ``labels`` default to ``input_ids`` with padding (``attention_mask == 0``)
    ignored. Tied input/output embeddings, Cohere's ``logit_scale`` and Gemma's
    ``final_logit_softcapping`` are applied as the model's own forward would.

    Args:
        model: a ``PreTrainedModel`` with a causal-LM head (``get_output_embeddings()``).
        input_ids: ``[B, T]``; attention_mask: ``[B, T]`` or None.
        labels: ``[B, T]`` with ``ignore_index`` on positions to skip (prompt, padding), or None.
        temperature: divide the logits by it (match the sampling temperature).
        with_entropy: also return the entropy of each next-token distribution.
        chunk_bytes, backend: see :func:`rlhf_fast.linear_token_logprobs`.
        model_kwargs: passed to the base model (e.g. ``position_ids``).

    Returns:
        ``[B, T - 1]`` float32 log-probs (0 where ignored), or ``(logp, entropy)`` with ``with_entropy``.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    elif isinstance(labels, Tensor) and labels.shape != input_ids.shape:
        # checked here, before the model runs, and in the caller's shapes (the op sees them shifted)
        raise ValueError(
            f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
        )
    hidden = final_hidden_states(model, input_ids, attention_mask, **model_kwargs)[:, :-1]
    weight, bias, scale, softcap = lm_head(model)
    if scale is not None and scale != 1.0:
        hidden = hidden * scale
    kw = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, chunk_bytes=chunk_bytes,
              softcap=softcap, backend=backend)  # fmt: skip
    targets = labels[:, 1:]
    if with_entropy:
        return linear.linear_token_logprobs_and_entropy(hidden, weight.to(hidden.dtype), targets, **kw)
    return linear.linear_token_logprobs(hidden, weight.to(hidden.dtype), targets, **kw)
