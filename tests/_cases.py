"""Shapes, tolerances and the reference comparison shared by the test files.

Ground truth is ``rlhf_fast.reference`` run in float64 on the very same input values (a bfloat16
input is widened exactly), with gradients from float64 autograd.

Tolerance rule. The element-wise bound on ``|ours - truth|`` is

    atol + rtol * |truth|                     (per-dtype table below, "~1e-5 relative")
  + ULPS float32 ulps of the row's largest |logit / T|, times the softmax weight for gradients
  + for bfloat16/float16 inputs: 2 * |torch - truth|   (the flash-attention rule)

* The ulp term is the float32 resolution of the inputs themselves: ``x = logits / T`` is rounded
  to float32 before any math, so even a perfect float32 kernel is off by about ``eps32 * max|x|``
  in ``lse`` and in ``sum p x``; the entropy ``lse - sum p x`` and the KL ``t/s - lse_p + lse_q``
  (the online forms of the kernel interface) inherit that as an absolute error. It matters only
  for rows with large logits (a 1e4 logit makes it ~2e-2); for the O(10) logits of the random
  cases it is ~3e-5. ULPS = 16 leaves the online forms room for their summation order (they
  showed 1-2 ulps). A gradient entry ``v`` carries the term scaled by ``|grad_output| / T`` and
  by the probability that multiplies it (``p_v``; ``P_v + Q_v`` for the KL gradient of ``q``),
  so small entries of large vocabularies are held to their own scale, and masked (``-inf``)
  entries, whose weight is 0, to ``atol`` alone.
* "torch" in the low-precision rule is PyTorch's own result on the same low-precision tensor:
  for outputs, ``rlhf_fast.reference`` applied to the bfloat16/float16 logits directly (it upcasts
  to float32, as every backend must); for gradients, which the kernels write in the logits'
  dtype, the float64 gradient rounded to that dtype (the best any kernel can return). A kernel
  that rounds its float32 result correctly is within 1x of it; 2x leaves room for the float32
  noise that moves a value across a rounding boundary. This is far tighter than a flat 1e-2.
* One exception, of the test platform rather than of a kernel: Triton's interpreter (triton 3.9,
  ``runtime/interpreter.py``) converts float32 to bfloat16 by truncating the mantissa, whatever
  the rounding mode asked for, where a GPU rounds to nearest even. For the triton backend under
  the interpreter, bfloat16 gradients may therefore be off by one bfloat16 ulp of the value (the
  error bound of a directed rounding), and that is added to their bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_fast as rf

BACKENDS = ("cpp", "triton", "torch")

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# [..., V] logits. Odd sizes on purpose: no power-of-two block divides them.
SHAPES = [(3, 47, 123), (2, 7, 5003), (2, 3, 50257)]
# Vocabulary above 65536 (Llama 3): the compiled CPU path and the fallback only.
LARGE_VOCAB_SHAPES = [(1, 3, 128256)]
# The Triton interpreter runs each program in Python: keep its cases small.
TRITON_SHAPES = [(3, 47, 123), (2, 7, 5003), (1, 2, 50257)]

SMALL_SHAPE = (2, 33, 1031)  # the feature cases (masking, temperature, ignored labels, ...)
TEMPERATURES = (0.7, 1.3)
LOGIT_SCALE = 4.0  # randn * 4: peaked enough that a few tokens dominate, as in a trained model
IGNORE_INDEX = -100

EPS32 = torch.finfo(torch.float32).eps
ULPS = 16


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    vs_torch: bool  # add 2x PyTorch's own error (low precision)


# "out": the float32 results (lse, logp, entropy, kl); "grad": the logits' gradients.
# The float32 math is the same for every input dtype, so atol/rtol are too; what low precision
# adds is rounding of the inputs (exact, no error) and of the written gradient (the 2x term).
# The gradient atol, far below any entry that matters, absorbs float32 underflow of tiny p.
TOL = {
    torch.float32: {"out": Tol(1e-6, 1e-5, False), "grad": Tol(1e-9, 1e-5, False)},
    torch.bfloat16: {"out": Tol(1e-6, 1e-5, True), "grad": Tol(1e-9, 1e-5, True)},
    torch.float16: {"out": Tol(1e-6, 1e-5, True), "grad": Tol(1e-9, 1e-5, True)},
}


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def backend_shape_params(dtypes=DTYPES):
    """pytest params (backend, dtype, shape) for the accuracy matrix, with readable ids."""
    params = []
    for backend in BACKENDS:
        shapes = TRITON_SHAPES if backend == "triton" else SHAPES + LARGE_VOCAB_SHAPES
        for dname, dtype in dtypes.items():
            for shape in shapes:
                params.append(pytest.param(backend, dtype, shape, id=f"{backend}-{dname}-{shape_id(shape)}"))
    return params


# ------------------------------------------------------------------------------------------ inputs
def make_logits(shape, dtype, *, scale=LOGIT_SCALE) -> torch.Tensor:
    return (torch.randn(shape) * scale).to(dtype)


def make_labels(shape, vocab, *, ignore_frac=0.0, ignore_index=IGNORE_INDEX, dtype=torch.int64):
    labels = torch.randint(0, vocab, shape, dtype=dtype)
    if ignore_frac:
        labels[torch.rand(shape) < ignore_frac] = ignore_index
    return labels


def make_q_logits(p_logits: torch.Tensor) -> torch.Tensor:
    """A second distribution near the first (KL of a few nats), as a policy vs. its reference."""
    return (p_logits.float() + torch.randn(p_logits.shape) * 1.5).to(p_logits.dtype)


# ----------------------------------------------------------------------------------------- the ops
def _logprobs(m, logits, labels, **kw):
    return (m.token_logprobs(logits, labels, **kw),)


def _entropy(m, logits, labels, **kw):
    kw.pop("ignore_index", None)
    return (m.token_entropy(logits, **kw),)


def _logprobs_and_entropy(m, logits, labels, **kw):
    return tuple(m.token_logprobs_and_entropy(logits, labels, **kw))


def _kl(m, p_logits, q_logits, labels, **kw):
    kw.pop("ignore_index", None)
    return (m.kl_divergence(p_logits, q_logits, **kw),)


@dataclass(frozen=True)
class Op:
    """A public op under test: ``op(module, *logits, labels=None, **kw)`` -> tuple of outputs.

    ``module`` is ``rlhf_fast`` or ``rlhf_fast.reference`` (same signatures, minus ``backend``);
    ``logits`` is one tensor, or ``p_logits, q_logits`` for the KL.
    """

    name: str
    fn: object
    labels: bool
    pair: bool = False

    def __call__(self, module, *logits, labels=None, **kw):
        return self.fn(module, *logits, labels, **kw)


OPS = {
    op.name: op
    for op in (
        Op("logprobs", _logprobs, labels=True),
        Op("entropy", _entropy, labels=False),
        Op("logprobs_and_entropy", _logprobs_and_entropy, labels=True),
        Op("kl", _kl, labels=False, pair=True),
    )
}
TOKEN_OPS = [name for name, op in OPS.items() if not op.pair]


def make_inputs(op: Op, shape, dtype, *, ignore_frac=0.0, ignore_index=IGNORE_INDEX):
    """(leaves, labels): leaves require grad; labels is None for the ops that take none."""
    logits = make_logits(shape, dtype)
    if op.pair:
        q_logits = make_q_logits(logits)
        return (logits.requires_grad_(), q_logits.requires_grad_()), None
    labels = make_labels(shape[:-1], shape[-1], ignore_frac=ignore_frac, ignore_index=ignore_index)
    return (logits.requires_grad_(),), labels if op.labels else None


# ------------------------------------------------------------------------------------- comparison
def assert_close(actual, expected, *, dtype, kind, slack=0.0, baseline=None, what="output"):
    """Element-wise ``|actual - expected| <= bound`` with the bound of the module docstring.

    ``expected`` is float64 truth; infinities must match exactly; a NaN in ``actual`` always fails.
    """
    tol = TOL[dtype][kind]
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bound = tol.atol + tol.rtol * expected.abs() + slack
    if tol.vs_torch and baseline is not None:
        bound = bound + 2 * (baseline.detach().double() - expected).abs()
    err = (actual - expected).abs()
    ok = (actual == expected) | (err <= bound)
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        first = [tuple(i.tolist()) for i in bad[:4]]
        bound = bound.expand_as(err)
        detail = ", ".join(
            f"{i}: got {actual[i].item():.9g}, want {expected[i].item():.9g} (bound {bound[i].item():.3g})"
            for i in first
        )
        worst = torch.where(torch.isnan(err), torch.inf, err).max().item()
        pytest.fail(f"{what}: {len(bad)} of {err.numel()} elements out of tolerance, max |err| {worst:.3g}; {detail}")


def dtype_ulp(t: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at ``|t|`` (normal range; the smallest subnormal below it)."""
    finfo = torch.finfo(dtype)
    _, exponent = torch.frexp(t.double())
    ulp = torch.ldexp(torch.ones_like(t, dtype=torch.float64), exponent - 1 - (finfo.bits - 1 - _exponent_bits(dtype)))
    return torch.maximum(ulp, torch.full_like(ulp, finfo.smallest_normal * finfo.eps))


def _exponent_bits(dtype) -> int:
    return {torch.float32: 8, torch.bfloat16: 8, torch.float16: 5}[dtype]


def truncates_bf16(backend: str) -> bool:
    """Triton's interpreter truncates float32 -> bfloat16 (see the module docstring)."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def row_slack(*logits64, temperature=1.0) -> torch.Tensor:
    """ULPS float32 ulps of each row's largest finite |logit / T|: shape [...]."""
    scale = torch.zeros(logits64[0].shape[:-1], dtype=torch.float64)
    for x in logits64:
        x = x.detach().double() / temperature
        scale = torch.maximum(scale, torch.where(torch.isfinite(x), x.abs(), 0).amax(-1))
    return ULPS * EPS32 * scale


def _vjp(build, leaves64, cotangents):
    """Map per-element values on the built views back onto the leaves (adjoint of the slicing)."""
    tmp = [leaf.detach().clone().requires_grad_() for leaf in leaves64]
    return torch.autograd.grad(build(*tmp), tmp, grad_outputs=cotangents, allow_unused=True)


def _identity(*leaves):
    return leaves


@dataclass
class Result:
    outs: tuple  # ours, detached
    grads: tuple  # ours, d loss / d leaf (None for a leaf that does not require grad)
    ref_outs: tuple  # float64
    ref_grads: tuple


def check_against_reference(
    op: Op,
    backend: str,
    leaves,
    labels=None,
    *,
    build=_identity,
    temperature=1.0,
    ignore_index=IGNORE_INDEX,
    grad_outputs=None,
) -> Result:
    """Run ``op`` on ``build(*leaves)`` with ``backend`` and with the float64 reference; compare.

    ``leaves`` are the tensors gradients are taken for (those with ``requires_grad``); ``build``
    turns them into the op's logits arguments (a strided slice, say). ``grad_outputs`` default to
    fresh ``randn`` (negative ones included), the ``grad_output != 1`` case of every test.
    """
    dtype = leaves[0].dtype
    kw = {"temperature": temperature, "ignore_index": ignore_index}
    args = build(*leaves)
    outs = op(rf, *args, labels=labels, backend=backend, **kw)
    batch_shape = args[0].shape[:-1]
    if grad_outputs is None:
        grad_outputs = [torch.randn(batch_shape) for _ in outs]
    for out in outs:
        assert out.dtype == torch.float32
        assert out.shape == batch_shape
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grads = []
    if wanted:
        loss = sum((out * g).sum() for out, g in zip(outs, grad_outputs, strict=True))
        it = iter(torch.autograd.grad(loss, wanted))
        grads = [next(it) if leaf.requires_grad else None for leaf in leaves]

    leaves64 = [leaf.detach().double().requires_grad_(leaf.requires_grad) for leaf in leaves]
    args64 = build(*leaves64)
    ref_outs = op(rf.reference, *args64, labels=labels, **kw)
    baseline = [None] * len(outs)
    if TOL[dtype]["out"].vs_torch:
        with torch.no_grad():
            baseline = op(rf.reference, *build(*[leaf.detach() for leaf in leaves]), labels=labels, **kw)
    slack = row_slack(*args64, temperature=temperature)
    for i, (out, ref, base) in enumerate(zip(outs, ref_outs, baseline, strict=True)):
        assert_close(out, ref, dtype=dtype, kind="out", slack=slack, baseline=base, what=f"{op.name} output {i}")

    ref_grads = []
    if wanted:
        ref_loss = sum((ref * g.double()).sum() for ref, g in zip(ref_outs, grad_outputs, strict=True))
        wanted64 = [leaf for leaf in leaves64 if leaf.requires_grad]
        it = iter(torch.autograd.grad(ref_loss, wanted64))
        ref_grads = [next(it) if leaf.requires_grad else None for leaf in leaves64]
        weights = _grad_weights(op, args64, grad_outputs, temperature, slack)
        leaf_slack = _vjp(build, leaves64, weights)
        for i, (leaf, grad, ref) in enumerate(zip(leaves, grads, ref_grads, strict=True)):
            if grad is None:
                continue
            assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
            slack_i = leaf_slack[i]
            if dtype == torch.bfloat16 and truncates_bf16(backend):
                slack_i = slack_i + dtype_ulp(ref, dtype)
            assert_close(
                grad, ref, dtype=dtype, kind="grad", slack=slack_i, baseline=ref.to(dtype),
                what=f"{op.name} grad of input {i}",
            )
    return Result(tuple(o.detach() for o in outs), tuple(grads), tuple(r.detach() for r in ref_outs), tuple(ref_grads))


def _grad_weights(op, args64, grad_outputs, temperature, slack):
    """Per-entry gradient slack on the built logits: row slack * |g| / T * probability weight."""
    with torch.no_grad():
        x = args64[0].double() / temperature
        p = torch.softmax(x, -1)
        g = sum(go.double().abs() for go in grad_outputs)
        row = (slack * g / temperature)[..., None]
        if not op.pair:
            return (row * p,)
        q = torch.softmax(args64[1].double() / temperature, -1)
        return row * p, row * (p + q)


# ---------------------------------------------------------------------------------- op recording
class RecordOps(TorchDispatchMode):
    """Record the ``rlhf_fast::*`` custom ops that run, with their arguments.

    ``entered`` lists every call reaching the dispatcher, ``completed`` those that returned.
    The trailing argument of each op is the resolved backend name.
    """

    def __init__(self):
        super().__init__()
        self.entered = []
        self.completed = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ours = func.namespace == "rlhf_fast"
        if ours:
            self.entered.append((func.name(), args))
        out = func(*args, **(kwargs or {}))
        if ours:
            self.completed.append((func.name(), args))
        return out

    def backends_used(self) -> set[str]:
        return {args[-1] for _, args in self.completed}

