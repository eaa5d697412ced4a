"""Fused-linear forms (chunked path): every backend against float64 ``hidden @ weight.T + bias``."""

import pytest
import torch

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
    budget = 4 * V * (2 * hidden.element_size() + 4)
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
    monkeypatch.setenv(linear.CHUNK_ENV_VAR, str(257 * 12 * 2))  # two rows per chunk
    ent = rf.linear_token_entropy(hidden, weight, backend="torch")
    torch.testing.assert_close(ent, reference.token_entropy(hidden @ weight.T), rtol=1e-5, atol=1e-6)
    assert linear._chunk_rows(6, 257, 4, None) == 2


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
