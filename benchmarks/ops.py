"""The benchmarked ops: inputs, the provider functions, and the float64 check of each.

An :class:`Op` says how to build one case's inputs (in the worker process: the :class:`Case` names
the leaves whose gradients are computed, timed and checked), which functions compete (``rf-*``
providers call rlhf_fast, ``eager`` is the usual PyTorch code, ``compile`` is ``torch.compile`` of
that same code, plus other libraries' fused forms for ``linear_cross_entropy``), its :class:`Floor`
(logits-sized transfers at the copy bandwidth, or FLOPs at the matmul rate), and how to check a
forward+backward against ``rlhf_fast.reference`` (or ``F.cross_entropy``) in float64.

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
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SEQS = 8  # sequences per batch for the sequence-shaped losses (DPO: 4 pairs)
PPO_KW = {"clip_eps": 0.2, "kl_coef": 0.05, "entropy_coef": 0.01}
DPO_BETA = 0.1
# DPO's margin z is a difference of sums of T float32 log-probs (|sum| ~ T * 10): the float32 sums
# alone cost ~sqrt(T) * 1e-6 * 10 in z, so at T = 512 the loss and gradient carry ~1e-5..1e-4
# relative error in any float32 implementation (eager PyTorch measured 2e-5 / 7e-5, rf-cpp
# 7e-6 / 4e-5 at 4096 x 32000). 2e-4 still catches a wrong formula or a dropped row.
DPO_TOLERANCE = {"float32": 2e-4}
TORCH_LCE_CHUNK_ROWS = 1024  # rows per chunk of torch.nn.functional.linear_cross_entropy (see its provider)


@dataclass
class Case:
    """One case's tensors. ``leaves`` (name -> tensor that requires grad) are the inputs whose
    gradients are computed, timed and checked: ``{"logits": [N, V]}`` for the ops on logits,
    ``{"hidden": [N, H], "weight": [V, H]}`` for the fused-linear ones. ``case[name]`` is a leaf."""

    leaves: dict  # name -> torch.Tensor, requires grad
    labels: object
    extra: dict = field(default_factory=dict)  # op-specific inputs (advantages, ref log-probs...)
    grad_out: object = None  # upstream gradient of the output; None for a 0-d loss

    def __getitem__(self, name: str):
        return self.leaves[name]


@dataclass(frozen=True)
class Floor:
    """The least work a forward+backward must do, and the machine rate it is done at.

    ``kind`` is ``"bytes"`` (memory-bound: moved at the copy bandwidth) or ``"flops"``
    (compute-bound: done at the matmul rate measured in the case's dtype); ``amount(spec)`` is how
    many bytes or FLOPs the case needs and ``note`` says what they count.
    """

    kind: str
    amount: Callable[[dict], float]
    note: str


@dataclass(frozen=True)
class Op:
    name: str
    providers: tuple[str, ...]
    floor: Floor
    setup: Callable[[dict], Case]
    fn: Callable[[str], Callable | str]  # provider -> f(case) -> output, or the reason it cannot run
    # (case, pristine leaves by name, out, gradients by leaf name) -> {"fwd_err": ..., "<x>_grad_err": ...}
    check: Callable[[Case, dict, object, dict], dict]
    tolerance: dict = field(default_factory=dict)  # per-dtype overrides of run.TOLERANCE


def logits_bytes(spec: dict) -> int:
    """Bytes of the case's ``[tokens, vocab]`` logits in its dtype (materialized or not)."""
    return spec["tokens"] * spec["vocab"] * DTYPE_BYTES[spec["dtype"]]


def _logits_passes(passes: int, note: str) -> Floor:
    return Floor("bytes", lambda spec: passes * logits_bytes(spec), f"{passes} x logits bytes: {note}")


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
    return Case({"logits": logits}, labels, grad_out=grad_out)


def _fn_token_logprobs(provider: str):
    if provider in ("eager", "compile"):
        f = _peer(provider, eager_token_logprobs)
        return lambda c: f(c["logits"], c.labels)
    import rlhf_fast as rf

    backend = provider.removeprefix("rf-")
    return _rf(backend, lambda c: rf.token_logprobs(c["logits"], c.labels, backend=backend))


def _check_token_logprobs(case: Case, pristine, out, grads) -> dict:
    import torch

    import rlhf_fast as rf

    rows = _sample_rows(case.labels.numel())
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
    logits = _randn_logits(spec, (n, v)).requires_grad_()  # [N, V]
    return Case({"logits": logits}, torch.randint(0, v, (n,)))


def _fn_cross_entropy(provider: str):
    if provider in ("eager", "compile"):
        f = _peer(provider, eager_cross_entropy)
        return lambda c: f(c["logits"], c.labels)
    import rlhf_fast as rf

    inplace = provider.endswith("-inplace")
    return _rf("cpp", lambda c: rf.cross_entropy(c["logits"], c.labels, inplace_backward=inplace, backend="cpp"))


def _check_cross_entropy(case: Case, pristine, out, grads) -> dict:
    import torch
    import torch.nn.functional as F

    x, n = pristine["logits"], case.labels.numel()
    total = sum(
        F.cross_entropy(x[i : i + CHUNK_ROWS].double(), case.labels[i : i + CHUNK_ROWS], reduction="sum")
        for i in range(0, n, CHUNK_ROWS)
    )
    rows = _sample_rows(n)
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
    logits = _randn_logits(spec, (s, t, v)).requires_grad_()  # [S, T, V]
    labels = torch.randint(0, v, (s, t))  # [S, T]
    logp = _chunked_token_logp(logits.detach(), labels)  # [S, T]: old/ref near the policy, as in training
    extra = {
        "old_logprobs": logp + 0.2 * torch.randn(s, t),  # ratios spread around 1: some tokens clipped
        "advantages": torch.randn(s, t),
        "ref_logprobs": logp + 0.1 * torch.randn(s, t),
    }
    return Case({"logits": logits}, labels, extra)


def _fn_ppo_loss(provider: str):
    if provider in ("eager", "compile"):
        f = _peer(provider, eager_ppo_loss)
        return lambda c: f(c["logits"], c.labels, **c.extra, **PPO_KW)
    import rlhf_fast as rf

    inplace = provider.endswith("-inplace")
    return _rf(
        "cpp",
        lambda c: rf.ppo_loss(c["logits"], c.labels, **c.extra, **PPO_KW, inplace_backward=inplace, backend="cpp")[0],
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
        rows = torch.arange(i, min(i + CHUNK_ROWS, n))
        total += _ppo_reference(x[rows].double(), case.labels, case.extra, rows) * len(rows)
    rows = _sample_rows(n)
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
    logits = _randn_logits(spec, (s, t, v)).requires_grad_()  # [2B, T, V]: chosen, then rejected
    labels = torch.randint(0, v, (s, t))
    seq = _chunked_token_logp(logits.detach(), labels).sum(-1)  # [2B]
    # reference log-probs near the policy's, so beta * z = O(1) and the sigmoid is not saturated
    ref = seq + torch.randn(s) / DPO_BETA
    extra = {"ref_chosen_logps": ref[: s // 2], "ref_rejected_logps": ref[s // 2 :]}
    return Case({"logits": logits}, labels, extra)


def _fn_dpo_loss(provider: str):
    if provider in ("eager", "compile"):
        f = _peer(provider, eager_dpo_loss)
        return lambda c: f(c["logits"], c.labels, **c.extra, beta=DPO_BETA)
    import rlhf_fast as rf

    def run(c):
        x, y = c["logits"], c.labels
        b = x.shape[0] // 2
        return rf.dpo_loss(x[:b], y[:b], x[b:], y[b:], **c.extra, beta=DPO_BETA, backend="cpp")[0]

    return _rf("cpp", run)


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
        rows = _sample_rows(x.shape[1], CHECK_ROWS // 2)
        worst = max(worst, rel_err(grads["logits"][[p, b + p]][:, rows], ref_grad[:, rows]))
    errors["grad_err"] = worst
    return errors


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy: mean cross entropy of hidden @ weight.T, the logits never held whole


def eager_linear_cross_entropy(hidden, weight, labels):
    """The usual way: the [tokens, vocab] logits, a float32 copy, ``F.cross_entropy``."""
    import torch.nn.functional as F

    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def _setup_linear_cross_entropy(spec: dict) -> Case:
    import torch

    n, h, v = spec["tokens"], spec["hidden"], spec["vocab"]
    torch.manual_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    hidden = torch.randn(n, h).to(dtype).requires_grad_()  # [N, H]
    # entries of std LOGIT_SCALE / sqrt(H), so the logits have std ~LOGIT_SCALE like the other ops'
    weight = torch.randn(v, h).mul_(LOGIT_SCALE / h**0.5).to(dtype).requires_grad_()  # [V, H]
    return Case({"hidden": hidden, "weight": weight}, torch.randint(0, v, (n,)))


def _torch_linear_cross_entropy() -> Callable | str:
    """PyTorch's own fused form on its chunked path (``options`` given; ``None`` would be eager).

    ``LinearCrossEntropyOptions()`` alone picks per-(device, dtype) defaults that on this CPU cut
    4096 x 1024 x 32000 into chunks of 64 (float32) or 128 (bfloat16) rows, and a fixed cost per
    chunk makes that slow: measured here (on a loaded machine), float32 25.7 s with auto chunks
    against 6.8 s with 1024 rows, for the same extra memory (~145 MiB: mostly [V, H] float32
    buffers, not the chunk's logits); bfloat16 18 s / 525 MiB against 14 s / 649 MiB. A user tuning
    it sets ``batch_chunk_size`` (the fastest of auto, 256, 512 and 1024 rows) and keeps the
    accumulation policy's default (``"accurate"`` for bfloat16 on CPU, the only one whose
    weight-gradient matmul runs in float32 there; ``"compact"`` for float32).
    """
    import torch
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (new in 2.13)"
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=TORCH_LCE_CHUNK_ROWS, chunking_method=None)
    return lambda c: F.linear_cross_entropy(c["hidden"], c["weight"], c.labels, options=options)


def _cce_linear_cross_entropy() -> Callable | str:
    """Cut Cross-Entropy's ``torch_compile`` implementation (its Triton one needs a GPU)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:  # optional: pip install --no-deps cut-cross-entropy (and it imports triton)
        return f"cut_cross_entropy cannot be imported ({exc})"
    return lambda c: linear_cross_entropy(c["hidden"], c["weight"], c.labels, impl="torch_compile")


def _fn_linear_cross_entropy(provider: str):
    if provider in ("eager", "compile"):
        f = _peer(provider, eager_linear_cross_entropy)
        return lambda c: f(c["hidden"], c["weight"], c.labels)
    if provider == "torch-lce":
        return _torch_linear_cross_entropy()
    if provider == "cce":
        return _cce_linear_cross_entropy()
    import rlhf_fast as rf

    backend = provider.removeprefix("rf-")
    return _rf(backend, lambda c: rf.linear_cross_entropy(c["hidden"], c["weight"], c.labels, backend=backend))


def _check_linear_cross_entropy(case: Case, pristine, out, grads) -> dict:
    """Loss and ``dW`` over chunks of rows, ``dH`` on a sample of rows, all in float64.

    The default tolerances hold: at 4096 x 1024 x 32000 the float32 errors were <= 2.6e-6 (eager's
    dW, a float32 sum over 4096 rows; 1e-6 for the others), the bfloat16 ones <= 6.9e-3 (dW rounded
    to bfloat16, and every provider but torch-lce rounds the logits to bfloat16 too).
    """
    import torch
    import torch.nn.functional as F

    h, labels = pristine["hidden"], case.labels
    n = labels.numel()
    w = pristine["weight"].double().requires_grad_()  # [V, H]
    total, ref_dw = 0.0, torch.zeros_like(w)
    for i in range(0, n, CHUNK_ROWS):
        # this chunk's share of the mean: its summed loss over the full token count
        loss = F.cross_entropy(h[i : i + CHUNK_ROWS].double() @ w.T, labels[i : i + CHUNK_ROWS], reduction="sum") / n
        (dw,) = torch.autograd.grad(loss, w)
        total, ref_dw = total + loss.detach(), ref_dw.add_(dw)
    rows = _sample_rows(n)
    hs = h[rows].double().requires_grad_()  # [rows, H]
    (ref_dh,) = torch.autograd.grad(F.cross_entropy(hs @ w.detach().T, labels[rows], reduction="sum") / n, hs)
    return {
        "fwd_err": rel_err(out.detach(), total),
        "hidden_grad_err": rel_err(grads["hidden"][rows], ref_dh),
        "weight_grad_err": rel_err(grads["weight"], ref_dw),
    }


def _linear_flops(spec: dict) -> float:
    return 6 * spec["tokens"] * spec["vocab"] * spec["hidden"]


OPS = {
    op.name: op
    for op in (
        Op("token_logprobs", ("rf-cpp", "rf-torch", "eager", "compile"),
           _logits_passes(3, "read forward, read backward, write the gradient"),
           _setup_token_logprobs, _fn_token_logprobs, _check_token_logprobs),
        Op("cross_entropy", ("rf-cpp", "rf-cpp-inplace", "eager", "compile"),
           _logits_passes(2, "read forward, write the gradient (gradient in forward)"),
           _setup_cross_entropy, _fn_cross_entropy, _check_cross_entropy),
        Op("ppo_loss", ("rf-cpp", "rf-cpp-inplace", "eager", "compile"),
           _logits_passes(2, "read forward, write the gradient (gradient in forward)"),
           _setup_ppo_loss, _fn_ppo_loss, _check_ppo_loss),
        Op("dpo_loss", ("rf-cpp", "eager", "compile"),
           _logits_passes(3, "read forward, read backward, write the gradient"),
           _setup_dpo_loss, _fn_dpo_loss, _check_dpo_loss, DPO_TOLERANCE),
        Op("linear_cross_entropy", ("rf-cpp", "rf-torch", "eager", "compile", "torch-lce", "cce"),
           Floor("flops", _linear_flops, "6*N*V*H FLOPs: logits 2NVH, dH = G W 2NVH, dW = G^T H 2NVH "
                 "(gradient in forward; recomputing the logits in the backward makes it 8NVH)"),
           _setup_linear_cross_entropy, _fn_linear_cross_entropy, _check_linear_cross_entropy),
    )
}  # fmt: skip
PEERS = ("eager", "compile", "torch-lce", "cce")  # what rlhf_fast is compared with
