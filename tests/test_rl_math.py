"""The RL arithmetic of the PPO trainer (rlhf_fast.trainers.rl) on hand-derived cases."""

import pytest
import torch

from rlhf_fast.trainers.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanBaseline,
    clipped_value_loss,
    explained_variance,
    gae,
    group_advantages,
    masked_mean,
    masked_var,
    per_token_rewards,
    whiten,
)


def test_gae_on_a_hand_computed_three_step_example():
    # gamma = lam = 0.5, so gamma * lam = 0.25.
    # Row 0, three tokens, r = [0, 0, 1], V = [0.5, 0.6, 0.8]; the value after the last token is 0:
    #   t=2: delta = 1 + 0.5*0   - 0.8 =  0.2;  A2 = 0.2
    #   t=1: delta = 0 + 0.5*0.8 - 0.6 = -0.2;  A1 = -0.2 + 0.25*0.2   = -0.15
    #   t=0: delta = 0 + 0.5*0.6 - 0.5 = -0.2;  A0 = -0.2 + 0.25*-0.15 = -0.2375
    #   returns = A + V = [0.2625, 0.45, 1.0]
    # Row 1, two tokens then padding (whose 9s and 7 must not leak in), r = [0.5, 1], V = [1, 2]:
    #   t=1: delta = 1   - 2           = -1;   A1 = -1
    #   t=0: delta = 0.5 + 0.5*2 - 1   = 0.5;  A0 = 0.5 + 0.25*-1 = 0.25
    #   returns = [1.25, 1.0, 0]
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.8], [1.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.2375, -0.15, 0.2], [0.25, -1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.2625, 0.45, 1.0], [1.25, 1.0, 0.0]]))


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    lengths = [7, 4, 1]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    gamma = 0.9
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            g_t = sum(gamma ** (j - t) * float(rewards[b, j]) for j in range(t, n))
            assert float(ret[b, t]) == pytest.approx(g_t, abs=1e-5)
            assert float(adv[b, t]) == pytest.approx(g_t - float(values[b, t]), abs=1e-5)
    assert float(adv[mask == 0].abs().sum()) == 0.0
    # lam = 0: the one-step TD error
    adv0, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    assert float(adv0[0, 2]) == pytest.approx(float(rewards[0, 2] + gamma * values[0, 3] - values[0, 2]), abs=1e-6)


def test_gae_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="gamma"):
        gae(x, x, torch.ones(2, 3), gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match="mask"):
        gae(x, x, torch.ones(2, 4), gamma=1.0, lam=0.9)


def test_whiten_over_the_mask_only():
    g = torch.Generator().manual_seed(1)
    x = 3.0 + 2.0 * torch.randn(4, 9, generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.3
    x = x.masked_fill(~mask, float("nan"))  # padding may hold anything
    w = whiten(x, mask)
    assert float(masked_mean(w, mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(masked_var(w, mask)) == pytest.approx(1.0, abs=1e-4)
    assert float(w[~mask].abs().sum()) == 0.0
    kept = whiten(x, mask, shift_mean=False)
    assert float(masked_mean(kept, mask)) == pytest.approx(float(masked_mean(x, mask)), abs=1e-5)
    assert float(masked_var(kept, mask)) == pytest.approx(1.0, abs=1e-4)
    # a hand case: [1, 3] has mean 2 and population variance 1
    torch.testing.assert_close(whiten(torch.tensor([1.0, 3.0, 50.0]), torch.tensor([1, 1, 0]), eps=0.0),
                               torch.tensor([-1.0, 1.0, 0.0]))  # fmt: skip


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(returns, 2.0), returns, mask)) == pytest.approx(0.0, abs=1e-6)
    # residuals [0, 0, 1]: variance 2/9; returns' variance 2/3; 1 - (2/9) / (2/3) = 2/3
    values = torch.tensor([[1.0, 2.0, 2.0, -5.0]])
    assert float(explained_variance(values, returns, mask)) == pytest.approx(2 / 3, rel=1e-5)


def test_per_token_rewards_spread_the_kl_and_put_the_score_last():
    # row 0: k1 = [0.5, -1] -> [-0.05, 0.1 + score 1]; row 1: k1 = [0, 1, 2] -> [0, -0.1, -0.2 + score 2]
    score = torch.tensor([1.0, 2.0])
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, 7.0], [-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r = per_token_rewards(score, logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 1.1, 0.0], [0.0, -0.1, 1.8]]))
    with pytest.raises(ValueError, match="without any valid token"):
        per_token_rewards(score, logp, ref, torch.tensor([[1, 1, 0], [0, 0, 0]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        per_token_rewards(score, logp, ref, mask, kl_coef=-1.0)


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    ctl.update(9.0, n_steps=100)  # err = 9/6 - 1 = 0.5, clipped to 0.2: beta *= 1 + 0.2 * 0.1
    assert ctl.value == pytest.approx(0.2 * 1.02)
    up = ctl.value
    ctl.update(5.4, n_steps=100)  # err = -0.1: beta *= 0.99
    assert ctl.value == pytest.approx(up * 0.99)
    assert ctl.value < up
    ctl.update(6.0, n_steps=100)
    assert ctl.value == pytest.approx(up * 0.99)  # on target: unchanged
    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, target=6.0, horizon=1000)
    other.load_state_dict(state)
    assert other.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=100)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_clipped_value_loss_on_a_hand_case():
    # token 0: v_clip = 0.5 + clip(0.5, -0.2, 0.2) = 0.7; (1 - 2)^2 = 1 < (0.7 - 2)^2 = 1.69: clipped branch
    # token 1: v_clip = 0.5 - 0.2 = 0.3; (0 - 0.4)^2 = 0.16 > (0.3 - 0.4)^2 = 0.01: unclipped branch
    # token 2: padding. loss = 0.5 * (1.69 + 0.16) / 2 = 0.4625, clip_frac = 1/2
    values = torch.tensor([[1.0, 0.0, 3.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.4, 0.0]])
    loss, clip_frac = clipped_value_loss(values, old, returns, torch.tensor([[1, 1, 0]]), cliprange_value=0.2)
    assert float(loss.detach()) == pytest.approx(0.4625)
    assert float(clip_frac) == pytest.approx(0.5)
    loss.backward()
    # the clipped branch does not depend on values; the unclipped one: 0.5 * 2 * (0 - 0.4) / 2 = -0.2
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.2, 0.0]]))
    # per sequence: a second row of one token with loss 0.5 * (1 - 0)^2 = 0.5 (clip range wide open);
    # seq-mean-token-mean = ((1.69 + 0.16) / 2 * 0.5 + 0.5) / 2 = 0.48125, seq-mean-token-sum = (1.85 * 0.5 + 0.5) / 2
    two = [torch.tensor([[1.0, 0.0, 3.0], [1.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]),
           torch.tensor([[2.0, 0.4, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])]  # fmt: skip
    seq_mean, _ = clipped_value_loss(*two, cliprange_value=0.2, loss_agg="seq-mean-token-mean")
    assert float(seq_mean) == pytest.approx(0.48125)
    seq_sum, _ = clipped_value_loss(*two, cliprange_value=0.2, loss_agg="seq-mean-token-sum")
    assert float(seq_sum) == pytest.approx((1.85 * 0.5 + 0.5) / 2)


def test_group_advantages_on_a_hand_case():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group [1, 2, 3]: mean 2, std 1; group [5, 5, 5]: identical rewards, zero advantage
    grpo = group_advantages(rewards, 3, kind="grpo", scale_by_std=True)
    torch.testing.assert_close(grpo, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    grpo_raw = group_advantages(rewards * 2, 3, kind="grpo", scale_by_std=False)
    torch.testing.assert_close(grpo_raw, torch.tensor([-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]))
    # leave-one-out: 1 - (2 + 3)/2 = -1.5, 2 - (1 + 3)/2 = 0, 3 - (1 + 2)/2 = 1.5
    rloo = group_advantages(rewards, 3, kind="rloo", scale_by_std=False)
    torch.testing.assert_close(rloo, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="k must be"):
        group_advantages(rewards, 1)
    with pytest.raises(ValueError, match=r"\[P \* k\]"):
        group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="kind"):
        group_advantages(rewards, 3, kind="ppo")


def test_running_mean_baseline():
    baseline = RunningMeanBaseline(momentum=0.5)
    # first batch: its own mean 2 is the baseline
    torch.testing.assert_close(baseline.advantages(torch.tensor([1.0, 3.0])), torch.tensor([-1.0, 1.0]))
    # then b = 2; the batch mean 5 moves it to 0.5 * 2 + 0.5 * 5 = 3.5 afterwards
    torch.testing.assert_close(baseline.advantages(torch.tensor([4.0, 6.0])), torch.tensor([2.0, 4.0]))
    assert baseline.value == pytest.approx(3.5)
    restored = RunningMeanBaseline(momentum=0.5)
    restored.load_state_dict(baseline.state_dict())
    assert restored.value == 3.5
    with pytest.raises(ValueError, match="momentum"):
        RunningMeanBaseline(momentum=1.0)
