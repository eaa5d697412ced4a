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
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``x = (hidden[rows] @ weight[cols].T + bias[cols]) / T`` as a float32 ``[BLOCK_N, BLOCK_V]``
    tile, ``-inf`` in padded columns (never 0: a 0 logit would carry probability mass)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        h = load_rows(hidden_ptr, rows, row_ok, k0, H, BLOCK_H)  # [BLOCK_N, BLOCK_H]
        w = load_rows(weight_ptr, cols, col_ok, k0, H, BLOCK_H)  # [BLOCK_V, BLOCK_H]
        acc = dot(h, tl.trans(w), acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))


def upcast_dot(hidden: torch.Tensor) -> bool:
    """Whether the kernels must upcast the dot operands: only for 16-bit inputs under the interpreter."""
    from triton.runtime.jit import JITFunction

    interpreting = not isinstance(tl.standard.max, JITFunction)
    return interpreting and hidden.dtype != torch.float32
