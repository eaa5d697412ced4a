"""Moved to :mod:`rlhf_fast.bench.run`: ``python -m benchmarks.run [...]`` is ``rlhf-fast bench [...]``
(``python -m rlhf_fast.bench``), and importing this name gives that module."""

import sys

from rlhf_fast.bench import run

if __name__ == "__main__":
    sys.exit(run.main())
sys.modules[__name__] = run
