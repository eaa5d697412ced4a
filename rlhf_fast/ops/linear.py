"""Fused-linear forms: hidden states and the LM-head weight in, the ``[tokens, vocab]`` logits never
held whole.

This module is the chunked path (CPU, and any backend): tokens are processed in chunks whose logits
fit a memory budget; each chunk is one matmul through PyTorch's BLAS followed by the per-token
kernel of the chosen backend. The backward pass recomputes each chunk's logits, asks the kernel for
their gradient, and accumulates ``dW`` (and ``db``) in float32 across chunks, casting once at the end.
Peak extra memory is a few chunks, whatever the vocabulary and token counts.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_fast import _dispatch
from rlhf_fast import _validate as v
from rlhf_fast.ops import _custom

DEFAULT_CHUNK_BYTES = 64 * 2**20
CHUNK_ENV_VAR = "RLHF_FAST_CHUNK_BYTES"


def _chunk_rows(n_rows: int, vocab: int, elem_bytes: int, chunk_bytes: int | None) -> int:
    """Tokens per chunk so that its logits, their gradient and float32 temporaries fit the budget."""
    if chunk_bytes is None:
        chunk_bytes = int(os.environ.get(CHUNK_ENV_VAR, DEFAULT_CHUNK_BYTES))
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    per_row = vocab * (2 * elem_bytes + 4)  # logits chunk + its gradient + a float32 copy for dW
    return max(1, min(n_rows, chunk_bytes // per_row))


class _LinearTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, with_logp, with_entropy, rows, backend):
        # hidden: [N, H], weight: [V, H], bias: [V] or None, labels: [N] or None
        N = hidden.shape[0]
        outs = [
            torch.empty(N if w else 0, dtype=torch.float32, device=hidden.device) for w in (with_logp, with_entropy)
        ]
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        for r0 in range(0, N, rows):
            sl = slice(r0, min(r0 + rows, N))
            logits = F.linear(hidden[sl], weight, bias)[None]  # [1, n, V]
            lab = labels[sl] if labels is not None else None
            logp, ent, lse[sl], _ = _custom.token_stats_fwd(
                logits, lab, temperature, ignore_index, with_logp, with_entropy, False, backend
            )
            for out, val, wanted in ((outs[0], logp, with_logp), (outs[1], ent, with_entropy)):
                if wanted:
                    out[sl] = val
        ctx.save_for_backward(hidden, weight, bias, labels, lse, outs[1] if with_entropy else None)
        ctx.args = (temperature, ignore_index, with_logp, with_entropy, rows, backend)
        ctx.mark_non_differentiable(*(o for o, w in zip(outs, (with_logp, with_entropy), strict=True) if not w))
        return outs[0], outs[1]

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, with_logp, with_entropy, rows, backend = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_logp = grad_logp.contiguous() if with_logp and grad_logp is not None else None
        grad_entropy = grad_entropy.contiguous() if with_entropy and grad_entropy is not None else None
        N = hidden.shape[0]
        d_hidden = torch.empty_like(hidden) if need_h else None
        # float32 accumulation across chunks (bf16 accumulation of dW drifts), cast once at the end
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for r0 in range(0, N, rows):
            sl = slice(r0, min(r0 + rows, N))
            logits = F.linear(hidden[sl], weight, bias)[None]
            g_logits = _custom.token_stats_bwd(
                logits,
                labels[sl] if labels is not None else None,
                lse[sl],
                entropy[sl] if entropy is not None else None,
                grad_logp[sl] if grad_logp is not None else None,
                grad_entropy[sl] if grad_entropy is not None else None,
                None,
                temperature,
                ignore_index,
                backend,
            )[0]  # [n, V] in the logits' dtype
            if need_h:
                d_hidden[sl] = g_logits @ weight
            if need_w:
                d_weight.addmm_(g_logits.T.float(), hidden[sl].float())
            if need_b:
                d_bias += g_logits.float().sum(0)
        d_weight = d_weight.to(weight.dtype) if need_w else None
        d_bias = d_bias.to(bias.dtype) if need_b else None
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None


def _linear_stats(
    hidden, weight, labels, bias, temperature, ignore_index, with_logp, with_entropy, chunk_bytes, backend
):
    v.check_logits(hidden, "hidden")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {shape}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    v.check_same_device(weight, hidden, "weight", "hidden")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}]")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        v.check_same_device(bias, hidden, "bias", "hidden")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    lead = hidden.shape[:-1]
    flat = None
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype not in v.LABEL_DTYPES:
            raise TypeError("labels must be an int64 or int32 tensor")
        if labels.shape != lead:
            raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(lead)}, got {tuple(labels.shape)}")
        v.check_same_device(labels, hidden, "labels", "hidden")
        flat = v.flat_labels(labels)
    temperature = v.check_temperature(temperature)
    ignore_index = v.check_ignore_index(ignore_index)
    backend = _dispatch.resolve(backend, hidden.device)
    h2d = hidden.reshape(-1, hidden.shape[-1])
    rows = _chunk_rows(h2d.shape[0], weight.shape[0], hidden.element_size(), chunk_bytes)
    logp, ent = _LinearTokenStats.apply(
        h2d, weight, bias, flat, temperature, ignore_index, with_logp, with_entropy, rows, backend
    )
    return (logp.view(lead) if with_logp else None), (ent.view(lead) if with_entropy else None)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_bytes: int | None = None,
    backend=None,
) -> Tensor:
    """:func:`rlhf_fast.token_logprobs` of ``logits = hidden @ weight.T + bias``, without the logits.

    Args:
        hidden: ``[..., H]`` final hidden states, float32, bfloat16 or float16.
        weight: ``[V, H]`` LM-head weight, same dtype; bias: optional ``[V]``.
        labels: ``[...]`` int64 or int32 in ``[0, V)`` or ``ignore_index``.
        chunk_bytes: memory budget of one chunk of logits (default 64 MiB, or ``RLHF_FAST_CHUNK_BYTES``).
        temperature, ignore_index, backend: as in :func:`rlhf_fast.token_logprobs`.

    Returns:
        ``[...]`` float32; gradients flow to ``hidden``, ``weight`` and ``bias`` (``dW`` and ``db``
        accumulated in float32 across chunks).
    """
    logp, _ = _linear_stats(hidden, weight, labels, bias, temperature, ignore_index, True, False, chunk_bytes, backend)
    return logp


def linear_token_entropy(
    hidden: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    backend=None,
) -> Tensor:
    """:func:`rlhf_fast.token_entropy` of ``hidden @ weight.T + bias``; arguments as in
    :func:`linear_token_logprobs`. Returns ``[...]`` float32."""
    _, ent = _linear_stats(hidden, weight, None, bias, temperature, -100, False, True, chunk_bytes, backend)
    return ent


def linear_token_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_bytes: int | None = None,
    backend=None,
) -> tuple[Tensor, Tensor]:
    """Both, from one pass over each chunk of logits; 0 at ignored positions. Arguments as in
    :func:`linear_token_logprobs`."""
    return _linear_stats(hidden, weight, labels, bias, temperature, ignore_index, True, True, chunk_bytes, backend)
