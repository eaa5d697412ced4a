"""The TRL comparison (benchmarks/trainers_vs_trl.py) on the demo model for two steps, in this process."""

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

from benchmarks import trainers_vs_trl as bench

TINY = {"batch_size": 4, "steps": 2, "n_eval": 8}


@pytest.mark.parametrize("trainer", ["dpo", "rm"])
def test_both_trainers_start_from_the_same_loss_on_the_same_tokens(trainer):
    runs = {
        provider: bench.run_case(
            {"trainer": trainer, "model": "demo", "provider": provider, "seed": 0, "overrides": TINY}
        )
        for provider in ("rlhf_fast", "trl")
    }
    for provider, run in runs.items():
        assert run["status"] == "ok", (provider, run.get("detail"))
        assert run["steps_done"] == TINY["steps"], provider
        assert run["step_ms"] > 0 and run["peak_step_MiB"] >= 0, provider
        assert math.isfinite(run["loss_last"]) and 0.0 <= run["eval_accuracy"] <= 1.0, provider
    assert runs["trl"]["token_mismatches"] == 0
    # same weights, same first batch (no shuffling), same loss: the setups match
    assert runs["rlhf_fast"]["loss_first"] == pytest.approx(runs["trl"]["loss_first"], rel=1e-5)
    if trainer == "dpo":  # and the reference log-probs both precomputed
        assert runs["rlhf_fast"]["ref_chosen_logp_mean"] == pytest.approx(runs["trl"]["ref_chosen_logp_mean"], rel=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        bench.parse_args(["--providers", "rlhf_fast,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "1"])


def test_grpo_runs_in_both_trainers():
    from benchmarks import grpo_vs_trl as grpo

    tiny = {"prompts": 2, "k": 4, "max_new_tokens": 8, "iterations": 2, "n_eval": 4}
    runs = {p: grpo.run_case({"provider": p, "seed": 0, "overrides": tiny}) for p in ("rlhf_fast", "trl")}
    for provider, run in runs.items():
        assert run["status"] == "ok", (provider, run.get("detail"))
        assert run["steps_done"] == tiny["iterations"] and run["rollouts"] == tiny["iterations"], provider
        assert run["step_ms"] > 0 and run["peak_step_MiB"] >= 0, provider
        assert all(-1.0 <= r <= 1.0 for r in run["rewards"]) and -1.0 <= run["eval_true_reward"] <= 1.0, provider
        assert math.isfinite(run["loss_last"]), provider
    # the same initial weights: the held-out score of the initial model is the same in both processes' setups
    assert runs["rlhf_fast"]["eval_true_reward_init"] == runs["trl"]["eval_true_reward_init"]
    with pytest.raises(SystemExit):
        grpo.parse_args(["--providers", "nope"])
    with pytest.raises(SystemExit):
        grpo.parse_args(["--iterations", "1"])
