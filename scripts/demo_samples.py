"""Write the demo's sample images: a few held-out test digits as PNG files, plus a broken one.

    python scripts/demo_samples.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from training.config import TrainConfig
from training.data import digits_images, stratified_split


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # The same split the default training run uses, so these images were never trained on.
    cfg = TrainConfig()
    test = stratified_split(digits_images(), cfg.seed, cfg.val_fraction, cfg.test_fraction).test
    written: set[int] = set()
    for data, label in zip(test.blobs, test.labels):
        if label in written or len(written) >= 4:
            continue
        written.add(label)
        (out / f"digit-{test.classes[label]}.png").write_bytes(data)
    (out / "not-an-image.png").write_text("this is a text file with a .png name\n")
    print("\n".join(sorted(str(p) for p in out.iterdir())))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/samples"))
