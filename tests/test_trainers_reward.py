"""RewardTrainer on tiny models built from configs (random weights, offline tokenizer)."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _trainers import ACCUMULATION_STEP, assert_accumulation_matches, metrics, params, train_losses

import rlhf_fast as rf
from rlhf_fast.demo import build_tokenizer, make_preference_pairs, make_rankings, tiny_model, tiny_reward_model
from rlhf_fast.demo import true_reward as demo_true_reward
from rlhf_fast.trainers import RewardConfig, RewardTrainer, ValueHeadModel, latest_checkpoint
from rlhf_fast.trainers.reward import RewardLoss, collate_preferences, preference_examples, sequence_rewards

TOKENIZER = build_tokenizer()
PAD = TOKENIZER.pad_token_id
SMALL = dict(hidden_size=32, layers=1, heads=4, max_positions=64)


def _reward_model(kind="llama", seed=0):
    return tiny_reward_model(kind, vocab_size=len(TOKENIZER), seed=seed, **SMALL)


def _lm(kind="gpt2", seed=0):
    return tiny_model(kind, vocab_size=len(TOKENIZER), seed=seed, **SMALL)


def _config(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), lr=5e-3, micro_batch_size=4, max_length=48, progress_bar=False,
                max_steps=3, seed=0)  # fmt: skip
    return RewardConfig(**{**base, **kw})


def _clear_pairs(n, seed, gap=0.8):
    """Pairs whose true rewards differ by more than ``gap``, labelled by an almost noiseless rater."""
    rows = make_preference_pairs(n, seed, beta_bt=50.0)
    gaps = [demo_true_reward(r["prompt"] + r["chosen"]) - demo_true_reward(r["prompt"] + r["rejected"]) for r in rows]
    return [r for r, g in zip(rows, gaps, strict=True) if g > gap]


def _batch(rows, max_length=48):
    return collate_preferences(preference_examples(rows, TOKENIZER, max_length=max_length, name="d"), PAD)


def test_loss_goes_down_and_heldout_accuracy_rises(tmp_path):
    train, held_out = _clear_pairs(2000, 0), _clear_pairs(256, 1)
    cfg = _config(tmp_path, micro_batch_size=16, max_steps=48, warmup_steps=3, eval_every=24, eval_batch_size=64)
    trainer = RewardTrainer(_reward_model(), TOKENIZER, train, held_out, cfg)
    before = trainer.evaluate()
    last = trainer.train()
    records = metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 49))
    for r in records:
        assert all(math.isfinite(v) for v in r.values()), r
    keys = {"loss", "pairs", "accuracy", "reward_mean", "reward_std", "reward_margin", "grad_norm", "lr"}
    assert keys <= set(steps[0])
    assert steps[0]["pairs"] == 16
    assert sum(r["loss"] for r in steps[-8:]) / 8 < 0.7 * sum(r["loss"] for r in steps[:8]) / 8
    assert [r["step"] for r in records if "eval_loss" in r] == [24, 48]
    assert last["eval_loss"] < before["eval_loss"]
    assert last["eval_accuracy"] >= 0.75 and last["eval_accuracy"] > before["eval_accuracy"] + 0.2
    assert last["eval_reward_margin"] > 0.0


def test_rewards_are_read_at_the_last_token_whatever_the_padding():
    rows = make_preference_pairs(6, 2)
    examples = preference_examples(rows, TOKENIZER, max_length=48, name="d")
    sequences = [s for ex in examples for s in ex["responses"]]
    assert len({len(s) for s in sequences}) > 1
    for model in (_reward_model().eval(), ValueHeadModel(_lm("llama")).eval()):
        with torch.no_grad():
            alone = torch.cat([sequence_rewards(model, torch.tensor([s])) for s in sequences])
            batch = collate_preferences(examples, PAD)
            ids, mask = batch["input_ids"].flatten(0, 1), batch["attention_mask"].flatten(0, 1)  # [2B, T]
            padded = sequence_rewards(model, ids, mask)
            # ten more padding columns, with a padding id that is a real word
            more_ids = torch.nn.functional.pad(ids, (0, 10), value=TOKENIZER.convert_tokens_to_ids("great"))
            more = sequence_rewards(model, more_ids, torch.nn.functional.pad(mask, (0, 10)))
            unfused = sequence_rewards(model, ids, mask, fused=False)
        assert alone.dtype == torch.float32 and alone.shape == (len(sequences),)
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(more, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unfused, alone, rtol=1e-5, atol=1e-5)
    # transformers' own sequence classifier reads the same token (it finds it by the pad id)
    model = _reward_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   sequence_rewards(model, ids, mask), rtol=1e-5, atol=1e-5)  # fmt: skip


def test_pair_loss_with_margins_and_centering():
    rows = make_preference_pairs(5, 3)
    for i, r in enumerate(rows):
        r["margin"] = 0.25 * i
    batch = _batch(rows)
    assert batch["input_ids"].shape[:2] == (5, 2)
    model = _reward_model().eval()
    coef = 0.3
    objective = RewardLoss(RewardConfig(output_dir="unused", center_rewards_coef=coef))
    assert objective.count(batch) == 5
    with torch.no_grad():
        loss, stats = objective.loss(model, batch)
        chosen = sequence_rewards(model, batch["input_ids"][:, 0], batch["attention_mask"][:, 0])
        rejected = sequence_rewards(model, batch["input_ids"][:, 1], batch["attention_mask"][:, 1])
    margin = torch.tensor([0.25 * i for i in range(5)])
    # summed over the pairs: Bradley-Terry with the margin, plus coef * (r_c + r_r)^2 per pair
    expected = 5 * rf.reward_loss(chosen, rejected, margin=margin) + coef * ((chosen + rejected) ** 2).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert int(stats["accuracy"]) == int((chosen > rejected).sum())
    torch.testing.assert_close(stats["reward_margin"], (chosen - rejected).sum())
    torch.testing.assert_close(stats["reward_mean"], (chosen + rejected).sum() / 2)


def test_k_way_rankings_train_in_one_forward(tmp_path, monkeypatch):
    rows, held_out = make_rankings(24, 4, 4, beta_bt=5.0), make_rankings(8, 3, 5, beta_bt=5.0)
    batch = _batch(rows[:3])
    assert batch["input_ids"].shape[:2] == (3, 4) and "margin" not in batch
    objective = RewardLoss(RewardConfig(output_dir="unused"))
    assert objective.count(batch) == 3 * 6
    model = _reward_model().eval()
    with torch.no_grad():
        loss, _ = objective.loss(model, batch)
        rewards = sequence_rewards(model, batch["input_ids"].flatten(0, 1), batch["attention_mask"].flatten(0, 1))
    torch.testing.assert_close(loss, 18 * rf.ranking_loss(rewards.view(3, 4)), rtol=1e-6, atol=1e-6)

    forwards = []
    original = RewardLoss.loss

    def counting(self, model, batch):
        forwards.append(tuple(batch["input_ids"].shape))
        return original(self, model, batch)

    monkeypatch.setattr(RewardLoss, "loss", counting)
    cfg = _config(tmp_path, max_steps=4, grad_accum_steps=2, micro_batch_size=3)
    last = RewardTrainer(_reward_model(), TOKENIZER, rows, held_out, cfg).train()
    assert [s[:2] for s in forwards[:8]] == [(3, 4)] * 8  # one call per micro-batch, all K responses in it
    steps = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert all(r["pairs"] == 2 * 3 * 6 for r in steps)
    assert all(math.isfinite(v) for v in last.values())
    assert 0.0 <= last["eval_accuracy"] <= 1.0 and last["pairs"] == 36


def test_two_way_rankings_train_as_pairs(tmp_path):
    pairs = make_preference_pairs(16, 6)
    rankings = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]} for r in pairs]
    results = {}
    for name, rows in (("pairs", pairs), ("rankings", rankings)):
        results[name] = RewardTrainer(_reward_model(), TOKENIZER, rows, rows[:8], _config(tmp_path, name)).train()
    assert train_losses(tmp_path / "pairs") == pytest.approx(train_losses(tmp_path / "rankings"), rel=1e-6)
    for key in ("eval_loss", "eval_accuracy", "eval_reward_margin"):
        assert results["pairs"][key] == pytest.approx(results["rankings"][key], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize(("kind", "build"), [("llama", _reward_model), ("qwen2", _reward_model), ("gpt2", _lm)])
def test_fused_and_unfused_heads_give_the_same_losses(tmp_path, kind, build):
    rows = make_preference_pairs(12, 7)
    losses = {}
    for fused in (True, False):
        RewardTrainer(build(kind), TOKENIZER, rows, config=_config(tmp_path, f"fused{fused}", fused=fused)).train()
        losses[fused] = train_losses(tmp_path / f"fused{fused}")
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_a_causal_lm_gets_a_value_head_saved_with_the_checkpoint(tmp_path):
    from safetensors import safe_open

    trainer = RewardTrainer(_lm("gpt2"), TOKENIZER, make_preference_pairs(8, 8), config=_config(tmp_path, max_steps=2))
    assert isinstance(trainer.model, ValueHeadModel)
    head_before = trainer.model.value_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(head_before, trainer.model.value_head.weight)
    ckpt = latest_checkpoint(tmp_path / "run")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert {"value_head.weight", "value_head.bias"} <= set(f.keys())
    restored = ValueHeadModel.from_checkpoint(ckpt).eval()
    batch = _batch(make_preference_pairs(4, 9))
    ids, mask = batch["input_ids"].flatten(0, 1), batch["attention_mask"].flatten(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(restored(ids, mask), trainer.model.eval()(ids, mask), rtol=0, atol=0)


def test_resume_continues_bit_for_bit(tmp_path):
    # 24 pairs, 4 per micro-batch, 2 micro-batches per step: an epoch is 3 steps, the checkpoint at
    # step 4 sits mid-epoch and the run crosses a reshuffle
    rows = make_preference_pairs(24, 10)
    cfg = dict(max_steps=8, grad_accum_steps=2, save_every=4, warmup_steps=2)
    full = RewardTrainer(_reward_model(), TOKENIZER, rows, config=_config(tmp_path, "full", **cfg))
    full.train()
    expected = train_losses(tmp_path / "full")
    resumed = RewardTrainer(_reward_model(seed=3), TOKENIZER, rows, config=_config(tmp_path, "r", **cfg))
    resumed.train(resume_from=tmp_path / "full" / "checkpoints" / "step-00000004")
    got = train_losses(tmp_path / "r")
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert loss == expected[step]  # exact
    for (k, a), b in zip(params(full.model).items(), params(resumed.model).values(), strict=True):
        assert torch.equal(a, b), k


def test_grad_accumulation_normalizes_by_all_pairs_of_the_step(tmp_path):
    # 8 pairs of different lengths in one update, as 1 x 8 and as 4 x 2; adam_eps = 1 makes the first
    # AdamW update a smooth function of the gradient (see the SFT test), so equal updates mean equal gradients
    rows = make_preference_pairs(8, 11)
    for i, r in enumerate(rows):
        r["margin"] = 0.1 * i
    start = params(_reward_model())
    assert_accumulation_matches(
        lambda mbs, accum: RewardTrainer(
            _reward_model(), TOKENIZER, rows,
            config=_config(
                tmp_path, f"{mbs}x{accum}", micro_batch_size=mbs, grad_accum_steps=accum, **ACCUMULATION_STEP,
                center_rewards_coef=0.1,
            ),
        ),
        start,
    )  # fmt: skip


# -- bad input fails before any training, with the name of what is wrong --------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [({"center_rewards_coef": -0.1}, "center_rewards_coef"), ({"center_rewards_coef": "x"}, "center_rewards_coef"),
     ({"lr": 0.0}, "lr"), ({"centre_rewards_coef": 0.1}, "centre")],
)  # fmt: skip
def test_bad_config_names_the_field(values, field):
    with pytest.raises((ValueError, TypeError), match=field):
        RewardConfig.from_dict(values)


def _bad_rows():
    pairs = make_preference_pairs(4, 12)
    rankings = make_rankings(4, 3, 12)
    yield [*pairs[:2], {"prompt": "p", "chosen": "a"}], r"train_data\[2\] is missing column 'rejected'"
    yield [rankings[0], {"responses": ["a", "b", "c"]}], r"train_data\[1\] is missing column 'prompt'"
    yield [pairs[0], rankings[1]], r"train_data\[1\] has a 'responses' column, but train_data\[0\] is a pairwise"
    yield [rankings[0], pairs[1]], r"train_data\[1\] has a 'chosen' column, but train_data\[0\] is a ranking"
    yield [rankings[0], {"prompt": "p", "responses": ["a", "b"]}], r"train_data\[1\]\['responses'\] holds 2"
    yield [{"prompt": "p", "responses": ["a"]}], r"train_data\[0\]\['responses'\] must be a list of at least 2"
    yield [{**pairs[0], "margin": 1.0}, pairs[1]], r"train_data\[1\] lacks a 'margin' column"
    yield [pairs[0], {**pairs[1], "margin": 1.0}], r"train_data\[1\] has a 'margin' column"
    yield [{**pairs[0], "margin": "big"}], r"train_data\[0\]\['margin'\] must be a finite number"
    yield [{**pairs[0], "chosen": 3}], r"train_data\[0\]\['chosen'\] must be a string"
    yield [{**rankings[0], "responses": ["a", None, "c"]}], r"train_data\[0\]\['responses'\]\[1\] must be a string"
    yield [{"text": "great"}], r"train_data\[0\] has columns \['text'\]; a reward model needs"


@pytest.mark.parametrize(("rows", "message"), list(_bad_rows()))
def test_bad_rows_are_named_before_training(tmp_path, rows, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RewardTrainer(_reward_model(), TOKENIZER, rows, config=_config(tmp_path))
    assert not (tmp_path / "run").exists()


def test_eval_data_is_checked_too_and_models_without_a_scalar_head_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"eval_data\[0\] is missing column 'chosen'"):
        RewardTrainer(_reward_model(), TOKENIZER, make_preference_pairs(4, 0), [{"prompt": "p", "rejected": "r"}],
                      config=_config(tmp_path))  # fmt: skip
    model = _reward_model()
    model.score = torch.nn.Linear(SMALL["hidden_size"], 2, bias=False)
    with pytest.raises(ValueError, match=r"model's 'score' head has 2 outputs"):
        RewardTrainer(model, TOKENIZER, make_preference_pairs(4, 0), config=_config(tmp_path))
    with pytest.raises(TypeError, match="model must be"):
        RewardTrainer(torch.nn.Linear(2, 2), TOKENIZER, make_preference_pairs(4, 0), config=_config(tmp_path))
    assert not (tmp_path / "run").exists()
