"""The two walks over one logits row that every token-stats kernel is built from.

``row_stats`` streams a row once and returns its log-sum-exp, entropy and mean log-probability
(online, one read); ``write_grad_row`` streams it once more and writes the gradient of
``g_lp * logp + g_H * entropy + g_u * mean_logp`` with respect to the row. The forward and backward
kernels (``token_stats.py``) call one each; the fused kernel (``token_stats_fused.py``) calls both,
so a row is read from memory once and its gradient written once.

With ``x = row / T``, ``p = softmax(x)``, ``lse = log sum_v exp(x_v)``::

    entropy   = lse - sum_v p_v x_v
    mean_logp = (1/V) sum_v log p_v = (1/V) sum_v x_v - lse        (-inf if any x_v = -inf)
    d/dx_v [g_lp logp + g_H entropy + g_u mean_logp]
              = g_lp (1[v == label] - p_v) - g_H p_v (x_v - mu) + g_u (1/V - p_v)

with ``mu = E_p[x] = lse - entropy``. The entropy factor is taken as ``x_v - mu``, not as ``log p_v + entropy``:
on a near-uniform row both of those are ~log V and their float32 roundings (~5e-7) would be most of the factor.
The interface keeps ``lse`` and ``entropy`` in float64 (``lse64``, ``entropy64``), so that ``lse - entropy`` gives
``mu`` to double rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lse64(m, log_s):
    """The saved log-sum-exp ``m + log_s`` in float64 (the kernel interface's; see ``split_lse``)."""
    return m.to(tl.float64) + log_s.to(tl.float64)


@triton.jit
def entropy64(log_s, t_over_s):
    """The saved entropy ``log_s - t_over_s`` in float64 from its float32 parts, like ``lse64``: ``lse64 -
    entropy64`` is then ``m + t_over_s = E_p[x]`` (see the module doc)."""
    return log_s.to(tl.float64) - t_over_s.to(tl.float64)


@triton.jit
def centred_lse(lse, log_v):
    """A float64 ``lse`` (scalar or block) against a float32 reference inside its row's logits:
    ``(R, rest, scale)``, ``R = float32(lse - log V)``, ``rest = lse - R`` in float64 (~log V) and
    ``scale = exp(-rest)`` in float32, so that ``p = exp(x - R) * scale``.

    ``lse - log V`` lies between the row's mean and max logit, so ``x - R`` is as exact as ``x - max``: next to
    1e4-sized logits, and on near-uniform rows, where ``x - float32(lse)`` would round to the ulp of ``lse ~ log V``
    (5e-7 where the differences that matter are ~1e-3). ``x - R <= max - R <= log V``: its exp cannot overflow.
    A non-finite ``lse`` is its own reference, ``rest = 0``. ``scale`` comes from ``rest``'s float32 parts
    (``split_lse``), not a float64 exp: that held the fused-linear KL's float32 dW kernel to 64 registers, and it
    spilled.
    """
    r = (lse - log_v).to(tl.float32)
    finite = tl.abs(r) < float("inf")
    r = tl.where(finite, r, lse.to(tl.float32))
    rest = tl.where(finite, lse - r.to(tl.float64), 0.0)
    rest_hi, rest_lo = split_lse(rest)
    return r, rest, tl.exp(-rest_hi) * tl.exp(-rest_lo)


@triton.jit
def split_lse(lse):
    """A float64 ``lse`` (scalar or block) as float32 ``(hi, lo)``, ``lse = hi + lo``.

    The backward takes ``log p = (x - hi) - lo``: ``x - hi`` is exact next to the row max, and ``lo`` is the
    part of ``lse`` float32 cannot hold (up to half an ulp of ``hi``: 5e-4 at ``|x| = 1e4``, which a float32
    ``lse`` would put into every ``p``). A non-finite ``lse`` keeps ``lo = 0``.
    """
    hi = lse.to(tl.float32)
    lo = (lse - hi.to(tl.float64)).to(tl.float32)
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)


@triton.jit
def row_position(B):
    """(row, a, b) of this program, all int64: row r = a * B + b of the [A, B, V] logits view.

    int64 because ``row * V`` and ``a * stride_a`` pass 2**31 for large batches and vocabularies.
    """
    pid = tl.program_id(0)
    a = pid // B
    return pid.to(tl.int64), a.to(tl.int64), (pid - a * B).to(tl.int64)


@triton.jit
def row_stats(
    row_ptr,  # first element of the row; its V elements are contiguous
    n_read,  # V, or 0 to skip the row (the outputs are then meaningless: callers mask them)
    V,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    WITH_MEAN_LOGP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``(m, log_s, t_over_s, mean_logp)`` of one row, float32 scalars: ``lse = m + log_s`` with ``m`` the
    row's max (kept apart so that ``x - lse`` can be taken as ``(x - m) - log_s`` without rounding
    ``log_s`` into a large ``m``), ``t_over_s = E_p[x] - m``, so ``entropy = log_s - t_over_s``;
    ``t_over_s``/``mean_logp`` are 0 unless asked for."""
    cols = tl.arange(0, BLOCK_V)
    # Running max m is one scalar per row (a cross-warp max per block), so the per-lane sums
    # share one reference point and are only reduced once, after the loop:
    #   s_acc[i] = sum exp(x - m),   t_acc[i] = sum exp(x - m) * (x - m),   u_acc[i] + u_shift = sum (x - m) / V
    # t and u are kept relative to m so that H = log s - t / s and mean_logp = u - log s do not
    # cancel two numbers of the size of the logits (a 1e4 logit next to O(1) ones gives H ~ 0, not
    # 1e4 - 1e4 in float32); u's terms are divided by V before they are added, so that the sum cannot
    # overflow where mean_logp itself is in range (sum |x - m| > 3.4e38 with every logit finite).
    m = tl.full((), float("-inf"), tl.float32)
    s_acc = tl.zeros([BLOCK_V], tl.float32)
    t_acc = tl.zeros([BLOCK_V], tl.float32)
    u_acc = tl.zeros([BLOCK_V], tl.float32)
    u_shift = tl.zeros((), tl.float32)
    inv_v = 1.0 / V
    for start in range(0, n_read, BLOCK_V):
        offs = start + cols
        mask = offs < V
        # load and upcast; padding is -inf so it carries no probability mass
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While everything seen is -inf, use 0 as the reference: exp(-inf - -inf) would be NaN.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ref)
        d = x - ref
        e = tl.exp(d)
        # Moving the reference from m to ref shifts every (x - m) seen so far by (m - ref); nothing
        # to shift (and -inf * 0 to avoid) while m is still -inf.
        shift = tl.where(m == float("-inf"), 0.0, m - ref)
        if WITH_ENTROPY:
            # a -inf logit has p = 0 and contributes 0, not 0 * -inf
            t_acc = alpha * (t_acc + shift * s_acc) + tl.where(x == float("-inf"), 0.0, e * d)
        if WITH_MEAN_LOGP:
            # every block before this one was full: `start` values have been summed so far
            u_shift += shift * (start / V)
            # a -inf logit makes the sum (and mean_logp) -inf, as it should; padding adds nothing
            u_acc += tl.where(mask, d * inv_v, 0.0)
        s_acc = alpha * s_acc + e
        m = m_new

    s = tl.sum(s_acc, axis=0)
    log_s = tl.log(s)
    t_over_s = tl.zeros((), tl.float32)
    mean_logp = tl.zeros((), tl.float32)
    if WITH_ENTROPY:
        t_over_s = tl.sum(t_acc, axis=0) / s
    if WITH_MEAN_LOGP:
        mean_logp = (tl.sum(u_acc, axis=0) + u_shift) - log_s
    return m, log_s, t_over_s, mean_logp


@triton.jit
def write_grad_row(
    row_ptr,  # first element of the logits row (V contiguous elements)
    out_ptr,  # first element of the gradient row (V contiguous elements); may equal row_ptr
    n_read,  # V, or 0 for a row that gets a zero gradient without being read
    V,
    inv_temperature,
    lse_hi,  # the row's lse as split_lse gives it
    lse_lo,
    label,  # used if GRAD_LOGP
    g_lp,  # incoming gradients, already divided by T; each used only if its switch is on
    g_h,
    mu_hi,  # mu = E_p[x] = mu_hi + mu_lo, float32 parts (used if GRAD_ENTROPY)
    mu_lo,
    g_u,
    GRAD_LOGP: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    GRAD_MEAN_LOGP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Write one gradient row; each block of the row is read before the same block is written, so
    ``out_ptr`` may point at the logits row itself (in-place backward)."""
    # grad_v = p_v * (c - g_H * (x_v - mu)) + g_lp * 1[v == label] + g_u / V,
    # with c = -g_lp - g_u per row.
    c = 0.0
    if GRAD_LOGP:
        c -= g_lp
    if GRAD_MEAN_LOGP:
        c -= g_u
        g_u_per_col = g_u / V

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_read, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        logp = (x - lse_hi) - lse_lo
        p = tl.exp(logp)
        if GRAD_ENTROPY:
            # p = 0 where x = -inf; zero the factor there so that p times it is 0, not 0 * -inf
            grad = p * (c - g_h * tl.where(x == float("-inf"), 0.0, (x - mu_hi) - mu_lo))
        else:
            grad = p * c
        if GRAD_MEAN_LOGP:
            grad += g_u_per_col
        if GRAD_LOGP:
            grad = tl.where(offs == label, grad + g_lp, grad)
        tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)
    for start in range(n_read, V, BLOCK_V):
        offs = start + cols
        tl.store(out_ptr + offs, tl.zeros([BLOCK_V], out_ptr.dtype.element_ty), mask=offs < V)
