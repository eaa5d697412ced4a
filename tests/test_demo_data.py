"""The demo's synthetic sentiment task: grammar data, true reward, preference labels, offline tokenizer, tiny models."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rlhf_fast.demo import sentiment as S
from rlhf_fast.demo.io import read_jsonl, write_jsonl
from rlhf_fast.demo.tokenizer import SPECIAL_TOKENS
from rlhf_fast.demo.words import NEGATIVE, POSITIVE, vocabulary

transformers = pytest.importorskip("transformers")

KINDS = ("llama", "gpt2", "qwen2")
DELTA = 1e-6  # failure probability allowed to each statistical check


def hoeffding(m: int, delta: float = DELTA) -> float:
    """t with P(|mean of m independent [0, 1] variables - its expectation| >= t) <= delta:
    Hoeffding gives 2 exp(-2 m t^2) = delta."""
    return math.sqrt(math.log(2 / delta) / (2 * m))


def rewards_of(row, *keys):
    return [S.true_reward(row["prompt"] + row[k]) for k in keys]


@pytest.fixture(scope="module")
def tok():
    return S.build_tokenizer()


# ---------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: S.make_prompts(50, seed),
        lambda seed: S.make_reviews(50, seed),
        lambda seed: S.make_sft_dataset(50, seed),
        lambda seed: S.make_preference_pairs(50, seed, beta_bt=2.0),
        lambda seed: S.make_rankings(20, 4, seed),
    ],
    ids=["prompts", "reviews", "sft", "pairs", "rankings"],
)
def test_same_seed_same_data(make):
    assert make(3) == make(3)
    assert make(3) != make(4)


def test_same_data_in_another_process():
    # Seeds are strings hashed by random.Random, not by hash(): PYTHONHASHSEED must not matter. The
    # child skips rlhf_fast/__init__ (torch) by registering a bare package: the data code needs no torch.
    code = (
        "import json, sys, types; pkg = types.ModuleType('rlhf_fast'); pkg.__path__ = [sys.argv[1]]; "
        "sys.modules['rlhf_fast'] = pkg; from rlhf_fast.demo import sentiment as S; "
        "assert 'torch' not in sys.modules; print(json.dumps(S.make_preference_pairs(30, 7)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    package_dir = os.path.dirname(os.path.dirname(S.__file__))
    out = subprocess.run([sys.executable, "-c", code, package_dir], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == S.make_preference_pairs(30, 7)


def test_prompts_and_reviews_follow_the_grammar():
    rows = S.make_sft_dataset(500, 0)
    assert [r["prompt"] for r in rows] == S.make_prompts(500, 0)
    words = set(vocabulary())
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        assert 2 <= len(row["prompt"].split()) <= 4
        assert row["completion"].startswith(" ") and not row["completion"].startswith("  ")
        tokens = S._WORD_RE.findall(row["prompt"] + row["completion"])
        assert set(tokens) <= words
        assert S.MIN_WORDS <= sum(t.isalpha() for t in tokens) <= S.MAX_WORDS
    assert S.make_reviews(20, 0) == [r["prompt"] + r["completion"] for r in rows[:20]]


def test_sft_data_has_mixed_sentiment():
    rewards = S.true_rewards(S.make_reviews(2000, 1))
    # The tone is uniform on [0, 1] and the positive word lists mirror the negative ones, so a review
    # and its sentiment-flipped twin are equally likely: E[sign(reward)] = 0. sign(reward) lies in
    # [-1, 1], a range of 2, so Hoeffding's band for its mean is twice the [0, 1] one. Ties (reward 0)
    # need the praise and criticism of a review to cancel exactly, which most reviews avoid.
    positive = sum(r > 0 for r in rewards) / len(rewards)
    negative = sum(r < 0 for r in rewards) / len(rewards)
    assert abs(positive - negative) <= 2 * hoeffding(len(rewards))
    assert positive + negative > 2 / 3


# ---------------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("great", 2),  # "great" +2
        ("not great", -2),  # negated: -2
        ("this movie was GREAT!", 2),  # lower-cased, punctuation ignored
        ("good but dull", 0),  # +1 - 1
        ("not very good", -1),  # "very" is no lexicon word, so "not" reaches "good": -1
        ("not long and dull", -1),  # "not" is used up by the neutral "long" (0); "dull" -1
        ("not good. great", 1),  # the full stop ends the negation: -1 + 2
        ("not, good", 1),  # so does a comma
        ("i never hated it", 2),  # "never" flips "hated" -2 -> +2
        ("never not good", 1),  # two negators cancel: +1
        ("the plot was hardly brilliant but the ending made me smile", -1),  # -2 + 1
        ("great , and <eos>", 2),  # decoded text with spaces and a special token
        ("", 0),
        ("terrible " * 40, -80),  # saturates towards -1
    ],
)
def test_true_reward_hand_cases(text, score):
    # true_reward = tanh(S / REWARD_SCALE), S the signed lexicon sum derived in each comment.
    assert S.true_reward(text) == pytest.approx(math.tanh(score / S.REWARD_SCALE), abs=1e-12)
    assert -1 <= S.true_reward(text) <= 1


def test_true_reward_sign_of_every_word():
    for word in POSITIVE:
        assert S.true_reward(f"it was {word}") > 0 > S.true_reward(f"it was not {word}"), word
    for word in NEGATIVE:
        assert S.true_reward(f"it was {word}") < 0 < S.true_reward(f"it was not {word}"), word


def test_true_rewards_is_elementwise():
    texts = S.make_reviews(30, 2)
    assert S.true_rewards(texts) == [S.true_reward(t) for t in texts]
    with pytest.raises(TypeError, match="texts"):
        S.true_rewards("great")
    with pytest.raises(TypeError, match="text"):
        S.true_reward(3)


# ---------------------------------------------------------------------------------------------- labels


def _agreement(rows, beta_bt):
    """(share of labels that pick the higher true reward, the expected share under Bradley-Terry), ties dropped."""
    observed, expected = [], []
    for row in rows:
        rc, rr = rewards_of(row, "chosen", "rejected")
        if rc != rr:
            observed.append(rc > rr)
            expected.append(S.bradley_terry_probability(max(rc, rr), min(rc, rr), beta_bt))
    return sum(observed) / len(observed), sum(expected) / len(expected), len(observed)


@pytest.mark.parametrize("beta_bt", [0.0, 1.0, 4.0])
def test_bradley_terry_labels(beta_bt):
    rows = S.make_preference_pairs(3000, 11, beta_bt=beta_bt)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    observed, expected, m = _agreement(rows, beta_bt)
    # Given the rewards, each label agrees with the higher reward independently with probability
    # sigmoid(beta * |r_a - r_b|), so the observed share is within Hoeffding's t of the mean of those.
    assert abs(observed - expected) <= hoeffding(m)
    if beta_bt > 0:  # the labeller prefers the better review most of the time
        assert observed > 0.5 + hoeffding(m)


def test_bradley_terry_probability():
    assert S.bradley_terry_probability(0.3, -0.2, 2.0) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert S.bradley_terry_probability(1e6, -1e6) == 1.0  # no overflow
    assert S.bradley_terry_probability(0.5, 0.5, 3.0) == 0.5


def test_preference_pairs_from_a_sampler():
    calls = []

    def sample(prompts):  # first call praises, second call pans; no leading space
        calls.append(list(prompts))
        return ["great and brilliant." if len(calls) == 1 else "awful and boring." for _ in prompts]

    rows = S.make_preference_pairs(40, 5, beta_bt=1e9, sample=sample)
    assert calls == [S.make_prompts(40, 5)] * 2
    assert all(r["chosen"] == " great and brilliant." and r["rejected"] == " awful and boring." for r in rows)
    with pytest.raises(ValueError, match="sample"):
        S.make_preference_pairs(4, 0, sample=lambda prompts: prompts[:-1])


def test_rankings_are_plackett_luce():
    rows = S.make_rankings(1500, 4, 3, beta_bt=3.0)
    assert [r["prompt"] for r in rows] == S.make_prompts(1500, 3)
    hits, expected = 0, 0.0
    for row in rows:
        assert len(set(row["responses"])) == 4
        r = torch.tensor(S.true_rewards([row["prompt"] + c for c in row["responses"]]), dtype=torch.float64)
        top = r == r.max()
        # Plackett-Luce puts item i first with probability softmax(beta * r)_i.
        expected += torch.softmax(3.0 * r, 0)[top].sum().item()
        hits += bool(top[0])
    assert abs(hits / len(rows) - expected / len(rows)) <= hoeffding(len(rows))
    for row in S.make_rankings(100, 5, 4, beta_bt=1e9):  # no noise left: sorted best first
        r = [S.true_reward(row["prompt"] + c) for c in row["responses"]]
        assert r == sorted(r, reverse=True)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: S.make_prompts(-1, 0), "n must be >= 0"),
        (lambda: S.make_sft_dataset(2.5, 0), "n must be an int"),
        (lambda: S.make_preference_pairs(3, 0, beta_bt=-1.0), "beta_bt"),
        (lambda: S.make_preference_pairs(3, 0, beta_bt=float("nan")), "beta_bt"),
        (lambda: S.make_rankings(3, 1, 0), "k must be >= 2"),
        (lambda: S.make_prompts(3, "0"), "seed"),
        (lambda: S.sample_completion("the movie was great", S._rng(0, "x")), "prompt"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_jsonl_round_trip(tmp_path):
    rows = S.make_preference_pairs(10, 0)
    path = write_jsonl(rows, tmp_path / "sub" / "pairs.jsonl")
    assert read_jsonl(path) == rows
    path.write_text('{"prompt": "a"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:3"):
        read_jsonl(path)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        S.PAD_ID, S.BOS_ID, S.EOS_ID, S.UNK_ID
    )  # fmt: skip
    assert tok.padding_side == "right"
    batch = tok(["this movie was great", "the acting"], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"][:, 0].tolist() == [S.BOS_ID] * 2
    assert batch["input_ids"][1, 3:].tolist() == [S.PAD_ID] * 2 and batch["attention_mask"][1, 3:].sum() == 0


def test_tokenizer_round_trip_every_word(tok):
    unk = tok.unk_token_id
    ids = set()
    for word in vocabulary():
        (i,) = tok(word, add_special_tokens=False)["input_ids"]
        assert i != unk and tok.decode([i]) == word, word
        ids.add(i)
    assert len(ids) == len(vocabulary()) and len(tok) == len(ids) + len(SPECIAL_TOKENS)
    for review in S.make_reviews(300, 8):
        enc = tok(review)["input_ids"]
        assert unk not in enc
        assert tok.decode(enc, skip_special_tokens=True) == review
    assert tok("zany film", add_special_tokens=False)["input_ids"][0] == unk


def test_tokenizer_is_deterministic_and_extendable(tok):
    other = S.build_tokenizer()
    assert other.get_vocab() == tok.get_vocab()
    extended = S.build_tokenizer(["A zany, Zany film!"])
    zany = extended.convert_tokens_to_ids("zany")
    assert zany == len(tok)  # new words come after the grammar's, known ones keep their ids
    assert {t: extended.get_vocab()[t] for t in tok.get_vocab()} == tok.get_vocab()
    assert extended("a zany film")["input_ids"][2] == zany


def test_chat_template(tok, tmp_path):
    messages = [
        {"role": "system", "content": "i saw it last week."},
        {"role": "user", "content": "this movie was"},
        {"role": "assistant", "content": "great, and the cast was fun."},
        {"role": "user", "content": "the plot"},
        {"role": "assistant", "content": "was dull!"},
    ]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == S.BOS_ID and ids.count(S.EOS_ID) == len(messages)
    # Each turn decodes back to its content; the assistant mask covers exactly the assistant
    # contents and their <eos>, so the SFT loss can be put on them alone.
    role_ids = {tok.convert_tokens_to_ids(f"<{r}>"): r for r in ("system", "user", "assistant")}
    starts = [i for i, t in enumerate(ids) if t in role_ids]
    assert [role_ids[ids[i]] for i in starts] == [m["role"] for m in messages]
    for start, end, message in zip(starts, [*starts[1:], len(ids)], messages, strict=True):
        assert ids[end - 1] == S.EOS_ID
        assert tok.decode(ids[start + 1 : end - 1]) == message["content"]
        in_loss = int(message["role"] == "assistant")
        assert mask[start:end] == [0] + [in_loss] * (end - start - 1)
    prompt = tok.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert prompt["input_ids"][-1] == tok.convert_tokens_to_ids("<assistant>")
    assert prompt["input_ids"][:-1] == ids[: len(prompt["input_ids"]) - 1]
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "critic", "content": "meh"}], tokenize=False)

    tok.save_pretrained(tmp_path)  # what a run directory holds; loading it needs no hub
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == ids
    assert loaded.padding_side == "right" and loaded.pad_token_id == S.PAD_ID


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_forward_and_fused_logprobs(kind, tok):
    from rlhf_fast import reference
    from rlhf_fast.integrations.transformers import lm_head_logprobs

    model = S.tiny_model(kind, vocab_size=len(tok), seed=1)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
    assert model.generation_config.eos_token_id == S.EOS_ID
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (kind != "llama")
    batch = tok(S.make_reviews(3, 0), padding=True, return_tensors="pt")
    logits = model(**batch).logits  # [B, T, V]
    assert logits.shape == (*batch["input_ids"].shape, len(tok)) and logits.dtype == torch.float32
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logp = lm_head_logprobs(model, batch["input_ids"], batch["attention_mask"], labels)  # [B, T - 1]
    torch.testing.assert_close(logp, reference.token_logprobs(logits[:, :-1], labels[:, 1:]), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logp).all() and (logp[labels[:, 1:] == -100] == 0).all()


def test_tiny_model_seed_and_options():
    a, b = S.tiny_model("llama", vocab_size=50, seed=3), S.tiny_model("llama", vocab_size=50, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    d = S.tiny_model("llama", vocab_size=50, seed=4)
    assert not torch.equal(a.get_input_embeddings().weight, d.get_input_embeddings().weight)
    c = S.tiny_model("llama", vocab_size=50, tie_word_embeddings=True, hidden_size=32, layers=1, heads=2)
    assert c.get_output_embeddings().weight is c.get_input_embeddings().weight
    assert (c.config.hidden_size, c.config.num_hidden_layers, c.config.num_attention_heads) == (32, 1, 2)
    with pytest.raises(ValueError, match="kind"):
        S.tiny_model("bert", vocab_size=50)
    with pytest.raises(ValueError, match="heads"):
        S.tiny_model("gpt2", vocab_size=50, hidden_size=30, heads=4)
    with pytest.raises(ValueError, match="eos_token_id"):
        S.tiny_model("qwen2", vocab_size=50, eos_token_id=50)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_reward_model_reads_the_last_real_token(kind, tok):
    model = S.tiny_reward_model(kind, vocab_size=len(tok), seed=2).eval()
    texts = ["this movie was great and fun.", "the acting"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        rewards = model(**batch).logits  # [B, 1]
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    assert rewards.shape == (2, 1)
    torch.testing.assert_close(rewards[1:], alone, rtol=1e-5, atol=1e-6)  # right padding does not change it
