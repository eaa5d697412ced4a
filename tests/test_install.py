"""What an install provides: the backend report and choice, the fallback without ``rlhf_fast._C``,
and the Triton kernels only under the ``rlhf_fast`` name."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cases import BACKENDS, RecordOps, make_labels, make_logits

import rlhf_fast as rf

REPO = Path(__file__).resolve().parents[1]
ENV_VAR = "RLHF_FAST_BACKEND"


def _run_python(code: str, *, cwd=None, source_tree=True, drop=()) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; the repo is importable from source unless told not."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, *drop)}
    if source_tree:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    else:
        env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=300
    )


def _cpp_importable() -> bool:
    try:
        importlib.import_module("rlhf_fast._C")
    except ImportError:
        return False
    return True


def _small_call(backend=None):
    logits = make_logits((2, 3, 17), torch.float32)
    return rf.token_logprobs(logits, make_labels((2, 3), 17), backend=backend)


# ---------------------------------------------------------------------------------- the report
def test_backends_report():
    report = rf.backends()
    assert set(report) == set(BACKENDS)
    for name, status in report.items():
        assert isinstance(status.available, bool), name
        assert isinstance(status.detail, str) and status.detail.strip(), f"{name}: no detail"
    assert report["torch"].available
    assert report["cpp"].available == _cpp_importable(), report["cpp"]
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        assert report["triton"].available, report["triton"]


# ---------------------------------------------------------------------------------- the choice
def test_default_backend_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with RecordOps() as rec:
        _small_call()
    assert rec.backends_used() == {"cpp" if rf.backends()["cpp"].available else "torch"}


def test_default_backend_on_a_gpu(monkeypatch):
    """CUDA tensors go to triton, or to torch when triton cannot be imported (it is an optional dependency):
    the op then runs, slower, instead of failing inside on an import."""
    from rlhf_fast import _dispatch

    monkeypatch.delenv(ENV_VAR, raising=False)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_dispatch, "_TRITON_ERROR", None)
    assert _dispatch.resolve(None, cuda) == "triton"
    monkeypatch.setattr(_dispatch, "_TRITON_ERROR", "triton is not installed")
    assert _dispatch.resolve(None, cuda) == "torch"
    with pytest.raises(ValueError, match="triton is not installed"):
        _dispatch.resolve("triton", cuda)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_backend_keyword(monkeypatch, backend):
    monkeypatch.delenv(ENV_VAR, raising=False)
    logits = make_logits((2, 3, 17), torch.float32).requires_grad_()
    q_logits = make_logits((2, 3, 17), torch.float32).requires_grad_()
    labels = make_labels((2, 3), 17)
    with RecordOps() as rec:
        loss = rf.token_logprobs(logits, labels, backend=backend).sum()
        loss = loss + rf.token_entropy(logits, backend=backend).sum()
        loss = loss + sum(rf.token_logprobs_and_entropy(logits, labels, backend=backend)).sum()
        loss = loss + rf.kl_divergence(logits, q_logits, backend=backend).sum()
        loss.backward()
    assert {name for name, _ in rec.completed} == {
        "rlhf_fast::token_stats_fwd", "rlhf_fast::token_stats_bwd", "rlhf_fast::kl_fwd", "rlhf_fast::kl_bwd"
    }
    assert rec.backends_used() == {backend}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_env_var_sets_the_default(monkeypatch, backend):
    monkeypatch.setenv(ENV_VAR, backend)
    with RecordOps() as rec:
        _small_call()
    assert rec.backends_used() == {backend}


@pytest.mark.parametrize(
    ("backend", "env"),
    [pytest.param(b, e, id=f"{b}-over-{e}") for b in BACKENDS for e in BACKENDS if b != e],
    indirect=["backend"],
)
def test_keyword_beats_env_var(monkeypatch, backend, env):
    if not rf.backends()[env].available:
        pytest.skip(f"backend {env!r} unavailable: {rf.backends()[env].detail}")
    monkeypatch.setenv(ENV_VAR, env)
    with RecordOps() as rec:
        _small_call(backend)
    assert rec.backends_used() == {backend}


# --------------------------------------------------------------------------- install without _C
_WITHOUT_C = r"""
import importlib.abc, json, sys, warnings

class BlockC(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "rlhf_fast._C":
            raise ImportError("rlhf_fast._C blocked by the test")
        return None

sys.meta_path.insert(0, BlockC())
import torch
from torch.utils._python_dispatch import TorchDispatchMode

class Backends(TorchDispatchMode):
    used = set()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rlhf_fast":
            self.used.add(args[-1])
        return func(*args, **(kwargs or {}))

torch.manual_seed(0)
logits = (torch.randn(3, 5, 101) * 4).requires_grad_()
labels = torch.randint(0, 101, (3, 5))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")  # the library, not Python's registry, must keep it to one
    import rlhf_fast as rf
    with Backends() as mode:
        for _ in range(3):
            logp = rf.token_logprobs(logits, labels)
        logp.sum().backward()
try:
    rf.token_logprobs(logits, labels, backend="cpp")
    cpp_error = None
except ValueError as exc:
    cpp_error = str(exc)

x64 = logits.detach().double().requires_grad_()
ref = rf.reference.token_logprobs(x64, labels)
ref.sum().backward()
status = rf.backends()["cpp"]
json.dump({
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    "cpp": [status.available, status.detail],
    "cpp_error": cpp_error,
    "used": sorted(mode.used),
    "logp_err": (logp.double() - ref).abs().max().item(),
    "grad_err": (logits.grad.double() - x64.grad).abs().max().item(),
}, sys.stdout)
"""


def test_works_without_the_extension():
    proc = _run_python(_WITHOUT_C)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ours = [w for w in out["warnings"] if "rlhf_fast" in w or "fall" in w.lower()]
    assert len(ours) == 1, f"want one fallback warning, got {out['warnings']}"
    assert "torch" in ours[0], ours[0]
    available, detail = out["cpp"]
    assert not available and detail.strip()
    assert out["cpp_error"] is not None and "backend" in out["cpp_error"], out["cpp_error"]
    assert out["used"] == ["torch"]
    assert out["logp_err"] < 1e-4 and out["grad_err"] < 1e-5, out


# ------------------------------------------------------------------------- the kernels package
_KERNELS = r"""
import importlib.util, json, sys
import rlhf_fast, rlhf_fast.kernels
spec = importlib.util.find_spec("kernels")
where = None if spec is None else [spec.origin, *(spec.submodule_search_locations or [])]
json.dump({"kernels": where, "loaded": "kernels" in sys.modules, "ours": rlhf_fast.kernels.__name__}, sys.stdout)
"""


@pytest.mark.parametrize("installed", [True, False], ids=["installed", "source-tree"])
def test_kernels_only_under_rlhf_fast(tmp_path, installed):
    # transformers imports a top-level package named `kernels` (a dependency of transformers 5.x): our
    # Triton kernels must never answer to that name. Installed: run from elsewhere, without the checkout
    # on the path. Source tree: the checkout on the path and as the working directory, as under
    # `python -m pytest` or `python -m rlhf_fast.bench` run from the repository root.
    if installed and _run_python("import rlhf_fast", cwd=tmp_path, source_tree=False).returncode != 0:
        pytest.skip("rlhf_fast is not installed (pip install --no-build-isolation -e .)")
    proc = _run_python(_KERNELS, cwd=tmp_path if installed else REPO, source_tree=not installed)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ours"] == "rlhf_fast.kernels"
    assert not out["loaded"], "importing rlhf_fast.kernels also created a top-level `kernels` module"
    for path in out["kernels"] or []:
        assert path is None or not Path(path).resolve().is_relative_to(REPO), f"`import kernels` finds {path}"
