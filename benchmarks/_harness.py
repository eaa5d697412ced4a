"""Moved to :mod:`rlhf_fast.bench.harness` (installed with the package); this name stays an alias of it so
``from benchmarks import _harness`` keeps working in the suites that live here."""

import sys

from rlhf_fast.bench import harness

sys.modules[__name__] = harness
