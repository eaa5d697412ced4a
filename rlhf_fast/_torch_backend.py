"""The ``torch`` backend: the kernel interface in plain PyTorch, for any device.

Same four functions and semantics as the Triton and C++ kernels (see ``rlhf_fast/ops/_custom.py``),
written with ordinary tensor ops. Rows are processed in chunks so that the float32 temporaries stay
near ``_CHUNK_BYTES`` instead of growing with ``tokens x vocab``; it is the fallback where neither
compiled backend runs, and an independent check of their analytic gradients.
"""

from __future__ import annotations

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
    # p * x with 0 * (-inf) := 0: masked vocabulary entries carry no probability mass.
    return torch.where(p > 0, p * x, torch.zeros_like(p))


def token_stats_fwd(logits, labels, temperature, ignore_index, with_logp, with_entropy):
    A, B, _ = logits.shape
    N = A * B
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    logp = torch.empty(N, dtype=torch.float32, device=logits.device) if with_logp else _empty(logits)
    ent = torch.empty(N, dtype=torch.float32, device=logits.device) if with_entropy else _empty(logits)
    for a, b0, b1 in _row_chunks(logits):
        r0, r1 = a * B + b0, a * B + b1
        x = logits[a, b0:b1].float() / temperature  # x: [rows, V]
        row_lse = torch.logsumexp(x, dim=-1)
        lse[r0:r1] = row_lse
        if with_entropy:
            p = torch.exp(x - row_lse[:, None])
            ent[r0:r1] = row_lse - _p_times(p, x).sum(-1)
        if with_logp:
            lab = labels[r0:r1]
            valid = lab != ignore_index
            picked = x.gather(1, torch.where(valid, lab, 0)[:, None]).squeeze(1)
            logp[r0:r1] = torch.where(valid, picked - row_lse, 0.0)
            lse[r0:r1] = torch.where(valid, row_lse, 0.0)
            if with_entropy:
                ent[r0:r1] = torch.where(valid, ent[r0:r1], 0.0)
    return logp, ent, lse


def token_stats_bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    A, B, V = logits.shape
    grad = torch.empty((A, B, V), dtype=logits.dtype, device=logits.device)
    for a, b0, b1 in _row_chunks(logits):
        r0, r1 = a * B + b0, a * B + b1
        x = logits[a, b0:b1].float() / temperature
        log_p = x - lse[r0:r1, None]
        p = torch.exp(log_p)
        g = torch.zeros_like(x)
        if grad_logp is not None:
            g_lp = grad_logp[r0:r1, None]
            g -= g_lp * p
            g.scatter_add_(1, torch.where(labels[r0:r1] != ignore_index, labels[r0:r1], 0)[:, None], g_lp)
        if grad_entropy is not None:
            g -= grad_entropy[r0:r1, None] * _p_times(p, log_p + entropy[r0:r1, None])
        if labels is not None:
            g *= (labels[r0:r1] != ignore_index)[:, None]
        grad[a, b0:b1] = g / temperature
    return grad


def kl_fwd(p_logits, q_logits, temperature):
    A, B, _ = p_logits.shape
    N = A * B
    kl = torch.empty(N, dtype=torch.float32, device=p_logits.device)
    lse_p = torch.empty_like(kl)
    lse_q = torch.empty_like(kl)
    for a, b0, b1 in _row_chunks(p_logits):
        r0, r1 = a * B + b0, a * B + b1
        x = p_logits[a, b0:b1].float() / temperature
        y = q_logits[a, b0:b1].float() / temperature
        lx, ly = torch.logsumexp(x, -1), torch.logsumexp(y, -1)
        p = torch.exp(x - lx[:, None])
        kl[r0:r1] = _p_times(p, (x - lx[:, None]) - (y - ly[:, None])).sum(-1)
        lse_p[r0:r1], lse_q[r0:r1] = lx, ly
    return kl, lse_p, lse_q


def kl_bwd(p_logits, q_logits, lse_p, lse_q, kl, grad_kl, temperature, need_p, need_q):
    A, B, V = p_logits.shape
    dev = p_logits.device
    grad_p = torch.empty((A, B, V), dtype=p_logits.dtype, device=dev) if need_p else _empty(p_logits)
    grad_q = torch.empty((A, B, V), dtype=q_logits.dtype, device=dev) if need_q else _empty(q_logits)
    for a, b0, b1 in _row_chunks(p_logits):
        r0, r1 = a * B + b0, a * B + b1
        g = grad_kl[r0:r1, None] / temperature
        log_p = p_logits[a, b0:b1].float() / temperature - lse_p[r0:r1, None]
        log_q = q_logits[a, b0:b1].float() / temperature - lse_q[r0:r1, None]
        p = torch.exp(log_p)
        if need_p:
            grad_p[a, b0:b1] = g * _p_times(p, log_p - log_q - kl[r0:r1, None])
        if need_q:
            grad_q[a, b0:b1] = g * (torch.exp(log_q) - p)
    return grad_p, grad_q
