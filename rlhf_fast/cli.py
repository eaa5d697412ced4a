"""The ``rlhf-fast`` command line: train from a YAML file, redraw a run's curves, run the offline demo.

::

    rlhf-fast sft --config run.yaml [key=value ...] [--resume [DIR]]
    rlhf-fast rm  --config run.yaml [key=value ...] [--resume [DIR]]
    rlhf-fast dpo --config run.yaml [key=value ...] [--resume [DIR]]
    rlhf-fast ppo --config run.yaml [key=value ...] [--resume [DIR]]
    rlhf-fast plot RUN_DIR
    rlhf-fast demo [--out DIR] [--seed N] [--quick]

The YAML file (a mapping)::

    # trainer fields (SFTConfig / RewardConfig / DPOConfig / PPOConfig) at the top level, or under `trainer:`
    output_dir: runs/sft        # the run directory
    lr: 3.0e-4
    max_steps: 200
    model:                      # a local transformers checkpoint ...
      path: checkpoints/base    #   read with from_pretrained, never from a model hub
      trust_remote_code: false  #   off unless set
    # ... or a tiny model built from a config with random weights (rlhf_fast.demo.tiny_model's arguments):
    # model: {kind: llama, hidden_size: 64, layers: 2, heads: 4, max_positions: 64}
    tokenizer: demo             # rlhf_fast.demo's offline tokenizer, or {path: DIR[, trust_remote_code: true]}
    train_data: data/train.jsonl  # ppo: prompts, {prompt} or {messages} rows
    eval_data: data/eval.jsonl  # optional (ppo: held-out prompts)
    ref_model: {path: DIR}      # dpo and ppo, optional (same forms as model:); default: a frozen copy of model
    # ppo only:
    reward_model: {path: DIR}   # a reward model: a RewardTrainer checkpoint or a sequence classifier ...
    # reward: demo_true_reward  # ... or a named reward function on the decoded texts (exactly one of the two)
    true_reward: demo_true_reward  # optional: a reward function reported beside the score (true_reward metric)
    value_model: {path: DIR}    # optional: the critic's initialisation (gae); default: a copy of reward_model
    ptx_data: data/sft.jsonl    # optional: SFT rows for PPO-ptx (with ptx_coef > 0)

``key=value`` arguments override the file; dotted keys reach into sections (``model.kind=gpt2``,
``trainer.lr=1e-4`` or just ``lr=1e-4``) and values are read as YAML (``bf16=true``,
``betas=[0.9,0.95]``). ``reward_model`` and ``value_model`` are models with a scalar head (a tiny
one is built by :func:`rlhf_fast.demo.tiny_reward_model`). A tiny model takes ``vocab_size`` and the
token ids from the tokenizer and ``seed`` from the trainer's seed unless they are given. Relative
paths are relative to the current directory.

Everything is checked before training starts: unknown keys (in any section), bad values, missing
files, missing dataset columns (the trainer tokenizes its data when it is built). A bad run prints
one ``rlhf-fast <command>: error: ...`` line and exits with status 2.

The run directory (``output_dir``) gets ``config.yaml`` (the resolved configuration: every trainer
field, absolute paths; ``--resume RUN_DIR`` alone reads it back), ``metrics.jsonl``,
``checkpoints/step-N/`` and, at the end, ``plots/*.png``. ``--resume`` continues from the latest
checkpoint of ``output_dir`` (a fresh start when there is none); ``--resume DIR`` from the
checkpoint ``DIR`` or the latest one of the run directory ``DIR`` (a ``key=value`` right after
``--resume`` is an override, not a ``DIR``). Ctrl-C saves a checkpoint first.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "rlhf-fast"
SECTIONS = ("model", "tokenizer", "train_data", "eval_data")  # read by every command
MODEL_SECTIONS = ("ref_model", "reward_model", "value_model")
SCALAR_SECTIONS = ("reward_model", "value_model")  # models with a scalar head
REWARD_SECTIONS = ("reward", "true_reward")
# reward functions a run can name: texts -> one float each
REWARD_FUNCTIONS = {"demo_true_reward": ("rlhf_fast.demo.sentiment", "true_rewards")}
CONFIG_FILE = "config.yaml"


class ConfigError(ValueError):
    """A bad run configuration; the message names the key."""


@dataclass(frozen=True)
class Command:
    """A training subcommand: where its config and trainer classes live (imported only when run)."""

    module: str
    config_class: str
    trainer_class: str
    reward_model: bool = False  # the model is a backbone with a scalar head
    sections: tuple[str, ...] = ()  # optional sections beyond SECTIONS
    eval_argument: str | None = None  # the trainer's keyword for eval_data; None: its fourth argument

    def classes(self) -> tuple[type, type]:
        module = importlib.import_module(self.module)
        return getattr(module, self.config_class), getattr(module, self.trainer_class)


TRAINERS: dict[str, Command] = {
    "sft": Command("rlhf_fast.trainers.sft", "SFTConfig", "SFTTrainer"),
    "rm": Command("rlhf_fast.trainers.reward", "RewardConfig", "RewardTrainer", reward_model=True),
    "dpo": Command("rlhf_fast.trainers.dpo", "DPOConfig", "DPOTrainer", sections=("ref_model",)),
    "ppo": Command("rlhf_fast.trainers.ppo", "PPOConfig", "PPOTrainer", eval_argument="eval_prompts",
                   sections=("ref_model", "reward_model", "reward", "true_reward", "value_model", "ptx_data")),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The run configuration: YAML + overrides -> trainer config and sections
# ----------------------------------------------------------------------------------------------


def _unknown(key: str, where: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint}; known: {', '.join(known)}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of a YAML file (an empty file is an empty mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys, got a {type(data).__name__}")
    return data


def flatten_trainer_section(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with the fields of a ``trainer:`` mapping moved to the top level (a field given in
    both places is an error)."""
    out = dict(raw)
    section = out.pop("trainer", None)
    if section is None:
        return out
    if not isinstance(section, Mapping):
        raise ConfigError(f"'trainer' must be a mapping of trainer fields, got {section!r}")
    for key, value in section.items():
        if key in out:
            raise ConfigError(f"{key!r} is given both at the top level and under 'trainer'")
        out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` (flattened, see :func:`flatten_trainer_section`) with each ``dotted.key=value`` set;
    values are parsed as YAML. ``trainer.x`` is the top-level ``x``."""
    import yaml

    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like key=value or section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        parts = key.split(".")
        if parts[0] == "trainer":
            parts = parts[1:]
            if not parts:
                raise ConfigError(f"override {item!r}: name a trainer field, as in trainer.lr=1e-4")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {where!r} is {child!r}, not a mapping with keys")
            node = child
        node[parts[-1]] = value
    return out


@dataclass
class RunSpec:
    """A checked run: the trainer config and the sections that say what to build."""

    config: Any  # the trainer's config dataclass
    model: dict[str, Any]
    tokenizer: str | dict[str, Any]
    train_data: str
    eval_data: str | None
    extras: dict[str, Any]  # the command's further sections that are set (Command.sections), checked

    def resolved(self) -> dict[str, Any]:
        """The whole configuration as written to ``config.yaml`` (every trainer field, absolute paths)."""
        out = self.config.to_dict()
        out["output_dir"] = str(Path(self.config.output_dir).resolve())
        out.update(model=self.model, tokenizer=self.tokenizer, train_data=self.train_data, eval_data=self.eval_data)
        out.update(self.extras)
        return out


def _model_builder(scalar: bool):
    from rlhf_fast.demo import tiny_model, tiny_reward_model

    return tiny_reward_model if scalar else tiny_model


def _check_model_section(value: Any, name: str, scalar: bool) -> dict[str, Any]:
    """``value`` as ``{path, trust_remote_code}`` or ``{kind, **builder kwargs}``; paths made absolute."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{name!r} must be a mapping: {{path: DIR}} or {{kind: llama|gpt2|qwen2, ...}}, got {value!r}"
        )
    spec = dict(value)
    if ("path" in spec) == ("kind" in spec):
        raise ConfigError(f"{name!r} needs exactly one of 'path' (a local checkpoint) or 'kind' (a tiny model)")
    if "path" in spec:
        for key in spec:
            if key not in ("path", "trust_remote_code"):
                raise _unknown(key, name, ("path", "trust_remote_code"))
        if not isinstance(spec["path"], str) or not Path(spec["path"]).is_dir():
            raise ConfigError(f"{name}.path must be a local model directory, got {spec['path']!r}")
        spec["path"] = str(Path(spec["path"]).resolve())
        trust = spec.setdefault("trust_remote_code", False)
        if not isinstance(trust, bool):
            raise ConfigError(f"{name}.trust_remote_code must be true or false, got {trust!r}")
        return spec
    from rlhf_fast.demo.models import KINDS

    known = list(inspect.signature(_model_builder(scalar)).parameters)
    for key in spec:
        if key not in known:
            raise _unknown(key, name, known)
    if spec["kind"] not in KINDS:
        raise ConfigError(f"{name}.kind must be one of {', '.join(KINDS)}, got {spec['kind']!r}")
    return spec


def _check_tokenizer_section(value: Any) -> str | dict[str, Any]:
    if value == "demo":
        return value
    if not isinstance(value, Mapping) or "path" not in value:
        raise ConfigError(f"'tokenizer' must be demo or {{path: DIR}}, got {value!r}")
    for key in value:
        if key not in ("path", "trust_remote_code"):
            raise _unknown(key, "tokenizer", ("path", "trust_remote_code"))
    if not isinstance(value["path"], str) or not Path(value["path"]).is_dir():
        raise ConfigError(f"tokenizer.path must be a local tokenizer directory, got {value['path']!r}")
    trust = value.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise ConfigError(f"tokenizer.trust_remote_code must be true or false, got {trust!r}")
    return {"path": str(Path(value["path"]).resolve()), "trust_remote_code": trust}


def _check_reward_name(value: Any, name: str) -> str:
    if value not in REWARD_FUNCTIONS:
        raise ConfigError(f"{name!r} must name a reward function ({', '.join(REWARD_FUNCTIONS)}), got {value!r}")
    return value


def reward_function(name: str):
    """The reward function ``texts -> list[float]`` that a ``reward``/``true_reward`` section names."""
    module, attr = REWARD_FUNCTIONS[name]
    return getattr(importlib.import_module(module), attr)


def _check_data_path(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name!r} must be the path of a JSONL file, got {value!r}")
    if not Path(value).is_file():
        raise ConfigError(f"{name}: no such JSONL file: {value!r}")
    return str(Path(value).resolve())


def build_spec(command_name: str, raw: Mapping[str, Any]) -> RunSpec:
    """Check a flattened run configuration for ``command_name``: trainer fields through the config
    class (unknown keys, bounds, types), then every section. Raises :class:`ConfigError` (or the
    config class's ``ValueError``/``TypeError``) naming the key."""
    command = TRAINERS[command_name]
    config_class, _ = command.classes()
    sections = [*SECTIONS, *command.sections]
    fields = {k: v for k, v in raw.items() if k not in sections}
    known_fields = list(config_class.__dataclass_fields__)
    for key in fields:
        if key not in known_fields:
            raise _unknown(str(key), f"the {command_name} configuration", [*sections, *known_fields])
    config = config_class.from_dict(fields)
    for required in ("model", "tokenizer", "train_data"):
        if raw.get(required) is None:
            raise ConfigError(f"the configuration has no {required!r} (see `{PROG} {command_name} --help`)")
    eval_data = raw.get("eval_data")
    extras: dict[str, Any] = {}
    for name in command.sections:
        value = raw.get(name)
        if value is None:
            continue
        if name in MODEL_SECTIONS:
            extras[name] = _check_model_section(value, name, name in SCALAR_SECTIONS)
        elif name in REWARD_SECTIONS:
            extras[name] = _check_reward_name(value, name)
        else:
            extras[name] = _check_data_path(value, name)
    if "reward" in command.sections and ("reward" in extras) == ("reward_model" in extras):
        raise ConfigError(
            f"the {command_name} configuration needs exactly one of 'reward_model' ({{path: DIR}}, a reward model "
            f"checkpoint) and 'reward' ({', '.join(REWARD_FUNCTIONS)})"
        )
    return RunSpec(
        config=config,
        model=_check_model_section(raw["model"], "model", command.reward_model),
        tokenizer=_check_tokenizer_section(raw["tokenizer"]),
        train_data=_check_data_path(raw["train_data"], "train_data"),
        eval_data=None if eval_data is None else _check_data_path(eval_data, "eval_data"),
        extras=extras,
    )


# ----------------------------------------------------------------------------------------------
# Building the objects
# ----------------------------------------------------------------------------------------------


def build_tokenizer_from(spec: str | Mapping[str, Any]):
    """The tokenizer of a checked ``tokenizer`` section (local files only)."""
    if spec == "demo":
        from rlhf_fast.demo import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        spec["path"], local_files_only=True, trust_remote_code=spec["trust_remote_code"]
    )


def build_model_from(spec: Mapping[str, Any], tokenizer, scalar: bool, seed: int):
    """The model of a checked model section: a local checkpoint (local files only, ``trust_remote_code``
    as given) or a tiny model sized to the tokenizer, seeded by ``seed`` unless the section has its own.
    ``scalar``: a model with a scalar head (a sequence classifier with ``num_labels=1``, or the
    :class:`~rlhf_fast.trainers.reward.ValueHeadModel` of a ``RewardTrainer`` checkpoint that has one),
    else a causal LM."""
    if "path" in spec:
        import transformers

        from rlhf_fast.trainers.reward import BACKBONE_DIR, ValueHeadModel

        if scalar and (Path(spec["path"]) / BACKBONE_DIR).is_dir():
            return ValueHeadModel.from_checkpoint(spec["path"])
        auto = transformers.AutoModelForSequenceClassification if scalar else transformers.AutoModelForCausalLM
        extra = {"num_labels": 1} if scalar else {}
        return auto.from_pretrained(spec["path"], local_files_only=True, trust_remote_code=spec["trust_remote_code"],
                                    **extra)  # fmt: skip
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("seed", seed)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if kwargs.get(name) is None and getattr(tokenizer, name, None) is not None:
            kwargs[name] = getattr(tokenizer, name)
        if kwargs.get(name) is None:
            kwargs.pop(name, None)
    try:
        return _model_builder(scalar)(spec["kind"], **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------


def _resume_target(resume: str | bool | None) -> tuple[Path | bool | None, Path | None]:
    """(what TrainLoop.train gets, the run directory whose config.yaml stands in for --config)."""
    from rlhf_fast.trainers.loop import CHECKPOINT_DIR, latest_checkpoint

    if resume is None or resume is True:
        return resume, None
    path = Path(resume)
    if (path / "trainer_state.json").is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else None
        return path, run_dir
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise ConfigError(f"--resume: {str(path)!r} is neither a checkpoint nor a run directory with one")
        return checkpoint, path
    raise ConfigError(f"--resume: no such checkpoint or run directory: {str(path)!r}")


def _trainer_arguments(spec: RunSpec, tokenizer) -> dict[str, Any]:
    """The trainer's keyword arguments from the run's further sections (models built, rewards looked up)."""
    kwargs: dict[str, Any] = {}
    for name, value in spec.extras.items():
        if name in MODEL_SECTIONS:
            kwargs[name] = build_model_from(value, tokenizer, name in SCALAR_SECTIONS, spec.config.seed)
        elif name == "reward":
            kwargs["reward_fn"] = reward_function(value)
        elif name == "true_reward":
            kwargs["true_reward_fn"] = reward_function(value)
        else:
            kwargs[name] = value
    return kwargs


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


def run_train(command_name: str, config_path: str | None, overrides: Sequence[str], resume: str | bool | None) -> int:
    """Check the run, build model, tokenizer and trainer, train, write config.yaml and the plots."""
    from rlhf_fast.trainers.loop import latest_checkpoint
    from rlhf_fast.trainers.plot import plot_run

    command = TRAINERS[command_name]
    try:
        resume_from, resume_run = _resume_target(resume)
        if config_path is None:
            if resume_run is None or not (resume_run / CONFIG_FILE).is_file():
                raise ConfigError("--config is required (or --resume RUN_DIR, whose config.yaml is used)")
            config_path = str(resume_run / CONFIG_FILE)
        raw = apply_overrides(flatten_trainer_section(load_yaml(config_path)), overrides)
        spec = build_spec(command_name, raw)
        tokenizer = build_tokenizer_from(spec.tokenizer)
        model = build_model_from(spec.model, tokenizer, command.reward_model, spec.config.seed)
        kwargs = _trainer_arguments(spec, tokenizer)
        _, trainer_class = command.classes()
        if command.eval_argument is None:
            trainer = trainer_class(model, tokenizer, spec.train_data, spec.eval_data, config=spec.config, **kwargs)
        else:
            kwargs[command.eval_argument] = spec.eval_data
            trainer = trainer_class(model, tokenizer, spec.train_data, config=spec.config, **kwargs)
    except (ValueError, TypeError, OSError) as e:  # OSError: a local checkpoint that from_pretrained cannot read
        return _fail(command_name, str(e))
    import yaml

    run_dir = Path(spec.config.output_dir)
    main_process = trainer.loop.dist.is_main  # under a launcher, one process writes and reports
    run_dir.mkdir(parents=True, exist_ok=True)
    if main_process:
        (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(spec.resolved(), sort_keys=False), encoding="utf-8")
    if resume_from is True and latest_checkpoint(run_dir) is None:
        print(f"{PROG} {command_name}: no checkpoint in {run_dir} yet: starting fresh", file=sys.stderr)
    try:
        last = trainer.train(resume_from)
    except KeyboardInterrupt:
        if main_process and (run_dir / "metrics.jsonl").is_file():
            plot_run(run_dir)
        print(f"{PROG} {command_name}: interrupted; continue with --resume {run_dir}", file=sys.stderr)
        return 130
    if not main_process:
        return 0
    plots = plot_run(run_dir)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
    print(f"{PROG} {command_name}: done in {run_dir}: {summary}")
    print(f"{PROG} {command_name}: {len(plots)} plots in {run_dir / 'plots'}")
    return 0


def run_plot(run_dir: str) -> int:
    from rlhf_fast.trainers.plot import plot_run

    try:
        paths = plot_run(run_dir)
    except (ValueError, FileNotFoundError) as e:
        return _fail("plot", str(e))
    for path in paths:
        print(path)
    return 0


def run_demo(out: str, seed: int, quick: bool, threads: int) -> int:
    from rlhf_fast.demo.pipeline import run_pipeline

    try:
        run_pipeline(out, seed=seed, quick=quick, threads=threads)
    except (ValueError, TypeError) as e:
        return _fail("demo", str(e))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train with rlhf_fast's fused losses; redraw curves; run the "
                                "offline demo.")  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True, metavar="{sft,rm,dpo,ppo,plot,demo,bench}")
    helps = {"sft": "supervised fine-tuning", "rm": "train a reward model on preference pairs or rankings",
             "dpo": "direct preference optimization",
             "ppo": "RL against a reward model: PPO with a critic, or the critic-free GRPO/RLOO/REINFORCE"}  # fmt: skip
    for name, help_text in helps.items():
        s = sub.add_parser(name, help=help_text, description=f"{help_text}. The YAML schema:\n{__doc__.split('::')[2]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        s.add_argument("--config", help="the run's YAML file")
        s.add_argument(
            "--resume",
            nargs="?",
            const=True,
            default=None,
            metavar="DIR",
            help="continue from the latest checkpoint of output_dir, or of the run or checkpoint DIR",
        )
        s.add_argument("overrides", nargs="*", metavar="key=value", help="override the YAML (dotted keys)")
    plot = sub.add_parser("plot", help="redraw a run's curves to RUN_DIR/plots/*.png")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    demo = sub.add_parser("demo", help="controlled sentiment generation in miniature: SFT, RM, PPO, GRPO, DPO")
    demo.add_argument("--out", default="runs/demo", help="directory of the demo's runs, data and table")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a much smaller run (for tests)")
    demo.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the models are tiny)")
    # listed for --help only: main() hands `bench ...` to the benchmark runner's own parser
    sub.add_parser("bench", help="benchmark every op against its peers (`rlhf-fast bench --help`); --ptx: GPU report")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from rlhf_fast.bench.run import main as bench_main

        return bench_main(argv[1:])
    args = parser().parse_args(argv)
    if args.command == "plot":
        return run_plot(args.run_dir)
    if args.command == "demo":
        return run_demo(args.out, args.seed, args.quick, args.threads)
    resume = args.resume
    # `--resume lr=1e-4` : argparse hands the override to --resume's optional DIR
    if isinstance(resume, str) and "=" in resume and not os.path.exists(resume):
        args.overrides.insert(0, resume)
        resume = True
    return run_train(args.command, args.config, args.overrides, resume)
