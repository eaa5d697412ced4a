"""Fused-linear forms (chunked path): every backend against float64 ``hidden @ weight.T + bias``."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _cases import overflowing_sum_rows

import rlhf_fast as rf
from rlhf_fast import reference
from rlhf_fast.ops import linear

# max |ours - truth| / max |truth| per tensor: float32 accumulates in float32 throughout; bfloat16
# rounds the logits chunk and the gradient chunk to bfloat16 before the matmuls, as any bf16 head does.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
BACKENDS = ["cpp", "triton", "torch"]


def _skip_unavailable(backend):
    status = rf.backends()[backend]
    if not status.available:
        pytest.skip(status.detail)


def _inputs(shape, H, V, dtype, *, bias, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 3 / H**0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels.view(-1)[::4] = -100
    return hidden, weight, b, labels


def _rel(ours, truth):
    return ((ours.double() - truth).abs().max() / truth.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_and_entropy_match_float64(backend, dtype, bias):
    _skip_unavailable(backend)
    shape, H, V = ((2, 5), 37, 301) if backend == "triton" else ((3, 11), 67, 3001)
    hidden, weight, b, labels = _inputs(shape, H, V, dtype, bias=bias, seed=7)
    # a budget of ~4 rows per chunk: the token loop runs several chunks and a ragged last one
    budget = 4 * linear._row_bytes(V, hidden.element_size())
    logp, ent = rf.linear_token_logprobs_and_entropy(
        hidden, weight, labels, bias=b, temperature=0.9, chunk_bytes=budget, backend=backend
    )
    g = torch.Generator().manual_seed(8)
    g_lp, g_h = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    leaves = [t for t in (hidden, weight, b) if t is not None]
    grads = torch.autograd.grad((logp * g_lp + ent * g_h).sum(), leaves)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    h64, w64 = leaves64[:2]
    logits = h64 @ w64.T + (leaves64[2] if bias else 0)
    ref_lp, ref_h = reference.token_logprobs_and_entropy(logits, labels, temperature=0.9)
    ref_grads = torch.autograd.grad((ref_lp * g_lp + ref_h * g_h).sum(), leaves64)

    tol = REL_TOL[dtype]
    assert _rel(logp, ref_lp) < tol and _rel(ent, ref_h) < tol
    assert (logp[labels == -100] == 0).all() and (ent[labels == -100] == 0).all()
    for name, ours, truth in zip(["hidden", "weight", "bias"], grads, ref_grads, strict=False):
        assert ours.dtype == dtype and ours.shape == truth.shape
        assert _rel(ours, truth) < tol, name


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_chunking_does_not_change_the_result(backend):
    _skip_unavailable(backend)
    hidden, weight, _, labels = _inputs((29,), 40, 1031, torch.float32, bias=False, seed=3)
    results = []
    for budget in (1, 10**9):  # one token per chunk, and everything in one chunk
        logp = rf.linear_token_logprobs(hidden, weight, labels, chunk_bytes=budget, backend=backend)
        results.append((logp, *torch.autograd.grad(logp.sum(), (hidden, weight))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_entropy_only_and_env_budget(monkeypatch):
    hidden, weight, _, _ = _inputs((6,), 16, 257, torch.float32, bias=False, seed=5)
    monkeypatch.setenv(linear.CHUNK_ENV_VAR, str(2 * linear._row_bytes(257, 4)))  # two rows per chunk
    ent = rf.linear_token_entropy(hidden, weight, backend="torch")
    torch.testing.assert_close(ent, reference.token_entropy(hidden @ weight.T), rtol=1e-5, atol=1e-6)
    assert linear._chunk_rows(6, 257, 4, None) == 2
    for bad in ("64MiB", "-5", "0", ""):
        monkeypatch.setenv(linear.CHUNK_ENV_VAR, bad)
        with pytest.raises(ValueError, match=linear.CHUNK_ENV_VAR):
            rf.linear_token_entropy(hidden, weight, backend="torch")


@pytest.mark.parametrize("rows", [3, 2, 1], ids=["3-rows", "2-rows", "1-row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_widened_half_head_is_float32_accurate(backend, dtype, rows, monkeypatch):
    # RLHF_FAST_WIDEN_GEMMS=1: a half-precision head's GEMMs run in float32 on converted blocks (ragged
    # 7-row weight blocks here), so the outputs carry float32 error, not the ~1e-2 of half-precision
    # logits, and the gradients only their final rounding. Token chunks of 3 rows: the vocabulary-outer
    # pass converts all the hidden states at once, and gives the per-token ops' backward dH and db too (no
    # token pass); 2 rows: the same with the hidden states in pieces, over which dW accumulates; 1 row:
    # pieces, and the per-token ops' backward takes the token pass first (a float32 dH would not fit).
    _skip_unavailable(backend)
    N, H, V = 23, 48, 1031
    monkeypatch.setenv(linear.WIDEN_ENV_VAR, "1")
    monkeypatch.setattr(linear, "_WEIGHT_BLOCK_BYTES", 7 * 4 * H)
    hidden, weight, b, labels = _inputs((N,), H, V, dtype, bias=True, seed=61)
    chunk_bytes = rows * linear._row_bytes(V, 4)
    assert linear._chunk_rows(N, V, 4, chunk_bytes) == rows
    assert (rows * V // (2 * H) < N) == (rows < 3) and (N * H <= rows * V) == (rows > 1)
    kw = dict(bias=b, chunk_bytes=chunk_bytes, backend=backend)
    leaves = [hidden, weight, b]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]

    def raw():
        return leaves64[0] @ leaves64[1].T + leaves64[2]

    grad_tol = {torch.bfloat16: 5e-3, torch.float16: 1e-3}[dtype]  # the gradients' own rounding

    def check(ours, truth):
        assert _rel(ours, truth) < 1e-5
        for name, g, g64 in zip(["hidden", "weight", "bias"], torch.autograd.grad(ours.sum(), leaves),
                                torch.autograd.grad(truth.sum(), leaves64), strict=True):  # fmt: skip
            assert g.dtype == dtype and _rel(g, g64) < grad_tol, name

    check(
        rf.linear_cross_entropy(hidden, weight, labels, softcap=2.5, label_smoothing=0.1, **kw),
        torch.nn.functional.cross_entropy(2.5 * torch.tanh(raw() / 2.5), labels, label_smoothing=0.1),
    )
    w_h = torch.randn(N, generator=torch.Generator().manual_seed(62), dtype=torch.float64)
    lp, ent = rf.linear_token_logprobs_and_entropy(hidden, weight, labels, temperature=0.9, **kw)
    ref_lp, ref_ent = reference.token_logprobs_and_entropy(raw(), labels, temperature=0.9)
    check(lp + ent * w_h, ref_lp + ref_ent * w_h)
    # the head alone (frozen hidden states): dW and db without dH
    lp = rf.linear_token_logprobs(hidden.detach(), weight, labels, **kw)
    ref_lp = reference.token_logprobs(raw(), labels)
    for name, g, g64 in zip(["weight", "bias"], torch.autograd.grad((lp * w_h).sum(), leaves[1:]),
                            torch.autograd.grad((ref_lp * w_h).sum(), leaves64[1:]), strict=True):  # fmt: skip
        assert _rel(g, g64) < grad_tol, name
    q_hidden, q_weight, _, _ = _inputs((N,), 40, V, dtype, bias=False, seed=63)
    kl = rf.linear_kl_divergence(hidden, weight, q_hidden, q_weight, p_bias=b, chunk_bytes=chunk_bytes,
                                 backend=backend)  # fmt: skip
    check(kl, reference.kl_divergence(raw(), q_hidden.double() @ q_weight.double().T))


@pytest.mark.parametrize("softcap", [None, 2.5], ids=["plain", "softcap"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_float32_logits_gemm_runs_in_weight_blocks(backend, softcap, monkeypatch):
    # On CPU a float32 head's logits GEMM runs over blocks of weight rows, each writing a column slice of the
    # chunk's logits buffer (ragged 7-row blocks here): the blocks must meet exactly, bias included.
    _skip_unavailable(backend)
    N, H, V = 19, 40, 1031
    monkeypatch.setattr(linear, "_WEIGHT_BLOCK_BYTES", 7 * 4 * H)
    widths = []
    mm, addmm = torch.mm, torch.addmm

    def spy(real):
        def call(*args, out=None):
            if out is not None and out.shape[-1] in (7, V % 7):
                widths.append(out.shape[-1])
            return real(*args, out=out)

        return call

    monkeypatch.setattr(torch, "mm", spy(mm))
    monkeypatch.setattr(torch, "addmm", spy(addmm))
    hidden, weight, b, labels = _inputs((N,), H, V, torch.float32, bias=True, seed=71)
    kw = dict(bias=b, chunk_bytes=5 * linear._row_bytes(V, 4, softcap is not None), softcap=softcap, backend=backend)
    leaves = [hidden, weight, b]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    raw = leaves64[0] @ leaves64[1].T + leaves64[2]
    logits64 = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    w_h = torch.randn(N, generator=torch.Generator().manual_seed(72), dtype=torch.float64)
    for ours, truth in [
        (rf.linear_cross_entropy(hidden, weight, labels, **kw),
         torch.nn.functional.cross_entropy(logits64, labels)),
        ((rf.linear_token_logprobs(hidden, weight, labels, **kw) * w_h).sum(),
         (reference.token_logprobs(logits64, labels) * w_h).sum()),
    ]:  # fmt: skip
        assert _rel(ours, truth) < 1e-5
        for name, g, g64 in zip(["hidden", "weight", "bias"], torch.autograd.grad(ours, leaves),
                                torch.autograd.grad(truth, leaves64, retain_graph=True), strict=True):  # fmt: skip
            assert _rel(g, g64) < 1e-5, name
    # every chunk's logits (forward, and the recomputation in the token op's backward) came in 7-row blocks
    assert widths.count(V % 7) >= 3 * (N // 5 + 1) and widths.count(7) == widths.count(V % 7) * (V // 7)


def test_widen_gemms_setting(monkeypatch):
    monkeypatch.delenv(linear.WIDEN_ENV_VAR, raising=False)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert linear.widen_gemms(torch.bfloat16, cpu) == (not native_bf16)
    assert not linear.widen_gemms(torch.float32, cpu) and not linear.widen_gemms(torch.bfloat16, meta)
    monkeypatch.setenv(linear.WIDEN_ENV_VAR, "0")
    assert not linear.widen_gemms(torch.bfloat16, cpu)
    monkeypatch.setenv(linear.WIDEN_ENV_VAR, "1")
    assert linear.widen_gemms(torch.float16, cpu) and not linear.widen_gemms(torch.float32, cpu)
    monkeypatch.setenv(linear.WIDEN_ENV_VAR, "yes")
    with pytest.raises(ValueError, match=linear.WIDEN_ENV_VAR):
        rf.linear_token_entropy(torch.randn(2, 4).bfloat16(), torch.randn(5, 4).bfloat16())


@pytest.mark.parametrize("widen", ["0", "1"], ids=["bf16-gemms", "widened"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bf16_weight_gradient_by_vocabulary_blocks_with_softcap(backend, widen, monkeypatch):
    # A bfloat16 weight gets dW from the vocabulary-outer pass (no float32 [V, H] accumulator): ragged
    # blocks of columns, labels in every block, Gemma's soft cap chained through each block, and the
    # entropy-only form (no labels); with bfloat16 GEMMs and widened ones, whatever this CPU would pick.
    _skip_unavailable(backend)
    monkeypatch.setenv(linear.WIDEN_ENV_VAR, widen)
    hidden, weight, b, labels = _inputs((23,), 40, 1031, torch.bfloat16, bias=True, seed=21)
    budget = 3 * 1031 * 8  # 3 tokens per chunk, blocks of 3 * 1031 // 23 = 134 columns
    loss = rf.linear_cross_entropy(hidden, weight, labels, bias=b, softcap=2.5, chunk_bytes=budget, backend=backend)
    ent = rf.linear_token_entropy(hidden, weight, bias=b, softcap=2.5, chunk_bytes=budget, backend=backend)
    w_ent = torch.randn(23, generator=torch.Generator().manual_seed(22))
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]

    def logits():
        return 2.5 * torch.tanh((leaves64[0] @ leaves64[1].T + leaves64[2]) / 2.5)

    ref_loss = torch.nn.functional.cross_entropy(logits(), labels)
    assert abs(loss.item() - ref_loss.item()) < REL_TOL[torch.bfloat16]
    _grads_vs_float64(loss, ref_loss, [hidden, weight, b], leaves64, torch.bfloat16)
    ref_ent = reference.token_entropy(logits())
    assert _rel(ent, ref_ent) < REL_TOL[torch.bfloat16]
    _grads_vs_float64((ent * w_ent).sum(), (ref_ent * w_ent).sum(), [hidden, weight, b], leaves64, torch.bfloat16)


def _softcap_forms(hidden, weight, b, labels, kw):
    """Every linear form with a soft cap, as ``name -> callable(hidden, weight, bias, labels) -> scalar`` whose
    float64 twin is the same callable on logits ``c * tanh(raw / c)``."""
    n = labels.numel()
    g = torch.Generator().manual_seed(5)
    w_tok = torch.randn(labels.shape, generator=g)
    old, adv = -7 + torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    ppo = dict(clip_eps=0.2, entropy_coef=0.01)
    ref_c, ref_r = torch.randn(1, generator=g) - 20, torch.randn(1, generator=g) - 20

    def weighted(*per_token):
        return sum((x * w_tok).sum() for x in per_token)

    def dpo(h, w, bb):  # labels [2, T]: one chosen and one rejected response
        return rf.linear_dpo_loss(h[:1], labels[:1], h[1:], labels[1:], w, ref_c, ref_r, bias=bb, **kw)[0]

    return {
        "token_logprobs": (
            lambda h, w, bb: weighted(rf.linear_token_logprobs(h, w, labels, bias=bb, **kw)),
            lambda z: weighted(reference.token_logprobs(z, labels)),
        ),
        "token_entropy": (
            lambda h, w, bb: weighted(rf.linear_token_entropy(h, w, bias=bb, **kw)),
            lambda z: weighted(reference.token_entropy(z)),
        ),
        "token_logprobs_and_entropy": (
            lambda h, w, bb: weighted(*rf.linear_token_logprobs_and_entropy(h, w, labels, bias=bb, **kw)),
            lambda z: weighted(*reference.token_logprobs_and_entropy(z, labels)),
        ),
        "cross_entropy": (
            lambda h, w, bb: rf.linear_cross_entropy(h, w, labels, bias=bb, **kw),
            lambda z: torch.nn.functional.cross_entropy(z.reshape(n, -1), labels.reshape(n)),
        ),
        "ppo_loss": (
            lambda h, w, bb: rf.linear_ppo_loss(h, w, labels, old, adv, bias=bb, **ppo, **kw)[0],
            lambda z: reference.ppo_loss(z, labels, old.double(), adv.double(), **ppo)[0],
        ),
        "dpo_loss": (
            dpo,
            lambda z: reference.dpo_loss(z[:1], labels[:1], z[1:], labels[1:], ref_c.double(), ref_r.double())[0],
        ),
    }


@pytest.mark.parametrize("form", ["token_logprobs", "token_entropy", "token_logprobs_and_entropy", "cross_entropy",
                                  "ppo_loss", "dpo_loss"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_reaches_every_linear_form(backend, form, dtype):
    # Gemma 2's final soft cap changes every output; a form that dropped it would match the uncapped logits.
    # On cpp and torch a capped head takes the chunked path (a half-precision one gets its weight gradient
    # from the vocabulary-outer pass); on Triton the tl.dot kernels apply the cap tile by tile.
    _skip_unavailable(backend)
    hidden, weight, b, labels = _inputs((2, 7), 24, 257, dtype, bias=True, seed=51)
    kw = dict(softcap=1.5, chunk_bytes=3 * linear._row_bytes(257, 4, softcap=True), backend=backend)
    ours, ref = _softcap_forms(hidden, weight, b, labels, kw)[form]
    loss = ours(hidden, weight, b)
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    raw = leaves64[0] @ leaves64[1].T + leaves64[2]
    ref_loss = ref(1.5 * torch.tanh(raw / 1.5))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item())), (loss, ref_loss)
    assert abs(ref_loss.item() - ref(raw).item()) > 1e-2  # the cap matters
    _grads_vs_float64(loss, ref_loss, [hidden, weight, b], leaves64, dtype)


@pytest.mark.parametrize("softcap", [None, 2.5], ids=["plain", "softcap"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_hidden_view_of_a_shifted_sequence(backend, softcap):
    """``hidden[:, :-1]`` (next-token prediction: not contiguous), with and without the cap, temperature != 1,
    ignored labels and an upstream gradient != 1: the view's gradient lands in its own positions, 0 in the last."""
    _skip_unavailable(backend)
    full, weight, b, _ = _inputs((2, 8), 24, 257, torch.float32, bias=True, seed=61)
    _, _, _, labels = _inputs((2, 7), 24, 257, torch.float32, bias=False, seed=62)
    hidden = full[:, :-1]
    assert not hidden.is_contiguous()
    kw = dict(bias=b, temperature=0.8, softcap=softcap, chunk_bytes=3 * linear._row_bytes(257, 4, softcap=True))
    w_tok = torch.randn(labels.shape, generator=torch.Generator().manual_seed(63))
    loss = (rf.linear_token_logprobs(hidden, weight, labels, backend=backend, **kw) * w_tok).sum()
    leaves64 = [t.detach().double().requires_grad_() for t in (full, weight, b)]
    raw = leaves64[0][:, :-1] @ leaves64[1].T + leaves64[2]
    logits = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    ref_loss = (reference.token_logprobs(logits, labels, temperature=0.8) * w_tok).sum()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    _grads_vs_float64(loss, ref_loss, [full, weight, b], leaves64, torch.float32)
    (d_full,) = torch.autograd.grad(
        (rf.linear_token_logprobs(hidden, weight, labels, backend=backend, **kw) * w_tok).sum(), full
    )
    assert (d_full[:, -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_of_linear_cross_entropy(backend):
    # cpp/torch compute the head's gradients in the forward and scale them in place in the backward: a
    # second backward is refused with that explanation. Triton's kernels recompute in the backward: it runs.
    _skip_unavailable(backend)
    hidden, weight, _, labels = _inputs((5,), 8, 33, torch.float32, bias=False, seed=3)
    loss = rf.linear_cross_entropy(hidden, weight, labels, backend=backend) * 0.5
    loss.backward(retain_graph=True)
    if backend == "triton":
        once = weight.grad.clone()
        loss.backward()
        torch.testing.assert_close(weight.grad, 2 * once)
    else:
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            loss.backward()


def test_bad_inputs_name_the_argument():
    hidden, weight, b, labels = _inputs((4,), 8, 33, torch.float32, bias=True, seed=1)
    with pytest.raises(ValueError, match="weight"):
        rf.linear_token_logprobs(hidden, weight[:, :7], labels)
    with pytest.raises(TypeError, match="weight"):
        rf.linear_token_logprobs(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="bias"):
        rf.linear_token_logprobs(hidden, weight, labels, bias=b[:5])
    with pytest.raises(ValueError, match="labels"):
        rf.linear_token_logprobs(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="labels"):
        rf.linear_token_logprobs(hidden, weight, torch.full((4,), 33))
    with pytest.raises(ValueError, match="chunk_bytes"):
        rf.linear_token_logprobs(hidden, weight, labels, chunk_bytes=0)
    with pytest.raises(ValueError, match="temperature"):
        rf.linear_token_entropy(hidden, weight, temperature=0.0)
    with pytest.raises(TypeError, match="hidden"):
        rf.linear_token_entropy(hidden.long(), weight)
    with pytest.raises(ValueError, match="softcap"):
        rf.linear_token_logprobs(hidden, weight, labels, softcap=float("inf"))
    with pytest.raises(ValueError, match="softcap"):  # 1 / c and c past float32's range: NaN in the kernels
        rf.linear_token_logprobs(hidden, weight, labels, softcap=1e-39)
    with pytest.raises(ValueError, match=r"softcap / temperature"):
        rf.linear_token_entropy(hidden, weight, softcap=1e-20, temperature=1e20)
    # the two heads of the KL name their own arguments
    with pytest.raises(ValueError, match="q_bias"):
        rf.linear_kl_divergence(hidden, weight, hidden, weight, q_bias=b[:5])
    with pytest.raises(ValueError, match="q_weight"):
        rf.linear_kl_divergence(hidden, weight, hidden, weight[:, :7])
    with pytest.raises(ValueError, match="p_weight"):
        rf.linear_kl_divergence(hidden, weight[:, :7], hidden, weight)
    with pytest.raises(ValueError, match="q_hidden is on meta"):  # a teacher on another device
        rf.linear_kl_divergence(hidden, weight, hidden.to("meta"), weight.to("meta"))


def _grads_vs_float64(loss, ref_loss, leaves, leaves64, dtype, baseline=None):
    """Gradients within REL_TOL of float64; with ``baseline`` (PyTorch's own gradients computed from
    the same low-precision inputs), within twice PyTorch's own error instead (flash-attention's rule)."""
    truths = torch.autograd.grad(ref_loss, leaves64)
    bases = baseline if baseline is not None else [None] * len(truths)
    for name, ours, truth, base in zip(
        ["hidden", "weight", "bias"], torch.autograd.grad(loss, leaves), truths, bases, strict=True
    ):
        assert ours.dtype == dtype and ours.shape == truth.shape
        bound = REL_TOL[dtype] if base is None else 2 * _rel(base, truth) + 1e-3
        assert _rel(ours, truth) < bound, name


@pytest.mark.parametrize(
    ("reduction", "smoothing"), [("mean", 0.0), ("mean", 0.1), ("sum", 0.0), ("none", 0.0), ("none", 0.1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_matches_float64(backend, dtype, reduction, smoothing):
    _skip_unavailable(backend)
    shape, H, V = ((2, 5), 24, 301) if backend == "triton" else ((3, 11), 67, 3001)
    hidden, weight, b, labels = _inputs(shape, H, V, dtype, bias=True, seed=11)
    budget = 5 * linear._row_bytes(V, hidden.element_size())
    loss = rf.linear_cross_entropy(
        hidden, weight, labels, bias=b, reduction=reduction, label_smoothing=smoothing, chunk_bytes=budget,
        backend=backend,
    )  # fmt: skip
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    logits = leaves64[0] @ leaves64[1].T + leaves64[2]
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, V), labels.reshape(-1), reduction=reduction, label_smoothing=smoothing
    )
    ref = ref.view(shape) if reduction == "none" else ref
    assert _rel(loss, ref) < REL_TOL[dtype]
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5
    _grads_vs_float64((loss * grad_out).sum(), (ref * grad_out).sum(), [hidden, weight, b], leaves64, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_label_smoothing_where_the_sum_of_the_logits_overflows(backend):
    # The linear form of test_cross_entropy's test of the same name: logits = I @ X (each hidden row picks one
    # row of X), finite, whose float32 sum overflows.
    _skip_unavailable(backend)
    x = overflowing_sum_rows(67)
    hidden, weight = torch.eye(3).requires_grad_(), x.T.contiguous().requires_grad_()
    labels = torch.tensor([3, 3, 40])
    loss = rf.linear_cross_entropy(hidden, weight, labels, reduction="none", label_smoothing=0.1, backend=backend)
    ref = torch.nn.functional.cross_entropy(x.double(), labels, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ppo_loss_matches_float64(backend, dtype):
    _skip_unavailable(backend)
    shape, H, V = ((2, 5), 24, 301) if backend == "triton" else ((3, 11), 67, 3001)
    hidden, weight, b, labels = _inputs(shape, H, V, dtype, bias=True, seed=13)
    g = torch.Generator().manual_seed(14)
    with torch.no_grad():
        logp0 = reference.token_logprobs(hidden.double() @ weight.double().T + b.double(), labels)
    old = logp0 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    # Keep every ratio away from the clip bounds (0.8, 1.28) and the dual clip (3): bf16 logits move a
    # log-prob by ~1e-2, and a token that crosses a bound switches its gradient on or off.
    ratio = torch.exp(logp0 - old)
    near = ((ratio - 0.8).abs() < 0.05) | ((ratio - 1.28).abs() < 0.05) | ((ratio - 3.0).abs() < 0.1)
    old = torch.where(near, logp0, old).float()
    ref_lp = (logp0 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(shape, generator=g)
    kw = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3",
              entropy_coef=0.01, temperature=0.9, loss_agg="seq-mean-token-mean")  # fmt: skip
    budget = 4 * linear._row_bytes(V, hidden.element_size())
    loss, stats = rf.linear_ppo_loss(
        hidden, weight, labels, old, adv, bias=b, ref_logprobs=ref_lp, chunk_bytes=budget, backend=backend, **kw
    )
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    logits = leaves64[0] @ leaves64[1].T + leaves64[2]
    ref_loss, ref_stats = reference.ppo_loss(
        logits, labels, old.double(), adv.double(), ref_logprobs=ref_lp.double(), **kw
    )
    # The loss is a weighted mean (weights summing to 1) of O(1) per-token terms that largely cancel,
    # so its error is held to the scale of those terms, not to its own small value.
    assert abs(loss.item() - ref_loss.item()) < REL_TOL[dtype]
    for key in ("approx_kl", "entropy", "kl_ref"):
        assert abs(stats[key].item() - ref_stats[key].item()) <= REL_TOL[dtype] * max(1.0, abs(ref_stats[key].item()))
    # clip_frac counts tokens: rounding may move one token across a clip bound, no more.
    n_valid = (labels != -100).sum().item()
    assert abs(stats["clip_frac"].item() - ref_stats["clip_frac"].item()) <= 1.0 / n_valid + 1e-6
    baseline = None
    if dtype != torch.float32:
        # PyTorch the usual way on the same bf16 inputs: a bf16 logits tensor, then float32 math. A
        # PPO gradient multiplies log-prob errors by ratio and exp(ref - logp) factors, so bf16 logits
        # alone put it ~10% off float64; the kernels are held to twice that error.
        base_leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
        base_logits = base_leaves[0] @ base_leaves[1].T + base_leaves[2]
        base_loss, _ = reference.ppo_loss(base_logits, labels, old, adv, ref_logprobs=ref_lp, **kw)
        baseline = torch.autograd.grad(base_loss * 1.7, base_leaves)
    _grads_vs_float64(loss * 1.7, ref_loss * 1.7, [hidden, weight, b], leaves64, dtype, baseline)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_losses_without_grad_and_fully_ignored(backend):
    _skip_unavailable(backend)
    hidden, weight, _, labels = _inputs((2, 6), 16, 129, torch.float32, bias=False, seed=21)
    labels.fill_(-100)
    for smoothing in (0.0, 0.1):
        loss = rf.linear_cross_entropy(hidden, weight, labels, label_smoothing=smoothing, backend=backend)
        g_h, g_w = torch.autograd.grad(loss, (hidden, weight))
        assert loss.item() == 0.0 and not g_h.any() and not g_w.any()
    zeros = torch.zeros(labels.shape)
    loss, stats = rf.linear_ppo_loss(hidden, weight, labels, zeros, zeros, entropy_coef=0.1, backend=backend)
    g_h, g_w = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and not g_h.any() and not g_w.any()
    assert all(torch.isfinite(s) for s in stats.values())
    with torch.no_grad():
        loss = rf.linear_cross_entropy(hidden, weight, labels, backend=backend)
    assert loss.item() == 0.0 and not loss.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_dpo_loss_matches_float64(backend, loss_type):
    _skip_unavailable(backend)
    B, T, H, V = (2, 4, 24, 301) if backend == "triton" else (3, 9, 40, 1031)
    hidden, weight, b, labels = _inputs((2 * B, T), H, V, torch.float32, bias=True, seed=17)
    ref_c, ref_r = torch.randn(B) - 20, torch.randn(B) - 20
    kw = dict(beta=0.2, loss_type=loss_type, average_logprobs=loss_type == "ipo", nll_coef=0.3)
    # chosen and rejected are views into one [2B, T, H] batch, as a concatenated forward gives them
    loss, stats = rf.linear_dpo_loss(
        hidden[:B], labels[:B], hidden[B:], labels[B:], weight, ref_c, ref_r, bias=b, backend=backend, **kw
    )
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    logits = leaves64[0] @ leaves64[1].T + leaves64[2]
    ref_loss, ref_stats = reference.dpo_loss(
        logits[:B], labels[:B], logits[B:], labels[B:], ref_c.double(), ref_r.double(), **kw
    )
    assert _rel(loss, ref_loss) < REL_TOL[torch.float32]
    for key, value in ref_stats.items():
        assert stats[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-5), key
    _grads_vs_float64(loss, ref_loss, [hidden, weight, b], leaves64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_kl_divergence_matches_float64(backend):
    _skip_unavailable(backend)
    shape, V = ((2, 5), 301) if backend == "triton" else ((3, 11), 2003)
    p_hidden, p_weight, p_bias, _ = _inputs(shape, 24, V, torch.float32, bias=True, seed=31)
    q_hidden, q_weight, _, _ = _inputs(shape, 40, V, torch.float32, bias=False, seed=32)  # another H
    budget = 4 * linear._row_bytes(V, 4)  # two rows per chunk (the KL keeps two heads' chunks)
    kl = rf.linear_kl_divergence(
        p_hidden, p_weight, q_hidden, q_weight, p_bias=p_bias, temperature=1.3, chunk_bytes=budget, backend=backend
    )
    leaves = [p_hidden, p_weight, p_bias, q_hidden, q_weight]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.kl_divergence(
        leaves64[0] @ leaves64[1].T + leaves64[2], leaves64[3] @ leaves64[4].T, temperature=1.3
    )
    assert _rel(kl, ref) < REL_TOL[torch.float32]
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(33))
    for ours, truth in zip(
        torch.autograd.grad((kl * grad_out).sum(), leaves),
        torch.autograd.grad((ref * grad_out).sum(), leaves64),
        strict=True,
    ):
        assert _rel(ours, truth) < REL_TOL[torch.float32]


def test_linear_kl_gradient_to_one_side_only():
    p_hidden, p_weight, _, _ = _inputs((7,), 16, 129, torch.float32, bias=False, seed=41)
    teacher_h, teacher_w = (t.detach() for t in _inputs((7,), 16, 129, torch.float32, bias=False, seed=42)[:2])
    kl = rf.linear_kl_divergence(p_hidden, p_weight, teacher_h, teacher_w, backend="torch")
    g_h, g_w = torch.autograd.grad(kl.sum(), (p_hidden, p_weight))
    assert g_h.shape == p_hidden.shape and g_w.shape == p_weight.shape
    with pytest.raises(ValueError, match="q_hidden"):
        rf.linear_kl_divergence(p_hidden, p_weight, teacher_h[:3], teacher_w)


def _exact_head(n, H, V, offset, seed):
    """A float32 head whose logits ``offset + O(3)``, ``4096 < |offset| < 8000``, are exact: entries on dyadic grids
    (h on 2**-3, W on 2**-8, the bias on 2**-11), so that every partial sum of the GEMM lies on the 2**-11 grid
    that float32 holds below 8192. The float64 reference then sees the very logits the kernels do: what differs is
    the kernels' own error."""
    g = torch.Generator().manual_seed(seed)

    def on_grid(t, bits):
        return (torch.round(t * 2**bits) / 2**bits).requires_grad_()

    hidden = on_grid(torch.randn(n, H, generator=g), 3)
    weight = on_grid(torch.randn(V, H, generator=g) * 3 / H**0.5, 8)
    return hidden, weight, on_grid(offset + torch.randn(V, generator=g), 11)


@pytest.mark.parametrize("form", ["token_logprobs", "token_entropy", "cross_entropy", "kl_divergence"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gradients_at_a_large_logit_offset(backend, form):
    # Logits 6000 + O(3) (P) and -5000 + O(3) (Q), exact in float32 (see _exact_head). A float32 lse is off by up
    # to half its ulp there, 2.4e-4, and so is every p = exp(x - lse) a backward recomputes from it: 7e-5 to 4e-4
    # normwise gradient errors (Triton, and the chunked KL). With the float64 lse they are below 1e-6, as at
    # offset 0; so is the KL itself, which x_p - x_q (rounded to 1e-3 at 11000) would spoil.
    _skip_unavailable(backend)
    n, H, V = 16, 24, 301
    p_head = _exact_head(n, H, V, 6000.0, seed=81)
    labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(82))
    labels[::4] = -100
    grad_out = torch.randn(n, generator=torch.Generator().manual_seed(83), dtype=torch.float64)
    leaves = list(p_head)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]

    def logits(h, w, b):
        return h @ w.T + b

    if form == "token_logprobs":
        out = rf.linear_token_logprobs(*p_head[:2], labels, bias=p_head[2], backend=backend)
        ref = reference.token_logprobs(logits(*leaves64), labels)
    elif form == "token_entropy":
        out = rf.linear_token_entropy(*p_head[:2], bias=p_head[2], backend=backend)
        ref = reference.token_entropy(logits(*leaves64))
    elif form == "cross_entropy":
        out = rf.linear_cross_entropy(*p_head[:2], labels, bias=p_head[2], label_smoothing=0.1, backend=backend)
        ref = torch.nn.functional.cross_entropy(logits(*leaves64), labels, label_smoothing=0.1)
        grad_out = torch.ones((), dtype=torch.float64)
    else:
        q_head = _exact_head(n, 16, V, -5000.0, seed=84)  # another H
        leaves += q_head
        leaves64 += [t.detach().double().requires_grad_() for t in q_head]
        out = rf.linear_kl_divergence(
            p_head[0], p_head[1], q_head[0], q_head[1], p_bias=p_head[2], q_bias=q_head[2], backend=backend
        )
        ref = reference.kl_divergence(logits(*leaves64[:3]), logits(*leaves64[3:]))
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((out * grad_out.float()).sum(), leaves)
    truths = torch.autograd.grad((ref * grad_out).sum(), leaves64)
    names = ["p_hidden", "p_weight", "p_bias", "q_hidden", "q_weight", "q_bias"]
    for name, ours, truth in zip(names, grads, truths, strict=False):
        err = _rel(ours, truth)
        assert err <= 2e-5, f"{name}: max |err| / max |truth| = {err:.3g}"


_PEAK_MEMORY_SCRIPT = """
import ctypes, gc, json, sys, torch
import rlhf_fast as rf
N, H, V = 2048, 1024, 131072
torch.manual_seed(0)
hidden = torch.randn(N, H).requires_grad_()
weight = (torch.randn(V, H) * 0.03).requires_grad_()
labels = torch.randint(0, V, (N,))
def vm(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
rf.linear_token_logprobs(hidden[:8], weight, labels[:8], backend=sys.argv[1]).sum().backward()  # warm-up
hidden.grad = weight.grad = None
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages must count again when reused
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current resident size
base = vm("VmHWM:")
logp = rf.linear_token_logprobs(hidden, weight, labels, backend=sys.argv[1])
gh, gw = torch.autograd.grad(logp.sum(), (hidden, weight))
print(json.dumps({"peak": vm("VmHWM:") - base, "grads": (gh.numel() + gw.numel()) * 4, "logits": N * V * 4}))
"""


@pytest.mark.slow
def test_linear_token_logprobs_peak_memory():
    # The case: forward+backward at 2048 tokens, H=1024, V=131072 float32 peaks at well under
    # one logits tensor (< 25% of N*V*4 bytes) beyond inputs and gradients, in a fresh process.
    _skip_unavailable("cpp")
    root = os.path.dirname(os.path.dirname(os.path.abspath(rf.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, "cpp"], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr
    mem = json.loads(done.stdout.splitlines()[-1])
    assert mem["peak"] - mem["grads"] < 0.25 * mem["logits"], mem
