"""Per-token log-probability, entropy, mean log-probability and log-sum-exp of ``softmax(logits / T)``.

Forward, per row ``r`` of a ``[A, B, V]`` logits view (``x = logits[r].float() / T``)::

    lse       = log sum_v exp(x_v)
    logp      = x[label] - lse                          (0 on ignored rows)
    entropy   = lse - sum_v softmax(x)_v x_v            (0 on ignored rows)
    mean_logp = (1/V) sum_v log softmax(x)_v            (0 on ignored rows; label smoothing needs it)

computed in one read of the row with an online log-sum-exp; only these numbers per row are kept.
Backward, with ``p = exp(x - lse)`` and ``log p = x - lse``::

    d logp / dx_v      = 1[v == label] - p_v
    d entropy / dx_v   = -p_v (log p_v + entropy)
    d mean_logp / dx_v = 1/V - p_v

written in one more read of the row and one write of ``grad_logits``. The row walks themselves live
in ``_softmax_row.py``, shared with the fused forward+gradient kernel (``token_stats_fused.py``).

One program per row, grid ``(A * B,)``; row ``r`` sits at ``(r // B) * stride_a + (r % B) *
stride_b``, so a ``logits[:, :-1]`` slice is read in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    CONFIGS,
    TRITON_DTYPE,
    AotSpec,
    aot_spec,
    check_rows,
    empty_f32,
    on_tensor_device,
    pick_config,
    unused_f32,
    unused_f64,
)
from ._softmax_row import entropy64, lse64, row_position, row_stats, split_lse, write_grad_row

# The fused forward+gradient variant lives in its own file; re-exported so that this module holds
# the whole token-stats interface (rlhf_fast._dispatch looks the launchers up here).

__all__ = ["CONFIGS", "aot_specs", "token_stats_bwd", "token_stats_fwd"]


@triton.jit(do_not_specialize=["ignore_index"])
def _token_stats_fwd_kernel(
    # pointers
    logits_ptr,  # [A, B, V] view, stride(2) == 1
    labels_ptr,  # [N] int64; unused unless HAS_LABELS
    logp_ptr,  # [N] float32 out; unused unless WITH_LOGP
    entropy_ptr,  # [N] float64 out (see entropy64); unused unless WITH_ENTROPY
    lse_ptr,  # [N] float64 out (see split_lse)
    mean_logp_ptr,  # [N] float32 out; unused unless WITH_MEAN_LOGP
    # strides of logits, in elements
    stride_a,
    stride_b,
    # sizes
    B,
    V,
    # runtime scalars (never constexpr: each new value would recompile)
    inv_temperature,  # 1 / temperature: one multiply per element instead of a divide
    ignore_index,
    # constexpr: feature switches and block size
    HAS_LABELS: tl.constexpr,
    WITH_LOGP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_MEAN_LOGP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row, a, b = row_position(B)
    row_ptr = logits_ptr + a * stride_a + b * stride_b

    n_read = V
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        # An ignored row is never read: the loop over it runs zero times.
        n_read = tl.where(valid, V, 0)

    m, log_s, t_over_s, mean_logp = row_stats(
        row_ptr, n_read, V, inv_temperature, WITH_ENTROPY, WITH_MEAN_LOGP, BLOCK_V
    )
    lse = lse64(m, log_s)
    entropy = entropy64(log_s, t_over_s)
    if HAS_LABELS:
        lse = tl.where(valid, lse, 0.0)
        entropy = tl.where(valid, entropy, 0.0)
        mean_logp = tl.where(valid, mean_logp, 0.0)
    tl.store(lse_ptr + row, lse)
    if WITH_LOGP:
        # One extra scalar read of x[label], from L2: the loop has just streamed this row.
        x_label = tl.load(row_ptr + label, mask=valid, other=0.0).to(tl.float32) * inv_temperature
        # (x - m) - log_s: exact for a confident token, where x - lse would lose log_s ~ 0 to rounding
        tl.store(logp_ptr + row, tl.where(valid, (x_label - m) - log_s, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    if WITH_MEAN_LOGP:
        tl.store(mean_logp_ptr + row, mean_logp)


@triton.jit(do_not_specialize=["ignore_index"])
def _token_stats_bwd_kernel(
    # pointers
    logits_ptr,  # [A, B, V] view, stride(2) == 1
    labels_ptr,  # [N] int64; unused unless HAS_LABELS
    lse_ptr,  # [N] float64
    entropy_ptr,  # [N] float64; unused unless GRAD_ENTROPY
    grad_logp_ptr,  # [N] float32; unused unless GRAD_LOGP
    grad_entropy_ptr,  # [N] float32; unused unless GRAD_ENTROPY
    grad_mean_logp_ptr,  # [N] float32; unused unless GRAD_MEAN_LOGP
    grad_logits_ptr,  # [N, V] out, contiguous, logits dtype
    # strides of logits, in elements (grad_logits is contiguous: its row stride is V)
    stride_a,
    stride_b,
    # sizes
    B,
    V,
    # runtime scalars
    inv_temperature,  # 1 / temperature
    ignore_index,
    # constexpr: feature switches and block size
    HAS_LABELS: tl.constexpr,
    GRAD_LOGP: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    GRAD_MEAN_LOGP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row, a, b = row_position(B)
    row_ptr = logits_ptr + a * stride_a + b * stride_b

    # The 1/T of d x / d logits is folded into the per-row coefficients.
    g_lp = 0.0
    g_h = 0.0
    mu_hi = 0.0
    mu_lo = 0.0
    g_u = 0.0
    lse = tl.load(lse_ptr + row)
    if GRAD_LOGP:
        g_lp = tl.load(grad_logp_ptr + row) * inv_temperature
    if GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row) * inv_temperature
        mu_hi, mu_lo = split_lse(lse - tl.load(entropy_ptr + row))  # E_p[x], see _softmax_row
    if GRAD_MEAN_LOGP:
        g_u = tl.load(grad_mean_logp_ptr + row) * inv_temperature

    n_read = V
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        # An ignored row is never read; it gets a row of zeros.
        n_read = tl.where(label != ignore_index, V, 0)

    lse_hi, lse_lo = split_lse(lse)
    write_grad_row(
        row_ptr, grad_logits_ptr + row * V, n_read, V, inv_temperature, lse_hi, lse_lo,
        label, g_lp, g_h, mu_hi, mu_lo, g_u,
        GRAD_LOGP, GRAD_ENTROPY, GRAD_MEAN_LOGP, BLOCK_V,
    )  # fmt: skip


@on_tensor_device
def token_stats_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    with_logp: bool,
    with_entropy: bool,
    with_mean_logp: bool,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(logp, entropy, lse, mean_logp)`` of ``softmax(logits / temperature)``.

    Args:
        logits: ``[A, B, V]`` float32/bfloat16/float16 view with ``stride(2) == 1``; rows are
            ``r = a * B + b``, ``N = A * B``.
        labels: ``[N]`` int64 (already validated: in ``[0, V)`` or ``== ignore_index``) or None.
            Rows whose label is ``ignore_index`` are not read and get 0 in every output.
        temperature: ``x = logits.float() / temperature``.
        with_logp: return ``logp[r] = x[r, labels[r]] - lse[r]`` (needs ``labels``).
        with_entropy: return ``entropy[r] = lse[r] - sum_v softmax(x[r])_v x[r, v]``, float64 (see
            ``entropy64``).
        with_mean_logp: return ``mean_logp[r] = (1/V) sum_v log softmax(x[r])_v = mean_v x[r, v] - lse[r]``
            (``-inf`` if the row has a ``-inf`` logit).
        block_v: force the block size (a power of two); tests use it to make rows span blocks.

    Returns:
        ``(logp, entropy, lse, mean_logp)``, ``[N]``, float32 but ``entropy`` and ``lse`` float64 (see
        ``split_lse``, ``entropy64``);
        ``logp``/``entropy``/``mean_logp`` are empty ``[0]`` when not requested. ``lse`` is always
        returned: the backward needs it.
    """
    a_dim, b_dim, vocab = check_rows("logits", logits)
    if with_logp and labels is None:
        raise ValueError("with_logp=True needs labels")
    n_rows = a_dim * b_dim
    device = logits.device
    lse = torch.empty(n_rows, dtype=torch.float64, device=device)
    logp = torch.empty(n_rows, dtype=torch.float32, device=device) if with_logp else empty_f32(device)
    entropy = torch.empty(n_rows if with_entropy else 0, dtype=torch.float64, device=device)
    mean_logp = torch.empty(n_rows, dtype=torch.float32, device=device) if with_mean_logp else empty_f32(device)
    if n_rows == 0:
        return logp, entropy, lse, mean_logp
    config = pick_config(vocab, block_v)
    # Outputs (and labels) that are switched off are never touched; `off` stands in for their pointer.
    off = unused_f32(device)
    _token_stats_fwd_kernel[(n_rows,)](
        logits, off if labels is None else labels, logp if with_logp else off,
        entropy if with_entropy else unused_f64(device), lse, mean_logp if with_mean_logp else off,
        logits.stride(0), logits.stride(1),
        b_dim, vocab,
        1.0 / temperature, ignore_index,
        HAS_LABELS=labels is not None, WITH_LOGP=with_logp, WITH_ENTROPY=with_entropy,
        WITH_MEAN_LOGP=with_mean_logp,
        **config.launch(),
    )  # fmt: skip
    return logp, entropy, lse, mean_logp


@on_tensor_device
def token_stats_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    grad_mean_logp: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Gradient of ``sum_r g_lp[r] logp[r] + g_H[r] entropy[r] + g_u[r] mean_logp[r]`` w.r.t. ``logits``.

    ``grad_x_v = g_lp (1[v == label] - p_v) - g_H p_v (x_v - mu) + g_u (1/V - p_v)``,
    ``p = exp(x - lse)``, ``mu = lse - entropy = E_p[x]``, then divided by ``temperature``. Rows with
    ``labels[r] == ignore_index`` get a zero row, unread.

    Args:
        logits: ``[A, B, V]`` view with ``stride(2) == 1``, as in the forward.
        labels: ``[N]`` int64 or None (needed when ``grad_logp`` is given).
        lse: ``[N]`` float64 from :func:`token_stats_fwd`.
        entropy: ``[N]`` float64 from the forward; may be None when ``grad_entropy`` is None.
        grad_logp, grad_entropy, grad_mean_logp: ``[N]`` float32 incoming gradients, or None for
            "no such term" (``mean_logp`` itself is not needed).
        temperature, ignore_index: as in the forward.
        block_v: force the block size (tests).

    Returns:
        ``grad_logits``, contiguous ``[A, B, V]`` in the logits' dtype.
    """
    a_dim, b_dim, vocab = check_rows("logits", logits)
    if grad_logp is not None and labels is None:
        raise ValueError("grad_logp needs labels")
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs entropy")
    n_rows = a_dim * b_dim
    if (grad_logp is None and grad_entropy is None and grad_mean_logp is None) or n_rows == 0:
        return torch.zeros((a_dim, b_dim, vocab), dtype=logits.dtype, device=logits.device)
    grad_logits = torch.empty((a_dim, b_dim, vocab), dtype=logits.dtype, device=logits.device)
    config = pick_config(vocab, block_v)
    off = unused_f32(logits.device)  # stands in for the switched-off inputs
    _token_stats_bwd_kernel[(n_rows,)](
        logits, off if labels is None else labels, lse,
        unused_f64(logits.device) if entropy is None else entropy,
        off if grad_logp is None else grad_logp,
        off if grad_entropy is None else grad_entropy,
        off if grad_mean_logp is None else grad_mean_logp,
        grad_logits,
        logits.stride(0), logits.stride(1),
        b_dim, vocab,
        1.0 / temperature, ignore_index,
        HAS_LABELS=labels is not None, GRAD_LOGP=grad_logp is not None,
        GRAD_ENTROPY=grad_entropy is not None, GRAD_MEAN_LOGP=grad_mean_logp is not None,
        **config.launch(),
    )  # fmt: skip
    return grad_logits


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (rlhf_fast/kernels/aot.py): every specialization the launchers can JIT.

# (HAS_LABELS, WITH_LOGP, WITH_ENTROPY, WITH_MEAN_LOGP): logp needs labels (the launcher checks).
# Not the full product (12): every combination without mean_logp and everything on, at every
# config; mean_logp with logp (cross entropy with label smoothing) and alone only at the largest
# config, where registers are tightest. Every switch value is still compiled for every dtype/target.
_FWD_SWITCHES = [(1, 1, 0, 0), (1, 1, 1, 0), (1, 0, 1, 0), (0, 0, 1, 0), (1, 0, 0, 0), (0, 0, 0, 0), (1, 1, 1, 1)]
_FWD_SWITCHES_LARGEST = [(1, 1, 0, 1), (0, 0, 0, 1)]
# (HAS_LABELS, GRAD_LOGP, GRAD_ENTROPY, GRAD_MEAN_LOGP): no gradient at all never launches. The
# same choice as for the forward.
_BWD_SWITCHES = [(1, 1, 0, 0), (1, 1, 1, 0), (1, 0, 1, 0), (0, 0, 1, 0), (1, 1, 1, 1)]
_BWD_SWITCHES_LARGEST = [(1, 1, 0, 1), (0, 0, 0, 1)]


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """Both kernels, for ``dtype`` logits, in the switch combinations above, plus the all-switches-on
    variants with int64 strides (logits past 2**31 elements) at the largest config. Switched-off
    pointers are typed float32: a float32 placeholder stands in for them."""
    dt = TRITON_DTYPE[dtype]
    specs = []
    for config in CONFIGS:
        big = config == CONFIGS[-1]
        for labels, logp, entropy, mean_logp in _FWD_SWITCHES + (_FWD_SWITCHES_LARGEST if big else []):
            for index_type in ("i32", "i64") if big and logp and entropy and mean_logp else ("i32",):
                specs.append(aot_spec(
                    _token_stats_fwd_kernel, config, dt,
                    switches={"HAS_LABELS": bool(labels), "WITH_LOGP": bool(logp), "WITH_ENTROPY": bool(entropy),
                              "WITH_MEAN_LOGP": bool(mean_logp)},
                    types={"logits_ptr": f"*{dt}", "labels_ptr": "*i64" if labels else "*fp32",
                           "inv_temperature": "fp32"},
                    rows_read=1, rows_written=0, index_type=index_type,
                ))  # fmt: skip
        for labels, grad_logp, grad_entropy, grad_mean_logp in _BWD_SWITCHES + (_BWD_SWITCHES_LARGEST if big else []):
            for index_type in ("i32", "i64") if big and grad_logp and grad_entropy and grad_mean_logp else ("i32",):
                specs.append(aot_spec(
                    _token_stats_bwd_kernel, config, dt,
                    switches={"HAS_LABELS": bool(labels), "GRAD_LOGP": bool(grad_logp),
                              "GRAD_ENTROPY": bool(grad_entropy), "GRAD_MEAN_LOGP": bool(grad_mean_logp)},
                    types={"logits_ptr": f"*{dt}", "labels_ptr": "*i64" if labels else "*fp32",
                           "grad_logits_ptr": f"*{dt}", "inv_temperature": "fp32"},
                    rows_read=1, rows_written=1, index_type=index_type,
                ))  # fmt: skip
    return specs
