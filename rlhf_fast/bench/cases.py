"""What every benchmarked op is made of: the :class:`Case` a worker builds, the :class:`Floor` of its
work, the :class:`Op` record, and the helpers the op modules share (random logits, sampled float64
checks, the provider wrappers for rlhf_fast, eager/compiled PyTorch and TRL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

LOGIT_SCALE = 3.0  # std of the random logits, about that of a trained LM head's output
CHECK_ROWS = 32
CHUNK_ROWS = 256  # rows per float64 reference chunk: 256 x 32000 x 8 B = 62.5 MiB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SEQS = 8  # sequences per batch for the sequence-shaped losses (DPO: 4 pairs)


@dataclass
class Case:
    """One case's tensors. ``leaves`` (name -> tensor that requires grad) are the inputs whose
    gradients are computed, timed and checked: ``{"logits": [N, V]}`` for the ops on logits,
    ``{"hidden": [N, H], "weight": [V, H]}`` for the fused-linear ones. ``case[name]`` is a leaf."""

    leaves: dict  # name -> torch.Tensor, requires grad
    labels: object
    extra: dict = field(default_factory=dict)  # op-specific inputs (advantages, ref log-probs...)
    grad_out: object = None  # upstream gradient of the output; None for a 0-d loss
    # whether the provider's LM head rounds 16-bit logits to their dtype, as a 16-bit GEMM does; rlhf_fast's
    # Triton kernels and its chunked path on a CPU without bf16/fp16 dot products keep them in float32
    # (``rf_head_rounds_logits``)
    head_rounds_logits: bool = True

    def __getitem__(self, name: str):
        return self.leaves[name]

    def to(self, device: str) -> Case:
        """The same case with every tensor on ``device`` (leaves stay leaves that require grad)."""
        import torch

        def move(x):
            return x.to(device) if isinstance(x, torch.Tensor) else x

        leaves = {k: v.detach().to(device).requires_grad_() for k, v in self.leaves.items()}
        extra = {k: move(v) for k, v in self.extra.items()}
        return Case(leaves, move(self.labels), extra, move(self.grad_out), self.head_rounds_logits)


MODES = ("fwd", "bwd", "full")


@dataclass(frozen=True)
class Floor:
    """The least work a case must do in each mode, and the machine rate it is done at.

    ``kind`` is ``"bytes"`` (memory-bound: moved at the copy bandwidth) or ``"flops"`` (compute-bound:
    done at the matmul rate measured in the case's dtype). ``unit(spec)`` is one logits pass in bytes or
    ``N * V * H`` FLOPs, and ``per_mode[mode]`` how many units the mode needs on its own: ``fwd`` the
    forward alone, ``bwd`` a backward after a forward that kept only ``O(tokens)`` numbers, ``full`` both
    (for the losses that write the gradient in their forward, less than the two added up: they trade
    the backward's work for the forward's, so their ``fwd``/``bwd`` ratios to the floor are read together).
    ``note`` says what the units count.
    """

    kind: str
    unit: Callable[[dict], float]
    per_mode: dict[str, float]
    note: str

    def amount(self, spec: dict) -> float:
        """Bytes or FLOPs of the case ``spec`` (``tokens``, ``vocab``, ``hidden``, ``dtype``, ``mode``)."""
        return self.per_mode[spec["mode"]] * self.unit(spec)


@dataclass(frozen=True)
class Op:
    name: str
    providers: tuple[str, ...]
    floor: Floor
    setup: Callable[[dict], Case]
    fn: Callable[[str], Callable | str]  # provider -> f(case) -> output, or the reason it cannot run
    # (case, pristine leaves by name, out, gradients by leaf name) -> {"fwd_err": ..., "<x>_grad_err": ...}
    check: Callable[[Case, dict, object, dict], dict]
    tolerance: dict = field(default_factory=dict)  # per-dtype overrides of rlhf_fast.bench.run.TOLERANCE


def logits_bytes(spec: dict) -> int:
    """Bytes of the case's ``[tokens, vocab]`` logits in its dtype (materialized or not)."""
    return spec["tokens"] * spec["vocab"] * DTYPE_BYTES[spec["dtype"]]


def logits_passes(full: int, note: str) -> Floor:
    """Logits passes: the forward reads them once; alone, the backward reads them again and writes the
    gradient; ``full`` is 3 (the two added up) or 2 when the gradient is written in the forward."""
    per_mode = {"fwd": 1, "bwd": 2, "full": full}
    return Floor("bytes", logits_bytes, per_mode, f"logits passes fwd 1, bwd 2, full {full}: {note}")


def randn_logits(spec: dict, shape):
    import torch

    torch.manual_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    return torch.randn(*shape, dtype=dtype).mul_(LOGIT_SCALE)


def sample_rows(n: int, k: int = CHECK_ROWS):
    """``min(n, k)`` row indices spread evenly over ``n`` rows: a CPU tensor (it indexes a GPU case too)."""
    import torch

    return torch.linspace(0, n - 1, min(n, k), device="cpu").round().long().unique()


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64; inf when ``a`` has a NaN."""
    import torch

    err = (a.double() - b).abs().max().item()
    return float("inf") if err != err else err / max(b.abs().max().item(), torch.finfo(torch.float64).tiny)


def rf_backend(provider: str) -> str:
    """The rlhf_fast backend an ``rf-*`` provider runs: ``rf-cpp-inplace`` -> ``cpp``."""
    return provider.removeprefix("rf-").removesuffix("-inplace")


# Peers that exist only as CUDA kernels for some ops (Liger-Kernel's chunked losses are plain PyTorch and
# run anywhere; its cross entropy and fused-linear cross entropy are Triton kernels).
GPU_ONLY = {
    ("cross_entropy", "liger"): "Liger-Kernel's cross entropy is a Triton kernel: timed on a GPU only",
    ("linear_cross_entropy", "liger"): "Liger-Kernel's fused-linear cross entropy is Triton kernels: GPU only",
}
# Peers that, like rlhf_fast's ``-inplace`` providers, write the gradient over the logits they are given.
OVERWRITES_INPUT = {("cross_entropy", "liger")}


def overwrites_input(op: str, provider: str) -> bool:
    """Whether ``provider``'s gradient of ``op`` is written over its input (so each call needs fresh inputs)."""
    return provider.endswith("-inplace") or (op, provider) in OVERWRITES_INPUT


def runs_on(provider: str, device: str, op: str | None = None) -> str | None:
    """Why ``provider`` (of ``op``) cannot run on ``device`` (``"cpu"`` or ``"cuda"``), or None when it can."""
    backend = rf_backend(provider) if provider.startswith("rf-") else None
    if backend == "cpp" and device != "cpu":
        return "the cpp backend runs on CPU tensors"
    if backend == "triton" and device != "cuda":
        return "the Triton kernels are timed on a GPU (--device cuda); TRITON_INTERPRET=1 only tests them"
    if (op, provider) in GPU_ONLY and device != "cuda":
        return GPU_ONLY[op, provider]
    return None


def rf_head_rounds_logits(provider: str, dtype, device: str) -> bool:
    """Whether an ``rf-*`` provider's fused-linear ops round a ``dtype`` head's logits to ``dtype`` on
    ``device`` (:attr:`Case.head_rounds_logits`): the Triton kernels keep ``tl.dot``'s float32
    accumulators; the chunked path rounds unless :func:`~rlhf_fast.ops.linear.widen_gemms` runs its GEMMs in
    float32."""
    import torch

    from rlhf_fast.ops.linear import widen_gemms

    return rf_backend(provider) != "triton" and not widen_gemms(dtype, torch.device(device))


def rf_provider(backend: str, call: Callable) -> Callable | str:
    import rlhf_fast as rf

    status = rf.backends()[backend]
    return call if status.available else status.detail


def peer(name: str, eager: Callable) -> Callable:
    import torch

    if name == "eager":
        return eager
    return torch.compile(eager, fullgraph=True, dynamic=False)


def chunked_token_logp(logits, labels):
    """float32 log-probs of the labels, a chunk of rows at a time (used to make realistic inputs)."""
    import torch

    rows, flat = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    out = torch.empty(flat.shape)
    for i in range(0, flat.numel(), CHUNK_ROWS):
        x = rows[i : i + CHUNK_ROWS].float()
        out[i : i + CHUNK_ROWS] = torch.log_softmax(x, -1).gather(-1, flat[i : i + CHUNK_ROWS, None]).squeeze(-1)
    return out.view(labels.shape)


def trl_function(name: str) -> Callable | str:
    """TRL's function ``name`` from ``trl.trainer.utils`` (its plain-PyTorch path off CUDA), or why not."""
    try:
        from trl.trainer import utils
    except ImportError as exc:  # optional peer: the bench extra installs it
        return f"trl cannot be imported ({exc})"
    return getattr(utils, name)


def as_batch(x):
    """``[N, V]`` logits as the ``[B, T, V]`` batch TRL's helpers are called with (a view; one sequence
    when ``N`` is not a multiple of ``SEQS``): TRL's CPU path loops over the first dimension."""
    n = x.shape[0]
    return x.view(SEQS, n // SEQS, x.shape[-1]) if n % SEQS == 0 else x[None]


def trl_token_logprobs() -> Callable | str:
    f = trl_function("selective_log_softmax")
    if isinstance(f, str):
        return f
    return lambda c: f(as_batch(c["logits"]), c.labels.view(as_batch(c["logits"]).shape[:-1])).reshape(-1)


def sampled_check(reference: Callable) -> Callable:
    """A check for a per-token op on ``[N, V]`` logits: output and logits gradient on a sample of rows,
    against ``reference(x_float64_rows, case, rows)`` (which returns the rows' outputs, shaped as
    ``out[..., rows]``), with the case's upstream gradient."""

    def check(case: Case, pristine, out, grads) -> dict:
        import torch

        rows = sample_rows(case.grad_out.shape[-1])
        x = pristine["logits"][rows].double().requires_grad_()  # x: [rows, V]
        ref = reference(x, case, rows)
        (ref_grad,) = torch.autograd.grad(ref, x, case.grad_out[..., rows].double())
        return {"fwd_err": rel_err(out.detach()[..., rows], ref), "grad_err": rel_err(grads["logits"][rows], ref_grad)}

    return check
