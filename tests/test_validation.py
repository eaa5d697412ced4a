"""Bad input: a TypeError/ValueError that names the argument, raised before any kernel runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cases import BACKENDS, IGNORE_INDEX, OPS, TOKEN_OPS, RecordOps

import rlhf_fast as rf

V = 37
SHAPE = (2, 5, V)
REPO = Path(__file__).resolve().parents[1]


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _logits(dtype=torch.float32, shape=SHAPE, device="cpu"):
    return torch.randn(shape).to(dtype).to(device)


def _labels(dtype=torch.int64, shape=SHAPE[:-1], device="cpu"):
    return torch.randint(0, V, shape).to(dtype).to(device)


def _all_logits(op, logits):
    """The logits arguments of ``op`` built from one tensor (p and q alike for the KL)."""
    return (logits, logits.clone()) if OPS[op].pair else (logits,)


def _default_labels(op, logits):
    return torch.zeros(logits.shape[:-1], dtype=torch.int64) if OPS[op].labels else None


def _expect(exc, match, op, backend, *logits, labels=None, data_dependent=False, **kw):
    with RecordOps() as rec, pytest.raises(exc, match=match):
        OPS[op](rf, *logits, labels=labels, backend=backend, **kw)
    if data_dependent:
        # labels in range can only be checked by reading them, which may happen inside the op;
        # it must still fail before anything is computed or returned.
        assert rec.completed == [], f"{[name for name, _ in rec.completed]} ran on bad input"
    else:
        assert rec.entered == [], f"{[name for name, _ in rec.entered]} reached on bad input"


ALL_OPS = list(OPS)
LABEL_OPS = [name for name in TOKEN_OPS if OPS[name].labels]


# ------------------------------------------------------------------------------------ logits
@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64],
    ids=_name,
)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_logits_dtype(backend, op, dtype):
    logits = torch.randint(0, 3, SHAPE).to(dtype)
    _expect(TypeError, "logits", op, backend, *_all_logits(op, logits), labels=_default_labels(op, logits))


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_vocabulary(backend, op):
    logits = torch.empty(2, 5, 0)
    labels = torch.full((2, 5), IGNORE_INDEX) if OPS[op].labels else None  # only V is wrong
    _expect(ValueError, "logits", op, backend, *_all_logits(op, logits), labels=labels)


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("inf"), float("nan")], ids=str)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_temperature_not_positive_and_finite(backend, op, temperature):
    logits = _logits()
    _expect(
        ValueError, "temperature", op, backend, *_all_logits(op, logits),
        labels=_default_labels(op, logits), temperature=temperature,
    )


# ------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8, torch.bool], ids=_name)
@pytest.mark.parametrize("op", LABEL_OPS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_labels_dtype(backend, op, dtype):
    _expect(TypeError, "labels", op, backend, _logits(), labels=_labels().to(dtype))


@pytest.mark.parametrize("shape", [(2, 4), (5, 2), (2, 5, 1), (10,)], ids=str)
@pytest.mark.parametrize("op", LABEL_OPS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_labels_shape(backend, op, shape):
    _expect(ValueError, "labels", op, backend, _logits(), labels=_labels(shape=shape))


@pytest.mark.parametrize("op", LABEL_OPS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_labels_device(backend, op):
    _expect(ValueError, "labels", op, backend, _logits(), labels=_labels(device="meta"))


OUT_OF_RANGE = [
    pytest.param(V, IGNORE_INDEX, torch.int64, id="V"),
    pytest.param(V + 1000, IGNORE_INDEX, torch.int64, id="V+1000"),
    pytest.param(2**40, IGNORE_INDEX, torch.int64, id="2**40"),
    pytest.param(-1, IGNORE_INDEX, torch.int64, id="-1"),
    pytest.param(IGNORE_INDEX, -1, torch.int64, id="-100-with-ignore_index=-1"),
    pytest.param(V, IGNORE_INDEX, torch.int32, id="V-int32"),
    pytest.param(-5, IGNORE_INDEX, torch.int32, id="-5-int32"),
]


@pytest.mark.parametrize(("bad", "ignore_index", "dtype"), OUT_OF_RANGE)
@pytest.mark.parametrize("op", LABEL_OPS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_labels_out_of_range(backend, op, bad, ignore_index, dtype):
    # One bad label among good ones; reading logits[row, label] with it would go out of bounds.
    labels = _labels()
    labels[1, 3] = bad
    _expect(
        ValueError, "labels", op, backend, _logits(), labels=labels.to(dtype),
        ignore_index=ignore_index, data_dependent=True,
    )


# ------------------------------------------------------------------------------------ KL pair
@pytest.mark.parametrize("shape", [(2, 5, V + 1), (2, 4, V), (10, V), (2, 5, 1, V)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kl_shape_mismatch(backend, shape):
    _expect(ValueError, "q_logits", "kl", backend, _logits(), _logits(shape=shape))


@pytest.mark.parametrize(
    ("p_dtype", "q_dtype"),
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32)],
    ids=_name,
)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kl_dtype_mismatch(backend, p_dtype, q_dtype):
    # Both dtypes are valid logits dtypes; only the pair disagrees: a dtype problem, so a TypeError.
    _expect(TypeError, "q_logits", "kl", backend, _logits(p_dtype), _logits(q_dtype))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kl_device_mismatch(backend):
    _expect(ValueError, "q_logits", "kl", backend, _logits(), _logits(device="meta"))


# ------------------------------------------------------------------------------------ backend
@pytest.mark.parametrize("name", ["cuda", "Torch", "", "cpu"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_unknown_backend(op, name):
    logits = _logits()
    _expect(ValueError, "backend", op, name, *_all_logits(op, logits), labels=_default_labels(op, logits))


@pytest.mark.parametrize("op", ALL_OPS)
def test_unknown_backend_in_env_var(monkeypatch, op):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "tritonn")
    logits = _logits()
    _expect(ValueError, "(?i)backend", op, None, *_all_logits(op, logits), labels=_default_labels(op, logits))


def test_triton_on_cpu_without_interpreter():
    # TRITON_INTERPRET is read when triton is imported: needs a process that never set it.
    code = (
        "import torch, rlhf_fast as rf\n"
        "assert not rf.backends()['triton'].available, rf.backends()['triton']\n"
        "try:\n"
        "    rf.token_logprobs(torch.randn(2, 9), torch.zeros(2, dtype=torch.long), backend='triton')\n"
        "except ValueError as exc:\n"
        "    assert 'backend' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no ValueError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RLHF_FAST_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", "-c", code],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------ what is allowed
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_good_input_reaches_the_kernel(backend, op):
    # The control for the "nothing ran" checks above: valid input is recorded as running.
    logits = _logits()
    with RecordOps() as rec:
        OPS[op](rf, *_all_logits(op, logits), labels=_default_labels(op, logits), backend=backend)
    assert [name for name, _ in rec.completed] == [
        "rlhf_fast::kl_fwd" if OPS[op].pair else "rlhf_fast::token_stats_fwd"
    ]
    assert rec.backends_used() == {backend}
