"""The image classifier: a small ResNet-style CNN whose config travels inside the artifact.

``forward(x)`` returns ``(logits, embedding)``: the service answers from the logits and drift
monitoring watches the embedding (the penultimate layer), so both are model outputs in ONNX.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class CNNConfig:
    """Everything needed to rebuild the network; saved in the manifest (cf. nanoGPT's GPTConfig)."""

    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 1
    dropout: float = 0.1
    embedding_dim: int = 128

    def __post_init__(self) -> None:
        # JSON round-trips give lists; keep the dataclass hashable.
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError("need in_channels >= 1 and num_classes >= 2")
        if not self.widths or min(self.widths) < 1 or self.blocks_per_stage < 1:
            raise ValueError(f"bad widths/blocks: {self.widths}, {self.blocks_per_stage}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CNNConfig":
        return cls(**data)


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn with an identity (or 1x1 conv-bn) shortcut, as in ResNet-18/34.

    Layers are created in the same order as the peers' benchmark block, so a seeded build of the
    reference model draws the same weights as theirs.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


def conv_stem(cin: int, cout: int) -> nn.Sequential:
    """3x3 conv-bn-relu at full resolution: inputs here are small (32-64 px), so no 7x7/stride 4."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def residual_stages(widths: tuple[int, ...], blocks_per_stage: int) -> nn.Sequential:
    """Stages of BasicBlocks; every stage after the first halves the resolution."""
    blocks: list[nn.Module] = []
    cin = widths[0]
    for i, width in enumerate(widths):
        for j in range(blocks_per_stage):
            stride = 2 if (i > 0 and j == 0) else 1
            blocks.append(BasicBlock(cin, width, stride))
            cin = width
    return nn.Sequential(*blocks)


class ImageCNN(nn.Module):
    """stem -> residual stages -> global average pool -> embedding (Linear+ReLU) -> dropout
    -> logits."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = conv_stem(config.in_channels, config.widths[0])
        self.stages = residual_stages(config.widths, config.blocks_per_stage)
        self.embedding = nn.Sequential(
            nn.Linear(config.widths[-1], config.embedding_dim), nn.ReLU())
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.embedding_dim, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init for convs. We do not zero the last BN of each block (the "zero-init residual"
        # trick): with global average pooling on 32 px digits it makes every block start as the
        # identity, the pooled features start nearly equal across images, and the first epochs
        # are wasted: validation accuracy after a few epochs is far lower (see README, Benchmark,
        # Measured).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.stages(self.stem(x)).mean(dim=(2, 3))
        embedding = self.embedding(features)
        return self.head(self.dropout(embedding)), embedding


def build_model(config: CNNConfig) -> ImageCNN:
    """The classifier for ``config`` (random init: seed torch first for reproducible weights)."""
    return ImageCNN(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
