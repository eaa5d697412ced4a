"""Plain-PyTorch reference of every op: the formulas of DESIGN.md, written the readable way.

These functions materialize the full ``[..., V]`` softmax, so they are for tests (run them on
float64 inputs to get the ground truth) and for benchmarks (as "eager PyTorch written the usual
way"). They differentiate through ordinary autograd. They do no input validation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    return -F.logsigmoid(diff).mean()


def ranking_loss(rewards):
    """Mean over the batch and all pairs i < j (i ranked better) of -log sigmoid(r_i - r_j)."""
    K = rewards.shape[1]
    pairs = [-F.logsigmoid(rewards[:, i] - rewards[:, j]) for i in range(K) for j in range(i + 1, K)]
    return torch.stack(pairs, dim=1).mean()


def sequence_logprobs(logits, labels, *, ignore_index=-100, average=False):
    """Sum (or mean) over the valid tokens of each sequence (last label dim)."""
    logp = token_logprobs(logits, labels, ignore_index=ignore_index)
    n = (labels != ignore_index).sum(-1)
    return logp.sum(-1) / n.clamp(min=1) if average else logp.sum(-1)


def _agg(per_token, mask, loss_agg):
    if loss_agg == "token-mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    n = mask.sum(-1)
    per_seq = (per_token * mask).sum(-1)
    if loss_agg == "seq-mean-token-mean":
        per_seq = per_seq / n.clamp(min=1)
    has = (n > 0).to(per_seq.dtype)
    return (per_seq * has).sum() / has.sum().clamp(min=1)


def ppo_loss(
    logits,
    labels,
    old_logprobs,
    advantages,
    *,
    clip_eps=0.2,
    clip_eps_high=None,
    dual_clip=None,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy_coef=0.0,
    temperature=1.0,
    ignore_index=-100,
    loss_agg="token-mean",
):
    """The PPO loss of DESIGN.md, element by element; returns (loss, stats)."""
    valid = labels != ignore_index
    mask = valid.to(logits.dtype if logits.dtype == torch.float64 else torch.float32)
    logp, ent = token_logprobs_and_entropy(logits, labels, temperature=temperature, ignore_index=ignore_index)
    old = torch.where(valid, old_logprobs.to(logp.dtype), 0)
    adv = torch.where(valid, advantages.to(logp.dtype).expand(labels.shape), 0)
    ratio = torch.exp(torch.where(adv == 0, 0.0, logp - old))  # A = 0: pg = 0, even where exp overflows
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    loss_t = pg - entropy_coef * ent
    kl_ref = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logprobs is not None:
        kl = kl_estimate(logp, torch.where(valid, ref_logprobs.to(logp.dtype), 0), kl_estimator)
        loss_t = loss_t + kl_coef * kl
        kl_ref = (kl * mask).sum() / mask.sum().clamp(min=1)
    n = mask.sum().clamp(min=1)
    stats = {
        "clip_frac": ((clipped > unclipped).to(mask.dtype) * mask).sum() / n,
        "approx_kl": (kl_estimate(logp, old, "k3") * mask).sum() / n,
        "entropy": (ent * mask).sum() / n,
        "kl_ref": kl_ref,
    }
    return _agg(loss_t, mask, loss_agg), stats


def dpo_loss(
    chosen_logits,
    chosen_labels,
    rejected_logits,
    rejected_labels,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    ignore_index=-100,
    average_logprobs=False,
    nll_coef=0.0,
):
    """The DPO-family losses of DESIGN.md; returns (loss, stats)."""
    pc = sequence_logprobs(chosen_logits, chosen_labels, ignore_index=ignore_index, average=average_logprobs)
    pr = sequence_logprobs(rejected_logits, rejected_labels, ignore_index=ignore_index, average=average_logprobs)
    if ref_chosen_logps is not None:
        pc, pr = pc - ref_chosen_logps, pr - ref_rejected_logps
    z, ls = pc - pr, label_smoothing
    logsig = F.logsigmoid  # log(sigmoid(t)) is -inf once sigmoid underflows (|t| > ~88 in float32)
    if loss_type == "sigmoid":
        losses = -(1 - ls) * logsig(beta * z) - ls * logsig(-beta * z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:  # robust
        losses = (-(1 - ls) * logsig(beta * z) + ls * logsig(-beta * z)) / (1 - 2 * ls)
    loss = losses.mean()
    if nll_coef:
        valid = chosen_labels != ignore_index
        logp = token_logprobs(chosen_logits, chosen_labels, ignore_index=ignore_index)
        loss = loss + nll_coef * -(logp.sum() / valid.sum().clamp(min=1))
    cr, rr = beta * pc, beta * pr
    stats = {
        "chosen_rewards": cr.mean(),
        "rejected_rewards": rr.mean(),
        "reward_margin": (cr - rr).mean(),
        "reward_accuracy": (cr > rr).to(cr.dtype).mean(),
    }
    return loss, stats
