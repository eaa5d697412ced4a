"""Helpers shared by the trainer tests: reading a run's metrics, snapshotting parameters, and the
1 x 8 vs 4 x 2 accumulation check."""

import json

import torch


def metrics(run_dir) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl``, in order."""
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def train_losses(run_dir) -> dict[int, float]:
    """``{step: loss}`` of the training records."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def params(model) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# adam_eps = 1 makes the first AdamW update lr * g / (|g| + 1), a smooth function of the gradient (eps = 1e-8
# would make it lr * sign(g) and flip on rounding noise), so equal parameters after it mean equal gradients
ACCUMULATION_STEP = dict(max_steps=1, lr=0.1, adam_eps=1.0, max_grad_norm=None, shuffle=False)


def assert_accumulation_matches(make_trainer, start: dict[str, torch.Tensor]) -> None:
    """One update over 8 examples as 1 micro-batch of 8 and as 4 of 2 gives the same parameters.

    ``make_trainer(micro_batch_size, grad_accum_steps)`` builds a fresh trainer from the weights ``start``
    snapshots, configured with :data:`ACCUMULATION_STEP`.
    """
    after = {}
    for mbs, accum in ((8, 1), (2, 4)):
        trainer = make_trainer(mbs, accum)
        trainer.train()
        after[mbs] = params(trainer.model)
    assert max((after[8][k] - start[k]).abs().max().item() for k in start) > 1e-3
    for k in start:
        torch.testing.assert_close(after[2][k], after[8][k], rtol=0, atol=1e-6, msg=k)
