"""rlhf_fast: fused, streaming RLHF losses straight from logits.

>>> import rlhf_fast as rf
>>> logp = rf.token_logprobs(logits, labels)          # [...] float32, no [tokens, vocab] float32 copy
"""

from __future__ import annotations

from rlhf_fast import nn, reference
from rlhf_fast._dispatch import BackendStatus, backends
from rlhf_fast.buffer_cache import cache_info, empty_cache, set_cache_limit
from rlhf_fast.ops import (
    cross_entropy,
    dpo_loss,
    kl_divergence,
    kl_estimate,
    linear_cross_entropy,
    linear_dpo_loss,
    linear_kl_divergence,
    linear_ppo_loss,
    linear_token_entropy,
    linear_token_logprobs,
    linear_token_logprobs_and_entropy,
    ppo_loss,
    ranking_loss,
    reward_loss,
    sequence_logprobs,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "backends",
    "cache_info",
    "cross_entropy",
    "dpo_loss",
    "empty_cache",
    "kl_divergence",
    "kl_estimate",
    "linear_cross_entropy",
    "linear_dpo_loss",
    "linear_kl_divergence",
    "linear_ppo_loss",
    "linear_token_entropy",
    "linear_token_logprobs",
    "linear_token_logprobs_and_entropy",
    "nn",
    "ppo_loss",
    "ranking_loss",
    "reference",
    "reward_loss",
    "sequence_logprobs",
    "set_cache_limit",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
