"""rlhf_fast's GRPO (``PPOTrainer`` with ``advantage_estimator="grpo"``) against TRL's ``GRPOTrainer`` (CPU).

    python -m benchmarks.grpo_vs_trl                  # both providers, the demo model, 50 iterations
    python -m benchmarks.grpo_vs_trl --quick          # 3 iterations: a smoke test

The sibling of :mod:`benchmarks.trainers_vs_trl` (DPO and reward model), with its measuring machinery
(a fresh process per run, step-end clock, resident-memory peaks). The model is the demo's Llama (hidden 64,
2 layers, the demo tokenizer's vocabulary) built from a config with random weights from the same seed for
both providers; the prompts are the demo's review openings (``make_prompts``), the reward is the demo's
true lexicon reward (``true_reward``) of prompt + decoded completion, called by both trainers through the
same wrapper, which also records the mean reward of every rollout.

What is matched: ``prompts`` prompts per iteration, ``k`` samples each (TRL: ``per_device_train_batch_size
= prompts * k``, ``num_generations = k``); plain sampling (temperature, top-p 1, no top-k) of at most
``max_new_tokens`` tokens, stopping at EOS; one optimizer step per iteration on the whole rollout, so
the update is on-policy (TRL: ``num_iterations=1``, ``gradient_accumulation_steps=1``; ours: ``ppo_epochs=1``,
one mini-batch of all samples); advantages ``(r - group mean) / group std`` (both: unbiased std);
the clipped surrogate with ``epsilon = 0.2``; the KL to the reference (a frozen copy of the initial
model) as ``beta`` times the per-token k3 estimator added to the loss (TRL's only form; ours
``kl_penalty="loss"``, ``kl_estimator="k3"``, ``kl_coef = beta``; our default puts ``-beta * k1`` in the
reward instead); the loss averaged over all completion tokens of the step (TRL's ``loss_type="dapo"``,
our ``loss_agg="token-mean"``); AdamW (lr, no weight decay), cosine decay to 0 without warm-up,
gradient clipping at 1.0, float32, no gradient checkpointing, prompts in order (no shuffling), a final
checkpoint.

What is not: the random streams (each trainer samples with its own generator, so the rollouts and the
reward curves differ run to run; compare the trend, not step-by-step values); the std epsilon (TRL
1e-4, ours 1e-6; only a group of near-identical rewards tells them apart); TRL skips the old-policy
log-prob pass when on-policy (its ratio is ``exp(logp - logp.detach())``), ours always computes the
rollout log-probs and entropies (one more no-grad forward of the policy per iteration, which also
feeds the entropy metric); TRL computes the entropy of every completion token in the loss's forward
for its metrics, ours in the rollout; TRL's optimizer is ``adamw_torch_fused`` (ours ``torch.optim.AdamW``);
TRL decodes the completion alone and the wrapper joins ``prompt + " " + completion``, ours decodes prompt
and response together (the lexicon reward splits on words, so both give the same value).

Measured per run: the wall time between successive ends of iterations (rollout: generation, reward,
log-probs of policy and reference; then the update), its median over the iterations after the first
``WARMUP_STEPS``; peak resident memory (as in :mod:`benchmarks.trainers_vs_trl`); the mean reward of
the first and the last ``TAIL`` rollouts; and the held-out true reward: one sample per held-out prompt
(next seed) from each final model under the same seeded sampler, scored by the true reward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

from benchmarks import _harness as h
from benchmarks.trainers_vs_trl import WARMUP_STEPS, Meter, best_of, finish

PROVIDERS = ("rlhf_fast", "trl", "rlhf_fast-unfused", "trl-adamw_torch")
DEFAULT_PROVIDERS = ("rlhf_fast", "trl")
TAIL = 5  # iterations averaged for "reward last" (and "reward first")


@dataclass(frozen=True)
class GRPOSetting:
    """The GRPO run (the same for every provider)."""

    prompts: int = 8  # per iteration
    k: int = 8  # samples per prompt (num_generations)
    max_new_tokens: int = 24
    temperature: float = 1.0
    lr: float = 1e-3
    beta: float = 0.04
    iterations: int = 50
    n_eval: int = 128  # held-out prompts, one sample each
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    max_positions: int = 64
    max_prompt_tokens: int = 8  # BOS + a 2-4 word opening fits

    @property
    def samples(self) -> int:
        return self.prompts * self.k


QUICK = {"iterations": 3, "n_eval": 8}


class RewardRecorder:
    """The reward function of both trainers: ``true_reward`` of each text, and the mean of every call kept
    in ``means`` (one call per rollout)."""

    def __init__(self):
        self.means: list[float] = []

    def _record(self, texts: list[str]) -> list[float]:
        from rlhf_fast.demo import true_rewards

        values = true_rewards(texts)
        self.means.append(sum(values) / len(values))
        return values

    def ours(self, texts: list[str]) -> list[float]:
        """Our ``reward_fn``: ``texts`` are the decoded prompt + response."""
        return self._record(texts)

    def trl(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        """TRL's reward function signature: prompts and completions apart."""
        return self._record([p + " " + c for p, c in zip(prompts, completions, strict=True)])


def build_model(setting: GRPOSetting, tokenizer, seed: int):
    """The float32 demo Llama with random weights from ``seed``."""
    from rlhf_fast.demo import tiny_model

    return tiny_model("llama", vocab_size=len(tokenizer), seed=seed, hidden_size=setting.hidden_size,
                      layers=setting.layers, heads=setting.heads, max_positions=setting.max_positions)  # fmt: skip


def held_out_true_reward(model, tokenizer, prompts: list[str], setting: GRPOSetting, seed: int) -> float:
    """Mean true reward of one sample per prompt (temperature 1, torch seeded with ``seed`` first)."""
    import torch

    from rlhf_fast.demo import true_rewards
    from rlhf_fast.demo.pipeline import sample_completions

    torch.manual_seed(seed)
    tokens = sample_completions(model, tokenizer, prompts, max_new_tokens=setting.max_new_tokens)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    rewards = true_rewards([p + " " + t for p, t in zip(prompts, texts, strict=True)])
    return sum(rewards) / len(rewards)


def _ours(model, tokenizer, prompts: list[str], setting: GRPOSetting, spec: dict, out_dir: str, meter: Meter,
          reward: RewardRecorder):  # fmt: skip
    from rlhf_fast.trainers import PPOConfig, PPOTrainer

    config = PPOConfig(
        output_dir=out_dir, seed=spec["seed"], device="cpu", lr=setting.lr, weight_decay=0.0, warmup_steps=0,
        min_lr_ratio=0.0, max_steps=setting.iterations, micro_batch_size=setting.samples, grad_accum_steps=1,
        max_grad_norm=1.0, shuffle=False, bf16=False, fused=spec["provider"] != "rlhf_fast-unfused",
        max_length=setting.max_prompt_tokens + setting.max_new_tokens, max_prompt_length=setting.max_prompt_tokens,
        log_every=setting.iterations, save_every=0, progress_bar=False, advantage_estimator="grpo",
        prompts_per_iteration=setting.prompts, num_generations=setting.k, max_new_tokens=setting.max_new_tokens,
        temperature=setting.temperature, top_p=1.0, kl_coef=setting.beta, kl_penalty="loss", kl_estimator="k3",
        scale_by_std=True, ppo_epochs=1, clip_eps=0.2, loss_agg="token-mean",
    )  # fmt: skip
    run = PPOTrainer(model, tokenizer, prompts, reward_fn=reward.ours, config=config)
    inner = run._iteration

    def timed_iteration():
        record = inner()
        meter.losses.append(record["loss"])
        meter.step_end()
        return record

    run._iteration = timed_iteration
    return run


def _trl(model, tokenizer, prompts: list[str], setting: GRPOSetting, spec: dict, out_dir: str, meter: Meter,
         reward: RewardRecorder):  # fmt: skip
    import datasets
    import trl
    from transformers import TrainerCallback

    datasets.disable_progress_bars()
    args = dict(
        output_dir=out_dir, seed=spec["seed"], data_seed=spec["seed"], use_cpu=True, report_to="none", bf16=False,
        fp16=False, gradient_checkpointing=False, learning_rate=setting.lr, weight_decay=0.0, warmup_steps=0,
        lr_scheduler_type="cosine", max_steps=setting.iterations, per_device_train_batch_size=setting.samples,
        gradient_accumulation_steps=1, max_grad_norm=1.0, num_generations=setting.k,
        max_completion_length=setting.max_new_tokens, temperature=setting.temperature, top_p=1.0, top_k=0,
        beta=setting.beta, epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="group",
        shuffle_dataset=False, disable_dropout=True, logging_steps=setting.iterations, save_strategy="steps",
        save_steps=setting.iterations, disable_tqdm=True, eval_strategy="no",
    )  # fmt: skip
    if spec["provider"] == "trl-adamw_torch":
        args["optim"] = "adamw_torch"

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

    data = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    # TRL builds its reference from the policy config's ``_name_or_path``: the initial weights saved there
    if not model.config._name_or_path:
        raise ValueError("model.config._name_or_path must name the saved initial model (TRL loads its reference there)")
    run = trl.GRPOTrainer(model, reward_funcs=reward.trl, args=trl.GRPOConfig(**args), train_dataset=data,
                          processing_class=tokenizer, callbacks=[StepEnd()])  # fmt: skip
    inner = run.training_step

    def step_with_loss(*a, **kw):
        loss = inner(*a, **kw)
        meter.losses.append(float(loss))
        return loss

    run.training_step = step_with_loss
    return run


def run_case(spec: dict) -> dict:
    """One provider's GRPO run; the target of ``_harness.run_isolated`` (or called in-process).

    ``spec``: ``provider`` (``PROVIDERS``), ``seed``, optional ``overrides`` of the :class:`GRPOSetting`
    fields and ``threads``."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["provider"] not in PROVIDERS:
        raise ValueError(f"spec['provider'] must be one of {PROVIDERS}, got {spec['provider']!r}")
    setting = replace(GRPOSetting(), **spec.get("overrides", {}))
    provider, seed = spec["provider"], spec["seed"]
    result = {**h.torch_info()}
    is_trl = provider.startswith("trl")
    if is_trl:
        try:
            import trl
        except ImportError as exc:
            return {**result, "status": "SKIP", "detail": f"trl is not installed ({exc})"}
        result["trl_version"] = trl.__version__
        for name in ("GRPOConfig", "GRPOTrainer"):  # trl imports these lazily: load them outside the run
            getattr(trl, name)
    else:
        from rlhf_fast.trainers import PPOTrainer  # noqa: F401  (the same: module memory outside the run)
    import transformers

    from rlhf_fast.demo import build_tokenizer, make_prompts

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    result["transformers_version"] = transformers.__version__
    tokenizer = build_tokenizer()
    prompts = make_prompts(setting.prompts * setting.iterations, seed)
    eval_prompts = make_prompts(setting.n_eval, seed + 1)
    longest = max(len(ids) for ids in tokenizer(prompts + eval_prompts)["input_ids"])
    if longest > setting.max_prompt_tokens:
        raise ValueError(f"a prompt of {longest} tokens exceeds max_prompt_tokens = {setting.max_prompt_tokens}")
    model = build_model(setting, tokenizer, seed)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["eval_true_reward_init"] = held_out_true_reward(model, tokenizer, eval_prompts, setting, seed + 2)
    model.train()

    reward = RewardRecorder()
    with tempfile.TemporaryDirectory(prefix=f"bench-grpo-{provider}-") as out_dir:
        if is_trl:  # TRL loads its reference from the policy's path: save the initial model before the clock
            model.save_pretrained(f"{out_dir}/initial")
            model.config._name_or_path = f"{out_dir}/initial"
        meter = Meter()
        t0 = time.perf_counter()
        run = (_trl if is_trl else _ours)(model, tokenizer, prompts, setting, spec, out_dir, meter, reward)
        t1 = time.perf_counter()
        run.train()
        t2 = time.perf_counter()
        result.update(meter.result(t1), init_s=t1 - t0, train_s=t2 - t1)
    tail = min(TAIL, len(reward.means))
    result.update(
        rollouts=len(reward.means), samples_per_step=setting.samples,
        reward_first=statistics.fmean(reward.means[:tail]), reward_last=statistics.fmean(reward.means[-tail:]),
        rewards=[round(r, 4) for r in reward.means],
        eval_true_reward=held_out_true_reward(run.model, tokenizer, eval_prompts, setting, seed + 2),
    )  # fmt: skip
    return {**result, "status": "ok"}


# -- the driver ------------------------------------------------------------------------------------

COLUMNS = [
    ("provider", "provider", "s"), ("status", "status", "s"), ("samples/step", "samples_per_step", "d"),
    ("steps", "steps_timed", "d"), ("step ms", "step_ms", ".1f"), ("time ours/trl", "time_ratio", ".2f"),
    ("peak total MiB", "peak_total_MiB", ".1f"), ("peak step MiB", "peak_step_MiB", ".1f"),
    ("init s", "init_s", ".1f"), ("train s", "train_s", ".1f"), ("reward first", "reward_first", ".3f"),
    ("reward last", "reward_last", ".3f"), ("held-out init", "eval_true_reward_init", ".3f"),
    ("held-out final", "eval_true_reward", ".3f"),
]  # fmt: skip


def _ratios(rows: list[dict]) -> None:
    """``time_ratio`` and ``mem_ratio`` (ours / TRL) on each of our rows."""
    peer = next((r for r in rows if r["provider"] == "trl" and r.get("status") == "ok"), None)
    for row in rows:
        if row["provider"].startswith("trl") or peer is None or row.get("status") != "ok":
            continue
        row["time_ratio"] = row["step_ms"] / peer["step_ms"]
        row["mem_ratio"] = row["peak_step_MiB"] / max(peer["peak_step_MiB"], 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grpo_vs_trl",
                                description=__doc__.split("\n\n")[0].replace("``", ""))  # fmt: skip
    p.add_argument("--providers", help=f"comma list of {', '.join(PROVIDERS)} (default: {','.join(DEFAULT_PROVIDERS)})")
    p.add_argument("--iterations", type=int, help=f"GRPO iterations (default {GRPOSetting.iterations})")
    p.add_argument("--repeats", type=int, default=1, help="runs of each provider, alternating (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each run (default 1; 0: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for the CSV and JSON rows")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['iterations']} iterations (a smoke test)")
    args = p.parse_args(argv)
    items = [x.strip() for x in args.providers.split(",") if x.strip()] if args.providers else list(DEFAULT_PROVIDERS)
    unknown = [x for x in items if x not in PROVIDERS]
    if unknown:
        p.error(f"unknown --providers {unknown}; choose from {list(PROVIDERS)}")
    args.providers = items
    if args.iterations is not None and args.iterations < 2:
        p.error(f"--iterations must be >= 2, got {args.iterations}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def overrides(args: argparse.Namespace) -> dict:
    """GRPOSetting fields changed by ``--quick`` and ``--iterations``."""
    out = dict(QUICK) if args.quick else {}
    if args.iterations is not None:
        out["iterations"] = args.iterations
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    info = {**h.machine_info(), "load_avg_1min": h.load_average()}
    setting = replace(GRPOSetting(), **overrides(args))
    print(f"GRPO, rlhf_fast vs TRL, CPU; machine: {info['device']}, git {info['git_rev']}; {setting}")
    if info["load_avg_1min"] > 0.5:
        print(f"warning: load average {info['load_avg_1min']:.2f}; timings share the CPU with other jobs")
    runs: dict[str, list[dict]] = {p: [] for p in args.providers}
    for _ in range(args.repeats):
        for provider in args.providers:  # back to back, so both see the same load
            spec = {"provider": provider, "seed": args.seed, "overrides": overrides(args), "threads": args.threads}
            load = h.load_average()
            result = h.run_isolated("benchmarks.grpo_vs_trl:run_case", spec, timeout=3600)
            runs[provider].append({**spec, **info, "trainer": "grpo", "setting": asdict(setting),
                                   "load_avg_1min": load, **result})  # fmt: skip
            r = runs[provider][-1]
            summary = f"{r['step_ms']:.1f} ms/step" if r["status"] == "ok" else f"{r['status']}: {r['detail']}"
            print(f"  grpo {provider:<18} {summary} (load {load:.1f})", flush=True)
    rows = [best_of(runs[p]) for p in args.providers]
    _ratios(rows)

    print()
    print(h.format_table(rows, COLUMNS))
    print(f"step ms: median wall time between iteration ends (rollout + one optimizer step), iterations "
          f"{WARMUP_STEPS + 1}.. (best of {args.repeats} run(s)); peak step: above the RSS after iteration 1; peak "
          f"total: above the RSS with model and prompts loaded; reward first/last: mean training reward of the "
          f"first/last {TAIL} rollouts; held-out: true reward of one sample per held-out prompt from the initial "
          "and the final model, the same seeded sampler for every provider")  # fmt: skip
    for row in rows:
        if row.get("status") != "ok":
            print(f"grpo {row['provider']}: {row.get('detail')}")
    return finish(rows, args.out, "grpo-vs-trl")


if __name__ == "__main__":
    sys.exit(main())
