"""``rlhf-fast demo``: controlled sentiment generation in miniature, after the IMDb experiment of the
DPO paper (Rafailov et al., 2023, section 6.1), on this package's trainers, offline and on a CPU.

Stages, each timed and measured for memory (after a **startup** stage that takes the imports and
first calls out of the others):

1. **sft** — a tiny Llama (random weights, built from a config) learns the review grammar of
   :mod:`rlhf_fast.demo.sentiment` by SFT on prompt/completion rows of every tone (its mean true
   reward is near 0).
2. **pairs** — as in the paper, preference pairs are *sampled from the SFT policy*: two completions
   of each prompt, labelled by a Bradley-Terry coin on the programmatic true reward (``beta_bt``;
   the paper used a sentiment classifier as the labeller). Sampling from the policy rather than
   from the grammar keeps the pairs on the distribution DPO starts from.
3. **rm** — a reward model (the same backbone with a scalar head) on those pairs; its held-out
   pairwise accuracy is reported, against the coin's labels and against the true reward's order.
4. **dpo** — DPO from the SFT model, with the SFT model as the frozen reference.
5. **ppo** — RL from the SFT model against the reward model, as InstructGPT did it: PPO with a critic
   (initialised from the reward model) and GAE, the per-token reward ``-beta * log(pi / pi_sft)`` plus
   the reward model's score at the last token, the SFT model as the frozen reference. The true reward
   is logged beside the score but never trained on.
6. **grpo** — the same RL without a critic: ``num_generations`` samples per prompt, each one's
   advantage its score minus the group's mean (divided by the group's std), the same KL penalty.
7. **eval** — on held-out prompts, completions sampled (``generate``, plain temperature-1 sampling
   over the whole vocabulary) from the SFT, PPO, GRPO and DPO policies are scored by the true reward; the
   KL to the SFT model is the mean over samples ``y ~ pi`` of ``sum_t log pi(y_t) - log pi_sft(y_t)``
   (completion tokens and EOS), the log-probs computed by :func:`rlhf_fast.integrations.transformers.
   lm_head_logprobs` (the fused LM-head path). For the SFT policy it is 0 by definition.
8. **frontier** — every checkpoint of the DPO, PPO and GRPO runs is evaluated the same way on fewer
   held-out prompts (one sample each), and ``frontier.png`` plots each method's (KL, true reward)
   over its training (see :mod:`rlhf_fast.demo.frontier`).

Memory is the growth of the process's peak resident set during a stage: ``VmHWM`` is reset to the
current ``VmRSS`` through ``/proc/self/clear_refs`` when the stage starts and read when it ends
(Linux; "n/a" elsewhere). It counts everything the stage allocates (tensors, the C++ kernels'
buffers, Python objects), which ``tracemalloc`` would not see.

Files under ``out``: ``data/*.jsonl``; ``sft/``, ``rm/``, ``dpo/``, ``ppo/``, ``grpo/`` run directories
(``config.yaml``, ``metrics.jsonl``, checkpoints, ``plots/*.png``, as the CLI writes them, so
``rlhf-fast <cmd> --resume out/<run>`` continues one); ``samples.jsonl`` (the evaluation's completions
and rewards); ``reward_hist.png``; ``frontier.png``; ``results.json`` and ``results.md`` (the tables
printed at the end).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_fast.demo.frontier import draw_frontier, load_policy, run_checkpoints
from rlhf_fast.demo.io import write_jsonl
from rlhf_fast.demo.models import tiny_model, tiny_reward_model
from rlhf_fast.demo.sentiment import make_preference_pairs, make_prompts, make_sft_dataset, true_reward, true_rewards
from rlhf_fast.demo.tokenizer import EOS_ID, PAD_ID, build_tokenizer


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of a demo run (see :data:`FULL` and :data:`QUICK`).

    Trainer dicts are fields of the trainers' configs (``output_dir``, ``seed`` and
    ``progress_bar`` are set by the pipeline).
    """

    n_sft: int  # SFT rows
    n_pairs: int  # training preference pairs (reward model and DPO)
    n_eval_pairs: int  # held-out pairs (reward model accuracy, DPO eval metrics)
    n_eval_prompts: int  # held-out prompts for the final table
    samples_per_prompt: int
    beta_bt: float  # inverse temperature of the Bradley-Terry labeller
    max_new_tokens: int  # of every sampling: pairs, RL rollouts, evaluation
    n_rl_prompts: int  # training prompts of PPO and GRPO
    n_frontier_prompts: int  # held-out prompts (one sample each) for each point of the frontier plot
    model: dict[str, Any] = field(default_factory=dict)  # tiny_model kwargs
    sft: dict[str, Any] = field(default_factory=dict)
    rm: dict[str, Any] = field(default_factory=dict)
    dpo: dict[str, Any] = field(default_factory=dict)  # save_every sets the frontier's points
    ppo: dict[str, Any] = field(default_factory=dict)  # PPOConfig fields, advantage_estimator gae
    grpo: dict[str, Any] = field(default_factory=dict)  # PPOConfig fields, advantage_estimator grpo


# FULL was tuned (beta_bt, beta, lr, steps) until DPO raised the held-out true reward clearly above SFT
# for seeds 0, 1 and 2 (README "Demo": from about 0 to about +0.8, at a KL of 5-8 nats per sample),
# then the RL stages (lr, kl_coef, iterations, num_generations) until PPO and GRPO did too at a KL of
# 3-5 nats (README "Demo": about +0.8, at about half of DPO's KL); the whole run takes about two
# minutes on 2 CPU cores.
_MODEL = {"kind": "llama", "hidden_size": 64, "layers": 2, "heads": 4, "max_positions": 64}
_RL = {"ppo_epochs": 2, "micro_batch_size": 16, "grad_accum_steps": 2, "max_length": 48, "lr": 5e-4,
       "kl_coef": 0.05}  # fmt: skip
FULL = DemoSettings(
    n_sft=4000, n_pairs=2000, n_eval_pairs=256, n_eval_prompts=256, samples_per_prompt=4, beta_bt=4.0,
    max_new_tokens=32, n_rl_prompts=2000, n_frontier_prompts=128, model=_MODEL,
    sft={"lr": 3e-3, "epochs": 2, "micro_batch_size": 32, "warmup_ratio": 0.05, "min_lr_ratio": 0.1,
         "max_length": 48, "eval_every": 50},
    rm={"lr": 1e-3, "epochs": 2, "micro_batch_size": 32, "warmup_ratio": 0.05, "max_length": 48, "eval_every": 25},
    dpo={"beta": 0.1, "lr": 1e-3, "epochs": 2, "micro_batch_size": 32, "warmup_ratio": 0.05, "max_length": 48,
         "eval_every": 25, "save_every": 14},
    ppo={**_RL, "advantage_estimator": "gae", "max_steps": 48, "prompts_per_iteration": 32, "num_generations": 2,
         "save_every": 4},
    grpo={**_RL, "advantage_estimator": "grpo", "max_steps": 48, "prompts_per_iteration": 8, "num_generations": 8,
          "save_every": 4},
)  # fmt: skip
# A smoke test of every stage (for tests and a first look): too small for DPO to gain reliably.
_RL_QUICK = {**_RL, "max_steps": 4, "ppo_epochs": 1, "micro_batch_size": 8, "save_every": 2}
QUICK = DemoSettings(
    n_sft=256, n_pairs=96, n_eval_pairs=32, n_eval_prompts=16, samples_per_prompt=2, beta_bt=4.0,
    max_new_tokens=28, n_rl_prompts=32, n_frontier_prompts=8, model={**_MODEL, "hidden_size": 32},
    sft={"lr": 3e-3, "max_steps": 16, "micro_batch_size": 16, "max_length": 48, "eval_every": 8},
    rm={"lr": 1e-3, "max_steps": 6, "micro_batch_size": 16, "max_length": 48, "eval_every": 3},
    dpo={"beta": 0.1, "lr": 1e-3, "max_steps": 6, "micro_batch_size": 16, "max_length": 48, "eval_every": 3,
         "save_every": 3},
    ppo={**_RL_QUICK, "advantage_estimator": "gae", "prompts_per_iteration": 8, "num_generations": 2},
    grpo={**_RL_QUICK, "advantage_estimator": "grpo", "prompts_per_iteration": 4, "num_generations": 4},
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Measuring a stage
# ----------------------------------------------------------------------------------------------


def _status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Free what can be freed, then set VmHWM to the current VmRSS; False where Linux cannot."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so reusing it counts again
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class Stage:
    """``with Stage("sft", log) as s: ...`` records ``s.seconds`` and ``s.peak_mib`` (growth of the
    peak resident set during the block, None where it cannot be measured)."""

    def __init__(self, name: str, log: list[dict[str, Any]]):
        self.name, self.log = name, log
        self.seconds, self.peak_mib = 0.0, None

    def __enter__(self) -> Stage:
        self._measured = _reset_peak_rss()
        self._start_kib = _status_kib("VmHWM")
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self._measured and self._start_kib is not None:
            self.peak_mib = (_status_kib("VmHWM") - self._start_kib) / 1024
        self.log.append({"stage": self.name, "seconds": self.seconds, "peak_mib": self.peak_mib})


# ----------------------------------------------------------------------------------------------
# Sampling and scoring
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                       batch_size: int = 256) -> list[list[int]]:  # fmt: skip
    """One completion per prompt from ``model``: plain sampling (temperature 1, no top-k / top-p), up
    to and including the first EOS or ``max_new_tokens`` tokens. Prompts are batched by token length,
    so no prompt is padded. Uses torch's global generator (seed it first)."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompt_ids):
        groups[len(ids)].append(i)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in prompts]
    for length, members in sorted(groups.items()):
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            inputs = torch.tensor([prompt_ids[i] for i in rows], device=device)  # [b, length]
            generated = model.generate(
                inputs, attention_mask=torch.ones_like(inputs), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
            )  # fmt: skip
            for i, row in zip(rows, generated[:, length:].tolist(), strict=True):
                out[i] = row[: row.index(EOS_ID) + 1] if EOS_ID in row else row
    model.train(was_training)
    return out


@torch.no_grad()
def completion_logprobs(model, tokenizer, prompts: Sequence[str], completions: Sequence[list[int]],
                        batch_size: int = 128) -> torch.Tensor:  # fmt: skip
    """``[N]`` float32 ``log pi(completion | prompt)``: the sum over the completion's tokens of their
    log-probs under ``model``, through the fused LM-head path (no ``[tokens, vocab]`` logits)."""
    from rlhf_fast.integrations.transformers import lm_head_logprobs

    prompt_ids = tokenizer(list(prompts))["input_ids"]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [p + c for p, c in zip(prompt_ids[start : start + batch_size], completions[start : start + batch_size],
                                      strict=True)]  # fmt: skip
        T = max(len(s) for s in seqs)
        ids = torch.tensor([s + [PAD_ID] * (T - len(s)) for s in seqs], device=device)  # [b, T]
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)
        labels = ids.masked_fill(mask == 0, -100)
        for row, p in enumerate(prompt_ids[start : start + batch_size]):
            labels[row, : len(p)] = -100  # the prompt is given, not sampled
        logp = lm_head_logprobs(model, ids, mask, labels, use_cache=False)  # [b, T - 1], 0 where ignored
        sums.append(logp.sum(dim=1))
    model.train(was_training)
    return torch.cat(sums)


def _mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def _trainer_config(settings: dict[str, Any], run_dir: Path, seed: int) -> dict[str, Any]:
    return {**settings, "output_dir": str(run_dir), "seed": seed, "progress_bar": sys.stderr.isatty()}


def _write_run_config(run_dir: Path, config, **sections) -> None:
    """``run_dir/config.yaml`` as the CLI writes it, so ``rlhf-fast <cmd> --resume run_dir`` works."""
    import yaml

    resolved = {**config.to_dict(), "output_dir": str(run_dir.resolve()), **sections}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")


def _rm_true_order_accuracy(rm, tokenizer, rows: list[dict], batch_size: int = 128) -> float:
    """Share of pairs with different true rewards that the reward model orders as the true reward does."""
    from rlhf_fast.trainers.reward import sequence_rewards

    rm.eval()
    device = next(rm.parameters()).device  # where its trainer left it: a GPU when there is one
    hits = total = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        texts = [(r["prompt"], r[side]) for r in chunk for side in ("chosen", "rejected")]
        seqs = [tokenizer(p)["input_ids"] + tokenizer(c, add_special_tokens=False)["input_ids"] + [EOS_ID]
                for p, c in texts]  # fmt: skip
        T = max(len(s) for s in seqs)
        ids = torch.tensor([s + [PAD_ID] * (T - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)
        with torch.no_grad():
            scores = sequence_rewards(rm, ids, mask).view(-1, 2)  # [b, 2]: chosen, rejected
        for r, (sc, sr) in zip(chunk, scores.tolist(), strict=True):
            tc, tr = true_reward(r["prompt"] + r["chosen"]), true_reward(r["prompt"] + r["rejected"])
            if tc != tr:
                total += 1
                hits += (sc > sr) == (tc > tr)
    return hits / max(total, 1)


def _policy_summary(rewards: list[float], kls: list[float], lengths: list[int]) -> dict[str, float]:
    reward, reward_se = _mean_and_stderr(rewards)
    kl, kl_se = _mean_and_stderr(kls)
    return {"true_reward": reward, "true_reward_se": reward_se, "kl_to_sft": kl, "kl_to_sft_se": kl_se,
            "completion_tokens": sum(lengths) / len(lengths)}  # fmt: skip


def _draw_histogram(path: Path, rewards: dict[str, list[float]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = [i / 10 for i in range(-10, 11)]
    # one bar per policy side by side in each bin: overlaid, four histograms hide each other
    labels = [f"{name} (mean {sum(values) / len(values):+.3f})" for name, values in rewards.items()]
    ax.hist(list(rewards.values()), bins=bins, label=labels)
    ax.set_xlabel("true reward of a sampled review (held-out prompts)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.savefig(path, dpi=100)


def format_table(results: dict[str, Any]) -> str:
    """The results as Markdown tables: policies, the frontier's checkpoints, then stages."""
    lines = [
        "| policy | true reward (held-out) | KL to SFT (nats/sample) | tokens/sample |",
        "| --- | --- | --- | --- |",
    ]
    for name, p in results["policies"].items():
        lines.append(f"| {name} | {p['true_reward']:+.3f} ± {p['true_reward_se']:.3f} | "
                     f"{p['kl_to_sft']:.2f} ± {p['kl_to_sft_se']:.2f} | {p['completion_tokens']:.1f} |")  # fmt: skip
    frontier = results["frontier"]
    lines += ["", f"Over training (frontier.png; {frontier['prompts']} held-out prompts, one sample each): "
              "step: KL to SFT / true reward of each checkpoint", "", "| run | checkpoints |", "| --- | --- |",
              f"| SFT | 0: 0.00 / {frontier['sft']['true_reward']:+.3f} |"]  # fmt: skip
    for name, points in frontier["runs"].items():
        cells = " · ".join(f"{p['step']}: {p['kl_to_sft']:.2f} / {p['true_reward']:+.3f}" for p in points)
        lines.append(f"| {name} | {cells} |")
    rm = results["reward_model"]
    lines += ["", f"Reward model, held-out pairs: accuracy {rm['accuracy']:.3f} against the Bradley-Terry labels, "
              f"{rm['true_order_accuracy']:.3f} against the true reward's order.", "",
              "| stage | wall time (s) | peak RSS growth (MiB) |", "| --- | --- | --- |"]  # fmt: skip
    for s in results["stages"]:
        peak = "n/a" if s["peak_mib"] is None else f"{s['peak_mib']:.0f}"
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {peak} |")
    total = sum(s["seconds"] for s in results["stages"])
    lines.append(f"| total | {total:.1f} | |")
    return "\n".join(lines)


def run_pipeline(out: str | os.PathLike = "runs/demo", *, seed: int = 0, quick: bool = False,
                 settings: DemoSettings | None = None, threads: int | None = 1) -> dict[str, Any]:  # fmt: skip
    """Run the demo into ``out``, print the table and return the results (also in ``out/results.json``).

    Args:
        out: directory of the data, the three runs and the results.
        seed: sets the data, the models' initialisation, the data order and the sampling.
        quick: the small :data:`QUICK` settings (for tests) instead of :data:`FULL`.
        settings: explicit settings (overrides ``quick``).
        threads: torch's intra-op threads during the run (restored afterwards); None leaves them.
            The default is 1: the demo's ops are too small to split, and on a busy 2-core machine
            two threads made sampling 12 times slower (waiting on each other) than one.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out), seed, settings if settings is not None else (QUICK if quick else FULL))
    finally:
        torch.set_num_threads(previous)


def _score_policy(model, sft_model, tokenizer, prompts: list[str], seed: int, max_new_tokens: int):
    """One completion per prompt from ``model`` (torch seeded with ``seed`` first: every policy sees the
    same random numbers, less noise in the differences); returns the texts, their true rewards, the
    log-ratios ``log pi(y) - log pi_sft(y)`` and the completion lengths in tokens."""
    torch.manual_seed(seed)
    tokens = sample_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    rewards = [true_reward(p + " " + t) for p, t in zip(prompts, texts, strict=True)]
    if model is sft_model:
        log_ratios = [0.0] * len(prompts)
    else:
        policy_logp = completion_logprobs(model, tokenizer, prompts, tokens)  # [N]
        log_ratios = (policy_logp - completion_logprobs(sft_model, tokenizer, prompts, tokens)).tolist()
    return texts, rewards, log_ratios, [len(t) for t in tokens]


def _evaluate(out: Path, seed: int, s: DemoSettings, tokenizer, policies: dict) -> tuple[dict, dict]:
    """Sample each policy on held-out prompts; true reward and KL to the SFT policy (``policies["SFT"]``)."""
    prompts = [p for p in make_prompts(s.n_eval_prompts, seed + 2) for _ in range(s.samples_per_prompt)]
    summary, samples, rewards = {}, [], {}
    for name, model in policies.items():
        texts, rewards[name], log_ratios, lengths = _score_policy(model, policies["SFT"], tokenizer, prompts, seed + 3,
                                                                  s.max_new_tokens)  # fmt: skip
        summary[name] = _policy_summary(rewards[name], log_ratios, lengths)
        samples += [{"policy": name, "prompt": p, "completion": " " + t, "true_reward": r, "log_ratio": k}
                    for p, t, r, k in zip(prompts, texts, rewards[name], log_ratios, strict=True)]  # fmt: skip
    write_jsonl(samples, out / "samples.jsonl")
    return summary, rewards


def _frontier(out: Path, seed: int, s: DemoSettings, tokenizer, sft_model, runs: Sequence[str]) -> dict[str, Any]:
    """Mean held-out true reward and KL to SFT of the SFT model (``sft``) and of every checkpoint of each
    run in ``runs`` (policy names, run directories ``out / name.lower()``): ``{"prompts", "sft", "runs":
    {name: [{"step", "true_reward", "kl_to_sft"}, ...]}}``. Draws ``frontier.png``."""
    prompts = make_prompts(s.n_frontier_prompts, seed + 2)  # held out, one sample each

    def point(model) -> dict[str, float]:
        _, rewards, log_ratios, _ = _score_policy(model, sft_model, tokenizer, prompts, seed + 5, s.max_new_tokens)
        return {"true_reward": sum(rewards) / len(rewards), "kl_to_sft": sum(log_ratios) / len(log_ratios)}

    sft_point = point(sft_model)
    curves = {name: [{"step": step, **point(load_policy(path, sft_model))}
                     for step, path in run_checkpoints(out / name.lower())] for name in runs}  # fmt: skip
    draw_frontier(out / "frontier.png", curves, sft_point["true_reward"])
    return {"prompts": len(prompts), "sft": sft_point, "runs": curves}


def _rl_stage(name: str, out: Path, seed: int, s: DemoSettings, tokenizer, sft_model, reward_model,
              sections: dict[str, Any]):  # fmt: skip
    """Train a copy of the SFT policy with ``PPOTrainer`` (settings ``s.ppo`` or ``s.grpo``) against the
    reward model, the SFT model as the reference; returns the trained policy."""
    from rlhf_fast.trainers import PPOTrainer

    config = _trainer_config({**getattr(s, name), "max_new_tokens": s.max_new_tokens}, out / name, seed)
    policy = copy.deepcopy(sft_model).requires_grad_(True)  # the SFT model is frozen, as DPO's reference
    trainer = PPOTrainer(policy, tokenizer, sections["train_data"], reward_model=reward_model,
                         ref_model=sft_model, true_reward_fn=true_rewards, config=config)  # fmt: skip
    _write_run_config(out / name, trainer.config, **sections, true_reward="demo_true_reward")
    trainer.train()
    return trainer.model


def _run(out: Path, seed: int, s: DemoSettings) -> dict[str, Any]:
    from rlhf_fast.trainers import DPOTrainer, SFTTrainer, latest_checkpoint
    from rlhf_fast.trainers.plot import plot_run
    from rlhf_fast.trainers.reward import RewardTrainer

    data = out / "data"
    tokenizer = build_tokenizer()
    stages: list[dict[str, Any]] = []
    model_section = {**s.model, "seed": seed}

    with Stage("startup", stages):  # imports and first calls, which would otherwise count to the first stage
        warm = tiny_model(vocab_size=len(tokenizer), **{**model_section, "hidden_size": 8, "heads": 1, "layers": 1})
        SFTTrainer(warm, tokenizer, [{"text": "the movie was good."}], config={"progress_bar": False})
        sample_completions(warm, tokenizer, ["the movie was"], max_new_tokens=2)
        completion_logprobs(warm, tokenizer, ["the movie was"], [[EOS_ID]])
        del warm

    sft_data = {"train_data": str((data / "sft_train.jsonl").resolve()),
                "eval_data": str((data / "sft_eval.jsonl").resolve())}  # fmt: skip
    with Stage("sft", stages):
        write_jsonl(make_sft_dataset(s.n_sft, seed), sft_data["train_data"])
        write_jsonl(make_sft_dataset(max(s.n_sft // 10, 8), seed + 1), sft_data["eval_data"])
        sft = SFTTrainer(tiny_model(vocab_size=len(tokenizer), **model_section), tokenizer, sft_data["train_data"],
                         sft_data["eval_data"], config=_trainer_config(s.sft, out / "sft", seed))  # fmt: skip
        _write_run_config(out / "sft", sft.config, model=model_section, tokenizer="demo", **sft_data)
        sft.train()
        sft_model = sft.model
    del sft

    pair_data = {"train_data": str((data / "pairs_train.jsonl").resolve()),
                 "eval_data": str((data / "pairs_eval.jsonl").resolve())}  # fmt: skip
    with Stage("pairs", stages):
        torch.manual_seed(seed)

        def sft_policy(prompts: list[str]) -> list[str]:
            tokens = sample_completions(sft_model, tokenizer, prompts, max_new_tokens=s.max_new_tokens)
            return tokenizer.batch_decode(tokens, skip_special_tokens=True)

        pairs = make_preference_pairs(s.n_pairs, seed, beta_bt=s.beta_bt, sample=sft_policy)
        eval_pairs = make_preference_pairs(s.n_eval_pairs, seed + 1, beta_bt=s.beta_bt, sample=sft_policy)
        write_jsonl(pairs, pair_data["train_data"])
        write_jsonl(eval_pairs, pair_data["eval_data"])

    with Stage("rm", stages):
        rm = RewardTrainer(tiny_reward_model(vocab_size=len(tokenizer), **model_section), tokenizer,
                           pair_data["train_data"], pair_data["eval_data"],
                           config=_trainer_config(s.rm, out / "rm", seed))  # fmt: skip
        _write_run_config(out / "rm", rm.config, model=model_section, tokenizer="demo", **pair_data)
        rm_metrics = rm.train()
        rm_true_accuracy = _rm_true_order_accuracy(rm.model, tokenizer, eval_pairs)
        reward_model = rm.model
    del rm

    with Stage("dpo", stages):  # the policy starts from the SFT model, which is also the frozen reference
        dpo = DPOTrainer(copy.deepcopy(sft_model), tokenizer, pair_data["train_data"], pair_data["eval_data"],
                         config=_trainer_config(s.dpo, out / "dpo", seed), ref_model=sft_model)  # fmt: skip
        sft_checkpoint = {"path": str(latest_checkpoint(out / "sft").resolve())}
        _write_run_config(out / "dpo", dpo.config, model=sft_checkpoint, tokenizer=sft_checkpoint, **pair_data)
        dpo.train()
        dpo_model = dpo.model
    del dpo

    rl_sections = {"model": sft_checkpoint, "tokenizer": dict(sft_checkpoint), "ref_model": dict(sft_checkpoint),
                   "reward_model": {"path": str(latest_checkpoint(out / "rm").resolve())},
                   "train_data": str((data / "rl_prompts.jsonl").resolve()), "eval_data": None}  # fmt: skip
    write_jsonl([{"prompt": p} for p in make_prompts(s.n_rl_prompts, seed + 4)], rl_sections["train_data"])
    rl_models = {}
    for name in ("ppo", "grpo"):
        with Stage(name, stages):
            rl_models[name] = _rl_stage(name, out, seed, s, tokenizer, sft_model, reward_model, rl_sections)

    with Stage("eval", stages):
        trained = {"SFT": sft_model, "PPO": rl_models["ppo"], "GRPO": rl_models["grpo"], "DPO": dpo_model}
        policies, rewards = _evaluate(out, seed, s, tokenizer, trained)

    with Stage("frontier", stages):
        frontier = _frontier(out, seed, s, tokenizer, sft_model, ("PPO", "GRPO", "DPO"))

    for run in ("sft", "rm", "dpo", "ppo", "grpo"):
        plot_run(out / run)
    _draw_histogram(out / "reward_hist.png", rewards)
    results = {
        "seed": seed, "threads": torch.get_num_threads(), "settings": dataclasses.asdict(s), "policies": policies,
        "reward_model": {"accuracy": rm_metrics["eval_accuracy"], "true_order_accuracy": rm_true_accuracy},
        "frontier": frontier, "stages": stages,
        "memory": "growth of VmHWM (peak resident set) during each stage, reset through /proc/self/clear_refs",
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = format_table(results)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return results
