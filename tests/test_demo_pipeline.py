"""``rlhf-fast demo --quick``: every stage runs and reports finite numbers; the files are written. The frontier's
checkpoint reader."""

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("matplotlib")

import torch

from rlhf_fast.cli import main
from rlhf_fast.demo import build_tokenizer, make_prompts, tiny_model, true_rewards
from rlhf_fast.demo.frontier import load_policy, run_checkpoints
from rlhf_fast.demo.pipeline import QUICK, run_pipeline
from rlhf_fast.trainers import PPOTrainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ["startup", "sft", "pairs", "rm", "dpo", "ppo", "grpo", "eval", "frontier"]
POLICIES = ["SFT", "PPO", "GRPO", "DPO"]
RUNS = ["sft", "rm", "dpo", "ppo", "grpo"]


def test_quick_demo_reports_every_field_and_writes_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 3 and results["settings"]["n_sft"] == QUICK.n_sft
    assert list(results["policies"]) == POLICIES
    for name, policy in results["policies"].items():
        assert set(policy) == {"true_reward", "true_reward_se", "kl_to_sft", "kl_to_sft_se", "completion_tokens"}
        assert all(math.isfinite(v) for v in policy.values()), (name, policy)
        assert -1.0 < policy["true_reward"] < 1.0
        assert f"| {name} | {policy['true_reward']:+.3f}" in printed
    assert results["policies"]["SFT"]["kl_to_sft"] == 0.0
    for name in POLICIES[1:]:  # training moved the policy
        assert results["policies"][name]["kl_to_sft"] != 0.0, name
    for key in ("accuracy", "true_order_accuracy"):
        assert 0.0 <= results["reward_model"][key] <= 1.0
    assert [s["stage"] for s in results["stages"]] == STAGES
    for stage in results["stages"]:
        assert stage["seconds"] > 0.0 and (stage["peak_mib"] is None or math.isfinite(stage["peak_mib"]))
    assert (out / "results.md").read_text().strip() in printed

    for name in ("sft_train", "sft_eval", "pairs_train", "pairs_eval"):
        assert (out / "data" / f"{name}.jsonl").stat().st_size > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(POLICIES) * QUICK.n_eval_prompts * QUICK.samples_per_prompt
    for run in RUNS:
        assert (out / run / "config.yaml").is_file() and (out / run / "metrics.jsonl").is_file()
        assert (out / run / "plots" / "loss.png").read_bytes()[:8] == PNG_MAGIC
        assert any((out / run / "checkpoints").iterdir())
    for run in ("ppo", "grpo"):  # trained on the reward model's score, the true reward logged beside it
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, QUICK.ppo["max_steps"] + 1))
        assert all({"score", "true_reward", "kl"} <= set(r) and all(map(math.isfinite, r.values())) for r in rows)
        assert ("value_loss" in rows[0]) == (run == "ppo")
    # the frontier: every checkpoint of each trained policy, at its step
    frontier = results["frontier"]
    assert frontier["prompts"] == QUICK.n_frontier_prompts
    for name, settings in (("PPO", QUICK.ppo), ("GRPO", QUICK.grpo), ("DPO", QUICK.dpo)):
        steps = list(range(settings["save_every"], settings["max_steps"] + 1, settings["save_every"]))
        assert [p["step"] for p in frontier["runs"][name]] == steps, name
        assert all(math.isfinite(p["kl_to_sft"]) and -1 < p["true_reward"] < 1 for p in frontier["runs"][name])
    assert frontier["sft"]["kl_to_sft"] == 0.0
    for name in ("reward_hist", "frontier"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    # a run's config.yaml is one the CLI takes: resuming the finished PPO run trains no further
    assert main(["ppo", "--resume", str(out / "ppo")]) == 0
    assert len((out / "ppo" / "metrics.jsonl").read_text().splitlines()) == QUICK.ppo["max_steps"]


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        run_pipeline(tmp_path, seed=-1, quick=True)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        run_pipeline(tmp_path, quick=True, threads=0)
    assert not any(tmp_path.iterdir())


def test_load_policy_reads_the_policy_of_a_ppo_checkpoint(tmp_path):
    tokenizer = build_tokenizer()
    small = dict(vocab_size=len(tokenizer), hidden_size=16, layers=1, heads=2)
    config = dict(output_dir=str(tmp_path / "ppo"), max_steps=1, prompts_per_iteration=2, num_generations=2,
                  micro_batch_size=4, max_new_tokens=4, max_length=16, lr=1e-2, progress_bar=False)  # fmt: skip
    trainer = PPOTrainer(tiny_model(**small), tokenizer, make_prompts(4, 0), reward_fn=true_rewards, config=config)
    trainer.train()  # the critic is a ValueHeadModel on a copy of the policy: its keys must not leak in
    (tmp_path / "ppo" / "checkpoints" / "step-00000002.tmp").mkdir()  # a half-written checkpoint is skipped
    [(step, path)] = run_checkpoints(tmp_path / "ppo")
    assert step == 1
    fresh = tiny_model(**small, seed=1)
    loaded = load_policy(path, fresh)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not torch.equal(fresh.state_dict()["lm_head.weight"], loaded.state_dict()["lm_head.weight"])
    with pytest.raises(ValueError, match="does not hold this policy"):
        load_policy(path, tiny_model("gpt2", **small))


def test_reward_model_accuracy_feeds_the_model_on_its_own_device(monkeypatch):
    """The reward model's trainer leaves it on the GPU when there is one; the demo's accuracy check must build
    its batches there (here the model sits on the meta device in its place)."""
    from rlhf_fast.demo import make_preference_pairs, pipeline, tiny_reward_model
    from rlhf_fast.trainers import reward

    tokenizer = build_tokenizer()
    rm = tiny_reward_model(vocab_size=len(tokenizer)).to("meta")
    seen = []

    def rewards(model, ids, mask):
        seen.append((ids.device, mask.device))
        return torch.zeros(ids.shape[0])

    monkeypatch.setattr(reward, "sequence_rewards", rewards)
    pipeline._rm_true_order_accuracy(rm, tokenizer, make_preference_pairs(3, 0))
    assert seen and all(devices == (torch.device("meta"),) * 2 for devices in seen)
