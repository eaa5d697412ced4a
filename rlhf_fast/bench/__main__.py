"""``python -m rlhf_fast.bench [...]``: the benchmark runner (see :mod:`rlhf_fast.bench.run`)."""

import sys

from rlhf_fast.bench.run import main

sys.exit(main())
