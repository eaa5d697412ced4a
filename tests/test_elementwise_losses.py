"""kl_estimate, reward_loss, ranking_loss: float64 reference, hand-derived cases, bad input."""

import math

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import reference


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_matches_reference_with_gradients(kind):
    logp = _rand(5, 37, seed=1).requires_grad_()
    ref = _rand(5, 37, seed=2).requires_grad_()
    grad_out = _rand(5, 37, seed=3)
    ours = rf.kl_estimate(logp, ref, kind)
    expected = reference.kl_estimate(logp, ref, kind)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad((ours * grad_out).sum(), (logp, ref))
    g_ref = torch.autograd.grad((expected * grad_out).sum(), (logp, ref))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_kl_estimate_hand_derived():
    logp = torch.tensor([0.0, -1.0])
    ref = torch.tensor([0.0, 0.0])
    # d = ref - logp = [0, 1]: k1 = -d = [0, -1]; k2 = d^2/2 = [0, 0.5]; k3 = e^1 - 1 - 1 = e - 2.
    torch.testing.assert_close(rf.kl_estimate(logp, ref, "k1"), torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(rf.kl_estimate(logp, ref, "k2"), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(rf.kl_estimate(logp, ref, "k3"), torch.tensor([0.0, math.e - 2]))


def test_k3_stays_nonnegative_for_tiny_differences():
    logp = torch.tensor([1e-9, -1e-9, 3e-8], dtype=torch.float32)
    assert (rf.kl_estimate(logp, torch.zeros(3), "k3") >= 0).all()


@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
def test_reward_loss_matches_reference(margin):
    chosen = _rand(13, seed=4).requires_grad_()
    rejected = _rand(13, seed=5).requires_grad_()
    if margin == "tensor":
        margin = _rand(13, seed=6).abs()
    ours = rf.reward_loss(chosen, rejected, margin=margin)
    expected = reference.reward_loss(chosen, rejected, margin=margin)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours, (chosen, rejected))
    g_ref = torch.autograd.grad(expected, (chosen, rejected))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reward_loss_hand_derived_and_stable():
    # Equal rewards: -log sigmoid(0) = log 2. A margin of 1 on a gap of 1 is the same.
    assert rf.reward_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    assert rf.reward_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0).item() == pytest.approx(math.log(2))
    # A gap of -200 overflows sigmoid in float32; logsigmoid gives the exact 200.
    assert rf.reward_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_ranking_loss_matches_reference(K):
    rewards = _rand(7, K, seed=K).requires_grad_()
    ours = rf.ranking_loss(rewards)
    expected = reference.ranking_loss(rewards)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(ours, rewards)[0], torch.autograd.grad(expected, rewards)[0], rtol=1e-12, atol=1e-12
    )


def test_ranking_loss_with_two_responses_is_reward_loss():
    rewards = _rand(9, 2, seed=11)
    torch.testing.assert_close(rf.ranking_loss(rewards), rf.reward_loss(rewards[:, 0], rewards[:, 1]))


def test_ranking_loss_hand_derived():
    # K = 3, rewards (2, 1, 0): pairs (0,1) and (1,2) have gap 1, pair (0,2) gap 2.
    loss = rf.ranking_loss(torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64))
    expected = (2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_bad_inputs_name_the_argument():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="kind"):
        rf.kl_estimate(x, x, "k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        rf.kl_estimate(x, torch.zeros(5))
    with pytest.raises(TypeError, match="logprobs"):
        rf.kl_estimate(torch.zeros(4, dtype=torch.int64), x)
    with pytest.raises(ValueError, match="rejected_rewards"):
        rf.reward_loss(x, torch.zeros(3))
    with pytest.raises(ValueError, match="margin"):
        rf.reward_loss(x, x, margin=torch.zeros(3))
    with pytest.raises(TypeError, match="margin"):
        rf.reward_loss(x, x, margin="1")
    with pytest.raises(ValueError, match="rewards"):
        rf.ranking_loss(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="rewards"):
        rf.ranking_loss(torch.zeros(4))
    with pytest.raises(TypeError, match="rewards"):
        rf.ranking_loss([[1.0, 0.0]])
