"""rf.cross_entropy against F.cross_entropy in float64 on every backend, the gradient computed in
the forward pass, the in-place backward, and bad input.

The peak-memory test of the in-place backward (a subprocess on the cpp backend) measures PPO's too.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from _cases import (
    BACKENDS,
    DTYPES,
    IGNORE_INDEX,
    LOSS_SHAPE,
    TOL,
    RecordLargeTensors,
    RecordOps,
    TokenTerm,
    assert_close,
    assert_rows_close,
    dtype_ulp,
    leaf_grad_slack,
    make_labels,
    make_logits,
    overflowing_sum_rows,
    rescaled_grad_slack,
    row_slack,
    shape_id,
    truncates_bf16,
)

import rlhf_fast as rf

REDUCTIONS = ("mean", "sum", "none")
SMOOTHING = (0.0, 0.1)
F32_BF16 = {"f32": torch.float32, "bf16": torch.bfloat16}


def _dtype_params(dtypes):
    return [pytest.param(dtype, id=name) for name, dtype in dtypes.items()]


def _f_cross_entropy(logits, labels, reduction, label_smoothing, ignore_index=IGNORE_INDEX):
    """F.cross_entropy on ``[..., V]`` logits, shaped like ours (``[...]`` for ``"none"``)."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )  # fmt: skip
    return loss.view(labels.shape) if reduction == "none" else loss


def check_cross_entropy(
    backend, leaf, labels, *, reduction, label_smoothing=0.0, build=lambda x: x, ignore_index=IGNORE_INDEX
):
    """Compare loss and logits gradient (of ``sum(loss * grad_output)``, a random grad_output) with
    F.cross_entropy on the float64 values; returns (loss, grad)."""
    dtype = leaf.dtype
    logits = build(leaf)
    loss = rf.cross_entropy(
        logits, labels, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index,
        backend=backend,
    )  # fmt: skip
    assert loss.dtype == torch.float32 and loss.shape == (labels.shape if reduction == "none" else ())
    go = torch.randn(loss.shape)
    (grad,) = torch.autograd.grad((loss * go).sum(), leaf)

    leaf64 = leaf.detach().double().requires_grad_()
    logits64 = build(leaf64)
    ref = _f_cross_entropy(logits64, labels, reduction, label_smoothing, ignore_index)
    base = None
    if TOL[dtype]["out"].vs_torch:
        base = _f_cross_entropy(build(leaf.detach()).float(), labels, reduction, label_smoothing, ignore_index)

    # Each token depends on its row's statistics with weight (1 - eps) + eps = 1.
    valid = (labels != ignore_index).double()
    weight = valid / valid.sum().clamp(min=1) if reduction == "mean" else valid
    slack = row_slack(logits64)
    slack = slack * valid if reduction == "none" else (slack * weight).sum()
    assert_close(loss, ref, dtype=dtype, kind="out", slack=slack, baseline=base, what="loss")

    (ref_grad,) = torch.autograd.grad((ref * go.double()).sum(), leaf64, retain_graph=True)
    (grad_slack,) = leaf_grad_slack([TokenTerm(logits64, labels, 1.0, weight * go.double().abs())], [leaf64])
    if dtype == torch.bfloat16 and truncates_bf16(backend):
        grad_slack = grad_slack + dtype_ulp(ref_grad, dtype)
    if reduction != "none":  # mean/sum: the gradient comes from the forward pass
        grad_slack = grad_slack + rescaled_grad_slack(ref_grad, go, dtype)
    assert grad.dtype == dtype and grad.shape == leaf.shape
    assert_close(grad, ref_grad, dtype=dtype, kind="grad", slack=grad_slack, baseline=ref_grad.to(dtype), what="grad")
    return loss.detach(), grad


# ------------------------------------------------------------------------------------ vs F.cross_entropy
@pytest.mark.parametrize("dtype", _dtype_params(DTYPES))
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_matches_f_cross_entropy(backend, reduction, label_smoothing, dtype):
    logits = make_logits(LOSS_SHAPE, dtype).requires_grad_()
    labels = make_labels(LOSS_SHAPE[:-1], LOSS_SHAPE[-1], ignore_frac=0.15)
    labels[1, :5] = IGNORE_INDEX  # a prompt
    _, grad = check_cross_entropy(backend, logits, labels, reduction=reduction, label_smoothing=label_smoothing)
    assert torch.count_nonzero(grad[labels == IGNORE_INDEX]) == 0


@pytest.mark.parametrize("shape", [(2, 3, 128256), (389,), (2, 3, 5, 61)], ids=shape_id)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_shapes(backend, shape):
    # Vocabulary above 65536, a single [V] row (0-d labels) and extra leading dims.
    logits = make_logits(shape, torch.bfloat16).requires_grad_()
    labels = make_labels(shape[:-1], shape[-1])
    check_cross_entropy(backend, logits, labels, reduction="mean", label_smoothing=0.1)


@pytest.mark.parametrize("ignore_index", [-1, 7])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_other_ignore_index(backend, ignore_index):
    logits = make_logits(LOSS_SHAPE, torch.float32).requires_grad_()
    labels = make_labels(LOSS_SHAPE[:-1], LOSS_SHAPE[-1], ignore_frac=0.2, ignore_index=ignore_index)
    _, grad = check_cross_entropy(
        backend, logits, labels, reduction="mean", label_smoothing=0.1, ignore_index=ignore_index
    )
    assert torch.count_nonzero(grad[labels == ignore_index]) == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_shifted_slice_is_not_copied(backend, reduction):
    # loss(logits[:, :-1], input_ids[:, 1:]): the kernel gets the strided view itself.
    B, T, V = LOSS_SHAPE
    base = make_logits((B, T + 1, V), torch.bfloat16).requires_grad_()
    input_ids = make_labels((B, T + 1), V, ignore_frac=0.1)
    with RecordOps() as rec:
        _, grad = check_cross_entropy(
            backend, base, input_ids[:, 1:], reduction=reduction, label_smoothing=0.1, build=lambda b: b[:, :-1]
        )
    assert rec.completed, "no rlhf_fast op ran"
    view = base[:, :-1]
    for name, args in rec.completed:
        assert args[0].data_ptr() == view.data_ptr() and args[0].stride()[-2:] == view.stride()[-2:], name
    assert torch.count_nonzero(grad[:, -1]) == 0


@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fully_ignored_batch(backend, reduction, label_smoothing):
    # F.cross_entropy gives NaN for the mean over no tokens; we give 0 and a zero gradient.
    logits = make_logits(LOSS_SHAPE, torch.bfloat16).requires_grad_()
    labels = torch.full(LOSS_SHAPE[:-1], IGNORE_INDEX)
    loss = rf.cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing, backend=backend)
    (loss * torch.randn(loss.shape)).sum().backward()
    assert torch.count_nonzero(loss) == 0 and bool(torch.isfinite(loss).all())
    assert torch.count_nonzero(logits.grad) == 0 and bool(torch.isfinite(logits.grad).all())


@pytest.mark.parametrize("dtype", _dtype_params(F32_BF16))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_label_smoothing_where_the_sum_of_the_logits_overflows(backend, dtype):
    # The smoothing term's mean of the logits must not come from a float32 sum of the raw logits: that is
    # -inf or NaN on these rows, whose losses (4.2, 5.7e37, ~1e36) F.cross_entropy gets in float64.
    logits = overflowing_sum_rows(67).to(dtype).requires_grad_()
    labels = torch.tensor([3, 3, 40])
    loss = rf.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1, backend=backend)
    ref = F.cross_entropy(logits.detach().double(), labels, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
    loss.sum().backward()
    assert bool(torch.isfinite(logits.grad).all())


@pytest.mark.parametrize(("reduction", "inplace"), [("none", False), ("sum", False), ("sum", True)])
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_large_offsets_lose_nothing(backend, label_smoothing, reduction, inplace):
    # Logits of 1e4 + 3 randn are exact floats, and so is each x - max: the losses (the smoothing term's
    # mean of the logits included) and the gradient written in the forward can be as accurate as at offset
    # 0 (see test_token_ops' test of the saved lse).
    logits = make_logits(LOSS_SHAPE, torch.float32).mul_(0.75).add_(1e4)
    labels = make_labels(LOSS_SHAPE[:-1], LOSS_SHAPE[-1], ignore_frac=0.1)
    x = logits.clone().requires_grad_()
    kw = {"reduction": reduction, "label_smoothing": label_smoothing}
    loss = rf.cross_entropy(x, labels, backend=backend, inplace_backward=inplace, **kw)
    go = torch.randn(loss.shape)
    (loss * go).sum().backward()
    x64 = logits.double().requires_grad_()
    ref = F.cross_entropy(x64.flatten(0, -2), labels.flatten(), **kw).view(loss.shape)
    (ref * go.double()).sum().backward()
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-5)
    valid = labels != IGNORE_INDEX
    assert_rows_close(x.grad[valid], x64.grad[valid], rtol=1e-5, what="gradient")


# --------------------------------------------------------------------------- gradient in the forward
def _deferred_cross_entropy(logits, labels, reduction, label_smoothing, backend):
    """The same loss composed from rf.token_logprobs and torch math: its gradient comes from the backward pass."""
    logp = rf.token_logprobs(logits, labels, backend=backend)
    valid = labels != IGNORE_INDEX
    x = logits.float()
    mean_logp = torch.where(valid, x.mean(-1) - torch.logsumexp(x, -1), 0.0)
    per_token = -(1 - label_smoothing) * logp - label_smoothing * mean_logp
    return per_token.sum() / (valid.sum().clamp(min=1) if reduction == "mean" else 1)


@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gradient_in_forward_equals_deferred_backward(backend, reduction, label_smoothing):
    logits = make_logits(LOSS_SHAPE, torch.float32)
    labels = make_labels(LOSS_SHAPE[:-1], LOSS_SHAPE[-1], ignore_frac=0.15)
    go = torch.randn(())
    results = []
    for fn in (rf.cross_entropy, _deferred_cross_entropy):
        x = logits.clone().requires_grad_()
        with RecordOps() as rec:
            if fn is rf.cross_entropy:
                loss = fn(x, labels, reduction=reduction, label_smoothing=label_smoothing, backend=backend)
            else:
                loss = fn(x, labels, reduction, label_smoothing, backend)
            (loss * go).backward()
        results.append((loss.detach(), x.grad, [name for name, _ in rec.completed]))
    (loss, grad, ops), (deferred_loss, deferred_grad, deferred_ops) = results
    assert ops == ["rlhf_fast::token_stats_fused"]  # one op: nothing left for the backward pass
    assert deferred_ops == ["rlhf_fast::token_stats_fwd", "rlhf_fast::token_stats_bwd"]
    torch.testing.assert_close(loss, deferred_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, deferred_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_no_grad_runs_the_forward_only(backend):
    logits = make_logits(LOSS_SHAPE, torch.bfloat16)
    labels = make_labels(LOSS_SHAPE[:-1], LOSS_SHAPE[-1], ignore_frac=0.15)
    with torch.no_grad(), RecordOps() as rec, RecordLargeTensors(logits.numel(), logits) as big:
        loss = rf.cross_entropy(logits, labels, label_smoothing=0.1, backend=backend)
    assert [name for name, _ in rec.completed] == ["rlhf_fast::token_stats_fwd"]
    assert big.seen == []  # no gradient buffer either
    with_grad = rf.cross_entropy(logits.clone().requires_grad_(), labels, label_smoothing=0.1, backend=backend)
    torch.testing.assert_close(loss, with_grad.detach(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- in-place backward
@pytest.mark.parametrize("dtype", _dtype_params(F32_BF16))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inplace_backward(backend, reduction, dtype):
    logits = make_logits(LOSS_SHAPE, dtype)
    labels = make_labels(LOSS_SHAPE[:-1], LOSS_SHAPE[-1], ignore_frac=0.15)
    go = torch.randn(())
    results = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        storage = x.data_ptr()
        with RecordLargeTensors(x.numel(), x) as big:
            loss = rf.cross_entropy(
                x, labels, reduction=reduction, label_smoothing=0.1, inplace_backward=inplace, backend=backend
            )
            (loss * go).backward()
        results.append((loss.detach(), x.grad, big.seen, x.grad.data_ptr() == storage))
    (loss, grad, seen, _), (inplace_loss, inplace_grad, inplace_seen, reused) = results
    assert seen, "the recorder missed the gradient buffer of the ordinary path"
    assert inplace_seen == [], f"inplace_backward=True allocated {inplace_seen}"
    assert reused, "the gradient does not live in the logits' storage"
    assert torch.equal(inplace_loss, loss) and torch.equal(inplace_grad, grad)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inplace_backward_of_a_shifted_slice(backend):
    # logits from a layer (not a leaf), sliced: the gradient that flows back into the layer is
    # written over the slice's own storage.
    B, T, V = LOSS_SHAPE
    hidden = torch.randn(B, T + 1, 16)
    head = (torch.randn(16, V) * 0.5).requires_grad_()
    input_ids = make_labels((B, T + 1), V, ignore_frac=0.1)
    go = torch.randn(())
    results = []
    for inplace in (False, True):
        logits = hidden @ head  # [B, T + 1, V]
        shifted = logits[:, :-1]
        loss = rf.cross_entropy(shifted, input_ids[:, 1:], inplace_backward=inplace, backend=backend)
        seen = []
        shifted.register_hook(lambda g, seen=seen: seen.append(g.data_ptr()))
        (loss * go).backward()
        results.append((loss.detach(), head.grad.clone(), seen[0] == shifted.data_ptr()))
        head.grad = None
    (loss, grad, _), (inplace_loss, inplace_grad, reused) = results
    assert reused, "the gradient reaching the slice is not the slice's storage"
    torch.testing.assert_close(inplace_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(inplace_grad, grad, rtol=1e-5, atol=1e-6)


_PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import ctypes, gc, json, sys
    import torch
    import rlhf_fast as rf

    backend, N, V = sys.argv[1], 2048, 16384

    def reset_peak():
        # Freed heap pages go back to the kernel, so reusing them counts again; then VmHWM := VmRSS.
        gc.collect()
        rf.empty_cache()  # cached gradient buffers too: reusing one must count
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        open("/proc/self/clear_refs", "w").write("5")
        return peak()

    def peak():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

    def losses(logits, labels, inplace):
        old, adv = torch.randn(labels.shape) - 9.0, torch.randn(labels.shape)
        rf.cross_entropy(logits, labels, inplace_backward=inplace, backend=backend).backward()
        with torch.no_grad():
            logits.normal_()  # the logits were destroyed: new values, same storage
        logits.grad = None
        loss, _ = rf.ppo_loss(logits, labels, old, adv, entropy_coef=0.01, inplace_backward=inplace, backend=backend)
        loss.backward()

    losses(torch.randn(8, 64, requires_grad=True), torch.randint(0, 64, (8,)), True)  # imports, first calls
    logits = torch.randn(N, V, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    before = reset_peak()
    losses(logits, labels, True)
    inplace = peak() - before
    with torch.no_grad():
        logits.normal_()
    logits.grad = None
    before = reset_peak()
    losses(logits, labels, False)
    print(json.dumps({"inplace": inplace, "ordinary": peak() - before, "logits": logits.numel() * 4}))
    """
)


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_inplace_backward_peak_memory(backend):
    # Peak resident memory of a fresh process around cross_entropy and ppo_loss at 2048 x 16384
    # float32 (128 MiB of logits). In place, nothing of that size may appear; the ordinary path,
    # run afterwards, must show its gradient buffer (or the measurement is blind). Measured on
    # the CPU fast path only: the Triton interpreter copies whole tensors to run a kernel, and the
    # torch fallback's float32 temporaries are 32 MiB chunks by design (and it takes ~30 s here);
    # test_inplace_backward checks every backend for [tokens, vocab] tensors made outside the kernels.
    root = os.path.dirname(os.path.dirname(os.path.abspath(rf.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, backend], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    mem = json.loads(done.stdout.splitlines()[-1])
    assert mem["ordinary"] >= 0.9 * mem["logits"], mem
    assert mem["inplace"] <= 0.02 * mem["logits"], mem  # the target: at most 2% of the logits


# ---------------------------------------------------------------------------------------- bad input
def _inputs():
    return make_logits(LOSS_SHAPE, torch.float32).requires_grad_(), make_labels(LOSS_SHAPE[:-1], LOSS_SHAPE[-1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction": "avg"}, "reduction"),
        ({"reduction": None}, "reduction"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"reduction": "none", "inplace_backward": True}, "inplace_backward"),
    ],
    ids=["reduction-avg", "reduction-None", "smoothing-negative", "smoothing-above-1", "inplace-with-none"],
)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_arguments(backend, kwargs, match):
    logits, labels = _inputs()
    with pytest.raises(ValueError, match=match):
        rf.cross_entropy(logits, labels, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_tensors(backend):
    logits, labels = _inputs()
    with pytest.raises(ValueError, match="labels"):
        rf.cross_entropy(logits, labels[:, :-1], backend=backend)
    with pytest.raises(ValueError, match="labels"):
        rf.cross_entropy(logits, torch.full_like(labels, LOSS_SHAPE[-1]), backend=backend)
    with pytest.raises(TypeError, match="logits"):
        rf.cross_entropy(logits.double(), labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inplace_backward_needs_a_row_view(backend):
    # A [B, V, T] buffer seen as [B, T, V] cannot be overwritten row by row: refuse, do not copy.
    logits = make_logits((3, 97, 11), torch.float32).transpose(1, 2).requires_grad_()
    labels = make_labels((3, 11), 97)
    with pytest.raises(ValueError, match="inplace_backward"):
        rf.cross_entropy(logits, labels, inplace_backward=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_second_backward_through_the_forward_gradient(backend):
    # The gradient made in the forward is scaled in place by the first backward's incoming gradient (loss
    # scaling, gradient accumulation): a second backward through the graph is refused with an explanation,
    # not autograd's "modified by an inplace operation". Unscaled (an incoming 1 on CPU) it may run again.
    logits = make_logits((2, 5, 37), torch.float32).requires_grad_()
    labels = make_labels((2, 5), 37)
    loss = rf.cross_entropy(logits, labels, backend=backend)
    (loss * 0.5).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        (loss * 0.5).backward()
    once = logits.grad.clone()
    logits.grad = None
    loss = rf.cross_entropy(logits, labels, backend=backend)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(logits.grad, 4 * once)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inplace_backward_refuses_rows_that_share_memory(backend):
    # An expand()ed row (stride 0), or rows that overlap, would each write their gradient over the same
    # memory: the backward would return one row's gradient for all of them. Refuse.
    base = make_logits((1, 5, 37), torch.float32).requires_grad_()
    labels = make_labels((4, 5), 37)
    with pytest.raises(ValueError, match="share memory"):
        rf.cross_entropy((base * 1.0).expand(4, 5, 37), labels, inplace_backward=True, backend=backend)
    flat = make_logits((200,), torch.float32)
    overlapping = flat.as_strided((4, 37), (20, 1)).requires_grad_()  # row r starts 20 elements after r - 1
    with pytest.raises(ValueError, match="share memory"):
        rf.cross_entropy(overlapping, labels[:, 0], inplace_backward=True, backend=backend)
    # [T, B, V] seen through a permute of a [B, T, V] buffer: rows are disjoint, the in-place path takes it
    buffer = make_logits((3, 5, 37), torch.float32)
    permuted = buffer.clone().permute(1, 0, 2).requires_grad_()
    expected = permuted.detach().clone().requires_grad_()
    scaled = permuted * 1.0  # keeps the permuted strides
    assert scaled.stride() == permuted.stride()
    loss = rf.cross_entropy(scaled, labels[:3].T, inplace_backward=True, backend=backend)
    loss.backward()
    rf.cross_entropy(expected, labels[:3].T, backend=backend).backward()
    torch.testing.assert_close(permuted.grad, expected.grad)


# ------------------------------------------------------------------------------------------- rf.nn
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_module_equals_functional(backend):
    logits = make_logits(LOSS_SHAPE, torch.float32)
    labels = make_labels(LOSS_SHAPE[:-1], LOSS_SHAPE[-1], ignore_frac=0.15)
    kwargs = {"reduction": "sum", "label_smoothing": 0.1, "backend": backend}
    results = []
    for fn in (rf.nn.CrossEntropyLoss(**kwargs), lambda x, y: rf.cross_entropy(x, y, **kwargs)):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (module_loss, module_grad), (loss, grad) = results
    assert torch.equal(module_loss, loss) and torch.equal(module_grad, grad)
