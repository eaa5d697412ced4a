"""The token-stats forward that also writes the gradient: one read of each logits row from memory.

When the loss is known while the forward runs (cross entropy, the PPO clipped loss), the gradient
of the logits needs nothing but per-row numbers the forward has just computed. One program per row
then walks its row twice: pass 1 computes ``lse`` (and ``logp``, ``entropy``, ``mean_logp``), the
row's loss coefficients ``(g_lp, g_H, g_u)`` follow from them, and pass 2 re-reads the row (from L2
on a GPU: it was streamed a moment ago) and writes::

    grad_logits_v = [g_lp (1[v == label] - p_v) - g_H p_v (log p_v + H) + g_u (1/V - p_v)] / T

Modes (``MODE`` constexpr):

* ``0``, linear: ``g_lp, g_H, g_u`` are given per row (cross entropy, label smoothing, ...).
* ``1``, PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, with the dual clip of Ye et
  al. 2020, https://arxiv.org/abs/1912.09729): from ``old_logp``, ``adv``, ``ref_logp`` and the
  aggregation weight ``w`` of the row, the gradient of
  ``w * (max(-adv r, -adv clip(r, 1 - clip_low, 1 + clip_high)) [capped at -adv * dual_clip]
  + kl_coef * k(logp, ref_logp)) - w * entropy_coef * H`` with ``r = exp(logp - old_logp)``.

The gradient may be written over the logits themselves (in-place backward): a row is only read and
written by its own program, pass 1 only reads, and pass 2 reads each block before writing it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    CONFIGS,
    TRITON_DTYPE,
    AotSpec,
    aot_spec,
    check_rows,
    empty_f32,
    on_tensor_device,
    pick_config,
    unused_f64,
)
from ._softmax_row import entropy64, lse64, row_position, row_stats, write_grad_row

__all__ = ["aot_specs", "token_stats_fused"]

MODE_LINEAR = 0
MODE_PPO = 1
# the k1/k2/k3 estimators of kl_kind; 0 (no KL term) is what the launcher uses when kl_coef == 0
KL_KINDS = (1, 2, 3)


@triton.jit(do_not_specialize=["ignore_index"])
def _token_stats_fused_kernel(
    # pointers
    logits_ptr,  # [A, B, V] view, stride(2) == 1
    labels_ptr,  # [N] int64
    coef0_ptr,  # [N] float32: g_lp (MODE 0) | old_logp (MODE 1)
    coef1_ptr,  # [N] float32: g_H (MODE 0, used if WITH_ENTROPY) | adv (MODE 1)
    coef2_ptr,  # [N] float32: g_u (MODE 0) | ref_logp (MODE 1, used if KL_KIND)
    coef3_ptr,  # [N] float32: unused (MODE 0) | w, the row's loss weight (MODE 1)
    logp_ptr,  # [N] float32 out
    entropy_ptr,  # [N] float64 out (see entropy64); unused unless WITH_ENTROPY
    lse_ptr,  # [N] float64 out (see split_lse)
    mean_logp_ptr,  # [N] float32 out; unused unless WITH_MEAN_LOGP
    grad_ptr,  # [A, B, V] out, logits dtype, stride(2) == 1; may be logits_ptr itself
    # strides, in elements
    stride_a,
    stride_b,
    grad_stride_a,
    grad_stride_b,
    # sizes
    B,
    V,
    # runtime scalars (never constexpr: each new value would recompile)
    inv_temperature,  # 1 / temperature
    ignore_index,
    clip_low,  # MODE 1 only, from here on
    clip_high,
    dual_clip,  # 0: no dual clip
    kl_coef,
    entropy_coef,
    # constexpr: mode, feature switches, block size
    MODE: tl.constexpr,
    KL_KIND: tl.constexpr,  # MODE 1: 0 (no KL term), 1, 2 or 3 (k1/k2/k3)
    WITH_ENTROPY: tl.constexpr,
    WITH_MEAN_LOGP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row, a, b = row_position(B)
    row_ptr = logits_ptr + a * stride_a + b * stride_b
    out_ptr = grad_ptr + a * grad_stride_a + b * grad_stride_b

    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # An ignored row is never read (both loops over it run zero times) and gets a row of zeros.
    n_read = tl.where(valid, V, 0)

    # pass 1: statistics (reads only)
    m, log_s, t_over_s, mean_logp = row_stats(
        row_ptr, n_read, V, inv_temperature, WITH_ENTROPY, WITH_MEAN_LOGP, BLOCK_V
    )
    lse = tl.where(valid, lse64(m, log_s), 0.0)
    entropy = tl.where(valid, entropy64(log_s, t_over_s), 0.0)
    # One scalar read of x[label], from L2, still before pass 2 can overwrite the row.
    x_label = tl.load(row_ptr + label, mask=valid, other=0.0).to(tl.float32) * inv_temperature
    logp = tl.where(valid, (x_label - m) - log_s, 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    if WITH_MEAN_LOGP:
        tl.store(mean_logp_ptr + row, tl.where(valid, mean_logp, 0.0))

    # the row's coefficients of d loss / d (logp, entropy, mean_logp)
    g_h = 0.0
    g_u = 0.0
    if MODE == 0:
        g_lp = tl.load(coef0_ptr + row)
        if WITH_ENTROPY:
            g_h = tl.load(coef1_ptr + row)
        g_u = tl.load(coef2_ptr + row)
    else:
        adv = tl.load(coef1_ptr + row)
        w = tl.load(coef3_ptr + row)
        # advantage 0: no pg gradient, also where the ratio overflows (-0 * inf would be NaN)
        ratio = tl.exp(tl.where(adv == 0.0, 0.0, logp - tl.load(coef0_ptr + row)))
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        # d max(unclipped, clipped) / d logp; at a tie (ratio inside the clip range) the ratio's own
        # gradient, as autograd of torch.maximum gives (and NaN for a NaN advantage, as it also does)
        d_pg = tl.where(unclipped < clipped, 0.0, unclipped)
        # dual clip: for adv < 0 the loss is capped at -adv * dual_clip, a constant
        capped = (dual_clip > 0.0) & (adv < 0.0) & (tl.maximum(unclipped, clipped) > -adv * dual_clip)
        g_lp = tl.where(capped, 0.0, d_pg)
        if KL_KIND != 0:
            # d k / d logp of k1 = log_ratio, k2 = log_ratio^2 / 2, k3 = exp(-log_ratio) + log_ratio - 1
            log_ratio = logp - tl.load(coef2_ptr + row)
            if KL_KIND == 1:
                d_kl = 1.0
            elif KL_KIND == 2:
                d_kl = log_ratio
            else:
                d_kl = 1.0 - tl.exp(-log_ratio)
            g_lp += kl_coef * d_kl
        g_lp *= w
        if WITH_ENTROPY:
            g_h = -w * entropy_coef

    # pass 2: the gradient, 1/T folded into the coefficients; log p = (x - m) - log_s, as split_lse would
    # give it from the saved lse, exact next to the max, and x - E_p[x] = (x - m) - t_over_s likewise
    write_grad_row(
        row_ptr, out_ptr, n_read, V, inv_temperature, m, log_s,
        label, g_lp * inv_temperature, g_h * inv_temperature, m, t_over_s, g_u * inv_temperature,
        True, WITH_ENTROPY, MODE == 0, BLOCK_V,
    )  # fmt: skip


@on_tensor_device
def token_stats_fused(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    with_mean_logp: bool,
    mode: int,
    coefs: torch.Tensor,
    params: list[float],
    grad: torch.Tensor,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~.token_stats.token_stats_fwd` with ``with_logp=True`` that also writes ``grad``.

    Args:
        logits: ``[A, B, V]`` float32/bfloat16/float16 view with ``stride(2) == 1``; ``N = A * B``.
        labels: ``[N]`` int64, validated (in ``[0, V)`` or ``== ignore_index``). Ignored rows are
            not read; they get 0 in every output and a zero gradient row.
        temperature, ignore_index: as in the forward.
        with_entropy, with_mean_logp: also return ``entropy`` / ``mean_logp``. ``with_entropy``
            is needed for any ``g_H`` term: mode 0 ignores ``coefs[1]`` without it, and mode 1
            refuses a nonzero ``entropy_coef`` without it.
        mode: 0 (linear) or 1 (PPO).
        coefs: ``[K, N]`` float32 contiguous. Mode 0, ``K = 3``: ``g_lp, g_H, g_u``, the gradients
            of the loss with respect to ``logp, entropy, mean_logp``. Mode 1, ``K = 4``:
            ``old_logp, adv, ref_logp, w`` (``w``: the row's weight in the loss, 0 on ignored rows).
        params: mode 0: ``[]``; mode 1: ``[clip_low, clip_high, dual_clip, kl_coef, kl_kind,
            entropy_coef]``, ``dual_clip == 0`` for none, ``kl_kind`` in {1, 2, 3} for k1/k2/k3
            (ignored when ``kl_coef == 0``).
        grad: ``[A, B, V]`` output in the logits' dtype with ``stride(2) == 1``: a fresh buffer or
            ``logits`` itself (in-place). Every row is written.
        block_v: force the block size (tests).

    Returns:
        ``(logp, entropy, lse, mean_logp)``, float32 ``[N]`` (``entropy`` and ``lse`` float64);
        ``entropy``/``mean_logp`` are empty ``[0]`` when not requested.
    """
    a_dim, b_dim, vocab = check_rows("logits", logits)
    if check_rows("grad", grad) != (a_dim, b_dim, vocab) or grad.dtype != logits.dtype:
        raise ValueError(f"grad must have the logits' shape {tuple(logits.shape)} and dtype {logits.dtype}")
    n_rows = a_dim * b_dim
    if mode == MODE_LINEAR:
        n_coefs, n_params = 3, 0
    elif mode == MODE_PPO:
        n_coefs, n_params = 4, 6
    else:
        raise ValueError(f"mode must be {MODE_LINEAR} (linear) or {MODE_PPO} (ppo), got {mode}")
    if coefs.shape != (n_coefs, n_rows) or coefs.dtype != torch.float32 or not coefs.is_contiguous():
        raise ValueError(f"coefs must be a contiguous float32 [{n_coefs}, {n_rows}] tensor, got {coefs.shape}")
    if len(params) != n_params:
        raise ValueError(f"mode {mode} takes {n_params} params, got {len(params)}")
    clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef = params if params else (0.0,) * 6
    if kl_coef != 0.0 and kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}, got {kl_kind}")
    if entropy_coef != 0.0 and not with_entropy:
        raise ValueError("a nonzero entropy_coef needs with_entropy=True")

    device = logits.device
    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty(n_rows, dtype=torch.float64, device=device)
    entropy = torch.empty(n_rows if with_entropy else 0, dtype=torch.float64, device=device)
    mean_logp = torch.empty(n_rows, dtype=torch.float32, device=device) if with_mean_logp else empty_f32(device)
    if n_rows == 0:
        return logp, entropy, lse, mean_logp
    config = pick_config(vocab, block_v)
    _token_stats_fused_kernel[(n_rows,)](
        logits, labels, coefs[0], coefs[1], coefs[2], coefs[n_coefs - 1],
        logp, entropy if with_entropy else unused_f64(device), lse, mean_logp if with_mean_logp else logp, grad,
        logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
        b_dim, vocab,
        1.0 / temperature, ignore_index,
        float(clip_low), float(clip_high), float(dual_clip), float(kl_coef), float(entropy_coef),
        MODE=mode, KL_KIND=int(kl_kind) if mode == MODE_PPO and kl_coef != 0.0 else 0,
        WITH_ENTROPY=with_entropy, WITH_MEAN_LOGP=with_mean_logp,
        **config.launch(),
    )  # fmt: skip
    return logp, entropy, lse, mean_logp


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (rlhf_fast/kernels/aot.py)

# (MODE, KL_KIND, WITH_ENTROPY, WITH_MEAN_LOGP). Not the full product (20 launchable): the plainest
# and the heaviest at every config; at the largest config, where registers are tightest, also the
# combinations the losses launch (cross entropy with label smoothing and an entropy term, PPO with
# each KL estimator, with and without entropy), so every switch value is compiled for every dtype/target.
_FUSED_SWITCHES = [(0, 0, 0, 0), (1, 3, 1, 1)]
_FUSED_SWITCHES_LARGEST = [
    (0, 0, 0, 1), (0, 0, 1, 1), (1, 0, 1, 0), (1, 1, 1, 0), (1, 2, 1, 0), (1, 3, 1, 0), (1, 0, 0, 0),
]  # fmt: skip


def aot_specs(dtype: torch.dtype) -> list[AotSpec]:
    """The fused kernel for ``dtype`` logits in the switch combinations above, plus the heaviest (PPO
    with k3 and everything on) with int64 strides at the largest config."""
    dt = TRITON_DTYPE[dtype]
    scalars = ("inv_temperature", "clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef")
    types = {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "grad_ptr": f"*{dt}", **dict.fromkeys(scalars, "fp32")}
    specs = []
    for config in CONFIGS:
        big = config == CONFIGS[-1]
        for mode, kl_kind, entropy, mean_logp in _FUSED_SWITCHES + (_FUSED_SWITCHES_LARGEST if big else []):
            heaviest = (mode, kl_kind, entropy, mean_logp) == (1, 3, 1, 1)
            for index_type in ("i32", "i64") if heaviest and big else ("i32",):
                specs.append(aot_spec(
                    _token_stats_fused_kernel, config, dt,
                    switches={"MODE": mode, "KL_KIND": kl_kind, "WITH_ENTROPY": bool(entropy),
                              "WITH_MEAN_LOGP": bool(mean_logp)},
                    types=types, rows_read=2, rows_written=1, index_type=index_type,
                ))  # fmt: skip
    return specs
