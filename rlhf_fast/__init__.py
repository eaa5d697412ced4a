"""rlhf_fast: fused, streaming RLHF losses straight from logits.

>>> import rlhf_fast as rf
>>> logp = rf.token_logprobs(logits, labels)          # [...] float32, no [tokens, vocab] float32 copy
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _alias_source_kernels() -> None:
    """Make the top-level ``kernels/`` dir importable as ``rlhf_fast.kernels`` in a source checkout.

    Installed (editable or not), setuptools maps ``rlhf_fast.kernels`` to ``kernels/`` itself. Run
    from a bare checkout (``PYTHONPATH=.``), nothing does, and the directory must never be importable
    as a top-level ``kernels`` module, so register it under our name only.
    """
    if importlib.util.find_spec("rlhf_fast.kernels") is not None:
        return
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(src, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location("rlhf_fast.kernels", init, submodule_search_locations=[src])
        module = importlib.util.module_from_spec(spec)
        sys.modules["rlhf_fast.kernels"] = module
        spec.loader.exec_module(module)
        globals()["kernels"] = module  # as the import system does for a submodule it finds itself


_alias_source_kernels()

from rlhf_fast import nn, reference  # noqa: E402
from rlhf_fast._dispatch import BackendStatus, backends  # noqa: E402
from rlhf_fast.buffer_cache import cache_info, empty_cache, set_cache_limit  # noqa: E402
from rlhf_fast.ops import (  # noqa: E402
    cross_entropy,
    dpo_loss,
    kl_divergence,
    kl_estimate,
    linear_cross_entropy,
    linear_dpo_loss,
    linear_kl_divergence,
    linear_ppo_loss,
    linear_token_entropy,
    linear_token_logprobs,
    linear_token_logprobs_and_entropy,
    ppo_loss,
    ranking_loss,
    reward_loss,
    sequence_logprobs,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "backends",
    "cache_info",
    "cross_entropy",
    "dpo_loss",
    "empty_cache",
    "kl_divergence",
    "kl_estimate",
    "linear_cross_entropy",
    "linear_dpo_loss",
    "linear_kl_divergence",
    "linear_ppo_loss",
    "linear_token_entropy",
    "linear_token_logprobs",
    "linear_token_logprobs_and_entropy",
    "nn",
    "ppo_loss",
    "ranking_loss",
    "reference",
    "reward_loss",
    "sequence_logprobs",
    "set_cache_limit",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
