"""Tile helpers of the fused-linear kernels (``linear_token_stats.py``, ``linear_kl.py``): a float32
``[BLOCK_N, BLOCK_V]`` logits tile ``hidden[rows] @ weight[cols].T`` built with ``tl.dot`` over ``H``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` in float32. ``UPCAST`` is for the interpreter only: Triton 3.9's interpreter
    multiplies bf16 operands as their uint16 bit patterns, so it gets exact float32 copies instead
    (bf16 -> float32 is exact, and the GPU's mma accumulates bf16 products in float32 too)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # "ieee": float32 inputs must not be rounded to tf32 (1e-5 relative is the target);
    # bf16/fp16 inputs take the tensor cores either way
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def load_rows(ptr, idx, ok, k0, H, BLOCK_H: tl.constexpr):
    """``ptr[idx, k0 : k0 + BLOCK_H]`` of a contiguous ``[*, H]`` matrix: zeros in rows not ``ok`` and past ``H``."""
    ks = k0 + tl.arange(0, BLOCK_H)
    return tl.load(ptr + idx[:, None] * H + ks[None, :], mask=ok[:, None] & (ks < H)[None, :], other=0.0)


@triton.jit
def tanh(y):
    """``tanh(y)`` in float32 from ``exp`` (the interpreter has no libdevice): ``(1 - e) / (1 + e)`` with
    ``e = exp(-2|y|)``, which cannot overflow, from ``|y| = 1/2`` (within 4 ulp there with an exact ``exp``);
    below, where ``1 - e`` would cancel, its odd series to ``y^15`` (1.4 ulp; the next term is under 2^-25)."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y2 = y * y
    series = -929569.0 / 638512875.0
    series = 21844.0 / 6081075.0 + y2 * series
    series = -1382.0 / 155925.0 + y2 * series
    series = 62.0 / 2835.0 + y2 * series
    series = -17.0 / 315.0 + y2 * series
    series = 2.0 / 15.0 + y2 * series
    series = -1.0 / 3.0 + y2 * series
    small = a * (1.0 + y2 * series)
    return tl.where(y < 0, -1.0, 1.0) * tl.where(a < 0.5, small, big)


@triton.jit
def cap_slope(x, col_ok, inv_temperature, softcap):
    """``d logits / d raw = 1 - tanh^2`` of a soft-capped tile ``x = softcap * tanh(raw / softcap) / T`` (as
    :func:`logits_tile` gives it): ``tanh`` recovered from ``x``; 0 in padded columns (``x = -inf`` there)."""
    t = x * (1.0 / (inv_temperature * softcap))  # one scalar division, not one per element
    return tl.where(col_ok[None, :], 1.0 - t * t, 0.0)


@triton.jit
def logits_tile(
    hidden_ptr,  # [N, H] contiguous
    weight_ptr,  # [V, H] contiguous
    bias_ptr,  # [V]; unused unless HAS_BIAS
    rows,  # [BLOCK_N] int64 token indices
    cols,  # [BLOCK_V] int64 vocabulary indices
    row_ok,  # [BLOCK_N] rows to read (others contribute zeros)
    col_ok,  # [BLOCK_V] cols < V
    H,
    inv_temperature,
    softcap,  # c of a final soft cap; unused unless SOFTCAP
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``x = softcap(hidden[rows] @ weight[cols].T + bias[cols]) / T`` as a float32 ``[BLOCK_N, BLOCK_V]``
    tile, ``-inf`` in padded columns (never 0: a 0 logit would carry probability mass); ``softcap(z)`` is
    ``c * tanh(z / c)`` with ``SOFTCAP`` (Gemma 2's final logit soft-capping), else ``z``."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        h = load_rows(hidden_ptr, rows, row_ok, k0, H, BLOCK_H)  # [BLOCK_N, BLOCK_H]
        w = load_rows(weight_ptr, cols, col_ok, k0, H, BLOCK_H)  # [BLOCK_V, BLOCK_H]
        acc = dot(h, tl.trans(w), acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * tanh(acc * (1.0 / softcap))
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))


def upcast_dot(hidden: torch.Tensor) -> bool:
    """Whether the kernels must upcast the dot operands: only for 16-bit inputs under the interpreter."""
    from triton.runtime.jit import JITFunction

    interpreting = not isinstance(tl.standard.max, JITFunction)
    return interpreting and hidden.dtype != torch.float32
