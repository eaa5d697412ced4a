"""``python -m rlhf_fast ...`` is the ``rlhf-fast`` command line (see :mod:`rlhf_fast.cli`)."""

from rlhf_fast.cli import main

raise SystemExit(main())
