"""Every backend of the per-token ops against the float64 reference, forward and gradients.

Shapes, tolerances and the comparison live in ``_cases.py``; each test draws fresh random inputs
from a seed derived from its id (``conftest.py``), so a failure reproduces by rerunning it.
"""

import pytest
import torch
from _cases import (
    BACKENDS,
    DTYPES,
    EPS32,
    IGNORE_INDEX,
    OPS,
    SMALL_SHAPE,
    TEMPERATURES,
    ULPS,
    RecordOps,
    assert_close,
    assert_rows_close,
    backend_shape_params,
    check_against_reference,
    make_inputs,
    make_labels,
    make_logits,
    make_q_logits,
    row_slack,
    shape_id,
)

import rlhf_fast as rf

F32_BF16 = {"f32": torch.float32, "bf16": torch.bfloat16}


def _dtype_params(dtypes):
    return [pytest.param(dtype, id=name) for name, dtype in dtypes.items()]


# ------------------------------------------------------------------------------ the accuracy matrix
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("backend", "dtype", "shape"), backend_shape_params(), indirect=["backend"])
def test_matches_reference(op, backend, dtype, shape):
    # Labelled ops get ~15% ignored positions mixed in, as in a batch of prompts and completions.
    leaves, labels = make_inputs(OPS[op], shape, dtype, ignore_frac=0.15)
    check_against_reference(OPS[op], backend, leaves, labels)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", _dtype_params(F32_BF16))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_temperature(backend, op, dtype, temperature):
    leaves, labels = make_inputs(OPS[op], SMALL_SHAPE, dtype, ignore_frac=0.1)
    check_against_reference(OPS[op], backend, leaves, labels, temperature=temperature)


@pytest.mark.parametrize("shape", [(77,), (13, 2053), (2, 3, 5, 77), (0, 31), (2, 0, 31)], ids=shape_id)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_any_number_of_leading_dims(backend, op, shape):
    # [V] gives a 0-d result; an empty batch gives an empty result and an empty gradient.
    leaves, labels = make_inputs(OPS[op], shape, torch.float32, ignore_frac=0.1)
    check_against_reference(OPS[op], backend, leaves, labels)


# ------------------------------------------------------------------------------------- strides
@pytest.mark.parametrize("dtype", _dtype_params(F32_BF16))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_shifted_slice_is_not_copied(backend, op, dtype):
    # logits[:, :-1] of a [B, T, V] leaf (the next-token shift) goes to the kernel as it is.
    B, T, V = 3, 11, 1031
    base = make_logits((B, T, V), dtype).requires_grad_()
    leaves, build, labels = (base,), lambda b: (b[:, :-1],), None
    if OPS[op].labels:
        input_ids = make_labels((B, T), V, ignore_frac=0.1)
        labels = input_ids[:, 1:]  # strided labels too
    if OPS[op].pair:
        # q: another leaf with room on both axes, so its strides differ from p's.
        q_base = make_q_logits(make_logits((B, T + 1, V + 5), dtype)).requires_grad_()
        leaves = (base, q_base)
        build = lambda b, q: (b[:, :-1], q[:, 2:, :V])
    with RecordOps() as rec:
        res = check_against_reference(OPS[op], backend, leaves, labels, build=build)

    views = build(*leaves)
    assert rec.completed, "no rlhf_fast op ran"
    for name, args in rec.completed:
        for arg, view in zip(args, views, strict=False):  # the logits lead the arguments
            assert arg.data_ptr() == view.data_ptr(), f"{name} got a copy of the logits"
            assert arg.stride()[-2:] == view.stride()[-2:], f"{name} got a copy of the logits"
    assert torch.count_nonzero(res.grads[0][:, -1]) == 0  # the cut-off step has no gradient
    if OPS[op].pair:
        q_grad = res.grads[1]
        assert torch.count_nonzero(q_grad[:, :2]) == 0 and torch.count_nonzero(q_grad[..., V:]) == 0


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_row_offsets_past_2_31(backend, op):
    # Rows 2**31 elements apart: a row offset computed in int32 wraps around. The storage is 4 GiB
    # of address space of which only the pages of the few rows are ever touched.
    V = 64
    storage = torch.empty(2**31 + 4 * V, dtype=torch.bfloat16)

    def rows(offset):
        view = storage.as_strided((2, 2, V), (2**31, V, 1), offset)
        view.copy_(make_logits((2, 2, V), torch.bfloat16))
        return view.detach().requires_grad_()  # a leaf with the far-apart strides

    leaves = (rows(0), rows(2 * V)) if OPS[op].pair else (rows(0),)
    labels = make_labels((2, 2), V) if OPS[op].labels else None
    check_against_reference(OPS[op], backend, leaves, labels)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_last_dim_not_contiguous_is_accepted(backend, op):
    # A transposed view has stride(-1) != 1: the op may copy it, but the result must be right.
    shape = (4, 301, 9)  # [B, V, T], viewed as [B, T, V]
    leaves, labels = make_inputs(OPS[op], shape, torch.float32)
    if OPS[op].labels:
        labels = make_labels((4, 9), 301)
    check_against_reference(
        OPS[op], backend, leaves, labels, build=lambda *xs: tuple(x.transpose(1, 2) for x in xs)
    )


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_vocabulary_of_one_with_a_strided_last_dim(backend, op):
    # [.., 1] every other column of a wider tensor: stride(-1) == 2 on a dim nothing steps along (PyTorch calls
    # it contiguous there), so it reaches the kernels uncopied
    leaves, _ = make_inputs(OPS[op], (3, 5, 2), torch.float32)
    labels = torch.zeros(3, 5, dtype=torch.long) if OPS[op].labels else None
    check_against_reference(OPS[op], backend, leaves, labels, build=lambda *xs: tuple(x[..., ::2] for x in xs))


# ------------------------------------------------------------------------------ ignored labels
@pytest.mark.parametrize("dtype", _dtype_params(F32_BF16))
@pytest.mark.parametrize("op", ["logprobs", "logprobs_and_entropy"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_ignored_labels(backend, op, dtype):
    (logits,), labels = make_inputs(OPS[op], SMALL_SHAPE, dtype, ignore_frac=0.3)
    labels[1] = IGNORE_INDEX  # a fully ignored sequence
    labels[0, :4] = IGNORE_INDEX  # and a prompt
    res = check_against_reference(OPS[op], backend, (logits,), labels)

    ignored = labels == IGNORE_INDEX
    for out in res.outs:
        assert torch.count_nonzero(out[ignored]) == 0 and bool(torch.isfinite(out).all())
    assert torch.count_nonzero(res.grads[0][ignored]) == 0 and bool(torch.isfinite(res.grads[0]).all())


@pytest.mark.parametrize("op", ["logprobs", "logprobs_and_entropy"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_all_labels_ignored(backend, op):
    # The batch of a data loader that only produced prompt tokens: loss 0, zero gradient, no NaN.
    logits = make_logits(SMALL_SHAPE, torch.bfloat16).requires_grad_()
    labels = torch.full(SMALL_SHAPE[:-1], IGNORE_INDEX)
    outs = OPS[op](rf, logits, labels=labels, backend=backend)
    loss = sum(out.sum() for out in outs)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0 and bool(torch.isfinite(logits.grad).all())


@pytest.mark.parametrize("op", ["logprobs", "logprobs_and_entropy"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_ignored_rows_are_not_read(backend, op):
    # The kernel interface skips ignored rows entirely: NaN or inf there (padding past the end of
    # a buffer, say) must not leak into the result or the gradient.
    (logits,), labels = make_inputs(OPS[op], SMALL_SHAPE, torch.float32, ignore_frac=0.3)
    ignored = labels == IGNORE_INDEX
    garbage = logits.detach().clone()
    garbage[ignored] = float("nan")
    garbage[ignored, ::7] = float("inf")
    garbage.requires_grad_()
    outs = OPS[op](rf, garbage, labels=labels, backend=backend)
    sum((out * torch.randn(out.shape)).sum() for out in outs).backward()

    clean_outs = OPS[op](rf, logits.detach(), labels=labels, backend=backend)
    for out, clean in zip(outs, clean_outs, strict=True):
        assert torch.count_nonzero(out[ignored]) == 0
        torch.testing.assert_close(out[~ignored], clean[~ignored], rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(garbage.grad[ignored]) == 0
    assert bool(torch.isfinite(garbage.grad).all())


@pytest.mark.parametrize("ignore_index", [-1, 7])
@pytest.mark.parametrize("op", ["logprobs", "logprobs_and_entropy"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_other_ignore_index(backend, op, ignore_index):
    # 7 is a real token id: with ignore_index=7 its positions are skipped, -100 is out of range.
    (logits,), labels = make_inputs(OPS[op], SMALL_SHAPE, torch.float32, ignore_frac=0.2, ignore_index=ignore_index)
    res = check_against_reference(OPS[op], backend, (logits,), labels, ignore_index=ignore_index)
    assert torch.count_nonzero(res.grads[0][labels == ignore_index]) == 0


@pytest.mark.parametrize("op", ["logprobs", "logprobs_and_entropy"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_int32_labels_equal_int64(backend, op):
    (logits,), labels = make_inputs(OPS[op], SMALL_SHAPE, torch.float32, ignore_frac=0.2)
    grad_outputs = [torch.randn(SMALL_SHAPE[:-1]) for _ in range(2)]
    results = []
    for lab in (labels, labels.to(torch.int32)):
        x = logits.detach().clone().requires_grad_()
        outs = OPS[op](rf, x, labels=lab, backend=backend)
        sum((out * g).sum() for out, g in zip(outs, grad_outputs, strict=False)).backward()
        results.append((outs, x.grad))
    (outs64, grad64), (outs32, grad32) = results
    for a, b in zip(outs64, outs32, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(grad64, grad32)


# ------------------------------------------------------------------------------ hard numerics
def _mask_vocab(logits, labels, frac=0.02):
    """-inf at ~2% of each row (a masked vocabulary), never at a row's label."""
    mask = torch.rand(logits.shape) < frac
    if labels is not None:
        mask.scatter_(-1, labels.clamp_min(0).unsqueeze(-1), False)
    return mask


@pytest.mark.parametrize("dtype", _dtype_params(DTYPES))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_masked_vocabulary(backend, op, dtype):
    leaves, labels = make_inputs(OPS[op], SMALL_SHAPE, dtype, ignore_frac=0.1)
    mask = _mask_vocab(leaves[0], labels)
    with torch.no_grad():
        for leaf in leaves:  # the same entries masked in p and q: P_v = Q_v = 0 there
            leaf.masked_fill_(mask, float("-inf"))
    res = check_against_reference(OPS[op], backend, leaves, labels)
    for grad in res.grads:
        assert torch.count_nonzero(grad[mask]) == 0 and bool(torch.isfinite(grad).all())


HUGE = [
    pytest.param(torch.float32, 1e4, id="f32-1e4"),
    pytest.param(torch.float32, 3e4, id="f32-3e4"),
    pytest.param(torch.bfloat16, 1e4, id="bf16-1e4"),
    pytest.param(torch.float16, 3e4, id="f16-3e4"),
]


@pytest.mark.parametrize(("dtype", "value"), HUGE)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_one_huge_logit(backend, op, dtype, value):
    # One logit far above the O(1) others in every row: exp(x - max) must be taken from the
    # running max, or exp overflows to inf and inf/inf gives NaN. The tolerance's ulp term is
    # ~2e-2 absolute here: float32 cannot resolve 1e4 + O(1) much finer than that.
    leaves, labels = make_inputs(OPS[op], SMALL_SHAPE, dtype, ignore_frac=0.1)
    spot = torch.randint(0, SMALL_SHAPE[-1], SMALL_SHAPE[:-1]).unsqueeze(-1)
    with torch.no_grad():
        leaves[0].scatter_(-1, spot, value)
    res = check_against_reference(OPS[op], backend, leaves, labels)
    for t in res.outs + res.grads:
        assert bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", _dtype_params(F32_BF16))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_nan_logit_gives_its_row_nan(backend, op, dtype):
    # A NaN logit must show: every output of its row and every element of its row's gradients (both sides
    # of a KL) are NaN, never a finite value that hides it (a "p > 0" mask drops a NaN p); other rows are as
    # without it.
    leaves, labels = make_inputs(OPS[op], SMALL_SHAPE, dtype)
    with torch.no_grad():
        clean = OPS[op](rf, *(leaf.detach() for leaf in leaves), labels=labels, backend=backend)
        leaves[0][1, 5, 17] = float("nan")
    outs = OPS[op](rf, *leaves, labels=labels, backend=backend)
    sum((out * torch.rand(out.shape)).sum() for out in outs).backward()
    row = torch.zeros(SMALL_SHAPE[:-1], dtype=torch.bool)
    row[1, 5] = True
    for out, ok in zip(outs, clean, strict=True):
        assert bool(torch.isnan(out[row]).all())
        assert torch.equal(out[~row], ok[~row])
    for leaf in leaves:
        assert bool(torch.isnan(leaf.grad[row]).all())
        assert bool(torch.isfinite(leaf.grad[~row]).all())


@pytest.mark.parametrize("op", ["logprobs_and_entropy", "kl"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_large_offset_rows(backend, op):
    # softmax is shift-invariant: rows of 1000 + randn have the entropy (and KL) of randn, to the
    # float32 resolution of the logits (the ulp term of the tolerance, ~2e-3 here).
    leaves, labels = make_inputs(OPS[op], SMALL_SHAPE, torch.float32)
    with torch.no_grad():
        for leaf in leaves:
            leaf.mul_(0.5).add_(1000.0)
    check_against_reference(OPS[op], backend, leaves, labels)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_large_offsets_lose_nothing_to_the_saved_lse(backend, op):
    # Rows of 1e4 + 3 randn (P) and -7e3 + 3 randn (Q): float32 spacing there is 1e-3, but each logit is an
    # exact float and so is x - max, so outputs and gradients can be as accurate as at offset 0. The backward
    # needs lse finer than float32 for that: rounded to float32 it is off by up to 5e-4, and so is every
    # p = exp(x - lse) (a 3e-4 normwise gradient error at 1e4 here, 5e-3 for the KL's).
    leaves, labels = make_inputs(OPS[op], SMALL_SHAPE, torch.float32)
    with torch.no_grad():
        for leaf, offset in zip(leaves, (1e4, -7e3)[: len(leaves)], strict=True):
            leaf.mul_(0.75).add_(offset)
    outs = OPS[op](rf, *leaves, labels=labels, backend=backend)
    grad_outputs = [torch.randn(out.shape) for out in outs]
    grads = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, grad_outputs, strict=True)), leaves)
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    ref_outs = OPS[op](rf.reference, *leaves64, labels=labels)
    loss64 = sum((o * g.double()).sum() for o, g in zip(ref_outs, grad_outputs, strict=True))
    for out, ref in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, torch.autograd.grad(loss64, leaves64), strict=True):
        assert_rows_close(grad, ref, rtol=1e-5, what="gradient")


# ------------------------------------------------------------------------------ op relations
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_logprobs_and_entropy_equals_separate_ops(backend):
    logits = make_logits(SMALL_SHAPE, torch.float32)
    labels = make_labels(SMALL_SHAPE[:-1], SMALL_SHAPE[-1], ignore_frac=0.2)
    g_logp, g_ent = torch.randn(SMALL_SHAPE[:-1]), torch.randn(SMALL_SHAPE[:-1])
    valid = labels != IGNORE_INDEX

    fused_x = logits.clone().requires_grad_()
    logp, ent = rf.token_logprobs_and_entropy(fused_x, labels, backend=backend)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()

    sep_x = logits.clone().requires_grad_()
    logp_sep = rf.token_logprobs(sep_x, labels, backend=backend)
    ent_sep = rf.token_entropy(sep_x, backend=backend)
    # the fused op zeroes the entropy (and its gradient) at ignored positions
    ((logp_sep * g_logp).sum() + (ent_sep * g_ent * valid).sum()).backward()

    torch.testing.assert_close(logp, logp_sep, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent[valid], ent_sep[valid], rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(ent[~valid]) == 0
    torch.testing.assert_close(fused_x.grad, sep_x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("used", ["logprobs", "entropy"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_logprobs_and_entropy_with_one_output_used(backend, used):
    # autograd hands the op no gradient (or zeros) for the unused output; either way it is 0.
    logits = make_logits(SMALL_SHAPE, torch.float32)
    labels = make_labels(SMALL_SHAPE[:-1], SMALL_SHAPE[-1], ignore_frac=0.2)
    g = torch.randn(SMALL_SHAPE[:-1])
    valid = labels != IGNORE_INDEX

    fused_x = logits.clone().requires_grad_()
    logp, ent = rf.token_logprobs_and_entropy(fused_x, labels, backend=backend)
    ((logp if used == "logprobs" else ent) * g).sum().backward()

    single_x = logits.clone().requires_grad_()
    if used == "logprobs":
        (rf.token_logprobs(single_x, labels, backend=backend) * g).sum().backward()
    else:
        (rf.token_entropy(single_x, backend=backend) * g * valid).sum().backward()
    torch.testing.assert_close(fused_x.grad, single_x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_no_grad_inference(backend, op):
    leaves, labels = make_inputs(OPS[op], SMALL_SHAPE, torch.bfloat16)
    with torch.no_grad():
        outs = OPS[op](rf, *leaves, labels=labels, backend=backend)
    with_grad = OPS[op](rf, *leaves, labels=labels, backend=backend)
    for out, ref in zip(outs, with_grad, strict=True):
        assert not out.requires_grad and ref.requires_grad
        assert torch.equal(out, ref.detach())


# ------------------------------------------------------------------------------------------ KL
@pytest.mark.parametrize("dtype", _dtype_params(F32_BF16))
@pytest.mark.parametrize("wrt", ["p", "q", "both"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kl_gradient_to_either_input(backend, wrt, dtype):
    (p, q), _ = make_inputs(OPS["kl"], SMALL_SHAPE, dtype)
    p.requires_grad_(wrt in ("p", "both"))
    q.requires_grad_(wrt in ("q", "both"))
    with RecordOps() as rec:
        res = check_against_reference(OPS["kl"], backend, (p, q), temperature=1.3)
    assert (res.grads[0] is None) == (wrt == "q") and (res.grads[1] is None) == (wrt == "p")
    # the backward computes only the gradients asked for (need_p, need_q)
    (bwd_args,) = [args for name, args in rec.completed if name == "rlhf_fast::kl_bwd"]
    assert bwd_args[7:9] == (wrt != "q", wrt != "p")


@pytest.mark.parametrize("same_tensor", [True, False], ids=["kl(p,p)", "kl(p,p.clone())"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kl_of_a_distribution_with_itself_is_zero(backend, same_tensor):
    p = make_logits(SMALL_SHAPE, torch.float32)
    p[:, :, ::97] = float("-inf")
    p.requires_grad_()
    q = p if same_tensor else p.detach().clone().requires_grad_()
    kl = rf.kl_divergence(p, q, temperature=0.7, backend=backend)
    kl.backward(torch.randn(kl.shape))
    # every step of the online form cancels exactly when x == y; allow the ulp term anyway
    tol = ULPS * EPS32 * p.detach().nan_to_num(neginf=0).abs().max().item() / 0.7
    assert kl.abs().max().item() <= tol
    assert p.grad.abs().max().item() <= tol and (same_tensor or q.grad.abs().max().item() <= tol)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kl_is_infinite_where_q_has_no_mass(backend):
    # P_v > 0 with Q_v = 0 makes KL(P||Q) = +inf; the other rows are unaffected.
    p = make_logits(SMALL_SHAPE, torch.float32)
    q = make_q_logits(p)
    q[0, 5, 17] = float("-inf")
    q[1, :3, :2] = float("-inf")
    kl = rf.kl_divergence(p, q, backend=backend)
    want = rf.reference.kl_divergence(p.double(), q.double())
    assert kl[0, 5].item() == float("inf") and bool((kl[1, :3] == float("inf")).all())
    assert_close(kl, want, dtype=torch.float32, kind="out", slack=row_slack(p, q), what="kl")
