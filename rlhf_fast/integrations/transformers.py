"""Hugging Face ``transformers`` causal LMs through the fused-linear ops: the model is run up to its
final hidden states and its own LM head is applied chunk by chunk, so ``[tokens, vocab]`` logits are
never asked for.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from rlhf_fast.ops import linear

# What a model's own forward does to its LM head's output beyond ``hidden @ weight.T + bias``, by
# ``config.model_type`` where it differs from the common convention (``logit_scale`` multiplies, as in
# Cohere; ``final_logit_softcapping`` caps, as in Gemma 2/3): each entry mirrors the line of its
# ``...ForCausalLM.forward`` in transformers 5.x. Anything else a head does is caught by the check in lm_head.
_GRANITE = ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")
_LOGIT_SCALE = {
    **{kind: lambda c: 1.0 / c.logits_scaling for kind in _GRANITE},  # logits / logits_scaling
    "minicpm3": lambda c: 1.0 / c.logits_scaling,  # hidden / (hidden_size / dim_model_base), before the head
    "hyperclovax": lambda c: c.logits_scaling,  # logits * logits_scaling (the same name as Granite's, inverted)
    "falcon_h1": lambda c: c.lm_head_multiplier,  # logits * lm_head_multiplier
    "mpt": lambda c: None,  # declares logit_scale and never applies it
}
_SOFTCAP = {
    "gemma3": lambda c: None,  # Gemma3ForConditionalGeneration caps nothing (its text config has a cap)
    "recurrent_gemma": lambda c: c.logits_soft_cap,
    "xlstm": lambda c: c.output_logit_soft_cap,
}
# Models whose head lm_head has reproduced (weak keys: a model's entry goes with the model).
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PROBE_TOKENS = 8


def lm_head(model):
    """``(weight [V, H], bias [V] | None, logit scale | None, soft cap | None)`` of a causal LM's head.

    The logits the model's own forward computes are ``softcap(scale * (hidden @ weight.T + bias))``;
    :func:`head_inputs` turns final hidden states into the matching inputs of a ``rlhf_fast.linear_*`` op.
    The first call for a model checks this on a few tokens against the model's own logits, and raises
    if the model's head does something else (a transform before the projection as in BERT-style heads,
    a scaling or vocabulary cut this module does not know): such a model would get wrong log-probs.
    """
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (get_output_embeddings())")
    kind = getattr(model.config, "model_type", None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = _LOGIT_SCALE.get(kind, lambda c: getattr(c, "logit_scale", None))(config)
    softcap = _SOFTCAP.get(kind, lambda c: getattr(c, "final_logit_softcapping", None))(config)
    bias = getattr(head, "bias", None)
    if model not in _CHECKED:
        _check_head(model, head.weight, bias, scale, softcap)
        _CHECKED[model] = True
    return head.weight, bias, scale, softcap


def head_inputs(model, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None, float | None]:
    """``(hidden, weight, bias, softcap)`` for a ``linear_*`` op that gives the model's own logits from
    its final hidden states: the logit scale folded into ``hidden`` and ``bias``, all in the dtype the
    model's own head would compute in: ``hidden``'s, or under autocast the autocast dtype (a float32
    model's final norm returns float32 hidden states even then, while its ``lm_head`` runs in bfloat16)."""
    weight, bias, scale, softcap = lm_head(model)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    bias = None if bias is None else bias.to(hidden.dtype)
    if scale is not None and scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return hidden, weight.to(hidden.dtype), bias, softcap


def _check_head(model, weight: Tensor, bias: Tensor | None, scale: float | None, softcap: float | None) -> None:
    """Raise unless ``softcap(scale * (h @ weight.T + bias))``, with ``h`` from :func:`final_hidden_states`,
    is the model's own logits on PROBE_TOKENS fixed tokens (two forwards in eval mode, without autocast;
    the global RNG is not touched)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    # ids the input embedding takes (its size may differ from the head's)
    vocab_in = embedding.weight.shape[0] if isinstance(getattr(embedding, "weight", None), Tensor) else weight.shape[0]
    ids = (torch.arange(PROBE_TOKENS, device=weight.device) * 7919 % vocab_in)[None]  # [1, P]
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            out = model(**inputs)
            hidden = final_hidden_states(model, **inputs)  # [1, P, H]
    except Exception as e:
        raise ValueError(
            f"rlhf_fast checks that it can reproduce the logits of {type(model).__name__} from its final hidden "
            f"states and output embedding, and the model failed to run on {PROBE_TOKENS} tokens: {e}"
        ) from e
    finally:
        model.train(training)
    theirs = (out.logits if hasattr(out, "logits") else out[0]).float()  # [1, P, V]
    problem = None
    if theirs.shape != (1, PROBE_TOKENS, weight.shape[0]):
        problem = f"its logits have shape {tuple(theirs.shape)}, its head has {weight.shape[0]} outputs"
    elif hidden.shape[-1] != weight.shape[1]:
        problem = f"its final hidden states have {hidden.shape[-1]} features, its head reads {weight.shape[1]}"
    else:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):  # float32 whatever the caller's
            ours = hidden.float() @ weight.float().T
            if bias is not None:
                ours = ours + bias.float()
            if scale is not None:
                ours = ours * scale
            if softcap is not None:
                ours = softcap * torch.tanh(ours / softcap)
        # float32 agrees to ~1e-6; a 16-bit head rounds its logits to 2^-8 (bf16) relative
        rtol = 1e-4 if weight.dtype == torch.float32 else 4 * torch.finfo(weight.dtype).eps
        err = (ours - theirs).abs().max().item()
        if not err <= rtol * (1.0 + theirs.abs().max().item()):
            problem = f"they differ by up to {err:.3g} from softcap(scale * (hidden @ weight.T + bias))"
    if problem is not None:
        raise ValueError(
            f"rlhf_fast cannot reproduce the logits of {type(model).__name__} (model_type "
            f"{getattr(model.config, 'model_type', None)!r}) from its final hidden states and output embedding: "
            f"{problem}. Its LM head does more than a linear layer with a known scale or soft cap, so the fused "
            "path would give wrong log-probs; compute model(...).logits and use the rlhf_fast ops on logits instead."
        )


def backbone(model):
    """The module whose output is the hidden states the LM head reads: ``model.base_model``, after
    unwrapping a ``peft`` model with ``get_base_model()`` (its ``base_model`` is the adapter wrapper, whose
    forward would return logits; the adapters stay injected and active). Where ``base_model`` falls back to
    the model itself (a ``base_model_prefix`` naming no attribute, as in Llama 4), ``model.model``."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = model.base_model
    if body is model:
        body = getattr(model, "model", None)
        if not isinstance(body, torch.nn.Module):
            raise ValueError(f"cannot find the decoder of {type(model).__name__}: base_model is the model itself")
    return body


def _last_hidden(out) -> Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def final_hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None = None, **model_kwargs) -> Tensor:
    """``[B, T, H]`` hidden states after the model's final norm: what its LM head would read (see
    :func:`backbone`)."""
    return _last_hidden(backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs))


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
    ignored. Tied input/output embeddings and the logit scalings and soft caps of the architectures
    that have them (Cohere, Granite, Falcon-H1, MiniCPM3, Gemma 2/3, RecurrentGemma, ...) are applied as the
    model's own forward would; a head this cannot reproduce is refused (see :func:`lm_head`).

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
    hidden, weight, bias, softcap = head_inputs(
        model, final_hidden_states(model, input_ids, attention_mask, **model_kwargs)[:, :-1]
    )
    kw = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, chunk_bytes=chunk_bytes,
              softcap=softcap, backend=backend)  # fmt: skip
    targets = labels[:, 1:]
    if with_entropy:
        return linear.linear_token_logprobs_and_entropy(hidden, weight, targets, **kw)
    return linear.linear_token_logprobs(hidden, weight, targets, **kw)
