"""The cpp backend's cache of large gradient buffers (csrc/buffer_cache.h, rlhf_fast/buffer_cache.py).

A reused buffer must never leak the previous call's values, never be handed out while a tensor still
uses it, survive autograd keeping it as ``.grad``, and obey its limit and ``empty_cache``.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rlhf_fast as rf

# 96 x 12289 float32 is 4.5 MiB: above the cache's 4 MiB minimum.
ROWS, VOCAB = 96, 12289
IGNORE = -100


@pytest.fixture(autouse=True)
def _clean_cache():
    if not rf.backends()["cpp"].available:
        pytest.skip("the C++ extension is not built")
    rf.empty_cache()
    limit = rf.set_cache_limit(4 << 30)
    yield
    rf.set_cache_limit(limit)
    rf.empty_cache()


def _ce_grad(logits, labels, **kw):
    x = logits.detach().requires_grad_()
    (grad,) = torch.autograd.grad(rf.cross_entropy(x, labels, backend="cpp", **kw), x)
    return grad


def _ce_grad64(logits, labels, **kw):
    x = logits.detach().double().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(x, labels, ignore_index=IGNORE, **kw), x)
    return grad


def _inputs(rows=ROWS, vocab=VOCAB):
    return torch.randn(rows, vocab) * 3, torch.randint(0, vocab, (rows,))


def test_reused_buffer_is_the_same_memory_and_holds_no_stale_values():
    logits, labels = _inputs()
    first = _ce_grad(logits, labels)
    ptr = first.data_ptr()
    assert torch.allclose(first.double(), _ce_grad64(logits, labels), rtol=1e-5, atol=1e-9)
    del first
    info = rf.cache_info()
    assert info["idle_blocks"] == 1 and info["idle_bytes"] >= ROWS * VOCAB * 4
    # Every label ignored: the gradient is exactly zero, written over the previous call's values.
    ignored = torch.full_like(labels, IGNORE)
    second = _ce_grad(torch.randn(ROWS, VOCAB), ignored, reduction="sum")
    assert second.data_ptr() == ptr
    assert rf.cache_info()["hits"] == info["hits"] + 1
    assert torch.equal(second, torch.zeros_like(second))


def test_live_gradient_is_never_handed_out_again():
    logits, labels = _inputs()
    first = _ce_grad(logits, labels)
    other_logits, other_labels = _inputs()
    second = _ce_grad(other_logits, other_labels, reduction="sum")
    assert second.data_ptr() != first.data_ptr()
    assert torch.allclose(first.double(), _ce_grad64(logits, labels), rtol=1e-5, atol=1e-9)
    expected = _ce_grad64(other_logits, other_labels, reduction="sum")
    assert torch.allclose(second.double(), expected, rtol=1e-5, atol=1e-8)


def test_gradient_kept_by_autograd_accumulates_and_returns_on_release():
    # AccumulateGrad keeps the cached tensor itself as .grad; a second backward adds into it.
    logits, labels = _inputs()
    x = logits.clone().requires_grad_()
    rf.cross_entropy(x, labels, backend="cpp").backward()
    ptr = x.grad.data_ptr()
    rf.cross_entropy(x, labels, backend="cpp").backward()
    assert torch.allclose(x.grad.double(), 2 * _ce_grad64(logits, labels), rtol=1e-5, atol=1e-9)
    assert x.grad.data_ptr() == ptr  # added into, not replaced
    idle = rf.cache_info()["idle_blocks"]  # the second call's own buffer, already released
    x.grad = None
    assert rf.cache_info()["idle_blocks"] == idle + 1


def test_two_buffers_at_once_kl_divergence():
    # kl_bwd allocates both gradients in one call: two blocks, each correct.
    p, q = torch.randn(ROWS, VOCAB) * 2, torch.randn(ROWS, VOCAB) * 2
    for _ in range(2):  # the second round runs on the cached blocks
        pp, qq = p.clone().requires_grad_(), q.clone().requires_grad_()
        gp, gq = torch.autograd.grad(rf.kl_divergence(pp, qq, backend="cpp").sum(), (pp, qq))
        assert gp.data_ptr() != gq.data_ptr()
        p64, q64 = p.double().requires_grad_(), q.double().requires_grad_()
        ref = rf.reference.kl_divergence(p64, q64).sum()
        rp, rq = torch.autograd.grad(ref, (p64, q64))
        assert torch.allclose(gp.double(), rp, rtol=1e-4, atol=1e-8)
        assert torch.allclose(gq.double(), rq, rtol=1e-4, atol=1e-8)
        del gp, gq
    assert rf.cache_info()["hits"] >= 2


def test_other_size_releases_idle_blocks_first():
    _ce_grad(*_inputs())
    assert rf.cache_info()["idle_blocks"] == 1
    misses = rf.cache_info()["misses"]
    big = _ce_grad(*_inputs(rows=3 * ROWS))  # 3x the size: no idle block fits
    assert rf.cache_info()["misses"] == misses + 1
    assert rf.cache_info()["idle_bytes"] == 0  # the small block was unmapped before the new one
    del big
    assert rf.cache_info()["idle_blocks"] == 1


def test_small_buffers_bypass_the_cache():
    before = rf.cache_info()
    _ce_grad(*_inputs(rows=3, vocab=1031))
    after = rf.cache_info()
    assert (after["hits"], after["misses"], after["idle_blocks"]) == (before["hits"], before["misses"], 0)


def test_empty_cache_and_limit():
    _ce_grad(*_inputs())
    idle = rf.cache_info()["idle_bytes"]
    assert idle > 0
    assert rf.empty_cache() == idle
    assert rf.cache_info()["idle_bytes"] == 0
    assert rf.set_cache_limit(0) == 4 << 30
    misses = rf.cache_info()["misses"]
    logits, labels = _inputs()
    grad = _ce_grad(logits, labels)
    assert torch.allclose(grad.double(), _ce_grad64(logits, labels), rtol=1e-5, atol=1e-9)
    del grad
    assert rf.cache_info()["misses"] == misses and rf.cache_info()["idle_bytes"] == 0  # off: not used at all
    # A limit below one block keeps nothing idle.
    rf.set_cache_limit(1 << 20)
    _ce_grad(*_inputs())
    assert rf.cache_info()["idle_bytes"] == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="limit_bytes"):
        rf.set_cache_limit(bad)


def _run(env_value: str) -> subprocess.CompletedProcess:
    code = "import torch, rlhf_fast as rf; print(rf.cache_info()['limit_bytes'])"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "RLHF_FAST_CACHE_BYTES": env_value},
        timeout=120,
    )


def test_limit_from_environment():
    done = _run("12345")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "12345"
    done = _run("lots")
    assert done.returncode != 0
    assert "RLHF_FAST_CACHE_BYTES" in done.stderr


def test_slightly_smaller_request_reuses_a_larger_block():
    _ce_grad(*_inputs())
    hits = rf.cache_info()["hits"]
    logits, labels = _inputs(rows=ROWS - 9)  # within a quarter of the idle block
    grad = _ce_grad(logits, labels, reduction="sum")
    assert rf.cache_info()["hits"] == hits + 1
    assert torch.allclose(grad.double(), _ce_grad64(logits, labels, reduction="sum"), rtol=1e-5, atol=1e-8)
    del grad
    _ce_grad(*_inputs(rows=ROWS // 2))  # half the size: a new block, the idle one released first
    assert rf.cache_info()["hits"] == hits + 1
