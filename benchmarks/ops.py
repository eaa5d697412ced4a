"""The benchmarked ops: inputs, the provider functions, and the float64 check of each.

An :class:`Op` says how to build one case's inputs (in the worker process), which functions
compete (``rf-*`` providers call rlhf_fast, ``eager`` is the usual PyTorch code, ``compile`` is
``torch.compile`` of that same code), how many logits-sized transfers its floor counts, and how to
check a forward+backward against ``rlhf_fast.reference`` (or ``F.cross_entropy``) in float64.

Every loss is timed at ``[S, T, V]`` with ``S = SEQS`` sequences of ``T = tokens / S`` tokens and
no ignored label, so the float64 loss can be rebuilt from chunks of rows (token-mean losses) or
of pairs (DPO) without a ``[tokens, vocab]`` float64 tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

LOGIT_SCALE = 3.0  # std of the random logits, about that of a trained LM head's output
CHECK_ROWS = 32
CHUNK_ROWS = 256  # rows per float64 reference chunk: 256 x 32000 x 8 B = 62.5 MiB
SEQS = 8  # sequences per batch for the sequence-shaped losses (DPO: 4 pairs)
PPO_KW = {"clip_eps": 0.2, "kl_coef": 0.05, "entropy_coef": 0.01}
DPO_BETA = 0.1
# DPO's margin z is a difference of sums of T float32 log-probs (|sum| ~ T * 10): the float32 sums
# alone cost ~sqrt(T) * 1e-6 * 10 in z, so at T = 512 the loss and gradient carry ~1e-5..1e-4
# relative error in any float32 implementation (eager PyTorch measured 2e-5 / 7e-5, rf-cpp
# 7e-6 / 4e-5 at 4096 x 32000). 2e-4 still catches a wrong formula or a dropped row.
DPO_TOLERANCE = {"float32": 2e-4}


@dataclass
class Case:
    """One case's tensors. ``logits`` is the leaf whose gradient is checked and timed."""

    logits: object  # torch.Tensor, requires grad
    labels: object
    extra: dict = field(default_factory=dict)  # op-specific inputs (advantages, ref log-probs...)
    grad_out: object = None  # upstream gradient of the output; None for a 0-d loss


@dataclass(frozen=True)
class Op:
    name: str
    providers: tuple[str, ...]
    floor_passes: int  # logits-sized transfers the op must make (reads + gradient write)
    setup: Callable[[dict], Case]
    fn: Callable[[str], Callable | str]  # provider -> f(case) -> output, or the reason it cannot run
    check: Callable[[Case, object, object, object], dict]  # (case, pristine logits, out, grad) -> errors
    floor_note: str
    tolerance: dict = field(default_factory=dict)  # per-dtype overrides of run.TOLERANCE


def _randn_logits(spec: dict, shape):
    import torch

    torch.manual_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    return torch.randn(*shape, dtype=dtype).mul_(LOGIT_SCALE)


def _sample_rows(n: int, k: int = CHECK_ROWS):
    import torch

    return torch.linspace(0, n - 1, min(n, k)).round().long().unique()


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64; inf when ``a`` has a NaN."""
    import torch

    err = (a.double() - b).abs().max().item()
    return float("inf") if err != err else err / max(b.abs().max().item(), torch.finfo(torch.float64).tiny)


def _rf(backend: str, call: Callable) -> Callable | str:
    import rlhf_fast as rf

    status = rf.backends()[backend]
    return call if status.available else status.detail


def _peer(name: str, eager: Callable) -> Callable:
    import torch

    if name == "eager":
        return eager
    return torch.compile(eager, fullgraph=True, dynamic=False)


def _chunked_token_logp(logits, labels):
    """float32 log-probs of the labels, a chunk of rows at a time (used to make realistic inputs)."""
    import torch

    rows, flat = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    out = torch.empty(flat.shape)
    for i in range(0, flat.numel(), CHUNK_ROWS):
        x = rows[i : i + CHUNK_ROWS].float()
        out[i : i + CHUNK_ROWS] = torch.log_softmax(x, -1).gather(-1, flat[i : i + CHUNK_ROWS, None]).squeeze(-1)
    return out.view(labels.shape)


# ---------------------------------------------------------------------------------------------
# token_logprobs: [N] log-probs, upstream gradient != 1


def eager_token_logprobs(logits, labels):
    """The usual way: a float32 copy, a [tokens, vocab] log_softmax, a gather."""
    import torch

    return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)


def _setup_token_logprobs(spec: dict) -> Case:
    import torch

    n, v = spec["tokens"], spec["vocab"]
    logits = _randn_logits(spec, (n, v)).requires_grad_()  # [N, V]
    labels = torch.randint(0, v, (n,))  # [N] int64
    grad_out = torch.randn(n)  # [N] float32, != 1 so a wrongly scaled gradient shows
    return Case(logits, labels, grad_out=grad_out)


def _fn_token_logprobs(provider: str):
    if provider in ("eager", "compile"):
        f = _peer(provider, eager_token_logprobs)
        return lambda c: f(c.logits, c.labels)
    import rlhf_fast as rf

    backend = provider.removeprefix("rf-")
    return _rf(backend, lambda c: rf.token_logprobs(c.logits, c.labels, backend=backend))


def _check_token_logprobs(case: Case, logits, out, grad) -> dict:
    import torch

    import rlhf_fast as rf

    rows = _sample_rows(case.labels.numel())
    x = logits.detach()[rows].double().requires_grad_()  # x: [rows, V]
    ref = rf.reference.token_logprobs(x, case.labels[rows])
    (ref_grad,) = torch.autograd.grad(ref, x, case.grad_out[rows].double())
    return {"fwd_err": rel_err(out.detach()[rows], ref), "grad_err": rel_err(grad[rows], ref_grad)}


# ---------------------------------------------------------------------------------------------
# cross_entropy: mean over tokens


def eager_cross_entropy(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels)


def _setup_cross_entropy(spec: dict) -> Case:
    import torch

    n, v = spec["tokens"], spec["vocab"]
    logits = _randn_logits(spec, (n, v)).requires_grad_()  # [N, V]
    return Case(logits, torch.randint(0, v, (n,)))


def _fn_cross_entropy(provider: str):
    if provider in ("eager", "compile"):
        f = _peer(provider, eager_cross_entropy)
        return lambda c: f(c.logits, c.labels)
    import rlhf_fast as rf

    inplace = provider.endswith("-inplace")
    return _rf("cpp", lambda c: rf.cross_entropy(c.logits, c.labels, inplace_backward=inplace, backend="cpp"))


def _check_cross_entropy(case: Case, logits, out, grad) -> dict:
    import torch
    import torch.nn.functional as F

    x, n = logits.detach(), case.labels.numel()
    total = sum(
        F.cross_entropy(x[i : i + CHUNK_ROWS].double(), case.labels[i : i + CHUNK_ROWS], reduction="sum")
        for i in range(0, n, CHUNK_ROWS)
    )
    rows = _sample_rows(n)
    xs = x[rows].double().requires_grad_()
    # the mean's gradient on these rows: their summed loss divided by the full token count
    (ref_grad,) = torch.autograd.grad(F.cross_entropy(xs, case.labels[rows], reduction="sum") / n, xs)
    return {"fwd_err": rel_err(out.detach(), total / n), "grad_err": rel_err(grad[rows], ref_grad)}


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
    logits = _randn_logits(spec, (s, t, v)).requires_grad_()  # [S, T, V]
    labels = torch.randint(0, v, (s, t))  # [S, T]
    logp = _chunked_token_logp(logits.detach(), labels)  # [S, T]: old/ref near the policy, as in training
    extra = {
        "old_logprobs": logp + 0.2 * torch.randn(s, t),  # ratios spread around 1: some tokens clipped
        "advantages": torch.randn(s, t),
        "ref_logprobs": logp + 0.1 * torch.randn(s, t),
    }
    return Case(logits, labels, extra)


def _fn_ppo_loss(provider: str):
    if provider in ("eager", "compile"):
        f = _peer(provider, eager_ppo_loss)
        return lambda c: f(c.logits, c.labels, **c.extra, **PPO_KW)
    import rlhf_fast as rf

    inplace = provider.endswith("-inplace")
    return _rf(
        "cpp",
        lambda c: rf.ppo_loss(c.logits, c.labels, **c.extra, **PPO_KW, inplace_backward=inplace, backend="cpp")[0],
    )


def _ppo_reference(x, labels, extra, rows):
    import rlhf_fast as rf

    sel = {k: t.reshape(-1)[rows].double() for k, t in extra.items()}
    loss, _ = rf.reference.ppo_loss(x, labels.reshape(-1)[rows], **sel, **PPO_KW)
    return loss  # token mean over ``rows``


def _check_ppo_loss(case: Case, logits, out, grad) -> dict:
    import torch

    x = logits.detach().reshape(-1, logits.shape[-1])  # [N, V]
    n = x.shape[0]
    total = 0.0
    for i in range(0, n, CHUNK_ROWS):
        rows = torch.arange(i, min(i + CHUNK_ROWS, n))
        total += _ppo_reference(x[rows].double(), case.labels, case.extra, rows) * len(rows)
    rows = _sample_rows(n)
    xs = x[rows].double().requires_grad_()
    # token mean over the sample x (sample size / N) = these rows' share of the full loss
    (ref_grad,) = torch.autograd.grad(_ppo_reference(xs, case.labels, case.extra, rows) * (len(rows) / n), xs)
    got = grad.reshape(-1, grad.shape[-1])[rows]
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
    logits = _randn_logits(spec, (s, t, v)).requires_grad_()  # [2B, T, V]: chosen, then rejected
    labels = torch.randint(0, v, (s, t))
    seq = _chunked_token_logp(logits.detach(), labels).sum(-1)  # [2B]
    # reference log-probs near the policy's, so beta * z = O(1) and the sigmoid is not saturated
    ref = seq + torch.randn(s) / DPO_BETA
    extra = {"ref_chosen_logps": ref[: s // 2], "ref_rejected_logps": ref[s // 2 :]}
    return Case(logits, labels, extra)


def _fn_dpo_loss(provider: str):
    if provider in ("eager", "compile"):
        f = _peer(provider, eager_dpo_loss)
        return lambda c: f(c.logits, c.labels, **c.extra, beta=DPO_BETA)
    import rlhf_fast as rf

    def run(c):
        b = c.logits.shape[0] // 2
        x, y = c.logits, c.labels
        return rf.dpo_loss(x[:b], y[:b], x[b:], y[b:], **c.extra, beta=DPO_BETA, backend="cpp")[0]

    return _rf("cpp", run)


def _dpo_pair(x, case: Case, pair: int):
    """Reference DPO loss of one pair; ``x`` is the float64 [2, T, V] (chosen, rejected) slice."""
    import rlhf_fast as rf

    b = case.logits.shape[0] // 2
    y = case.labels[[pair, b + pair]]
    rc = case.extra["ref_chosen_logps"][pair : pair + 1].double()
    rr = case.extra["ref_rejected_logps"][pair : pair + 1].double()
    loss, _ = rf.reference.dpo_loss(x[:1], y[:1], x[1:], y[1:], rc, rr, beta=DPO_BETA)
    return loss


def _check_dpo_loss(case: Case, logits, out, grad) -> dict:
    import torch

    x = logits.detach()
    b = x.shape[0] // 2
    losses = [_dpo_pair(x[[p, b + p]].double(), case, p) for p in range(b)]
    errors = {"fwd_err": rel_err(out.detach(), torch.stack(losses).mean())}
    worst = 0.0
    for p in (0, b - 1):  # the gradient of the first and last pairs, on a sample of their rows
        xs = x[[p, b + p]].double().requires_grad_()  # [2, T, V]
        (ref_grad,) = torch.autograd.grad(_dpo_pair(xs, case, p) / b, xs)
        rows = _sample_rows(x.shape[1], CHECK_ROWS // 2)
        worst = max(worst, rel_err(grad[[p, b + p]][:, rows], ref_grad[:, rows]))
    errors["grad_err"] = worst
    return errors


OPS = {
    op.name: op
    for op in (
        Op("token_logprobs", ("rf-cpp", "rf-torch", "eager", "compile"), 3, _setup_token_logprobs,
           _fn_token_logprobs, _check_token_logprobs, "read forward, read backward, write the gradient"),
        Op("cross_entropy", ("rf-cpp", "rf-cpp-inplace", "eager", "compile"), 2, _setup_cross_entropy,
           _fn_cross_entropy, _check_cross_entropy, "read forward, write the gradient (gradient in forward)"),
        Op("ppo_loss", ("rf-cpp", "rf-cpp-inplace", "eager", "compile"), 2, _setup_ppo_loss,
           _fn_ppo_loss, _check_ppo_loss, "read forward, write the gradient (gradient in forward)"),
        Op("dpo_loss", ("rf-cpp", "eager", "compile"), 3, _setup_dpo_loss,
           _fn_dpo_loss, _check_dpo_loss, "read forward, read backward, write the gradient",
           DPO_TOLERANCE),
    )
}  # fmt: skip
PEERS = ("eager", "compile")  # what rlhf_fast is compared with
