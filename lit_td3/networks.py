"""Actor and twin-critic networks for TD3 from pixels, vectors, or both.

Each network owns its encoder: the actor's NatureCNN and the critic's NatureCNN are separate modules, never shared
(a shared encoder would be moved by both losses and soft-updated at an effective rate of 2·tau, see SB3's TD3 docs).
The twin Q-heads share the critic's encoder, as in SB3's ``ContinuousCritic``.

Parameters are split into ``cnn`` and ``mlp`` parts so that each optimizer can give them their own learning rate and
the telemetry can report their gradient norms separately. Networks never see the env or the buffer: they take a dict
of tensors (``"image"``: uint8 stacks, ``"vector"``: float32) and return tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

ObservationShapes = Mapping[str, Sequence[int]]


@dataclass
class NetworkConfig:
    """Sizes of the networks (a checkpoint is only loadable into networks of the same sizes)."""

    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    """Widths of the MLP layers of the actor and of each Q-head."""
    cnn_features: int = 512
    """Width of the linear layer that ends each NatureCNN encoder."""
    cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """Output channels of the three NatureCNN convolutions (8x8/4, 4x4/2, 3x3/1)."""

    def __post_init__(self) -> None:
        for name in ("hidden_sizes", "cnn_channels"):
            sizes = getattr(self, name)
            if not sizes or any(int(s) < 1 for s in sizes):
                raise ValueError(f"model.network.{name}={sizes!r}: expected a non-empty list of positive widths")
        if len(self.cnn_channels) != 3:
            raise ValueError(f"model.network.cnn_channels={self.cnn_channels!r}: NatureCNN has exactly 3 convolutions")
        if self.cnn_features < 1:
            raise ValueError(f"model.network.cnn_features={self.cnn_features}: expected a positive width")


class NatureCNN(nn.Module):
    """The DQN encoder of Mnih et al. (2015): three convolutions and a linear layer, for uint8 frame stacks."""

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], features: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.convs = nn.Sequential(
            nn.Conv2d(image_shape[0], c1, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(c2, c3, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, *image_shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(flat, features), nn.ReLU())

    def forward(self, image: Tensor) -> Tensor:
        # Pixels travel as uint8 (4x less host-to-device traffic) and become floats only here.
        return self.linear(self.convs(image.float() / 255.0))


class Encoder(nn.Module):
    """Turns an observation dict into one feature vector: NatureCNN for ``image``, identity for ``vector``."""

    def __init__(self, observation_shapes: ObservationShapes, config: NetworkConfig) -> None:
        super().__init__()
        unknown = set(observation_shapes) - {"image", "vector"}
        if unknown or not observation_shapes:
            raise ValueError(
                f"observation keys {sorted(observation_shapes)}: expected 'image' (uint8 C×H×W), 'vector' or both"
            )
        self.cnn = (
            NatureCNN(observation_shapes["image"], config.cnn_channels, config.cnn_features)
            if "image" in observation_shapes
            else None
        )
        vector_dim = int(observation_shapes["vector"][0]) if "vector" in observation_shapes else 0
        self.features = (config.cnn_features if self.cnn is not None else 0) + vector_dim

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        parts = []
        if self.cnn is not None:
            parts.append(self.cnn(obs["image"]))
        if "vector" in obs:
            parts.append(obs["vector"].float())
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def mlp(in_features: int, hidden_sizes: Sequence[int], out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Deterministic policy mu(s) in [-1, 1]^A (envs are wrapped so that this is their whole action range)."""

    def __init__(self, observation_shapes: ObservationShapes, action_dim: int, config: NetworkConfig) -> None:
        super().__init__()
        self.encoder = Encoder(observation_shapes, config)
        self.head = mlp(self.encoder.features, config.hidden_sizes, action_dim)

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        return torch.tanh(self.head(self.encoder(obs)))


class TwinCritic(nn.Module):
    """Q1(s, a) and Q2(s, a) on one critic encoder (Fujimoto et al., 2018, clipped double-Q)."""

    def __init__(self, observation_shapes: ObservationShapes, action_dim: int, config: NetworkConfig) -> None:
        super().__init__()
        self.encoder = Encoder(observation_shapes, config)
        self.q1 = mlp(self.encoder.features + action_dim, config.hidden_sizes, 1)
        self.q2 = mlp(self.encoder.features + action_dim, config.hidden_sizes, 1)

    def forward(self, obs: Mapping[str, Tensor], action: Tensor) -> tuple[Tensor, Tensor]:
        x = self._head_input(obs, action)
        return self.q1(x).squeeze(1), self.q2(x).squeeze(1)

    def q1_value(self, obs: Mapping[str, Tensor], action: Tensor) -> Tensor:
        """Q1(s, a) alone: the actor's loss needs no Q2, and computing it there would be wasted work."""
        return self.q1(self._head_input(obs, action)).squeeze(1)

    def _head_input(self, obs: Mapping[str, Tensor], action: Tensor) -> Tensor:
        return torch.cat([self.encoder(obs), action], dim=1)


def split_parameters(network: Actor | TwinCritic) -> dict[str, list[nn.Parameter]]:
    """The ``cnn`` and ``mlp`` parameters of a network (``cnn`` is empty for a state-only env)."""
    cnn = list(network.encoder.cnn.parameters()) if network.encoder.cnn is not None else []
    cnn_ids = {id(p) for p in cnn}
    return {"cnn": cnn, "mlp": [p for p in network.parameters() if id(p) not in cnn_ids]}
