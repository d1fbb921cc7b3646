"""The TD3 losses against values computed by hand."""

import pytest
import torch

from lit_td3.losses import actor_loss, critic_loss, smoothed_target_action, td_target


def test_td_target_bootstraps_from_the_smaller_twin_unless_terminated() -> None:
    reward = torch.tensor([1.0, 1.0, -2.0])
    terminated = torch.tensor([0.0, 1.0, 0.0])
    next_q1 = torch.tensor([10.0, 10.0, 3.0])
    next_q2 = torch.tensor([8.0, 12.0, 5.0])
    target = td_target(reward, terminated, next_q1, next_q2, gamma=0.5)
    # min(10, 8) = 8 -> 1 + 0.5*8 = 5; terminated -> 1; min(3, 5) = 3 -> -2 + 1.5 = -0.5
    assert target.tolist() == [5.0, 1.0, -0.5]


def test_truncated_transitions_bootstrap_like_any_non_terminal_one() -> None:
    # Truncation is not a flag of the loss at all: only `terminated` may stop the bootstrap.
    target = td_target(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([4.0]), torch.tensor([4.0]), 0.99)
    assert target.item() == pytest.approx(3.96)


def test_target_policy_smoothing_clips_noise_then_action() -> None:
    action = torch.tensor([[0.9, 0.0, -0.2]])
    noise = torch.tensor([[0.3, -0.7, 0.1]])
    smoothed = smoothed_target_action(action, noise, noise_clip=0.5)
    # 0.9+0.3 -> 1.2 -> clamp 1.0; -0.7 -> clip -0.5; -0.2+0.1 = -0.1
    assert smoothed[0].tolist() == pytest.approx([1.0, -0.5, -0.1])


def test_critic_loss_is_the_sum_of_both_mse_terms_and_reports_the_twin_gap() -> None:
    q1 = torch.tensor([1.0, 2.0], requires_grad=True)
    q2 = torch.tensor([0.0, 4.0], requires_grad=True)
    target = torch.tensor([1.0, 3.0])
    loss, info = critic_loss(q1, q2, target)
    # q1: (0^2 + 1^2)/2 = 0.5; q2: (1^2 + 1^2)/2 = 1.0
    assert loss.item() == pytest.approx(1.5)
    assert info["train/q1"].item() == pytest.approx(1.5)
    assert info["train/q2"].item() == pytest.approx(2.0)
    assert info["train/q_gap"].item() == pytest.approx(1.5)  # (|1-0| + |2-4|) / 2


def test_critic_loss_never_differentiates_through_the_target() -> None:
    q1 = torch.tensor([1.0], requires_grad=True)
    target = torch.tensor([3.0], requires_grad=True)
    loss, _ = critic_loss(q1, q1 * 1.0, target)
    loss.backward()
    assert target.grad is None
    assert q1.grad.item() == pytest.approx(2 * 2 * (1.0 - 3.0))  # two identical mse terms, d/dq (q-t)^2 = 2(q-t)


def test_actor_loss_is_negative_mean_q() -> None:
    assert actor_loss(torch.tensor([1.0, 3.0, -1.0])).item() == pytest.approx(-1.0)
