"""rlhf_fast's DPOTrainer and RewardTrainer against TRL's, on the same model, data and hyper-parameters (CPU).

    python -m benchmarks.trainers_vs_trl                    # both trainers, both models, both providers
    python -m benchmarks.trainers_vs_trl --quick            # few steps, little data: a smoke test
    python -m benchmarks.trainers_vs_trl --trainers dpo --models lm32k --providers rlhf_fast,trl,rlhf_fast-unfused

GRPO (``PPOTrainer`` against TRL's ``GRPOTrainer``) is in the sibling :mod:`benchmarks.grpo_vs_trl`, which
reuses this module's :class:`Meter` and :func:`best_of`.

Models (``MODELS``), both Llama built from a config with random weights (``rlhf_fast.demo.tiny_model`` /
``tiny_reward_model``, the same seed for every provider): ``demo``, the demo pipeline's model (hidden 64,
the demo tokenizer's vocabulary) on the demo's preference pairs (sequences of at most 31 tokens), and
``lm32k``, hidden 256 with a vocabulary of 32000 (the demo tokenizer uses the first few hundred ids; the
other rows of the embedding and LM head are ordinary parameters) on longer pairs of about 128 tokens, so
that the LM head dominates a DPO step. The pairs come from ``rlhf_fast.demo.make_preference_pairs``
(Bradley-Terry labels on the lexicon reward); the held-out pairs use the next seed.

What is matched: the initial weights; the tokenizer (``build_tokenizer``) and the plain-text
``prompt``/``chosen``/``rejected`` rows (no chat template: both tokenize them to BOS + prompt + response +
EOS, which each run checks token for token against TRL's tokenized dataset); the batch order (no
shuffling: TRL's ``train_sampling_strategy="sequential"``, our ``shuffle=False``), so the first step's loss
must agree; batch size, steps (one epoch), fused AdamW (lr, betas, eps, no weight decay), cosine decay to 0
without warm-up, gradient clipping at 1.0, float32 (no bf16), no gradient checkpointing (TRL's default
is on; ours has none), beta and the sigmoid loss, reference log-probs precomputed once before training
(TRL's ``precompute_ref_log_probs=True``), a final checkpoint with the optimizer state (ours always
writes one; TRL's ``save_steps`` is the step count), metrics logged every 10 steps, no progress bar, no
evaluation during training.

What is not (TRL's defaults, kept as users get them): TRL's DPO head computes the entropy, mean logit and top-1
flag of every token for its metrics; on CPU TRL's fused LM head scores every position (its compaction to
completion tokens is for Triton devices) in one ``[tokens, vocab]`` float32 tile with several
temporaries of that size in the backward pass; our DPO trainer copies the model for its reference at
construction (TRL precomputes with the policy itself). TRL's own ``evaluate`` and ours average
differently, so neither is used: one judge (plain ``log_softmax`` on the model's logits, the reward
head's output) scores both final models on the held-out pairs.

Measured per run, each in a fresh process (``_harness.run_isolated``): the wall time between successive
ends of optimizer steps (data loading, forward, backward, clipping, optimizer, logging), its median over
the steps after the first ``WARMUP_STEPS`` (which hold one-time work and the memory counter's reset;
TRL's reference precompute runs in its constructor, ours before our first step, so neither is in the
median); the constructor and ``train()`` wall times; peak resident memory above the process's resident
set once the model, tokenizer and rows are loaded (``peak total``: constructor, reference precompute,
training, final checkpoint) and above the resident set at the end of the first step (``peak step``: the
steady-state step); the held-out metrics above. The pair of runs of one (trainer, model) goes back to
back so both see the same machine load. Each run uses one thread by default (``--threads``): on this
shared 2-core machine, with other jobs running, two OpenMP threads per process made every parallel region
wait for a descheduled thread, and the same run's step time varied by 10x between runs and within one.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

from benchmarks import _harness as h

# rlhf_fast-unfused: our trainer with fused=False (model logits, then the logits-input ops);
# trl-adamw_torch: TRL with optim="adamw_torch", torch.optim.AdamW's per-tensor loop (TRL's default and our
# loop both use the fused kernel)
PROVIDERS = ("rlhf_fast", "trl", "rlhf_fast-unfused", "trl-adamw_torch")
DEFAULT_PROVIDERS = ("rlhf_fast", "trl")
TRAINERS = ("dpo", "rm")
WARMUP_STEPS = 2  # steps left out of the median (one-time work, the peak-memory reset after step 1)
LOG_EVERY = 10
BETA_BT = 4.0  # the demo's labeller: Bradley-Terry inverse temperature on the lexicon reward


@dataclass(frozen=True)
class Setting:
    """One model size with its data and hyper-parameters (the same for every provider)."""

    hidden_size: int
    vocab_size: int | None  # None: the demo tokenizer's vocabulary
    max_positions: int
    max_length: int  # no sequence of the data is longer, so neither side truncates
    long_pairs: bool  # responses of several reviews, filling max_length
    batch_size: int  # pairs per step
    steps: int
    n_eval: int
    lr: dict  # per trainer
    beta: float = 0.1
    layers: int = 2
    heads: int = 4

    @property
    def n_train(self) -> int:
        return self.batch_size * self.steps  # one epoch


MODELS = {
    "demo": Setting(hidden_size=64, vocab_size=None, max_positions=64, max_length=48, long_pairs=False,
                    batch_size=16, steps=60, n_eval=256, lr={"dpo": 5e-4, "rm": 1e-3}),
    "lm32k": Setting(hidden_size=256, vocab_size=32000, max_positions=128, max_length=128, long_pairs=True,
                     batch_size=8, steps=24, n_eval=64, lr={"dpo": 5e-4, "rm": 5e-4}),
}  # fmt: skip
QUICK = {"demo": {"batch_size": 8, "steps": 5, "n_eval": 32}, "lm32k": {"batch_size": 4, "steps": 4, "n_eval": 8}}


# -- data and models ------------------------------------------------------------------------------


def _long_sampler(tokenizer, max_length: int, seed: int):
    """``sample(prompts) -> completions`` for ``make_preference_pairs``: a grammar completion of the prompt
    followed by whole demo reviews while prompt + completion + EOS stays within ``max_length`` tokens."""
    from rlhf_fast.demo import make_reviews
    from rlhf_fast.demo.sentiment import sample_completion

    rng = random.Random(seed)
    pool = make_reviews(512, seed + 1_000)

    def length(text: str) -> int:
        return len(tokenizer(text)["input_ids"]) + 1  # + EOS

    def sample(prompts: list[str]) -> list[str]:
        out = []
        for prompt in prompts:
            text = sample_completion(prompt, rng)
            while length(prompt + text + " " + (piece := rng.choice(pool))) <= max_length:
                text += " " + piece
            out.append(text)
        return out

    return sample


def make_rows(setting: Setting, tokenizer, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out ``{"prompt", "chosen", "rejected"}`` rows; a ``ValueError`` if any sequence
    (BOS + prompt + response + EOS) is longer than ``setting.max_length``."""
    from rlhf_fast.demo import make_preference_pairs

    splits = []
    for n, s in ((setting.n_train, seed), (setting.n_eval, seed + 1)):
        sample = _long_sampler(tokenizer, setting.max_length, s) if setting.long_pairs else None
        splits.append(make_preference_pairs(n, s, beta_bt=BETA_BT, sample=sample))
    longest = max(len(tokenizer(r["prompt"] + r[k])["input_ids"]) + 1 for rows in splits for r in rows
                  for k in ("chosen", "rejected"))  # fmt: skip
    if longest > setting.max_length:
        raise ValueError(f"a sequence of {longest} tokens exceeds max_length = {setting.max_length}")
    return splits[0], splits[1]


def build_model(setting: Setting, trainer: str, tokenizer, seed: int):
    """A float32 Llama with random weights from ``seed``: a causal LM (dpo) or a scalar-head classifier (rm)."""
    from rlhf_fast.demo import tiny_model, tiny_reward_model

    build = tiny_model if trainer == "dpo" else tiny_reward_model
    return build("llama", vocab_size=setting.vocab_size or len(tokenizer), seed=seed, hidden_size=setting.hidden_size,
                 layers=setting.layers, heads=setting.heads, max_positions=setting.max_positions)  # fmt: skip


# -- the judge: one scoring of every provider's final model -------------------------------------------


def _pair_batches(examples: list, tokenizer, batch: int):
    from rlhf_fast.trainers.data import pad_id_of
    from rlhf_fast.trainers.dpo import collate_pairs

    for i in range(0, len(examples), batch):
        yield collate_pairs(examples[i : i + batch], pad_id_of(tokenizer))


def response_logps(model, examples: list, tokenizer, batch: int = 8):
    """Summed log-probs of the response tokens, ``(chosen [N], rejected [N])`` float64, from the model's own
    logits and a plain float32 ``log_softmax`` (independent of both trainers' loss paths)."""
    import torch

    sums = []
    model.eval()
    with torch.no_grad():
        for b in _pair_batches(examples, tokenizer, batch):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            targets = b["labels"][:, 1:]  # [2b, T-1]
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [2b, T-1, V]
            token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
            sums.append(token.double().sum(-1))
    return torch.cat([s[: len(s) // 2] for s in sums]), torch.cat([s[len(s) // 2 :] for s in sums])


def judge_dpo(model, examples: list, ref: tuple, tokenizer, beta: float) -> dict:
    """Held-out DPO loss (mean ``-logsigmoid(beta * z)``) and reward accuracy (share of pairs whose chosen
    implicit reward is strictly higher) of ``model`` against the reference sums ``ref``."""
    import torch.nn.functional as F

    chosen, rejected = response_logps(model, examples, tokenizer)
    z = (chosen - ref[0]) - (rejected - ref[1])
    return {"eval_loss": float(-F.logsigmoid(beta * z).mean()), "eval_accuracy": float((z > 0).double().mean())}


def judge_rm(model, examples: list, tokenizer, batch: int = 16) -> dict:
    """Held-out pairwise accuracy of a sequence classifier: its score of the chosen sequence strictly higher."""
    import torch

    from rlhf_fast.trainers.data import pad_id_of
    from rlhf_fast.trainers.reward import collate_preferences

    right = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = collate_preferences(examples[i : i + batch], pad_id_of(tokenizer))
            n, k, t = b["input_ids"].shape
            scores = model(input_ids=b["input_ids"].view(n * k, t), attention_mask=b["attention_mask"].view(n * k, t),
                           use_cache=False).logits.view(n, k)  # fmt: skip
            right += int((scores[:, 0] > scores[:, 1]).sum())
    return {"eval_accuracy": right / len(examples)}


# -- one run ---------------------------------------------------------------------------------------


class Meter:
    """Step-end clock, per-step losses and the two peak-memory windows of one run (see the module docstring)."""

    def __init__(self):
        self.total = h.PeakRSS().__enter__()  # baseline: model and data loaded
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.step_window: h.PeakRSS | None = None

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) == 1:  # close the first window (construction, precompute, step 1), open the step one
            self.total.__exit__(None, None, None)
            self.step_window = h.PeakRSS().__enter__()

    def result(self, train_start: float) -> dict:
        if self.step_window is None:
            raise RuntimeError("no optimizer step was taken")
        self.step_window.__exit__(None, None, None)
        steps = [b - a for a, b in zip([train_start, *self.ends], self.ends, strict=False)]
        timed = steps[min(WARMUP_STEPS, len(steps) - 1) :]
        peak = max(self.total.peak_bytes, self.step_window.peak_bytes)
        return {
            "steps_done": len(steps), "steps_timed": len(timed), "step_ms": statistics.median(timed) * 1e3,
            "step_min_ms": min(timed) * 1e3, "first_step_s": steps[0],
            "step_times_ms": [round(s * 1e3, 2) for s in steps],
            "peak_total_MiB": (peak - self.total.start_bytes) / h.MiB,
            "peak_step_MiB": self.step_window.extra_bytes / h.MiB,
            "loss_first": self.losses[0], "loss_last": self.losses[-1],
        }  # fmt: skip


def _ours(trainer: str, model, tokenizer, rows: list[dict], setting: Setting, spec: dict, out_dir: str, meter: Meter):
    from rlhf_fast.trainers import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    common = dict(output_dir=out_dir, seed=spec["seed"], device="cpu", lr=setting.lr[trainer], weight_decay=0.0,
                  warmup_steps=0, min_lr_ratio=0.0, max_steps=setting.steps, micro_batch_size=setting.batch_size,
                  grad_accum_steps=1, max_grad_norm=1.0, shuffle=False, bf16=False,
                  fused=spec["provider"] != "rlhf_fast-unfused", max_length=setting.max_length, log_every=LOG_EVERY,
                  save_every=0, progress_bar=False)  # fmt: skip
    if trainer == "dpo":
        run = DPOTrainer(model, tokenizer, rows, config=DPOConfig(**common, beta=setting.beta, loss_type="sigmoid"))
    else:
        run = RewardTrainer(model, tokenizer, rows, config=RewardConfig(**common))
    inner = run.loop._train_step

    def timed_step():
        out = inner()
        meter.losses.append(out[0] / max(out[1], 1))  # summed loss / pairs
        meter.step_end()
        return out

    run.loop._train_step = timed_step
    return run


def _trl(trainer: str, model, tokenizer, rows: list[dict], setting: Setting, spec: dict, out_dir: str, meter: Meter):
    import datasets
    import trl
    from transformers import TrainerCallback

    datasets.disable_progress_bars()
    common = dict(output_dir=out_dir, seed=spec["seed"], data_seed=spec["seed"], use_cpu=True, report_to="none",
                  bf16=False, fp16=False, gradient_checkpointing=False, learning_rate=setting.lr[trainer],
                  weight_decay=0.0, warmup_steps=0, lr_scheduler_type="cosine", max_steps=setting.steps,
                  per_device_train_batch_size=setting.batch_size, gradient_accumulation_steps=1, max_grad_norm=1.0,
                  train_sampling_strategy="sequential", max_length=setting.max_length, logging_steps=LOG_EVERY,
                  save_strategy="steps", save_steps=setting.steps, disable_tqdm=True, eval_strategy="no")  # fmt: skip
    if spec["provider"] == "trl-adamw_torch":
        common["optim"] = "adamw_torch"

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

    data = datasets.Dataset.from_list(rows)
    if trainer == "dpo":
        config = trl.DPOConfig(**common, beta=setting.beta, loss_type=["sigmoid"], precompute_ref_log_probs=True)
        run = trl.DPOTrainer(model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[StepEnd()])
    else:
        config = trl.RewardConfig(**common)
        run = trl.RewardTrainer(model, args=config, train_dataset=data, processing_class=tokenizer,
                                callbacks=[StepEnd()])  # fmt: skip
    inner = run.training_step

    def step_with_loss(*args, **kwargs):
        loss = inner(*args, **kwargs)
        meter.losses.append(float(loss))  # one micro-batch per step: the step's mean loss
        return loss

    run.training_step = step_with_loss
    return run


def _token_mismatches(trainer: str, run, tokenizer, rows: list[dict], setting: Setting) -> int:
    """Train sequences whose tokens (or, for DPO, prompt/response split) differ between TRL's tokenized
    dataset and ours."""
    from rlhf_fast.trainers import data
    from rlhf_fast.trainers.reward import preference_examples

    ds = run.train_dataset
    bad = 0
    if trainer == "dpo":
        ours = data.preference_examples(rows, tokenizer, max_length=setting.max_length, name="rows")
        for ex, prompt, chosen, rejected in zip(ours, ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"],
                                                strict=True):  # fmt: skip
            for side, response in (("chosen", chosen), ("rejected", rejected)):
                mine = ex[side]
                n_response = sum(label != data.IGNORE_INDEX for label in mine["labels"])
                bad += mine["input_ids"] != prompt + response or n_response != len(response)
    else:
        ours = preference_examples(rows, tokenizer, max_length=setting.max_length, name="rows")
        for ex, chosen, rejected in zip(ours, ds["chosen_ids"], ds["rejected_ids"], strict=True):
            bad += (ex["responses"][0] != chosen) + (ex["responses"][1] != rejected)
    return int(bad)


def run_case(spec: dict) -> dict:
    """One (trainer, model, provider) run; the target of ``_harness.run_isolated`` (or called in-process).

    ``spec``: ``trainer`` (dpo | rm), ``model`` (a key of ``MODELS``), ``provider`` (``PROVIDERS``),
    ``seed``, optional ``overrides`` of the :class:`Setting` fields and ``threads``."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    setting = replace(MODELS[spec["model"]], **spec.get("overrides", {}))
    trainer, provider, seed = spec["trainer"], spec["provider"], spec["seed"]
    result = {**h.torch_info()}
    is_trl = provider.startswith("trl")
    if is_trl:
        try:
            import trl
        except ImportError as exc:
            return {**result, "status": "SKIP", "detail": f"trl is not installed ({exc})"}
        result["trl_version"] = trl.__version__
        for name in ("DPOConfig", "DPOTrainer", "RewardConfig", "RewardTrainer"):  # trl imports these lazily: load
            getattr(trl, name)  # them now, so that module memory is not charged to the run
    import transformers

    from rlhf_fast.demo import build_tokenizer
    from rlhf_fast.trainers import data
    from rlhf_fast.trainers.reward import preference_examples

    transformers.logging.set_verbosity_error()
    result["transformers_version"] = transformers.__version__
    tokenizer = build_tokenizer()
    train_rows, eval_rows = make_rows(setting, tokenizer, seed)
    model = build_model(setting, trainer, tokenizer, seed)
    if trainer == "dpo":  # the judge's reference: the initial model on the held-out pairs
        eval_examples = data.preference_examples(eval_rows, tokenizer, max_length=setting.max_length, name="eval")
        ref = response_logps(model, eval_examples, tokenizer)
        model.train()
    else:
        eval_examples = preference_examples(eval_rows, tokenizer, max_length=setting.max_length, name="eval")
    first_batch = [r["prompt"] + r[k] for r in train_rows[: setting.batch_size] for k in ("chosen", "rejected")]
    result["params"] = sum(p.numel() for p in model.parameters())
    result["tokens_per_step"] = sum(len(ids) + 1 for ids in tokenizer(first_batch)["input_ids"])  # + EOS

    with tempfile.TemporaryDirectory(prefix=f"bench-{trainer}-{provider}-") as out_dir:
        meter = Meter()
        t0 = time.perf_counter()
        build = _trl if is_trl else _ours
        run = build(trainer, model, tokenizer, train_rows, setting, spec, out_dir, meter)
        t1 = time.perf_counter()
        run.train()
        t2 = time.perf_counter()
        result.update(meter.result(t1), init_s=t1 - t0, train_s=t2 - t1)
    trained = run.model
    if is_trl:
        result["token_mismatches"] = _token_mismatches(trainer, run, tokenizer, train_rows, setting)
    if trainer == "dpo":
        if is_trl:
            ref_train = run.train_dataset["ref_chosen_logps"]
        else:
            ref_train = [p["ref_chosen_logps"] for p in run.train_pairs]
        result["ref_chosen_logp_mean"] = sum(ref_train) / len(ref_train)
        result.update(judge_dpo(trained, eval_examples, ref, tokenizer, setting.beta))
    else:
        result.update(judge_rm(trained, eval_examples, tokenizer))
    return {**result, "status": "ok"}


# -- the driver ------------------------------------------------------------------------------------

COLUMNS = [
    ("trainer", "trainer", "s"), ("model", "model", "s"), ("provider", "provider", "s"), ("status", "status", "s"),
    ("tok/step", "tokens_per_step", "d"), ("steps", "steps_timed", "d"), ("step ms", "step_ms", ".1f"),
    ("time ours/trl", "time_ratio", ".2f"), ("peak total MiB", "peak_total_MiB", ".1f"),
    ("peak step MiB", "peak_step_MiB", ".1f"), ("step mem ours/trl", "mem_ratio", ".2f"),
    ("init s", "init_s", ".1f"), ("train s", "train_s", ".1f"), ("1st loss", "loss_first", ".5f"),
    ("last loss", "loss_last", ".4f"), ("eval loss", "eval_loss", ".4f"), ("eval acc", "eval_accuracy", ".3f"),
]  # fmt: skip


def _ratios(rows: list[dict]) -> None:
    """``time_ratio`` and ``mem_ratio`` (ours / TRL) on each of our rows, against the TRL row of its pair."""
    for row in rows:
        peer = next((r for r in rows if r["provider"] == "trl" and r["trainer"] == row["trainer"]
                     and r["model"] == row["model"] and r.get("status") == "ok"), None)  # fmt: skip
        if row["provider"].startswith("trl") or peer is None or row.get("status") != "ok":
            continue
        row["time_ratio"] = row["step_ms"] / peer["step_ms"]
        row["mem_ratio"] = row["peak_step_MiB"] / max(peer["peak_step_MiB"], 1.0)
        row["total_mem_ratio"] = row["peak_total_MiB"] / max(peer["peak_total_MiB"], 1.0)


def _csv(value: str | None, allowed: tuple[str, ...], default: tuple[str, ...], flag: str, p) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()] if value else list(default)
    unknown = [x for x in items if x not in allowed]
    if unknown:
        p.error(f"unknown {flag} {unknown}; choose from {list(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainers_vs_trl",
                                description=__doc__.split("\n\n")[0].replace("``", ""))  # fmt: skip
    p.add_argument("--trainers", help=f"comma list of {', '.join(TRAINERS)} (default: both)")
    p.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (default: all)")
    p.add_argument("--providers", help=f"comma list of {', '.join(PROVIDERS)} (default: {','.join(DEFAULT_PROVIDERS)})")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: per model; the data is one epoch)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each pair, alternating providers (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads in each run (default 1, see the module docstring; 0: torch's choice)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for the CSV and JSON rows")
    p.add_argument("--quick", action="store_true", help="few steps and little data (a smoke test)")
    args = p.parse_args(argv)
    args.trainers = _csv(args.trainers, TRAINERS, TRAINERS, "--trainers", p)
    args.models = _csv(args.models, tuple(MODELS), tuple(MODELS), "--models", p)
    args.providers = _csv(args.providers, PROVIDERS, DEFAULT_PROVIDERS, "--providers", p)
    if args.steps is not None and args.steps < 2:
        p.error(f"--steps must be >= 2, got {args.steps}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def overrides(model: str, args: argparse.Namespace) -> dict:
    """Setting fields changed by ``--quick`` and ``--steps``."""
    out = dict(QUICK[model]) if args.quick else {}
    if args.steps is not None:
        out["steps"] = args.steps
    return out


def best_of(runs: list[dict]) -> dict:
    """One row from the repeats of a case: the run with the smallest median step time, with every
    run's median kept in ``step_ms_runs``."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[-1]
    row = dict(min(ok, key=lambda r: r["step_ms"]))
    row["step_ms_runs"] = [round(r["step_ms"], 2) for r in ok]
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    info = {**h.machine_info(), "load_avg_1min": h.load_average()}
    print(f"DPO and reward-model trainers, rlhf_fast vs TRL, CPU; machine: {info['device']}, git {info['git_rev']}")
    if info["load_avg_1min"] > 0.5:
        print(f"warning: load average {info['load_avg_1min']:.2f}; timings share the CPU with other jobs")
    rows = []
    for trainer in args.trainers:
        for model in args.models:
            setting = replace(MODELS[model], **overrides(model, args))
            runs: dict[str, list[dict]] = {p: [] for p in args.providers}
            for _ in range(args.repeats):
                for provider in args.providers:  # the pair back to back, so both see the same load
                    spec = {"trainer": trainer, "model": model, "provider": provider, "seed": args.seed,
                            "overrides": overrides(model, args), "threads": args.threads}  # fmt: skip
                    load = h.load_average()
                    result = h.run_isolated("benchmarks.trainers_vs_trl:run_case", spec, timeout=3600)
                    runs[provider].append({**spec, **info, "setting": asdict(setting), "load_avg_1min": load,
                                           **result})  # fmt: skip
                    r = runs[provider][-1]
                    summary = f"{r['step_ms']:.1f} ms/step" if r["status"] == "ok" else f"{r['status']}: {r['detail']}"
                    print(f"  {trainer:<4} {model:<6} {provider:<18} {summary} (load {load:.1f})", flush=True)
            rows += [best_of(runs[p]) for p in args.providers]
    _ratios(rows)

    print()
    print(h.format_table(rows, COLUMNS))
    print(f"step ms: median wall time between optimizer-step ends, steps {WARMUP_STEPS + 1}.. (best of "
          f"{args.repeats} run(s)); peak step: above the RSS after step 1; peak total: above the RSS with model and "
          "data loaded; eval: one judge for every provider on the held-out pairs (DPO: loss and reward accuracy, "
          "RM: pairwise accuracy)")  # fmt: skip
    for row in rows:
        if row.get("status") == "ok" and row.get("token_mismatches"):
            print(f"{row['trainer']} {row['model']}: {row['token_mismatches']} sequences tokenized differently by TRL")
        if row.get("status") != "ok":
            print(f"{row['trainer']} {row['model']} {row['provider']}: {row.get('detail')}")
    return finish(rows, args.out, "trainers-vs-trl")


def finish(rows: list[dict], out: str | None, stem: str) -> int:
    """Write ``rows`` as ``out/<stem>-<time>.csv/.json`` (when ``out`` is given); the exit status: 1 when a
    run errored or its first loss is not finite, else 0. Shared with :mod:`benchmarks.grpo_vs_trl`."""
    if out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in h.write_rows(rows, out, f"{stem}-{stamp}"):
            print(f"wrote {path}")
    return 1 if any(r.get("status") == "ERROR" or (isinstance(r.get("loss_first"), float)
                    and not math.isfinite(r["loss_first"])) for r in rows) else 0  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
