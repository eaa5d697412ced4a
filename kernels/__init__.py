"""Triton kernels of rlhf_fast, importable only as ``rlhf_fast.kernels``.

One module per op: ``token_stats`` (log-probability / entropy / log-sum-exp per token) and
``kl_div`` (exact KL between two logits tensors), each with its forward and backward kernels and
their host launchers; ``aot`` compiles them ahead of time for real GPUs. Importing this package
does not import triton or touch any device; import the submodules for that.
"""

from ._common import CONFIGS, KernelConfig, force_block_v, pick_config

__all__ = ["CONFIGS", "KernelConfig", "force_block_v", "pick_config"]
