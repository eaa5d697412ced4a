"""The per-token ops beyond ``token_logprobs``: ``token_entropy``, ``token_logprobs_and_entropy`` and
``kl_divergence``, each a ``[N]`` (or ``[2, N]``) output on ``[N, V]`` logits with an upstream gradient != 1,
checked on a sample of rows against ``rlhf_fast.reference`` in float64.
"""

from __future__ import annotations

from rlhf_fast.bench.cases import (
    Case,
    Floor,
    Op,
    as_batch,
    logits_bytes,
    logits_passes,
    peer,
    randn_logits,
    rf_backend,
    rf_provider,
    sampled_check,
    trl_function,
    trl_token_logprobs,
)

# ---------------------------------------------------------------------------------------------
# token_entropy: [N] entropy of the softmax, upstream gradient != 1


def eager_token_entropy(logits):
    """The usual way: a float32 [tokens, vocab] log_softmax, its exp, a product and a sum."""
    import torch

    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def _setup_logits_op(spec: dict, outputs: int = 1) -> Case:
    """``[N, V]`` logits, ``[N]`` labels and an upstream gradient ``[N]`` (or ``[outputs, N]``) != 1."""
    import torch

    n, v = spec["tokens"], spec["vocab"]
    logits = randn_logits(spec, (n, v)).requires_grad_()  # [N, V]
    grad_out = torch.randn(n) if outputs == 1 else torch.randn(outputs, n)
    return Case({"logits": logits}, torch.randint(0, v, (n,)), grad_out=grad_out)


def _fn_token_entropy(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_token_entropy)
        return lambda c: f(c["logits"])
    if provider == "trl":
        f = trl_function("entropy_from_logits")
        return f if isinstance(f, str) else (lambda c: f(as_batch(c["logits"])).reshape(-1))
    import rlhf_fast as rf

    backend = rf_backend(provider)
    return rf_provider(backend, lambda c: rf.token_entropy(c["logits"], backend=backend))


def _ref_token_entropy(x, case, rows):
    import rlhf_fast as rf

    return rf.reference.token_entropy(x)


# ---------------------------------------------------------------------------------------------
# token_logprobs_and_entropy: both per-token numbers in one pass; the output is [2, N] (log-probs, entropy)


def eager_token_logprobs_and_entropy(logits, labels):
    import torch

    logp_all = torch.log_softmax(logits.float(), -1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    return torch.stack([logp, -(logp_all.exp() * logp_all).sum(-1)])


def _fn_token_logprobs_and_entropy(provider: str):
    import torch

    if provider in ("eager", "compile"):
        f = peer(provider, eager_token_logprobs_and_entropy)
        return lambda c: f(c["logits"], c.labels)
    if provider == "trl":  # two calls, two passes over the logits
        logp, entropy = trl_token_logprobs(), _fn_token_entropy("trl")
        if isinstance(logp, str):
            return logp
        return lambda c: torch.stack([logp(c), entropy(c)])
    import rlhf_fast as rf

    backend = rf_backend(provider)
    return rf_provider(
        backend, lambda c: torch.stack(rf.token_logprobs_and_entropy(c["logits"], c.labels, backend=backend))
    )


def _ref_token_logprobs_and_entropy(x, case, rows):
    import torch

    import rlhf_fast as rf

    return torch.stack(rf.reference.token_logprobs_and_entropy(x, case.labels[rows]))


# ---------------------------------------------------------------------------------------------
# kl_divergence: exact KL(P || Q) per token; the policy P gets the gradient, the reference Q does not


def eager_kl_divergence(p_logits, q_logits):
    """The usual way: two float32 [tokens, vocab] log_softmax, then sum p * (log p - log q)."""
    import torch

    logp = torch.log_softmax(p_logits.float(), -1)
    logq = torch.log_softmax(q_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _setup_kl_divergence(spec: dict) -> Case:
    case = _setup_logits_op(spec)
    # the reference model's logits: near the policy's, as after some training
    q = case["logits"].detach().float() + 0.5 * randn_logits({**spec, "seed": spec["seed"] + 1}, case["logits"].shape)
    case.extra["q_logits"] = q.to(case["logits"].dtype)  # [N, V], no gradient
    return case


def _fn_kl_divergence(provider: str):
    if provider in ("eager", "compile"):
        f = peer(provider, eager_kl_divergence)
        return lambda c: f(c["logits"], c.extra["q_logits"])
    import rlhf_fast as rf

    backend = rf_backend(provider)
    return rf_provider(backend, lambda c: rf.kl_divergence(c["logits"], c.extra["q_logits"], backend=backend))


def _ref_kl_divergence(x, case, rows):
    import rlhf_fast as rf

    return rf.reference.kl_divergence(x, case.extra["q_logits"][rows].double())


TOKEN_OPS = (
    Op("token_entropy", ("rf-cpp", "rf-triton", "rf-torch", "eager", "compile", "trl"),
       logits_passes(3, "read forward, read backward, write the gradient"),
       _setup_logits_op, _fn_token_entropy, sampled_check(_ref_token_entropy)),
    Op("token_logprobs_and_entropy", ("rf-cpp", "rf-triton", "rf-torch", "eager", "compile", "trl"),
       logits_passes(3, "read forward, read backward, write the gradient"),
       lambda spec: _setup_logits_op(spec, outputs=2), _fn_token_logprobs_and_entropy,
       sampled_check(_ref_token_logprobs_and_entropy)),
    Op("kl_divergence", ("rf-cpp", "rf-triton", "rf-torch", "eager", "compile"),
       Floor("bytes", logits_bytes, {"fwd": 2, "bwd": 3, "full": 5},
             "logits passes fwd 2 (read P and Q), bwd 3 (read both again, write P's gradient), full 5"),
       _setup_kl_divergence, _fn_kl_divergence, sampled_check(_ref_kl_divergence)),
)  # fmt: skip
