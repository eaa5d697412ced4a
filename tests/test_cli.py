"""The ``rlhf-fast`` command line, run in-process on YAML configs: tiny models, the demo tokenizer, JSONL
files written in a temporary directory."""

import json
import math
import shutil

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("matplotlib")

from rlhf_fast.cli import apply_overrides, flatten_trainer_section, main
from rlhf_fast.demo import (
    build_tokenizer,
    make_preference_pairs,
    make_prompts,
    make_sft_dataset,
    tiny_model,
    write_jsonl,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"kind": "llama", "hidden_size": 32, "layers": 2, "heads": 4, "max_positions": 64}


@pytest.fixture
def sft_files(tmp_path):
    """Data files and a YAML config for a 6-step SFT run with checkpoints and evaluations every 3 steps."""
    write_jsonl(make_sft_dataset(24, 0), tmp_path / "train.jsonl")
    write_jsonl(make_sft_dataset(8, 1), tmp_path / "eval.jsonl")
    config = {
        "trainer": {"max_steps": 6, "save_every": 3, "eval_every": 3, "micro_batch_size": 4, "lr": 3e-3,
                    "max_length": 48, "progress_bar": False},
        "output_dir": str(tmp_path / "run"),
        "model": dict(TINY),
        "tokenizer": "demo",
        "train_data": str(tmp_path / "train.jsonl"),
        "eval_data": str(tmp_path / "eval.jsonl"),
    }  # fmt: skip
    return write_config(tmp_path / "run.yaml", config)


def write_config(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def test_sft_run_writes_its_directory_and_resumes_to_the_same_losses(sft_files, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["sft", "--config", str(sft_files)]) == 0
    assert "done in" in capsys.readouterr().out
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["max_steps"] == 6 and resolved["lr"] == 3e-3 and resolved["model"] == TINY
    assert resolved["packing"] is False  # every trainer field, defaults too
    assert resolved["train_data"] == str(tmp_path / "train.jsonl")
    steps = [p.name for p in sorted((run_dir / "checkpoints").iterdir())]
    assert steps == ["step-00000003", "step-00000006"]
    assert (run_dir / "checkpoints" / "step-00000006" / "model.safetensors").is_file()
    rows = records(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    for name in ("loss", "lr", "grad_norm", "ppl"):
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    full = train_losses(run_dir)

    # lose the last checkpoint: --resume RUN_DIR (config.yaml stands in for --config) redoes steps 4-6
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")
    assert main(["sft", "--resume", str(run_dir)]) == 0
    assert train_losses(run_dir) == full
    assert [r["step"] for r in records(run_dir) if "eval_loss" in r] == [3, 6]


def test_overrides_apply(sft_files, tmp_path, capsys):
    run_dir = tmp_path / "over"
    # `--resume key=value`: the first override is not taken for --resume's DIR; no checkpoint yet -> fresh start
    argv = ["sft", "--config", str(sft_files), "--resume", f"output_dir={run_dir}", "lr=1e-3", "model.hidden_size=16",
            "trainer.max_steps=2", "betas=[0.8, 0.9]", "model.kind=gpt2"]  # fmt: skip
    assert main(argv) == 0
    assert "starting fresh" in capsys.readouterr().err
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (resolved["lr"], resolved["max_steps"], resolved["betas"]) == (1e-3, 2, [0.8, 0.9])
    assert resolved["model"]["hidden_size"] == 16 and resolved["model"]["kind"] == "gpt2"
    model_config = json.loads((run_dir / "checkpoints" / "step-00000002" / "config.json").read_text())
    assert model_config["model_type"] == "gpt2" and model_config["n_embd"] == 16
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2]


def _drop_completion(tmp_path):
    write_jsonl([{"prompt": "the movie was"}], tmp_path / "bad.jsonl")
    return f"train_data={tmp_path / 'bad.jsonl'}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (lambda p: "lrr=1e-3", "unknown key 'lrr'"),
        (lambda p: "model.hiden_size=8", "unknown key 'hiden_size' in model (did you mean 'hidden_size'?)"),
        (lambda p: "lr=-1", "'lr' must be > 0"),
        (lambda p: "max_steps=many", "'max_steps' must be int"),
        (lambda p: "model.kind=gpt3", "model.kind must be one of"),
        (lambda p: "model.heads=5", "multiple of heads"),
        (lambda p: "tokenizer=gpt2", "'tokenizer' must be demo"),
        (lambda p: f"eval_data={p / 'nowhere.jsonl'}", "eval_data: no such JSONL file"),
        (_drop_completion, "missing column 'completion'"),
        (lambda p: "lr", "must look like key=value"),
    ],
)
def test_bad_configs_fail_before_training(sft_files, tmp_path, capsys, override, message):
    assert main(["sft", "--config", str(sft_files), override(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-fast sft: error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_missing_sections_and_config_are_reported(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", {"tokenizer": "demo", "output_dir": str(tmp_path / "run")})
    assert main(["sft", "--config", str(path)]) == 2
    assert "no 'model'" in capsys.readouterr().err
    assert main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config: no such file" in capsys.readouterr().err
    assert main(["sft"]) == 2
    assert "--config is required" in capsys.readouterr().err
    assert main(["sft", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint or run directory" in capsys.readouterr().err


def test_plot_redraws_the_curves(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": s, "epoch": s / 4, "loss": 3.0 / s, "lr": 1e-3, "rewards/margins": 0.1 * s} for s in (1, 2, 3, 4)]
    rows.insert(2, {"step": 2, "epoch": 0.5, "eval_loss": 2.5, "eval_rewards/margins": 0.3})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run_dir)]) == 0
    names = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert names == ["loss.png", "lr.png", "rewards_margins.png"]
    assert capsys.readouterr().out.split() == [str(run_dir / "plots" / n) for n in names]
    assert all((run_dir / "plots" / n).read_bytes()[:8] == PNG_MAGIC for n in names)
    assert main(["plot", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_override_parsing():
    raw = flatten_trainer_section({"trainer": {"lr": 1.0}, "model": {"kind": "llama"}, "tokenizer": "demo"})
    out = apply_overrides(raw, ["trainer.lr=0.5", "model.layers=3", "ref_model.kind=gpt2", "bf16=true"])
    assert out == {"lr": 0.5, "model": {"kind": "llama", "layers": 3}, "tokenizer": "demo",
                   "ref_model": {"kind": "gpt2"}, "bf16": True}  # fmt: skip
    assert raw["model"] == {"kind": "llama"}  # the input is not modified
    with pytest.raises(ValueError, match="'tokenizer' is 'demo', not a mapping"):
        apply_overrides(raw, ["tokenizer.path=x"])
    with pytest.raises(ValueError, match="'lr' is given both at the top level and under 'trainer'"):
        flatten_trainer_section({"lr": 1.0, "trainer": {"lr": 2.0}})


@pytest.fixture
def pair_files(tmp_path):
    """Preference pairs for train and eval, and a tiny model and tokenizer saved as a local checkpoint."""
    write_jsonl(make_preference_pairs(16, 0, beta_bt=4.0), tmp_path / "pairs.jsonl")
    write_jsonl(make_preference_pairs(8, 1, beta_bt=4.0), tmp_path / "eval_pairs.jsonl")
    tokenizer = build_tokenizer()
    base = tmp_path / "base"
    tiny_model(vocab_size=len(tokenizer), **TINY).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return tmp_path


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_preference_runs_write_their_directory_and_resume(pair_files, command):
    tmp_path = pair_files
    run_dir = tmp_path / command
    config = {"output_dir": str(run_dir), "max_steps": 4, "save_every": 2, "eval_every": 2, "micro_batch_size": 4,
              "lr": 1e-3, "max_length": 48, "progress_bar": False, "train_data": str(tmp_path / "pairs.jsonl"),
              "eval_data": str(tmp_path / "eval_pairs.jsonl")}  # fmt: skip
    if command == "rm":  # a tiny sequence classifier built from config
        config.update(model=dict(TINY), tokenizer="demo")
    else:  # the policy, its reference and the tokenizer from a local checkpoint
        base = str(tmp_path / "base")
        config.update(model={"path": base}, ref_model={"path": base}, tokenizer={"path": base}, beta=0.5)
    path = write_config(tmp_path / f"{command}.yaml", config)
    assert main([command, "--config", str(path)]) == 0
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    if command == "dpo":
        assert resolved["beta"] == 0.5 and resolved["model"] == {"path": base, "trust_remote_code": False}
    rows = records(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    accuracy = "eval_accuracy" if command == "rm" else "eval_rewards/accuracies"
    assert [r["step"] for r in rows if accuracy in r] == [2, 4]
    group = "accuracy" if command == "rm" else "rewards_accuracies"
    assert (run_dir / "plots" / f"{group}.png").read_bytes()[:8] == PNG_MAGIC
    full = train_losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    assert main([command, "--config", str(path), "--resume"]) == 0
    assert train_losses(run_dir) == full


@pytest.mark.parametrize(
    ("command", "override", "message"),
    [
        ("dpo", "beta=0", "'beta' must be > 0"),
        ("dpo", "loss_type=kto", "'loss_type' must be one of"),
        ("dpo", "ref_model={kind: llama, hiden_size: 8}", "unknown key 'hiden_size' in ref_model"),
        ("dpo", "ref_model.layers=2", "'ref_model' needs exactly one of 'path'"),
        ("dpo", "model.trust_remote_code=maybe", "model.trust_remote_code must be true or false"),
        ("rm", "ref_model.kind=llama", "unknown key 'ref_model'"),
        ("rm", "train_data={tmp}/bad.jsonl", "train_data[1] is missing column 'rejected'"),
        ("dpo", "train_data={tmp}/bad.jsonl", "train_data[1] is missing column 'rejected'"),
    ],
)
def test_bad_preference_configs_fail_before_training(pair_files, capsys, command, override, message):
    tmp_path = pair_files
    rows = make_preference_pairs(2, 0)
    del rows[1]["rejected"]
    write_jsonl(rows, tmp_path / "bad.jsonl")
    base = str(tmp_path / "base")
    config = {"output_dir": str(tmp_path / "run"), "model": {"path": base}, "tokenizer": {"path": base},
              "train_data": str(tmp_path / "pairs.jsonl"), "progress_bar": False}  # fmt: skip
    path = write_config(tmp_path / "run.yaml", config)
    assert main([command, "--config", str(path), override.replace("{tmp}", str(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert f"rlhf-fast {command}: error: " in err and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def ppo_files(tmp_path_factory):
    """Prompt files, SFT rows for PPO-ptx, a tiny policy and tokenizer saved as a local checkpoint, and a
    reward model checkpoint written by `rlhf-fast rm` (shared by the module's PPO tests: none writes here)."""
    tmp_path = tmp_path_factory.mktemp("ppo_files")
    write_jsonl([{"prompt": p} for p in make_prompts(16, 0)], tmp_path / "prompts.jsonl")
    write_jsonl([{"prompt": p} for p in make_prompts(4, 1)], tmp_path / "eval_prompts.jsonl")
    write_jsonl(make_sft_dataset(8, 2), tmp_path / "ptx.jsonl")
    write_jsonl([{"text": "the movie was good."}], tmp_path / "texts.jsonl")  # not prompts
    write_jsonl(make_preference_pairs(16, 0, beta_bt=4.0), tmp_path / "pairs.jsonl")
    tokenizer = build_tokenizer()
    tiny_model(vocab_size=len(tokenizer), **TINY).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rm = {
        "output_dir": str(tmp_path / "rm"),
        "max_steps": 2,
        "micro_batch_size": 4,
        "max_length": 48,
        "progress_bar": False,
        "model": dict(TINY),
        "tokenizer": "demo",
        "train_data": str(tmp_path / "pairs.jsonl"),
    }
    assert main(["rm", "--config", str(write_config(tmp_path / "rm.yaml", rm))]) == 0  # fmt: skip
    return tmp_path


def _ppo_config(files, run_dir, **extra):
    base = str(files / "base")
    config = {
        "trainer": {"max_steps": 4, "save_every": 2, "eval_every": 2, "prompts_per_iteration": 4, "num_generations": 2,
                    "micro_batch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8, "max_length": 32, "lr": 1e-3,
                    "progress_bar": False},
        "output_dir": str(run_dir),
        "model": {"path": base}, "tokenizer": {"path": base},
        "train_data": str(files / "prompts.jsonl"), "eval_data": str(files / "eval_prompts.jsonl"),
        **extra,
    }  # fmt: skip
    return write_config(run_dir.parent / "ppo.yaml", config)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_ppo_run_writes_its_directory_and_resumes(ppo_files, tmp_path, estimator, capsys):
    rm_checkpoint = str(ppo_files / "rm" / "checkpoints" / "step-00000002")
    if estimator == "gae":  # the trained reward model scores; the lexicon reward is reported beside it
        extra = {"reward_model": {"path": rm_checkpoint}, "true_reward": "demo_true_reward"}
    else:  # the lexicon reward itself, with PPO-ptx on SFT rows
        extra = {
            "reward": "demo_true_reward",
            "true_reward": "demo_true_reward",
            "ptx_data": str(ppo_files / "ptx.jsonl"),
        }
    path = _ppo_config(ppo_files, tmp_path / "ppo", **extra)
    overrides = [f"advantage_estimator={estimator}"] + (["ptx_coef=0.1"] if estimator == "grpo" else [])
    assert main(["ppo", "--config", str(path), *overrides]) == 0
    assert "rlhf-fast ppo: done in" in capsys.readouterr().out
    run_dir = tmp_path / "ppo"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["advantage_estimator"] == estimator
    assert resolved["eval_data"] == str(ppo_files / "eval_prompts.jsonl")
    for key, value in extra.items():
        assert resolved[key] == ({**value, "trust_remote_code": False} if isinstance(value, dict) else value)
    rows = records(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_score" in r] == [2, 4]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    for r in (r for r in rows if "loss" in r):  # a critic with gae, ptx with grpo; the true reward either way
        assert "true_reward" in r and ("value_loss" in r) == (estimator == "gae") != ("ptx_loss" in r)
    if estimator == "grpo":  # the reward function is the true reward
        assert all(r["score"] == pytest.approx(r["true_reward"]) for r in rows if "loss" in r)
    for name in ("score", "kl", "true_reward"):
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    full = train_losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    assert main(["ppo", "--resume", str(run_dir)]) == 0
    assert train_losses(run_dir) == full


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward=demo_true_reward", "needs exactly one of 'reward_model'"),
        ("reward_model=null", "needs exactly one of 'reward_model'"),
        ("reward=sentiment", "'reward' must name a reward function (demo_true_reward)"),
        ("true_reward=3", "'true_reward' must name a reward function"),
        ("reward_model.path={tmp}/nowhere", "reward_model.path must be a local model directory"),
        ("value_model={kind: llama, hiden_size: 8}", "unknown key 'hiden_size' in value_model"),
        ("ptx_data={tmp}/nowhere.jsonl", "ptx_data: no such JSONL file"),
        ("ptx_coef=0.5", "ptx_coef' is 0.5 but no ptx_data"),
        ("advantage_estimator=ppo2", "'advantage_estimator' must be one of"),
        ("num_generations=1", "'num_generations' must be >= 2 for advantage_estimator='grpo'"),
        ("value_model.kind=llama", "value_model is given but advantage_estimator='grpo' has no critic"),
        ("train_data={tmp}/texts.jsonl", "prompts[0] has columns ['text']; a prompt row needs 'prompt' or 'messages'"),
        ("max_new_tokens=64", "'max_length' (32) must hold the prompt"),
    ],
)
def test_bad_ppo_configs_fail_before_training(ppo_files, tmp_path, capsys, override, message):
    path = _ppo_config(ppo_files, tmp_path / "ppo", reward_model={"path": str(ppo_files / "rm" / "checkpoints" /
                       "step-00000002")}, advantage_estimator="grpo")  # fmt: skip
    assert main(["ppo", "--config", str(path), override.replace("{tmp}", str(ppo_files))]) == 2
    err = capsys.readouterr().err
    assert "rlhf-fast ppo: error: " in err and message in err, err
    assert not (tmp_path / "ppo").exists()


def test_bench_is_handed_to_the_benchmark_runner(capsys):
    from rlhf_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf-fast bench") and "--ptx" in out and "--vocab" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "bench" in capsys.readouterr().out
