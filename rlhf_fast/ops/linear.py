"""Fused-linear forms: hidden states and the LM-head weight in, the ``[tokens, vocab]`` logits never
held whole.

This module is the chunked path (CPU, and any backend): tokens are processed in chunks whose logits
fit a memory budget; each chunk is one matmul through PyTorch's BLAS (on CPU a float32 head's runs
over cache-sized blocks of weight rows, which is faster there) followed by the per-token kernel of the
chosen backend, all chunks of a pass sharing one logits buffer. The backward pass
recomputes each chunk's logits and has the kernel overwrite them with their gradient; ``dH`` rows are
complete per chunk, ``db`` and a float32 ``dW`` accumulate across chunks, and a ``dW`` of any other
dtype comes from a second, vocabulary-outer pass (one GEMM per block of vocabulary rows over all the
tokens) rather than from a float32 ``[V, H]`` accumulator. Peak extra memory is about one chunk,
whatever the vocabulary and token counts.

On a CPU without bfloat16/float16 dot-product instructions PyTorch's half-precision ``torch.mm`` runs
several times slower than its float32 one (6-11 against 60-74 GFLOP/s on an AVX2 Zen 1 EPYC). There a
half-precision head runs every GEMM in float32 ("widened"): the logits chunk is float32, and the weight
(or, in the vocabulary-outer pass, the hidden states) is converted block by block into a cache-sized
float32 buffer right before the GEMM that reads it, which costs no measurable time; see
:func:`widen_gemms`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from rlhf_fast import _dispatch, _torch_backend
from rlhf_fast import _validate as v
from rlhf_fast.ops import _custom
from rlhf_fast.ops.cross_entropy import REDUCTIONS, smoothed_nll
from rlhf_fast.ops.fused import forward_gradients

DEFAULT_CHUNK_BYTES = 64 * 2**20
CHUNK_ENV_VAR = "RLHF_FAST_CHUNK_BYTES"
WIDEN_ENV_VAR = "RLHF_FAST_WIDEN_GEMMS"
# float32 weight rows per logits GEMM on CPU (converted at a time when widened): the block stays in cache for
# its GEMM. For a float32 head this also beats one GEMM over the whole vocabulary: at 174 tokens x H 1024 x
# V 32000 (a 64 MiB chunk) on a Zen 4 EPYC the logits GEMMs of 4096 tokens took 1.6-1.8 s in 512-row blocks
# against 2.1-2.3 s whole (MKL with a short M and a long N), and linear_cross_entropy 4.85 s against 5.49 s.
_WEIGHT_BLOCK_BYTES = 2 * 2**20


def widen_gemms(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the chunked path runs the GEMMs of a ``dtype`` head on ``device`` in float32.

    ``RLHF_FAST_WIDEN_GEMMS`` = ``auto`` (default), ``1`` or ``0``. ``auto`` widens bfloat16 on CPUs
    without AVX512-BF16 or AMX and float16 on CPUs without AMX-FP16, where PyTorch's half-precision GEMM
    has no hardware dot product. Float32 heads and other devices never widen."""
    setting = os.environ.get(WIDEN_ENV_VAR, "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"{WIDEN_ENV_VAR} must be auto, 0 or 1, got {setting!r}")
    if dtype == torch.float32 or device.type != "cpu":
        return False
    if setting != "auto":
        return setting == "1"
    if dtype == torch.bfloat16:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return not torch.cpu._is_amx_fp16_supported()


def _logits_bytes(hidden: Tensor) -> int:
    """Bytes per element of the chunked path's logits for this head: float32 when widened."""
    return 4 if widen_gemms(hidden.dtype, hidden.device) else hidden.element_size()


def _row_bytes(vocab: int, elem_bytes: int, softcap: bool = False) -> int:
    """Bytes a chunk reserves per token: its logits (``elem_bytes`` each; the gradient overwrites them in place)
    and 4 per element for float32 temporaries (a half-precision chunk's float32 bias-gradient sum, BLAS
    packing). A soft cap keeps its float32 ``tanh`` beside the logits and forms its gradient through it:
    ``elem_bytes`` more."""
    return vocab * (elem_bytes + 4 + (elem_bytes if softcap else 0))


def _chunk_rows(n_rows: int, vocab: int, elem_bytes: int, chunk_bytes: int | None, softcap: bool = False) -> int:
    """Tokens per chunk for a budget of ``chunk_bytes`` (``_row_bytes`` per token).

    Without a soft cap a float32 pass holds half of it, its logits buffer: 4096 x 1024 x 32000 takes 262-token
    chunks and ~32 MiB of extra memory (0.21x PyTorch's own ``linear_cross_entropy``). A reservation of 12 bytes
    per element (174-token chunks, 21 MiB) made the float32 op ~10% slower here: the three GEMMs of a chunk run
    below their rate at 174 rows (see benchmarks/RESULTS.md); a larger budget buys larger GEMMs still."""
    if chunk_bytes is None:
        setting = os.environ.get(CHUNK_ENV_VAR, str(DEFAULT_CHUNK_BYTES))
        if not setting.strip().isdigit() or int(setting) <= 0:
            raise ValueError(f"{CHUNK_ENV_VAR} must be a positive int (bytes), got {setting!r}")
        chunk_bytes = int(setting)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    return max(1, min(n_rows, chunk_bytes // _row_bytes(vocab, elem_bytes, softcap)))


# The kernels work with c, 1 / c and c / T in float32: each must be comfortably inside its range.
SOFTCAP_RANGE = (1e-30, 1e30)


def _check_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    low, high = SOFTCAP_RANGE
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not low <= softcap <= high:
        raise ValueError(f"softcap must be a float in [{low:g}, {high:g}] or None, got {softcap!r}")
    return float(softcap)


def _weight_blocks(weight: Tensor, rows: int | None = None, buffer: Tensor | None = None):
    """``(c0, c1, weight[c0:c1] in float32)`` over blocks of ``rows`` weight rows (default: a cache-sized
    block of ``_WEIGHT_BLOCK_BYTES``). A float32 weight's blocks are views of it; any other dtype's are all
    converted into one float32 buffer (``rows * H`` elements, allocated when not given): each block is dead
    once the next is asked for."""
    V, H = weight.shape
    step = rows or max(1, _WEIGHT_BLOCK_BYTES // (4 * H))
    if buffer is None and weight.dtype != torch.float32:
        buffer = torch.empty(min(step, V) * H, dtype=torch.float32, device=weight.device)
    for c0 in range(0, V, step):
        c1 = min(c0 + step, V)
        if weight.dtype == torch.float32:
            yield c0, c1, weight[c0:c1]
        else:
            yield c0, c1, buffer[: (c1 - c0) * H].view(c1 - c0, H).copy_(weight[c0:c1])


def _head_logits(h_chunk: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, out: Tensor):
    """``[1, n, V]`` logits of a chunk, written into ``out`` (``[n, V]``, contiguous), and the ``tanh`` the
    soft cap's derivative needs (or None).

    A float32 ``out`` for a half-precision head is the widened GEMM (:func:`widen_gemms`): the chunk's
    hidden states and each block of weight rows are converted to float32 first. A float32 head on CPU
    takes the same blocks (views, no conversion): see ``_WEIGHT_BLOCK_BYTES``. 16-bit GEMMs (Zen 4
    bfloat16: the same time either way) and other devices take one GEMM. With ``softcap = c``
    (Gemma 2's final logit soft-capping) the logits are ``c * tanh(raw / c)``, computed in float32 and
    stored in ``out``'s dtype.
    """
    widened = out.dtype != weight.dtype
    h = h_chunk.float() if widened else h_chunk
    if widened or (weight.dtype == torch.float32 and weight.device.type == "cpu"):
        blocks = _weight_blocks(weight)
    else:
        blocks = [(0, weight.shape[0], weight)]
    for c0, c1, w in blocks:
        if bias is None:
            torch.mm(h, w.T, out=out[:, c0:c1])
        else:
            torch.addmm(bias[c0:c1].to(out.dtype), h, w.T, out=out[:, c0:c1])
    if softcap is None:
        return out[None], None
    t = torch.tanh(out.float() / softcap)
    return out.copy_(t * softcap)[None], t


class _ChunkLogits:
    """The logits of successive token chunks of ``hidden @ weight.T + bias``, all written into one
    ``[rows, V]`` buffer (a chunk's logits are dead once the next chunk's are asked for). A fresh
    ``[n, V]`` tensor per chunk leaves the heap fragmented and the peak memory of the process a matter
    of luck."""

    def __init__(self, weight: Tensor, bias: Tensor | None, softcap: float | None, rows: int, hidden: Tensor):
        self.weight, self.bias, self.softcap = weight, bias, softcap
        dtype = torch.float32 if widen_gemms(hidden.dtype, hidden.device) else hidden.dtype
        self.buffer = torch.empty(rows, weight.shape[0], dtype=dtype, device=hidden.device)

    def __call__(self, h_chunk: Tensor):
        return _head_logits(h_chunk, self.weight, self.bias, self.softcap, out=self.buffer[: h_chunk.shape[0]])


def _raw_grad(g: Tensor, t: Tensor | None) -> Tensor:
    """Chain ``d loss / d logits`` back through the soft cap: ``d logits / d raw = 1 - tanh^2``."""
    return g if t is None else (g.float() * (1.0 - t * t)).to(g.dtype)


class _HeadGrads:
    """Gradients of the LM head's inputs from ``d loss / d logits``, token chunk by token chunk.

    ``dH`` rows are complete per chunk (one GEMM over the whole vocabulary). ``db`` accumulates in float32
    across chunks, and so does a float32 ``dW``: it is the result itself. Any other weight dtype would need
    a float32 ``[V, H]`` accumulator beside it (bf16 accumulation of ``dW`` across chunks is a known cause
    of divergence), so with ``by_vocab`` the chunks skip ``dW`` and :meth:`weight_by_vocab` computes it
    afterwards in a vocabulary-outer pass: each block of rows of ``dW`` is one GEMM with all the tokens as
    its inner dimension, accumulated in float32 inside the GEMM and rounded once.
    """

    def __init__(self, hidden, weight, bias, need, by_vocab=False):
        need_h, need_w, need_b = need
        dev = hidden.device
        self.weight = weight
        self.bias = bias
        self.by_vocab = need_w and by_vocab and weight.dtype != torch.float32
        self.d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
        if not need_w:
            self.d_weight = None
        elif self.by_vocab:
            self.d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=dev)
        else:
            self.d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        self.d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None

    def add(self, sl: slice, h_chunk: Tensor, g: Tensor) -> None:
        # g: [n, V] gradient of the chunk's logits (float32 for a widened head), h_chunk: [n, H]
        if self.d_hidden is not None and g.dtype != self.weight.dtype:
            d_h = None  # sum over blocks of weight rows of g[:, block] @ W[block] in float32, rounded once
            for c0, c1, w in _weight_blocks(self.weight):
                d_h = torch.mm(g[:, c0:c1], w) if d_h is None else d_h.addmm_(g[:, c0:c1], w)
            self.d_hidden[sl] = d_h
        elif self.d_hidden is not None:
            torch.mm(g, self.weight, out=self.d_hidden[sl])
        if self.d_weight is not None and not self.by_vocab:
            self.d_weight.addmm_(g.T.float(), h_chunk.float())  # no copies in float32
        if self.d_bias is not None:
            self.d_bias += g.float().sum(0)

    def weight_by_vocab(
        self, hidden: Tensor, block_grad, buffer: Tensor, softcap: float | None, with_hidden: bool = False
    ) -> None:
        """``dW[c0:c1] = G[:, c0:c1]^T @ hidden`` by blocks of vocabulary columns whose logits fit ``buffer``
        (the token chunks' logits buffer, dead by now: ``rows * V`` elements). ``block_grad(block [1, n, w],
        c0, token_slice)`` overwrites the block's logits with their gradient. No-op unless ``by_vocab``.
        ``with_hidden`` (widened heads only): ``dH`` and ``db`` too, instead of from token chunks."""
        if not self.by_vocab:
            return
        if buffer.dtype != self.weight.dtype:  # a widened head's float32 buffer
            return self._weight_by_vocab_widened(hidden, block_grad, buffer.view(-1), softcap, with_hidden)
        assert not with_hidden, "dH from the vocabulary-outer pass needs float32 GEMMs"
        N, V = hidden.shape[0], self.weight.shape[0]
        cols = max(1, min(V, buffer.numel() // max(N, 1)))
        if N * cols > buffer.numel():  # one column of all the tokens is more than a chunk
            buffer = torch.empty(N * cols, dtype=hidden.dtype, device=hidden.device)
        for c0 in range(0, V, cols):
            c1 = min(c0 + cols, V)
            bias = None if self.bias is None else self.bias[c0:c1]
            out = buffer.view(-1)[: N * (c1 - c0)].view(N, -1)
            block, t = _head_logits(hidden, self.weight[c0:c1], bias, softcap, out)
            block_grad(block, c0, slice(0, N))
            torch.mm(_raw_grad(block[0], t).T, hidden, out=self.d_weight[c0:c1])

    def _weight_by_vocab_widened(self, hidden, block_grad, buffer: Tensor, softcap: float | None, with_hidden):
        """:meth:`weight_by_vocab` with float32 GEMMs. The hidden states are converted by token pieces of at
        most half the buffer's size (all at once when they fit); the buffer holds a block's logits for a
        piece, its weight rows in float32 and its ``dW`` rows, which accumulate over the pieces in float32
        and are rounded once. ``with_hidden``: ``dH`` accumulates over the blocks in float32 ``[N, H]``."""
        (N, H), V = hidden.shape, self.weight.shape[0]
        piece = max(1, min(N, buffer.numel() // (2 * H)))
        cols = max(1, min(V, buffer.numel() // (piece + 2 * H)))
        if cols * (piece + 2 * H) > buffer.numel():  # a tiny vocabulary against a wide head
            buffer = torch.empty(cols * (piece + 2 * H), dtype=torch.float32, device=hidden.device)
        logits, w_buf, d_w = buffer[: piece * cols], buffer[piece * cols :][: cols * H], buffer[-cols * H :]
        h32 = hidden.float() if piece == N else torch.empty(piece, H, dtype=torch.float32, device=hidden.device)
        d_h = None
        if with_hidden and self.d_hidden is not None:
            d_h = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
        for c0, c1, w in _weight_blocks(self.weight, cols, w_buf):
            bias = None if self.bias is None else self.bias[c0:c1].float()
            acc = d_w[: (c1 - c0) * H].view(c1 - c0, H)
            for r0 in range(0, N, piece):
                r1 = min(r0 + piece, N)
                h = h32 if piece == N else h32[: r1 - r0].copy_(hidden[r0:r1])
                block, t = _head_logits(h, w, bias, softcap, logits[: (r1 - r0) * (c1 - c0)].view(r1 - r0, -1))
                block_grad(block, c0, slice(r0, r1))
                g = _raw_grad(block[0], t)
                torch.mm(g.T, h, out=acc) if r0 == 0 else acc.addmm_(g.T, h)
                if d_h is not None:
                    d_h[r0:r1].addmm_(g, w)
                if with_hidden and self.d_bias is not None:
                    self.d_bias[c0:c1] += g.sum(0)
            self.d_weight[c0:c1] = acc
        if d_h is not None:
            self.d_hidden.copy_(d_h)

    def zero(self):
        """The gradients when no upstream gradient reaches the head."""
        for g in (self.d_hidden, self.d_weight, self.d_bias):
            if g is not None:
                g.zero_()
        return self.result()

    def result(self):
        d_weight = None if self.d_weight is None else self.d_weight.to(self.weight.dtype)
        d_bias = None if self.d_bias is None else self.d_bias.to(self.bias.dtype)
        return self.d_hidden, d_weight, d_bias


class _TritonLinearTokenStats(torch.autograd.Function):
    """``(logp, entropy, mean_logp)`` through the Triton fused-linear kernels
    (``rlhf_fast/kernels/linear_token_stats.py``): the forward walks the vocabulary once per token tile, the
    backward recomputes the logits tiles. A loss built on these outputs (cross entropy, PPO, DPO) reaches the
    kernels as per-token upstream gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, wanted, softcap):
        from rlhf_fast.kernels import linear_token_stats as k

        logp, ent, lse, mean_logp = k.linear_token_stats_fwd(
            hidden, weight, bias, labels, temperature, ignore_index, *wanted, softcap=softcap
        )
        outs = (logp, ent.float(), mean_logp)  # the float64 entropy is the backward's (see _custom)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if wanted[1] else None)
        ctx.args = (temperature, ignore_index, wanted, softcap)
        ctx.mark_non_differentiable(*(o for o, w in zip(outs, wanted, strict=True) if not w))
        # an output the loss does not use (PPO's entropy without a bonus) must not cost a kernel term
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        from rlhf_fast.kernels import linear_token_stats as k

        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, wanted, softcap = ctx.args
        g_lp, g_h, g_m = (g.contiguous() if w and g is not None else None for g, w in zip(grads, wanted, strict=True))
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_lp is None and g_h is None and g_m is None:
            return (None,) * 8
        d_h, d_w, d_b = k.linear_token_stats_bwd(
            hidden, weight, bias, labels, lse, entropy, g_lp, g_h, temperature, ignore_index, need_h, need_w, need_b,
            grad_mean_logp=g_m, softcap=softcap,
        )  # fmt: skip
        return (d_h if need_h else None), (d_w if need_w else None), (d_b if need_b else None), *(None,) * 5


def _triton_stats(h2d, weight, bias, labels, temperature, ignore_index, wanted, softcap):
    """``(logp, entropy, mean_logp)`` ``[N]`` of the Triton fused-linear kernels (``wanted`` switches them on).
    Labels are range-checked here: the kernels trust them."""
    if labels is not None:
        _custom.check_labels_in_range(labels, weight.shape[0], ignore_index)
    return _TritonLinearTokenStats.apply(
        h2d.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), labels, temperature,
        ignore_index, wanted, softcap,
    )  # fmt: skip


class _LinearTokenStats(torch.autograd.Function):
    """``(logp, entropy, mean_logp)`` of ``hidden @ weight.T + bias``; the backward recomputes chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, wanted, rows, softcap, backend):
        # hidden: [N, H], weight: [V, H], bias: [V] or None, labels: [N] or None
        N = hidden.shape[0]
        # float64 lse and entropy, as the kernels give them: the backward's exp(x - lse) needs more than float32
        # holds at large |x|, and its entropy factor x - E_p[x] takes E_p[x] = lse - entropy (see _custom)
        dtypes = (torch.float32, torch.float64, torch.float32)
        outs = [torch.empty(N if w else 0, dtype=d, device=hidden.device) for w, d in zip(wanted, dtypes, strict=True)]
        lse = torch.empty(N, dtype=torch.float64, device=hidden.device)
        chunk_logits = _ChunkLogits(weight, bias, softcap, min(rows, N), hidden)
        for r0 in range(0, N, rows):
            sl = slice(r0, min(r0 + rows, N))
            logits, _ = chunk_logits(hidden[sl])  # [1, n, V]
            lab = labels[sl] if labels is not None else None
            logp, ent, lse[sl], mean_logp = _custom.token_stats_fwd(
                logits, lab, temperature, ignore_index, *wanted, backend
            )
            for out, val, w in zip(outs, (logp, ent, mean_logp), wanted, strict=True):
                if w:
                    out[sl] = val
        # the backward recomputes the logits; lse and entropy let its vocabulary-outer form skip the token pass
        ctx.save_for_backward(hidden, weight, bias, labels, lse, outs[1])
        ctx.args = (temperature, ignore_index, wanted, rows, softcap, backend)
        outs[1] = outs[1].float()
        ctx.mark_non_differentiable(*(o for o, w in zip(outs, wanted, strict=True) if not w))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, labels, fwd_lse, fwd_entropy = ctx.saved_tensors
        temperature, ignore_index, wanted, rows, softcap, backend = ctx.args
        g_lp, g_h, g_u = (g if w and g is not None else None for g, w in zip(grads, wanted, strict=True))
        (N, H), V = hidden.shape, weight.shape[0]
        head = _HeadGrads(hidden, weight, bias, ctx.needs_input_grad[:3], by_vocab=True)
        if (g_lp is None and g_h is None and g_u is None) or V == 1:  # V == 1: every output is constant 0
            return *head.zero(), None, None, None, None, None, None, None
        # The per-token upstream gradients become the coefficients of the fused kernel, which recomputes
        # each chunk's statistics and overwrites its logits with d loss / d logits: no gradient buffer.
        coefs = torch.zeros(3, N, dtype=torch.float32, device=hidden.device)
        for row, g in zip(coefs, (g_lp, g_h, g_u), strict=True):
            if g is not None:
                row.copy_(g)
        if labels is None:  # any valid label that is not ignore_index; its g_lp is 0
            labels = torch.full((N,), 0 if ignore_index != 0 else 1, dtype=torch.long, device=hidden.device)
        with_entropy = g_h is not None
        # the dW pass takes each row's lse (and entropy) from the forward: the same chunks of the same logits
        block_grad = _block_grad(
            labels, fwd_lse, fwd_entropy if with_entropy else None, coefs, V, temperature, ignore_index, backend
        )
        if head.by_vocab and widen_gemms(weight.dtype, weight.device) and N * H <= rows * V:
            # One vocabulary-outer pass gives dW, dH (a float32 [N, H] accumulator, within a third of the
            # budget) and db: three GEMMs, where a token pass first would add a fourth (its logits) to the dW
            # pass's two.
            buffer = torch.empty(min(rows, N) * V, dtype=torch.float32, device=hidden.device)
            head.weight_by_vocab(hidden, block_grad, buffer, softcap, with_hidden=True)
            return *head.result(), None, None, None, None, None, None, None
        chunk_logits = _ChunkLogits(weight, bias, softcap, min(rows, N), hidden)
        for r0 in range(0, N, rows):
            sl = slice(r0, min(r0 + rows, N))
            logits, t = chunk_logits(hidden[sl])
            _custom.token_stats_fused_(
                logits, labels[sl], temperature, ignore_index, with_entropy, False, 0, coefs[:, sl].contiguous(),
                [], backend,
            )  # fmt: skip
            head.add(sl, hidden[sl], _raw_grad(logits[0], t))
        head.weight_by_vocab(hidden, block_grad, chunk_logits.buffer, softcap)
        return *head.result(), None, None, None, None, None, None, None


def _block_grad(labels, lse, entropy, coefs, vocab, temperature, ignore_index, backend):
    """``block_grad`` of :meth:`_HeadGrads.weight_by_vocab` for per-token upstream gradients ``coefs [3, N]``
    (``(g_lp, g_H, g_u)``), with the whole rows' ``lse`` (and ``entropy`` for the ``g_H`` term).

    Only the chunked path (``cpp`` and ``torch``) comes here: the Triton backend's tl.dot kernels, soft cap
    included, hold no logits chunks. Were a ``triton`` call to arrive, it has no kernel for a block of columns,
    so the ``torch`` implementation would do that step on the device."""
    impl = "torch" if backend == "triton" else backend

    def block_grad(block, c0, sl):
        _custom.token_stats_block_grad_(
            block, labels[sl], lse[sl], None if entropy is None else entropy[sl], coefs[:, sl].contiguous(), c0,
            vocab, temperature, ignore_index, impl,
        )  # fmt: skip

    return block_grad


def _prepare_linear(
    hidden, weight, labels, bias, temperature, ignore_index, chunk_bytes, backend, head="", softcap=None
):
    """Validate the linear-form inputs; returns ``(hidden [N, H], labels [N] | None, T, ignore_index,
    backend, rows per chunk)``. ``head``: the prefix of the arguments' names in errors (``p_``, ``q_``);
    ``softcap``: the (checked) soft cap, which takes its share of the chunk budget."""
    h_name, w_name, b_name = (head + name for name in ("hidden", "weight", "bias"))
    v.check_logits(hidden, h_name)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"{w_name} must have shape [V, H] with H = {h_name}.shape[-1] = {hidden.shape[-1]}, got {shape}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} must have the dtype of {h_name} ({hidden.dtype}), got {weight.dtype}")
    v.check_same_device(weight, hidden, w_name, h_name)
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"{b_name} must have shape [V] = [{weight.shape[0]}]")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name} must have the dtype of {h_name} ({hidden.dtype}), got {bias.dtype}")
        v.check_same_device(bias, hidden, b_name, h_name)
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} has an empty vocabulary dimension (V = 0)")
    flat = None
    if labels is not None:
        v.check_labels(labels, hidden, ref_name="hidden")
        flat = v.flat_labels(labels)
    temperature = v.check_temperature(temperature)
    if softcap is not None and not SOFTCAP_RANGE[0] <= softcap / temperature <= SOFTCAP_RANGE[1]:
        raise ValueError(
            f"softcap / temperature must be in [{SOFTCAP_RANGE[0]:g}, {SOFTCAP_RANGE[1]:g}] (the capped logits' "
            f"scale), got softcap={softcap!r}, temperature={temperature!r}"
        )
    ignore_index = v.check_ignore_index(ignore_index)
    backend = _dispatch.resolve(backend, hidden.device)
    h2d = hidden.reshape(-1, hidden.shape[-1])
    rows = _chunk_rows(h2d.shape[0], weight.shape[0], _logits_bytes(hidden), chunk_bytes, softcap is not None)
    return h2d, flat, temperature, ignore_index, backend, rows


def _linear_stats(
    hidden, weight, labels, bias, temperature, ignore_index, with_logp, with_entropy, chunk_bytes, backend, softcap=None
):
    softcap = _check_softcap(softcap)
    h2d, flat, temperature, ignore_index, backend, rows = _prepare_linear(
        hidden, weight, labels, bias, temperature, ignore_index, chunk_bytes, backend, softcap=softcap
    )
    if backend == "triton":
        # tl.dot kernels: the logits exist only tile by tile, in registers
        wanted = (with_logp, with_entropy, False)
        logp, ent, _ = _triton_stats(h2d, weight, bias, flat, temperature, ignore_index, wanted, softcap)
    else:
        logp, ent, _ = _LinearTokenStats.apply(
            h2d, weight, bias, flat, temperature, ignore_index, (with_logp, with_entropy, False), rows, softcap, backend
        )
    lead = hidden.shape[:-1]
    return (logp.view(lead) if with_logp else None), (ent.view(lead) if with_entropy else None)


def _fused_chunks(h2d, weight, bias, labels, temperature, ignore_index, *, with_mean_logp, mode, coefs, params,
                  rows, backend, need, softcap=None):  # fmt: skip
    """The gradient-in-forward path over token chunks.

    Each chunk's logits are computed, the fused kernel overwrites them with ``d loss / d logits``
    (in place: the chunk is ours), and that is pushed through the head at once: ``dH = g @ W``,
    ``dW += g^T @ H`` and ``db += sum g`` in float32 (a weight of another dtype gets ``dW`` from a
    vocabulary-outer pass afterwards, see :class:`_HeadGrads`). Returns the per-token outputs of
    ``token_stats_fwd`` and ``(dH, dW, db)`` (None where ``need`` is false). This path runs on CPU
    backends only (the Triton one has its own tl.dot kernels).
    """
    N = h2d.shape[0]

    def per_token(wanted, dtype=torch.float32):
        return torch.empty(N if wanted else 0, dtype=dtype, device=h2d.device)

    # logp, entropy, lse (those two float64, as the kernels return them) and mean_logp
    f64 = torch.float64
    outs = [per_token(True), per_token(True, f64), per_token(True, f64), per_token(with_mean_logp)]
    head = _HeadGrads(h2d, weight, bias, need, by_vocab=True)
    with torch.no_grad():
        chunk_logits = _ChunkLogits(weight, bias, softcap, min(rows, N), h2d)
        for r0 in range(0, N, rows):
            sl = slice(r0, min(r0 + rows, N))
            logits, t = chunk_logits(h2d[sl])  # [1, n, V], becomes the gradient in place
            chunk = _custom.token_stats_fused_(
                logits, labels[sl], temperature, ignore_index, True, with_mean_logp, mode, coefs[:, sl].contiguous(),
                params, backend,
            )  # fmt: skip
            for out, val in zip(outs, chunk, strict=True):
                if out.numel():
                    out[sl] = val
            head.add(sl, h2d[sl], _raw_grad(logits[0], t))
        if head.by_vocab:
            logp, entropy, lse, _ = outs
            if mode == 0:
                block_coefs, entropy_term = coefs, bool(coefs[1].any())
            else:  # the kernel's PPO coefficients, from the log-probs it returned
                g_lp, g_h = _torch_backend.ppo_coefs(logp, coefs, params)
                block_coefs = torch.stack([g_lp, torch.as_tensor(g_h).expand_as(g_lp), torch.zeros_like(g_lp)])
                entropy_term = params[5] != 0.0
            block_grad = _block_grad(
                labels, lse, entropy if entropy_term else None, block_coefs.float().contiguous(), weight.shape[0],
                temperature, ignore_index, backend,
            )  # fmt: skip
            head.weight_by_vocab(h2d, block_grad, chunk_logits.buffer, softcap)
    return outs, head.result()


class _AttachLinearGradients(torch.autograd.Function):
    """``loss`` with precomputed gradients for ``hidden``, ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, loss, d_hidden, d_weight, d_bias, hidden, weight, bias):
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grads = forward_gradients(ctx, grad_output)  # in place: a copy would hold a second dW and dH at the peak
        return None, None, None, None, *grads


def _attach(loss, grads, hidden, weight, bias):
    d_hidden, d_weight, d_bias = grads
    if d_hidden is not None:
        d_hidden = d_hidden.view(hidden.shape)
    return _AttachLinearGradients.apply(loss, d_hidden, d_weight, d_bias, hidden, weight, bias)


def _needs(hidden, weight, bias):
    if not torch.is_grad_enabled():
        return (False, False, False)
    return (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_bytes: int | None = None,
    softcap: float | None = None,
    backend=None,
) -> Tensor:
    """:func:`rlhf_fast.token_logprobs` of ``logits = hidden @ weight.T + bias``, without the logits.

    Args:
        hidden: ``[..., H]`` final hidden states, float32, bfloat16 or float16.
        weight: ``[V, H]`` LM-head weight, same dtype; bias: optional ``[V]``.
        labels: ``[...]`` int64 or int32 in ``[0, V)`` or ``ignore_index``.
        chunk_bytes: memory budget of one chunk of logits (default 64 MiB, or ``RLHF_FAST_CHUNK_BYTES``).
        softcap: ``c`` for final logit soft-capping (Gemma 2): the logits are ``c * tanh(raw / c)``; None for none.
        temperature, ignore_index, backend: as in :func:`rlhf_fast.token_logprobs`.

    Returns:
        ``[...]`` float32; gradients flow to ``hidden``, ``weight`` and ``bias`` (``dW`` and ``db``
        accumulated in float32 across chunks).
    """
    logp, _ = _linear_stats(
        hidden, weight, labels, bias, temperature, ignore_index, True, False, chunk_bytes, backend, softcap
    )
    return logp


def linear_token_entropy(
    hidden: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    softcap: float | None = None,
    backend=None,
) -> Tensor:
    """:func:`rlhf_fast.token_entropy` of ``hidden @ weight.T + bias``; arguments as in
    :func:`linear_token_logprobs`. Returns ``[...]`` float32."""
    _, ent = _linear_stats(hidden, weight, None, bias, temperature, -100, False, True, chunk_bytes, backend, softcap)
    return ent


def linear_token_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_bytes: int | None = None,
    softcap: float | None = None,
    backend=None,
) -> tuple[Tensor, Tensor]:
    """Both, from one pass over each chunk of logits; 0 at ignored positions. Arguments as in
    :func:`linear_token_logprobs`."""
    return _linear_stats(
        hidden, weight, labels, bias, temperature, ignore_index, True, True, chunk_bytes, backend, softcap
    )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk_bytes: int | None = None,
    softcap: float | None = None,
    backend=None,
) -> Tensor:
    """:func:`rlhf_fast.cross_entropy` of ``logits = hidden @ weight.T + bias``, without the logits.

    For ``"mean"``/``"sum"`` every gradient (``hidden``, ``weight``, ``bias``) is computed in the
    forward pass, chunk by chunk, and the backward pass only scales it; ``"none"`` uses the
    recomputing path of :func:`linear_token_logprobs`. Arguments as there and in ``cross_entropy``.

    Returns:
        float32: a 0-d loss, or ``[...]`` for ``reduction="none"``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    eps = v.check_float("label_smoothing", label_smoothing, 0.0, 1.0, high_inclusive=True)
    softcap = _check_softcap(softcap)
    h2d, flat, _, ignore_index, backend, rows = _prepare_linear(
        hidden, weight, labels, bias, 1.0, ignore_index, chunk_bytes, backend, softcap=softcap
    )
    valid = (flat != ignore_index).float()
    weight_r = valid / valid.sum().clamp(min=1) if reduction == "mean" else valid
    if reduction == "none" or backend == "triton":
        # Per-token statistics with autograd; the loss's per-token gradients reach their backward, which
        # recomputes the logits: on triton a tl.dot kernel pass (no logits chunk at all), else by chunks.
        wanted = (True, False, eps > 0.0)
        if backend == "triton":
            logp, _, mean_logp = _triton_stats(h2d, weight, bias, flat, 1.0, ignore_index, wanted, softcap)
        else:
            logp, _, mean_logp = _LinearTokenStats.apply(
                h2d, weight, bias, flat, 1.0, ignore_index, wanted, rows, softcap, backend
            )
        per_token = smoothed_nll(logp, mean_logp, eps)
        return per_token.view(labels.shape) if reduction == "none" else (per_token * weight_r).sum()
    coefs = torch.stack([-(1.0 - eps) * weight_r, torch.zeros_like(weight_r), -eps * weight_r])
    need = _needs(hidden, weight, bias)
    (logp, _, _, mean_logp), grads = _fused_chunks(
        h2d, weight, bias, flat, 1.0, ignore_index, with_mean_logp=eps > 0.0, mode=0, coefs=coefs, params=[],
        rows=rows, backend=backend, need=need, softcap=softcap,
    )  # fmt: skip
    loss = (smoothed_nll(logp, mean_logp, eps) * weight_r).sum()
    return _attach(loss, grads, hidden, weight, bias) if any(need) else loss


def linear_ppo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    bias: Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    loss_agg: str = "token-mean",
    chunk_bytes: int | None = None,
    softcap: float | None = None,
    backend=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`rlhf_fast.ppo_loss` of ``logits = hidden @ weight.T + bias``, without the logits.

    The gradients of ``hidden``, ``weight`` and ``bias`` are computed in the forward pass, chunk by
    chunk (the per-token upstream gradient is known as soon as the token's log-prob is). Gradients to
    ``old_logprobs``/``advantages``/``ref_logprobs`` are not supported in this form.
    """
    from rlhf_fast.ops.policy_losses import PPOSetup

    softcap = _check_softcap(softcap)
    h2d, flat, temperature, ignore_index, backend, rows = _prepare_linear(
        hidden, weight, labels, bias, temperature, ignore_index, chunk_bytes, backend, softcap=softcap
    )
    setup = PPOSetup.build(
        labels, old_logprobs, advantages, ref_logprobs, clip_eps, clip_eps_high, dual_clip, kl_coef,
        kl_estimator, entropy_coef, ignore_index, loss_agg,
    )  # fmt: skip
    if setup.side_inputs_need_grad:
        raise ValueError("linear_ppo_loss does not differentiate old_logprobs, advantages or ref_logprobs")
    if backend == "triton":
        # log-prob and entropy in one tl.dot pass; the entropy term reaches the backward only with a bonus
        logp, entropy, _ = _triton_stats(
            h2d, weight, bias, flat, temperature, ignore_index, (True, True, False), softcap
        )
        return setup.finish(logp.view(labels.shape), entropy.view(labels.shape))
    need = _needs(hidden, weight, bias)
    (logp, entropy, _, _), grads = _fused_chunks(
        h2d, weight, bias, flat, temperature, ignore_index, with_mean_logp=False, mode=1, coefs=setup.coefs(),
        params=setup.params(), rows=rows, backend=backend, need=need, softcap=softcap,
    )  # fmt: skip
    loss, stats = setup.finish(logp.view(labels.shape), entropy.float().view(labels.shape))
    return (_attach(loss, grads, hidden, weight, bias) if any(need) else loss), stats


def linear_dpo_loss(
    chosen_hidden: Tensor,
    chosen_labels: Tensor,
    rejected_hidden: Tensor,
    rejected_labels: Tensor,
    weight: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    bias: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    average_logprobs: bool = False,
    nll_coef: float = 0.0,
    chunk_bytes: int | None = None,
    softcap: float | None = None,
    backend=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`rlhf_fast.dpo_loss` with ``logits = hidden @ weight.T + bias`` for both responses.

    ``chosen_hidden``/``rejected_hidden`` are ``[B, T, H]`` (views into one ``[2B, T, H]`` output are
    fine); the sequence log-probs come from :func:`linear_token_logprobs`. Other arguments and the
    returned ``(loss, stats)`` as in ``dpo_loss``.
    """
    from rlhf_fast.ops.policy_losses import dpo_from_token_logprobs

    def token_logprobs(hidden, labels):
        return linear_token_logprobs(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, chunk_bytes=chunk_bytes, softcap=softcap,
            backend=backend,
        )  # fmt: skip

    for hidden, labels, name in (
        (chosen_hidden, chosen_labels, "chosen"),
        (rejected_hidden, rejected_labels, "rejected"),
    ):
        v.check_logits(hidden, f"{name}_hidden")
        v.check_labels(labels, hidden, f"{name}_labels", f"{name}_hidden")
    both = {}

    def chosen():
        # One pass over both halves when they have the same shape: two passes would each build a float32
        # dW [V, H] (131 MiB at V=32000, H=1024) for autograd to add up; the copy of the hidden states
        # (2BT x H) is far smaller.
        if chosen_hidden.shape != rejected_hidden.shape or chosen_labels.shape != rejected_labels.shape:
            return token_logprobs(chosen_hidden, chosen_labels)
        logp = token_logprobs(torch.cat([chosen_hidden, rejected_hidden]), torch.cat([chosen_labels, rejected_labels]))
        both["chosen"], both["rejected"] = logp.chunk(2)
        return both["chosen"]

    def rejected():
        return both["rejected"] if both else token_logprobs(rejected_hidden, rejected_labels)

    return dpo_from_token_logprobs(
        chosen, rejected,
        chosen_labels, rejected_labels, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, ignore_index=ignore_index, average_logprobs=average_logprobs,
        nll_coef=nll_coef,
    )  # fmt: skip


class _LinearKL(torch.autograd.Function):
    """Exact KL(P || Q) with ``P = softmax(p_hidden @ p_weight.T + p_bias)``, Q likewise, by chunks."""

    @staticmethod
    def forward(ctx, p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias, temperature, rows, backend):
        N = p_hidden.shape[0]
        kl = torch.empty(N, dtype=torch.float32, device=p_hidden.device)
        lse_p, lse_q = (torch.empty(N, dtype=torch.float64, device=p_hidden.device) for _ in range(2))
        p_logits = _ChunkLogits(p_weight, p_bias, None, min(rows, N), p_hidden)
        q_logits = _ChunkLogits(q_weight, q_bias, None, min(rows, N), q_hidden)
        for r0 in range(0, N, rows):
            sl = slice(r0, min(r0 + rows, N))
            (p, _), (q, _) = p_logits(p_hidden[sl]), q_logits(q_hidden[sl])
            kl[sl], lse_p[sl], lse_q[sl] = _custom.kl_fwd(p, q, temperature, backend)
        ctx.save_for_backward(p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias, kl, lse_p, lse_q)
        ctx.args = (temperature, rows, backend)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias, kl, lse_p, lse_q = ctx.saved_tensors
        temperature, rows, backend = ctx.args
        needs = ctx.needs_input_grad
        head_p = _HeadGrads(p_hidden, p_weight, p_bias, needs[0:3])
        head_q = _HeadGrads(q_hidden, q_weight, q_bias, needs[3:6])
        need_p, need_q = any(needs[0:3]), any(needs[3:6])
        grad_kl = grad_kl.contiguous()
        N = p_hidden.shape[0]
        p_logits = _ChunkLogits(p_weight, p_bias, None, min(rows, N), p_hidden)
        q_logits = _ChunkLogits(q_weight, q_bias, None, min(rows, N), q_hidden)
        for r0 in range(0, N, rows):
            sl = slice(r0, min(r0 + rows, N))
            (p, _), (q, _) = p_logits(p_hidden[sl]), q_logits(q_hidden[sl])
            g_p, g_q = _custom.kl_bwd(
                p, q, lse_p[sl], lse_q[sl], kl[sl], grad_kl[sl], temperature, need_p, need_q, backend
            )
            if need_p:
                head_p.add(sl, p_hidden[sl], g_p[0])
            if need_q:
                head_q.add(sl, q_hidden[sl], g_q[0])
        return *head_p.result(), *head_q.result(), None, None, None


class _TritonLinearKL(torch.autograd.Function):
    """Exact KL(P || Q) of two heads through the Triton tl.dot kernels (``rlhf_fast/kernels/linear_kl.py``)."""

    @staticmethod
    def forward(ctx, p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias, temperature):
        from rlhf_fast.kernels import linear_kl as k

        kl, lse_p, lse_q = k.linear_kl_fwd(p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias, temperature)
        ctx.save_for_backward(p_hidden, p_weight, p_bias, q_hidden, q_weight, q_bias, kl, lse_p, lse_q)
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        from rlhf_fast.kernels import linear_kl as k

        *heads, kl, lse_p, lse_q = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:6])
        grads = k.linear_kl_bwd(*heads, kl, lse_p, lse_q, grad_kl.contiguous(), ctx.temperature, need)
        return *(g if n else None for g, n in zip(grads, need, strict=True)), None


def linear_kl_divergence(
    p_hidden: Tensor,
    p_weight: Tensor,
    q_hidden: Tensor,
    q_weight: Tensor,
    *,
    p_bias: Tensor | None = None,
    q_bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    backend=None,
) -> Tensor:
    """:func:`rlhf_fast.kl_divergence` of two heads, ``P`` from ``(p_hidden, p_weight)`` and ``Q`` from
    ``(q_hidden, q_weight)`` (e.g. a student and a teacher or reference head), logits never held whole.

    ``p_hidden``/``q_hidden`` are ``[..., H_p]``/``[..., H_q]`` with the same leading shape; the weights
    ``[V, H_p]``/``[V, H_q]`` share ``V`` and the dtype. Gradients flow to every input that requires
    them. Returns ``[...]`` float32.
    """
    p2d, _, temperature, _, backend, _ = _prepare_linear(
        p_hidden, p_weight, None, p_bias, temperature, -100, chunk_bytes, backend, head="p_"
    )
    if isinstance(q_hidden, Tensor):  # the q head's own checks then find its weight and bias on this device too
        v.check_same_device(q_hidden, p_hidden, "q_hidden", "p_hidden")
    q2d, _, _, _, _, _ = _prepare_linear(
        q_hidden, q_weight, None, q_bias, temperature, -100, chunk_bytes, backend, head="q_"
    )
    if q_hidden.shape[:-1] != p_hidden.shape[:-1]:
        raise ValueError(
            f"q_hidden must have the leading shape of p_hidden {tuple(p_hidden.shape[:-1])}, "
            f"got {tuple(q_hidden.shape[:-1])}"
        )
    if q_weight.shape[0] != p_weight.shape[0] or q_hidden.dtype != p_hidden.dtype:
        raise ValueError("q_weight must have as many rows (V) as p_weight, and q_hidden the dtype of p_hidden")
    if backend == "triton":
        heads = (p2d, p_weight, p_bias, q2d, q_weight, q_bias)
        kl = _TritonLinearKL.apply(*(None if t is None else t.contiguous() for t in heads), temperature)
        return kl.view(p_hidden.shape[:-1])
    # two logits chunks and two gradient chunks live at once: the reservation of two rows holds them
    rows = max(1, _chunk_rows(p2d.shape[0], p_weight.shape[0], _logits_bytes(p_hidden), chunk_bytes) // 2)
    kl = _LinearKL.apply(p2d, p_weight, p_bias, q2d, q_weight, q_bias, temperature, rows, backend)
    return kl.view(p_hidden.shape[:-1])
