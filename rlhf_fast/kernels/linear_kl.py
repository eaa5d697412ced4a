"""Exact per-token ``KL(P || Q)`` of two linear heads, ``P = softmax((h_p @ W_p.T + b_p) / T)`` and
``Q = softmax((h_q @ W_q.T + b_q) / T)`` over a shared vocabulary, without ever holding either
``[N, V]`` logits tensor (a student head and a teacher or reference head).

Forward: one program per tile of ``BLOCK_N`` tokens (and split of the vocabulary, as in
``linear_token_stats.py``; the host merges the splits) walks the vocabulary in tiles of ``BLOCK_V``
columns; each step builds both logits tiles with ``tl.dot`` (``H_p`` and ``H_q`` may differ) and
merges them into two online log-sum-exps (maxima ``m_p``, ``m_q``, sums ``s_p``, ``s_q``) and the running
``a = sum_v exp(x_p - m_p) ((x_p - m_p) - (x_q - m_q))``:

    KL = a / s_p - (log s_p - log s_q)

Each side is taken against its own max: ``x_p - x_q`` would round to float32's ulp at the logits' magnitude
(5e-4 at 5500, between logits of +3000 and -2500) before the ``lse_p - lse_q`` that cancels it is taken off,
while ``x - m`` is exact next to the max. The log-sum-exps are returned in float64 for the backward.

Backward, with ``p``, ``q`` recomputed per tile and ``g`` the incoming per-token gradient::

    d KL / d x_p = p (log p - log q - KL)          d KL / d x_q = q - p          (both / T)

pushed through each head as in ``linear_token_stats.py``: ``_linear_kl_dh_kernel`` owns a token tile
and accumulates ``dH_p``/``dH_q``; ``_linear_kl_dw_kernel`` owns a vocabulary tile and accumulates
``dW_p``/``dW_q`` (and the biases' gradients), all in float32 buffers only that program touches, cast
once at the end. Padded columns are ``-inf`` on both sides and contribute nothing; a column where
``P`` puts no mass (``x_p = -inf``) contributes nothing to the KL. Each side's float64 ``lse`` comes as
a float32 reference ``hi`` inside the row's logits and a float64 rest (``_softmax_row.centred_lse``): ``x - hi``
is exact next to the max and on near-uniform rows, and the rest goes into per-row factors (see
``_kl_grad_tiles``).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, AotSpec, TileConfig, aot_spec, empty_f32, on_tensor_device
from ._linear_tile import dot, load_rows, logits_tile, upcast_dot
from ._softmax_row import centred_lse
from .linear_token_stats import rescale_splits, vocabulary_splits

__all__ = ["CONFIGS", "aot_specs", "linear_kl_bwd", "linear_kl_fwd"]

# (forward, dH, dW) tiles per dtype. Two heads double the live logits tiles of linear_token_stats.py: the
# forward keeps two 64 x 64 float32 tiles (the registers of that file's one 64 x 128). The backward kernels
# read and write their float32 accumulators once per logits tile, as there (see its CONFIGS): dH takes
# 32 tokens x 128 columns, dW 128 tokens x 32 columns, each 8 warps, single-staged, H steps of 16 (bf16/fp16;
# 89-145 registers, no spills on sm_80 and sm_90), 64 FLOPs per accumulator byte where the 16 x 64 tile both
# used before gave dH 32 and dW 8; two-staged or with more columns (dH) or tokens (dW) they spill. Chosen by
# that arithmetic and the register report, not timed (no GPU). float32 (exact FMA dot): dH 32 x 32 (16 x 32
# spilled 4 B on sm_90 once dH took vocabulary splits), dW 16 x 32; the forward's 32 x 32 tile over 4 warps
# spilled; 32 x 64 over 8 warps does not (two-staged: single-staged, the vocabulary split's bounds cost the
# variant with both biases 12 B of spill on sm_90).
_TILES_16BIT = (
    TileConfig(block_n=64, block_v=64, block_h=64, num_warps=8, num_stages=3),
    TileConfig(block_n=32, block_v=128, block_h=16, num_warps=8, num_stages=1),
    TileConfig(block_n=128, block_v=32, block_h=16, num_warps=8, num_stages=1),
)
CONFIGS: dict[torch.dtype, tuple[TileConfig, TileConfig, TileConfig]] = {
    torch.bfloat16: _TILES_16BIT,
    torch.float16: _TILES_16BIT,
    torch.float32: (
        TileConfig(block_n=32, block_v=64, block_h=16, num_warps=8, num_stages=2),
        TileConfig(block_n=32, block_v=32, block_h=16, num_warps=8, num_stages=1),
        # maxnreg: left to ptxas, sm_90 held it to 64 registers and spilled 4 B once the backward took each
        # side's lse against a reference inside the row (centred_lse), as linear_token_stats.py's float32 dW
        TileConfig(block_n=16, block_v=32, block_h=16, num_warps=8, num_stages=1, maxnreg=128),
    ),
}


@triton.jit
def _both_tiles(
    p_hidden_ptr, p_weight_ptr, p_bias_ptr, q_hidden_ptr, q_weight_ptr, q_bias_ptr,
    rows, cols, row_ok, col_ok, H_P, H_Q, inv_temperature,
    HAS_P_BIAS: tl.constexpr, HAS_Q_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """``(x_p, x_q)``: both heads' float32 logits tiles over ``T``, ``-inf`` in padded columns."""
    x_p = logits_tile(
        p_hidden_ptr, p_weight_ptr, p_bias_ptr, rows, cols, row_ok, col_ok, H_P, inv_temperature, 1.0,
        HAS_P_BIAS, False, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
    )  # fmt: skip
    x_q = logits_tile(
        q_hidden_ptr, q_weight_ptr, q_bias_ptr, rows, cols, row_ok, col_ok, H_Q, inv_temperature, 1.0,
        HAS_Q_BIAS, False, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
    )  # fmt: skip
    return x_p, x_q


@triton.jit
def _kl_grad_tiles(x_p, x_q, row_ok, hi_p, hi_q, kl_lo, coef_p, coef_q):
    """``(g_p, g_q)``: ``g * d KL / d x`` for both tiles, float32, 0 where a side has no mass and in rows
    past ``N``; per-row inputs from :func:`_row_inputs`.

    With ``u = x - hi``: ``g p = coef_p exp(u_p)``, ``g q = coef_q exp(u_q)`` and
    ``log p - log q - KL = u_p - u_q - kl_lo``. Five float32 per row, where each side's ``(hi, rest)``, ``KL``
    and ``g`` would be six: with six, the dH kernel spilled (float32 on sm_80 and sm_90, 16-bit on sm_90), and
    so did the float32 dW kernel on sm_90."""
    u_p = x_p - hi_p[:, None]
    u_q = x_q - hi_q[:, None]
    e_p = tl.exp(u_p)
    # p = 0 where x_p = -inf: its term is 0, not 0 * (-inf - ...)
    g_p = tl.where(x_p == float("-inf"), 0.0, coef_p[:, None] * e_p * (u_p - u_q - kl_lo[:, None]))
    # Rows past N were computed from zero hidden states with lse = +inf and g = 0: their g_q is 0 * 0 as it
    # stands (one select per element fewer, which the float32 dH kernel with only g_q needs to stay clear of
    # spills on sm_80); their g_p (-inf - -inf in u_p - u_q) is discarded.
    g_q = coef_q[:, None] * tl.exp(u_q) - coef_p[:, None] * e_p
    return tl.where(row_ok[:, None], g_p, 0.0), g_q


@triton.jit
def _row_inputs(lse_p_ptr, lse_q_ptr, kl_ptr, grad_ptr, rows, N, V, inv_temperature):
    """``(row_ok, hi_p, hi_q, kl_lo, coef_p, coef_q)`` of token indices ``rows``, for :func:`_kl_grad_tiles`:
    each side's ``lse = hi + rest`` against a reference inside the row's logits (``centred_lse``: on near-uniform
    rows ``u = x - float32(lse)`` would be ~-log V on both sides, their roundings most of ``u_p - u_q``),
    ``kl_lo = KL + rest_p - rest_q`` (from float64) and ``coef = g / T * exp(-rest)``. Rows past ``N`` get
    ``lse = +inf`` (``rest = 0``) and ``g = 0``."""
    row_ok = rows < N
    log_v = tl.log(V * 1.0).to(tl.float64)
    hi_p, rest_p, scale_p = centred_lse(tl.load(lse_p_ptr + rows, mask=row_ok, other=float("inf")), log_v)
    hi_q, rest_q, scale_q = centred_lse(tl.load(lse_q_ptr + rows, mask=row_ok, other=float("inf")), log_v)
    kl = tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0) * inv_temperature
    kl_lo = (kl.to(tl.float64) + (rest_p - rest_q)).to(tl.float32)
    return row_ok, hi_p, hi_q, kl_lo, g * scale_p, g * scale_q


@triton.jit
def _linear_kl_fwd_kernel(
    # pointers
    p_hidden_ptr,  # [N, H_P] contiguous
    p_weight_ptr,  # [V, H_P] contiguous
    p_bias_ptr,  # [V]; unused unless HAS_P_BIAS
    q_hidden_ptr,  # [N, H_Q] contiguous
    q_weight_ptr,  # [V, H_Q] contiguous
    q_bias_ptr,  # [V]; unused unless HAS_Q_BIAS
    # out, [splits, N] float32 each: each split's online log-sum-exp states (see below)
    m_p_ptr,
    s_p_ptr,
    a_ptr,
    m_q_ptr,
    s_q_ptr,
    # sizes
    N,
    H_P,
    H_Q,
    V,
    v_per_split,  # vocabulary columns per split, a multiple of BLOCK_V
    # runtime scalars
    inv_temperature,
    # constexpr: feature switches and block sizes
    HAS_P_BIAS: tl.constexpr,
    HAS_Q_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only, see _linear_tile.dot
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # program (i, s): token tile i against split s of the vocabulary (linear_token_stats.vocabulary_splits)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ok = rows < N
    # online log-sum-exp of each side (m the running max, s = sum exp(x - m)), and
    # a = sum exp(x_p - m_p) ((x_p - m_p) - (x_q - m_q)), each side against its own max (see the module doc)
    m_p = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m_q = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_p = tl.zeros([BLOCK_N], tl.float32)
    s_q = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.float32)
    v_start = split * v_per_split
    for v0 in range(v_start, tl.minimum(v_start + v_per_split, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        x_p, x_q = _both_tiles(
            p_hidden_ptr, p_weight_ptr, p_bias_ptr, q_hidden_ptr, q_weight_ptr, q_bias_ptr,
            rows, cols, row_ok, cols < V, H_P, H_Q, inv_temperature,
            HAS_P_BIAS, HAS_Q_BIAS, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        # the new maxima are the references; while a row has seen only -inf, 0 is (exp(-inf - -inf) would be NaN)
        m_p_new = tl.maximum(m_p, tl.max(x_p, axis=1))
        m_q_new = tl.maximum(m_q, tl.max(x_q, axis=1))
        ref_p = tl.where(m_p_new == float("-inf"), 0.0, m_p_new)
        ref_q = tl.where(m_q_new == float("-inf"), 0.0, m_q_new)
        d_p = x_p - ref_p[:, None]
        d_q = x_q - ref_q[:, None]
        e_p = tl.exp(d_p)
        alpha_p = tl.exp(m_p - ref_p)
        # moving the references shifts every (x_p - m_p) - (x_q - m_q) summed so far by this much
        shift = tl.where(m_p == float("-inf"), 0.0, m_p - ref_p) - tl.where(m_q == float("-inf"), 0.0, m_q - ref_q)
        a = alpha_p * (a + shift * s_p) + tl.sum(tl.where(x_p == float("-inf"), 0.0, e_p * (d_p - d_q)), axis=1)
        s_p = alpha_p * s_p + tl.sum(e_p, axis=1)
        s_q = tl.exp(m_q - ref_q) * s_q + tl.sum(tl.exp(d_q), axis=1)
        m_p = m_p_new
        m_q = m_q_new

    at = split.to(tl.int64) * N + rows
    tl.store(m_p_ptr + at, m_p, mask=row_ok)
    tl.store(s_p_ptr + at, s_p, mask=row_ok)
    tl.store(a_ptr + at, a, mask=row_ok)
    tl.store(m_q_ptr + at, m_q, mask=row_ok)
    tl.store(s_q_ptr + at, s_q, mask=row_ok)


def _merge_splits(m_p, s_p, a, m_q, s_q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, lse_p, lse_q)`` [N] from the forward kernel's per-split states ``[splits, N]``: ``kl`` float32, the
    log-sum-exps float64 (the sums of the float32 maxima and log-sums, exact).

    Each split's sums are rescaled to the row's maxima and its ``a`` shifted to them, as between the vocabulary
    tiles of one program; a side that saw only ``-inf`` in a split adds no shift (not ``-inf``)."""
    big_p, alpha_p = rescale_splits(m_p)
    big_q, alpha_q = rescale_splits(m_q)
    shift = torch.where(m_p == float("-inf"), 0.0, m_p - big_p) - torch.where(m_q == float("-inf"), 0.0, m_q - big_q)
    total_p = (alpha_p * s_p).sum(0)
    log_sp = torch.log(total_p)
    log_sq = torch.log((alpha_q * s_q).sum(0))
    kl = (alpha_p * (a + shift * s_p)).sum(0) / total_p - (log_sp - log_sq)
    return kl, big_p.double() + log_sp.double(), big_q.double() + log_sq.double()


@triton.jit
def _accumulate_dh(dh_ptr, g, weight_ptr, rows, cols, row_ok, col_ok, H, UPCAST: tl.constexpr, BLOCK_H: tl.constexpr):
    """``dh[rows] += g @ weight[cols]`` in ``BLOCK_H`` slices of ``H`` (float32 ``dh``)."""
    ks = tl.arange(0, BLOCK_H)
    g = g.to(weight_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_H):
        w = load_rows(weight_ptr, cols, col_ok, k0, H, BLOCK_H)
        ptrs = dh_ptr + rows[:, None] * H + (k0 + ks)[None, :]
        mask = row_ok[:, None] & ((k0 + ks) < H)[None, :]
        tl.store(ptrs, dot(g, w, tl.load(ptrs, mask=mask, other=0.0), UPCAST), mask=mask)


@triton.jit
def _accumulate_dw(dw_ptr, g, hidden_ptr, rows, cols, row_ok, col_ok, H, UPCAST: tl.constexpr, BLOCK_H: tl.constexpr):
    """``dw[cols] += g.T @ hidden[rows]`` in ``BLOCK_H`` slices of ``H`` (float32 ``dw``)."""
    ks = tl.arange(0, BLOCK_H)
    g_t = tl.trans(g.to(hidden_ptr.dtype.element_ty))  # [BLOCK_V, BLOCK_N]
    for k0 in range(0, H, BLOCK_H):
        h = load_rows(hidden_ptr, rows, row_ok, k0, H, BLOCK_H)
        ptrs = dw_ptr + cols[:, None] * H + (k0 + ks)[None, :]
        mask = col_ok[:, None] & ((k0 + ks) < H)[None, :]
        tl.store(ptrs, dot(g_t, h, tl.load(ptrs, mask=mask, other=0.0), UPCAST), mask=mask)


@triton.jit
def _linear_kl_dh_kernel(
    # pointers
    p_hidden_ptr, p_weight_ptr, p_bias_ptr,  # as in the forward
    q_hidden_ptr, q_weight_ptr, q_bias_ptr,
    kl_ptr, lse_p_ptr, lse_q_ptr,  # [N] from the forward: float32, float64, float64
    grad_ptr,  # [N] float32 incoming gradient of the KL
    dh_p_ptr,  # [splits, N, H_P] float32 in/out, zero-initialized; unused unless NEED_P
    dh_q_ptr,  # [splits, N, H_Q] float32 in/out, zero-initialized; unused unless NEED_Q
    # sizes
    N, H_P, H_Q, V,
    v_per_split,  # vocabulary columns per split, a multiple of BLOCK_V
    # runtime scalars
    inv_temperature,
    # constexpr: feature switches and block sizes
    HAS_P_BIAS: tl.constexpr, HAS_Q_BIAS: tl.constexpr,
    NEED_P: tl.constexpr, NEED_Q: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # program (i, s): token tile i against split s of the vocabulary, into split s's own partials (the host sums them)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ok, hi_p, hi_q, kl_lo, coef_p, coef_q = _row_inputs(
        lse_p_ptr, lse_q_ptr, kl_ptr, grad_ptr, rows, N, V, inv_temperature
    )
    dh_p_ptr += split.to(tl.int64) * N * H_P
    dh_q_ptr += split.to(tl.int64) * N * H_Q
    v_start = split * v_per_split
    for v0 in range(v_start, tl.minimum(v_start + v_per_split, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        x_p, x_q = _both_tiles(
            p_hidden_ptr, p_weight_ptr, p_bias_ptr, q_hidden_ptr, q_weight_ptr, q_bias_ptr,
            rows, cols, row_ok, col_ok, H_P, H_Q, inv_temperature,
            HAS_P_BIAS, HAS_Q_BIAS, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        g_p, g_q = _kl_grad_tiles(x_p, x_q, row_ok, hi_p, hi_q, kl_lo, coef_p, coef_q)
        if NEED_P:
            _accumulate_dh(dh_p_ptr, g_p, p_weight_ptr, rows, cols, row_ok, col_ok, H_P, UPCAST, BLOCK_H)
        if NEED_Q:
            _accumulate_dh(dh_q_ptr, g_q, q_weight_ptr, rows, cols, row_ok, col_ok, H_Q, UPCAST, BLOCK_H)


@triton.jit
def _linear_kl_dw_kernel(
    # pointers
    p_hidden_ptr, p_weight_ptr, p_bias_ptr,  # as in the forward
    q_hidden_ptr, q_weight_ptr, q_bias_ptr,
    kl_ptr, lse_p_ptr, lse_q_ptr,  # [N] from the forward: float32, float64, float64
    grad_ptr,  # [N] float32 incoming gradient of the KL
    dw_p_ptr,  # [V, H_P] float32 in/out, zero-initialized; unused unless NEED_P_WEIGHT
    dw_q_ptr,  # [V, H_Q] float32 in/out, zero-initialized; unused unless NEED_Q_WEIGHT
    db_p_ptr,  # [V] out, p_bias dtype; unused unless NEED_P_BIAS
    db_q_ptr,  # [V] out, q_bias dtype; unused unless NEED_Q_BIAS
    # sizes
    N, H_P, H_Q, V,
    # runtime scalars
    inv_temperature,
    # constexpr: feature switches and block sizes
    HAS_P_BIAS: tl.constexpr, HAS_Q_BIAS: tl.constexpr,
    NEED_P_WEIGHT: tl.constexpr, NEED_Q_WEIGHT: tl.constexpr, NEED_P_BIAS: tl.constexpr, NEED_Q_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    db_p = tl.zeros([BLOCK_V], tl.float32)
    db_q = tl.zeros([BLOCK_V], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok, hi_p, hi_q, kl_lo, coef_p, coef_q = _row_inputs(
            lse_p_ptr, lse_q_ptr, kl_ptr, grad_ptr, rows, N, V, inv_temperature
        )
        x_p, x_q = _both_tiles(
            p_hidden_ptr, p_weight_ptr, p_bias_ptr, q_hidden_ptr, q_weight_ptr, q_bias_ptr,
            rows, cols, row_ok, col_ok, H_P, H_Q, inv_temperature,
            HAS_P_BIAS, HAS_Q_BIAS, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        g_p, g_q = _kl_grad_tiles(x_p, x_q, row_ok, hi_p, hi_q, kl_lo, coef_p, coef_q)
        if NEED_P_BIAS:
            db_p += tl.sum(g_p, axis=0)
        if NEED_Q_BIAS:
            db_q += tl.sum(g_q, axis=0)
        if NEED_P_WEIGHT:
            _accumulate_dw(dw_p_ptr, g_p, p_hidden_ptr, rows, cols, row_ok, col_ok, H_P, UPCAST, BLOCK_H)
        if NEED_Q_WEIGHT:
            _accumulate_dw(dw_q_ptr, g_q, q_hidden_ptr, rows, cols, row_ok, col_ok, H_Q, UPCAST, BLOCK_H)
    if NEED_P_BIAS:
        tl.store(db_p_ptr + cols, db_p.to(db_p_ptr.dtype.element_ty), mask=col_ok)
    if NEED_Q_BIAS:
        tl.store(db_q_ptr + cols, db_q.to(db_q_ptr.dtype.element_ty), mask=col_ok)


def _check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}_hidden [N, H] and {name}_weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if not (hidden.is_contiguous() and weight.is_contiguous() and (bias is None or bias.is_contiguous())):
        raise ValueError(f"{name}_hidden, {name}_weight and {name}_bias must be contiguous")


def _check(p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias) -> tuple[int, int]:
    _check_head("p", p_hidden, p_weight, p_bias)
    _check_head("q", q_hidden, q_weight, q_bias)
    if q_hidden.shape[0] != p_hidden.shape[0] or q_weight.shape[0] != p_weight.shape[0]:
        raise ValueError("both heads must have the same tokens N and vocabulary V")
    dtypes = {t.dtype for t in (p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias) if t is not None}
    if len(dtypes) != 1:
        raise TypeError(f"every input must have one dtype, got {sorted(map(str, dtypes))}")
    return p_hidden.shape[0], p_weight.shape[0]


@on_tensor_device
def linear_kl_fwd(
    p_hidden: torch.Tensor,
    p_weight: torch.Tensor,
    p_bias: torch.Tensor | None,
    q_hidden: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    temperature: float,
    *,
    config: TileConfig | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(KL(P || Q), lse_p, lse_q)``, ``[N]``: the KL float32, the log-sum-exps float64 (for the
    backward, see ``_softmax_row.split_lse``).

    Args:
        p_hidden: ``[N, H_P]``; p_weight: ``[V, H_P]``; p_bias: ``[V]`` or None; likewise ``q_*``
            with its own ``H_Q``. All contiguous, one dtype (float32/bfloat16/float16).
        temperature: both heads' logits are divided by it.
        config: force the tile sizes (tests use small ones so that several tiles occur).
        splits: force the number of vocabulary splits of the token tiles (tests; see
            ``linear_token_stats.vocabulary_splits``).
    """
    n_rows, vocab = _check(p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias)
    device = p_hidden.device
    if n_rows == 0:
        return empty_f32(device), *(torch.empty(0, dtype=torch.float64, device=device) for _ in range(2))
    config = config or CONFIGS[p_hidden.dtype][0]
    n_splits, v_per_split = vocabulary_splits(n_rows, vocab, config, device, splits)
    state = torch.empty((5, n_splits, n_rows), dtype=torch.float32, device=device)  # m_p, s_p, a, m_q, s_q
    # switched-off pointers are never touched; the state stands in for them
    _linear_kl_fwd_kernel[(triton.cdiv(n_rows, config.block_n), n_splits)](
        p_hidden, p_weight, state if p_bias is None else p_bias,
        q_hidden, q_weight, state if q_bias is None else q_bias, *state,
        n_rows, p_hidden.shape[1], q_hidden.shape[1], vocab, v_per_split,
        1.0 / temperature,
        HAS_P_BIAS=p_bias is not None, HAS_Q_BIAS=q_bias is not None, UPCAST=upcast_dot(p_hidden),
        **config.launch(),
    )  # fmt: skip
    return _merge_splits(*state)


@on_tensor_device
def linear_kl_bwd(
    p_hidden: torch.Tensor,
    p_weight: torch.Tensor,
    p_bias: torch.Tensor | None,
    q_hidden: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    kl: torch.Tensor,
    lse_p: torch.Tensor,
    lse_q: torch.Tensor,
    grad_kl: torch.Tensor,
    temperature: float,
    need: tuple[bool, bool, bool, bool, bool, bool],
    *,
    config: TileConfig | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``sum_n grad_kl[n] KL[n]`` w.r.t. ``(p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias)``.

    Args:
        the heads and ``temperature``: as in :func:`linear_kl_fwd`; kl, lse_p, lse_q: its outputs.
        grad_kl: ``[N]`` float32 incoming gradient.
        need: which of the six gradients to compute (a bias's needs that bias).
        config: force the tile sizes (tests); splits: force the vocabulary splits of the dH kernel's token tiles
            (tests; see ``linear_token_stats.vocabulary_splits``).

    Returns:
        six tensors in the inputs' dtype, each an empty float32 ``[0]`` when not asked for.
    """
    n_rows, vocab = _check(p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias)
    if (need[2] and p_bias is None) or (need[5] and q_bias is None):
        raise ValueError("a bias gradient needs that bias")
    device, dtype = p_hidden.device, p_hidden.dtype
    h_p, h_q = p_hidden.shape[1], q_hidden.shape[1]
    shapes = ((n_rows, h_p), (vocab, h_p), (vocab,), (n_rows, h_q), (vocab, h_q), (vocab,))
    # float32 accumulators (the biases' are written once, in their dtype); dH comes from the dH kernel's partials
    grads = [
        empty_f32(device) if not n
        else None if i in (0, 3) and n_rows > 0
        else torch.zeros(shape, dtype=dtype if i in (2, 5) else torch.float32, device=device)
        for i, (shape, n) in enumerate(zip(shapes, need, strict=True))
    ]  # fmt: skip
    if n_rows > 0 and any(need):
        dh_config, dw_config = (config, config) if config else CONFIGS[dtype][1:]
        heads = (
            p_hidden, p_weight, kl if p_bias is None else p_bias, q_hidden, q_weight, kl if q_bias is None else q_bias,
            kl, lse_p, lse_q, grad_kl,
        )  # fmt: skip
        scalars = (n_rows, h_p, h_q, vocab, 1.0 / temperature)
        launch = {"HAS_P_BIAS": p_bias is not None, "HAS_Q_BIAS": q_bias is not None, "UPCAST": upcast_dot(p_hidden)}
        out = [g if n else kl for g, n in zip(grads, need, strict=True)]
        if need[0] or need[3]:
            n_splits, v_per_split = vocabulary_splits(n_rows, vocab, dh_config, device, splits)
            parts = [torch.zeros((n_splits, n_rows, h), dtype=torch.float32, device=device) if n else kl
                     for h, n in ((h_p, need[0]), (h_q, need[3]))]  # fmt: skip
            _linear_kl_dh_kernel[(triton.cdiv(n_rows, dh_config.block_n), n_splits)](
                *heads, *parts, n_rows, h_p, h_q, vocab, v_per_split, 1.0 / temperature,
                NEED_P=need[0], NEED_Q=need[3], **launch, **dh_config.launch(),
            )  # fmt: skip
            for i, part, n in ((0, parts[0], need[0]), (3, parts[1], need[3])):
                if n:
                    grads[i] = part[0] if n_splits == 1 else part.sum(0)
        if need[1] or need[2] or need[4] or need[5]:
            _linear_kl_dw_kernel[(triton.cdiv(vocab, dw_config.block_v),)](
                *heads, out[1], out[4], out[2], out[5], *scalars,
                NEED_P_WEIGHT=need[1], NEED_Q_WEIGHT=need[4], NEED_P_BIAS=need[2], NEED_Q_BIAS=need[5], **launch,
                **dw_config.launch(),
            )  # fmt: skip
    return tuple(g.to(dtype) if n and g.dtype != dtype else g for g, n in zip(grads, need, strict=True))


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (rlhf_fast/kernels/aot.py).

# (HAS_P_BIAS, HAS_Q_BIAS) for the forward; [+ (NEED_P, NEED_Q)] for dH; [+ (NEED_P_WEIGHT, NEED_Q_WEIGHT,
# NEED_P_BIAS, NEED_Q_BIAS)] for dW: the common cases (no biases, a trained student against a frozen
# teacher; everything on) and enough others that every value of every switch is compiled per dtype.
_FWD_SWITCHES = [(0, 0), (1, 1)]
_DH_SWITCHES = [(0, 0, 1, 0), (1, 1, 1, 1), (0, 0, 0, 1)]
_DW_SWITCHES = [(0, 0, 1, 0, 0, 0), (1, 1, 1, 1, 1, 1), (0, 1, 0, 1, 0, 1)]


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """The three kernels for ``dtype`` inputs in the switch combinations above (``UPCAST`` off). ``H_P`` and
    ``H_Q`` are marked divisible by 16, as the runtime does for hidden sizes such as 1024 or 4096."""
    dt = TRITON_DTYPE[dtype]
    types = {f"{s}_{t}_ptr": f"*{dt}" for s in "pq" for t in ("hidden", "weight")}
    types["inv_temperature"] = "fp32"
    cases = [
        (_linear_kl_fwd_kernel, CONFIGS[dtype][0], ("HAS_P_BIAS", "HAS_Q_BIAS"), _FWD_SWITCHES),
        (_linear_kl_dh_kernel, CONFIGS[dtype][1], ("HAS_P_BIAS", "HAS_Q_BIAS", "NEED_P", "NEED_Q"), _DH_SWITCHES),
        (_linear_kl_dw_kernel, CONFIGS[dtype][2], ("HAS_P_BIAS", "HAS_Q_BIAS", "NEED_P_WEIGHT", "NEED_Q_WEIGHT",
                                                   "NEED_P_BIAS", "NEED_Q_BIAS"), _DW_SWITCHES),
    ]  # fmt: skip
    specs = []
    for kernel, config, names, combos in cases:
        for combo in combos:
            switches = {**dict(zip(names, map(bool, combo), strict=True)), "UPCAST": False}
            spec = aot_spec(
                kernel, config, dt, switches=switches,
                types={
                    **types,
                    "p_bias_ptr": f"*{dt}" if switches["HAS_P_BIAS"] else "*fp32",
                    "q_bias_ptr": f"*{dt}" if switches["HAS_Q_BIAS"] else "*fp32",
                    "db_p_ptr": f"*{dt}" if switches.get("NEED_P_BIAS") else "*fp32",
                    "db_q_ptr": f"*{dt}" if switches.get("NEED_Q_BIAS") else "*fp32",
                },
                rows_read=0, rows_written=0,  # no logits rows; the hidden and weight tiles instead
            )  # fmt: skip
            specs.append(dataclasses.replace(spec, aligned=(*spec.aligned, "H_P", "H_Q"), tiles_read=4))
    return specs
