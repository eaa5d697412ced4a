"""The offline demo: a synthetic sentiment task (reviews, true reward, preference data), an offline
tokenizer and tiny models built from configs. See :mod:`rlhf_fast.demo.sentiment`."""

from rlhf_fast.demo.io import read_jsonl, write_jsonl
from rlhf_fast.demo.models import tiny_model, tiny_reward_model
from rlhf_fast.demo.sentiment import (
    LEXICON,
    make_preference_pairs,
    make_prompts,
    make_rankings,
    make_reviews,
    make_sft_dataset,
    true_reward,
    true_rewards,
)
from rlhf_fast.demo.tokenizer import build_tokenizer

__all__ = [
    "LEXICON", "build_tokenizer", "make_preference_pairs", "make_prompts", "make_rankings", "make_reviews",
    "make_sft_dataset", "read_jsonl", "tiny_model", "tiny_reward_model", "true_reward", "true_rewards",
    "write_jsonl",
]  # fmt: skip
