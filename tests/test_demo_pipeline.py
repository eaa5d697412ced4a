"""``rlhf-fast demo --quick``: every stage runs and reports finite numbers; the files are written."""

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("matplotlib")

from rlhf_fast.cli import main
from rlhf_fast.demo.pipeline import QUICK, run_pipeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ["startup", "sft", "pairs", "rm", "dpo", "eval"]


def test_quick_demo_reports_every_field_and_writes_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 3 and results["settings"]["n_sft"] == QUICK.n_sft
    assert list(results["policies"]) == ["SFT", "DPO"]
    for name, policy in results["policies"].items():
        assert set(policy) == {"true_reward", "true_reward_se", "kl_to_sft", "kl_to_sft_se", "completion_tokens"}
        assert all(math.isfinite(v) for v in policy.values()), (name, policy)
        assert -1.0 < policy["true_reward"] < 1.0
        assert f"| {name} | {policy['true_reward']:+.3f}" in printed
    assert results["policies"]["SFT"]["kl_to_sft"] == 0.0
    assert results["policies"]["DPO"]["kl_to_sft"] != 0.0  # DPO moved the policy
    for key in ("accuracy", "true_order_accuracy"):
        assert 0.0 <= results["reward_model"][key] <= 1.0
    assert [s["stage"] for s in results["stages"]] == STAGES
    for stage in results["stages"]:
        assert stage["seconds"] > 0.0 and (stage["peak_mib"] is None or math.isfinite(stage["peak_mib"]))
    assert (out / "results.md").read_text().strip() in printed

    for name in ("sft_train", "sft_eval", "pairs_train", "pairs_eval"):
        assert (out / "data" / f"{name}.jsonl").stat().st_size > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * QUICK.n_eval_prompts * QUICK.samples_per_prompt
    for run in ("sft", "rm", "dpo"):
        assert (out / run / "config.yaml").is_file() and (out / run / "metrics.jsonl").is_file()
        assert (out / run / "plots" / "loss.png").read_bytes()[:8] == PNG_MAGIC
        assert any((out / run / "checkpoints").iterdir())
    assert (out / "reward_hist.png").read_bytes()[:8] == PNG_MAGIC


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        run_pipeline(tmp_path, seed=-1, quick=True)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        run_pipeline(tmp_path, quick=True, threads=0)
    assert not any(tmp_path.iterdir())
