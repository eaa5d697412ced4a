"""The benchmark suite: every op against eager PyTorch, ``torch.compile`` and the installed peers.

``python -m rlhf_fast.bench [...]`` (or ``rlhf-fast bench``) runs :func:`rlhf_fast.bench.run.main`;
:mod:`~rlhf_fast.bench.harness` holds the op-agnostic timing, memory and process-isolation helpers,
:mod:`~rlhf_fast.bench.ops` the benchmarked ops. Nothing is imported here, so ``import rlhf_fast``
stays as light as it was and ``python -m rlhf_fast.bench.<module>`` runs each module once.
"""
