"""The registered custom ops: the kernel interface itself, ``opcheck``, and ``torch.compile``.

``torch.ops.rlhf_fast.{token_stats_fwd, token_stats_bwd, token_stats_fused, kl_fwd, kl_bwd}`` take the
interface's arguments plus a trailing backend name (``token_stats_fused`` returns its gradient instead of
taking a ``grad`` buffer). Logits reach them as ``[A, B, V]`` views with a contiguous
last dim and free leading strides; per-row tensors are contiguous ``[N]``.
"""

import functools

import pytest
import torch
from _cases import (
    BACKENDS,
    DTYPES,
    IGNORE_INDEX,
    assert_close,
    dtype_ulp,
    make_labels,
    make_logits,
    row_slack,
    truncates_bf16,
)
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_fast as rf

ops = torch.ops.rlhf_fast
# opcheck's own internals still go through torch.jit
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
A, T, V = 2, 7, 301  # logits views are base[:, :-1] of an [A, T, V] tensor: B = T - 1
N = A * (T - 1)


def _view(dtype, requires_grad=False):
    # [A, T-1, V] slice of an [A, T, V] tensor, not contiguous.
    base = make_logits((A, T, V), dtype).requires_grad_(requires_grad)
    return base[:, :-1]


def _labels():
    return make_labels((N,), V, ignore_frac=0.25)


def _dtype_params():
    return [pytest.param(dtype, id=name) for name, dtype in DTYPES.items()]


def _empty(t, dtype=torch.float32):
    return t.shape == (0,) and t.dtype == dtype


# -------------------------------------------------------------------------- the kernel interface
@pytest.mark.parametrize("dtype", _dtype_params())
@pytest.mark.parametrize(
    ("with_logp", "with_entropy", "with_mean_logp"),
    [(True, True, False), (True, False, False), (False, True, False), (True, True, True), (False, False, True)],
)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_token_stats_interface(backend, with_logp, with_entropy, with_mean_logp, dtype):
    temperature = 0.9
    logits = _view(dtype)
    labels = _labels() if with_logp else None
    logp, ent, lse, mean_logp = ops.token_stats_fwd(
        logits, labels, temperature, IGNORE_INDEX, with_logp, with_entropy, with_mean_logp, backend
    )

    x = logits.double().reshape(N, V) / temperature
    want_lse = torch.logsumexp(x, -1)
    log_p = x - want_lse[:, None]
    want_ent = -(log_p.exp() * log_p).sum(-1)
    valid = labels != IGNORE_INDEX if with_logp else torch.ones(N, dtype=torch.bool)
    slack = row_slack(logits.reshape(N, V), temperature=temperature)
    f32, f64 = torch.float32, torch.float64
    wanted = ((logp, with_logp, f32), (ent, with_entropy, f64), (mean_logp, with_mean_logp, f32))
    # lse and entropy are float64: the backward needs lse finer than float32 next to large logits, and
    # E_p[x] = lse - entropy finer than two float32 numbers near log V give it
    assert lse.shape == (N,) and lse.dtype == torch.float64 and lse.is_contiguous()
    for t, _, dtype_ in (c for c in wanted if c[1]):
        assert t.shape == (N,) and t.dtype == dtype_ and t.is_contiguous()
    assert all((not w) == _empty(t, dtype_) for t, w, dtype_ in wanted)
    # ignored rows are skipped: logp = entropy = lse = 0 there
    assert_close(lse, torch.where(valid, want_lse, 0), dtype=dtype, kind="out", slack=slack, what="lse")
    if with_logp:
        want_logp = log_p.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
        assert_close(logp, torch.where(valid, want_logp, 0), dtype=dtype, kind="out", slack=slack, what="logp")
    if with_entropy:
        assert_close(ent, torch.where(valid, want_ent, 0), dtype=dtype, kind="out", slack=slack, what="entropy")
    if with_mean_logp:
        want_u = torch.where(valid, log_p.mean(-1), 0)
        assert_close(mean_logp, want_u, dtype=dtype, kind="out", slack=slack, what="mean_logp")

    # backward, from the interface formula with the float64 lse / H
    g_lp = torch.randn(N) if with_logp else None
    g_h = torch.randn(N) if with_entropy else None
    g_u = torch.randn(N) if with_mean_logp else None
    grad = ops.token_stats_bwd(
        logits, labels, lse, ent if with_entropy else None, g_lp, g_h, g_u, temperature, IGNORE_INDEX, backend
    )
    assert grad.shape == logits.shape and grad.dtype == dtype and grad.is_contiguous()
    p = log_p.exp()
    want = torch.zeros_like(x)
    if with_logp:
        onehot = torch.zeros_like(x).scatter_(1, labels.clamp_min(0)[:, None], 1.0)
        want += g_lp.double()[:, None] * (onehot - p)
    if with_entropy:
        want -= g_h.double()[:, None] * p * (log_p + want_ent[:, None])
    if with_mean_logp:
        want += g_u.double()[:, None] * (1.0 / V - p)
    want = torch.where(valid[:, None], want / temperature, 0).reshape(logits.shape)
    g_abs = sum(g.abs() for g in (g_lp, g_h, g_u) if g is not None)
    grad_slack = ((slack * g_abs / temperature)[:, None] * p).reshape(logits.shape)
    assert_close(
        grad, want, dtype=dtype, kind="grad", slack=grad_slack + _trunc_slack(backend, want, dtype),
        baseline=want.to(dtype), what="grad_logits",
    )


@pytest.mark.parametrize("dtype", _dtype_params())
@pytest.mark.parametrize(("need_p", "need_q"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kl_interface(backend, need_p, need_q, dtype):
    temperature = 1.1
    p_logits = _view(dtype)
    q_logits = make_logits((A, T + 2, V + 3), dtype)[:, 3:, :V]  # other strides than p
    kl, lse_p, lse_q = ops.kl_fwd(p_logits, q_logits, temperature, backend)

    x = p_logits.double().reshape(N, V) / temperature
    y = q_logits.double().reshape(N, V) / temperature
    log_p, log_q = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    want_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    slack = row_slack(x, y)
    assert kl.shape == (N,) and kl.dtype == torch.float32 and kl.is_contiguous()
    for t in (lse_p, lse_q):
        assert t.shape == (N,) and t.dtype == torch.float64 and t.is_contiguous()
    assert_close(lse_p, torch.logsumexp(x, -1), dtype=dtype, kind="out", slack=slack, what="lse_p")
    assert_close(lse_q, torch.logsumexp(y, -1), dtype=dtype, kind="out", slack=slack, what="lse_q")
    assert_close(kl, want_kl, dtype=dtype, kind="out", slack=slack, what="kl")

    g = torch.randn(N)
    grad_p, grad_q = ops.kl_bwd(p_logits, q_logits, lse_p, lse_q, kl, g, temperature, need_p, need_q, backend)
    P, Q = log_p.exp(), log_q.exp()
    row = (slack * g.abs() / temperature)[:, None]
    wants = {
        "grad_p": (grad_p, need_p, g.double()[:, None] * P * (log_p - log_q - want_kl[:, None]), row * P),
        "grad_q": (grad_q, need_q, g.double()[:, None] * (Q - P), row * (P + Q)),
    }
    for what, (got, needed, want, weight) in wants.items():
        if not needed:
            assert _empty(got), f"{what} computed although not needed"
            continue
        assert got.shape == p_logits.shape and got.dtype == dtype and got.is_contiguous()
        want = (want / temperature).reshape(p_logits.shape)
        assert_close(
            got, want, dtype=dtype, kind="grad", slack=weight.reshape(want.shape) + _trunc_slack(backend, want, dtype),
            baseline=want.to(dtype), what=what,
        )


def _trunc_slack(backend, want, dtype):
    # Triton's interpreter truncates to bfloat16 (see _cases.py)
    return dtype_ulp(want, dtype) if dtype == torch.bfloat16 and truncates_bf16(backend) else 0.0


# ---------------------------------------------------------------------------------------- opcheck
def _token_stats_fwd_samples(backend):
    yield _view(torch.float32, True), _labels(), 0.7, IGNORE_INDEX, True, True, True, backend
    yield _view(torch.bfloat16, True), _labels(), 1.0, IGNORE_INDEX, True, False, False, backend
    yield _view(torch.float16, True), None, 1.3, IGNORE_INDEX, False, True, False, backend


def _token_stats_bwd_samples(backend):
    for logits, labels, temperature, ignore_index, *wanted, _ in _token_stats_fwd_samples(backend):
        logits = logits.detach()
        _, ent, lse, _ = ops.token_stats_fwd(logits, labels, temperature, ignore_index, *wanted, backend)
        g_lp, g_h, g_u = (torch.randn(N) if w else None for w in wanted)
        yield logits, labels, lse, ent if wanted[1] else None, g_lp, g_h, g_u, temperature, ignore_index, backend


def _kl_fwd_samples(backend):
    for dtype, temperature in ((torch.float32, 0.8), (torch.bfloat16, 1.0)):
        q = make_logits((A, T + 1, V), dtype)[:, 2:].requires_grad_()
        yield _view(dtype, True), q, temperature, backend
    yield _view(torch.float16, True), _view(torch.float16), 1.0, backend  # gradient to p only


def _kl_bwd_samples(backend):
    flags = [(True, True), (True, False), (False, True)]
    for (p, q, temperature, _), (need_p, need_q) in zip(_kl_fwd_samples(backend), flags, strict=True):
        p, q = p.detach(), q.detach()
        kl, lse_p, lse_q = ops.kl_fwd(p, q, temperature, backend)
        yield p, q, lse_p, lse_q, kl, torch.randn(N), temperature, need_p, need_q, backend


def _token_stats_fused_samples(backend):
    # mode 0: upstream gradients (g_lp, g_H, g_u) per row; mode 1: PPO's [old_logp, adv, ref_logp, weight]
    # with [clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef]
    yield _view(torch.float32), _labels(), 0.7, IGNORE_INDEX, True, True, 0, torch.randn(3, N), [], backend
    ppo = torch.stack([-torch.rand(N), torch.randn(N), -torch.rand(N), torch.full((N,), 1.0 / N)])
    params = [0.2, 0.28, 3.0, 0.05, 3.0, 0.01]
    yield _view(torch.bfloat16), _labels(), 1.0, IGNORE_INDEX, True, False, 1, ppo, params, backend


SAMPLES = {
    "token_stats_fwd": _token_stats_fwd_samples,
    "token_stats_bwd": _token_stats_bwd_samples,
    "token_stats_fused": _token_stats_fused_samples,
    "kl_fwd": _kl_fwd_samples,
    "kl_bwd": _kl_bwd_samples,
}


@pytest.mark.parametrize("op", list(SAMPLES))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck(backend, op):
    # schema, fake (meta) implementation vs. the real one, autograd registration, and
    # AOTAutograd with dynamic shapes (forward and backward) for the differentiable ops.
    for args in SAMPLES[op](backend):
        torch.library.opcheck(getattr(ops, op).default, args)


# ----------------------------------------------------------------------------------- torch.compile
def _rl_loss(logits, labels, adv, ref_logits, *, backend):
    # A policy-gradient step on the next-token slice that goes through all four public ops.
    shifted = logits[:, :-1]
    logp = rf.token_logprobs(shifted, labels, temperature=0.9, backend=backend)
    entropy = rf.token_entropy(shifted, backend=backend)
    logp_1, entropy_1 = rf.token_logprobs_and_entropy(shifted, labels, backend=backend)
    kl = rf.kl_divergence(shifted, ref_logits[:, :-1], backend=backend)
    loss = -(logp * adv).mean() + 0.01 * entropy.mean() + 0.1 * kl.mean()
    return loss - (logp_1 * adv).mean() - 0.01 * entropy_1.mean()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_compile_fullgraph(backend):
    torch.compiler.reset()
    B, T_, V_ = 2, 9, 263
    base = make_logits((B, T_, V_), torch.float32)
    ref_logits = make_logits((B, T_, V_), torch.float32)
    labels = make_labels((B, T_ - 1), V_, ignore_frac=0.2)
    adv = torch.randn(B, T_ - 1)
    fn = functools.partial(_rl_loss, backend=backend)

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        logits = base.clone().requires_grad_()
        loss = f(logits, labels, adv, ref_logits)
        loss.backward()
        results.append((loss.detach(), logits.grad))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_compile_with_runtime_temperature_and_lengths(backend):
    # Temperature is a runtime scalar: a schedule that changes it (and batches whose length
    # changes) must neither break the graph nor be baked in. Dynamo turns a float argument that
    # changes between calls into a symbolic float, like a size that changes.
    torch.compiler.reset()

    def fn(logits, labels, temperature):
        return rf.token_logprobs(logits[:, :-1], labels, temperature=temperature, backend=backend).sum()

    compiled = torch.compile(fn, fullgraph=True)
    for t, temperature in ((7, 1.0), (7, 0.7), (12, 1.3)):
        base = make_logits((2, t, 129), torch.bfloat16)
        labels = make_labels((2, t - 1), 129)
        results = []
        for f in (fn, compiled):
            logits = base.clone().requires_grad_()
            loss = f(logits, labels, temperature)
            loss.backward()
            results.append((loss.detach(), logits.grad))
        (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
        assert compiled_loss.dtype == torch.float32 and compiled_grad.dtype == torch.bfloat16
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("with_entropy", [False, True], ids=["lp_u", "lp_h_u"])
def test_block_grad_is_token_stats_bwd_by_column_blocks(backend, with_entropy):
    # token_stats_block_grad_ (the fused-linear forms' vocabulary-outer dW pass) over ragged column blocks
    # of contiguous rows equals the same columns of token_stats_bwd on the whole rows, labels in every
    # block and ignored rows included.
    if not rf.backends()[backend].available:
        pytest.skip(rf.backends()[backend].detail)
    g = torch.Generator().manual_seed(31)
    n, V = 13, 301
    logits = (3 * torch.randn(1, n, V, generator=g)).float()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::5] = -100
    coefs = torch.randn(3, n, generator=g)
    if not with_entropy:
        coefs[1] = 0
    _, ent, lse, _ = rf.ops._custom.token_stats_fwd(logits, labels, 0.7, -100, True, True, False, backend)
    whole = rf.ops._custom.token_stats_bwd(
        logits, labels, lse, ent, coefs[0].clone(), coefs[1].clone() if with_entropy else None, coefs[2].clone(),
        0.7, -100, backend,
    )  # fmt: skip
    for c0, c1 in ((0, 97), (97, 250), (250, V)):
        block = logits[:, :, c0:c1].contiguous()
        rf.ops._custom.token_stats_block_grad_(
            block, labels, lse, ent if with_entropy else None, coefs, c0, V, 0.7, -100, backend
        )
        torch.testing.assert_close(block, whole[:, :, c0:c1], rtol=1e-5, atol=1e-7)
    if backend == "cpp":
        with pytest.raises(RuntimeError, match="block columns"):
            rf.ops._custom.token_stats_block_grad_(
                logits[:, :, :10].contiguous(), labels, lse, None, coefs, V - 5, V, 0.7, -100, backend
            )


# ---------------------------------------------------------------------- the direct (eager) path
class _FunctionPassThrough(torch.overrides.TorchFunctionMode):
    """A torch-function mode that changes nothing: under it the public ops take the registered ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _DispatchPassThrough(TorchDispatchMode):
    """The same for a dispatch mode (what fake tensors and make_fx use)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _public_calls(backend):
    # (name, fn(logits, q_logits) -> scalar loss): every op and loss whose body reaches a registered op
    labels = make_labels((3, 7), 53, ignore_frac=0.25)
    old, adv = -torch.rand(3, 7), torch.randn(3, 7)
    g = torch.randn(3, 7)
    return {
        "token_logprobs": lambda x, q: (rf.token_logprobs(x, labels, temperature=0.8, backend=backend) * g).sum(),
        "token_entropy": lambda x, q: (rf.token_entropy(x, backend=backend) * g).sum(),
        "logprobs_and_entropy": lambda x, q: sum(
            (t * g).sum() for t in rf.token_logprobs_and_entropy(x, labels, backend=backend)
        ),
        "kl_divergence": lambda x, q: (rf.kl_divergence(x, q, temperature=1.3, backend=backend) * g).sum(),
        "cross_entropy": lambda x, q: rf.cross_entropy(x, labels, label_smoothing=0.1, backend=backend),
        "cross_entropy_inplace": lambda x, q: rf.cross_entropy(x * 1, labels, inplace_backward=True, backend=backend),
        "ppo_loss": lambda x, q: rf.ppo_loss(x, labels, old, adv, entropy_coef=0.01, backend=backend)[0],
    }


@pytest.mark.parametrize("mode_type", [_FunctionPassThrough, _DispatchPassThrough])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_direct_path_equals_registered_ops(backend, mode_type, monkeypatch):
    # Eager calls skip torch.library (see _custom's module doc); under any torch-function or dispatch mode they
    # take the registered ops. Both must give the same bits, forward and backward, and each must really be taken.
    from rlhf_fast.ops import _custom

    registered = []
    for name in ("_token_stats_fwd_op", "_token_stats_bwd_op", "_token_stats_fused_op", "_token_stats_fused_op_",
                 "_kl_fwd_op", "_kl_bwd_op"):  # fmt: skip
        op = getattr(_custom, name)
        monkeypatch.setattr(_custom, name, lambda *a, _op=op, _n=name: registered.append(_n) or _op(*a))
    p, q = make_logits((3, 7, 53), torch.float32), make_logits((3, 7, 53), torch.float32)
    for name, fn in _public_calls(backend).items():
        results = []
        for mode in (None, mode_type()):
            registered.clear()
            x, y = p.clone().requires_grad_(), q.clone().requires_grad_()
            if mode is None:
                loss = fn(x, y)
                loss.backward()
            else:
                with mode:
                    loss = fn(x, y)
                    loss.backward()
            assert bool(registered) == (mode is not None), (name, registered)
            results.append((loss.detach(), x.grad, y.grad))
        for direct, via_op in zip(*results, strict=True):
            assert (direct is None) == (via_op is None), name
            if direct is not None:
                assert torch.equal(direct, via_op), name


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_direct_inplace_bumps_the_version_counter(backend):
    # The in-place backward writes over the logits from C++ (or Triton): autograd must still learn of it, so
    # another graph that saved those logits refuses to backward instead of using the gradient as logits.
    logits = make_logits((2, 5, 37), torch.float32).requires_grad_()
    labels = make_labels((2, 5), 37)
    shifted = logits * 1  # the buffer the in-place backward takes over
    other = (shifted**2).sum()  # saves `shifted` for its backward
    version = shifted._version
    rf.cross_entropy(shifted, labels, inplace_backward=True, backend=backend).backward()
    assert shifted._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fake_tensors_take_the_registered_ops(backend):
    # Shape propagation (FakeTensorMode, as torch.compile and memory planners use it) never runs a kernel.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(2, 6, 41, requires_grad=True)
        labels = torch.zeros(2, 6, dtype=torch.long)
        logp = rf.token_logprobs(logits, labels, backend=backend)
        kl = rf.kl_divergence(logits, torch.empty(2, 6, 41), backend=backend)
        (logp.sum() + kl.sum()).backward()
        assert logp.shape == kl.shape == (2, 6) and logits.grad.shape == (2, 6, 41)
