"""Plain-PyTorch reference of every op: the formulas of DESIGN.md, written the readable way.

These functions materialize the full ``[..., V]`` softmax, so they are for tests (run them on
float64 inputs to get the ground truth) and for benchmarks (as "eager PyTorch written the usual
way"). They differentiate through ordinary autograd. They do no input validation.
"""

from __future__ import annotations

import torch


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # Upcast float16/bfloat16 (never downcast float64: tests feed float64 for ground truth).
    x = logits if logits.dtype == torch.float64 else logits.float()
    return x / temperature if temperature != 1.0 else x


def _xlogy_safe(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # p * x with 0 * (-inf) := 0 (masked vocabulary entries carry no mass). Masking x rather
    # than the product keeps the backward free of 0 * inf as well.
    return p * torch.where(p > 0, x, torch.zeros_like(x))


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100):
    """log softmax(logits / T)[label]; 0 where label == ignore_index. Shape [...]."""
    logp = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, out, torch.zeros_like(out))


def token_entropy(logits, *, temperature=1.0):
    """H(softmax(logits / T)) = -sum_v p_v log p_v. Shape [...]."""
    logp = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    return -_xlogy_safe(logp.exp(), logp).sum(-1)


def token_logprobs_and_entropy(logits, labels, *, temperature=1.0, ignore_index=-100):
    """(token_logprobs, token_entropy), both 0 where label == ignore_index."""
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    ent = token_entropy(logits, temperature=temperature)
    return logp, torch.where(labels != ignore_index, ent, torch.zeros_like(ent))


def kl_divergence(p_logits, q_logits, *, temperature=1.0):
    """Exact KL(P || Q) = sum_v p_v (log p_v - log q_v), P = softmax(p_logits / T). Shape [...]."""
    logp = torch.log_softmax(_scaled(p_logits, temperature), dim=-1)
    logq = torch.log_softmax(_scaled(q_logits, temperature), dim=-1)
    p = logp.exp()
    return _xlogy_safe(p, logp - logq).sum(-1)


def kl_estimate(logprobs, ref_logprobs, kind="k3"):
    """k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(-log_ratio) + log_ratio - 1


def reward_loss(chosen_rewards, rejected_rewards, *, margin=None):
    """-log sigmoid(r_chosen - r_rejected - margin), mean over the batch."""
    diff = chosen_rewards - rejected_rewards - (0.0 if margin is None else margin)
    return -torch.log(torch.sigmoid(diff)).mean()


def ranking_loss(rewards):
    """Mean over the batch and all pairs i < j (i ranked better) of -log sigmoid(r_i - r_j)."""
    K = rewards.shape[1]
    pairs = [-torch.log(torch.sigmoid(rewards[:, i] - rewards[:, j])) for i in range(K) for j in range(i + 1, K)]
    return torch.stack(pairs, dim=1).mean()
