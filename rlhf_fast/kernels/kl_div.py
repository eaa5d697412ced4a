"""Exact per-token KL(P || Q) between two logits tensors, streamed per row.

With ``x = p_logits[r] / T``, ``y = q_logits[r] / T``, ``P = softmax(x)``, ``Q = softmax(y)``::

    kl = sum_v P_v (log P_v - log Q_v) = E_P[(x - m_x) - (y - m_y)] - log s_x + log s_y

where ``m`` is a running max and ``s = sum exp(. - m)``: one read of both rows, no top-k or
sampling approximation. Backward, with ``g`` the incoming gradient of ``kl``::

    d kl / dx_v = P_v ((x_v - lse_x) - (y_v - lse_y) - kl)
    d kl / dy_v = Q_v - P_v

Terms with ``P_v = 0`` (``x_v = -inf``) contribute 0; ``P_v > 0`` with ``Q_v = 0`` makes the row's
KL ``+inf``. One program per row, grid ``(A * B,)``; each input has its own two strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import CONFIGS, TRITON_DTYPE, AotSpec, aot_spec, check_rows, empty_f32, on_tensor_device, pick_config
from ._softmax_row import centred_lse, lse64, row_position

__all__ = ["CONFIGS", "aot_specs", "kl_bwd", "kl_fwd"]


@triton.jit
def _kl_fwd_kernel(
    # pointers
    p_ptr,  # [A, B, V] view of P's logits, stride(2) == 1
    q_ptr,  # [A, B, V] view of Q's logits, stride(2) == 1
    kl_ptr,  # [N] float32 out
    lse_p_ptr,  # [N] float64 out (see split_lse)
    lse_q_ptr,  # [N] float64 out
    # strides, in elements (the two views need not share them)
    p_stride_a,
    p_stride_b,
    q_stride_a,
    q_stride_b,
    # sizes
    B,
    V,
    # runtime scalar (never constexpr: each new value would recompile)
    inv_temperature,  # 1 / temperature
    # constexpr
    BLOCK_V: tl.constexpr,
):
    row, a, b = row_position(B)
    p_row = p_ptr + a * p_stride_a + b * p_stride_b
    q_row = q_ptr + a * q_stride_a + b * q_stride_b

    cols = tl.arange(0, BLOCK_V)
    # Scalar running maxima, per-lane sums relative to them (reduced once, after the loop):
    #   s_x = sum exp(x - m_x),  s_y = sum exp(y - m_y),
    #   t   = sum exp(x - m_x) ((x - m_x) - (y - m_y))
    # Keeping t relative to both maxima avoids subtracting two logit-sized numbers at the end.
    m_x = tl.full((), float("-inf"), tl.float32)
    m_y = tl.full((), float("-inf"), tl.float32)
    s_x = tl.zeros([BLOCK_V], tl.float32)
    s_y = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        # load and upcast; padding is -inf in both so it carries no mass in either distribution
        x = tl.load(p_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        y = tl.load(q_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        mx_new = tl.maximum(m_x, tl.max(x, axis=0))
        my_new = tl.maximum(m_y, tl.max(y, axis=0))
        # 0 as the reference while a row has shown nothing but -inf: exp(-inf - -inf) is NaN
        ref_x = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        ref_y = tl.where(my_new == float("-inf"), 0.0, my_new)
        alpha_x = tl.exp(m_x - ref_x)
        # moving the references shifts every (x - m_x) - (y - m_y) by this much
        shift = tl.where(m_x == float("-inf"), 0.0, m_x - ref_x) - tl.where(m_y == float("-inf"), 0.0, m_y - ref_y)
        ex = tl.exp(x - ref_x)
        # P_v = 0: no contribution (not 0 * inf); P_v > 0 = Q_v: +inf, even where exp(x - m) underflows
        term = tl.where(y == float("-inf"), float("inf"), ex * ((x - ref_x) - (y - ref_y)))
        term = tl.where(x == float("-inf"), 0.0, term)
        # once +inf, a lane stays +inf: a rescale by an underflowed alpha must not make it 0 * inf
        t = tl.where(t == float("inf"), t, alpha_x * (t + shift * s_x)) + term
        s_x = alpha_x * s_x + ex
        s_y = tl.exp(m_y - ref_y) * s_y + tl.exp(y - ref_y)
        m_x = mx_new
        m_y = my_new

    sx = tl.sum(s_x, axis=0)
    sy = tl.sum(s_y, axis=0)
    log_sx = tl.log(sx)
    log_sy = tl.log(sy)
    # log_sx - log_sy first, as the cpp kernel: both are ~log V on near-uniform rows, and (t / sx - log_sx) would
    # round the small KL to the ulp of log V (the backward's lse_p - lse_q + KL relies on the same cancellation)
    kl = tl.sum(t, axis=0) / sx - (log_sx - log_sy)
    tl.store(kl_ptr + row, kl)
    tl.store(lse_p_ptr + row, lse64(m_x, log_sx))
    tl.store(lse_q_ptr + row, lse64(m_y, log_sy))


@triton.jit
def _kl_bwd_kernel(
    # pointers
    p_ptr,  # [A, B, V] view of P's logits, stride(2) == 1
    q_ptr,  # [A, B, V] view of Q's logits, stride(2) == 1
    lse_p_ptr,  # [N] float64
    lse_q_ptr,  # [N] float64
    kl_ptr,  # [N] float32
    grad_kl_ptr,  # [N] float32
    grad_p_ptr,  # [N, V] out, contiguous, logits dtype; unused unless NEED_P
    grad_q_ptr,  # [N, V] out, contiguous, logits dtype; unused unless NEED_Q
    # strides, in elements (the gradients are contiguous: their row stride is V)
    p_stride_a,
    p_stride_b,
    q_stride_a,
    q_stride_b,
    # sizes
    B,
    V,
    # runtime scalar (never constexpr: each new value would recompile)
    inv_temperature,  # 1 / temperature
    # constexpr: which gradients to write, block size
    NEED_P: tl.constexpr,
    NEED_Q: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row, a, b = row_position(B)
    p_row = p_ptr + a * p_stride_a + b * p_stride_b
    q_row = q_ptr + a * q_stride_a + b * q_stride_b

    # Each side against R = float32(lse - log V), inside the row's logits (see centred_lse): p = exp(x - R_x) e^-rest_x
    # with e^-rest_x (and 1/T) folded into the row's coefficient, and log P - log Q - KL = (u_x - u_y) - centre,
    # u = x - R, centre = rest_x - rest_y + KL from float64. Against float32(lse) instead, u_x and u_y are both
    # ~-log V on a near-uniform row and their roundings (~5e-7) most of a difference of ~1e-3.
    log_v = tl.log(V * 1.0).to(tl.float64)
    r_x, rest_x, scale_x = centred_lse(tl.load(lse_p_ptr + row), log_v)
    r_y, rest_y, scale_y = centred_lse(tl.load(lse_q_ptr + row), log_v)
    g = tl.load(grad_kl_ptr + row) * inv_temperature
    coef_x = g * scale_x
    coef_y = g * scale_y
    centre = ((rest_x - rest_y) + tl.load(kl_ptr + row).to(tl.float64)).to(tl.float32)

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(p_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        y = tl.load(q_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        u_x = x - r_x
        u_y = y - r_y
        e_x = tl.exp(u_x)
        if NEED_P:
            # P_v = 0 contributes nothing (and -inf - -inf must not leak a NaN); a NaN P_v stays NaN
            grad_x = tl.where(e_x == 0.0, 0.0, coef_x * e_x * ((u_x - u_y) - centre))
            tl.store(grad_p_ptr + row * V + offs, grad_x.to(grad_p_ptr.dtype.element_ty), mask=mask)
        if NEED_Q:
            grad_y = coef_y * tl.exp(u_y) - coef_x * e_x
            tl.store(grad_q_ptr + row * V + offs, grad_y.to(grad_q_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def kl_fwd(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float, *, block_v: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact ``KL(softmax(p_logits / T) || softmax(q_logits / T))`` per row.

    Args:
        p_logits, q_logits: ``[A, B, V]`` views of the same shape and dtype (float32/bfloat16/
            float16), ``stride(2) == 1``, other strides independent. ``N = A * B``.
        temperature: both inputs are divided by it.
        block_v: force the block size (a power of two); tests use it to make rows span blocks.

    Returns:
        ``(kl, lse_p, lse_q)``, ``[N]``: ``kl`` float32, the log-sum-exps float64 (for the backward).
    """
    a_dim, b_dim, vocab = check_rows("p_logits", p_logits)
    if check_rows("q_logits", q_logits) != (a_dim, b_dim, vocab) or q_logits.dtype != p_logits.dtype:
        raise ValueError("p_logits and q_logits must have the same shape and dtype")
    n_rows = a_dim * b_dim
    kl = torch.empty(n_rows, dtype=torch.float32, device=p_logits.device)
    lse_p, lse_q = (torch.empty(n_rows, dtype=torch.float64, device=p_logits.device) for _ in range(2))
    if n_rows == 0:
        return kl, lse_p, lse_q
    config = pick_config(vocab, block_v)
    _kl_fwd_kernel[(n_rows,)](
        p_logits, q_logits, kl, lse_p, lse_q,
        p_logits.stride(0), p_logits.stride(1), q_logits.stride(0), q_logits.stride(1),
        b_dim, vocab,
        1.0 / temperature,
        **config.launch(),
    )  # fmt: skip
    return kl, lse_p, lse_q


@on_tensor_device
def kl_bwd(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    lse_p: torch.Tensor,
    lse_q: torch.Tensor,
    kl: torch.Tensor,
    grad_kl: torch.Tensor,
    temperature: float,
    need_p: bool,
    need_q: bool,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_r grad_kl[r] * kl[r]`` with respect to the requested logits.

    ``grad_p_v = g P_v ((x_v - lse_p) - (y_v - lse_q) - kl) / T`` (0 where ``P_v = 0``),
    ``grad_q_v = g (Q_v - P_v) / T``. A row whose KL is ``+inf`` (``P_v > 0 = Q_v``) has no finite
    gradient.

    Args:
        p_logits, q_logits: the forward's ``[A, B, V]`` views.
        lse_p, lse_q, kl: ``[N]`` from :func:`kl_fwd`.
        grad_kl: ``[N]`` float32 incoming gradient.
        need_p, need_q: which gradients to compute.
        block_v: force the block size (tests).

    Returns:
        ``(grad_p, grad_q)``: contiguous ``[A, B, V]`` in the logits' dtype, or an empty float32
        ``[0]`` for a gradient not requested.
    """
    a_dim, b_dim, vocab = check_rows("p_logits", p_logits)
    check_rows("q_logits", q_logits)
    n_rows = a_dim * b_dim
    shape, dtype, device = (a_dim, b_dim, vocab), p_logits.dtype, p_logits.device
    grad_p = torch.empty(shape, dtype=dtype, device=device) if need_p else empty_f32(device)
    grad_q = torch.empty(shape, dtype=dtype, device=device) if need_q else empty_f32(device)
    if n_rows == 0 or not (need_p or need_q):
        return grad_p, grad_q
    config = pick_config(vocab, block_v)
    # A gradient that is not requested is never written; the other one stands in for its pointer.
    _kl_bwd_kernel[(n_rows,)](
        p_logits, q_logits, lse_p, lse_q, kl, grad_kl,
        grad_p if need_p else grad_q, grad_q if need_q else grad_p,
        p_logits.stride(0), p_logits.stride(1), q_logits.stride(0), q_logits.stride(1),
        b_dim, vocab,
        1.0 / temperature,
        NEED_P=need_p, NEED_Q=need_q,
        **config.launch(),
    )  # fmt: skip
    return grad_p, grad_q


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (rlhf_fast/kernels/aot.py): every specialization the launchers can JIT.


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """Both kernels, for ``dtype`` logits, in every (switches, config) the launchers may use, plus
    int64 strides (logits past 2**31 elements) at the largest config."""
    dt = TRITON_DTYPE[dtype]
    types = {"p_ptr": f"*{dt}", "q_ptr": f"*{dt}", "inv_temperature": "fp32"}
    grad_types = {**types, "grad_p_ptr": f"*{dt}", "grad_q_ptr": f"*{dt}"}
    specs = []
    for config in CONFIGS:
        index_types = ("i32", "i64") if config == CONFIGS[-1] else ("i32",)
        for index_type in index_types:
            specs.append(aot_spec(
                _kl_fwd_kernel, config, dt, switches={}, types=types,
                rows_read=2, rows_written=0, index_type=index_type,
            ))  # fmt: skip
        for need_p, need_q in [(True, True), (True, False), (False, True)]:
            for index_type in index_types if need_p and need_q else ("i32",):
                specs.append(aot_spec(
                    _kl_bwd_kernel, config, dt, switches={"NEED_P": need_p, "NEED_Q": need_q}, types=grad_types,
                    rows_read=2, rows_written=need_p + need_q, index_type=index_type,
                ))  # fmt: skip
    return specs
