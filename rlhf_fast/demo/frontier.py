"""The demo's reward-vs-KL picture: policies read back from their runs' checkpoints, and the plot of
each method's (KL to the SFT model, held-out true reward) over its training, the frontier plot of the
DPO paper (Rafailov et al., 2023, figure 2) in miniature."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

POLICY_PREFIX = "policy."  # a PPOTrainer checkpoint holds the policy and the critic in one file


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every complete checkpoint of a run directory, by step."""
    from rlhf_fast.trainers.loop import CHECKPOINT_DIR

    found = []
    for path in (Path(run_dir) / CHECKPOINT_DIR).glob("step-*"):
        name = path.name.removeprefix("step-")
        if name.isdigit() and (path / "trainer_state.json").is_file():  # not a half-written ``.tmp``
            found.append((int(name), path))
    return sorted(found)


def load_policy(checkpoint: str | Path, like: nn.Module) -> nn.Module:
    """A copy of ``like`` (the same architecture) with the causal LM weights of ``checkpoint``: the
    model of an SFT/DPO checkpoint, or the ``policy.*`` part of a PPO checkpoint."""
    from safetensors.torch import load_file

    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    if any(key.startswith(POLICY_PREFIX) for key in state):
        state = {key.removeprefix(POLICY_PREFIX): t for key, t in state.items() if key.startswith(POLICY_PREFIX)}
    model = copy.deepcopy(like)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # safetensors keeps one name of each shared tensor: a tied head may be missing, nothing else
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    allowed = {name for name, p in model.named_parameters(remove_duplicate=False) if tied and p is head.weight}
    if unexpected or set(missing) - allowed:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} does not hold this policy: missing {sorted(set(missing) - allowed)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model


def draw_frontier(path: str | Path, curves: Mapping[str, Sequence[Mapping[str, float]]], sft_reward: float) -> Path:
    """Plot each method's points ``{"kl_to_sft", "true_reward", "step"}`` (in training order, joined by
    a line that starts at the SFT model, the last one enlarged) and the SFT model itself at KL 0;
    returns the PNG's path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in curves.items():
        xs = [0.0] + [p["kl_to_sft"] for p in points]
        ys = [sft_reward] + [p["true_reward"] for p in points]
        (line,) = ax.plot(xs, ys, marker="o", markersize=4, label=f"{name} (to step {points[-1]['step']})")
        # the final policy, the one of the table
        ax.plot(xs[-1:], ys[-1:], marker="o", markersize=9, markeredgecolor="black", color=line.get_color())
    ax.plot([0.0], [sft_reward], marker="*", markersize=12, color="black", linestyle="none", label="SFT")
    ax.set_xlabel("KL to the SFT model (nats per sample)")
    ax.set_ylabel("true reward (held-out prompts)")
    ax.set_title("reward vs KL over training: each point is a checkpoint", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")  # every curve starts at the bottom left and ends at the top
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path
