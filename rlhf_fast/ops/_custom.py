"""The kernel interface as registered torch custom ops, with fake implementations and autograd.

Every backend implements five functions on logits viewed as ``[A, B, V]`` (last dim contiguous, the
two leading strides arbitrary, so a ``logits[:, :-1]`` slice arrives without a copy; ``N = A*B``
rows; per-row tensors are contiguous ``[N]``; labels int64):

``token_stats_fwd(logits, labels?, temperature, ignore_index, with_logp, with_entropy, with_mean_logp)``
    -> ``(logp [N], entropy [N], lse [N], mean_logp [N])``, float32 except ``lse`` and ``entropy``, which are
    float64: the backward's ``p = exp(x - lse)`` needs more than float32 holds once ``|x|`` is large (see
    ``SplitLse`` in ``csrc/cpu/vec_utils.h``), and its entropy factor ``x - E_p[x]`` takes ``E_p[x]`` as
    ``lse - entropy``, which float32 parts near ``log V`` would leave off by their ulp (~5e-7, most of the factor
    on a near-uniform row). The callers hand users a float32 entropy. With ``x = logits / T``:
    ``lse = logsumexp(x)``, ``logp = x[label] - lse``, ``entropy = lse - sum softmax(x) * x`` and
    ``mean_logp = mean_v log softmax(x)_v`` (what label smoothing needs). Rows whose label is
    ``ignore_index`` are skipped (all outputs 0). Outputs not asked for are empty ``[0]`` tensors.
``token_stats_bwd(logits, labels?, lse, entropy?, grad_logp?, grad_entropy?, grad_mean_logp?, temperature,
ignore_index)``
    -> ``grad_logits [A, B, V]`` in the logits' dtype:
    ``(g_lp * (onehot - p) - g_H * p * (x - E_p[x]) + g_u * (1/V - p)) / T`` (``log p + H = x - E_p[x]``,
    formed that way: see ``entropy`` above), zero rows where the label is ignored.
``token_stats_fused(logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, mode, coefs,
params, grad)`` -> the outputs of ``token_stats_fwd``, and writes the gradient of a loss into ``grad``
    (a fresh buffer, or the logits themselves for an in-place backward) in the same pass: each row is
    read, its coefficients ``(g_lp, g_H, g_u)`` computed, and its gradient row written while the row is
    still in cache. ``mode 0``: the coefficients are ``coefs [3, N]``. ``mode 1`` (PPO): ``coefs`` is
    ``[old_logp, adv, ref_logp, weight]`` and ``params`` is ``[clip_low, clip_high, dual_clip (0: off),
    kl_coef, kl_kind (1|2|3), entropy_coef]``; ``g_lp = w * (d pg / d logp + kl_coef * d k / d logp)``,
    ``g_H = -w * entropy_coef`` (see ``rlhf_fast._torch_backend.ppo_coefs``).
``kl_fwd(p_logits, q_logits, temperature)`` -> ``(kl [N], lse_p [N], lse_q [N])``, exact KL(P||Q); the
    log-sum-exps float64 as above.
``kl_bwd(p_logits, q_logits, lse_p, lse_q, kl, grad_kl, temperature, need_p, need_q)``
    -> ``(g * P * (log P - log Q - kl) / T, g * (Q - P) / T)``, each empty ``[0]`` when not needed.

The CPU backends (``cpp``, ``torch``) also implement ``token_stats_block_grad_`` for the fused-linear
forms' vocabulary-outer weight gradient (see the op below).

The registered ops take one more argument, ``backend`` (``"triton" | "cpp" | "torch"``), already
resolved by the caller; the op body looks the function up in ``rlhf_fast._dispatch.TABLE``. The
registered ``token_stats_fused`` takes no ``grad``: it allocates the buffer and returns it as a fifth
output; ``token_stats_fused_`` writes over the logits.

The ops' callers go through the functions of the same names at the end of this module. Traced code
(``torch.compile``, ``make_fx``, fake tensors) gets the registered ops; a plain eager call on CPU or CUDA
tensors runs the same op body directly, with the same autograd formulas (a ``torch.autograd.Function``)
and the same version-counter bump for the in-place ops. torch.library's Python dispatch (default
filling, alias checks, redispatch) costs 50-70 us per registered-op call here, a call's whole work at
1024 tokens of a 4k vocabulary; the direct path costs a few.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from rlhf_fast._dispatch import TABLE


def _rows(t: Tensor) -> int:
    return t.shape[0] * t.shape[1]


def _f32(n: int, like: Tensor) -> Tensor:
    return like.new_empty(n, dtype=torch.float32)


def _f64(n: int, like: Tensor) -> Tensor:
    return like.new_empty(n, dtype=torch.float64)


def empty_gradient(like: Tensor, backend: str) -> Tensor:
    """An uninitialized contiguous tensor shaped like ``like``, for a kernel to write a gradient into.

    On the cpp backend it comes from the cache of large buffers (``rlhf_fast/buffer_cache.py``), so a
    training loop does not pay for a freshly zeroed and faulted-in ``[tokens, vocab]`` buffer on every
    step; traced code (torch.compile) allocates as usual.
    """
    if backend == "cpp" and not torch.compiler.is_compiling():
        return TABLE[backend].empty_grad(like)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def check_labels_in_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Labels outside ``[0, V)`` other than ``ignore_index`` must never reach a kernel.

    Runs inside the op body (not in the traced Python), so it works under ``torch.compile``;
    on CUDA it costs one host synchronization.
    """
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")


def _check_labels(labels: Tensor | None, vocab: int, ignore_index: int, backend: str) -> None:
    """check_labels_in_range before a kernel, except on ``cpp``, whose ops make the same check (and raise the
    same ValueError) in C++ while reading the labels, for ~1 us where these five tensor ops take ~12."""
    if labels is not None and backend != "cpp":
        check_labels_in_range(labels, vocab, ignore_index)


# ---------------------------------------------------------------------------------------- log-probs
def _token_stats_fwd(logits, labels, temperature, ignore_index, with_logp, with_entropy, with_mean_logp, backend):
    _check_labels(labels, logits.shape[-1], ignore_index, backend)
    if _rows(logits) == 0:
        return _stats_outputs(logits, with_logp, with_entropy, with_mean_logp)
    return TABLE[backend].token_stats_fwd(
        logits, labels, temperature, ignore_index, with_logp, with_entropy, with_mean_logp
    )


@torch.library.custom_op("rlhf_fast::token_stats_fwd", mutates_args=())
def _token_stats_fwd_op(
    logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    ignore_index: int,
    with_logp: bool,
    with_entropy: bool,
    with_mean_logp: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _token_stats_fwd(logits, labels, temperature, ignore_index, with_logp, with_entropy, with_mean_logp, backend)


def _stats_outputs(logits, with_logp, with_entropy, with_mean_logp):
    n = _rows(logits)
    logp, mean_logp = (_f32(n if w else 0, logits) for w in (with_logp, with_mean_logp))
    return logp, _f64(n if with_entropy else 0, logits), _f64(n, logits), mean_logp


@_token_stats_fwd_op.register_fake
def _(logits, labels, temperature, ignore_index, with_logp, with_entropy, with_mean_logp, backend):
    return _stats_outputs(logits, with_logp, with_entropy, with_mean_logp)


def _token_stats_bwd(
    logits, labels, lse, entropy, grad_logp, grad_entropy, grad_mean_logp, temperature, ignore_index, backend
):
    if _rows(logits) == 0:
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return TABLE[backend].token_stats_bwd(
        logits, labels, lse, entropy, grad_logp, grad_entropy, grad_mean_logp, temperature, ignore_index
    )


@torch.library.custom_op("rlhf_fast::token_stats_bwd", mutates_args=())
def _token_stats_bwd_op(
    logits: Tensor,
    labels: Tensor | None,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    grad_mean_logp: Tensor | None,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> Tensor:
    return _token_stats_bwd(
        logits, labels, lse, entropy, grad_logp, grad_entropy, grad_mean_logp, temperature, ignore_index, backend
    )


@_token_stats_bwd_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, grad_mean_logp, temperature, ignore_index, backend):
    return logits.new_empty(logits.shape)


def _stats_setup(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_logp, with_entropy, with_mean_logp, backend = inputs
    _, entropy, lse, _ = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse, entropy if with_entropy else None)
    ctx.args = (temperature, ignore_index, (with_logp, with_entropy, with_mean_logp), backend)


def _stats_backward(ctx, grad_logp, grad_entropy, _grad_lse, grad_mean_logp):
    logits, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, wanted, backend = ctx.args
    # float32 for the kernels: the entropy's arrives in float64 (the callers' cast to float32 sends it back so)
    grads = [
        g.to(torch.float32).contiguous() if w and g is not None else None
        for g, w in zip((grad_logp, grad_entropy, grad_mean_logp), wanted, strict=True)
    ]
    if all(g is None for g in grads):
        return (None,) * 8
    grad = token_stats_bwd(logits, labels, lse, entropy, *grads, temperature, ignore_index, backend)
    return grad, *(None,) * 7


torch.library.register_autograd("rlhf_fast::token_stats_fwd", _stats_backward, setup_context=_stats_setup)


def _token_stats_block_grad_(block, labels, lse, entropy, coefs, col0, vocab, temperature, ignore_index, backend):
    if _rows(block) == 0:
        return
    TABLE[backend].token_stats_block_grad_(block, labels, lse, entropy, coefs, col0, vocab, temperature, ignore_index)


@torch.library.custom_op("rlhf_fast::token_stats_block_grad_", mutates_args=("block",))
def _token_stats_block_grad_op(
    block: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    coefs: Tensor,
    col0: int,
    vocab: int,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> None:
    """``token_stats_bwd`` over the vocabulary columns ``[col0, col0 + Vb)`` of ``block [A, B, Vb]``
    (contiguous), written over the block: the second pass of the fused-linear forms' vocabulary-outer
    weight gradient. ``coefs [3, N]`` are the upstream gradients ``(g_lp, g_H, g_u)``; ``lse`` (and
    ``entropy``, which switches the ``g_H`` term on) are the whole rows', from the first pass. Labels
    are range-checked by the caller against ``vocab``. CPU backends only."""
    _token_stats_block_grad_(block, labels, lse, entropy, coefs, col0, vocab, temperature, ignore_index, backend)


@_token_stats_block_grad_op.register_fake
def _(block, labels, lse, entropy, coefs, col0, vocab, temperature, ignore_index, backend):
    return None


# ------------------------------------------------------------------------- gradient in the forward
def _fused(
    logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, loss_mode, coefs, params, grad, backend
):
    _check_labels(labels, logits.shape[-1], ignore_index, backend)
    if _rows(logits) == 0:
        return _stats_outputs(logits, True, with_entropy, with_mean_logp)
    return TABLE[backend].token_stats_fused(
        logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, loss_mode, coefs, params, grad
    )


# Functional (the gradient is an output, not a mutated argument): an op that mutates an argument pays
# torch.library's Python version-counter bump on every call, ~50 us here, a few percent of a 1024-token call.
@torch.library.custom_op("rlhf_fast::token_stats_fused", mutates_args=())
def _token_stats_fused_op(
    logits: Tensor,
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    with_mean_logp: bool,
    loss_mode: int,
    coefs: Tensor,
    params: list[float],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward pass that also returns d loss / d logits, contiguous ``[A, B, V]`` (modes: see module
    doc), as its fifth output."""
    return _fused_fresh(
        logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, loss_mode, coefs, params, backend
    )


def _fused_fresh(
    logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, loss_mode, coefs, params, backend
):
    grad = empty_gradient(logits, backend)
    args = (with_entropy, with_mean_logp, loss_mode, coefs, params)
    return *_fused(logits, labels, temperature, ignore_index, *args, grad, backend), grad


@torch.library.custom_op("rlhf_fast::token_stats_fused_", mutates_args=("logits",))
def _token_stats_fused_op_(
    logits: Tensor,
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    with_mean_logp: bool,
    loss_mode: int,
    coefs: Tensor,
    params: list[float],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``token_stats_fused`` writing the gradient over the logits themselves (in-place backward)."""
    args = (with_entropy, with_mean_logp, loss_mode, coefs, params)
    return _fused(logits, labels, temperature, ignore_index, *args, logits, backend)


@_token_stats_fused_op.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, loss_mode, coefs, params, backend):
    return *_stats_outputs(logits, True, with_entropy, with_mean_logp), logits.new_empty(logits.shape)


@_token_stats_fused_op_.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, loss_mode, coefs, params, backend):
    return _stats_outputs(logits, True, with_entropy, with_mean_logp)


# --------------------------------------------------------------------------------------------- KL
def _kl_fwd(p_logits, q_logits, temperature, backend):
    if _rows(p_logits) == 0:
        return _f32(0, p_logits), _f64(0, p_logits), _f64(0, p_logits)
    return TABLE[backend].kl_fwd(p_logits, q_logits, temperature)


@torch.library.custom_op("rlhf_fast::kl_fwd", mutates_args=())
def _kl_fwd_op(p_logits: Tensor, q_logits: Tensor, temperature: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kl_fwd(p_logits, q_logits, temperature, backend)


@_kl_fwd_op.register_fake
def _(p_logits, q_logits, temperature, backend):
    n = _rows(p_logits)
    return _f32(n, p_logits), _f64(n, p_logits), _f64(n, p_logits)


def _kl_bwd(p_logits, q_logits, lse_p, lse_q, kl, grad_kl, temperature, need_p, need_q, backend):
    if _rows(p_logits) == 0:
        return p_logits.new_empty(p_logits.shape), q_logits.new_empty(q_logits.shape)
    return TABLE[backend].kl_bwd(p_logits, q_logits, lse_p, lse_q, kl, grad_kl, temperature, need_p, need_q)


@torch.library.custom_op("rlhf_fast::kl_bwd", mutates_args=())
def _kl_bwd_op(
    p_logits: Tensor,
    q_logits: Tensor,
    lse_p: Tensor,
    lse_q: Tensor,
    kl: Tensor,
    grad_kl: Tensor,
    temperature: float,
    need_p: bool,
    need_q: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _kl_bwd(p_logits, q_logits, lse_p, lse_q, kl, grad_kl, temperature, need_p, need_q, backend)


@_kl_bwd_op.register_fake
def _(p_logits, q_logits, lse_p, lse_q, kl, grad_kl, temperature, need_p, need_q, backend):
    grad_p = p_logits.new_empty(p_logits.shape) if need_p else _f32(0, p_logits)
    grad_q = q_logits.new_empty(q_logits.shape) if need_q else _f32(0, q_logits)
    return grad_p, grad_q


def _kl_setup(ctx, inputs, output):
    p_logits, q_logits, temperature, backend = inputs
    kl, lse_p, lse_q = output
    ctx.mark_non_differentiable(lse_p, lse_q)
    ctx.save_for_backward(p_logits, q_logits, lse_p, lse_q, kl)
    ctx.args = (temperature, backend)


def _kl_backward(ctx, grad_kl, _grad_lse_p, _grad_lse_q):
    p_logits, q_logits, lse_p, lse_q, kl = ctx.saved_tensors
    temperature, backend = ctx.args
    need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_kl is None or not (need_p or need_q):
        return None, None, None, None
    grad_p, grad_q = kl_bwd(
        p_logits, q_logits, lse_p, lse_q, kl, grad_kl.contiguous(), temperature, need_p, need_q, backend
    )
    return (grad_p if need_p else None), (grad_q if need_q else None), None, None


torch.library.register_autograd("rlhf_fast::kl_fwd", _kl_backward, setup_context=_kl_setup)


# ---------------------------------------------------------------------------- the callers' entry points
_PLAIN = (Tensor, torch.nn.Parameter)


def _direct(*tensors: Tensor | None) -> bool:
    """Whether a call may run its op body without torch.library: eager (not traced), plain CPU or CUDA tensors,
    and no dispatch or function mode (fake tensors, ``make_fx``, a ``torch.device`` context) for the
    registered op to answer to. The first tensor is the logits."""
    return (
        not torch.compiler.is_compiling()
        and all(t is None or type(t) in _PLAIN for t in tensors)
        and tensors[0].device.type in ("cpu", "cuda")
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


def _needs_graph(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _direct_untracked(*tensors: Tensor | None) -> bool:
    """_direct for the ops without an autograd formula, where no graph is being built through them: one that is
    (a double backward) is left to the registered op, which refuses it."""
    return _direct(*tensors) and not _needs_graph(*tensors)


def _autograd_function(name: str, body, setup_context, backward) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` running an op body with the registered op's autograd formula, for the
    direct path. Its forward takes ctx and calls setup_context itself: with a separate setup_context, every
    apply() binds its arguments through inspect.signature, ~45 us."""

    def forward(ctx, *inputs):
        output = body(*inputs)
        setup_context(ctx, inputs, output)
        return output

    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


_TokenStatsFwd = _autograd_function("_TokenStatsFwd", _token_stats_fwd, _stats_setup, _stats_backward)
_KlFwd = _autograd_function("_KlFwd", _kl_fwd, _kl_setup, _kl_backward)


def token_stats_fwd(logits, labels, temperature, ignore_index, with_logp, with_entropy, with_mean_logp, backend):
    """``rlhf_fast::token_stats_fwd`` (differentiable with respect to the logits)."""
    args = (logits, labels, temperature, ignore_index, with_logp, with_entropy, with_mean_logp, backend)
    if not _direct(logits, labels):
        return _token_stats_fwd_op(*args)
    if _needs_graph(logits):
        return _TokenStatsFwd.apply(*args)
    return _token_stats_fwd(*args)


def token_stats_bwd(
    logits, labels, lse, entropy, grad_logp, grad_entropy, grad_mean_logp, temperature, ignore_index, backend
):
    """``rlhf_fast::token_stats_bwd`` (no autograd formula)."""
    args = (logits, labels, lse, entropy, grad_logp, grad_entropy, grad_mean_logp, temperature, ignore_index, backend)
    tensors = (logits, labels, lse, entropy, grad_logp, grad_entropy, grad_mean_logp)
    if _direct_untracked(*tensors):
        return _token_stats_bwd(*args)
    return _token_stats_bwd_op(*args)


def token_stats_block_grad_(block, labels, lse, entropy, coefs, col0, vocab, temperature, ignore_index, backend):
    """``rlhf_fast::token_stats_block_grad_``: writes over ``block`` and bumps its version counter."""
    args = (block, labels, lse, entropy, coefs, col0, vocab, temperature, ignore_index, backend)
    tensors = (block, labels, lse, entropy, coefs)
    if _direct_untracked(*tensors):
        _token_stats_block_grad_(*args)
        increment_version(block)
    else:
        _token_stats_block_grad_op(*args)


def token_stats_fused(
    logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, loss_mode, coefs, params, backend
):
    """``rlhf_fast::token_stats_fused``: the stats and a fresh gradient buffer (no autograd formula)."""
    args = (logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, loss_mode, coefs, params, backend)
    if _direct_untracked(logits, labels, coefs):
        return _fused_fresh(*args)
    return _token_stats_fused_op(*args)


def token_stats_fused_(
    logits, labels, temperature, ignore_index, with_entropy, with_mean_logp, loss_mode, coefs, params, backend
):
    """``rlhf_fast::token_stats_fused_``: the gradient over the logits, whose version counter it bumps."""
    args = (with_entropy, with_mean_logp, loss_mode, coefs, params)
    if _direct_untracked(logits, labels, coefs):
        out = _fused(logits, labels, temperature, ignore_index, *args, logits, backend)
        increment_version(logits)
        return out
    return _token_stats_fused_op_(logits, labels, temperature, ignore_index, *args, backend)


def kl_fwd(p_logits, q_logits, temperature, backend):
    """``rlhf_fast::kl_fwd`` (differentiable with respect to both logits)."""
    if not _direct(p_logits, q_logits):
        return _kl_fwd_op(p_logits, q_logits, temperature, backend)
    if _needs_graph(p_logits, q_logits):
        return _KlFwd.apply(p_logits, q_logits, temperature, backend)
    return _kl_fwd(p_logits, q_logits, temperature, backend)


def kl_bwd(p_logits, q_logits, lse_p, lse_q, kl, grad_kl, temperature, need_p, need_q, backend):
    """``rlhf_fast::kl_bwd`` (no autograd formula)."""
    args = (p_logits, q_logits, lse_p, lse_q, kl, grad_kl, temperature, need_p, need_q, backend)
    tensors = (p_logits, q_logits, lse_p, lse_q, kl, grad_kl)
    if _direct_untracked(*tensors):
        return _kl_bwd(*args)
    return _kl_bwd_op(*args)
