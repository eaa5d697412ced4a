"""Triton kernels of rlhf_fast, importable only as ``rlhf_fast.kernels``.

One module per op: ``token_stats`` (log-probability / entropy / mean log-probability / log-sum-exp
per token; its forward that also writes the loss gradient is in ``token_stats_fused``, the row walks
both share in ``_softmax_row``) and ``kl_div`` (exact KL between two logits tensors), each with its
forward and backward kernels and their host launchers; ``aot`` compiles them ahead of time for real
GPUs. Importing this package
does not import triton or touch any device; import the submodules for that.
"""

from ._common import CONFIGS, KernelConfig, force_block_v, pick_config

__all__ = ["CONFIGS", "KernelConfig", "force_block_v", "pick_config"]
