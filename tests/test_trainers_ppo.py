"""PPOTrainer (PPO with a critic, GRPO, RLOO, REINFORCE) on tiny models built from configs."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from rlhf_fast.demo import build_tokenizer, make_prompts, make_sft_dataset, tiny_model, tiny_reward_model, true_rewards
from rlhf_fast.trainers import PPOConfig, PPOTrainer
from rlhf_fast.trainers.reward import sequence_rewards
from rlhf_fast.trainers.rollout import collate_prompts, right_pad

TOKENIZER = build_tokenizer()
SMALL = dict(hidden_size=32, layers=2, heads=4, max_positions=64)
PROMPTS = make_prompts(32, 0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Models this small run op by op; on a shared 2-core machine a second intra-op thread makes every
    # tiny matmul wait for the other core (about 10x slower here), so this file runs on one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _policy(kind="llama", seed=0):
    return tiny_model(kind, vocab_size=len(TOKENIZER), seed=seed, **SMALL)


def _config(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=2, prompts_per_iteration=8, num_generations=2,
                micro_batch_size=4, grad_accum_steps=2, max_new_tokens=10, max_length=40, lr=1e-2, ppo_epochs=2,
                progress_bar=False, seed=0)  # fmt: skip
    return PPOConfig(**{**base, **kw})


def _records(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_iterations_give_finite_metrics_move_the_policy_and_not_the_reference(tmp_path, estimator):
    cfg = _config(tmp_path, advantage_estimator=estimator, max_steps=3, eval_every=3)
    trainer = PPOTrainer(_policy(), TOKENIZER, PROMPTS, reward_fn=true_rewards, true_reward_fn=true_rewards,
                         eval_prompts=make_prompts(6, 1), config=cfg)  # fmt: skip
    policy, ref = _state(trainer.model), _state(trainer.ref_model)
    critic = None if trainer.critic is None else _state(trainer.critic)
    trainer.train()
    records = _records(tmp_path / "run")
    train = [r for r in records if "score" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in records:
        assert all(math.isfinite(v) for v in r.values()), r
    expected = {"loss", "pg_loss", "clip_frac", "approx_kl", "score", "true_reward", "kl", "kl_coef", "entropy",
                "response_length", "grad_norm", "lr", "tokens_per_s"}  # fmt: skip
    if estimator == "gae":
        expected |= {"value_loss", "value_clip_frac", "explained_variance"}
        assert _changed(critic, trainer.critic)
    else:
        assert trainer.critic is None and "value_loss" not in train[0]
    assert expected <= set(train[0])
    assert train[0]["score"] == pytest.approx(train[0]["true_reward"])  # the reward_fn is the true reward
    assert 1 <= train[0]["response_length"] <= cfg.max_new_tokens
    # the first iteration's rollout policy is the reference; later updates move away from it
    assert train[0]["kl"] == 0.0 and any(r["approx_kl"] > 0 for r in train)
    assert _changed(policy, trainer.model)
    assert not _changed(ref, trainer.ref_model)
    assert {"eval_score", "eval_true_reward", "eval_kl"} <= set(records[-1])


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_runs_the_fused_head_in_bf16(tmp_path, fused):
    """Under bf16 autocast (here the CPU's) the fused head computes in bf16 like the model's own lm_head: with
    a policy that does not move (lr ~ 0) the update's log-probs are the rollout's (ratio 1, approx_kl ~ 0:
    a head in another precision than the rollout's would show here), and the metrics are finite."""
    cfg = _config(tmp_path, advantage_estimator="grpo", bf16=True, fused=fused, max_steps=1, lr=1e-12)
    trainer = PPOTrainer(_policy(), TOKENIZER, PROMPTS, reward_fn=true_rewards, config=cfg)
    trainer.train()
    (record,) = _records(tmp_path / "run")
    assert all(math.isfinite(v) for v in record.values()), record
    # the same bf16 head in both: 0 here; a float32 rollout head against the bf16 update's gave 5e-8
    assert record["approx_kl"] < 1e-9 and record["clip_frac"] == 0.0, record


def test_a_reward_model_scores_and_initialises_the_critic(tmp_path):
    rm = tiny_reward_model(vocab_size=len(TOKENIZER), seed=3, **SMALL)
    rm_before = _state(rm)
    trainer = PPOTrainer(_policy(), TOKENIZER, PROMPTS, reward_model=rm, config=_config(tmp_path))
    assert _state(trainer.critic).keys() == rm_before.keys() and not _changed(rm_before, trainer.critic)
    ro = trainer.rollout(collate_prompts(trainer.loop.train_batches.examples[:4], trainer.pad_id), 2)
    torch.testing.assert_close(ro.score, sequence_rewards(rm, ro.input_ids, ro.attention_mask))
    trainer.train()
    assert not _changed(rm_before, rm)
    assert _changed(rm_before, trainer.critic)
    assert all(math.isfinite(v) for r in _records(tmp_path / "run") for v in r.values())


def test_rollout_log_probs_are_those_of_each_sequence_on_its_own(tmp_path):
    trainer = PPOTrainer(_policy("gpt2"), TOKENIZER, PROMPTS, reward_fn=true_rewards,
                         config=_config(tmp_path, temperature=0.7))  # fmt: skip
    prompts = collate_prompts(trainer.loop.train_batches.examples[:6], trainer.pad_id)
    assert prompts["attention_mask"].min() == 0  # prompts of several lengths: left padding in play
    # a setting of the model's own generation config must not bend the sampling distribution
    own = trainer.model.generation_config
    own.suppress_tokens = list(range(4, len(TOKENIZER)))
    ro = trainer.rollout(prompts, 1)
    assert trainer.model.generation_config is own
    assert int(ro.labels[ro.mask].max()) >= 4
    for i in range(len(ro.input_ids)):
        n = int(ro.attention_mask[i].sum())
        ids = ro.input_ids[i, :n]
        labels = ro.labels[i][ro.mask[i]]
        p = n - len(labels)  # the prompt's length
        with torch.no_grad():
            logits = trainer.model(ids[None]).logits[0, p - 1 : n - 1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
        torch.testing.assert_close(ro.logprobs[i][ro.mask[i]], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(ids[p:], labels)
    assert float(ro.logprobs[~ro.mask].abs().sum()) == 0.0
    assert ro.texts[0].startswith(TOKENIZER.decode(prompts["input_ids"][0], skip_special_tokens=True))


def test_right_pad_cuts_each_response_after_its_first_eos():
    eos, pad = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id
    # prompts [7, 8] and [9] (left-padded), responses [5, eos, pad] and [6, 6, 6] (no EOS)
    prompts = {"input_ids": torch.tensor([[7, 8], [pad, 9]]), "attention_mask": torch.tensor([[1, 1], [0, 1]])}
    sequences = torch.tensor([[7, 8, 5, eos, pad], [pad, 9, 6, 6, 6]])
    input_ids, mask, index, labels, has_eos = right_pad(prompts, sequences, eos, pad)
    assert input_ids.tolist() == [[7, 8, 5, eos], [9, 6, 6, 6]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert labels.tolist() == [[5, eos, -100], [6, 6, 6]]
    assert index.tolist() == [[1, 2, 3], [0, 1, 2]]  # the position whose hidden state predicts each token
    assert has_eos.tolist() == [True, False]


@pytest.mark.parametrize("options", [{"advantage_estimator": "gae"}, {"advantage_estimator": "grpo",
                                     "kl_penalty": "loss", "loss_agg": "seq-mean-token-mean"}])  # fmt: skip
def test_fused_and_logits_paths_give_the_same_losses(tmp_path, options):
    records = {}
    for fused in (True, False):
        cfg = _config(tmp_path, f"fused{fused}", fused=fused, chunk_bytes=4096, ptx_coef=0.5, **options)
        trainer = PPOTrainer(_policy(), TOKENIZER, PROMPTS, reward_fn=true_rewards, ptx_data=make_sft_dataset(16, 2),
                             config=cfg)  # fmt: skip
        trainer.train()
        records[fused] = _records(tmp_path / f"fused{fused}")
    for a, b in zip(records[True], records[False], strict=True):
        for key in ("loss", "pg_loss", "value_loss", "ptx_loss", "approx_kl", "kl_ref", "kl", "score"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "options",
    [
        {"advantage_estimator": "gae", "adaptive_kl": True, "kl_target": 0.01, "ptx_coef": 0.2},
        {"advantage_estimator": "reinforce", "kl_penalty": "loss"},
    ],
)
def test_resume_reproduces_the_next_iteration(tmp_path, options):
    ptx = make_sft_dataset(16, 3)
    full = _config(tmp_path, "full", max_steps=3, save_every=1, **options)
    PPOTrainer(_policy(), TOKENIZER, PROMPTS, reward_fn=true_rewards, ptx_data=ptx, config=full).train()
    expected = _records(tmp_path / "full")
    resumed_cfg = _config(tmp_path, "resumed", max_steps=3, **options)
    resumed = PPOTrainer(_policy(), TOKENIZER, PROMPTS, reward_fn=true_rewards, ptx_data=ptx, config=resumed_cfg)
    resumed.train(resume_from=tmp_path / "full" / "checkpoints" / "step-00000002")
    got = _records(tmp_path / "resumed")
    assert [r["step"] for r in got] == [3]
    volatile = {"tokens_per_s", "rollout_s", "update_s"}
    assert {k: v for k, v in got[0].items() if k not in volatile} == {
        k: v for k, v in expected[2].items() if k not in volatile
    }
    if options.get("adaptive_kl"):
        assert expected[2]["kl_coef"] != expected[0]["kl_coef"]  # beta moved, and was restored


@pytest.mark.parametrize(
    "options",
    [
        {"advantage_estimator": "rloo", "scale_by_std": False, "dual_clip": 3.0, "clip_eps_high": 0.28},
        {"whiten_rewards": True, "entropy_coef": 0.01, "missing_eos_penalty": 1.0, "loss_agg": "seq-mean-token-sum",
         "top_p": 0.9, "generation_batch_size": 6, "temperature": 0.8},
        {"prompts_per_iteration": 4, "num_generations": 4, "advantage_estimator": "grpo", "kl_estimator": "k2",
         "kl_penalty": "loss", "max_prompt_length": 3},
    ],
)  # fmt: skip
def test_options_train(tmp_path, options):
    trainer = PPOTrainer(_policy("qwen2"), TOKENIZER, PROMPTS, reward_fn=true_rewards, true_reward_fn=true_rewards,
                         config=_config(tmp_path, max_steps=1, **options))  # fmt: skip
    last = trainer.train()
    assert all(math.isfinite(v) for v in last.values())
    # a response cut off before EOS loses missing_eos_penalty from its score
    penalty = options.get("missing_eos_penalty", 0.0) * (1.0 - last["eos_frac"])
    assert last["score"] == pytest.approx(last["true_reward"] - penalty, abs=1e-6)


def test_prompts_as_messages(tmp_path):
    rows = [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS[:8]]
    trainer = PPOTrainer(_policy(), TOKENIZER, rows, reward_fn=true_rewards, config=_config(tmp_path, max_steps=1))
    first = trainer.loop.train_batches.examples[0]["input_ids"]
    assert first[-1] == TOKENIZER.convert_tokens_to_ids("<assistant>")  # the template's generation prompt
    assert math.isfinite(trainer.train()["score"])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"advantage_estimator": "grpo", "num_generations": 1}, "num_generations"),
        ({"prompts_per_iteration": 3}, "multiple of the mini-batch"),
        ({"kl_penalty": "both"}, "kl_penalty"),
        ({"max_new_tokens": 40}, "max_length"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_config_names_the_field(tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **values)


def test_bad_arguments_fail_before_training(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(ValueError, match="exactly one of reward_model and reward_fn"):
        PPOTrainer(_policy(), TOKENIZER, PROMPTS, config=cfg)
    with pytest.raises(ValueError, match="ptx_data"):
        PPOTrainer(_policy(), TOKENIZER, PROMPTS, reward_fn=true_rewards, config=_config(tmp_path, ptx_coef=0.1))
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        PPOTrainer(_policy(), TOKENIZER, ["a review", {"text": "x"}], reward_fn=true_rewards, config=cfg)
    trainer = PPOTrainer(_policy(), TOKENIZER, PROMPTS, reward_fn=lambda texts: [0.0], config=cfg)
    with pytest.raises(ValueError, match="reward_fn returned 1 values"):
        trainer.train()
