"""The benchmark's reference model: the peers' ResNet-10-style CNN, random weights, same contract.

It mirrors the peers benchmark's ``export_model.py`` (``shared/peers-bench`` beside the
repository): a 3x3 stem and four stages of one BasicBlock (16/32/64/128 channels, stride 2 from
the second stage), global average pool, FC to 10 classes; float32 [N,3,64,64], 309k parameters,
about 0.1 GFLOP per image. Layers are created in the peers' order and seeded with the peers'
seed, and BatchNorm gets the peers' fixed non-trivial running statistics, so the weights are
theirs and so are the logits (only the export path differs). Our forward also returns the pooled
128-d features as ``embedding``, like every model we serve.

    python -m training.reference_model --name bench-resnet
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from preprocessing import ImageSpec

from .export import build_manifest, export_to_store
from .models import conv_stem, count_parameters, residual_stages

if TYPE_CHECKING:
    import bentoml

    from modelstore import ModelStore

PEERS_SEED = 20241124  # export_model.py's SEED: same seed -> same weights as the peers' model
WIDTHS = (16, 32, 64, 128)
SPEC = ImageSpec(height=64, width=64, color_mode="RGB", resize="stretch",
                 interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
LABELS = tuple(str(d) for d in range(10))
NOISE_IMAGES = 64


class SmallResNet(nn.Module):
    """stem + 4 stages of one BasicBlock (16/32/64/128), GAP, FC; returns (logits, embedding)."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_stem(3, widths[0])
        self.blocks = residual_stages(widths, blocks_per_stage=1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return self.fc(embedding), embedding


def build_reference(seed: int = PEERS_SEED) -> SmallResNet:
    """The reference model in eval mode, exactly as the peers build it for a given seed."""
    torch.manual_seed(seed)
    model = SmallResNet()
    # Non-trivial but fixed BN statistics, as the peers do, so BN is not an identity map.
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def noise_images(n: int = NOISE_IMAGES, seed: int = 0) -> list[bytes]:
    """Seeded uniform-noise RGB PNGs at the input size: the reference model has no data, and
    this keeps its reference profile computed the same way as a trained model's."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(n):
        pixels = rng.integers(0, 256, size=(SPEC.height, SPEC.width, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
        blobs.append(buf.getvalue())
    return blobs


def export_reference(name: str = "bench-resnet", seed: int = PEERS_SEED,
                     store: "ModelStore | None" = None) -> "bentoml.Tag":
    """Save the reference model into the model store with the same file contract as training.

    metrics.json has no accuracies (null) and reference.npz's ``labels`` are -1: noise has no
    true class.
    """
    from .data import LabelledImages, data_hash

    torch.set_num_threads(2)
    model = build_reference(seed)
    blobs = noise_images()
    noise = LabelledImages(tuple(blobs), (0,) * len(blobs), tuple(map(str, range(len(blobs)))),
                           ("noise",), "random-noise")
    model_config: dict[str, Any] = {"arch": "SmallResNet (peers-bench export_model.py)",
                                    "in_channels": 3, "num_classes": 10, "widths": list(WIDTHS),
                                    "parameters": count_parameters(model)}
    manifest = build_manifest(seed=seed, data_hash=data_hash(noise), data_source="random-noise",
                              train_config={}, model_config=model_config)
    metrics = {"test_accuracy": None, "val_accuracy": None, "val_loss": None, "best_epoch": None,
               "epochs_run": 0, "train_seconds": 0.0, "history": []}
    return export_to_store(model, name=name, spec=SPEC, labels=LABELS, reference_blobs=blobs,
                           reference_labels=[-1] * len(blobs), metrics=metrics,
                           manifest=manifest, store=store)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.reference_model",
        description="Export the random-weight benchmark model into BentoML's model store.")
    parser.add_argument("--name", default="bench-resnet", help="model store name")
    parser.add_argument("--seed", type=int, default=PEERS_SEED,
                        help=f"weight seed (default {PEERS_SEED}, the peers' benchmark seed)")
    args = parser.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # Our messages at INFO; other libraries' (onnxscript's optimiser is chatty) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    tag = export_reference(args.name, args.seed)
    print(f"saved {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
