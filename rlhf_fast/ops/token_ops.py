"""Per-token quantities straight from logits: log-probability of the label, entropy, exact KL.

Each streams every logits row once forward (online log-sum-exp) and once backward, keeping only a
few float32 numbers per token in between: no ``[tokens, vocab]`` float32 temporary is made.
"""

from __future__ import annotations

from torch import Tensor

from rlhf_fast import _dispatch
from rlhf_fast import _validate as v
from rlhf_fast.ops import _custom


def _prepare(logits, labels, temperature, ignore_index, backend, *, allow_copy=True):
    v.check_logits(logits)
    if labels is not None:
        v.check_labels(labels, logits)
        labels = v.flat_labels(labels)
    temperature = v.check_temperature(temperature)
    ignore_index = v.check_ignore_index(ignore_index)
    backend = _dispatch.resolve(backend, logits.device)
    return v.as_rows(logits, allow_copy=allow_copy), labels, temperature, ignore_index, backend


def token_logprobs(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100, backend=None
) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    ``logp[...] = logits[..., label] / T - logsumexp(logits / T)``; 0 (with zero gradient) where
    ``label == ignore_index``.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16; any strides with the last dim contiguous.
        labels: ``[...]`` int64 or int32, each in ``[0, V)`` or equal to ``ignore_index``.
        temperature: sampling temperature ``T > 0`` (a runtime scalar: new values do not recompile).
        ignore_index: label value that marks positions to skip.
        backend: ``"triton"``, ``"cpp"``, ``"torch"`` or None (by device; see ``rlhf_fast.backends()``).

    Returns:
        ``[...]`` float32. Gradients flow to ``logits`` in its dtype.
    """
    rows, flat, temperature, ignore_index, backend = _prepare(logits, labels, temperature, ignore_index, backend)
    logp, _, _, _ = _custom.token_stats_fwd(rows, flat, temperature, ignore_index, True, False, False, backend)
    return logp.view(labels.shape)


def token_entropy(logits: Tensor, *, temperature: float = 1.0, backend=None) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at each position: ``-sum_v p_v log p_v``.

    Masked (``-inf``) vocabulary entries contribute 0.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16; last dim contiguous.
        temperature, backend: as in :func:`token_logprobs`.

    Returns:
        ``[...]`` float32, differentiable with respect to ``logits``.
    """
    rows, _, temperature, _, backend = _prepare(logits, None, temperature, -100, backend)
    _, entropy, _, _ = _custom.token_stats_fwd(rows, None, temperature, -100, False, True, False, backend)
    return entropy.float().view(logits.shape[:-1])  # float64 from the kernels (for their backward)


def token_logprobs_and_entropy(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100, backend=None
) -> tuple[Tensor, Tensor]:
    """``(token_logprobs, token_entropy)`` from one pass over the logits.

    Both are 0, with zero gradient, where ``label == ignore_index``. Arguments as in
    :func:`token_logprobs`; returns two ``[...]`` float32 tensors.
    """
    rows, flat, temperature, ignore_index, backend = _prepare(logits, labels, temperature, ignore_index, backend)
    logp, entropy, _, _ = _custom.token_stats_fwd(rows, flat, temperature, ignore_index, True, True, False, backend)
    return logp.view(labels.shape), entropy.float().view(labels.shape)


def kl_divergence(p_logits: Tensor, q_logits: Tensor, *, temperature: float = 1.0, backend=None) -> Tensor:
    """Exact ``KL(P || Q) = sum_v P_v (log P_v - log Q_v)`` over the whole vocabulary, per position.

    ``P = softmax(p_logits / T)``, ``Q = softmax(q_logits / T)``. Unlike the k1/k2/k3 estimators
    (``rlhf_fast.kl_estimate``), this sums over every vocabulary entry. Gradients flow to whichever
    input requires them (e.g. a student ``p`` distilled towards a teacher, or both).

    Args:
        p_logits: ``[..., V]`` float32, bfloat16 or float16; last dim contiguous.
        q_logits: same shape, dtype and device as ``p_logits``; its strides may differ.
        temperature, backend: as in :func:`token_logprobs`.

    Returns:
        ``[...]`` float32.
    """
    v.check_logits(p_logits, "p_logits")
    v.check_logits(q_logits, "q_logits")
    if q_logits.shape != p_logits.shape:
        raise ValueError(
            f"q_logits must have the shape of p_logits {tuple(p_logits.shape)}, got {tuple(q_logits.shape)}"
        )
    if q_logits.dtype != p_logits.dtype:
        raise TypeError(f"q_logits must have the dtype of p_logits ({p_logits.dtype}), got {q_logits.dtype}")
    v.check_same_device(q_logits, p_logits, "q_logits", "p_logits")
    temperature = v.check_temperature(temperature)
    backend = _dispatch.resolve(backend, p_logits.device)
    p_rows, q_rows = v.as_rows_pair(p_logits, q_logits)
    kl, _, _ = _custom.kl_fwd(p_rows, q_rows, temperature, backend)
    return kl.view(p_logits.shape[:-1])
