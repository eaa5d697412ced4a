"""Every CPU kernel variant the extension holds, not only the one this CPU picks.

``rlhf_fast._C`` is built for DEFAULT, AVX2, AVX512 and AVX512_BF16 and chooses at run time
(``ATEN_CPU_CAPABILITY=default|avx2`` forces a lower one, ``RLHF_FAST_AVX512_BF16=0`` keeps AVX512 on a
CPU with the bfloat16 instructions). Each variant runs in its own process, on the same inputs, through
the fused forward+gradient path (cross_entropy, ppo_loss with and without an entropy bonus), the
forward/backward pair (token_logprobs_and_entropy, some rows without an entropy gradient) and the KL
kernels, in float32, bfloat16 and float16; the parent checks every result against the float64 reference.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rlhf_fast as rf

SHAPE = (2, 37, 5003)  # odd rows and vocab: vector tails everywhere
# Rows of 1056 elements start 64-byte aligned in every dtype, so every gradient row is streamed out
# (non-temporal stores) except the step holding the label; labels r * 29 mod V put it at every lane of a step.
STREAMED_SHAPE = (2, 37, 1056)
TOL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}  # max error / max magnitude

_CHILD = r"""
import json, sys, torch
import rlhf_fast as rf
from rlhf_fast import _dispatch
path, = sys.argv[1:]
data = torch.load(path)
out = {}
for name, x in data["logits"].items():
    labels, old, adv, ref, g = data["labels"], data["old"], data["adv"], data["ref"], data["g"]
    res = {}
    a = x.clone().requires_grad_()
    res["ce"] = torch.autograd.grad(rf.cross_entropy(a, labels, backend="cpp"), a)[0]
    a = x.clone().requires_grad_()
    loss, _ = rf.ppo_loss(a, labels, old, adv, ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, backend="cpp")
    res["ppo"] = torch.autograd.grad(loss, a)[0]
    a = x.clone().requires_grad_()
    loss, _ = rf.ppo_loss(a, labels, old, adv, ref_logprobs=ref, kl_coef=0.05, backend="cpp")
    res["ppo_no_entropy_coef"] = torch.autograd.grad(loss, a)[0]
    a = x.clone().requires_grad_()
    lp, ent = rf.token_logprobs_and_entropy(a, labels, backend="cpp")
    res["lp"], res["ent"] = lp.detach(), ent.detach()
    res["lp_ent_grad"] = torch.autograd.grad((lp * g).sum() + (ent * data["g_ent"]).sum(), a)[0]
    a = x.clone().requires_grad_()
    kl = rf.kl_divergence(a, data["q"][name], backend="cpp")
    res["kl"], res["kl_grad"] = kl.detach(), torch.autograd.grad((kl * g).sum(), a)[0]
    out[name] = res
torch.save(out, path + ".out")
print(json.dumps({"capability": _dispatch._C.cpu_capability()}))
"""


def _inputs(shape):
    x64 = torch.randn(shape, dtype=torch.float64) * 3
    labels = torch.randint(0, shape[-1], shape[:-1])
    if shape == STREAMED_SHAPE:
        labels = (torch.arange(labels.numel()) * 29 % shape[-1]).view(labels.shape)
        labels[1, -1] = shape[-1] - 1
    labels[0, :5] = -100  # ignored rows
    with torch.no_grad():
        lp = torch.log_softmax(x64, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0].float()
    return {
        "logits": {name: x64.to(getattr(torch, name)) for name in TOL},
        "q": {name: (x64 + 0.5 * torch.randn(shape, dtype=torch.float64)).to(getattr(torch, name)) for name in TOL},
        "labels": labels,
        "old": lp + 0.2 * torch.randn(shape[:-1]),
        "adv": torch.randn(shape[:-1]),
        "ref": lp + 0.1 * torch.randn(shape[:-1]),
        "g": torch.randn(shape[:-1]),
        # every third row without an entropy gradient: those rows take the gradient pass without the entropy term
        "g_ent": torch.randn(shape[:-1]) * (torch.arange(shape[0] * shape[1]).view(shape[:-1]) % 3 != 0),
    }


def _references(data, name):
    """float64 results on the inputs as rounded to ``name``'s dtype."""
    x = data["logits"][name].double()
    labels, g = data["labels"], data["g"].double()
    ref = {}
    a = x.clone().requires_grad_()
    ref["ce"] = torch.autograd.grad(F.cross_entropy(a.flatten(0, 1), labels.flatten()), a)[0]
    a = x.clone().requires_grad_()
    loss, _ = rf.reference.ppo_loss(a, labels, data["old"], data["adv"], ref_logprobs=data["ref"], kl_coef=0.05,
                                    entropy_coef=0.01)  # fmt: skip
    ref["ppo"] = torch.autograd.grad(loss, a)[0]
    a = x.clone().requires_grad_()
    loss, _ = rf.reference.ppo_loss(a, labels, data["old"], data["adv"], ref_logprobs=data["ref"], kl_coef=0.05)
    ref["ppo_no_entropy_coef"] = torch.autograd.grad(loss, a)[0]
    a = x.clone().requires_grad_()
    lp, ent = rf.reference.token_logprobs_and_entropy(a, labels)
    ref["lp"], ref["ent"] = lp.detach(), ent.detach()
    ref["lp_ent_grad"] = torch.autograd.grad((lp * g).sum() + (ent * data["g_ent"].double()).sum(), a)[0]
    a = x.clone().requires_grad_()
    kl = rf.reference.kl_divergence(a, data["q"][name].double())
    ref["kl"], ref["kl_grad"] = kl.detach(), torch.autograd.grad((kl * g).sum(), a)[0]
    return ref


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


def _run_child(script: str, path, env: dict, expected: str) -> dict:
    """Runs ``script`` on the inputs at ``path`` in a process with ``env``; its results, once the
    process has reported the capability it ran."""
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "RLHF_FAST_AVX512_BF16")}
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          env={**clean, **env}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["capability"] == expected
    return torch.load(str(path) + ".out")


VARIANTS = [
    pytest.param({"ATEN_CPU_CAPABILITY": "default"}, "DEFAULT", None, id="DEFAULT"),
    pytest.param({"ATEN_CPU_CAPABILITY": "avx2"}, "AVX2", "avx2", id="AVX2"),
    pytest.param({"RLHF_FAST_AVX512_BF16": "0"}, "AVX512", "avx512bw", id="AVX512"),
    pytest.param({}, "AVX512_BF16", "avx512_bf16", id="AVX512_BF16"),
]


@pytest.fixture(scope="module", params=[SHAPE, STREAMED_SHAPE], ids=["odd", "streamed"])
def data(request, tmp_path_factory):
    if not rf.backends()["cpp"].available:
        pytest.skip("the C++ extension is not built")
    path = tmp_path_factory.mktemp("variants") / "inputs.pt"
    inputs = _inputs(request.param)
    torch.save(inputs, path)
    return path, inputs


@pytest.mark.parametrize(("env", "expected", "cpu_flag"), VARIANTS)
def test_variant_against_float64(data, env, expected, cpu_flag):
    if cpu_flag is not None and not _cpu_has(cpu_flag):
        pytest.skip(f"this CPU has no {cpu_flag}")
    path, inputs = data
    results = _run_child(_CHILD, path, env, expected)
    for name, tol in TOL.items():
        expected_results = _references(inputs, name)
        for key, want in expected_results.items():
            got = results[name][key]
            assert torch.isfinite(got).all(), (name, key)
            if key.endswith("grad") or key.startswith(("ce", "ppo")):
                assert got.dtype == inputs["logits"][name].dtype, (name, key)
            err = (got.double() - want).abs().max().item() / want.abs().max().item()
            assert err <= tol, f"{expected} {name} {key}: {err:.2e} > {tol:.0e}"


_NAN_CHILD = r"""
import json, sys, torch
import rlhf_fast as rf
from rlhf_fast import _dispatch
path, = sys.argv[1:]
data = torch.load(path)
out = {}
for name, x in data["logits"].items():
    labels, g, g2 = data["labels"], data["g"], data["g2"]
    res = {}
    a = x.clone().requires_grad_()
    lp, ent = rf.token_logprobs_and_entropy(a, labels, backend="cpp")
    res["lp_ent"] = torch.autograd.grad((lp * g).sum() + (ent * g2).sum(), a)[0]
    a = x.clone().requires_grad_()
    loss, _ = rf.ppo_loss(a, labels, data["old"], data["adv"], entropy_coef=0.01, backend="cpp")
    res["ppo"] = torch.autograd.grad(loss, a)[0]
    a, b = x.clone().requires_grad_(), data["q"][name].clone().requires_grad_()
    kl = rf.kl_divergence(a, b, backend="cpp")
    res["kl_p"], res["kl_q"] = torch.autograd.grad((kl * g).sum(), (a, b))
    out[name] = res
torch.save(out, path + ".out")
print(json.dumps({"capability": _dispatch._C.cpu_capability()}))
"""


def _nan(bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The NaN with exactly these bits (a payload arithmetic would pass on, not the default NaN)."""
    int_type = torch.int16 if dtype.itemsize == 2 else torch.int32
    signed = bits - (1 << 8 * dtype.itemsize) if bits >> (8 * dtype.itemsize - 1) else bits
    return torch.tensor([signed], dtype=int_type).view(dtype)[0]


@pytest.mark.parametrize("vocab", [5003, 1056], ids=["odd", "streamed"])
@pytest.mark.parametrize(("env", "expected", "cpu_flag"), VARIANTS)
def test_variant_gradients_keep_nan(tmp_path, vocab, env, expected, cpu_flag):
    """A NaN logit, upstream gradient or advantage makes its row's gradient NaN in every lane, whatever its
    payload: the bfloat16 rounding of a NaN whose low bits are set can carry into the exponent (and give 0)."""
    if not rf.backends()["cpp"].available:
        pytest.skip("the C++ extension is not built")
    if cpu_flag is not None and not _cpu_has(cpu_flag):
        pytest.skip(f"this CPU has no {cpu_flag}")
    rows = 9
    x64 = torch.randn(rows, vocab, dtype=torch.float64) * 3
    logits = {name: x64.to(getattr(torch, name)) for name in TOL}
    for x in logits.values():
        x[1, 7] = _nan(0x7FFF if x.itemsize == 2 else 0x7FFFFFFF, x.dtype)  # every payload bit set
        # signaling (but the fp16 one), in the tail
        x[2, vocab - 1] = _nan(0xFF81 if x.itemsize == 2 else 0xFF800001, x.dtype)
    g, adv = torch.randn(rows), torch.randn(rows)
    for t in (g, adv):
        t[3] = _nan(0xFFFFFFFF, torch.float32)
        t[4] = _nan(0x7FFFFFFF, torch.float32)
    data = {
        "logits": logits,
        "q": {name: (x64 + 0.5 * torch.randn_like(x64)).to(getattr(torch, name)) for name in TOL},
        "labels": torch.randint(0, vocab, (rows,)),
        "g": g,
        "g2": torch.randn(rows),
        "adv": adv,
        "old": -torch.rand(rows) * 5,
    }
    path = tmp_path / "inputs.pt"
    torch.save(data, path)
    results = _run_child(_NAN_CHILD, path, env, expected)
    nan_rows = torch.zeros(rows, dtype=torch.bool)
    nan_rows[1:5] = True
    for name in TOL:
        for key, got in results[name].items():
            assert torch.isnan(got[nan_rows]).all(), f"{expected} {name} {key}: a NaN row lost its NaN"
            assert torch.isfinite(got[~nan_rows]).all(), f"{expected} {name} {key}: NaN outside the NaN rows"
