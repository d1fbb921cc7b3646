"""The TD3 losses as small pure functions (Fujimoto, van Hoof & Meger, 2018, Algorithm 1).

Tensors in, tensors out: no networks, optimizers or randomness live here, so each function can be checked against
values computed by hand. The module composes them; the delayed actor update is simply "call ``actor_loss`` every
``policy_freq``-th critic update".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def smoothed_target_action(target_action: Tensor, noise: Tensor, noise_clip: float) -> Tensor:
    """Target policy smoothing: a' = clip(mu'(s') + clip(eps, -c, c), -1, 1), eps ~ N(0, sigma) given as ``noise``."""
    return (target_action + noise.clamp(-noise_clip, noise_clip)).clamp(-1.0, 1.0)


def td_target(reward: Tensor, terminated: Tensor, next_q1: Tensor, next_q2: Tensor, gamma: float) -> Tensor:
    """Clipped double-Q target y = r + gamma * (1 - terminated) * min(Q1'(s', a'), Q2'(s', a')).

    Only a true termination stops the bootstrap; a truncated episode (time limit, simulator fault) still bootstraps
    because the state it ended in had a future.
    """
    return reward + gamma * (1.0 - terminated) * torch.minimum(next_q1, next_q2)


def critic_loss(q1: Tensor, q2: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum of both critics' squared TD errors against one (detached) target, plus the Q statistics we log."""
    target = target.detach()
    loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    info = {
        "train/q1": q1.detach().mean(),
        "train/q2": q2.detach().mean(),
        "train/q_gap": (q1 - q2).detach().abs().mean(),
        "train/td_target": target.mean(),
    }
    return loss, info


def actor_loss(q1_of_policy: Tensor) -> Tensor:
    """Deterministic policy gradient objective: maximize Q1(s, mu(s)), i.e. minimize its negation."""
    return -q1_of_policy.mean()
