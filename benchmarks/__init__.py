"""Benchmarks for rlhf_fast: ``python -m benchmarks.run`` (see ``benchmarks/run.py``)."""
