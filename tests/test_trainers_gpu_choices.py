"""What the training loop decides only on a GPU, checked here with stand-ins for ``torch.cuda``: when to
train in bfloat16, and which generator states a checkpoint keeps and restores."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.trainers import SFTConfig, loop


@pytest.mark.parametrize(
    ("capability", "hip", "expected"),
    [((9, 0), None, True), ((8, 0), None, True), ((7, 5), None, False), ((7, 0), None, False), ((9, 4), "6.4", True)],
    ids=["H100", "A100", "T4", "V100", "MI300"],
)
def test_bf16_by_default_only_where_the_gpu_has_bf16_arithmetic(monkeypatch, capability, hip, expected):
    """``torch.cuda.is_bf16_supported()`` says yes to T4 and V100 too (emulated, slower than float32)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", hip)
    gpu = torch.device("cuda", 1)
    assert loop.use_bf16(SFTConfig(), gpu) is expected
    assert asked in ([gpu], [])  # the training device's capability, not the current device's
    assert loop.use_bf16(SFTConfig(bf16=False), gpu) is False
    assert loop.use_bf16(SFTConfig(), torch.device("cpu")) is False
    assert loop.use_bf16(SFTConfig(bf16=True), torch.device("cpu")) is True


@pytest.fixture
def gpu_generators(monkeypatch):
    """Per-device generator states of a pretend machine with two GPUs."""
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}

    def index(device):
        return 1 if torch.device(device).index is None else torch.device(device).index  # cuda:1 is current

    def get(device="cuda"):
        return states[index(device)].clone()

    def set_(state, device="cuda"):
        states[index(device)] = state.clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    return states


def test_a_checkpoint_keeps_the_training_gpus_generator_only(gpu_generators):
    """Every visible GPU's state (``get_rng_state_all``) made a resume on a machine showing fewer GPUs fail
    (IndexError in ``set_rng_state_all``); the state of the training device is all a run draws from."""
    gpu = torch.device("cuda", 1)
    state = loop._rng_state(gpu)
    assert torch.equal(state["cuda"], torch.tensor([1], dtype=torch.uint8))
    gpu_generators[1] = torch.tensor([7], dtype=torch.uint8)
    loop._set_rng_state(state, gpu)
    assert gpu_generators[1].item() == 1 and gpu_generators[0].item() == 0
    # a checkpoint of the earlier layout (one state per visible GPU) restores the training device's entry
    loop._set_rng_state({**state, "cuda": [torch.tensor([5], dtype=torch.uint8)] * 2}, gpu)
    assert gpu_generators[1].item() == 5
    loop._set_rng_state({**state, "cuda": [torch.tensor([6], dtype=torch.uint8)]}, gpu)  # fewer GPUs then
    assert gpu_generators[1].item() == 5
    old = [torch.tensor([8], dtype=torch.uint8), torch.tensor([9], dtype=torch.uint8)]
    loop._set_rng_state({**state, "cuda": old}, torch.device("cuda"))  # "cuda": the current device's entry
    assert gpu_generators[1].item() == 9 and gpu_generators[0].item() == 0
    assert "cuda" not in loop._rng_state(torch.device("cpu"))


def test_each_process_of_a_distributed_run_takes_its_own_gpu(monkeypatch):
    """``LOCAL_RANK`` under a launcher; in a process group the caller joined itself (no launcher environment),
    the device it made current, not an index-less ``cuda`` (DDP's ``device_ids=[None]`` fails)."""
    from rlhf_fast.trainers import distributed

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for var in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cuda = torch.device("cuda")
    assert distributed.local_device(cuda) == cuda and not current  # one process: left as it is
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_device(cuda) == torch.device("cuda", 3) == current[-1]
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)
    assert distributed.local_device(cuda) == torch.device("cuda", 1) == current[-1]
    assert distributed.local_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")
