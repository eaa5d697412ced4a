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


def overflowing_sum_rows(V):
    """Rows of finite logits whose float32 sum overflows (sum |x| > 3.4e38): all equal (a uniform softmax),
    alternating signs (vector lanes of +inf and of -inf, NaN once added) and spread positive values."""
    g = torch.Generator().manual_seed(5)
    signs = torch.tensor([1.0, -1.0]).repeat(V // 2 + 1)[:V]
    return torch.stack([torch.full((V,), 6e36), 3e37 * signs, 6e36 + 2e36 * torch.rand(V, generator=g)])


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


def assert_rows_close(actual, expected, *, rtol, what="output"):
    """Normwise along the last dim: ``max_v |actual - expected| <= rtol * max_v |expected|`` in every row
    (``expected`` float64 truth). For cases whose error would hide under ``assert_close``'s ulp term:
    rows of large logits, which are exact floats however large, and whose ``x - max`` are too."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().amax(-1)
    scale = expected.abs().amax(-1)
    worst = (err / scale.clamp(min=torch.finfo(torch.float64).tiny)).max().item()
    assert bool((err <= rtol * scale).all()), f"{what}: normwise row error {worst:.3g} > {rtol:g}"


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


# ======================================================================================== losses
# The loss tests (test_cross_entropy.py, test_ppo.py, test_dpo.py) compare a scalar loss, its
# stats and the logits' gradient with the float64 reference. A kernel's per-token statistics
# (log-prob, entropy) carry the ulp term of ``row_slack``; a loss inherits it in two ways:
#  * its value, and the logits' gradient through ``p``, by |d loss / d stat| times the slack;
#  * the coefficient of a token's gradient row (d loss / d stat) is computed from the statistics
#    themselves, so it moves by as much as the float64 coefficient moves when the statistics are
#    shifted by their slack. That is what makes PPO's ``d pg / d logp + kl_coef * d k / d logp``
#    (two terms that can cancel) or IPO's ``2 (z - 1/(2 beta))`` (z a sum over many tokens) less
#    accurate than either term, and a token within the slack of a clip bound may take either branch.

LOSS_SHAPE = (3, 13, 389)  # [B, T, V]: a few sequences for the per-sequence aggregations


@dataclass
class TokenTerm:
    """Per-token statistics of one logits tensor, and how much a scalar depends on them.

    ``logits`` is the float64 tensor the reference saw (a view of a float64 leaf), ``weight`` is
    ``|d value / d stat|`` per position (``[...]``, it scales ``row_slack``), ``coef_error`` the
    absolute allowance of a gradient row's coefficient; ``labels`` add the label entry.
    """

    logits: torch.Tensor
    labels: torch.Tensor | None
    temperature: float
    weight: torch.Tensor
    coef_error: torch.Tensor | float = 0.0


class SpyReference:
    """Record the float64 per-token outputs of ``rlhf_fast.reference`` during a reference call.

    Every reference loss reaches the logits through ``reference.token_logprobs`` and
    ``reference.token_entropy``; ``calls`` lists ``(logits, labels, temperature, output)`` of each
    call in order. With ``shifts`` (one tensor per call), each output is moved by it before the
    loss uses it.
    """

    NAMES = ("token_logprobs", "token_entropy")

    def __init__(self, shifts=None):
        self.shifts = shifts

    def __enter__(self):
        from unittest import mock

        self.calls = []
        spies = {name: self._spy(getattr(rf.reference, name)) for name in self.NAMES}
        self._patch = mock.patch.multiple(rf.reference, **spies)
        self._patch.start()
        return self

    def __exit__(self, *exc):
        self._patch.stop()

    def _spy(self, fn):
        def spy(logits, *args, **kw):
            out = fn(logits, *args, **kw)
            if self.shifts is not None:
                out = out + self.shifts[len(self.calls)]
            labels = args[0] if args else kw.get("labels")
            self.calls.append((logits, labels, kw.get("temperature", 1.0), out))
            return out

        return spy

    def grads(self, value: torch.Tensor) -> list[torch.Tensor]:
        """``d value / d output`` of each call (zeros where the value does not depend on it)."""
        outs = [out for *_, out in self.calls]
        grads = [None] * len(outs)
        if value.requires_grad:
            grads = torch.autograd.grad(value, outs, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(o) if g is None else g.detach() for o, g in zip(outs, grads, strict=True)]

    def slacks(self) -> list[torch.Tensor]:
        return [row_slack(logits, temperature=t) for logits, _, t, _ in self.calls]


def term_slack(spy: SpyReference, value: torch.Tensor) -> torch.Tensor:
    """First-order ulp allowance of a scalar: sum over tokens of |d value / d stat| * row_slack."""
    total = torch.zeros((), dtype=torch.float64)
    for g, slack in zip(spy.grads(value), spy.slacks(), strict=True):
        total = total + (g.abs() * slack).sum()
    return total


def leaf_grad_slack(terms: list[TokenTerm], leaves64) -> tuple:
    """Per-entry gradient allowance on the float64 leaves the terms' logits are views of.

    Entry ``v`` of a row: ``(weight * row_slack + coef_error) / T * (p_v + 1[v == label])`` (the
    gradient row is ``coefficient * (onehot - p)``, each factor off by its own allowance).
    """
    outputs, weights = [], []
    with torch.no_grad():
        for t in terms:
            x = t.logits.detach() / t.temperature
            w = torch.softmax(x, -1)
            if t.labels is not None:  # ignored rows have weight 0: any in-range index will do
                label = t.labels.long().clamp(0, w.shape[-1] - 1)[..., None]
                w = w + torch.zeros_like(w).scatter_(-1, label, 1.0)
            row = (t.weight * row_slack(t.logits, temperature=t.temperature) + t.coef_error) / t.temperature
            outputs.append(t.logits)
            weights.append(row[..., None] * w)
    grads = torch.autograd.grad(outputs, leaves64, grad_outputs=weights, retain_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves64, grads, strict=True))


def _shift_patterns(n_calls: int):
    """Signs of the statistics' shifts: all up, all down, and alternating by call (chosen up and
    rejected down, say, which moves a DPO margin the most), both ways."""
    alternating = [(-1) ** i for i in range(n_calls)]
    return [[1] * n_calls, [-1] * n_calls, alternating, [-s for s in alternating]]


def rescaled_grad_slack(ref_grad: torch.Tensor, grad_output: torch.Tensor, dtype) -> torch.Tensor:
    """Extra allowance for a gradient written in the forward pass and scaled by ``grad_output`` later.

    The forward pass rounds ``g = ref_grad / grad_output`` to the logits' dtype (half an ulp of
    ``g``), the backward pass rounds ``round(g) * grad_output`` again (up to an ulp of the result,
    taken in the binade above when the value sits just below a power of two): for bfloat16/float16
    that double rounding is inherent to the gradient-in-forward design whenever
    ``grad_output != 1``. Nothing for float32, where ``rtol`` covers it.
    """
    if dtype == torch.float32:
        return torch.zeros_like(ref_grad)
    go = grad_output.double().abs()
    up = 1 + torch.finfo(dtype).eps
    return 0.5 * go * dtype_ulp(ref_grad / go * up, dtype) + dtype_ulp(ref_grad * up, dtype)


@dataclass
class LossResult:
    loss: torch.Tensor  # ours, detached
    stats: dict
    grads: tuple  # d (loss * grad_output) / d leaf
    ref_loss: torch.Tensor
    grad_output: torch.Tensor


def check_loss_against_reference(
    loss_fn, backend: str, leaves, *, build=_identity, grad_output=None, rescaled=False
) -> LossResult:
    """Run ``loss_fn`` on ``build(*leaves)`` with ``backend`` and with the float64 reference; compare.

    ``loss_fn(module, *logits, **kw) -> (loss, stats)`` is called with ``module = rlhf_fast`` and
    ``kw = {"backend": backend}``, then with ``rlhf_fast.reference`` (same signature, no backend).
    The loss, every stat and the gradient of ``loss * grad_output`` (a random scalar by default)
    are compared under the tolerance rule of this module and the loss allowances above;
    ``rescaled``: the op computes the gradient in the forward pass (see ``rescaled_grad_slack``).
    """
    dtype = leaves[0].dtype
    loss, stats = loss_fn(rf, *build(*leaves), backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    for name, value in stats.items():
        assert value.dtype == torch.float32 and value.shape == () and not value.requires_grad, name
    go = torch.randn(()) if grad_output is None else grad_output
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grads = torch.autograd.grad(loss * go, wanted) if wanted else ()

    # Every float64 leaf requires grad: the allowance needs d value / d per-token statistic.
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    with SpyReference() as spy:
        ref_loss, ref_stats = loss_fn(rf.reference, *build(*leaves64))
    assert set(stats) == set(ref_stats)
    values = {"loss": ref_loss, **ref_stats}
    slack = {name: term_slack(spy, value) for name, value in values.items()}
    coefs = spy.grads(ref_loss)
    coef_slack = [torch.zeros_like(c) for c in coefs]
    for signs in _shift_patterns(len(spy.calls)):
        with SpyReference([s * slack for s, slack in zip(signs, spy.slacks(), strict=True)]) as moved:
            moved_loss, moved_stats = loss_fn(rf.reference, *build(*leaves64))
        for name, value in {"loss": moved_loss, **moved_stats}.items():
            slack[name] = torch.maximum(slack[name], (value.detach() - values[name].detach()).abs())
        for i, c in enumerate(moved.grads(moved_loss)):
            coef_slack[i] = torch.maximum(coef_slack[i], (c - coefs[i]).abs())

    base_loss, base_stats = None, dict.fromkeys(ref_stats)
    if TOL[dtype]["out"].vs_torch:
        with torch.no_grad():
            base_loss, base_stats = loss_fn(rf.reference, *build(*[leaf.detach() for leaf in leaves]))
    base = {"loss": base_loss, **base_stats}
    ours = {"loss": loss, **stats}
    for name, ref in values.items():
        assert_close(ours[name], ref, dtype=dtype, kind="out", slack=slack[name], baseline=base[name], what=name)

    if wanted:
        wanted64 = [leaf64 for leaf, leaf64 in zip(leaves, leaves64, strict=True) if leaf.requires_grad]
        ref_grads = torch.autograd.grad(ref_loss * go.double(), wanted64, retain_graph=True)
        scale = abs(go.item())
        terms = [
            TokenTerm(logits, labels, t, c.abs() * scale, c_slack * scale)
            for (logits, labels, t, _), c, c_slack in zip(spy.calls, coefs, coef_slack, strict=True)
        ]
        slacks = leaf_grad_slack(terms, wanted64)
        for i, (leaf, grad, ref, slack_i) in enumerate(zip(wanted, grads, ref_grads, slacks, strict=True)):
            assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
            if dtype == torch.bfloat16 and truncates_bf16(backend):
                slack_i = slack_i + dtype_ulp(ref, dtype)
            if rescaled:
                slack_i = slack_i + rescaled_grad_slack(ref, go, dtype)
            assert_close(
                grad, ref, dtype=dtype, kind="grad", slack=slack_i, baseline=ref.to(dtype), what=f"grad of leaf {i}"
            )
    return LossResult(loss.detach(), stats, tuple(grads), ref_loss.detach(), go)


class RecordLargeTensors(TorchDispatchMode):
    """Record every op that returns a tensor of at least ``numel`` elements in storage not owned by ``keep``.

    With ``keep`` the logits, an in-place backward must record nothing: no ``[tokens, vocab]``
    buffer (gradient, copy or temporary) is created outside the kernels.
    """

    def __init__(self, numel: int, *keep: torch.Tensor):
        super().__init__()
        self.numel = numel
        self.known = {t.untyped_storage().data_ptr() for t in keep}
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                if t.untyped_storage().data_ptr() not in self.known:
                    self.seen.append((func.name(), tuple(t.shape)))
        return out
