"""Per-token log-probability, entropy and log-sum-exp of ``softmax(cap(hidden @ weight.T + bias) / T)``,
without ever holding the ``[N, V]`` logits; ``cap`` is a final soft cap ``c * tanh(z / c)`` (Gemma 2) when one
is given (``SOFTCAP``), else the identity.

Forward: one program per tile of ``BLOCK_N`` tokens (and split of the vocabulary, when a GPU has more
SMs than there are token tiles: see ``vocabulary_splits``) walks the vocabulary in tiles of ``BLOCK_V``
columns; each logits tile is a ``tl.dot`` over ``H`` in ``BLOCK_H`` steps (float32 accumulator), scaled by
``1/T`` and merged into a per-token online log-sum-exp (and the entropy sums, and the label's logit).
Only those per-token states leave the kernel, one per split; the host merges them into ``logp``,
``entropy`` and the float64 ``lse`` ``[N]``. Semantics are those of
``token_stats.py`` applied to ``logits = hidden @ weight.T + bias``.

Backward, with ``x`` the recomputed logits tile over ``T`` and ``p = exp((x - hi) - lo)``, ``lse = hi + lo``
in float32 parts (``_softmax_row.split_lse``: ``x - hi`` is exact next to the row max, where a float32 ``lse``
would be off by up to half its ulp, 1.2e-4 at ``|x| ~ 3000``, and so would every ``p``)::

    g = (g_lp (1[v == label] - p) - g_H p (x - E_p[x])) / T         [BLOCK_N, BLOCK_V], float32
    g *= 1 - tanh^2                     (with a soft cap: its slope, tanh recovered from the capped x)
    d_hidden += g @ W_tile              d_weight_tile += g^T @ hidden_tile          d_bias += sum_n g

Two kernels, both deterministic (no atomics): ``_linear_dh_kernel`` owns a tile of tokens and walks
the vocabulary (or one of a few splits of it, when there are fewer token tiles than SMs: see
``vocabulary_splits``); ``_linear_dw_kernel`` owns a tile of the vocabulary and walks the tokens. Each
accumulates into rows of a float32 buffer that only it touches (``H`` is too wide for registers),
and the host sums the splits and casts once at the end: no bf16 accumulation. ``g`` is rounded to the inputs' dtype
for the tensor-core dot, as the chunked path rounds its logits gradient.

Padded vocabulary columns are ``-inf`` (no probability mass, zero gradient), padded and ignored
token rows are masked out of every load and get zeros; a tile whose tokens are all ignored is not
computed at all.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import (
    TRITON_DTYPE,
    AotSpec,
    TileConfig,
    aot_spec,
    empty_f32,
    on_tensor_device,
    unused_f32,
    unused_f64,
)
from ._linear_tile import cap_slope, dot, load_rows, logits_tile, upcast_dot
from ._softmax_row import split_lse

__all__ = ["CONFIGS", "aot_specs", "linear_token_stats_bwd", "linear_token_stats_fwd"]

# (forward, dH, dW) tile configs per input dtype, sized for A100/H100 without register spills
# (tests/test_triton_aot.py compiles each for sm_80 and sm_90 and checks). 16-bit inputs go through
# the tensor cores (mma.sync / wgmma) fed by 16-byte cp.async copies; the forward keeps a 64 x 128
# float32 logits tile (32 registers per thread over 8 warps). Each backward kernel reads and writes a
# BLOCK_N x BLOCK_H (dH) or BLOCK_V x BLOCK_H (dW) float32 slice of its accumulator in global memory once
# per logits tile, for 4 * BLOCK_N * BLOCK_V * BLOCK_H FLOPs: BLOCK_V / 2 (dH) or BLOCK_N / 2 (dW) FLOPs per
# accumulator byte. With H in the thousands the accumulator rows a GPU's programs hold at once (a
# 64-token tile of dH at H 4096 is 1 MiB) outgrow its L2, so that traffic goes to HBM; each kernel
# therefore takes the tile that is long along the dimension it walks: dH 64 tokens x 128 columns, dW 128
# tokens x 64 columns, 8 warps (119-238 registers with H steps of 32, no spills; twice the FLOPs per
# accumulator byte of a 64 x 64 tile, where 256-long tiles spill). Chosen from that arithmetic and the
# register report: no GPU has timed them (nor the 64 x 64 tiles before them). Float32 inputs take an exact
# ("ieee") FMA dot, whose operands live in registers: small tiles (tf32 would miss the 1e-5 target;
# tf32x3 would be the faster exact-enough choice on a GPU, not verifiable here).
_TILES_16BIT = (
    TileConfig(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=3),
    TileConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=3),
    TileConfig(block_n=128, block_v=64, block_h=32, num_warps=8, num_stages=3),
)
CONFIGS: dict[torch.dtype, tuple[TileConfig, TileConfig, TileConfig]] = {
    torch.bfloat16: _TILES_16BIT,
    torch.float16: _TILES_16BIT,
    torch.float32: (
        # 8 warps: over 4, the split bounds cost the forward with bias and entropy 8 B of spill on sm_90
        TileConfig(block_n=32, block_v=64, block_h=16, num_warps=8, num_stages=2),
        # single-staged: the vocabulary split's bounds cost the two-stage dH 8 B of spill on sm_80; and
        # allowed 128 registers: left to itself ptxas holds the soft-capped dH to 64 and spills 4 B
        TileConfig(block_n=32, block_v=32, block_h=16, num_warps=8, num_stages=1, maxnreg=128),
        # 128 registers too: at 64 the dW with label smoothing spilled 8 B on sm_90, and soft-capped ones 4-12 B
        TileConfig(block_n=32, block_v=32, block_h=16, num_warps=8, num_stages=2, maxnreg=128),
    ),
}


@triton.jit
def _grad_tile(
    x,  # [BLOCK_N, BLOCK_V] float32 logits / T, -inf in padded columns
    cols,  # [BLOCK_V]
    col_ok,  # [BLOCK_V] real (not padded) columns
    row_ok,  # [BLOCK_N] rows that get a gradient
    lse_hi,  # [BLOCK_N] float32: the rows' lse as split_lse gives it
    lse_lo,  # [BLOCK_N] float32
    label,  # [BLOCK_N] int64; used if GRAD_LOGP
    g_lp,  # [BLOCK_N] float32, already divided by T; used if GRAD_LOGP
    g_h,  # [BLOCK_N] float32, already divided by T; used if GRAD_ENTROPY
    mu_hi,  # [BLOCK_N] float32: the rows' E_p[x] as _row_lse gives it; used if GRAD_ENTROPY
    mu_lo,  # [BLOCK_N] float32
    g_m,  # [BLOCK_N] float32, already divided by T; used if GRAD_MEAN
    inv_vocab,  # 1 / V
    GRAD_LOGP: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    GRAD_MEAN: tl.constexpr,
):
    """d(g_lp logp + g_H entropy + g_m mean_logp)/d logits for one tile, float32, 0 in masked rows and
    padded columns."""
    logp = (x - lse_hi[:, None]) - lse_lo[:, None]
    p = tl.exp(logp)
    g = tl.zeros(x.shape, tl.float32)
    if GRAD_LOGP:
        g += g_lp[:, None] * (tl.where(cols[None, :] == label[:, None], 1.0, 0.0) - p)
    if GRAD_ENTROPY:
        # log p + H as x - E_p[x] (see _softmax_row); p = 0 where x = -inf: zero the factor there so that p times
        # it is 0, not 0 * -inf
        g -= g_h[:, None] * p * tl.where(x == float("-inf"), 0.0, (x - mu_hi[:, None]) - mu_lo[:, None])
    if GRAD_MEAN:
        # mean_logp = sum_v x_v / V - lse: d/dx_v = 1/V - p_v on real columns (-inf ones too: 1/V), 0 on padded ones
        g += g_m[:, None] * tl.where(col_ok[None, :], inv_vocab - p, 0.0)
    # masked rows were computed from zero hidden states and a made-up lse: discard, whatever they hold
    return tl.where(row_ok[:, None], g, 0.0)


@triton.jit
def _row_grads(
    labels_ptr, grad_logp_ptr, grad_entropy_ptr, grad_mean_ptr,
    rows, N, inv_temperature, ignore_index,
    HAS_LABELS: tl.constexpr, GRAD_LOGP: tl.constexpr, GRAD_ENTROPY: tl.constexpr, GRAD_MEAN: tl.constexpr,
):  # fmt: skip
    """Per-row inputs of :func:`_grad_tile` for token indices ``rows`` but the lse and E_p[x] (see
    :func:`_row_lse`): ``(row_ok, label, g_lp, g_h, g_m)``."""
    in_range = rows < N
    row_ok = in_range
    label = tl.zeros(rows.shape, tl.int64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=in_range, other=0)
        row_ok = in_range & (label != ignore_index)
    g_lp = tl.zeros(rows.shape, tl.float32)
    g_h = tl.zeros(rows.shape, tl.float32)
    if GRAD_LOGP:
        g_lp = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0) * inv_temperature
    if GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0) * inv_temperature
    g_m = tl.zeros(rows.shape, tl.float32)
    if GRAD_MEAN:
        g_m = tl.load(grad_mean_ptr + rows, mask=row_ok, other=0.0) * inv_temperature
    return row_ok, label, g_lp, g_h, g_m


@triton.jit
def _row_lse(lse_ptr, entropy_ptr, rows, row_ok, GRAD_ENTROPY: tl.constexpr):
    """The float64 lse of token indices ``rows`` as :func:`_grad_tile` takes it, ``(hi, lo)``, float32, and with
    ``GRAD_ENTROPY`` their ``E_p[x] = lse - entropy`` the same way (else zeros)."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    lse_hi, lse_lo = split_lse(lse)
    mu_hi = tl.zeros(rows.shape, tl.float32)
    mu_lo = tl.zeros(rows.shape, tl.float32)
    if GRAD_ENTROPY:
        mu_hi, mu_lo = split_lse(lse - tl.load(entropy_ptr + rows, mask=row_ok, other=0.0))
    return lse_hi, lse_lo, mu_hi, mu_lo


@triton.jit(do_not_specialize=["ignore_index"])
def _linear_fwd_kernel(
    # pointers
    hidden_ptr,  # [N, H] contiguous
    weight_ptr,  # [V, H] contiguous
    bias_ptr,  # [V]; unused unless HAS_BIAS
    labels_ptr,  # [N] int64; unused unless HAS_LABELS
    # out, [splits, N] float32 each: the online log-sum-exp state of each split of the vocabulary
    m_ptr,  # running max
    s_ptr,  # sum exp(x - m)
    t_ptr,  # sum exp(x - m) * (x - m); unused unless WITH_ENTROPY
    x_label_ptr,  # the label's logit if it lies in the split, else 0; unused unless WITH_LOGP
    x_sum_ptr,  # sum of x / V over the split's columns; unused unless WITH_MEAN
    # sizes
    N,
    H,
    V,
    v_per_split,  # vocabulary columns per split, a multiple of BLOCK_V
    # runtime scalars (never constexpr: each new value would recompile)
    inv_temperature,
    ignore_index,
    softcap,  # c of the final soft cap; unused unless SOFTCAP
    # constexpr: feature switches and block sizes
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    WITH_LOGP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_MEAN: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only, see dot
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # program (i, s): token tile i against split s of the vocabulary (see vocabulary_splits); the host merges them
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ok = rows < N
    label = tl.zeros([BLOCK_N], tl.int64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_ok, other=0)
        row_ok &= label != ignore_index
    # a tile of ignored tokens is not computed: the vocabulary loop runs zero times
    v_start = split * v_per_split
    v_end = tl.where(tl.max(row_ok.to(tl.int32), axis=0) > 0, tl.minimum(v_start + v_per_split, V), v_start)

    # Online log-sum-exp per token, as in _softmax_row.row_stats: m the running max; s = sum exp(x - m);
    # t = sum exp(x - m) * (x - m) (kept relative to m so that H = log s - t / s does not cancel two
    # logit-sized numbers); x_label the label's logit, found in whichever tile holds it.
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    x_label = tl.zeros([BLOCK_N], tl.float32)
    # sum_v x_v / V, for mean_logp (label smoothing); each term divided by V first, so that the sum cannot
    # overflow float32 where the mean is in range (sum |x| > 3.4e38 with every logit finite)
    x_sum = tl.zeros([BLOCK_N], tl.float32)
    inv_v = 1.0 / V
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        x = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, cols < V, H, inv_temperature, softcap,
            HAS_BIAS, SOFTCAP, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # while a row has seen only -inf, use 0 as its reference: exp(-inf - -inf) would be NaN
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ref)
        d = x - ref[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            shift = tl.where(m == float("-inf"), 0.0, m - ref)
            # a -inf logit has p = 0 and contributes 0, not 0 * -inf
            t = alpha * (t + shift * s) + tl.sum(tl.where(x == float("-inf"), 0.0, e * d), axis=1)
        if WITH_LOGP:
            x_label += tl.sum(tl.where(cols[None, :] == label[:, None], x, 0.0), axis=1)
        if WITH_MEAN:
            # every real column, -inf ones included (a masked column makes the mean log-prob -inf, as in the
            # logits forms and F.cross_entropy); padded columns are not part of the vocabulary
            x_sum += tl.sum(tl.where((cols < V)[None, :], x * inv_v, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    at = split.to(tl.int64) * N + rows
    in_range = rows < N
    tl.store(m_ptr + at, m, mask=in_range)
    tl.store(s_ptr + at, s, mask=in_range)
    if WITH_ENTROPY:
        tl.store(t_ptr + at, t, mask=in_range)
    if WITH_LOGP:
        tl.store(x_label_ptr + at, x_label, mask=in_range)
    if WITH_MEAN:
        tl.store(x_sum_ptr + at, x_sum, mask=in_range)


def _merge_splits(m, s, t, x_label, x_sum, row_ok):
    """``(lse, logp, entropy, mean_logp)`` [N] from the per-split states ``[splits, N]`` of the forward kernel
    (``t``, ``x_label``, ``x_sum`` None when not computed; their outputs are then None); 0 where not ``row_ok``.
    ``lse`` and ``entropy`` are float64 (``M + log s`` and ``log s - t / s`` from float32 parts, exact: ``lse -
    entropy`` is the backward's ``E_p[x]``, see ``_softmax_row``), the others float32.

    Each split's sums are taken against its own max; rescaled to the row's max ``M`` they add up, as between the
    vocabulary tiles of one program. A split whose columns are all ``-inf`` (a masked vocabulary) has ``m = -inf``
    and ``s = t = 0``: its factor ``exp(m - M)`` is 0 and its shift is taken as 0 (not ``-inf * 0``)."""
    big_m, alpha = rescale_splits(m)
    total = (alpha * s).sum(0)
    log_s = torch.log(total)
    zero = torch.zeros((), device=m.device)
    lse = torch.where(row_ok, big_m.double() + log_s.double(), 0.0)
    logp = entropy = mean_logp = None
    if x_label is not None:
        # (x - M) - log_s: exact for a confident token, where x - lse would lose log_s ~ 0 to rounding
        logp = torch.where(row_ok, (x_label.sum(0) - big_m) - log_s, zero)
    if t is not None:
        shift = torch.where(m == float("-inf"), 0.0, m - big_m)  # a finite m makes M finite
        t_all = (alpha * (t + shift * s)).sum(0)
        entropy = torch.where(row_ok, log_s.double() - (t_all / total).double(), 0.0)
    if x_sum is not None:
        mean_logp = torch.where(row_ok, (x_sum.sum(0) - big_m) - log_s, zero)
    return lse, logp, entropy, mean_logp


@triton.jit(do_not_specialize=["ignore_index"])
def _linear_dh_kernel(
    # pointers
    hidden_ptr,  # [N, H] contiguous
    weight_ptr,  # [V, H] contiguous
    bias_ptr,  # [V]; unused unless HAS_BIAS
    labels_ptr,  # [N] int64; unused unless HAS_LABELS
    lse_ptr,  # [N] float64
    entropy_ptr,  # [N] float64; unused unless GRAD_ENTROPY
    grad_logp_ptr,  # [N] float32; unused unless GRAD_LOGP
    grad_entropy_ptr,  # [N] float32; unused unless GRAD_ENTROPY
    grad_mean_ptr,  # [N] float32; unused unless GRAD_MEAN
    dh_ptr,  # [splits, N, H] float32 in/out, zero-initialized; only this program's rows of its split are touched
    # sizes
    N,
    H,
    V,
    v_per_split,  # vocabulary columns per split, a multiple of BLOCK_V
    # runtime scalars
    inv_temperature,
    ignore_index,
    softcap,  # c of the final soft cap; unused unless SOFTCAP
    # constexpr: feature switches and block sizes
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    GRAD_LOGP: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    GRAD_MEAN: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only, see dot
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # program (i, s): token tile i against the columns [s * v_per_split, (s + 1) * v_per_split) of the vocabulary,
    # into split s's own [N, H] slice of dh (the host sums the splits)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ok, label, g_lp, g_h, g_m = _row_grads(
        labels_ptr, grad_logp_ptr, grad_entropy_ptr, grad_mean_ptr, rows, N,
        inv_temperature, ignore_index, HAS_LABELS, GRAD_LOGP, GRAD_ENTROPY, GRAD_MEAN,
    )  # fmt: skip
    v_start = split * v_per_split
    v_end = tl.where(tl.max(row_ok.to(tl.int32), axis=0) > 0, tl.minimum(v_start + v_per_split, V), v_start)
    dh_ptr += split.to(tl.int64) * N * H
    ks = tl.arange(0, BLOCK_H)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        x = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H, inv_temperature, softcap,
            HAS_BIAS, SOFTCAP, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        # loaded per vocabulary tile (BLOCK_N values against a BLOCK_N x BLOCK_V x H tile of work), not held
        # across the loop: held, its two float32 per row made the float32 kernel spill on sm_80
        lse_hi, lse_lo, mu_hi, mu_lo = _row_lse(lse_ptr, entropy_ptr, rows, row_ok, GRAD_ENTROPY)
        g = _grad_tile(
            x, cols, col_ok, row_ok, lse_hi, lse_lo, label, g_lp, g_h, mu_hi, mu_lo, g_m, 1.0 / V,
            GRAD_LOGP, GRAD_ENTROPY, GRAD_MEAN,
        )  # fmt: skip
        if SOFTCAP:  # through the cap to the raw logits
            g *= cap_slope(x, col_ok, inv_temperature, softcap)
        g = g.to(weight_ptr.dtype.element_ty)
        # d_hidden[rows] += g @ weight[cols], H in BLOCK_H slices (an [N, H] accumulator would not fit)
        for k0 in range(0, H, BLOCK_H):
            k_ok = (k0 + ks) < H
            w = load_rows(weight_ptr, cols, col_ok, k0, H, BLOCK_H)
            dh_ptrs = dh_ptr + rows[:, None] * H + (k0 + ks)[None, :]
            dh_mask = row_ok[:, None] & k_ok[None, :]
            dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0)
            tl.store(dh_ptrs, dot(g, w, dh, UPCAST), mask=dh_mask)


@triton.jit(do_not_specialize=["ignore_index"])
def _linear_dw_kernel(
    # pointers
    hidden_ptr,  # [N, H] contiguous
    weight_ptr,  # [V, H] contiguous
    bias_ptr,  # [V]; unused unless HAS_BIAS
    labels_ptr,  # [N] int64; unused unless HAS_LABELS
    lse_ptr,  # [N] float64
    entropy_ptr,  # [N] float64; unused unless GRAD_ENTROPY
    grad_logp_ptr,  # [N] float32; unused unless GRAD_LOGP
    grad_entropy_ptr,  # [N] float32; unused unless GRAD_ENTROPY
    grad_mean_ptr,  # [N] float32; unused unless GRAD_MEAN
    dw_ptr,  # [V, H] float32 in/out, zero-initialized; unused unless NEED_WEIGHT
    db_ptr,  # [V] out, bias dtype; unused unless NEED_BIAS
    # sizes
    N,
    H,
    V,
    # runtime scalars
    inv_temperature,
    ignore_index,
    softcap,  # c of the final soft cap; unused unless SOFTCAP
    # constexpr: feature switches and block sizes
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    GRAD_LOGP: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    GRAD_MEAN: tl.constexpr,
    NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only, see dot
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    ks = tl.arange(0, BLOCK_H)
    db = tl.zeros([BLOCK_V], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok, label, g_lp, g_h, g_m = _row_grads(
            labels_ptr, grad_logp_ptr, grad_entropy_ptr, grad_mean_ptr, rows, N,
            inv_temperature, ignore_index, HAS_LABELS, GRAD_LOGP, GRAD_ENTROPY, GRAD_MEAN,
        )  # fmt: skip
        lse_hi, lse_lo, mu_hi, mu_lo = _row_lse(lse_ptr, entropy_ptr, rows, row_ok, GRAD_ENTROPY)
        # a tile of ignored tokens adds nothing: skip its matmuls
        if tl.max(row_ok.to(tl.int32), axis=0) > 0:
            x = logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H, inv_temperature, softcap,
                HAS_BIAS, SOFTCAP, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
            )  # fmt: skip
            g = _grad_tile(
                x, cols, col_ok, row_ok, lse_hi, lse_lo, label, g_lp, g_h, mu_hi, mu_lo, g_m, 1.0 / V,
                GRAD_LOGP, GRAD_ENTROPY, GRAD_MEAN,
            )  # fmt: skip
            if SOFTCAP:  # through the cap to the raw logits
                g *= cap_slope(x, col_ok, inv_temperature, softcap)
            if NEED_BIAS:
                db += tl.sum(g, axis=0)
            if NEED_WEIGHT:
                g_t = tl.trans(g.to(hidden_ptr.dtype.element_ty))  # [BLOCK_V, BLOCK_N]
                # d_weight[cols] += g^T @ hidden[rows], H in BLOCK_H slices
                for k0 in range(0, H, BLOCK_H):
                    k_ok = (k0 + ks) < H
                    h = load_rows(hidden_ptr, rows, row_ok, k0, H, BLOCK_H)
                    dw_ptrs = dw_ptr + cols[:, None] * H + (k0 + ks)[None, :]
                    dw_mask = col_ok[:, None] & k_ok[None, :]
                    dw = tl.load(dw_ptrs, mask=dw_mask, other=0.0)
                    tl.store(dw_ptrs, dot(g_t, h, dw, UPCAST), mask=dw_mask)
    if NEED_BIAS:
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)


def vocabulary_splits(
    n_rows: int, vocab: int, config: TileConfig, device: torch.device, forced: int | None = None
) -> tuple[int, int]:
    """``(splits, columns per split)`` of the vocabulary for the forward and dH kernels' token tiles: as many
    splits as keep one program per SM busy (or ``forced``, tests), each at least one ``BLOCK_V`` tile, every
    split but the last full.

    One program per token tile leaves most of a GPU idle when there are fewer tiles than SMs (2048 tokens
    are 32 tiles of 64 against an H100's 132 SMs); program ``(i, s)`` then walks only split ``s`` of the
    vocabulary, and the host merges the splits (the forward's log-sum-exp states, the float32 ``[N, H]``
    partials of dH). The splits times the tokens stay below SMs x BLOCK_N rows, whatever ``N``. 1 off CUDA
    (the interpreter; tests force more)."""
    wanted = forced
    if not wanted:
        wanted = 1
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            wanted = max(1, sms // triton.cdiv(n_rows, config.block_n))
    v_tiles = triton.cdiv(vocab, config.block_v)
    per_split = triton.cdiv(v_tiles, min(wanted, v_tiles))
    return triton.cdiv(v_tiles, per_split), per_split * config.block_v


def rescale_splits(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, exp(m - M))`` for the per-split maxima ``m [splits, N]`` of an online log-sum-exp: the row max
    (``-inf`` if every split saw only ``-inf``) and each split's factor to it (0 for a split that saw only
    ``-inf``, whose sums are 0)."""
    big_m = m.amax(0)
    return big_m, torch.exp(m - torch.where(big_m == float("-inf"), 0.0, big_m))


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if not (hidden.is_contiguous() and weight.is_contiguous() and (bias is None or bias.is_contiguous())):
        raise ValueError("hidden, weight and bias must be contiguous")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("hidden, weight and bias must have the same dtype")
    return hidden.shape[0], hidden.shape[1], weight.shape[0]


@on_tensor_device
def linear_token_stats_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    with_logp: bool,
    with_entropy: bool,
    with_mean_logp: bool = False,
    *,
    softcap: float | None = None,
    config: TileConfig | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(logp, entropy, lse, mean_logp)`` of ``softmax(x)``, ``x = softcap(hidden @ weight.T + bias) / T``
    (``softcap(z) = c * tanh(z / c)`` for ``softcap = c``; the identity for None).

    Args:
        hidden: ``[N, H]`` contiguous, float32/bfloat16/float16.
        weight: ``[V, H]`` contiguous, same dtype; bias: ``[V]`` same dtype, or None.
        labels: ``[N]`` int64 (already validated: in ``[0, V)`` or ``== ignore_index``) or None.
            Tokens whose label is ``ignore_index`` are not computed and get 0 in every output.
        temperature, ignore_index: runtime scalars.
        with_logp: return ``logp = x[label] - lse`` (needs ``labels``); with_entropy: return
            ``entropy = lse - sum_v softmax(x)_v x_v``; with_mean_logp: return
            ``mean_logp = sum_v x_v / V - lse`` (the label-smoothing term).
        config: force the tile sizes (tests use small ones so that several tiles occur).
        splits: force the number of vocabulary splits of the token tiles (tests; see :func:`vocabulary_splits`).

    Returns:
        ``(logp, entropy, lse, mean_logp)``, ``[N]``, float32 but ``entropy`` and ``lse`` float64 (for the
        backward, see ``_softmax_row``); the optional ones are empty ``[0]`` when not asked for.
    """
    n_rows, _, vocab = _check(hidden, weight, bias)
    if with_logp and labels is None:
        raise ValueError("with_logp=True needs labels")
    device = hidden.device
    if n_rows == 0:
        empty = empty_f32(device)
        return empty, empty, torch.empty(0, dtype=torch.float64, device=device), empty
    config = config or CONFIGS[hidden.dtype][0]
    n_splits, v_per_split = vocabulary_splits(n_rows, vocab, config, device, splits)
    state = torch.empty((5, n_splits, n_rows), dtype=torch.float32, device=device)  # m, s, t, x_label, x_sum
    m, s, t, x_label, x_sum = state
    # switched-off pointers are never touched; m stands in for them
    _linear_fwd_kernel[(triton.cdiv(n_rows, config.block_n), n_splits)](
        hidden, weight, m if bias is None else bias, m if labels is None else labels, m, s, t, x_label, x_sum,
        n_rows, hidden.shape[1], vocab, v_per_split,
        1.0 / temperature, ignore_index, softcap or 1.0,
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, HAS_LABELS=labels is not None, WITH_LOGP=with_logp,
        WITH_ENTROPY=with_entropy,
        WITH_MEAN=with_mean_logp, UPCAST=upcast_dot(hidden), **config.launch(),
    )  # fmt: skip
    row_ok = labels != ignore_index if labels is not None else torch.ones(n_rows, dtype=torch.bool, device=device)
    lse, logp, entropy, mean_logp = _merge_splits(
        m, s, t if with_entropy else None, x_label if with_logp else None, x_sum if with_mean_logp else None,
        row_ok,
    )  # fmt: skip
    empty = empty_f32(device)
    return (
        logp if with_logp else empty, entropy if with_entropy else empty, lse, mean_logp if with_mean_logp else empty
    )


@on_tensor_device
def linear_token_stats_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    *,
    grad_mean_logp: torch.Tensor | None = None,
    softcap: float | None = None,
    config: TileConfig | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_n g_lp[n] logp[n] + g_H[n] entropy[n] + g_m[n] mean_logp[n]`` w.r.t. ``hidden``,
    ``weight``, ``bias``.

    With ``g = (g_lp (1[v == label] - p) - g_H p (x - E_p[x]) + g_m (1/V - p)) / temperature`` per logits entry
    (0 on ignored tokens), times ``1 - tanh^2`` of the cap with ``softcap``: ``d_hidden = g @ weight``,
    ``d_weight = g.T @ hidden``, ``d_bias = g.sum(0)``, accumulated in float32 and cast to the inputs' dtype once.

    Args:
        hidden, weight, bias, labels, temperature, ignore_index, softcap: as in :func:`linear_token_stats_fwd`.
        lse: ``[N]`` float64 from the forward; entropy: ``[N]`` float64 from the forward (None when
            ``grad_entropy`` is None).
        grad_logp, grad_entropy, grad_mean_logp: ``[N]`` float32 incoming gradients, or None for "no
            such term".
        need_hidden, need_weight, need_bias: which gradients to compute (``need_bias`` needs ``bias``).
        config: force the tile sizes (tests).
        splits: force the number of vocabulary splits of the dH kernel's token tiles (tests; see
            :func:`vocabulary_splits`).

    Returns:
        ``(d_hidden [N, H], d_weight [V, H], d_bias [V])`` in the inputs' dtype; each is an empty
        float32 ``[0]`` when not asked for.
    """
    n_rows, h_dim, vocab = _check(hidden, weight, bias)
    if grad_logp is not None and labels is None:
        raise ValueError("grad_logp needs labels")
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs entropy")
    if need_bias and bias is None:
        raise ValueError("need_bias=True needs bias")
    device, dtype = hidden.device, hidden.dtype
    # float32 accumulators; for float32 inputs they are the outputs themselves
    d_weight = torch.zeros((vocab, h_dim), dtype=torch.float32, device=device) if need_weight else empty_f32(device)
    d_bias = torch.zeros(vocab, dtype=dtype, device=device) if need_bias else empty_f32(device)
    active = n_rows > 0 and any(g is not None for g in (grad_logp, grad_entropy, grad_mean_logp))
    if active:
        dh_config, dw_config = (config, config) if config else CONFIGS[dtype][1:]
        off = unused_f32(device)  # stands in for switched-off pointers, typed as aot_specs has them
        pointers = (
            hidden, weight, off if bias is None else bias, off if labels is None else labels, lse,
            unused_f64(device) if entropy is None else entropy, off if grad_logp is None else grad_logp,
            off if grad_entropy is None else grad_entropy, off if grad_mean_logp is None else grad_mean_logp,
        )  # fmt: skip
        switches = {
            "HAS_BIAS": bias is not None, "SOFTCAP": softcap is not None, "HAS_LABELS": labels is not None,
            "GRAD_LOGP": grad_logp is not None, "GRAD_ENTROPY": grad_entropy is not None,
            "GRAD_MEAN": grad_mean_logp is not None,
        }  # fmt: skip
        upcast = upcast_dot(hidden)
        scalars = (1.0 / temperature, ignore_index, softcap or 1.0)
        if need_hidden:
            n_splits, v_per_split = vocabulary_splits(n_rows, vocab, dh_config, device, splits)
            parts = torch.zeros((n_splits, n_rows, h_dim), dtype=torch.float32, device=device)
            _linear_dh_kernel[(triton.cdiv(n_rows, dh_config.block_n), n_splits)](
                *pointers, parts, n_rows, h_dim, vocab, v_per_split, *scalars, **switches, UPCAST=upcast,
                **dh_config.launch(),
            )  # fmt: skip
            d_hidden = parts[0] if n_splits == 1 else parts.sum(0)
        if need_weight or need_bias:
            _linear_dw_kernel[(triton.cdiv(vocab, dw_config.block_v),)](
                *pointers, d_weight if need_weight else off, d_bias if need_bias else off, n_rows, h_dim, vocab,
                *scalars, **switches, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, UPCAST=upcast, **dw_config.launch(),
            )  # fmt: skip
    if not need_hidden:
        d_hidden = empty_f32(device)
    elif not active:
        d_hidden = torch.zeros((n_rows, h_dim), dtype=dtype, device=device)
    else:
        d_hidden = d_hidden.to(dtype)
    if need_weight:
        d_weight = d_weight.to(dtype)
    return d_hidden, d_weight, d_bias


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (rlhf_fast/kernels/aot.py).

# Not the full product of the switches: the combinations the ops launch most (logp alone; everything
# on) and one that turns the rest off, so that every value of every switch is compiled per dtype.
# (HAS_BIAS, HAS_LABELS, WITH_LOGP / GRAD_LOGP, WITH_ENTROPY / GRAD_ENTROPY, WITH_MEAN / GRAD_MEAN
#  [, NEED_WEIGHT, NEED_BIAS])
# The soft cap (last switch) is on in the combination the losses of a soft-capped model (Gemma 2) launch
# and in everything on.
_FWD_SWITCHES = [(0, 1, 1, 0, 0, 0), (1, 1, 1, 1, 1, 1), (1, 0, 0, 1, 0, 0), (0, 1, 1, 1, 0, 1)]
_DH_SWITCHES = [(0, 1, 1, 0, 0, 0), (1, 1, 1, 1, 1, 1), (1, 0, 0, 1, 0, 0), (0, 1, 1, 0, 0, 1)]
_DW_SWITCHES = [
    (0, 1, 1, 0, 0, 1, 0, 0), (1, 1, 1, 1, 1, 1, 1, 1), (1, 0, 0, 1, 0, 0, 1, 0), (0, 1, 1, 0, 0, 1, 0, 1),
    # what the spills were found in: label smoothing, a capped entropy, capped log-probs with a frozen bias
    (0, 1, 1, 0, 1, 1, 0, 0), (0, 0, 0, 1, 0, 1, 0, 1), (1, 1, 1, 0, 0, 1, 0, 1),
]  # fmt: skip


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """The three kernels for ``dtype`` inputs in the switch combinations above (``UPCAST`` off: it
    exists for the interpreter only). ``H`` is marked divisible by 16 like the pointers, as the
    runtime does for hidden sizes such as 1024 or 4096: it is the row stride of every tile."""
    dt = TRITON_DTYPE[dtype]
    types = {"hidden_ptr": f"*{dt}", "weight_ptr": f"*{dt}", "inv_temperature": "fp32", "softcap": "fp32"}
    cases = [
        (_linear_fwd_kernel, CONFIGS[dtype][0], ("HAS_BIAS", "HAS_LABELS", "WITH_LOGP", "WITH_ENTROPY", "WITH_MEAN",
                                           "SOFTCAP"), _FWD_SWITCHES),
        (_linear_dh_kernel, CONFIGS[dtype][1], ("HAS_BIAS", "HAS_LABELS", "GRAD_LOGP", "GRAD_ENTROPY", "GRAD_MEAN",
                                          "SOFTCAP"), _DH_SWITCHES),
        (_linear_dw_kernel, CONFIGS[dtype][2], ("HAS_BIAS", "HAS_LABELS", "GRAD_LOGP", "GRAD_ENTROPY", "GRAD_MEAN",
                                          "NEED_WEIGHT", "NEED_BIAS", "SOFTCAP"), _DW_SWITCHES),
    ]  # fmt: skip
    specs = []
    for kernel, config, names, combos in cases:
        for combo in combos:
            switches = {**dict(zip(names, map(bool, combo), strict=True)), "UPCAST": False}
            spec = aot_spec(
                kernel, config, dt, switches=switches,
                types={
                    **types,
                    "bias_ptr": f"*{dt}" if switches["HAS_BIAS"] else "*fp32",
                    "labels_ptr": "*i64" if switches["HAS_LABELS"] else "*fp32",
                    "db_ptr": f"*{dt}" if switches.get("NEED_BIAS") else "*fp32",
                },
                rows_read=0, rows_written=0,  # no logits rows; the hidden and weight tiles instead
            )  # fmt: skip
            specs.append(dataclasses.replace(spec, aligned=(*spec.aligned, "H"), tiles_read=2))
    return specs
