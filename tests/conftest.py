"""Test session setup: the Triton interpreter, a seed per test, the ``backend`` fixture."""

import os

# There is no GPU here: the triton backend runs on CPU tensors through the interpreter, which
# triton reads when it is first imported, so this must precede every import of triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib

import pytest
import torch

# Inputs are random but reproducible: each test draws from a seed derived from its own id (and
# from RLHF_FAST_TEST_SEED, to draw a different set of inputs for a whole run).
SEED_ENV = "RLHF_FAST_TEST_SEED"


def pytest_configure(config):
    # The interpreter runs kernels in numpy, which warns where a kernel means it: log(0) = -inf
    # for masked lanes, inf - inf in lanes that tl.where then discards.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


def pytest_report_header(config):
    return f"{SEED_ENV}={os.environ.get(SEED_ENV, '0')}, TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}"


@pytest.fixture(autouse=True)
def _seed(request):
    base = os.environ.get(SEED_ENV, "0")
    torch.manual_seed(zlib.crc32(f"{base}:{request.node.nodeid}".encode()))


@pytest.fixture
def backend(request):
    """The backend named by the (indirect) parameter; skipped, with the reason, if unavailable."""
    import rlhf_fast as rf

    name = request.param
    status = rf.backends()[name]
    if not status.available:
        pytest.skip(f"backend {name!r} unavailable: {status.detail}")
    return name
