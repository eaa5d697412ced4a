"""The ``torch`` backend: the kernel interface in plain PyTorch, for any device.

Same four functions and semantics as the Triton and C++ kernels (see ``rlhf_fast/ops/_custom.py``),
written with ordinary tensor ops. Rows are processed in chunks so that the float32 temporaries stay
near ``_CHUNK_BYTES`` instead of growing with ``tokens x vocab``; it is the fallback where neither
compiled backend runs, and an independent check of their analytic gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

_CHUNK_BYTES = 32 * 2**20


def _row_chunks(logits: torch.Tensor) -> Iterator[tuple[int, int, int]]:
    """Yield (a, b0, b1): rows logits[a, b0:b1] are one chunk (each a plain 2-D view, no copy)."""
    A, B, V = logits.shape
    step = max(1, _CHUNK_BYTES // (4 * max(V, 1)))
    for a in range(A):
        for b0 in range(0, B, step):
            yield a, b0, min(b0 + step, B)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=like.device)


def _p_times(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # p * x with 0 * (-inf) := 0: masked vocabulary entries carry no probability mass. A NaN p (from a NaN
    # logit) stays NaN.
    return torch.where(p == 0, torch.zeros_like(p), p * x)


def _shifted(x):
    """``(m, d, log_s)`` of scaled rows ``x: [rows, V]``: the row max, ``d = x - m`` and ``log sum exp(d)``, so
    that ``log p = d - log_s`` and ``lse = m + log_s``. Everything is taken relative to ``m``, as the compiled
    kernels do: ``x - lse`` with a float32 ``lse`` would round ``log_s`` away next to a large ``m``."""
    m = x.amax(-1)
    m = torch.where(torch.isfinite(m), m, 0.0)  # all -inf, +inf or NaN rows: their results are -inf/NaN anyway
    d = x - m[:, None]
    return m, d, torch.exp(d).sum(-1).log()  # d <= 0: no overflow


def _lse64(m, log_s):
    """The saved ``lse = m + log_s`` in float64 (the kernel interface's), exact for float32 parts."""
    return m.double() + log_s.double()


def _minus_lse(x, lse):
    """``x - lse`` for float32 rows and a float64 ``lse`` per row (or any other float64 centre, such as
    ``E_p[x]``): against its float32 part ``hi``, exact next to the values it is near, then the rest ``lo`` (as
    the kernels' ``SplitLse``)."""
    hi = lse.float()
    lo = torch.where(torch.isfinite(hi), (lse - hi.double()).float(), 0.0)
    return (x - hi[:, None]).sub_(lo[:, None])


def _centred(x, lse):
    """``(x - R, lse - R)`` for float32 rows ``x: [rows, V]`` and their float64 ``lse``, ``R = float32(lse - log V)``
    (``lse - R`` float64): ``R`` lies between a row's mean and max logit, so ``x - R`` is as exact as ``x - max``,
    also on near-uniform rows, where ``x - float32(lse)`` would round to the ulp of ``lse ~ log V``. As the kernels'
    ``centred_lse``; a non-finite ``lse`` is its own reference."""
    r = (lse - math.log(x.shape[-1])).float()
    finite = torch.isfinite(r)
    r = torch.where(finite, r, lse.float())
    return x - r[:, None], torch.where(finite, lse - r.double(), 0.0)


def _row_stats(x, lab, ignore_index, with_entropy, with_mean_logp):
    """(lse, logp, entropy, mean_logp, valid) of one chunk of scaled rows ``x: [rows, V]`` (see ``_shifted``)."""
    m, d, log_s = _shifted(x)
    lse = _lse64(m, log_s)
    ent = mean_logp = logp = None
    valid = None
    if with_entropy:
        # log_s - sum p (x - m), in float64 from its float32 parts like lse (the interface's): the backward's
        # E_p[x] = lse - entropy is then m + sum p (x - m). Relative to m: lse - sum p x would cancel
        # catastrophically for large logits.
        p = torch.exp(d - log_s[:, None])
        ent = log_s.double() - _p_times(p, d).sum(-1).double()
    if with_mean_logp:
        # each term divided by V before the sum: x.mean(-1) sums the logits first and overflows float32 once
        # sum |x| > 3.4e38, every logit finite
        mean_logp = d.mul_(1.0 / x.shape[-1]).sum(-1) - log_s
    if lab is not None:
        valid = lab != ignore_index
        picked = x.gather(1, torch.where(valid, lab, 0)[:, None]).squeeze(1)
        logp = torch.where(valid, (picked - m) - log_s, 0.0)
        lse, ent, mean_logp = (None if t is None else torch.where(valid, t, 0.0) for t in (lse, ent, mean_logp))
    return lse, logp, ent, mean_logp, valid


def _outputs(N, like, with_logp, with_entropy, with_mean_logp):
    def per_row(wanted, dtype=torch.float32):
        return torch.empty(N if wanted else 0, dtype=dtype, device=like.device)

    f64 = torch.float64
    return per_row(with_logp), per_row(with_entropy, f64), per_row(True, f64), per_row(with_mean_logp)


def token_stats_fwd(logits, labels, temperature, ignore_index, with_logp, with_entropy, with_mean_logp):
    A, B, _ = logits.shape
    logp, ent, lse, mean_logp = _outputs(A * B, logits, with_logp, with_entropy, with_mean_logp)
    for a, b0, b1 in _row_chunks(logits):
        r0, r1 = a * B + b0, a * B + b1
        x = logits[a, b0:b1].float() / temperature  # x: [rows, V]
        lab = labels[r0:r1] if with_logp else None
        c_lse, c_logp, c_ent, c_u, _ = _row_stats(x, lab, ignore_index, with_entropy, with_mean_logp)
        lse[r0:r1] = c_lse
        for out, val in ((logp, c_logp), (ent, c_ent), (mean_logp, c_u)):
            if val is not None:
                out[r0:r1] = val
    return logp, ent, lse, mean_logp


def _grad_rows(x, lab, lse, ent, g_lp, g_h, g_u, ignore_index, temperature, col0=0, vocab=None):
    """d/d logits of ``g_lp*logp + g_H*H + g_u*u`` for one chunk of scaled rows ``x: [rows, V]``, or for
    its columns ``[col0, col0 + V)`` out of ``vocab`` (then ``lse`` and ``ent`` are the whole rows')."""
    log_p = _minus_lse(x, lse)
    p = torch.exp(log_p)
    g = torch.zeros_like(x)
    if g_lp is not None:
        g -= g_lp[:, None] * p
        col = lab - col0
        in_block = (lab != ignore_index) & (col >= 0) & (col < x.shape[-1])
        g.scatter_add_(1, torch.where(in_block, col, 0)[:, None], torch.where(in_block, g_lp, 0.0)[:, None])
    if g_h is not None:
        # log p + H as x - E_p[x]: log p and H are both ~log V on a near-uniform row, and would cancel
        g -= g_h[:, None] * _p_times(p, _minus_lse(x, lse - ent))
    if g_u is not None:
        g += g_u[:, None] * (1.0 / (vocab or x.shape[-1]) - p)
    if lab is not None:
        # where, not a product: ignored rows saved lse = 0, so their p may have overflowed to inf.
        g = torch.where((lab != ignore_index)[:, None], g, 0.0)
    return g / temperature


def token_stats_bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, grad_mean_logp, temperature, ignore_index):
    A, B, V = logits.shape
    grad = torch.empty((A, B, V), dtype=logits.dtype, device=logits.device)
    for a, b0, b1 in _row_chunks(logits):
        r0, r1 = a * B + b0, a * B + b1
        x = logits[a, b0:b1].float() / temperature
        sl = slice(r0, r1)
        grad[a, b0:b1] = _grad_rows(
            x,
            None if labels is None else labels[sl],
            lse[sl],
            None if entropy is None else entropy[sl],
            *(None if t is None else t[sl] for t in (grad_logp, grad_entropy, grad_mean_logp)),
            ignore_index,
            temperature,
        )
    return grad


def token_stats_block_grad_(block, labels, lse, entropy, coefs, col0, vocab, temperature, ignore_index):
    B = block.shape[1]
    for a, b0, b1 in _row_chunks(block):
        sl = slice(a * B + b0, a * B + b1)
        block[a, b0:b1] = _grad_rows(
            block[a, b0:b1].float() / temperature, labels[sl], lse[sl], None if entropy is None else entropy[sl],
            coefs[0, sl], None if entropy is None else coefs[1, sl], coefs[2, sl], ignore_index, temperature,
            col0, vocab,
        )  # fmt: skip


def ppo_coefs(logp, coefs, params):
    """(g_lp, g_H) of the PPO per-token loss; the formulas of the ``mode == 1`` interface."""
    old, adv, ref, w = coefs
    clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef = params
    ratio = torch.exp(torch.where(adv == 0, 0.0, logp - old))  # A = 0: no pg gradient, even where exp overflows
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    # "not below" rather than ">=": a NaN advantage gives a NaN gradient, as autograd of torch.maximum does
    d_pg = torch.where(unclipped < clipped, 0.0, -adv * ratio)
    if dual_clip > 0:
        capped = (adv < 0) & (torch.maximum(unclipped, clipped) > -adv * dual_clip)
        d_pg = torch.where(capped, 0.0, d_pg)
    g_lp = d_pg
    if kl_coef != 0:
        d_kl = {1: torch.ones_like(logp), 2: logp - ref, 3: -torch.expm1(ref - logp)}[int(kl_kind)]
        g_lp = g_lp + kl_coef * d_kl
    return w * g_lp, -w * entropy_coef


def token_stats_fused(
    logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, mode, coefs, params, grad
):
    A, B, _ = logits.shape
    logp, ent, lse, mean_logp = _outputs(A * B, logits, True, with_entropy, with_mean_logp)
    for a, b0, b1 in _row_chunks(logits):
        sl = slice(a * B + b0, a * B + b1)
        x = logits[a, b0:b1].float() / temperature
        lab = labels[sl]
        c_lse, c_logp, c_ent, c_u, _ = _row_stats(x, lab, ignore_index, with_entropy, with_mean_logp)
        if mode == 0:
            g_lp, g_h, g_u = coefs[0, sl], coefs[1, sl], coefs[2, sl]
        else:
            g_lp, g_h = ppo_coefs(c_logp, coefs[:, sl], params)
            g_h, g_u = torch.broadcast_to(torch.as_tensor(g_h, dtype=torch.float32), g_lp.shape), None
        lse[sl], logp[sl] = c_lse, c_logp
        if with_entropy:
            ent[sl] = c_ent
        if with_mean_logp:
            mean_logp[sl] = c_u
        # The chunk is fully read (x is a float32 copy) before its gradient overwrites it in place.
        grad[a, b0:b1] = _grad_rows(
            x, lab, c_lse, c_ent, g_lp, g_h if with_entropy else None, g_u, ignore_index, temperature
        )
    return logp, ent, lse, mean_logp


def kl_fwd(p_logits, q_logits, temperature):
    A, B, _ = p_logits.shape
    N = A * B
    kl = torch.empty(N, dtype=torch.float32, device=p_logits.device)
    lse_p = torch.empty(N, dtype=torch.float64, device=p_logits.device)
    lse_q = torch.empty_like(lse_p)
    for a, b0, b1 in _row_chunks(p_logits):
        r0, r1 = a * B + b0, a * B + b1
        mx, log_p, log_sx = _shifted(p_logits[a, b0:b1].float() / temperature)
        my, log_q, log_sy = _shifted(q_logits[a, b0:b1].float() / temperature)
        log_p.sub_(log_sx[:, None])
        log_q.sub_(log_sy[:, None])
        kl[r0:r1] = _p_times(torch.exp(log_p), log_p - log_q).sum(-1)
        lse_p[r0:r1], lse_q[r0:r1] = _lse64(mx, log_sx), _lse64(my, log_sy)
    return kl, lse_p, lse_q


def kl_bwd(p_logits, q_logits, lse_p, lse_q, kl, grad_kl, temperature, need_p, need_q):
    A, B, V = p_logits.shape
    dev = p_logits.device
    grad_p = torch.empty((A, B, V), dtype=p_logits.dtype, device=dev) if need_p else _empty(p_logits)
    grad_q = torch.empty((A, B, V), dtype=q_logits.dtype, device=dev) if need_q else _empty(q_logits)
    for a, b0, b1 in _row_chunks(p_logits):
        r0, r1 = a * B + b0, a * B + b1
        g = grad_kl[r0:r1, None] / temperature
        x = p_logits[a, b0:b1].float() / temperature
        y = q_logits[a, b0:b1].float() / temperature
        # log P - log Q - KL = (u_x - u_y) - (rest_x - rest_y + KL), each side against a reference inside its row
        # (see _centred): against float32(lse), u_x and u_y are both ~-log V on a near-uniform row, and cancel
        u_x, rest_x = _centred(x, lse_p[r0:r1])
        u_y, rest_y = _centred(y, lse_q[r0:r1])
        p = torch.exp(u_x) * torch.exp(-rest_x).float()[:, None]
        if need_p:
            centre = (rest_x - rest_y + kl[r0:r1].double()).float()
            grad_p[a, b0:b1] = g * _p_times(p, (u_x - u_y) - centre[:, None])
        if need_q:
            grad_q[a, b0:b1] = g * (torch.exp(u_y) * torch.exp(-rest_y).float()[:, None] - p)
    return grad_p, grad_q
