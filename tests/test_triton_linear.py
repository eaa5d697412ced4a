"""The Triton fused-linear kernels (rlhf_fast/kernels/linear_token_stats.py) under TRITON_INTERPRET=1, against a
float64 reference: ``logits = hidden.double() @ weight.double().T + bias``, then
``rlhf_fast.reference``, gradients by float64 autograd.

Tiles are forced small (16 tokens x 64 columns x 16 hidden units) so that every case spans several
vocabulary tiles with a ragged last one, several hidden steps with a ragged last one (H = 40), and,
at N = 37, several token tiles with a ragged last one.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from rlhf_fast import reference as ref
from rlhf_fast.kernels._common import TileConfig
from rlhf_fast.kernels._linear_tile import tanh as kernel_tanh
from rlhf_fast.kernels.linear_kl import linear_kl_bwd, linear_kl_fwd
from rlhf_fast.kernels.linear_token_stats import linear_token_stats_bwd, linear_token_stats_fwd

SMALL = TileConfig(block_n=16, block_v=64, block_h=16, num_warps=4, num_stages=1)
TEMPERATURE = 0.7
IGNORE = -100
# max |kernel - reference| / max |reference|, per input dtype: (outputs, gradients). bf16 gradients
# are rounded to bf16 once for the tensor-core dot and once when written.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2e-2), torch.float16: (1e-2, 1e-2)}


def _inputs(n, h, v, dtype, with_bias):
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5 * 3).to(dtype)  # logits of a few units: a peaked softmax
    bias = torch.randn(v).to(dtype) if with_bias else None
    labels = torch.randint(0, v, (n,))
    labels[::5] = IGNORE
    return hidden, weight, bias, labels


def _reference(hidden, weight, bias, labels):
    """float64 (logp, entropy) of the explicit logits, and the leaf tensors to take gradients from."""
    leaves = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias is not None else 0)
    logp, entropy = ref.token_logprobs_and_entropy(logits, labels, temperature=TEMPERATURE, ignore_index=IGNORE)
    return logp, entropy, leaves


def _rel_err(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(("n", "v"), [(13, 1000), (37, 301)])
def test_forward_and_backward_match_float64(n, v, with_bias, dtype):
    hidden, weight, bias, labels = _inputs(n, 40, v, dtype, with_bias)
    tol_out, tol_grad = TOL[dtype]
    logp, entropy, lse, _ = linear_token_stats_fwd(
        hidden, weight, bias, labels, TEMPERATURE, IGNORE, True, True, config=SMALL
    )
    ref_logp, ref_entropy, leaves = _reference(hidden, weight, bias, labels)
    assert logp.dtype == torch.float32 and entropy.dtype == lse.dtype == torch.float64
    assert _rel_err(logp, ref_logp) < tol_out
    assert _rel_err(entropy, ref_entropy) < tol_out
    ignored = labels == IGNORE
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all() and (lse[ignored] == 0).all()

    # grad_output != 1, of both signs, for both outputs
    g_lp, g_h = torch.randn(n), torch.randn(n)
    (ref_logp * g_lp + ref_entropy * g_h).sum().backward()
    grads = linear_token_stats_bwd(
        hidden, weight, bias, labels, lse, entropy, g_lp, g_h, TEMPERATURE, IGNORE,
        True, True, with_bias, config=SMALL,
    )  # fmt: skip
    for name, grad, leaf in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
        if leaf is None:
            assert grad.numel() == 0
            continue
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        assert _rel_err(grad, leaf.grad) < tol_grad, name
    assert (grads[0][ignored] == 0).all()


@triton.jit
def _tanh_kernel(y_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, kernel_tanh(tl.load(y_ptr + i)))


def test_tanh_of_the_soft_cap_is_accurate_to_a_few_ulp():
    """The kernels' tanh (exp-based: the interpreter has no libdevice) against float64: within 5 ulp at every
    magnitude (series and exp branches), both signs, 0, and 1 where it saturates."""
    mags = torch.logspace(-8, 2, 511, dtype=torch.float64)
    y = torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags]).float()  # 1023 values
    y = torch.cat([y, torch.tensor([88.0])])  # exp(-2|y|) underflows to 0
    out = torch.empty_like(y)
    _tanh_kernel[(1,)](y, out, BLOCK=1024)
    exact = torch.tanh(y.double())
    assert ((out.double() - exact).abs() / exact.abs().clamp_min(1e-300)).max() < 5 * 2.0**-24
    assert out[511] == 0.0 and out[-1] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_soft_cap_from_tiny_to_saturated_logits(dtype):
    """Gemma 2's final soft cap ``c * tanh(z / c)`` inside the kernels, on raw logits from 1e-4 (the series
    branch of the kernels' tanh) through c (its exp branch) to 50 c (saturated, slope ~ 0), with a mean log-prob
    term, over several vocabulary tiles and splits."""
    c, n, v = 2.0, 37, 301
    hidden, weight, bias, labels = _inputs(n, 40, v, dtype, True)
    weight = (weight.float() * torch.logspace(-4, 2, v)[:, None] / 3).to(dtype)  # raw logits from ~1e-4 to ~1e2
    tol_out, tol_grad = TOL[dtype]
    out = linear_token_stats_fwd(
        hidden, weight, bias, labels, TEMPERATURE, IGNORE, True, True, True, softcap=c, config=SMALL, splits=2
    )
    logp, entropy, lse, mean_logp = out
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    raw = leaves[0] @ leaves[1].T + leaves[2]
    assert raw.abs().max() > 50 * c and (raw.abs() < c / 2).any()  # both branches, and saturation
    x = c * torch.tanh(raw / c) / TEMPERATURE
    ref_logp, ref_entropy = ref.token_logprobs_and_entropy(x, labels, ignore_index=IGNORE)
    ref_mean = torch.where(labels != IGNORE, torch.log_softmax(x, -1).mean(-1), 0.0)
    for ours, theirs in ((logp, ref_logp), (entropy, ref_entropy), (mean_logp, ref_mean)):
        assert _rel_err(ours, theirs) < tol_out
    g_lp, g_h, g_m = torch.randn(n), torch.randn(n), torch.randn(n)
    (ref_logp * g_lp + ref_entropy * g_h + ref_mean * g_m).sum().backward()
    grads = linear_token_stats_bwd(
        hidden, weight, bias, labels, lse, entropy, g_lp, g_h, TEMPERATURE, IGNORE, True, True, True,
        grad_mean_logp=g_m, softcap=c, config=SMALL, splits=2,
    )  # fmt: skip
    for name, grad, leaf in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
        assert _rel_err(grad, leaf.grad) < tol_grad, name


@pytest.mark.parametrize("splits", [1, 2, 3, 40])
def test_vocabulary_splits(splits):
    # The token tiles split over the vocabulary (what a GPU with more SMs than token tiles runs): 16 vocabulary
    # tiles of 64 in 2 or 3 splits (the last one shorter), or in 40, clamped to one tile each. The forward
    # merges the splits' log-sum-exp states, dH sums their partials. Columns 0-191 are masked (-inf bias): with
    # 40 splits the first three see only -inf, and merge as empty.
    n, v = 37, 1000
    hidden, weight, bias, labels = _inputs(n, 40, v, torch.float32, True)
    bias[:192] = float("-inf")
    labels[(labels < 192) & (labels != IGNORE)] += 192
    logp, entropy, lse, mean_logp = linear_token_stats_fwd(
        hidden, weight, bias, labels, TEMPERATURE, IGNORE, True, True, True, config=SMALL, splits=splits
    )
    leaves = [t.double().requires_grad_() for t in (hidden, weight)]
    logits = (leaves[0] @ leaves[1].T + bias.double()) / TEMPERATURE
    ref_logp, ref_entropy = ref.token_logprobs_and_entropy(logits, labels, ignore_index=IGNORE)
    ref_lse = torch.logsumexp(logits, -1)
    ok = labels != IGNORE
    for got, want in ((logp, ref_logp), (entropy, ref_entropy), (lse[ok], ref_lse[ok])):
        assert _rel_err(got, want.detach()) < 1e-5
    # the mean log-prob over a vocabulary with masked columns is -inf, as log_softmax(logits).mean(-1) is
    assert (mean_logp[ok] == float("-inf")).all()
    assert not lse[~ok].any() and not mean_logp[~ok].any()
    # and a finite one over the splits without the mask
    *_, mean_logp = linear_token_stats_fwd(
        hidden, weight, bias.clamp_min(0.0), labels, TEMPERATURE, IGNORE, False, False, True, config=SMALL,
        splits=splits,
    )  # fmt: skip
    unmasked = (hidden.double() @ weight.double().T + bias.clamp_min(0.0).double()) / TEMPERATURE
    ref_mean = torch.log_softmax(unmasked, -1).mean(-1)
    assert _rel_err(mean_logp[ok], ref_mean[ok]) < 1e-5
    g_lp, g_h = torch.randn(n), torch.randn(n)
    (ref_logp * g_lp + ref_entropy * g_h).sum().backward()
    args = (hidden, weight, bias, labels, lse, entropy, g_lp, g_h, TEMPERATURE, IGNORE, True, False, False)
    d_hidden, _, _ = linear_token_stats_bwd(*args, config=SMALL, splits=splits)
    assert _rel_err(d_hidden, leaves[0].grad) < TOL[torch.float32][1]
    assert (d_hidden[labels == IGNORE] == 0).all()


def test_default_16bit_backward_tiles_span_several_tiles():
    # The launch configs of 16-bit inputs, not SMALL: the dH kernel's 64 x 128 and the dW kernel's 128 x 64
    # tiles, each walking several tiles of the other dimension with a ragged last one (N = 150, V = 300).
    from rlhf_fast.kernels.linear_token_stats import CONFIGS

    _, dh_config, dw_config = CONFIGS[torch.bfloat16]
    n, v = 150, 300
    assert n > dw_config.block_n and n % dw_config.block_n and v > dh_config.block_v and v % dh_config.block_v
    hidden, weight, bias, labels = _inputs(n, 40, v, torch.bfloat16, True)
    logp, entropy, lse, _ = linear_token_stats_fwd(hidden, weight, bias, labels, TEMPERATURE, IGNORE, True, True)
    ref_logp, ref_entropy, leaves = _reference(hidden, weight, bias, labels)
    assert _rel_err(logp, ref_logp) < TOL[torch.bfloat16][0] and _rel_err(entropy, ref_entropy) < TOL[torch.bfloat16][0]
    g_lp, g_h = torch.randn(n), torch.randn(n)
    (ref_logp * g_lp + ref_entropy * g_h).sum().backward()
    grads = linear_token_stats_bwd(hidden, weight, bias, labels, lse, entropy, g_lp, g_h, TEMPERATURE, IGNORE,
                                   True, True, True)  # fmt: skip
    for name, grad, leaf in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
        assert _rel_err(grad, leaf.grad) < TOL[torch.bfloat16][1], name


def test_entropy_only_and_single_gradients():
    # no labels (entropy alone), then its backward asking for one gradient at a time
    hidden, weight, bias, _ = _inputs(21, 40, 301, torch.float32, True)
    logp, entropy, lse, _ = linear_token_stats_fwd(
        hidden, weight, bias, None, TEMPERATURE, IGNORE, False, True, config=SMALL
    )
    assert logp.shape == (0,)
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    ref_entropy = ref.token_entropy(leaves[0] @ leaves[1].T + leaves[2], temperature=TEMPERATURE)
    assert _rel_err(entropy, ref_entropy) < 1e-5
    g_h = torch.randn(21)
    (ref_entropy * g_h).sum().backward()
    for i, leaf in enumerate(leaves):
        need = [j == i for j in range(3)]
        grads = linear_token_stats_bwd(
            hidden, weight, bias, None, lse, entropy, None, g_h, TEMPERATURE, IGNORE, *need, config=SMALL
        )
        assert [g.numel() > 0 for g in grads] == need
        assert _rel_err(grads[i], leaf.grad) < 1e-5


def test_fully_ignored_tokens_and_huge_logits():
    # every label ignored: zeros everywhere, no NaN; then one logit ~1e4 next to O(1) ones
    hidden, weight, bias, labels = _inputs(13, 40, 301, torch.float32, True)
    all_ignored = torch.full_like(labels, IGNORE)
    logp, entropy, lse, _ = linear_token_stats_fwd(
        hidden, weight, bias, all_ignored, 1.0, IGNORE, True, True, config=SMALL
    )
    assert not logp.any() and not entropy.any() and not lse.any()
    grads = linear_token_stats_bwd(
        hidden, weight, bias, all_ignored, lse, entropy, torch.ones(13), torch.ones(13), 1.0, IGNORE,
        True, True, True, config=SMALL,
    )  # fmt: skip
    assert all(not g.any() for g in grads)

    bias = bias.clone()
    bias[123] = 1e4
    logp, entropy, lse, _ = linear_token_stats_fwd(hidden, weight, bias, labels, 1.0, IGNORE, True, True, config=SMALL)
    logits = hidden.double() @ weight.double().T + bias.double()
    ref_logp, ref_entropy = ref.token_logprobs_and_entropy(logits, labels, ignore_index=IGNORE)
    # logp ~ -1e4 off the huge column: relative agreement; entropy ~ 0: absolute
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-5)


def test_masked_vocabulary():
    # a -inf bias masks columns out of the softmax: no NaN anywhere, and zero gradient to them
    hidden, weight, bias, labels = _inputs(13, 40, 301, torch.float32, True)
    bias[::7] = float("-inf")
    labels[labels % 7 == 0] = 1  # no label on a masked column
    logp, entropy, lse, _ = linear_token_stats_fwd(
        hidden, weight, bias, labels, TEMPERATURE, IGNORE, True, True, config=SMALL
    )
    leaves = [t.double().requires_grad_() for t in (hidden, weight)]
    ref_logp, ref_entropy = ref.token_logprobs_and_entropy(
        leaves[0] @ leaves[1].T + bias.double(), labels, temperature=TEMPERATURE, ignore_index=IGNORE
    )
    assert _rel_err(logp, ref_logp) < 1e-5 and _rel_err(entropy, ref_entropy) < 1e-5
    g_lp, g_h = torch.randn(13), torch.randn(13)
    (ref_logp * g_lp + ref_entropy * g_h).sum().backward()
    d_hidden, d_weight, d_bias = linear_token_stats_bwd(
        hidden, weight, bias, labels, lse, entropy, g_lp, g_h, TEMPERATURE, IGNORE, True, True, True, config=SMALL
    )
    assert _rel_err(d_hidden, leaves[0].grad) < 1e-5 and _rel_err(d_weight, leaves[1].grad) < 1e-5
    assert torch.isfinite(d_bias).all() and not d_bias[::7].any() and not d_weight[::7].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mean_logprob_term(dtype):
    # mean_logp = mean_v log softmax(x)_v (label smoothing's term) and its gradient (1/V - p) / T,
    # alone and beside the log-prob term, over ragged vocabulary tiles (V = 301 with 64-column tiles)
    hidden, weight, bias, labels = _inputs(37, 40, 301, dtype, True)
    tol_out, tol_grad = TOL[dtype]
    logp, _, lse, mean_logp = linear_token_stats_fwd(
        hidden, weight, bias, labels, TEMPERATURE, IGNORE, True, False, True, config=SMALL
    )
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = (leaves[0] @ leaves[1].T + leaves[2]) / TEMPERATURE
    valid = labels != IGNORE
    ref_mean = torch.where(valid, torch.log_softmax(logits, -1).mean(-1), 0.0)
    ref_logp = ref.token_logprobs(logits, labels, ignore_index=IGNORE)
    assert _rel_err(mean_logp, ref_mean) < tol_out and _rel_err(logp, ref_logp) < tol_out
    assert (mean_logp[~valid] == 0).all()
    for g_lp in (None, torch.randn(37)):
        g_m = torch.randn(37)
        for leaf in leaves:
            leaf.grad = None
        ((ref_mean * g_m).sum() + (0 if g_lp is None else (ref_logp * g_lp).sum())).backward(retain_graph=True)
        grads = linear_token_stats_bwd(
            hidden, weight, bias, labels, lse, None, g_lp, None, TEMPERATURE, IGNORE, True, True, True,
            grad_mean_logp=g_m, config=SMALL,
        )  # fmt: skip
        for name, grad, leaf in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
            assert _rel_err(grad, leaf.grad) < tol_grad, name


def test_mean_logprob_gradient_over_a_masked_vocabulary():
    # d mean_logp / d x_v = (1/V - p_v) / T on every real column: 1/V / T on a -inf one (p = 0), as on cpp and
    # torch, and 0 only on the padding of the last tile (the loss itself is -inf: a masked column has log p = -inf)
    hidden, weight, bias, labels = _inputs(13, 40, 301, torch.float32, True)
    bias[::7] = float("-inf")
    _, _, lse, mean_logp = linear_token_stats_fwd(
        hidden, weight, bias, labels, TEMPERATURE, IGNORE, False, False, True, config=SMALL
    )
    valid = labels != IGNORE
    assert (mean_logp[valid] == float("-inf")).all()
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = (leaves[0] @ leaves[1].T + leaves[2]) / TEMPERATURE
    g_m = torch.randn(13)
    (torch.where(valid, torch.log_softmax(logits, -1).mean(-1), 0.0) * g_m).sum().backward()
    grads = linear_token_stats_bwd(
        hidden, weight, bias, labels, lse, None, None, None, TEMPERATURE, IGNORE, True, True, True,
        grad_mean_logp=g_m, config=SMALL,
    )  # fmt: skip
    for name, grad, leaf in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
        assert _rel_err(grad, leaf.grad) < 1e-5, name
    d_bias = grads[2]
    assert d_bias[::7].abs().min() > 0


def _kl_heads(n, v, dtype, p_bias, q_bias):
    """A student head (H = 40) and a teacher head of another width (H = 24) over one vocabulary."""
    p = _inputs(n, 40, v, dtype, p_bias)[:3]
    q = _inputs(n, 24, v, dtype, q_bias)[:3]
    return (*p, *q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("p_bias", "q_bias"), [(False, False), (True, True), (False, True)], ids=["none", "both", "q"])
@pytest.mark.parametrize(("n", "v"), [(13, 1000), (37, 301)])
def test_linear_kl_matches_float64(n, v, p_bias, q_bias, dtype):
    heads = _kl_heads(n, v, dtype, p_bias, q_bias)
    tol_out, tol_grad = TOL[dtype]
    kl, lse_p, lse_q = linear_kl_fwd(*heads, TEMPERATURE, config=SMALL)
    leaves = [t.double().requires_grad_() if t is not None else None for t in heads]

    def logits(h, w, b):
        return (h @ w.T + (b if b is not None else 0)) / TEMPERATURE

    x_p, x_q = logits(*leaves[:3]), logits(*leaves[3:])
    ref_kl = ref.kl_divergence(x_p, x_q)
    assert kl.dtype == torch.float32 and lse_p.dtype == lse_q.dtype == torch.float64
    assert _rel_err(kl, ref_kl) < tol_out
    assert _rel_err(lse_p, torch.logsumexp(x_p, -1)) < tol_out and _rel_err(lse_q, torch.logsumexp(x_q, -1)) < tol_out
    g = torch.randn(n)  # grad_output != 1, both signs
    (ref_kl * g).sum().backward()
    need = tuple(t is not None for t in heads)
    grads = linear_kl_bwd(*heads, kl, lse_p, lse_q, g, TEMPERATURE, need, config=SMALL)
    names = ("p_hidden", "p_weight", "p_bias", "q_hidden", "q_weight", "q_bias")
    for name, grad, leaf in zip(names, grads, leaves, strict=True):
        if leaf is None:
            assert grad.numel() == 0
            continue
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        assert _rel_err(grad, leaf.grad) < tol_grad, name


@pytest.mark.parametrize("splits", [3, 40])
def test_linear_kl_over_vocabulary_splits(splits):
    # As test_vocabulary_splits, for the two-head KL: both heads' log-sum-exp states and the E_P sum merged
    # over 3 splits, or one vocabulary tile each (P masks columns 0-191, so its first splits are empty), and
    # both heads' dH partials summed.
    heads = list(_kl_heads(37, 1000, torch.float32, True, False))
    heads[2][:192] = float("-inf")
    kl, lse_p, lse_q = linear_kl_fwd(*heads, TEMPERATURE, config=SMALL, splits=splits)
    h_p, w_p, b_p, h_q, w_q, _ = (t.double().requires_grad_() if t is not None else None for t in heads)
    x_p, x_q = (h_p @ w_p.T + b_p) / TEMPERATURE, (h_q @ w_q.T) / TEMPERATURE
    ref_kl = ref.kl_divergence(x_p, x_q)
    assert _rel_err(kl, ref_kl) < 1e-5
    assert _rel_err(lse_p, torch.logsumexp(x_p, -1)) < 1e-5 and _rel_err(lse_q, torch.logsumexp(x_q, -1)) < 1e-5
    # and both heads' dH summed over the same splits
    g = torch.randn(37)
    (ref_kl * g).sum().backward()
    need = (True, False, False, True, False, False)
    d_hp, _, _, d_hq, _, _ = linear_kl_bwd(*heads, kl, lse_p, lse_q, g, TEMPERATURE, need, config=SMALL, splits=splits)
    assert _rel_err(d_hp, h_p.grad) < 1e-5 and _rel_err(d_hq, h_q.grad) < 1e-5


@pytest.mark.parametrize("splits", [1, 3])
def test_large_offsets_over_vocabulary_splits(splits):
    # Logits 6000 + O(3) (P) and -5000 + O(3) (Q), exact in float32: dyadic inputs whose GEMM partial sums all lie
    # on the 2**-11 grid float32 holds below 8192 (as test_linear's _exact_head). Half an ulp of a float32 lse is
    # 2.4e-4 there: the float64 one, merged over the splits, must hold more, the KL's running sum must move between
    # the splits' maxima without rounding x_p - x_q, and every backward's p = exp(x - lse) must be as accurate
    # as at offset 0.
    n, v = 21, 1000

    def head(h, offset):
        hidden = torch.round(torch.randn(n, h) * 8) / 8
        weight = torch.round(torch.randn(v, h) * 3 / h**0.5 * 256) / 256
        return hidden, weight, offset + torch.round(torch.randn(v) * 2048) / 2048

    p, q = head(40, 6000.0), head(24, -5000.0)
    labels = torch.randint(0, v, (n,))
    labels[::5] = IGNORE
    ok = labels != IGNORE
    leaves = [t.double().requires_grad_() for t in (*p, *q)]
    x_p, x_q = leaves[0] @ leaves[1].T + leaves[2], leaves[3] @ leaves[4].T + leaves[5]
    ref_logp, ref_entropy = ref.token_logprobs_and_entropy(x_p, labels, ignore_index=IGNORE)
    ref_kl = ref.kl_divergence(x_p, x_q)

    logp, entropy, lse, _ = linear_token_stats_fwd(*p, labels, 1.0, IGNORE, True, True, config=SMALL, splits=splits)
    assert (lse[ok] - torch.logsumexp(x_p, -1)[ok]).abs().max() < 1e-5
    assert _rel_err(logp, ref_logp.detach()) < 1e-5 and _rel_err(entropy, ref_entropy.detach()) < 1e-5
    g_lp, g_h = torch.randn(n), torch.randn(n)
    truths = torch.autograd.grad((ref_logp * g_lp + ref_entropy * g_h).sum(), leaves[:3], retain_graph=True)
    grads = linear_token_stats_bwd(
        *p, labels, lse, entropy, g_lp, g_h, 1.0, IGNORE, True, True, True, config=SMALL, splits=splits
    )
    for name, grad, truth in zip(("hidden", "weight", "bias"), grads, truths, strict=True):
        assert _rel_err(grad, truth) < 2e-5, name

    kl, lse_p, lse_q = linear_kl_fwd(*p, *q, 1.0, config=SMALL, splits=splits)
    assert (kl - ref_kl).abs().max() < 1e-5
    for got, x in ((lse_p, x_p), (lse_q, x_q)):
        assert (got - torch.logsumexp(x, -1)).abs().max() < 1e-5
    g = torch.randn(n)
    truths = torch.autograd.grad((ref_kl * g).sum(), leaves)
    grads = linear_kl_bwd(*p, *q, kl, lse_p, lse_q, g, 1.0, (True,) * 6, config=SMALL, splits=splits)
    names = ("p_hidden", "p_weight", "p_bias", "q_hidden", "q_weight", "q_bias")
    for name, grad, truth in zip(names, grads, truths, strict=True):
        assert _rel_err(grad, truth) < 2e-5, name


def test_linear_kl_default_16bit_backward_tiles_span_several_tiles():
    # The launch configs of 16-bit inputs, not SMALL: dH on 32 x 128 and dW on 128 x 32 tiles, each walking
    # several tiles of the other dimension with a ragged last one (N = 150, V = 300).
    from rlhf_fast.kernels.linear_kl import CONFIGS

    _, dh_config, dw_config = CONFIGS[torch.bfloat16]
    n, v = 150, 300
    assert n > dw_config.block_n and n % dw_config.block_n and v > dh_config.block_v and v % dh_config.block_v
    heads = _kl_heads(n, v, torch.bfloat16, True, True)
    kl, lse_p, lse_q = linear_kl_fwd(*heads, TEMPERATURE)
    leaves = [t.double().requires_grad_() for t in heads]
    x_p = (leaves[0] @ leaves[1].T + leaves[2]) / TEMPERATURE
    x_q = (leaves[3] @ leaves[4].T + leaves[5]) / TEMPERATURE
    ref_kl = ref.kl_divergence(x_p, x_q)
    assert _rel_err(kl, ref_kl) < TOL[torch.bfloat16][0]
    g = torch.randn(n)
    (ref_kl * g).sum().backward()
    grads = linear_kl_bwd(*heads, kl, lse_p, lse_q, g, TEMPERATURE, (True,) * 6)
    names = ("p_hidden", "p_weight", "p_bias", "q_hidden", "q_weight", "q_bias")
    for name, grad, leaf in zip(names, grads, leaves, strict=True):
        assert _rel_err(grad, leaf.grad) < TOL[torch.bfloat16][1], name


def test_linear_kl_one_side_and_identical_heads():
    # gradients asked one at a time; and P == Q gives KL = 0 with zero gradient (p (log p - log q - 0) = 0, q - p = 0)
    heads = _kl_heads(21, 301, torch.float32, True, True)
    kl, lse_p, lse_q = linear_kl_fwd(*heads, 1.0, config=SMALL)
    leaves = [t.double().requires_grad_() for t in heads]
    ref_kl = ref.kl_divergence(leaves[0] @ leaves[1].T + leaves[2], leaves[3] @ leaves[4].T + leaves[5])
    ref_kl.sum().backward()
    for i, leaf in enumerate(leaves):
        need = tuple(j == i for j in range(6))
        grads = linear_kl_bwd(*heads, kl, lse_p, lse_q, torch.ones(21), 1.0, need, config=SMALL)
        assert [g.numel() > 0 for g in grads] == list(need)
        assert _rel_err(grads[i], leaf.grad) < 1e-5
    same = heads[:3] * 2
    kl, lse_p, lse_q = linear_kl_fwd(*same, 1.0, config=SMALL)
    assert kl.abs().max() < 1e-5
    grads = linear_kl_bwd(*same, kl, lse_p, lse_q, torch.ones(21), 1.0, (True,) * 6, config=SMALL)
    assert all(g.abs().max() < 1e-5 for g in grads)
