"""The trainers under ``accelerate launch``: two CPU processes (gloo; DDP, and FSDP2) against one process.

Two processes with ``micro_batch_size = 2`` see, step by step, the same global batch as one process
with ``micro_batch_size = 4``: the losses, the eval metrics and the final weights agree to float32
rounding. One launch runs everything the two-process side needs (this file is also the script it
launches): SFT, DPO, a reward model, and an SFT run resumed from the mid-run checkpoint of the first.

``accelerate launch --cpu`` starts a single process unless MPI is set up, so the launch asks for
``--multi_gpu``, accelerate's ``torch.distributed.run`` launcher; on a host without CUDA the loop
joins the process group with gloo. The FSDP launch adds ``--use_fsdp``: the same runs, the model
sharded over the two processes, must agree with one process just the same.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("accelerate")

from rlhf_fast.demo import build_tokenizer, make_preference_pairs, make_sft_dataset, tiny_model
from rlhf_fast.trainers import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from rlhf_fast.trainers.loop import MicroBatches

TOKENIZER = build_tokenizer()
SMALL = dict(hidden_size=32, layers=2, heads=4, max_positions=64)
WORLD = 2
PER_RANK = 2  # micro-batch of each of the two processes; one process takes PER_RANK * WORLD
# 24 examples in global micro-batches of 4, 2 per step: an epoch is 3 steps, so 5 steps reshuffle once
STEPS = 5


def _model(kind):
    return tiny_model(kind, vocab_size=len(TOKENIZER), seed=0, **SMALL)


def _run(trainer_name: str, output_dir: Path, micro_batch_size: int, resume_from=None) -> None:
    """One training run, the same in one process and in each of the launched ones.

    ``adam_eps = 1e-4``: AdamW's step ``g / (sqrt(v) + eps)`` jumps between -1 and 1 around ``g = 0``,
    where the rounding of a gradient summed in another order (per process, then across them) moves
    it by a lot; a larger eps makes it a smooth function of the gradient, so equal weights mean equal
    gradients."""
    common = dict(output_dir=str(output_dir), micro_batch_size=micro_batch_size, grad_accum_steps=2, max_steps=STEPS,
                  eval_every=2, eval_batch_size=2, save_every=2, warmup_steps=1, max_length=48, progress_bar=False,
                  seed=3, adam_eps=1e-4)  # fmt: skip
    if trainer_name == "sft":
        trainer = SFTTrainer(_model("llama"), TOKENIZER, make_sft_dataset(24, 0), make_sft_dataset(6, 1),
                             SFTConfig(lr=3e-3, **common))  # fmt: skip
    elif trainer_name == "rm":
        # a value head on a Llama LM, whose (untied) LM head gets no gradient: DDP must cope
        pairs, eval_pairs = make_preference_pairs(24, 4, beta_bt=50.0), make_preference_pairs(6, 5, beta_bt=50.0)
        trainer = RewardTrainer(_model("llama"), TOKENIZER, pairs, eval_pairs, RewardConfig(lr=3e-3, **common))
    else:
        pairs, eval_pairs = make_preference_pairs(24, 2, beta_bt=50.0), make_preference_pairs(6, 3, beta_bt=50.0)
        trainer = DPOTrainer(_model("gpt2"), TOKENIZER, pairs, eval_pairs, DPOConfig(lr=1e-2, beta=0.5, **common))
    trainer.train(resume_from=resume_from)


def _worker(root: Path) -> None:
    """The launched script: SFT, DPO, reward model, then SFT again from the first SFT run's step-2 checkpoint."""
    for name in ("sft", "dpo", "rm"):
        _run(name, root / name, PER_RANK)
    _run("sft", root / "sft_resumed", PER_RANK, resume_from=root / "sft" / "checkpoints" / "step-00000002")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def launched(request, tmp_path_factory) -> Path:
    """The output directory of one two-process launch of :func:`_worker`, with DDP or FSDP."""
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not on PATH")
    root = tmp_path_factory.mktemp(f"launched_{request.param}")
    engine = ["--use_fsdp", "--fsdp_version", "2"] if request.param == "fsdp" else ["--multi_gpu"]
    cmd = ["accelerate", "launch", *engine, "--num_processes", str(WORLD), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           __file__, str(root)]  # fmt: skip
    # one thread per process: the two share the machine's cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"accelerate launch failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return root


def _records(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def _weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def _assert_same_run(
    got: Path, expected: Path, *, rtol: float, atol: float, metric_atol: float, skip: frozenset = frozenset()
) -> None:
    a, b = _records(got), _records(expected)
    # rank 0 alone logs: one record per step (and per evaluation), as in one process
    assert [(r["step"], "loss" in r) for r in a] == [(r["step"], "loss" in r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - {"tokens_per_s"} - skip:
            assert ra[key] == pytest.approx(rb[key], rel=rtol, abs=metric_atol), (ra["step"], key)
    wa, wb = _weights(got), _weights(expected)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("trainer_name", ["sft", "dpo", "rm"])
def test_two_processes_match_one_on_the_same_global_batch(launched, tmp_path, trainer_name):
    _run(trainer_name, tmp_path / "single", PER_RANK * WORLD)
    # the weights must have moved, or agreeing would prove nothing
    start = _model("gpt2" if trainer_name == "dpo" else "llama").state_dict()
    start = {f"backbone.{k}": w for k, w in start.items()} if trainer_name == "rm" else start
    moved = [(w - start[k]).abs().max().item() for k, w in _weights(tmp_path / "single").items() if k in start]
    assert max(moved) > 1e-3
    # reward_std is the spread within a micro-batch, and a process's micro-batch is half of one here
    # (the eval batches are the same: eval_batch_size is set)
    skip = frozenset({"reward_std"} if trainer_name == "rm" else ())
    # DPO's rewards are beta * (policy - reference sequence log-prob), each a sum of many token log-probs far
    # larger than the difference: their float32 rounding, summed in another order, is absolute, not relative
    # to the reward (seen: 1.4e-6 off a reward of 0.127 on an AMD EPYC). A wrong reduction across processes
    # is off by a factor, far above this.
    metric_atol = 2e-5 if trainer_name == "dpo" else 1e-6
    _assert_same_run(
        launched / trainer_name, tmp_path / "single", rtol=1e-5, atol=1e-6, metric_atol=metric_atol, skip=skip
    )


def test_two_process_checkpoints_resume_exactly(launched):
    ckpt = launched / "sft" / "checkpoints" / "step-00000002"
    assert (ckpt / "rng.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == WORLD
    assert state["engine"] == ("fsdp" if launched.name.startswith("launched_fsdp") else "ddp")
    resumed = {r["step"]: r["loss"] for r in _records(launched / "sft_resumed") if "loss" in r}
    full = {r["step"]: r["loss"] for r in _records(launched / "sft") if "loss" in r}
    assert sorted(resumed) == list(range(3, STEPS + 1))
    assert resumed == {step: full[step] for step in resumed}  # exact
    for key, w in _weights(launched / "sft_resumed").items():
        assert torch.equal(w, _weights(launched / "sft")[key]), key


def test_a_checkpoint_resumes_only_with_as_many_processes(launched, tmp_path):
    shutil.copytree(launched / "sft", tmp_path / "sft")
    with pytest.raises(ValueError, match="written by 2 process"):
        _run("sft", tmp_path / "sft", PER_RANK * WORLD, resume_from=tmp_path / "sft" / "checkpoints" / "step-00000002")


def test_each_process_takes_its_share_of_the_global_micro_batch():
    # 7 examples, 2 per process and 3 processes: global micro-batches of 6, then of 1 topped up to 3
    examples = list(range(7))
    streams = [MicroBatches(examples, list, 2, shuffle=True, seed=4, rank=r, world_size=3) for r in range(3)]
    single = MicroBatches(examples, list, 6, shuffle=True, seed=4)
    assert streams[0].per_epoch == single.per_epoch == 2
    first = [next(s) for s in streams]
    assert [len(b) for b in first] == [2, 2, 2] and [x for b in first for x in b] == next(single)
    last = [next(s) for s in streams]
    assert [len(b) for b in last] == [1, 1, 1]
    assert last[0] == next(single) and len({x for b in last for x in b}) == 3  # topped up with other examples


def test_a_deepspeed_launch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="launched with DeepSpeed"):
        SFTTrainer(_model("llama"), TOKENIZER, make_sft_dataset(4, 0), config=SFTConfig(output_dir=str(tmp_path)))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
