"""Moved to :mod:`rlhf_fast.bench.ops` (installed with the package); this name stays an alias of it."""

import sys

from rlhf_fast.bench import ops

sys.modules[__name__] = ops
