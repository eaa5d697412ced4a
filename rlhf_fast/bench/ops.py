"""The benchmarked ops: the registry :data:`OPS`, and the ops on logits that came first (``token_logprobs``
and the losses ``cross_entropy``, ``ppo_loss``, ``dpo_loss``): inputs, provider functions, float64 checks.

An :class:`Op` (``cases.py``, with the helpers every op module shares) says how to build one case's
inputs (in the worker process: the :class:`Case` names the leaves whose gradients are computed,
timed and checked), which functions compete (``rf-*`` providers call rlhf_fast, ``eager`` is the
usual PyTorch code, ``compile`` is ``torch.compile`` of that same code, plus TRL and other libraries'
fused forms where they exist), its :class:`Floor` (logits-sized transfers at the copy bandwidth, or
FLOPs at the matmul rate, per mode), and how to check a forward+backward against
``rlhf_fast.reference`` (or ``F.cross_entropy``) in float64. The other per-token ops live in
``token_ops.py``, the fused-linear ones in ``linear_ops.py``.

Every loss is timed at ``[S, T, V]`` with ``S = SEQS`` sequences of ``T = tokens / S`` tokens and
no ignored label, so the float64 loss can be rebuilt from chunks of rows (token-mean losses) or
of pairs (DPO) without a ``[tokens, vocab]`` float64 tensor.
"""

from __future__ import annotations

from rlhf_fast.bench.cases import (
    CHECK_ROWS,
    CHUNK_ROWS,
    DTYPE_BYTES,
    MODES,
    SEQS,
    Case,
    Floor,
    Op,
    chunked_token_logp,
    logits_bytes,
    logits_passes,
    peer,
    randn_logits,
    rel_err,
    rf_backend,
    rf_provider,
    sample_rows,
    trl_token_logprobs,
)
from rlhf_fast.bench.linear_ops import LINEAR_OPS
from rlhf_fast.bench.token_ops import TOKEN_OPS

# the runner's and the tests' names for the registry and the shared definitions
__all__ = ["DTYPE_BYTES", "MODES", "OPS", "PEERS", "SEQS", "Case", "Floor", "Op", "logits_bytes"]

PPO_KW = {"clip_eps": 0.2, "kl_coef": 0.05, "entropy_coef": 0.01}
DPO_BETA = 0.1
# DPO's margin z is a difference of sums of T float32 log-probs (|sum| ~ T * 10): the float32 sums
# alone cost ~sqrt(T) * 1e-6 * 10 in z, so at T = 512 the loss and gradient carry ~1e-5..1e-4
# relative error in any float32 implementation (eager PyTorch measured 2e-5 / 7e-5, rf-cpp
# 7e-6 / 4e-5 at 4096 x 32000). 2e-4 still catches a wrong formula or a dropped row.
DPO_TOLERANCE = {"float32": 2e-4}


# ---------------------------------------------------------------------------------------------
# token_logprobs: [N] log-probs, upstream gradient != 1


def eager_token_logprobs(logits, labels):
    """The usual way: a float32 copy, a [tokens, vocab] log_softmax, a gather."""
    import torch

    return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)


def _setup_token_logprobs(spec: dict) -> Case:
    import torch

    n, v = spec["tokens"], spec["vocab"]
    logits = randn_logits(spec, (n, v)).requires_grad_()  # [N, V]
    labels = torch.randint(0, v, (n,))  # [N] int64
    grad_out = torch.randn(n)  # [N] float32, != 1 so a wrongly scaled gradient shows
    return Case({"logits": logits}, labels, grad_out=grad_out)


def _fn_token_logprobs(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_token_logprobs)
        return lambda c: f(c["logits"], c.labels)
    if provider == "trl":
        return trl_token_logprobs()
    import rlhf_fast as rf

    backend = rf_backend(provider)
    return rf_provider(backend, lambda c: rf.token_logprobs(c["logits"], c.labels, backend=backend))


def _check_token_logprobs(case: Case, pristine, out, grads) -> dict:
    import torch

    import rlhf_fast as rf

    rows = sample_rows(case.labels.numel())
    x = pristine["logits"][rows].double().requires_grad_()  # x: [rows, V]
    ref = rf.reference.token_logprobs(x, case.labels[rows])
    (ref_grad,) = torch.autograd.grad(ref, x, case.grad_out[rows].double())
    return {"fwd_err": rel_err(out.detach()[rows], ref), "grad_err": rel_err(grads["logits"][rows], ref_grad)}


# ---------------------------------------------------------------------------------------------
# cross_entropy: mean over tokens


def eager_cross_entropy(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels)


def _setup_cross_entropy(spec: dict) -> Case:
    import torch

    n, v = spec["tokens"], spec["vocab"]
    logits = randn_logits(spec, (n, v)).requires_grad_()  # [N, V]
    return Case({"logits": logits}, torch.randint(0, v, (n,)))


def _fn_cross_entropy(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_cross_entropy)
        return lambda c: f(c["logits"], c.labels)
    if provider == "liger":
        return _liger_cross_entropy()
    import rlhf_fast as rf

    inplace, backend = provider.endswith("-inplace"), rf_backend(provider)
    return rf_provider(
        backend, lambda c: rf.cross_entropy(c["logits"], c.labels, inplace_backward=inplace, backend=backend)
    )


def _liger_cross_entropy():
    """Liger-Kernel's Triton cross entropy (CUDA only; like ``rf-*-inplace`` it writes the gradient over the
    logits in its forward pass, so the runner gives each call fresh logits)."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError as exc:  # optional: pip install --no-deps liger-kernel
        return f"liger_kernel cannot be imported ({exc})"
    return lambda c: liger_cross_entropy(c["logits"], c.labels)


def _check_cross_entropy(case: Case, pristine, out, grads) -> dict:
    import torch
    import torch.nn.functional as F

    x, n = pristine["logits"], case.labels.numel()
    total = sum(
        F.cross_entropy(x[i : i + CHUNK_ROWS].double(), case.labels[i : i + CHUNK_ROWS], reduction="sum")
        for i in range(0, n, CHUNK_ROWS)
    )
    rows = sample_rows(n)
    xs = x[rows].double().requires_grad_()
    # the mean's gradient on these rows: their summed loss divided by the full token count
    (ref_grad,) = torch.autograd.grad(F.cross_entropy(xs, case.labels[rows], reduction="sum") / n, xs)
    return {"fwd_err": rel_err(out.detach(), total / n), "grad_err": rel_err(grads["logits"][rows], ref_grad)}


# ---------------------------------------------------------------------------------------------
# ppo_loss: clipped objective + k3 KL to a reference + entropy bonus, token mean


def eager_ppo_loss(logits, labels, old_logprobs, advantages, ref_logprobs, clip_eps, kl_coef, entropy_coef):
    """PPO the usual way: a [tokens, vocab] log_softmax, gather, entropy from the softmax."""
    import torch

    logp_all = torch.log_softmax(logits.float(), -1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - old_logprobs)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    log_r = ref_logprobs - logp
    kl = torch.exp(log_r) - log_r - 1  # k3
    return (pg + kl_coef * kl - entropy_coef * entropy).mean()


def _setup_ppo_loss(spec: dict) -> Case:
    import torch

    s, v = SEQS, spec["vocab"]
    t = spec["tokens"] // s
    logits = randn_logits(spec, (s, t, v)).requires_grad_()  # [S, T, V]
    labels = torch.randint(0, v, (s, t))  # [S, T]
    logp = chunked_token_logp(logits.detach(), labels)  # [S, T]: old/ref near the policy, as in training
    extra = {
        "old_logprobs": logp + 0.2 * torch.randn(s, t),  # ratios spread around 1: some tokens clipped
        "advantages": torch.randn(s, t),
        "ref_logprobs": logp + 0.1 * torch.randn(s, t),
    }
    return Case({"logits": logits}, labels, extra)


def _fn_ppo_loss(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_ppo_loss)
        return lambda c: f(c["logits"], c.labels, **c.extra, **PPO_KW)
    import rlhf_fast as rf

    inplace, backend = provider.endswith("-inplace"), rf_backend(provider)
    return rf_provider(
        backend,
        lambda c: rf.ppo_loss(c["logits"], c.labels, **c.extra, **PPO_KW, inplace_backward=inplace, backend=backend)[0],
    )


def _ppo_reference(x, labels, extra, rows):
    import rlhf_fast as rf

    sel = {k: t.reshape(-1)[rows].double() for k, t in extra.items()}
    loss, _ = rf.reference.ppo_loss(x, labels.reshape(-1)[rows], **sel, **PPO_KW)
    return loss  # token mean over ``rows``


def _check_ppo_loss(case: Case, pristine, out, grads) -> dict:
    import torch

    x = pristine["logits"].reshape(-1, pristine["logits"].shape[-1])  # [N, V]
    n = x.shape[0]
    total = 0.0
    for i in range(0, n, CHUNK_ROWS):
        rows = torch.arange(i, min(i + CHUNK_ROWS, n), device=x.device)
        total += _ppo_reference(x[rows].double(), case.labels, case.extra, rows) * len(rows)
    rows = sample_rows(n)
    xs = x[rows].double().requires_grad_()
    # token mean over the sample x (sample size / N) = these rows' share of the full loss
    (ref_grad,) = torch.autograd.grad(_ppo_reference(xs, case.labels, case.extra, rows) * (len(rows) / n), xs)
    got = grads["logits"].reshape(-1, x.shape[-1])[rows]
    return {"fwd_err": rel_err(out.detach(), total / n), "grad_err": rel_err(got, ref_grad)}


# ---------------------------------------------------------------------------------------------
# dpo_loss: sigmoid DPO on the chosen / rejected halves of one [2B, T, V] output


def eager_dpo_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO the usual way: log_softmax + gather + sum per sequence, then logsigmoid of the margin."""
    import torch
    import torch.nn.functional as F

    seq_logps = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)  # [2B]
    chosen, rejected = seq_logps.chunk(2)
    z = (chosen - ref_chosen_logps) - (rejected - ref_rejected_logps)
    return -F.logsigmoid(beta * z).mean()


def _setup_dpo_loss(spec: dict) -> Case:
    import torch

    s, v = SEQS, spec["vocab"]
    t = spec["tokens"] // s
    logits = randn_logits(spec, (s, t, v)).requires_grad_()  # [2B, T, V]: chosen, then rejected
    labels = torch.randint(0, v, (s, t))
    seq = chunked_token_logp(logits.detach(), labels).sum(-1)  # [2B]
    # reference log-probs near the policy's, so beta * z = O(1) and the sigmoid is not saturated
    ref = seq + torch.randn(s) / DPO_BETA
    extra = {"ref_chosen_logps": ref[: s // 2], "ref_rejected_logps": ref[s // 2 :]}
    return Case({"logits": logits}, labels, extra)


def _fn_dpo_loss(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_dpo_loss)
        return lambda c: f(c["logits"], c.labels, **c.extra, beta=DPO_BETA)
    import rlhf_fast as rf

    def run(c):
        x, y = c["logits"], c.labels
        b = x.shape[0] // 2
        return rf.dpo_loss(x[:b], y[:b], x[b:], y[b:], **c.extra, beta=DPO_BETA, backend=backend)[0]

    backend = rf_backend(provider)
    return rf_provider(backend, run)


def _dpo_pair(x, case: Case, pair: int):
    """Reference DPO loss of one pair; ``x`` is the float64 [2, T, V] (chosen, rejected) slice."""
    import rlhf_fast as rf

    b = case["logits"].shape[0] // 2
    y = case.labels[[pair, b + pair]]
    rc = case.extra["ref_chosen_logps"][pair : pair + 1].double()
    rr = case.extra["ref_rejected_logps"][pair : pair + 1].double()
    loss, _ = rf.reference.dpo_loss(x[:1], y[:1], x[1:], y[1:], rc, rr, beta=DPO_BETA)
    return loss


def _check_dpo_loss(case: Case, pristine, out, grads) -> dict:
    import torch

    x = pristine["logits"]
    b = x.shape[0] // 2
    losses = [_dpo_pair(x[[p, b + p]].double(), case, p) for p in range(b)]
    errors = {"fwd_err": rel_err(out.detach(), torch.stack(losses).mean())}
    worst = 0.0
    for p in (0, b - 1):  # the gradient of the first and last pairs, on a sample of their rows
        xs = x[[p, b + p]].double().requires_grad_()  # [2, T, V]
        (ref_grad,) = torch.autograd.grad(_dpo_pair(xs, case, p) / b, xs)
        rows = sample_rows(x.shape[1], CHECK_ROWS // 2)
        worst = max(worst, rel_err(grads["logits"][[p, b + p]][:, rows], ref_grad[:, rows]))
    errors["grad_err"] = worst
    return errors


OPS = {
    op.name: op
    for op in (
        Op("token_logprobs", ("rf-cpp", "rf-triton", "rf-torch", "eager", "compile", "trl"),
           logits_passes(3, "read forward, read backward, write the gradient"),
           _setup_token_logprobs, _fn_token_logprobs, _check_token_logprobs),
        Op("cross_entropy",
           ("rf-cpp", "rf-cpp-inplace", "rf-triton", "rf-triton-inplace", "eager", "compile", "liger"),
           logits_passes(2, "read forward, write the gradient (gradient in forward)"),
           _setup_cross_entropy, _fn_cross_entropy, _check_cross_entropy),
        Op("ppo_loss", ("rf-cpp", "rf-cpp-inplace", "rf-triton", "rf-triton-inplace", "eager", "compile"),
           logits_passes(2, "read forward, write the gradient (gradient in forward)"),
           _setup_ppo_loss, _fn_ppo_loss, _check_ppo_loss),
        Op("dpo_loss", ("rf-cpp", "rf-triton", "eager", "compile"),
           logits_passes(3, "read forward, read backward, write the gradient"),
           _setup_dpo_loss, _fn_dpo_loss, _check_dpo_loss, DPO_TOLERANCE),
        LINEAR_OPS[0],
        *TOKEN_OPS,
        *LINEAR_OPS[1:],
    )
}  # fmt: skip
PEERS = ("eager", "compile", "torch-lce", "cce", "trl", "liger")  # what rlhf_fast is compared with
