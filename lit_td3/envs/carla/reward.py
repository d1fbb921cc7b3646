"""The lane-keeping reward: a sum of named, weighted terms, each reported so its share of the return is visible.

Every term is computed every step from ``StepFacts`` (what happened in the step); its weight comes from
``reward.<term>.weight`` in the YAML and is never negative: each term carries its own sign. The reward is exactly
the sum of the weighted terms. ``TermTotals`` adds them up over an episode for the final ``info``: ``reward/<term>``
is a term's episode total and ``reward_share/<term>`` its share of the absolute totals, the number that shows
whether one term (progress, in the original report: 93-96 %) drowns the others. They are in every step's ``info``
(running totals), so whichever step ends the episode, a ``TimeLimit`` wrapper's included, reports them.

No simulator calls here, and no termination decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_td3.envs.carla.config import RewardConfig

TERMS = ("progress", "lane_centre", "speed", "collision", "lane_invasion", "comfort")


@dataclass(frozen=True)
class StepFacts:
    """What one step did, as far as the reward is concerned."""

    progress_m: float
    """Arc length gained along the route this step (m); negative when driving backwards along it."""
    lateral_m: float
    """Signed offset from the route's lane centre after the step (m)."""
    lane_width_m: float
    speed_mps: float
    """Forward speed after the step (m/s)."""
    collision: bool
    lane_invasion: bool
    steer: float
    """Steering command of this step, in [-1, 1]."""
    previous_steer: float
    """Steering command of the previous step (0 at the episode's first step)."""


def unweighted_terms(facts: StepFacts, config: RewardConfig) -> dict[str, float]:
    """Each term before its weight:

    - ``progress``: metres gained along the route.
    - ``lane_centre``: 1 on the lane centre, falling linearly to 0 at the lane's edge (half a lane width off).
    - ``speed``: 1 at ``speed.target_mps``, falling linearly to 0 at 0 m/s or twice the target.
    - ``collision``: -1 in a step with a collision event, else 0.
    - ``lane_invasion``: -1 in a step with a lane-invasion event, else 0.
    - ``comfort``: -|change of steering| / 2, in [-1, 0].
    """
    half_lane = max(facts.lane_width_m / 2, 1e-6)
    target = config.speed.target_mps
    return {
        "progress": facts.progress_m,
        "lane_centre": 1.0 - min(abs(facts.lateral_m) / half_lane, 1.0),
        "speed": 1.0 - min(abs(facts.speed_mps - target) / target, 1.0),
        "collision": -1.0 if facts.collision else 0.0,
        "lane_invasion": -1.0 if facts.lane_invasion else 0.0,
        "comfort": -abs(facts.steer - facts.previous_steer) / 2,
    }


def reward_terms(facts: StepFacts, config: RewardConfig) -> dict[str, float]:
    """The weighted terms; the step's reward is their sum."""
    return {name: getattr(config, name).weight * value for name, value in unweighted_terms(facts, config).items()}


class TermTotals:
    """Running episode totals of the weighted terms, for ``info``."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(TERMS, 0.0)

    def add(self, terms: dict[str, float]) -> None:
        for name, value in terms.items():
            self.totals[name] += value

    def info(self) -> dict[str, float]:
        magnitude = sum(abs(v) for v in self.totals.values())
        info = {f"reward/{name}": total for name, total in self.totals.items()}
        info.update({f"reward_share/{name}": abs(total) / magnitude if magnitude > 0 else 0.0
                     for name, total in self.totals.items()})
        return info
