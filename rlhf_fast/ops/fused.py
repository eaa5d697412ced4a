"""Gradient in the forward pass: for losses whose per-token upstream gradient is known as soon as
the token's own statistics are (cross entropy with a mean/sum reduction, PPO), the forward pass
writes ``d loss / d logits`` while each row is still in cache — two passes over the logits in total
instead of three — and the backward pass only scales it by the incoming gradient.

With ``inplace_backward=True`` the gradient overwrites the logits buffer itself, so no
``[tokens, vocab]`` tensor is allocated at all; the logits are destroyed, and autograd's version
counter makes any other use of them in the backward pass an error rather than a silent wrong answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast.ops import _custom


class _AttachGradient(torch.autograd.Function):
    """``loss`` (computed without autograd) with ``d loss / d logits = grad`` precomputed."""

    @staticmethod
    def forward(ctx, logits: Tensor, loss: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = forward_gradients(ctx, grad_output)
        return grad, None, None


def forward_gradients(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients a forward pass computed and saved, scaled in place by the 0-d ``grad_output``.

    In place because the buffers are ours (or the caller gave up the logits for them): a scaled copy
    would hold a second gradient at the peak. Skipping the pass when ``grad_output == 1`` needs its
    value: free on CPU, a sync on GPU, so only on CPU. Once scaled, the buffers were handed to autograd
    as they are, so a second backward through the same graph (``retain_graph=True``) is refused with
    this explanation rather than autograd's message about a tensor modified in place.
    """
    if getattr(ctx, "scaled", False):
        raise RuntimeError(
            "this rlhf_fast loss computed its gradient in the forward pass, and the first backward scaled "
            "that buffer in place by its incoming gradient (no second [tokens, vocab] copy), so a second "
            "backward through the same graph (retain_graph=True) cannot reuse it: compute the loss again"
        )
    grads = ctx.saved_tensors
    if torch.compiler.is_compiling() or grad_output.device.type != "cpu" or grad_output.item() != 1.0:
        ctx.scaled = True
        for grad in grads:
            if grad is not None:
                grad.mul_(grad_output)  # in float32, rounded once to the gradient dtype
    return grads


def stats_with_gradient(
    logits: Tensor,
    rows: Tensor,
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    *,
    with_entropy: bool,
    with_mean_logp: bool,
    mode: int,
    coefs: Tensor,
    params: list[float],
    inplace: bool,
    backend: str,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """Run ``token_stats_fused`` on ``rows`` (the ``[A, B, V]`` view of ``logits``).

    Returns the per-row outputs of ``token_stats_fwd`` and the gradient as a tensor shaped like
    ``logits``, to hand to :func:`attach_gradient`.
    """
    with torch.no_grad():
        if inplace:
            target = rows.detach()
            outputs = _custom.token_stats_fused_(
                target, labels, temperature, ignore_index, with_entropy, with_mean_logp, mode, coefs, params, backend
            )
            grad = logits.detach()
        else:
            *outputs, grad = _custom.token_stats_fused(
                rows, labels, temperature, ignore_index, with_entropy, with_mean_logp, mode, coefs, params, backend
            )
            outputs, grad = tuple(outputs), grad.view(logits.shape)
    return outputs, grad


def attach_gradient(logits: Tensor, loss: Tensor, grad: Tensor) -> Tensor:
    """Make ``loss`` differentiable with respect to ``logits``, with gradient ``grad``."""
    if not logits.requires_grad:
        return loss
    return _AttachGradient.apply(logits, loss, grad)
