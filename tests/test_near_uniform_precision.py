"""Entropy and KL gradients of near-uniform rows, every backend and form, against float64 autograd.

``d H / d x_v = -p_v (log p_v + H) / T = -p_v (x_v - E_p[x]) / T`` for ``x = logits / T``. Formed in float32
as ``log p_v + H``, the factor is the difference of two numbers near ``log V`` (~8 at V = 3001) that cancel
where the row is nearly uniform, as a freshly initialized policy's is (logits ~ randn * 1e-3): their float32
rounding, ~1e-6 absolute, is then ~1e-3 of the ~1e-3 factor. Formed against ``E_p[x]`` it is exact to float32.

The exact KL's gradient to P, ``P_v (log P_v - log Q_v - KL) / T``, has the same trap: ``log P_v`` and ``log Q_v``
are both ~``-log V``. It is formed as ``(x_v - y_v) - (lse_P - lse_Q + KL)``, the row constant in float64.
(Q's gradient ``Q - P`` is held to the bound on well-spread rows only: between two near-uniform rows its
error is set by the float32 sums behind each log-sum-exp, ~1e-7 absolute, as in eager PyTorch.)

Every test compares ``max |g - g64| / max |g64|`` per gradient tensor with the float64 gradient of the same
inputs (``rlhf_fast.reference`` in float64, or ``hidden.double() @ weight.double().T`` for the linear forms).
Where another term shares the loss (log-probs, PPO's policy gradient) it is scaled to the entropy term's size,
so that an error in the entropy factor cannot hide under it. The well-spread rows (randn * 3) guard the
ordinary case.
"""

import pytest
import torch
from _cases import BACKENDS, dtype_ulp

import rlhf_fast as rf
from rlhf_fast import reference
from rlhf_fast.ops import linear

REL_TOL = 2e-5  # float32 inputs: max |g - g64| / max |g64|
SCALES = {"uniform-1e-3": 1e-3, "uniform-1e-2": 1e-2, "spread-3": 3.0}  # logits ~ randn * scale
TEMPERATURES = (1.0, 0.7)
# (rows, V) of the per-token ops; the Triton interpreter runs each program in Python, so its case is tiny.
SHAPES = {"cpu": (13, 3001), "triton": (5, 517)}
# (tokens, hidden, V) of the linear forms
LINEAR_SHAPES = {"cpu": (13, 67, 3001), "triton": (5, 24, 517)}
LINEAR_FORMS = ["entropy", "logprobs_and_entropy", "ppo"]
IGNORE_INDEX = -100


def _scale_params():
    return [pytest.param(scale, id=name) for name, scale in SCALES.items()]


def assert_rel_close(ours: torch.Tensor, truth: torch.Tensor, what: str = "gradient") -> None:
    """``max |ours - truth| / max |truth| <= REL_TOL``, the error in the message."""
    assert ours.dtype == torch.float32 and ours.shape == truth.shape, what
    err = ((ours.double() - truth).abs().max() / truth.abs().max().clamp(min=1e-300)).item()
    assert err <= REL_TOL, f"{what}: relative error {err:.2e} > {REL_TOL:.0e}"


def _shape(table, backend):
    return table["triton" if backend == "triton" else "cpu"]


def _labels(rows: int, vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (rows,))
    labels[1] = IGNORE_INDEX
    return labels


# ------------------------------------------------------------------------------------ per-token ops
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("scale", _scale_params())
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_token_entropy_gradient(backend, scale, temperature):
    rows, V = _shape(SHAPES, backend)
    logits = (torch.randn(rows, V) * scale).requires_grad_()  # logits: [rows, V]
    w = torch.randn(rows)  # a grad_output per row
    ent = rf.token_entropy(logits, temperature=temperature, backend=backend)
    (grad,) = torch.autograd.grad((ent * w).sum(), logits)

    logits64 = logits.detach().double().requires_grad_()
    ref = reference.token_entropy(logits64, temperature=temperature)
    (grad64,) = torch.autograd.grad((ref * w.double()).sum(), logits64)
    assert_rel_close(grad, grad64)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("scale", _scale_params())
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_token_logprobs_and_entropy_gradient(backend, scale, temperature):
    rows, V = _shape(SHAPES, backend)
    logits = (torch.randn(rows, V) * scale).requires_grad_()
    labels = _labels(rows, V)
    # The log-prob term puts g_lp on the label's entry; the entropy term's entries are ~ g_H * scale / V
    # (p_v ~ 1 / V times x_v - E_p[x] ~ scale), so g_lp of that size keeps both terms in view.
    g_lp, g_h = torch.randn(rows) * scale / V, torch.randn(rows)
    logp, ent = rf.token_logprobs_and_entropy(logits, labels, temperature=temperature, backend=backend)
    (grad,) = torch.autograd.grad((logp * g_lp + ent * g_h).sum(), logits)

    logits64 = logits.detach().double().requires_grad_()
    ref_logp, ref_ent = reference.token_logprobs_and_entropy(logits64, labels, temperature=temperature)
    (grad64,) = torch.autograd.grad((ref_logp * g_lp.double() + ref_ent * g_h.double()).sum(), logits64)
    assert_rel_close(grad, grad64)


# ------------------------------------------------------------------------ PPO's entropy bonus (fused)
@pytest.mark.parametrize("advantages", ["zero", "small"])
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
@pytest.mark.parametrize("scale", _scale_params())
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_ppo_entropy_bonus_gradient(backend, scale, inplace, advantages):
    # The logits require grad and nothing else does: the forward pass writes the gradient (the fused path).
    # Zero advantages leave the entropy bonus alone in the gradient; small ones (the policy-gradient
    # entries, A * ratio / N on the label, of the bonus's ~scale / (V N) size) mix the two.
    rows, V = _shape(SHAPES, backend)
    logits = (torch.randn(rows, V) * scale).requires_grad_()
    labels = _labels(rows, V)
    logits64 = logits.detach().double().requires_grad_()  # before an in-place backward overwrites the logits
    with torch.no_grad():
        logp64 = reference.token_logprobs(logits64, labels, temperature=0.7)
    old = (logp64 + 0.03 * torch.randn(rows, dtype=torch.float64)).float()  # ratios within 0.9..1.1: unclipped
    adv = torch.zeros(rows) if advantages == "zero" else torch.randn(rows) * scale / V
    kw = dict(clip_eps=0.2, entropy_coef=1.0, temperature=0.7)
    loss, _ = rf.ppo_loss(logits, labels, old, adv, inplace_backward=inplace, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss * 1.7, logits)

    ref_loss, _ = reference.ppo_loss(logits64, labels, old.double(), adv.double(), **kw)
    (grad64,) = torch.autograd.grad(ref_loss * 1.7, logits64)
    assert_rel_close(grad, grad64)


# --------------------------------------------------------------------------------- fused-linear forms
def _linear_forms(labels, old, adv, lp_scale, grad_output=1.7):
    """``name -> (ours(hidden, weight, **kw), twin(logits64))``: each form's scalar loss, and its float64 twin
    on explicit logits. ``lp_scale``: the log-prob weights' size (see the per-token test); ``grad_output``
    scales the PPO loss, whose gradient the forward pass computes and the backward rescales."""
    g_lp, g_h = torch.randn(labels.shape) * lp_scale, torch.randn(labels.shape)
    ppo = dict(clip_eps=0.2, entropy_coef=1.0, temperature=0.7)
    return {
        "entropy": (
            lambda h, w, **kw: _mix((None, rf.linear_token_entropy(h, w, temperature=0.7, **kw)), g_lp, g_h),
            lambda x: _mix((None, reference.token_entropy(x, temperature=0.7)), g_lp, g_h),
        ),
        "logprobs_and_entropy": (
            lambda h, w, **kw: _mix(
                rf.linear_token_logprobs_and_entropy(h, w, labels, temperature=0.7, **kw), g_lp, g_h
            ),
            lambda x: _mix(reference.token_logprobs_and_entropy(x, labels, temperature=0.7), g_lp, g_h),
        ),
        "ppo": (
            lambda h, w, **kw: rf.linear_ppo_loss(h, w, labels, old, adv, **ppo, **kw)[0] * grad_output,
            lambda x: reference.ppo_loss(x, labels, old.double(), adv.double(), **ppo)[0] * grad_output,
        ),
    }


def _mix(outs, g_lp, g_h):
    logp, ent = outs
    loss = (ent * g_h.to(ent.dtype)).sum()
    return loss if logp is None else loss + (logp * g_lp.to(logp.dtype)).sum()


def _head(N, H, V, scale, dtype=torch.float32):
    # logits = hidden @ weight.T ~ randn * scale
    hidden = torch.randn(N, H).to(dtype).requires_grad_()  # hidden: [N, H]
    weight = (torch.randn(V, H) * scale / H**0.5).to(dtype).requires_grad_()  # weight: [V, H]
    return hidden, weight


@pytest.mark.parametrize("form", LINEAR_FORMS)
@pytest.mark.parametrize("scale", _scale_params())
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_linear_entropy_gradients(backend, scale, form):
    N, H, V = _shape(LINEAR_SHAPES, backend)
    hidden, weight = _head(N, H, V, scale)
    labels = _labels(N, V)
    old, adv = torch.randn(N) - 8.0, torch.zeros(N)  # zero advantages: PPO's gradient is its entropy bonus
    ours_fn, ref_fn = _linear_forms(labels, old, adv, scale / V)[form]
    # a budget of 4 rows per chunk: several chunks and a ragged last one (the chunked CPU paths)
    budget = 4 * linear._row_bytes(V, 4)
    grads = torch.autograd.grad(ours_fn(hidden, weight, chunk_bytes=budget, backend=backend), (hidden, weight))

    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    grads64 = torch.autograd.grad(ref_fn(h64 @ w64.T), (h64, w64))
    for name, ours, truth in zip(["hidden", "weight"], grads, grads64, strict=True):
        assert_rel_close(ours, truth, name)


@pytest.mark.parametrize("form", LINEAR_FORMS)
@pytest.mark.parametrize("scale", _scale_params())
@pytest.mark.parametrize("backend", ["cpp", "torch"], indirect=True)
def test_linear_bf16_widened_entropy_gradients(backend, scale, form, monkeypatch):
    # A bfloat16 head with float32 GEMMs (RLHF_FAST_WIDEN_GEMMS=1). Its dW comes from the vocabulary-outer
    # pass, which forms the entropy term of a block of columns from the whole rows' statistics saved by the
    # first pass (and for the per-token forms, whose chunks hold 4 rows here, N * H <= 4 * V, dH comes from
    # that pass too). The gradients carry only their final rounding (as in test_linear.py), so each entry
    # is held to one bfloat16 ulp of the truth plus the float32 bound: the max-normalized 2e-2 and 5e-3 of
    # test_linear.py would hide a 1e-3 error in the entropy factor.
    # grad_output = 1: PPO's gradient from the forward pass is then not rescaled, which in bfloat16 would
    # round it twice (see _cases.rescaled_grad_slack); the float32 test above covers grad_output != 1.
    monkeypatch.setenv(linear.WIDEN_ENV_VAR, "1")
    N, H, V = LINEAR_SHAPES["cpu"]
    hidden, weight = _head(N, H, V, scale, torch.bfloat16)
    labels = _labels(N, V)
    old, adv = torch.randn(N) - 8.0, torch.zeros(N)
    ours_fn, ref_fn = _linear_forms(labels, old, adv, scale / V, grad_output=1.0)[form]
    budget = 4 * linear._row_bytes(V, 4)  # the widened head's logits chunks are float32
    grads = torch.autograd.grad(ours_fn(hidden, weight, chunk_bytes=budget, backend=backend), (hidden, weight))

    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    grads64 = torch.autograd.grad(ref_fn(h64 @ w64.T), (h64, w64))
    for name, ours, truth in zip(["hidden", "weight"], grads, grads64, strict=True):
        assert ours.dtype == torch.bfloat16
        excess = ((ours.double() - truth).abs() - dtype_ulp(truth, torch.bfloat16)).max() / truth.abs().max()
        assert excess.item() <= REL_TOL, f"{name}: error beyond one bfloat16 ulp {excess.item():.2e} > {REL_TOL:.0e}"


# ------------------------------------------------------------------------------------------ exact KL
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("scale", _scale_params())
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kl_divergence_gradients(backend, scale, temperature):
    rows, V = _shape(SHAPES, backend)
    p_logits = (torch.randn(rows, V) * scale).requires_grad_()  # [rows, V], independent of q: KL ~ scale^2
    q_logits = (torch.randn(rows, V) * scale).requires_grad_()
    w = torch.randn(rows)
    kl = rf.kl_divergence(p_logits, q_logits, temperature=temperature, backend=backend)
    grads = torch.autograd.grad((kl * w).sum(), (p_logits, q_logits))

    p64, q64 = (t.detach().double().requires_grad_() for t in (p_logits, q_logits))
    ref = reference.kl_divergence(p64, q64, temperature=temperature)
    grads64 = torch.autograd.grad((ref * w.double()).sum(), (p64, q64))
    assert_rel_close(grads[0], grads64[0], "p_logits")
    if scale == SCALES["spread-3"]:
        assert_rel_close(grads[1], grads64[1], "q_logits")


@pytest.mark.parametrize("scale", _scale_params())
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_linear_kl_divergence_gradients(backend, scale):
    N, H, V = _shape(LINEAR_SHAPES, backend)
    p_hidden, p_weight = _head(N, H, V, scale)
    q_hidden, q_weight = _head(N, H, V, scale)
    w = torch.randn(N)
    budget = 4 * linear._row_bytes(V, 4)  # several chunks and a ragged last one on the CPU backends
    kl = rf.linear_kl_divergence(
        p_hidden, p_weight, q_hidden, q_weight, temperature=0.7, chunk_bytes=budget, backend=backend
    )
    grads = torch.autograd.grad((kl * w).sum(), (p_hidden, p_weight))

    h64, w64 = (t.detach().double().requires_grad_() for t in (p_hidden, p_weight))
    ref = reference.kl_divergence(
        h64 @ w64.T, q_hidden.detach().double() @ q_weight.detach().double().T, temperature=0.7
    )
    grads64 = torch.autograd.grad((ref * w.double()).sum(), (h64, w64))
    for name, ours, truth in zip(["p_hidden", "p_weight"], grads, grads64, strict=True):
        assert_rel_close(ours, truth, name)
