"""rf.dpo_loss and rf.sequence_logprobs against the float64 reference on every backend (loss,
stats, gradients), chosen and rejected as views of one forward output, hand-derived cases, bad input.
"""

import math
from dataclasses import dataclass

import pytest
import torch
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
    check_loss_against_reference,
    dtype_ulp,
    leaf_grad_slack,
    make_labels,
    make_logits,
    row_slack,
    truncates_bf16,
)

import rlhf_fast as rf

TINY_SHAPE = (2, 7, 67)  # the hand-derived and bad-input cases


@dataclass
class Pairs:
    chosen_logits: torch.Tensor  # [B, T, V]
    chosen_labels: torch.Tensor  # [B, T]
    rejected_logits: torch.Tensor
    rejected_labels: torch.Tensor
    ref_chosen_logps: torch.Tensor  # [B]
    ref_rejected_logps: torch.Tensor


def _labels(B, T, V):
    """A prompt of 3-5 ignored tokens, then the response, then 0-3 ignored padding tokens."""
    labels = make_labels((B, T), V)
    for b in range(B):
        labels[b, : 3 + b % 3] = IGNORE_INDEX
        labels[b, T - b % 4 :] = IGNORE_INDEX
    return labels


def make_pairs(shape=LOSS_SHAPE, dtype=torch.float32, *, ref_spread=8.0) -> Pairs:
    """Reference log-probs near the policy's: ``z`` ~ N(0, ~11), so ``beta * z`` (beta = 0.1) falls
    on both sides of the hinge's kink at 1 and the pairs are split between right and wrong order."""
    B, T, V = shape
    chosen, rejected = make_logits(shape, dtype), make_logits(shape, dtype)
    chosen_labels, rejected_labels = _labels(B, T, V), _labels(B, T, V)
    with torch.no_grad():
        pc = rf.reference.sequence_logprobs(chosen.double(), chosen_labels).float()
        pr = rf.reference.sequence_logprobs(rejected.double(), rejected_labels).float()
    return Pairs(
        chosen.requires_grad_(), chosen_labels, rejected.requires_grad_(), rejected_labels,
        pc + ref_spread * torch.randn(B), pr + ref_spread * torch.randn(B),
    )  # fmt: skip


def dpo_fn(x: Pairs, *, reference_free=False, **options):
    """``fn(module, chosen_logits, rejected_logits, **kw)`` for ``check_loss_against_reference``."""
    refs = (None, None) if reference_free else (x.ref_chosen_logps, x.ref_rejected_logps)

    def fn(module, chosen, rejected, **kw):
        return module.dpo_loss(chosen, x.chosen_labels, rejected, x.rejected_labels, *refs, **options, **kw)

    return fn


CASES = [
    pytest.param(loss_type, ls, average, id=f"{loss_type}-ls{ls}-{'avg' if average else 'sum'}")
    for loss_type, smoothing in (("sigmoid", (0.0, 0.1)), ("robust", (0.0, 0.1)), ("hinge", (0.0,)), ("ipo", (0.0,)))
    for ls in smoothing
    for average in (False, True)
]


@pytest.mark.parametrize(("loss_type", "label_smoothing", "average"), CASES)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_matches_reference(backend, loss_type, label_smoothing, average):
    x = make_pairs()
    options = {"loss_type": loss_type, "label_smoothing": label_smoothing, "average_logprobs": average}
    res = check_loss_against_reference(dpo_fn(x, **options), backend, (x.chosen_logits, x.rejected_logits))
    for grad, labels in zip(res.grads, (x.chosen_labels, x.rejected_labels), strict=True):
        assert torch.count_nonzero(grad[labels == IGNORE_INDEX]) == 0


@pytest.mark.parametrize(
    "options",
    [
        {"nll_coef": 0.5},
        {"nll_coef": 1.0, "loss_type": "ipo", "average_logprobs": True, "beta": 0.5},
        {"reference_free": True},
        {"reference_free": True, "loss_type": "hinge", "beta": 0.05, "nll_coef": 0.2},
    ],
    ids=["nll", "nll-ipo-avg", "reference-free", "reference-free-hinge-nll"],
)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_options(backend, options):
    x = make_pairs()
    check_loss_against_reference(dpo_fn(x, **options), backend, (x.chosen_logits, x.rejected_logits))


@pytest.mark.parametrize("dtype", [pytest.param(d, id=n) for n, d in DTYPES.items()])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dtypes(backend, dtype):
    x = make_pairs(dtype=dtype)
    options = {"loss_type": "sigmoid", "label_smoothing": 0.1, "nll_coef": 0.5}
    check_loss_against_reference(dpo_fn(x, **options), backend, (x.chosen_logits, x.rejected_logits))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_views_of_one_forward_output_are_not_copied(backend):
    # The policy runs once on [chosen; rejected]: logits [2B, T, V], split by slicing.
    x = make_pairs(dtype=torch.bfloat16)
    B = LOSS_SHAPE[0]
    both = torch.cat([x.chosen_logits, x.rejected_logits]).detach().requires_grad_()
    split = lambda t: (t[:B], t[B:])
    fn = dpo_fn(x, nll_coef=0.5)

    with RecordOps() as rec, RecordLargeTensors(B * LOSS_SHAPE[1] * LOSS_SHAPE[2], both) as big:
        fn(rf, *split(both), backend=backend)
    assert big.seen == [], f"the forward copied the logits: {big.seen}"
    views = {view.data_ptr() for view in split(both)}
    assert rec.completed, "no rlhf_fast op ran"
    for name, args in rec.completed:
        assert args[0].data_ptr() in views and args[0].stride()[-2:] == both.stride()[-2:], f"{name} got a copy"

    res = check_loss_against_reference(fn, backend, (both,), build=split)
    separate = check_loss_against_reference(fn, backend, (x.chosen_logits, x.rejected_logits))
    assert torch.equal(res.loss, separate.loss)


# ------------------------------------------------------------------------------- hand-derived cases
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "expected"),
    [
        ("sigmoid", 0.0, math.log(2)),  # -log sigmoid(0) = log 2
        ("sigmoid", 0.1, math.log(2)),  # -(0.9 + 0.1) * log sigmoid(0)
        ("robust", 0.2, math.log(2)),  # (0.8 - 0.2) * log 2 / (1 - 0.4)
        ("hinge", 0.0, 1.0),  # relu(1 - 0)
        ("ipo", 0.0, 25.0),  # (0 - 1 / (2 * 0.1))^2 = 1 / (4 beta^2)
    ],
    ids=["sigmoid", "sigmoid-ls0.1", "robust-ls0.2", "hinge", "ipo"],
)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_policy_equal_to_reference(backend, loss_type, label_smoothing, expected):
    # The reference log-probs are the policy's own: z = 0 exactly, every reward 0.
    x = make_pairs(TINY_SHAPE)
    with torch.no_grad():
        rc = rf.sequence_logprobs(x.chosen_logits, x.chosen_labels, backend=backend)
        rr = rf.sequence_logprobs(x.rejected_logits, x.rejected_labels, backend=backend)
    loss, stats = rf.dpo_loss(
        x.chosen_logits, x.chosen_labels, x.rejected_logits, x.rejected_labels, rc, rr,
        beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing, backend=backend,
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert {name: value.item() for name, value in stats.items()} == {
        "chosen_rewards": 0.0, "rejected_rewards": 0.0, "reward_margin": 0.0, "reward_accuracy": 0.0,
    }  # fmt: skip
    # sigmoid: d loss / d z = -beta * sigmoid(0) / B per pair: pushes chosen up, rejected down.
    if loss_type == "sigmoid" and label_smoothing == 0.0:
        loss.backward()
        B = TINY_SHAPE[0]
        (chosen_dz,) = torch.autograd.grad(
            rf.sequence_logprobs(x.chosen_logits, x.chosen_labels, backend=backend).sum(), x.chosen_logits
        )
        torch.testing.assert_close(x.chosen_logits.grad, (-0.1 * 0.5 / B) * chosen_dz, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_reference_stays_finite_far_from_the_kink(loss_type):
    """Reference log-probs 200 nats off: beta * z ~ 200 underflows sigmoid in float32. The reference (the
    ground truth of every test) and ours both give the exact loss, not inf."""
    x = make_pairs(TINY_SHAPE)
    refs = (x.ref_chosen_logps - 1000.0, x.ref_rejected_logps + 1000.0)  # z ~ +2000, beta * z ~ +200
    args = (x.chosen_logits, x.chosen_labels, x.rejected_logits, x.rejected_labels)
    options = {"beta": 0.1, "loss_type": loss_type, "label_smoothing": 0.1}
    expected, _ = rf.reference.dpo_loss(*(a.double() if a.is_floating_point() else a for a in args),
                                        refs[0].double(), refs[1].double(), **options)  # fmt: skip
    reference32, _ = rf.reference.dpo_loss(*args, *refs, **options)
    ours, _ = rf.dpo_loss(*args, *refs, **options)
    assert torch.isfinite(expected) and abs(expected.item()) > 10.0  # the smoothed term is ~ls * beta * z
    torch.testing.assert_close(reference32.double(), expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fully_ignored_responses(backend):
    # Sequences with no valid token have log-prob 0 (sum and mean): z = 0, no NaN, no gradient.
    x = make_pairs(TINY_SHAPE)
    x.chosen_labels[:] = IGNORE_INDEX
    x.rejected_labels[:] = IGNORE_INDEX
    loss, stats = dpo_fn(x, reference_free=True, average_logprobs=True, nll_coef=1.0)(
        rf, x.chosen_logits, x.rejected_logits, backend=backend
    )
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    for logits in (x.chosen_logits, x.rejected_logits):
        assert torch.count_nonzero(logits.grad) == 0 and bool(torch.isfinite(logits.grad).all())
    assert all(bool(torch.isfinite(value)) for value in stats.values())


# ---------------------------------------------------------------------------------------- bad input
BAD_OPTIONS = [
    ({"loss_type": "kto"}, "loss_type"),
    ({"beta": 0.0}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"label_smoothing": 0.5, "loss_type": "robust"}, "label_smoothing"),
    ({"nll_coef": -1.0}, "nll_coef"),
    ({"nll_coef": float("inf")}, "nll_coef"),
    ({"beta": float("inf")}, "beta"),
    ({"beta": float("nan")}, "beta"),
]


@pytest.mark.parametrize(("options", "match"), BAD_OPTIONS, ids=[f"{m}-{i}" for i, (_, m) in enumerate(BAD_OPTIONS)])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_options(backend, options, match):
    x = make_pairs(TINY_SHAPE)
    with pytest.raises(ValueError, match=match):
        dpo_fn(x, **options)(rf, x.chosen_logits, x.rejected_logits, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_mismatched_shapes(backend):
    x = make_pairs(TINY_SHAPE)
    c, cl, r, rl, rc, rr = (
        x.chosen_logits, x.chosen_labels, x.rejected_logits, x.rejected_labels, x.ref_chosen_logps, x.ref_rejected_logps
    )  # fmt: skip
    cases = [
        ((c, cl, r[:-1], rl[:-1], rc, rr[:-1]), "rejected"),  # fewer rejected than chosen sequences
        ((c, cl, r[:-1], rl[:-1], None, None), "rejected"),
        ((c, cl, r, rl, rc[:-1], rr), "ref_chosen_logps"),
        ((c, cl, r, rl, rc, rr[:, None]), "ref_rejected_logps"),
        ((c, cl, r, rl, rc, None), "ref_"),
        ((c, cl[:, 1:], r, rl, rc, rr), "chosen_labels"),
        ((c, cl, r, rl.T, rc, rr), "rejected_labels"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            rf.dpo_loss(*args, backend=backend)


# ------------------------------------------------------------------------------------------- rf.nn
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_module_equals_functional(backend):
    x = make_pairs()
    options = {"beta": 0.2, "loss_type": "robust", "label_smoothing": 0.1, "nll_coef": 0.3}
    module = rf.nn.DPOLoss(**options, backend=backend)
    args = (x.chosen_labels, x.rejected_labels, x.ref_chosen_logps, x.ref_rejected_logps)
    results = []
    for fn in (
        lambda c, r: module(c, args[0], r, *args[1:]),
        lambda c, r: rf.dpo_loss(c, args[0], r, *args[1:], backend=backend, **options),
    ):
        c, r = (t.detach().clone().requires_grad_() for t in (x.chosen_logits, x.rejected_logits))
        loss, stats = fn(c, r)
        loss.backward()
        results.append((loss.detach(), stats, c.grad, r.grad))
    (m_loss, m_stats, *m_grads), (loss, stats, *grads) = results
    assert torch.equal(m_loss, loss) and all(torch.equal(a, b) for a, b in zip(m_grads, grads, strict=True))
    assert all(torch.equal(m_stats[k], stats[k]) for k in stats)


# ------------------------------------------------------------------------------------ sequence_logprobs
def check_sequence_logprobs(backend, leaf, labels, *, average, build=lambda x: x, module=False):
    dtype = leaf.dtype
    fn = rf.nn.SequenceLogprobs(average=average, backend=backend) if module else None
    logits = build(leaf)
    out = fn(logits, labels) if module else rf.sequence_logprobs(logits, labels, average=average, backend=backend)
    assert out.dtype == torch.float32 and out.shape == labels.shape[:-1]
    go = torch.randn(out.shape)
    (grad,) = torch.autograd.grad((out * go).sum(), leaf)

    leaf64 = leaf.detach().double().requires_grad_()
    logits64 = build(leaf64)
    ref = rf.reference.sequence_logprobs(logits64, labels, average=average)
    valid = (labels != IGNORE_INDEX).double()
    weight = valid / valid.sum(-1, keepdim=True).clamp(min=1) if average else valid
    base = None
    if TOL[dtype]["out"].vs_torch:
        base = rf.reference.sequence_logprobs(build(leaf.detach()), labels, average=average)
    slack = (row_slack(logits64) * weight).sum(-1)
    assert_close(out, ref, dtype=dtype, kind="out", slack=slack, baseline=base, what="sequence_logprobs")

    (ref_grad,) = torch.autograd.grad((ref * go.double()).sum(), leaf64, retain_graph=True)
    term = TokenTerm(logits64, labels, 1.0, weight * go.double().abs()[..., None])
    (grad_slack,) = leaf_grad_slack([term], [leaf64])
    if dtype == torch.bfloat16 and truncates_bf16(backend):
        grad_slack = grad_slack + dtype_ulp(ref_grad, dtype)
    assert_close(grad, ref_grad, dtype=dtype, kind="grad", slack=grad_slack, baseline=ref_grad.to(dtype), what="grad")
    return out.detach(), grad


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("average", [False, True], ids=["sum", "average"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_sequence_logprobs(backend, average, dtype):
    B, T, V = LOSS_SHAPE
    logits = make_logits((B, T + 1, V), dtype).requires_grad_()
    labels = _labels(B, T + 1, V)
    labels[-1] = IGNORE_INDEX  # a sequence with no valid token: 0
    out, _ = check_sequence_logprobs(backend, logits, labels[:, 1:], average=average, build=lambda x: x[:, :-1])
    assert out[-1].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_sequence_logprobs_module_and_leading_dims(backend):
    # [2, 3, T, V]: two prompts with three responses each.
    logits = make_logits((2, 3, 7, 131), torch.float32).requires_grad_()
    labels = make_labels((2, 3, 7), 131, ignore_frac=0.2)
    check_sequence_logprobs(backend, logits, labels, average=True, module=True)
