"""Controlled sentiment generation in miniature, after the IMDb experiment of the DPO paper
(Rafailov et al., 2023, "Direct Preference Optimization", section 6.1).

A small grammar writes short movie reviews (8-25 words) from positive, negative and neutral word
lists; a lexicon score of the text is the programmatic *true reward*; preference pairs are labelled
by a Bradley-Terry coin on that reward and K-way rankings by a Plackett-Luce sample. Everything is
deterministic given the seed, and nothing is downloaded.

Text conventions: a prompt is the opening of a review ("this movie was", "honestly the plot"); a
completion starts with a space, so ``prompt + completion`` is the whole review and
``true_reward(prompt + completion)`` scores it. Reviews are lower case with punctuation attached to
the word before it ("great, and the cast was dull.").
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

from rlhf_fast.demo.io import read_jsonl, write_jsonl
from rlhf_fast.demo.models import tiny_model, tiny_reward_model
from rlhf_fast.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer
from rlhf_fast.demo.words import (
    CLAUSE_BREAKS,
    COPULAS,
    DETERMINERS,
    FILLERS,
    INTENSIFIERS,
    LEXICON,
    NEGATIVE,
    NEGATIVE_ADJECTIVES,
    NEGATIVE_REACTIONS,
    NEGATIVE_VERBS,
    NEGATORS,
    NEUTRAL,
    NEUTRAL_ADJECTIVES,
    NEUTRAL_REACTIONS,
    NEUTRAL_VERBS,
    NOUNS,
    OPENERS,
    POSITIVE,
    POSITIVE_ADJECTIVES,
    POSITIVE_REACTIONS,
    POSITIVE_VERBS,
    PUNCTUATION,
    SPEAKERS,
    vocabulary,
)

__all__ = [
    "BOS_ID", "EOS_ID", "LEXICON", "MAX_WORDS", "MIN_WORDS", "NEGATIVE", "NEUTRAL", "PAD_ID", "POSITIVE",
    "REWARD_SCALE", "UNK_ID", "bradley_terry_probability", "build_tokenizer", "make_preference_pairs",
    "make_prompts", "make_rankings", "make_reviews", "make_sft_dataset", "read_jsonl", "sample_completion",
    "tiny_model", "tiny_reward_model", "true_reward", "true_rewards", "vocabulary", "write_jsonl",
]  # fmt: skip

REWARD_SCALE = 2.0  # true_reward = tanh(score / REWARD_SCALE): one strong word ("great") gives tanh(1)
MIN_WORDS, MAX_WORDS = 8, 25  # review length in words, punctuation not counted

# Grammar probabilities.
_P_NEUTRAL = 0.25  # a sentiment slot takes a neutral word
_P_NEGATE = 0.15  # a predicate or verb is negated
_P_INTENSIFY = 0.35
_P_SECOND_ADJECTIVE = 0.3
_P_EXCLAIM = 0.2

_WORD_RE = re.compile(r"[a-z]+|[.,!?;]")
_ADJECTIVES = (tuple(POSITIVE_ADJECTIVES), tuple(NEGATIVE_ADJECTIVES), tuple(NEUTRAL_ADJECTIVES))
_VERBS = (tuple(POSITIVE_VERBS), tuple(NEGATIVE_VERBS), tuple(NEUTRAL_VERBS))
_REACTIONS = (tuple(POSITIVE_REACTIONS), tuple(NEGATIVE_REACTIONS), tuple(NEUTRAL_REACTIONS))

# ----------------------------------------------------------------------------------------------
# The true reward
# ----------------------------------------------------------------------------------------------


def true_reward(text: str) -> float:
    """The programmatic true reward of a review: a bounded lexicon sentiment score in (-1, 1).

    ``text`` is lower-cased and split into words and punctuation. Scanning left to right, each word
    of :data:`LEXICON` adds its score (+2 / +1 praise, -1 / -2 criticism, 0 neutral) to ``S``; a
    negator ("not", "never", "hardly") flips the sign of the next lexicon word of the same clause
    (a clause ends at punctuation, "and" or "but"; two negators cancel). Words outside the lexicon
    (including special tokens left in decoded text) count 0. Then::

        true_reward = tanh(S / REWARD_SCALE)      # REWARD_SCALE = 2

    so "great" gives tanh(1) = 0.76, "not great" -0.76, "good but dull" 0, and repeating praise
    saturates towards 1 instead of growing without bound.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    score, negated = 0.0, False
    for word in _WORD_RE.findall(text.lower()):
        if word in CLAUSE_BREAKS:
            negated = False
        elif word in NEGATORS:
            negated = not negated
        elif word in LEXICON:
            score += -LEXICON[word] if negated else LEXICON[word]
            negated = False
    return math.tanh(score / REWARD_SCALE)


def true_rewards(texts: Sequence[str]) -> list[float]:
    """:func:`true_reward` of each text, in order."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, not a single str")
    return [true_reward(t) for t in texts]


def bradley_terry_probability(reward_a: float, reward_b: float, beta_bt: float = 1.0) -> float:
    """P(a preferred over b) = sigmoid(beta_bt * (reward_a - reward_b)), without overflow."""
    return 0.5 * (1.0 + math.tanh(0.5 * beta_bt * (reward_a - reward_b)))


# ----------------------------------------------------------------------------------------------
# The grammar
# ----------------------------------------------------------------------------------------------


def _rng(seed: int, stream: str) -> random.Random:
    """An independent generator per (seed, stream); string seeds hash the same in every process."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return random.Random(f"rlhf_fast.demo/{stream}/{seed}")


def _pick(rng: random.Random, p_positive: float, words: tuple[tuple[str, ...], ...]) -> str:
    """A word from (positive, negative, neutral) lists: neutral with probability _P_NEUTRAL, else
    positive with probability ``p_positive`` (the review's tone)."""
    positive, negative, neutral = words
    if rng.random() < _P_NEUTRAL:
        return rng.choice(neutral)
    return rng.choice(positive if rng.random() < p_positive else negative)


def _predicate(rng: random.Random, tone: float) -> list[str]:
    """[not | hardly] [intensifier] ADJ [and | but [intensifier] ADJ]: "not very good"."""
    words = []
    negator = rng.choice(("not", "hardly")) if rng.random() < _P_NEGATE else None
    if negator:
        words.append(negator)
    if negator != "hardly" and rng.random() < _P_INTENSIFY:
        words.append(rng.choice(INTENSIFIERS))
    words.append(_pick(rng, tone, _ADJECTIVES))
    if rng.random() < _P_SECOND_ADJECTIVE:
        words.append(rng.choice(("and", "but")))
        if rng.random() < _P_INTENSIFY:
            words.append(rng.choice(INTENSIFIERS))
        words.append(_pick(rng, tone, _ADJECTIVES))
    return words


def _verb_phrase(rng: random.Random, tone: float) -> list[str]:
    """[never] VERB (it | the NOUN): "never liked the ending"."""
    words = ["never"] if rng.random() < _P_NEGATE else []
    words.append(_pick(rng, tone, _VERBS))
    words += ["it"] if rng.random() < 0.4 else ["the", rng.choice(NOUNS)]
    return words


def _noun_continuation(rng: random.Random, tone: float) -> list[str]:
    """What follows a subject noun phrase: COPULA PREDICATE, or "made me" REACTION."""
    if rng.random() < 0.25:
        return ["made", "me", _pick(rng, tone, _REACTIONS)]
    return [rng.choice(COPULAS), *_predicate(rng, tone)]


def _clause(rng: random.Random, tone: float) -> list[str]:
    """A whole clause after a connector: subject + continuation, "i" + verb phrase, or a neutral filler."""
    u = rng.random()
    if u < 0.55:
        subject = ["it"] if rng.random() < 0.3 else ["the", rng.choice(NOUNS)]
        return subject + _noun_continuation(rng, tone)
    if u < 0.8:
        return ["i", *_verb_phrase(rng, tone)]
    return rng.choice(FILLERS).split()


def _opening(rng: random.Random) -> list[str]:
    """A review's first 2-4 words, ending in a copula, a subject noun or "i"."""
    u = rng.random()
    if u < 0.45:  # ends in a copula: "this movie was", "honestly the plot seemed"
        head = [rng.choice(DETERMINERS)] if rng.random() < 0.6 else [rng.choice(OPENERS), "the"]
        return [*head, rng.choice(NOUNS), rng.choice(COPULAS)]
    if u < 0.8:  # ends in a noun: "the acting", "frankly the script"
        head = [rng.choice(DETERMINERS)] if rng.random() < 0.6 else [rng.choice(OPENERS), "the"]
        return [*head, rng.choice(NOUNS)]
    return rng.choice(SPEAKERS).split()  # ends in "i": "my friend and i"


def _continuation(last_word: str, rng: random.Random, tone: float) -> list[str]:
    """The words that complete the clause an opening started, chosen by the opening's last word."""
    if last_word in COPULAS:
        return _predicate(rng, tone)
    if last_word in NOUNS:
        return _noun_continuation(rng, tone)
    return _verb_phrase(rng, tone)  # last_word == "i"


def _join(words: list[str]) -> str:
    """Words to text, punctuation attached to the word before it."""
    return "".join(w if w in PUNCTUATION else " " + w for w in words)


def _n_words(words: list[str]) -> int:
    return sum(w not in PUNCTUATION for w in words)


def sample_completion(prompt: str, rng: random.Random) -> str:
    """One grammar completion of ``prompt`` (a review opening), with a leading space.

    The review's tone ``p`` is drawn uniformly from [0, 1]: each sentiment word is positive with
    probability ``p`` (once it is not neutral), so reviews range from glowing to scathing and mixed.
    After the opening's clause come 1-3 more clauses joined by ", and", ", but" or a full stop; the
    whole review has MIN_WORDS to MAX_WORDS words (redrawn until it does).

    Args:
        prompt: text whose last word is a copula ("was", "is", "felt", "seemed"), a noun of the
            grammar ("the acting") or "i" — every output of :func:`make_prompts` is one.
        rng: the ``random.Random`` to draw from.
    """
    prompt_words = _WORD_RE.findall(prompt.lower()) if isinstance(prompt, str) else []
    if not prompt_words or not (prompt_words[-1] in COPULAS or prompt_words[-1] in NOUNS or prompt_words[-1] == "i"):
        raise ValueError(f"prompt must end in a copula {COPULAS}, a grammar noun or 'i', got {prompt!r}")
    for _ in range(1000):
        tone = rng.random()
        words = _continuation(prompt_words[-1], rng, tone)
        for _ in range(rng.randint(1, 3)):
            words += rng.choice(([",", "and"], [",", "but"], ["."])) + _clause(rng, tone)
        words.append("!" if rng.random() < _P_EXCLAIM else ".")
        if MIN_WORDS <= _n_words(prompt_words) + _n_words(words) <= MAX_WORDS:
            return _join(words)
    raise ValueError(f"prompt {prompt!r} leaves no room for a review of {MIN_WORDS}-{MAX_WORDS} words")


def _distinct_completions(prompt: str, k: int, rng: random.Random) -> list[str]:
    """``k`` different grammar completions of ``prompt`` (a repeat is redrawn)."""
    out: list[str] = []
    for _ in range(100 * k):
        c = sample_completion(prompt, rng)
        if c not in out:
            out.append(c)
        if len(out) == k:
            return out
    raise ValueError(f"could not draw {k} different completions of {prompt!r}")


# ----------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_beta(beta_bt: float) -> None:
    if not isinstance(beta_bt, (int, float)) or isinstance(beta_bt, bool) or not math.isfinite(beta_bt):
        raise ValueError(f"beta_bt must be a finite number, got {beta_bt!r}")
    if beta_bt < 0:
        raise ValueError(f"beta_bt must be >= 0, got {beta_bt}")


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` review openings of 2-4 words ("this movie was", "the acting", "honestly i")."""
    _check_count("n", n, 0)
    rng = _rng(seed, "prompts")
    return [" ".join(_opening(rng)) for _ in range(n)]


def make_reviews(n: int, seed: int) -> list[str]:
    """``n`` whole reviews (prompt + completion of :func:`make_sft_dataset`), for ``{"text"}`` data."""
    return [row["prompt"] + row["completion"] for row in make_sft_dataset(n, seed)]


def make_sft_dataset(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "completion"}``: openings from :func:`make_prompts` (same ``n``, ``seed``)
    completed by the grammar with a random tone each, so the set teaches the grammar and has no
    preferred sentiment (its mean true reward is near 0)."""
    prompts = make_prompts(n, seed)
    rng = _rng(seed, "sft")
    return [{"prompt": p, "completion": sample_completion(p, rng)} for p in prompts]


def _sampled(sample: Callable[[list[str]], list[str]], prompts: list[str]) -> list[str]:
    """Completions from a policy sampler, checked, each with the leading space of our convention."""
    out = sample(list(prompts))
    if not isinstance(out, (list, tuple)) or len(out) != len(prompts) or not all(isinstance(c, str) for c in out):
        raise ValueError(f"sample(prompts) must return a list of {len(prompts)} str, got {type(out).__name__}")
    return [c if c[:1].isspace() else " " + c for c in out]


def make_preference_pairs(
    n: int, seed: int, *, beta_bt: float = 1.0, sample: Callable[[list[str]], list[str]] | None = None
) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}`` labelled by a Bradley-Terry coin on the true reward.

    Each prompt (from :func:`make_prompts` with the same ``n``, ``seed``) gets two completions ``a``,
    ``b``: two different grammar completions, or, with ``sample``, one from each of two calls
    ``sample(prompts)``. Then ``a`` is chosen with probability
    ``sigmoid(beta_bt * (true_reward(prompt + a) - true_reward(prompt + b)))``, as a human rater with
    Bradley-Terry noise would. Rewards lie in (-1, 1), so ``beta_bt = 1`` gives noisy labels (at most
    88% agreement with the reward); larger ``beta_bt`` is cleaner, ``beta_bt = 0`` is a fair coin.

    Args:
        n: number of pairs. seed: int, sets prompts, completions and coins.
        beta_bt: >= 0, the inverse temperature of the labeller.
        sample: optional policy sampler, ``sample(prompts: list[str]) -> list[str]`` of completions
            (a leading space is added where missing).
    """
    _check_count("n", n, 0)
    _check_beta(beta_bt)
    prompts = make_prompts(n, seed)
    if sample is None:
        rng = _rng(seed, "pairs")
        pairs = [_distinct_completions(p, 2, rng) for p in prompts]
    else:
        pairs = list(zip(_sampled(sample, prompts), _sampled(sample, prompts), strict=True))
    coins = _rng(seed, "coins")
    rows = []
    for prompt, (a, b) in zip(prompts, pairs, strict=True):
        p_a = bradley_terry_probability(true_reward(prompt + a), true_reward(prompt + b), beta_bt)
        chosen, rejected = (a, b) if coins.random() < p_a else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def make_rankings(n: int, k: int, seed: int, *, beta_bt: float = 1.0) -> list[dict]:
    """``n`` rows ``{"prompt", "responses": [best, ..., worst]}`` of ``k`` grammar completions each,
    ordered by a Plackett-Luce sample on the true reward (the K-way form of Bradley-Terry).

    The order is drawn by the Gumbel trick: sorting ``beta_bt * r_i + G_i`` (``G_i`` standard Gumbel)
    in decreasing order picks first item ``i`` with probability ``softmax(beta_bt * r)_i``, then the
    next among the rest the same way. With ``k = 2`` this is :func:`make_preference_pairs`' coin.
    """
    _check_count("n", n, 0)
    _check_count("k", k, 2)
    _check_beta(beta_bt)
    prompts = make_prompts(n, seed)
    rng, gumbel = _rng(seed, "rankings"), _rng(seed, "plackett-luce")
    rows = []
    for prompt in prompts:
        responses = _distinct_completions(prompt, k, rng)
        keys = []
        for response in responses:
            e = gumbel.expovariate(1.0)  # G = -log(E), E ~ Exp(1)
            keys.append(beta_bt * true_reward(prompt + response) + (-math.log(e) if e > 0 else math.inf))
        order = sorted(range(k), key=lambda i: -keys[i])
        rows.append({"prompt": prompt, "responses": [responses[i] for i in order]})
    return rows
