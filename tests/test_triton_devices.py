"""What the Triton launchers do differently on real GPUs, checked without one.

Triton launches on the current CUDA device, not on the device of its tensors: every launcher makes the
GPU of its inputs current for the launch (``kernels._common.on_tensor_device``), so a reference model on
``cuda:1`` while ``cuda:0`` is current gets its kernels on ``cuda:1`` (checked with a stand-in tensor and a
recording ``torch.cuda.device``). On ROCm the launch options leave out what Triton's HIP backend lacks."""

from __future__ import annotations

import contextlib
import inspect
import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from rlhf_fast.kernels import _common, kl_div, linear_kl, linear_token_stats, token_stats, token_stats_fused

MODULES = (kl_div, linear_kl, linear_token_stats, token_stats, token_stats_fused)
GUARD = _common.on_tensor_device(lambda tensor: None).__code__  # the wrapper every guarded launcher runs


def test_every_launcher_switches_to_the_device_of_its_tensors():
    launchers = []
    for module in MODULES:
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ != module.__name__ or not re.search(r"_kernel\[", inspect.getsource(inspect.unwrap(fn))):
                continue
            launchers.append(name)
            assert fn.__code__ is GUARD, f"{module.__name__}.{name} launches a kernel without on_tensor_device"
    assert len(launchers) == 9  # fwd and bwd of token_stats, kl, linear_token_stats and linear_kl, and the fused one


@pytest.fixture
def gpus(monkeypatch):
    """``torch.cuda.current_device`` and ``torch.cuda.device`` of a pretend machine; ``gpus.log`` records
    each switch, ``gpus.current`` the current device."""
    state = SimpleNamespace(current=0, log=[])

    @contextlib.contextmanager
    def device(dev):
        previous, state.current = state.current, torch.device(dev).index
        state.log.append(state.current)
        try:
            yield
        finally:
            state.current = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state.current)
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


def _on(index):
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))


def test_a_launch_runs_on_the_gpu_of_its_first_tensor(gpus):
    seen = []
    launcher = _common.on_tensor_device(lambda tensor, *args, **kw: seen.append((gpus.current, args, kw)) or "out")
    assert launcher(_on(1), 2, block_v=64) == "out"
    assert seen == [(1, (2,), {"block_v": 64})] and gpus.log == [1] and gpus.current == 0  # and back
    assert launcher(_on(0)) == "out" and gpus.log == [1]  # already current: no switch
    gpus.current = 1
    launcher(_on(1))
    launcher(torch.zeros(1))  # a CPU tensor (the interpreter's): left alone
    assert gpus.log == [1] and [s[0] for s in seen] == [1, 0, 1, 1]


def test_rocm_launches_leave_out_maxnreg(monkeypatch):
    """Triton's HIP backend has no maxnreg option and refuses a launch that passes one (KeyError in its
    argument packing): a ROCm build of PyTorch (``torch.version.hip`` set) gets the config without it."""
    from rlhf_fast.kernels.linear_token_stats import CONFIGS as LINEAR_CONFIGS

    row_config = next(config for config in _common.CONFIGS if config.maxnreg)
    tile_config = next(config for configs in LINEAR_CONFIGS.values() for config in configs if config.maxnreg)
    for capped in (row_config, tile_config):
        monkeypatch.setattr(torch.version, "hip", None)
        assert capped.launch()["maxnreg"] == capped.maxnreg
        monkeypatch.setattr(torch.version, "hip", "6.4.0")
        assert "maxnreg" not in capped.launch() and capped.launch()["num_warps"] == capped.num_warps
