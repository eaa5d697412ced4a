"""The word lists of the demo's review grammar and the sentiment lexicon built from them.

Every word the grammar can emit is listed here (see :func:`vocabulary`), so the offline tokenizer
covers the whole grammar. Scores: +2 / +1 for strong / mild praise, -1 / -2 for mild / strong
criticism, 0 for descriptive but neutral words. Each positive list mirrors its negative list (same
number of words of each score), so a review's sentiment is symmetric about 0 under the grammar.
Only words with an entry in :data:`LEXICON` can be
negated (see :func:`rlhf_fast.demo.sentiment.true_reward`); intensifiers and function words carry
no score and are not in it.
"""

from __future__ import annotations

# Adjectives (predicates: "the plot was ___").
POSITIVE_ADJECTIVES: dict[str, float] = {
    "good": 1.0, "fun": 1.0, "funny": 1.0, "charming": 1.0, "clever": 1.0,
    "enjoyable": 1.0, "solid": 1.0, "touching": 1.0, "fresh": 1.0, "lovely": 1.0,
    "great": 2.0, "wonderful": 2.0, "brilliant": 2.0, "excellent": 2.0, "superb": 2.0,
    "fantastic": 2.0, "beautiful": 2.0, "gripping": 2.0, "stunning": 2.0, "delightful": 2.0,
}  # fmt: skip
NEGATIVE_ADJECTIVES: dict[str, float] = {
    "weak": -1.0, "dull": -1.0, "bland": -1.0, "silly": -1.0, "messy": -1.0,
    "clumsy": -1.0, "flat": -1.0, "predictable": -1.0, "forgettable": -1.0, "uneven": -1.0,
    "terrible": -2.0, "awful": -2.0, "boring": -2.0, "horrible": -2.0, "dreadful": -2.0,
    "painful": -2.0, "pointless": -2.0, "unwatchable": -2.0, "lifeless": -2.0, "tedious": -2.0,
}  # fmt: skip
NEUTRAL_ADJECTIVES: dict[str, float] = dict.fromkeys(
    ("long", "short", "quiet", "loud", "slow", "simple", "dark", "strange", "familiar", "ordinary",
     "typical", "colorful", "old", "modern", "serious"),
    0.0,
)  # fmt: skip

# Past-tense verbs with an object ("i ___ the ending").
POSITIVE_VERBS: dict[str, float] = {"loved": 2.0, "adored": 2.0, "liked": 1.0, "enjoyed": 1.0, "admired": 1.0}
NEGATIVE_VERBS: dict[str, float] = {
    "hated": -2.0, "despised": -2.0, "disliked": -1.0, "regretted": -1.0, "resented": -1.0,
}  # fmt: skip
NEUTRAL_VERBS: dict[str, float] = dict.fromkeys(("watched", "saw", "remember", "finished"), 0.0)

# Reactions ("the ending made me ___").
POSITIVE_REACTIONS: dict[str, float] = {"smile": 1.0, "laugh": 1.0, "cheer": 2.0}
NEGATIVE_REACTIONS: dict[str, float] = {"yawn": -1.0, "cringe": -1.0, "groan": -2.0}
NEUTRAL_REACTIONS: dict[str, float] = dict.fromkeys(("think", "wonder"), 0.0)

POSITIVE: dict[str, float] = {**POSITIVE_ADJECTIVES, **POSITIVE_VERBS, **POSITIVE_REACTIONS}
NEGATIVE: dict[str, float] = {**NEGATIVE_ADJECTIVES, **NEGATIVE_VERBS, **NEGATIVE_REACTIONS}
NEUTRAL: dict[str, float] = {**NEUTRAL_ADJECTIVES, **NEUTRAL_VERBS, **NEUTRAL_REACTIONS}
LEXICON: dict[str, float] = {**POSITIVE, **NEGATIVE, **NEUTRAL}

# A negator flips the sign of the next lexicon word of its clause.
NEGATORS: tuple[str, ...] = ("not", "never", "hardly")
# Words that end a clause, and with it the scope of a negator.
CLAUSE_BREAKS: frozenset[str] = frozenset({".", ",", "!", "?", ";", "and", "but"})
PUNCTUATION: tuple[str, ...] = (".", ",", "!", "?", ";")

INTENSIFIERS: tuple[str, ...] = ("very", "really", "quite", "truly", "rather", "somewhat", "so")
NOUNS: tuple[str, ...] = (
    "movie", "film", "show", "story", "plot", "acting", "cast", "ending", "script", "soundtrack",
    "dialogue", "direction", "pacing", "camera", "performance", "screenplay",
)  # fmt: skip
COPULAS: tuple[str, ...] = ("was", "is", "felt", "seemed")
DETERMINERS: tuple[str, ...] = ("the", "this")
OPENERS: tuple[str, ...] = ("honestly", "overall", "frankly")
SPEAKERS: tuple[str, ...] = ("honestly i", "frankly i", "overall i", "my friend and i", "my family and i")
FILLERS: tuple[str, ...] = (
    "i saw it last week",
    "we watched it at home",
    "it runs about two hours",
    "it is based on a book",
    "my friend picked it",
    "the theater was full",
    "i went in with no expectations",
    "it came out last year",
)


def vocabulary() -> list[str]:
    """Every word and punctuation mark the grammar can produce, sorted (special tokens excluded)."""
    words: set[str] = set(LEXICON) | set(NEGATORS) | set(PUNCTUATION) | set(INTENSIFIERS)
    words |= set(NOUNS) | set(COPULAS) | set(DETERMINERS) | set(OPENERS)
    words |= {"and", "but", "it", "made", "me"}
    for phrase in SPEAKERS + FILLERS:
        words.update(phrase.split())
    return sorted(words)
