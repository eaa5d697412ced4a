"""Per-token log-probability, entropy and log-sum-exp of ``softmax(logits / T)``, streamed per row.

Forward, per row ``r`` of a ``[A, B, V]`` logits view (``x = logits[r].float() / T``)::

    lse     = log sum_v exp(x_v)
    logp    = x[label] - lse                          (0 on ignored rows)
    entropy = lse - sum_v softmax(x)_v x_v            (0 on ignored rows)

computed in one read of the row with an online log-sum-exp; only these three numbers per row are
kept. Backward, with ``p = exp(x - lse)`` and ``log p = x - lse``::

    d logp / dx_v    = 1[v == label] - p_v
    d entropy / dx_v = -p_v (log p_v + entropy)

written in one more read of the row and one write of ``grad_logits``.

One program per row, grid ``(A * B,)``; row ``r`` sits at ``(r // B) * stride_a + (r % B) *
stride_b``, so a ``logits[:, :-1]`` slice is read in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import CONFIGS, TRITON_DTYPE, AotSpec, aot_spec, check_rows, empty_f32, pick_config

__all__ = ["CONFIGS", "aot_specs", "token_stats_bwd", "token_stats_fwd"]


@triton.jit(do_not_specialize=["ignore_index"])
def _token_stats_fwd_kernel(
    # pointers
    logits_ptr,  # [A, B, V] view, stride(2) == 1
    labels_ptr,  # [N] int64; unused unless HAS_LABELS
    logp_ptr,  # [N] float32 out; unused unless WITH_LOGP
    entropy_ptr,  # [N] float32 out; unused unless WITH_ENTROPY
    lse_ptr,  # [N] float32 out
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
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    a = pid // B
    row_ptr = logits_ptr + a.to(tl.int64) * stride_a + (pid - a * B).to(tl.int64) * stride_b

    n_read = V
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        # An ignored row is never read: its loop below runs zero times.
        n_read = tl.where(valid, V, 0)

    cols = tl.arange(0, BLOCK_V)
    # Running max m is one scalar per row (a cross-warp max per block), so the per-lane sums
    # share one reference point and are only reduced once, after the loop:
    #   s_acc[i] = sum exp(x - m),   t_acc[i] = sum exp(x - m) * (x - m)
    # t is kept relative to m so that H = log s - t / s does not cancel two numbers of the size of
    # the logits (a 1e4 logit next to O(1) ones gives H ~ 0, not 1e4 - 1e4 in float32).
    m = tl.full((), float("-inf"), tl.float32)
    s_acc = tl.zeros([BLOCK_V], tl.float32)
    t_acc = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_read, BLOCK_V):
        offs = start + cols
        # load and upcast; padding is -inf so it carries no probability mass
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While everything seen is -inf, use 0 as the reference: exp(-inf - -inf) would be NaN.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ref)
        e = tl.exp(x - ref)
        if WITH_ENTROPY:
            # Moving the reference from m to ref shifts every (x - m) by (m - ref); nothing to shift
            # (and -inf * 0 to avoid) while m is still -inf.
            shift = tl.where(m == float("-inf"), 0.0, m - ref)
            # a -inf logit has p = 0 and contributes 0, not 0 * -inf
            xe = tl.where(x == float("-inf"), 0.0, e * (x - ref))
            t_acc = alpha * (t_acc + shift * s_acc) + xe
        s_acc = alpha * s_acc + e
        m = m_new

    s = tl.sum(s_acc, axis=0)
    log_s = tl.log(s)
    lse = m + log_s
    if HAS_LABELS:
        lse = tl.where(valid, lse, 0.0)
    tl.store(lse_ptr + row, lse)
    if WITH_LOGP:
        # One extra scalar read of x[label], from L2: the loop has just streamed this row.
        x_label = tl.load(row_ptr + label, mask=valid, other=0.0).to(tl.float32) * inv_temperature
        tl.store(logp_ptr + row, tl.where(valid, x_label - lse, 0.0))
    if WITH_ENTROPY:
        entropy = log_s - tl.sum(t_acc, axis=0) / s
        if HAS_LABELS:
            entropy = tl.where(valid, entropy, 0.0)
        tl.store(entropy_ptr + row, entropy)


@triton.jit(do_not_specialize=["ignore_index"])
def _token_stats_bwd_kernel(
    # pointers
    logits_ptr,  # [A, B, V] view, stride(2) == 1
    labels_ptr,  # [N] int64; unused unless HAS_LABELS
    lse_ptr,  # [N] float32
    entropy_ptr,  # [N] float32; unused unless GRAD_ENTROPY
    grad_logp_ptr,  # [N] float32; unused unless GRAD_LOGP
    grad_entropy_ptr,  # [N] float32; unused unless GRAD_ENTROPY
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
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    a = pid // B
    row_ptr = logits_ptr + a.to(tl.int64) * stride_a + (pid - a * B).to(tl.int64) * stride_b
    out_ptr = grad_logits_ptr + row * V

    lse = tl.load(lse_ptr + row)
    # grad_logits_v = p_v * (c - g_H * log p_v) + g_lp * 1[v == label], with c = -g_lp - g_H * H,
    # all divided by T: the 1/T is folded into the per-row coefficients g_lp, g_H and c.
    c = 0.0
    if GRAD_LOGP:
        g_lp = tl.load(grad_logp_ptr + row) * inv_temperature
        c -= g_lp
    if GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row) * inv_temperature
        c -= g_h * tl.load(entropy_ptr + row)

    n_read = V
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        # An ignored row is never read; the second loop fills it with zeros.
        n_read = tl.where(label != ignore_index, V, 0)

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_read, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        logp = x - lse
        p = tl.exp(logp)
        if GRAD_ENTROPY:
            # p = 0 where x = -inf; zero log p there so p * log p is 0, not 0 * -inf
            grad = p * (c - g_h * tl.where(x == float("-inf"), 0.0, logp))
        else:
            grad = p * c
        if GRAD_LOGP:
            grad = tl.where(offs == label, grad + g_lp, grad)
        tl.store(out_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)
    for start in range(n_read, V, BLOCK_V):
        offs = start + cols
        zero = tl.zeros([BLOCK_V], grad_logits_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, zero, mask=offs < V)


def token_stats_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    with_logp: bool,
    with_entropy: bool,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(logp, entropy, lse)`` of ``softmax(logits / temperature)``.

    Args:
        logits: ``[A, B, V]`` float32/bfloat16/float16 view with ``stride(2) == 1``; rows are
            ``r = a * B + b``, ``N = A * B``.
        labels: ``[N]`` int64 (already validated: in ``[0, V)`` or ``== ignore_index``) or None.
            Rows whose label is ``ignore_index`` are not read and get 0 in every output.
        temperature: ``x = logits.float() / temperature``.
        with_logp: return ``logp[r] = x[r, labels[r]] - lse[r]`` (needs ``labels``).
        with_entropy: return ``entropy[r] = lse[r] - sum_v softmax(x[r])_v x[r, v]``.
        block_v: force the block size (a power of two); tests use it to make rows span blocks.

    Returns:
        ``(logp, entropy, lse)``, float32 ``[N]``; ``logp``/``entropy`` are empty ``[0]`` when not
        requested. ``lse`` is always returned: the backward needs it.
    """
    a_dim, b_dim, vocab = check_rows("logits", logits)
    if with_logp and labels is None:
        raise ValueError("with_logp=True needs labels")
    n_rows = a_dim * b_dim
    device = logits.device
    lse = torch.empty(n_rows, dtype=torch.float32, device=device)
    logp = torch.empty(n_rows, dtype=torch.float32, device=device) if with_logp else empty_f32(device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device) if with_entropy else empty_f32(device)
    if n_rows == 0:
        return logp, entropy, lse
    config = pick_config(vocab, block_v)
    # Outputs (and labels) that are switched off are never touched; lse stands in for their pointer.
    _token_stats_fwd_kernel[(n_rows,)](
        logits, lse if labels is None else labels, logp if with_logp else lse,
        entropy if with_entropy else lse, lse,
        logits.stride(0), logits.stride(1),
        b_dim, vocab,
        1.0 / temperature, ignore_index,
        HAS_LABELS=labels is not None, WITH_LOGP=with_logp, WITH_ENTROPY=with_entropy,
        BLOCK_V=config.block_v, num_warps=config.num_warps,
    )  # fmt: skip
    return logp, entropy, lse


def token_stats_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Gradient of ``sum_r g_lp[r] * logp[r] + g_H[r] * entropy[r]`` with respect to ``logits``.

    ``grad_x_v = g_lp (1[v == label] - p_v) - g_H p_v (log p_v + H)``, ``p = exp(x - lse)``, then
    divided by ``temperature``. Rows with ``labels[r] == ignore_index`` get a zero row, unread.

    Args:
        logits: ``[A, B, V]`` view with ``stride(2) == 1``, as in the forward.
        labels: ``[N]`` int64 or None (needed when ``grad_logp`` is given).
        lse: ``[N]`` float32 from :func:`token_stats_fwd`.
        entropy: ``[N]`` float32 from the forward; may be None when ``grad_entropy`` is None.
        grad_logp, grad_entropy: ``[N]`` float32 incoming gradients, or None for "no such term".
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
    if (grad_logp is None and grad_entropy is None) or n_rows == 0:
        return torch.zeros((a_dim, b_dim, vocab), dtype=logits.dtype, device=logits.device)
    grad_logits = torch.empty((a_dim, b_dim, vocab), dtype=logits.dtype, device=logits.device)
    config = pick_config(vocab, block_v)
    _token_stats_bwd_kernel[(n_rows,)](
        logits, lse if labels is None else labels, lse,
        lse if entropy is None else entropy,
        lse if grad_logp is None else grad_logp,
        lse if grad_entropy is None else grad_entropy,
        grad_logits,
        logits.stride(0), logits.stride(1),
        b_dim, vocab,
        1.0 / temperature, ignore_index,
        HAS_LABELS=labels is not None, GRAD_LOGP=grad_logp is not None,
        GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_V=config.block_v, num_warps=config.num_warps,
    )  # fmt: skip
    return grad_logits


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (kernels/aot.py): every specialization the launchers can JIT.

# (HAS_LABELS, WITH_LOGP, WITH_ENTROPY): logp needs labels (the launcher checks)
_FWD_SWITCHES = [(1, 1, 0), (1, 1, 1), (1, 0, 1), (0, 0, 1), (1, 0, 0), (0, 0, 0)]
# (HAS_LABELS, GRAD_LOGP, GRAD_ENTROPY): no gradient at all never launches
_BWD_SWITCHES = [(1, 1, 0), (1, 1, 1), (1, 0, 1), (0, 0, 1)]


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """Both kernels, for ``dtype`` logits, in every (switches, config) the launchers may use, plus
    the all-switches-on variant with int64 strides (logits past 2**31 elements) at the largest config.
    Switched-off pointers are typed float32: lse stands in for them."""
    dt = TRITON_DTYPE[dtype]
    specs = []
    for config in CONFIGS:
        big = config == CONFIGS[-1]
        for labels, logp, entropy in _FWD_SWITCHES:
            for index_type in ("i32", "i64") if big and logp and entropy else ("i32",):
                specs.append(aot_spec(
                    _token_stats_fwd_kernel, config, dt,
                    switches={"HAS_LABELS": bool(labels), "WITH_LOGP": bool(logp), "WITH_ENTROPY": bool(entropy)},
                    types={"logits_ptr": f"*{dt}", "labels_ptr": "*i64" if labels else "*fp32",
                           "inv_temperature": "fp32"},
                    rows_read=1, rows_written=0, index_type=index_type,
                ))  # fmt: skip
        for labels, grad_logp, grad_entropy in _BWD_SWITCHES:
            for index_type in ("i32", "i64") if big and grad_logp and grad_entropy else ("i32",):
                specs.append(aot_spec(
                    _token_stats_bwd_kernel, config, dt,
                    switches={"HAS_LABELS": bool(labels), "GRAD_LOGP": bool(grad_logp),
                              "GRAD_ENTROPY": bool(grad_entropy)},
                    types={"logits_ptr": f"*{dt}", "labels_ptr": "*i64" if labels else "*fp32",
                           "grad_logits_ptr": f"*{dt}", "inv_temperature": "fp32"},
                    rows_read=1, rows_written=1, index_type=index_type,
                ))  # fmt: skip
    return specs
