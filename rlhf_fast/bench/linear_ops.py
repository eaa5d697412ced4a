"""The fused-linear ops: ``linear_cross_entropy``, ``linear_token_logprobs``, ``linear_dpo_loss`` and
``linear_ppo_loss`` (GRPO-shaped) from hidden states ``[N, H]`` and an LM-head weight ``[V, H]`` (the logits
never held whole by rlhf_fast), against eager PyTorch, ``torch.compile``, PyTorch's own
``linear_cross_entropy``, Cut Cross-Entropy and Liger-Kernel (its chunked DPO and GRPO losses anywhere,
its fused-linear cross entropy on a GPU); the floor is compute, FLOPs at the matmul rate.
"""

from __future__ import annotations

from collections.abc import Callable

from rlhf_fast.bench.cases import (
    CHUNK_ROWS,
    LOGIT_SCALE,
    SEQS,
    Case,
    Floor,
    Op,
    peer,
    rel_err,
    rf_backend,
    rf_provider,
    sample_rows,
)

TORCH_LCE_CHUNK_ROWS = 1024  # rows per chunk of torch.nn.functional.linear_cross_entropy (see its provider)


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


def cce_impl(hidden) -> str:
    """The Cut Cross-Entropy implementation timed for ``hidden``: its Triton kernels (``"cce"``) for a
    16-bit head on a GPU, else ``"torch_compile"`` (the Triton one needs a GPU, and its backward asserts a
    bfloat16 or float16 head)."""
    import torch

    return "cce" if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) else "torch_compile"


def _cce_linear_cross_entropy() -> Callable | str:
    """Cut Cross-Entropy's ``linear_cross_entropy``, in the implementation :func:`cce_impl` picks."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:  # optional: pip install --no-deps cut-cross-entropy (and it imports triton)
        return f"cut_cross_entropy cannot be imported ({exc})"
    return lambda c: linear_cross_entropy(c["hidden"], c["weight"], c.labels, impl=cce_impl(c["hidden"]))


def _liger_linear_cross_entropy() -> Callable | str:
    """Liger-Kernel's fused-linear cross entropy (``LigerFusedLinearCrossEntropyLoss``: token chunks, each a
    matmul and its Triton cross-entropy kernel; CUDA only), accumulating the weight gradient in float32 as
    rlhf_fast does (its default accumulates a bfloat16 head's in bfloat16)."""
    try:
        import torch
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:  # optional: pip install --no-deps liger-kernel
        return f"liger_kernel cannot be imported ({exc})"
    loss_fn = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)
    return lambda c: loss_fn(c["weight"], c["hidden"], c.labels)


def _fn_linear_cross_entropy(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_linear_cross_entropy)
        return lambda c: f(c["hidden"], c["weight"], c.labels)
    if provider == "torch-lce":
        return _torch_linear_cross_entropy()
    if provider == "cce":
        return _cce_linear_cross_entropy()
    if provider == "liger":
        return _liger_linear_cross_entropy()
    import rlhf_fast as rf

    backend = rf_backend(provider)
    return rf_provider(backend, lambda c: rf.linear_cross_entropy(c["hidden"], c["weight"], c.labels, backend=backend))


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
    rows = sample_rows(n)
    hs = h[rows].double().requires_grad_()  # [rows, H]
    (ref_dh,) = torch.autograd.grad(F.cross_entropy(hs @ w.detach().T, labels[rows], reduction="sum") / n, hs)
    return {
        "fwd_err": rel_err(out.detach(), total),
        "hidden_grad_err": rel_err(grads["hidden"][rows], ref_dh),
        "weight_grad_err": rel_err(grads["weight"], ref_dw),
    }


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs: [N] log-probs of hidden @ weight.T, upstream gradient != 1


def eager_linear_token_logprobs(hidden, weight, labels):
    """The usual way: the [tokens, vocab] logits, a float32 log_softmax, a gather."""
    import torch
    import torch.nn.functional as F

    return torch.log_softmax(F.linear(hidden, weight).float(), -1).gather(-1, labels[..., None]).squeeze(-1)


def _setup_linear_token_logprobs(spec: dict) -> Case:
    import torch

    case = _setup_linear_cross_entropy(spec)
    case.grad_out = torch.randn(spec["tokens"])  # [N] float32
    return case


def _fn_linear_token_logprobs(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_linear_token_logprobs)
        return lambda c: f(c["hidden"], c["weight"], c.labels)
    import rlhf_fast as rf

    backend = rf_backend(provider)
    return rf_provider(backend, lambda c: rf.linear_token_logprobs(c["hidden"], c["weight"], c.labels, backend=backend))


def _check_linear_token_logprobs(case: Case, pristine, out, grads) -> dict:
    """Output and ``dW`` over chunks of rows, ``dH`` on a sample of rows, in float64 with the case's
    upstream gradient."""
    import torch

    h, labels, g = pristine["hidden"], case.labels, case.grad_out
    n = labels.numel()
    w = pristine["weight"].double().requires_grad_()  # [V, H]
    ref_out, ref_dw = torch.empty(n, dtype=torch.float64, device=h.device), torch.zeros_like(w)

    def logp(x, rows):
        return torch.log_softmax(x @ w.T, -1).gather(-1, labels[rows, None]).squeeze(-1)

    for i in range(0, n, CHUNK_ROWS):
        rows = torch.arange(i, min(i + CHUNK_ROWS, n), device=h.device)
        chunk = logp(h[rows].double(), rows)
        (dw,) = torch.autograd.grad(chunk, w, g[rows].double())
        ref_out[rows], ref_dw = chunk.detach(), ref_dw.add_(dw)
    rows = sample_rows(n)
    hs = h[rows].double().requires_grad_()  # [rows, H]
    (ref_dh,) = torch.autograd.grad(logp(hs, rows), hs, g[rows].double())
    return {
        "fwd_err": rel_err(out.detach(), ref_out),
        "hidden_grad_err": rel_err(grads["hidden"][rows], ref_dh),
        "weight_grad_err": rel_err(grads["weight"], ref_dw),
    }


def _logits64(x, weight, low):
    """``x @ weight.T`` in float64, rounded to ``low`` (straight through, for the gradient) unless it is None:
    with 16-bit inputs a provider's head rounds its logits (all but rlhf_fast's widened float32 GEMMs, see
    ``Case.head_rounds_logits``), and the sequence-level losses amplify that rounding past the 16-bit
    tolerance, so the reference must round them too."""
    logits = x.double() @ weight.T
    if low is not None:
        logits = logits + (logits.to(low).double() - logits).detach()
    return logits


def _worst_hidden_err(h, grads, seq_term) -> float:
    """The worst error of ``dH`` on 8 sampled rows of the first and last sequences of ``h`` ``[S, T, H]``,
    against the float64 gradient of ``seq_term(x [T, H] float64, i)``."""
    import torch

    worst = 0.0
    for i in (0, h.shape[0] - 1):
        rows = sample_rows(h.shape[1], 8)
        xs = h[i].double().requires_grad_()  # [T, H]
        (dh,) = torch.autograd.grad(seq_term(xs, i), xs)
        worst = max(worst, rel_err(grads["hidden"][i][rows], dh[rows]))
    return worst


# ---------------------------------------------------------------------------------------------
# linear_dpo_loss: sigmoid DPO from the policy's hidden states and head, the reference's log-probs
# computed in the same call from its own hidden states and head (as Liger's chunked loss does)

LINEAR_DPO_BETA = 0.1
# float32: a difference of sums of thousands of log-probs. bfloat16 keeps the runner's default: with the
# reference's logits rounded like every provider's (see _check_linear_dpo_loss) the loss agrees to ~3e-5
# and the gradients to 3-6e-3 (the bf16 rounding of dW and of each logits gradient) at 1024 x 8000 x 128.
LINEAR_DPO_TOLERANCE = {"float32": 2e-4}


def eager_linear_dpo_loss(hidden, weight, labels, ref_hidden, ref_weight, beta):
    """The usual way: both models' [2B, T, V] logits, float32 log_softmax + gather + sum per sequence."""
    import torch
    import torch.nn.functional as F

    def seq_logps(h, w):
        return torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)

    with torch.no_grad():
        ref_chosen, ref_rejected = seq_logps(ref_hidden, ref_weight).chunk(2)
    chosen, rejected = seq_logps(hidden, weight).chunk(2)
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def _setup_linear_dpo_loss(spec: dict) -> Case:
    import torch

    case = _setup_linear_cross_entropy(spec)
    s, h = SEQS, spec["hidden"]
    t = spec["tokens"] // s
    hidden = case["hidden"].detach().view(s, t, h).requires_grad_()  # [2B, T, H]: chosen, then rejected
    # the reference: nearby hidden states and head, so beta * (margin) stays O(1)
    ref_hidden = (hidden.detach().float() + 0.05 * torch.randn(s, t, h)).to(hidden.dtype)
    ref_weight = (case["weight"].detach().float() * 1.02).to(hidden.dtype)
    extra = {"ref_hidden": ref_hidden, "ref_weight": ref_weight}
    return Case({"hidden": hidden, "weight": case["weight"]}, case.labels.view(s, t), extra)


def _liger_linear_dpo_loss() -> Callable | str:
    """Liger-Kernel's chunked fused-linear DPO (``LigerFusedLinearDPOLoss``, torch.compile'd chunks; it
    runs on CPU), with its reference model inputs."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as exc:  # optional: pip install --no-deps liger-kernel
        return f"liger_kernel cannot be imported ({exc})"
    loss_fn = LigerFusedLinearDPOLoss(beta=LINEAR_DPO_BETA, use_ref_model=True)

    def run(c):
        out = loss_fn(c["weight"], c["hidden"], c.labels, ref_input=c.extra["ref_hidden"],
                      ref_weight=c.extra["ref_weight"])  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    return run


def _fn_linear_dpo_loss(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_linear_dpo_loss)
        return lambda c: f(c["hidden"], c["weight"], c.labels, **c.extra, beta=LINEAR_DPO_BETA)
    if provider == "liger":
        return _liger_linear_dpo_loss()
    import torch

    import rlhf_fast as rf

    backend = rf_backend(provider)

    def run(c):
        h, y = c["hidden"], c.labels
        b = h.shape[0] // 2
        with torch.no_grad():
            ref = rf.linear_token_logprobs(c.extra["ref_hidden"], c.extra["ref_weight"], y, backend=backend).sum(-1)
        loss, _ = rf.linear_dpo_loss(h[:b], y[:b], h[b:], y[b:], c["weight"], ref[:b], ref[b:], beta=LINEAR_DPO_BETA,
                                     backend=backend)  # fmt: skip
        return loss

    return rf_provider(backend, run)


def _check_linear_dpo_loss(case: Case, pristine, out, grads) -> dict:
    """Loss and ``dW`` in float64 sequence by sequence (the loss's gradient with respect to each
    sequence's summed log-prob first), ``dH`` on a sample of rows of the first and last sequences.

    With bfloat16 inputs the reference logits are rounded to bfloat16 (straight through, for the
    gradient) when the provider's head rounds them (every one but widened float32 GEMMs): the loss is a
    difference of sums of thousands of log-probs, so that rounding alone moves it by ~1e-2 at 4096 tokens,
    the same for every provider, and a float64 reference without it would fail them all or need a bound too
    loose to catch errors."""
    import torch
    import torch.nn.functional as F

    h, y = pristine["hidden"], case.labels
    w = pristine["weight"].double().requires_grad_()  # [V, H]
    s = h.shape[0]
    low = h.dtype if h.dtype != torch.float32 and case.head_rounds_logits else None

    def seq_logp(x, weight, i):  # x: [T, H] of sequence i
        return torch.log_softmax(_logits64(x, weight, low), -1).gather(-1, y[i, :, None]).sum()

    with torch.no_grad():
        ref_w = case.extra["ref_weight"].double()
        ref = torch.stack([seq_logp(case.extra["ref_hidden"][i], ref_w, i) for i in range(s)])
        pol = torch.stack([seq_logp(h[i], w, i) for i in range(s)])
    pol_leaf = pol.clone().requires_grad_()
    c, r = (pol_leaf - ref).chunk(2)
    loss = -F.logsigmoid(LINEAR_DPO_BETA * (c - r)).mean()
    (coef,) = torch.autograd.grad(loss, pol_leaf)  # d loss / d (summed log-prob of each sequence)
    ref_dw = torch.zeros_like(w)
    for i in range(s):
        (dw,) = torch.autograd.grad(seq_logp(h[i], w, i), w)
        ref_dw.add_(dw, alpha=coef[i].item())
    return {
        "fwd_err": rel_err(out.detach(), loss.detach()),
        "weight_grad_err": rel_err(grads["weight"], ref_dw),
        "hidden_grad_err": _worst_hidden_err(h, grads, lambda xs, i: seq_logp(xs, w.detach(), i) * coef[i]),
    }


# ---------------------------------------------------------------------------------------------
# linear_ppo_loss: GRPO's policy loss (clipped ratio, sequence-level advantages, k3 KL to a reference whose
# per-token log-probs came with the rollout, token mean) from the policy's hidden states and head

GRPO_KW = {"clip_eps": 0.2, "kl_coef": 0.04}  # TRL's and Liger's GRPO defaults (epsilon, beta)


def eager_linear_grpo_loss(hidden, weight, labels, old_logprobs, advantages, ref_logprobs):
    """The usual way: the [B, T, V] logits, a float32 log_softmax + gather, then GRPO's per-token loss."""
    import torch
    import torch.nn.functional as F

    logp = torch.log_softmax(F.linear(hidden, weight).float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old_logprobs)
    adv = advantages[:, None]  # [B, 1]: one advantage per sequence
    eps = GRPO_KW["clip_eps"]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    log_r = ref_logprobs - logp
    return (pg + GRPO_KW["kl_coef"] * (torch.exp(log_r) - log_r - 1)).mean()


def _setup_linear_ppo_loss(spec: dict) -> Case:
    import torch
    import torch.nn.functional as F

    case = _setup_linear_cross_entropy(spec)
    s, h = SEQS, spec["hidden"]
    t = spec["tokens"] // s
    hidden = case["hidden"].detach().view(s, t, h).requires_grad_()  # [B, T, H]
    labels = case.labels.view(s, t)  # [B, T] the sampled tokens
    w = case["weight"].detach().float()
    logp = torch.empty(s, t)  # the policy's own log-probs: old and reference near them, as in training
    for i in range(s):
        logp[i] = torch.log_softmax(F.linear(hidden[i].detach().float(), w), -1).gather(-1, labels[i, :, None])[:, 0]
    extra = {
        "old_logprobs": logp + 0.2 * torch.randn(s, t),  # ratios spread around 1: some tokens clipped
        "advantages": torch.randn(s),  # [B]: group-normalized, one per completion
        "ref_logprobs": logp + 0.1 * torch.randn(s, t),
    }
    return Case({"hidden": hidden, "weight": case["weight"]}, labels, extra)


def _liger_linear_grpo_loss() -> Callable | str:
    """Liger-Kernel's chunked fused-linear GRPO loss (``LigerFusedLinearGRPOLoss``: a sequence per chunk,
    torch.compile'd; runs on CPU), ``loss_type="bnpo"`` (the token mean over the batch), with the
    reference's per-token log-probs given, as TRL's trainer gives them."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:  # optional: pip install --no-deps liger-kernel
        return f"liger_kernel cannot be imported ({exc})"
    import torch

    eps = GRPO_KW["clip_eps"]
    loss_fn = LigerFusedLinearGRPOLoss(beta=GRPO_KW["kl_coef"], epsilon_low=eps, epsilon_high=eps, loss_type="bnpo")

    def run(c):
        x = c.extra
        out = loss_fn(c["hidden"], c["weight"], c.labels, torch.ones_like(c.labels), x["advantages"],
                      ref_per_token_logps=x["ref_logprobs"], old_per_token_logps=x["old_logprobs"])  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    return run


def _fn_linear_ppo_loss(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_linear_grpo_loss)
        return lambda c: f(c["hidden"], c["weight"], c.labels, **c.extra)
    if provider == "liger":
        return _liger_linear_grpo_loss()
    import rlhf_fast as rf

    backend = rf_backend(provider)

    def run(c):
        x = c.extra
        loss, _ = rf.linear_ppo_loss(c["hidden"], c["weight"], c.labels, x["old_logprobs"], x["advantages"][:, None],
                                     ref_logprobs=x["ref_logprobs"], **GRPO_KW, backend=backend)  # fmt: skip
        return loss

    return rf_provider(backend, run)


def _check_linear_ppo_loss(case: Case, pristine, out, grads) -> dict:
    """Loss and ``dW`` in float64 sequence by sequence through ``rlhf_fast.reference.ppo_loss`` (each
    sequence's token mean weighted by its share of the tokens), ``dH`` on a sample of rows of the first and
    last sequences. With bfloat16 inputs the reference logits are rounded to bfloat16 (straight through) when
    the provider's head rounds them (``Case.head_rounds_logits``): the ratio exp(logp - old) and the clip
    decisions amplify that rounding far past the bfloat16 tolerance otherwise (dW 9.7e-2 off at 48 x 301 x 24)."""
    import torch

    import rlhf_fast as rf

    h, y, x = pristine["hidden"], case.labels, case.extra
    s, t = y.shape
    w = pristine["weight"].double().requires_grad_()  # [V, H]
    low = h.dtype if h.dtype != torch.float32 and case.head_rounds_logits else None

    def seq_loss(hs, weight, i):  # this sequence's share of the batch's token mean
        adv = x["advantages"][i].expand(t)
        loss, _ = rf.reference.ppo_loss(_logits64(hs, weight, low), y[i], x["old_logprobs"][i], adv,
                                        ref_logprobs=x["ref_logprobs"][i], **GRPO_KW)  # fmt: skip
        return loss / s

    total, ref_dw = 0.0, torch.zeros_like(w)
    for i in range(s):
        loss = seq_loss(h[i], w, i)
        (dw,) = torch.autograd.grad(loss, w)
        total, ref_dw = total + loss.detach(), ref_dw.add_(dw)
    return {
        "fwd_err": rel_err(out.detach(), total),
        "weight_grad_err": rel_err(grads["weight"], ref_dw),
        "hidden_grad_err": _worst_hidden_err(h, grads, lambda hs, i: seq_loss(hs, w.detach(), i)),
    }


def linear_flops(spec: dict) -> float:
    return spec["tokens"] * spec["vocab"] * spec["hidden"]


LINEAR_OPS = (
    Op("linear_cross_entropy", ("rf-cpp", "rf-triton", "rf-torch", "eager", "compile", "torch-lce", "cce", "liger"),
       Floor("flops", linear_flops, {"fwd": 2, "bwd": 6, "full": 6},
             "N*V*H FLOPs x fwd 2 (the logits), bwd 6 (logits again, dH = G W, dW = G^T H), full 6 "
             "(gradient in forward; recomputing the logits in the backward makes it 8)"),
       _setup_linear_cross_entropy, _fn_linear_cross_entropy, _check_linear_cross_entropy),
    Op("linear_token_logprobs", ("rf-cpp", "rf-triton", "rf-torch", "eager", "compile"),
       Floor("flops", linear_flops, {"fwd": 2, "bwd": 6, "full": 8},
             "N*V*H FLOPs x fwd 2 (the logits), bwd 6 (logits again, dH = G W, dW = G^T H), full 8 "
             "(the upstream gradient of each token is only known in the backward)"),
       _setup_linear_token_logprobs, _fn_linear_token_logprobs, _check_linear_token_logprobs),
    Op("linear_dpo_loss", ("rf-cpp", "rf-triton", "rf-torch", "eager", "compile", "liger"),
       Floor("flops", linear_flops, {"fwd": 4, "bwd": 6, "full": 8},
             "N*V*H FLOPs x fwd 4 (policy and reference logits), bwd 6 (policy logits again, dH, dW), full 8 "
             "(reference 2 + policy 6: the per-sequence upstream gradient is known only once every token's "
             "log-prob is)"),
       _setup_linear_dpo_loss, _fn_linear_dpo_loss, _check_linear_dpo_loss, LINEAR_DPO_TOLERANCE),
    Op("linear_ppo_loss", ("rf-cpp", "rf-triton", "rf-torch", "eager", "compile", "liger"),
       Floor("flops", linear_flops, {"fwd": 2, "bwd": 6, "full": 6},
             "N*V*H FLOPs x fwd 2 (the logits), bwd 6 (logits again, dH = G W, dW = G^T H), full 6 "
             "(gradient in forward: each token's upstream gradient is known with its log-prob)"),
       _setup_linear_ppo_loss, _fn_linear_ppo_loss, _check_linear_ppo_loss),
)  # fmt: skip
