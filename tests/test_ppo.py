"""rf.ppo_loss against the float64 reference on every backend (loss, the four stats, gradients),
the gradient computed in the forward pass, hand-derived cases, bad input; torch.compile of a
step that calls both ppo_loss and cross_entropy.
"""

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from _cases import (
    BACKENDS,
    DTYPES,
    IGNORE_INDEX,
    LOSS_SHAPE,
    RecordLargeTensors,
    RecordOps,
    assert_rows_close,
    check_loss_against_reference,
    make_labels,
    make_logits,
)

import rlhf_fast as rf

FUSED = ["rlhf_fast::token_stats_fused"]
COMPOSED = ["rlhf_fast::token_stats_fwd", "rlhf_fast::token_stats_bwd"]


@dataclass
class PPOInputs:
    logits: torch.Tensor  # [B, T, V], requires grad
    labels: torch.Tensor  # [B, T]
    old_logprobs: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T] or [B, 1]
    ref_logprobs: torch.Tensor  # [B, T]


def make_ppo_inputs(shape=LOSS_SHAPE, dtype=torch.float32, *, temperature=1.0, sequence_advantages=False):
    """A batch with a prompt, a fully ignored sequence and ~10% ignored tokens elsewhere.

    ``old_logprobs`` is the current log-prob plus N(0, 0.6) noise, so the ratios spread over about
    [0.2, 6]: both clip bounds and a dual clip of 2-3 are all hit. ``ref_logprobs``: plus N(0, 0.3).
    """
    B, T, V = shape
    logits = make_logits(shape, dtype)
    labels = make_labels((B, T), V, ignore_frac=0.1)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[-1] = IGNORE_INDEX  # a sequence with no valid token takes no part in the seq-mean aggregations
    with torch.no_grad():
        logp = rf.reference.token_logprobs(logits.double(), labels, temperature=temperature).float()
    advantages = torch.randn(B, 1) if sequence_advantages else torch.randn(B, T)
    return PPOInputs(
        logits.requires_grad_(), labels, logp + 0.6 * torch.randn(B, T), advantages, logp + 0.3 * torch.randn(B, T)
    )


def ppo_fn(inputs: PPOInputs, *, with_ref=False, **options):
    """``fn(module, logits, **kw)`` for ``check_loss_against_reference``."""
    ref = inputs.ref_logprobs if with_ref or options.get("kl_coef", 0.0) else None

    def fn(module, logits, **kw):
        return module.ppo_loss(
            logits, inputs.labels, inputs.old_logprobs, inputs.advantages, ref_logprobs=ref, **options, **kw
        )

    return fn


# The options of DESIGN.md one by one, and combined.
OPTIONS = {
    "default": {},
    "clip-higher": {"clip_eps": 0.2, "clip_eps_high": 0.28},
    "dual-clip": {"dual_clip": 3.0},
    "dual-clip-asymmetric": {"clip_eps": 0.1, "clip_eps_high": 0.3, "dual_clip": 2.0},
    "kl-k1": {"kl_coef": 0.1, "kl_estimator": "k1"},
    "kl-k2": {"kl_coef": 0.1, "kl_estimator": "k2"},
    "kl-k3": {"kl_coef": 0.1, "kl_estimator": "k3"},
    "entropy": {"entropy_coef": 0.01},
    "kl-entropy": {"kl_coef": 0.05, "kl_estimator": "k3", "entropy_coef": 0.02},
    "ref-stats-only": {"with_ref": True},
    "seq-mean-token-mean": {"loss_agg": "seq-mean-token-mean", "entropy_coef": 0.01},
    "seq-mean-token-sum": {"loss_agg": "seq-mean-token-sum", "kl_coef": 0.1, "kl_estimator": "k2"},
    "temperature": {"temperature": 0.7, "kl_coef": 0.1, "entropy_coef": 0.01},
    "everything": {
        "clip_eps": 0.15,
        "clip_eps_high": 0.25,
        "dual_clip": 2.5,
        "kl_coef": 0.05,
        "kl_estimator": "k1",
        "entropy_coef": 0.01,
        "temperature": 1.3,
        "loss_agg": "seq-mean-token-mean",
    },
}


def _check(backend, inputs, **options):
    with RecordOps() as rec:
        res = check_loss_against_reference(ppo_fn(inputs, **options), backend, (inputs.logits,), rescaled=True)
    assert [name for name, _ in rec.completed] == FUSED  # logits alone require grad: the fused path
    return res


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_matches_reference(backend, option):
    inputs = make_ppo_inputs(temperature=OPTIONS[option].get("temperature", 1.0))
    res = _check(backend, inputs, **OPTIONS[option])
    assert torch.count_nonzero(res.grads[0][inputs.labels == IGNORE_INDEX]) == 0
    if option == "default":  # the inputs do exercise the clip
        assert 0.1 < res.stats["clip_frac"].item() < 0.9


@pytest.mark.parametrize("option", ["default", "kl-entropy"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_large_offsets_lose_nothing(backend, option):
    # Logits of 1e4 + 3 randn are exact floats, and so is each x - max: the loss and the gradient written in
    # the forward can be as accurate as at offset 0 (see test_token_ops' test of the saved lse). The shift
    # leaves every log-prob, and so the old and reference ones made from it, as they were.
    inputs = make_ppo_inputs()
    with torch.no_grad():
        inputs.logits.mul_(0.75).add_(1e4)
        logp = rf.reference.token_logprobs(inputs.logits.double(), inputs.labels).float()
        inputs.old_logprobs.copy_(logp + 0.6 * torch.randn(logp.shape))
        inputs.ref_logprobs.copy_(logp + 0.3 * torch.randn(logp.shape))
    fn = ppo_fn(inputs, **OPTIONS[option])
    loss, _ = fn(rf, inputs.logits, backend=backend)
    (grad,) = torch.autograd.grad(loss, inputs.logits)
    logits64 = inputs.logits.detach().double().requires_grad_()
    ref_loss, _ = fn(rf.reference, logits64)
    (ref_grad,) = torch.autograd.grad(ref_loss, logits64)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    valid = inputs.labels != IGNORE_INDEX
    assert_rows_close(grad[valid], ref_grad[valid], rtol=1e-5, what="gradient")


@pytest.mark.parametrize("dtype", [pytest.param(d, id=n) for n, d in DTYPES.items()])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dtypes(backend, dtype):
    options = OPTIONS["everything"]
    _check(backend, make_ppo_inputs(dtype=dtype, temperature=options["temperature"]), **options)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_sequence_level_advantages(backend, loss_agg):
    # advantages [B, 1] broadcast over the tokens of each sequence (GRPO, RLOO).
    _check(backend, make_ppo_inputs(sequence_advantages=True), loss_agg=loss_agg, dual_clip=3.0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_ignored_positions_of_the_side_inputs_may_hold_anything(backend):
    # Padding of old/ref log-probs and advantages is often garbage: it must not reach the loss.
    inputs = make_ppo_inputs()
    ignored = inputs.labels == IGNORE_INDEX
    options = {"kl_coef": 0.1, "entropy_coef": 0.01, "dual_clip": 3.0}
    clean = check_loss_against_reference(ppo_fn(inputs, **options), backend, (inputs.logits,), rescaled=True)
    inputs.logits.grad = None
    for t, value in ((inputs.old_logprobs, math.nan), (inputs.advantages, math.inf), (inputs.ref_logprobs, -math.inf)):
        t[ignored] = value
    loss, stats = ppo_fn(inputs, **options)(rf, inputs.logits, backend=backend)
    (grad,) = torch.autograd.grad(loss * clean.grad_output, inputs.logits)
    assert torch.equal(loss.detach(), clean.loss) and torch.equal(grad, clean.grads[0])
    for name, value in stats.items():
        assert torch.equal(value, clean.stats[name]), name


# The fused CPU kernel walks a row in 2048-wide chunks, keeping exp(x - m_c) per chunk against the
# running max m_c at that chunk, and rescales chunk by chunk in the gradient pass. Rows built to hit each
# edge of that bookkeeping, over three chunks (the last one partial):
CHUNK, EDGE_V = 2048, 2 * 2048 + 45


def _chunk_edge_logits(dtype):
    logits = make_logits((2, 4, EDGE_V), torch.float32)
    labels = torch.randint(0, EDGE_V, (2, 4))
    ninf = float("-inf")
    logits[0, 0, :CHUNK] = ninf  # a first chunk all masked: no max until the second
    labels[0, 0] = CHUNK + 7
    logits[0, 1, CHUNK:] += 100.0  # a jump past the headroom: the second chunk is summed again
    logits[0, 2, CHUNK:] -= 150.0  # later chunks with p ~ e^-150: their scale exp(m_c - lse) is 0 in float
    labels[0, 2] = 3
    logits[0, 3].masked_fill_(torch.rand(EDGE_V) < 0.02, ninf)  # scattered masked entries
    logits[0, 3, labels[0, 3]] = 0.0
    logits[1, 0, :] = ninf  # two finite logits in the whole row, one per chunk
    logits[1, 0, [5, 3 * CHUNK // 2]] = torch.tensor([1.0, 2.0])
    labels[1, 0] = 5
    logits[1, 1, : 2 * CHUNK] = ninf  # only the partial last chunk is finite
    labels[1, 1] = 2 * CHUNK + 44
    return logits.to(dtype).requires_grad_(), labels


@pytest.mark.parametrize("dtype", [pytest.param(d, id=n) for n, d in DTYPES.items()])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_chunk_edges(backend, dtype):
    logits, labels = _chunk_edge_logits(dtype)
    with torch.no_grad():
        logp = rf.reference.token_logprobs(logits.double(), labels).float()
    noise = torch.randn(2, 2, 4)
    inputs = PPOInputs(logits, labels, logp + 0.6 * noise[0], torch.randn(2, 4), logp + 0.3 * noise[1])
    res = _check(backend, inputs, kl_coef=0.05, entropy_coef=0.02)
    grad = res.grads[0]
    assert bool(torch.isfinite(grad).all())
    assert torch.count_nonzero(grad[torch.isinf(logits.detach())]) == 0


# ------------------------------------------------------------------------------- hand-derived cases
def _two_token_batch(old_logprobs, advantages, **options):
    """Two tokens (B=1, T=2) over a vocabulary of 2 with equal logits: p = 1/2, logp(label 0) = -log 2."""
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    labels = torch.zeros(1, 2, dtype=torch.long)
    old = torch.tensor([old_logprobs])
    adv = torch.tensor([advantages])
    return logits, lambda backend: rf.ppo_loss(logits, labels, old, adv, backend=backend, **options)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_clipped_token_gets_zero_gradient(backend):
    # Token 0: ratio = e^0.5 = 1.6487, A = 1: max(-1.6487, -1.2) = -1.2, the clipped branch: no gradient.
    # Token 1: ratio = 1, A = 1: pg = -1, d pg / d logp = -A * ratio = -1.
    # token-mean: loss = (-1.2 - 1) / 2 = -1.1; d loss / d logp_1 = -1/2, d logp / d x = onehot - p = [1/2, -1/2].
    log2 = math.log(2)
    logits, run = _two_token_batch([-log2 - 0.5, -log2], [1.0, 1.0])
    loss, stats = run(backend)
    loss.backward()
    assert loss.item() == pytest.approx(-1.1, rel=1e-6)
    assert torch.count_nonzero(logits.grad[0, 0]) == 0
    torch.testing.assert_close(logits.grad[0, 1], torch.tensor([-0.25, 0.25]), rtol=1e-6, atol=1e-7)
    # approx_kl = mean k3 of log_ratio [0.5, 0]: (e^-0.5 - 1 + 0.5) / 2 = 0.0532653
    assert stats["clip_frac"].item() == 0.5
    assert stats["approx_kl"].item() == pytest.approx((math.exp(-0.5) - 0.5) / 2, rel=1e-5)
    assert stats["entropy"].item() == pytest.approx(log2, rel=1e-6)
    assert stats["kl_ref"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dual_clip_caps_a_negative_advantage_token(backend):
    # A = -1, clip range [0.8, 1.2], dual_clip = 2.
    # Token 0: ratio = e = 2.7183: max(2.7183, 1.2) = 2.7183, capped to -A * 2 = 2: no gradient.
    # Token 1: ratio = e^0.5 = 1.6487 < 2: pg = 1.6487, d pg / d logp = -A * ratio = 1.6487.
    # loss = (2 + 1.6487) / 2 = 1.8244; row 1: 1.6487 / 2 * [1/2, -1/2] = [0.41218, -0.41218].
    log2 = math.log(2)
    logits, run = _two_token_batch([-log2 - 1.0, -log2 - 0.5], [-1.0, -1.0], dual_clip=2.0)
    loss, stats = run(backend)
    loss.backward()
    assert loss.item() == pytest.approx((2 + math.exp(0.5)) / 2, rel=1e-6)
    assert torch.count_nonzero(logits.grad[0, 0]) == 0
    expected = math.exp(0.5) / 4
    torch.testing.assert_close(logits.grad[0, 1], torch.tensor([expected, -expected]), rtol=1e-6, atol=1e-7)
    assert stats["clip_frac"].item() == 0.0  # neither token takes the clipped branch of the max


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fully_ignored_batch(backend, loss_agg):
    inputs = make_ppo_inputs(dtype=torch.bfloat16)
    inputs.labels[:] = IGNORE_INDEX
    loss, stats = ppo_fn(inputs, kl_coef=0.1, entropy_coef=0.01, loss_agg=loss_agg)(rf, inputs.logits, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(inputs.logits.grad) == 0 and bool(torch.isfinite(inputs.logits.grad).all())
    for name, value in stats.items():
        assert value.item() == 0.0, name


@pytest.mark.parametrize("option", ["default", "dual-clip"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_nan_advantage_gives_its_token_a_nan_gradient(backend, option):
    # As autograd of the reference does: the loss is NaN, and so is the gradient of that token's row (not 0, which
    # a ">=" test between the two NaN branches of the max would give); every other row is untouched.
    inputs = make_ppo_inputs()
    inputs.labels[1, 3] = 5
    inputs.advantages[1, 3] = float("nan")
    loss, _ = ppo_fn(inputs, **OPTIONS[option])(rf, inputs.logits, backend=backend)
    loss.backward()
    ref_logits = inputs.logits.detach().double().requires_grad_()
    ref_loss, _ = ppo_fn(inputs, **OPTIONS[option])(rf.reference, ref_logits)
    ref_loss.backward()
    assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
    for grad in (inputs.logits.grad, ref_logits.grad):
        assert torch.isnan(grad[1, 3]).all()
        rest = torch.ones(grad.shape[:2], dtype=torch.bool)
        rest[1, 3] = False
        assert torch.isfinite(grad[rest]).all()


@pytest.mark.parametrize("composed", [False, True], ids=["fused", "composed"])
@pytest.mark.parametrize("option", ["default", "kl-entropy", "dual-clip"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zero_advantage_with_an_overflowing_ratio(backend, option, composed):
    # A GRPO group whose rewards are equal gets advantage 0: pg = -0 * ratio is 0 whatever the ratio, also
    # where exp(logp - old_logp) overflows float32 (an old log-prob of -200); -0 * inf once made the loss
    # and every gradient NaN on all backends.
    inputs = make_ppo_inputs()
    inputs.labels[0, 2] = 4
    inputs.old_logprobs[0, 2] = -200.0
    inputs.advantages[0, 2] = 0.0
    inputs.advantages.requires_grad_(composed)  # a side input with grad takes the composed path
    fn = ppo_fn(inputs, **OPTIONS[option])
    loss, _ = fn(rf, inputs.logits, backend=backend)
    (0.7 * loss).backward()  # an incoming gradient other than 1: the forward's gradient is scaled
    ref_logits = inputs.logits.detach().double().requires_grad_()
    ref_loss, _ = fn(rf.reference, ref_logits)
    (0.7 * ref_loss).backward()
    assert math.isfinite(ref_loss.item())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs.logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-6)
    if composed:
        assert torch.isfinite(inputs.advantages.grad).all()


# --------------------------------------------------------------------------- gradient in the forward
@pytest.mark.parametrize("option", ["default", "everything"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gradient_in_forward_equals_deferred_backward(backend, option):
    # A side input that requires grad sends ppo_loss down the composed path (token_logprobs_and_entropy,
    # autograd of the element-wise math); the logits' gradient must be the same.
    options = OPTIONS[option]
    inputs = make_ppo_inputs(temperature=options.get("temperature", 1.0))
    go = torch.randn(())
    results = []
    for adv_grad in (False, True):
        logits = inputs.logits.detach().clone().requires_grad_()
        inputs.advantages.requires_grad_(adv_grad)
        with RecordOps() as rec:
            loss, stats = ppo_fn(inputs, **options)(rf, logits, backend=backend)
            (loss * go).backward()
        results.append((loss.detach(), stats, logits.grad, [name for name, _ in rec.completed]))
    (loss, stats, grad, ops), (composed_loss, composed_stats, composed_grad, composed_ops) = results
    assert ops == FUSED and composed_ops == COMPOSED
    assert inputs.advantages.grad is not None
    torch.testing.assert_close(loss, composed_loss, rtol=1e-6, atol=1e-7)
    for name in stats:
        torch.testing.assert_close(stats[name], composed_stats[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, composed_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inplace_backward(backend, dtype):
    inputs = make_ppo_inputs(dtype=dtype)
    options = {"kl_coef": 0.1, "entropy_coef": 0.01, "dual_clip": 3.0, "clip_eps_high": 0.3}
    go = torch.randn(())
    results = []
    for inplace in (False, True):
        logits = inputs.logits.detach().clone().requires_grad_()
        storage = logits.data_ptr()
        with RecordLargeTensors(logits.numel(), logits) as big:
            loss, stats = ppo_fn(inputs, inplace_backward=inplace, **options)(rf, logits, backend=backend)
            (loss * go).backward()
        results.append((loss.detach(), stats, logits.grad, big.seen, logits.grad.data_ptr() == storage))
    (loss, stats, grad, seen, _), (inplace_loss, inplace_stats, inplace_grad, inplace_seen, reused) = results
    assert seen, "the recorder missed the gradient buffer of the ordinary path"
    assert inplace_seen == [], f"inplace_backward=True allocated {inplace_seen}"
    assert reused, "the gradient does not live in the logits' storage"
    assert torch.equal(inplace_loss, loss) and torch.equal(inplace_grad, grad)
    for name in stats:
        assert torch.equal(inplace_stats[name], stats[name]), name


# ---------------------------------------------------------------------------------------- bad input
BAD_OPTIONS = [
    ({"loss_agg": "seq-mean"}, "loss_agg"),
    ({"kl_estimator": "k4", "kl_coef": 0.1}, "kl_estimator"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"clip_eps": -0.1}, "clip_eps"),
    ({"clip_eps": 1.5}, "clip_eps"),
    ({"clip_eps_high": -0.2}, "clip_eps_high"),
    ({"dual_clip": 0.5}, "dual_clip"),
    ({"dual_clip": float("inf")}, "dual_clip"),
    ({"kl_coef": 0.1, "ref_logprobs": None}, "ref_logprobs"),
    # finite hyper-parameters only: a NaN or inf weight made a NaN or inf loss without a word
    ({"kl_coef": float("nan")}, "kl_coef"),
    ({"kl_coef": float("inf")}, "kl_coef"),
    ({"entropy_coef": float("nan")}, "entropy_coef"),
    ({"entropy_coef": -float("inf")}, "entropy_coef"),
    # 1/T in float32: a temperature beyond [1e-30, 1e30] made NaN on cpp and Triton
    ({"temperature": 1e-45}, "temperature"),
    ({"temperature": 1e39}, "temperature"),
    ({"temperature": 2**1024}, "temperature"),
    ({"ignore_index": 2**64}, "ignore_index"),
]


@pytest.mark.parametrize(("options", "match"), BAD_OPTIONS, ids=[f"{m}-{i}" for i, (_, m) in enumerate(BAD_OPTIONS)])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_options(backend, options, match):
    x = make_ppo_inputs()
    options = {"ref_logprobs": x.ref_logprobs, **options}
    with pytest.raises(ValueError, match=match):
        rf.ppo_loss(x.logits, x.labels, x.old_logprobs, x.advantages, backend=backend, **options)


@pytest.mark.parametrize(
    "options", [{"kl_coef": "0.1"}, {"entropy_coef": None}, {"temperature": True}, {"dual_clip": True}]
)
def test_hyper_parameters_of_the_wrong_type(options):
    # a string was converted (kl_coef="0.1" ran), None failed inside float(), True ran as temperature 1
    x = make_ppo_inputs()
    (name,) = options
    with pytest.raises((TypeError, ValueError), match=name):
        rf.ppo_loss(x.logits, x.labels, x.old_logprobs, x.advantages, ref_logprobs=x.ref_logprobs, **options)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_mismatched_shapes(backend):
    x = make_ppo_inputs()
    B = x.labels.shape[0]
    with pytest.raises(ValueError, match="old_logprobs"):
        rf.ppo_loss(x.logits, x.labels, x.old_logprobs[:, 1:], x.advantages, backend=backend)
    with pytest.raises(ValueError, match="advantages"):
        rf.ppo_loss(x.logits, x.labels, x.old_logprobs, torch.randn(B, 2), backend=backend)
    with pytest.raises(ValueError, match="ref_logprobs"):
        rf.ppo_loss(
            x.logits, x.labels, x.old_logprobs, x.advantages, ref_logprobs=x.ref_logprobs.T, kl_coef=0.1,
            backend=backend,
        )  # fmt: skip
    with pytest.raises(ValueError, match="labels"):
        rf.ppo_loss(x.logits, x.labels[:, 1:], x.old_logprobs[:, 1:], x.advantages[:, 1:], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_inplace_backward_misuse(backend):
    x = make_ppo_inputs()
    with pytest.raises(ValueError, match="inplace_backward"):  # no gradient to compute
        rf.ppo_loss(x.logits.detach(), x.labels, x.old_logprobs, x.advantages, inplace_backward=True, backend=backend)
    with pytest.raises(ValueError, match="inplace_backward"):  # the composed path needs the logits afterwards
        adv = x.advantages.clone().requires_grad_()
        rf.ppo_loss(x.logits, x.labels, x.old_logprobs, adv, inplace_backward=True, backend=backend)


# ------------------------------------------------------------------------------------------- rf.nn
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_module_equals_functional(backend):
    x = make_ppo_inputs()
    options = {"clip_eps_high": 0.3, "dual_clip": 3.0, "kl_coef": 0.1, "kl_estimator": "k2", "entropy_coef": 0.01}
    module = rf.nn.PPOLoss(**options, loss_agg="seq-mean-token-mean", backend=backend)
    results = []
    for call in (
        lambda logits: module(logits, x.labels, x.old_logprobs, x.advantages, x.ref_logprobs),
        lambda logits: rf.ppo_loss(
            logits, x.labels, x.old_logprobs, x.advantages, ref_logprobs=x.ref_logprobs,
            loss_agg="seq-mean-token-mean", backend=backend, **options,
        ),
    ):  # fmt: skip
        logits = x.logits.detach().clone().requires_grad_()
        loss, stats = call(logits)
        loss.backward()
        results.append((loss.detach(), stats, logits.grad))
    (module_loss, module_stats, module_grad), (loss, stats, grad) = results
    assert torch.equal(module_loss, loss) and torch.equal(module_grad, grad)
    for name in stats:
        assert torch.equal(module_stats[name], stats[name]), name


# ----------------------------------------------------------------------------------- torch.compile
def _rl_step(hidden, head, x: PPOInputs, *, backend, inplace):
    # An SFT term and a PPO term on the next-token slice of a linear head's output; both compute
    # their gradient in the forward pass. In place, each loss needs logits of its own (it destroys them).
    logits = hidden @ head  # [B, T + 1, V]
    sft = rf.cross_entropy(logits[:, :-1], x.labels, label_smoothing=0.1, inplace_backward=inplace, backend=backend)
    if inplace:
        logits = hidden @ head
    ppo, stats = rf.ppo_loss(
        logits[:, :-1], x.labels, x.old_logprobs, x.advantages, ref_logprobs=x.ref_logprobs, kl_coef=0.1,
        entropy_coef=0.01, dual_clip=3.0, temperature=0.9, inplace_backward=inplace, backend=backend,
    )  # fmt: skip
    return sft + ppo, stats["clip_frac"]


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("backend", ["cpp", "torch"], indirect=True)
def test_compile_fullgraph(backend, inplace):
    torch.compiler.reset()
    B, T, V = 2, 9, 263
    hidden = torch.randn(B, T + 1, 32)
    x = make_ppo_inputs((B, T, V), temperature=0.9)
    head_init = torch.randn(32, V) * 0.5
    fn = functools.partial(_rl_step, backend=backend, inplace=inplace)
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        head = head_init.clone().requires_grad_()
        loss, clip_frac = f(hidden, head, x)
        loss.backward()
        results.append((loss.detach(), clip_frac, head.grad))
    (eager_loss, eager_clip, eager_grad), (compiled_loss, compiled_clip, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_clip, eager_clip, rtol=0, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_reference_statistics_follow_the_logits_device():
    """Without ref_logprobs the reference's kl_ref was a CPU zero beside statistics on the logits' device."""
    B, T, V = 2, 3, 5
    logits = torch.randn(B, T, V, device="meta")
    labels, side = torch.zeros(B, T, dtype=torch.long, device="meta"), torch.zeros(B, T, device="meta")
    loss, stats = rf.reference.ppo_loss(logits, labels, side, side)
    assert {str(t.device) for t in (loss, *stats.values())} == {"meta"}
