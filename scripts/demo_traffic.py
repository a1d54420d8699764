"""Send the demo's production traffic: held-out digits, as they are or shifted, with a slice tag,
and (optionally) their true labels as feedback, every ``FEEDBACK_EVERY`` answers (labels that
come soon after the traffic: a retraining trains only on labels stored by its time cutoff).
Prints one summary line.

    python scripts/demo_traffic.py URL [--count 300] [--offset 0] [--shift none|bright] [--device ios]
                                   [--token TOKEN] [--since-file PATH]

``--shift bright`` brightens and slightly rotates every digit: the kind of change (a new camera,
another scanner) the drift report must catch. ``--since-file`` writes the ISO time just before
the first request, for ``python -m monitoring drift --since``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
from pathlib import Path

import httpx
from PIL import Image

from training.config import TrainConfig
from training.data import digits_images, stratified_split

FEEDBACK_EVERY = 10


def shifted(png: bytes) -> bytes:
    img = Image.open(io.BytesIO(png)).convert("L")
    img = Image.eval(img.rotate(12, fillcolor=0), lambda p: min(255, p + 70))  # brighter
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--offset", type=int, default=0, help="skip this many digits of the pool")
    p.add_argument("--shift", choices=("none", "bright"), default="none")
    p.add_argument("--device", default="ios")
    p.add_argument("--token", default="")
    p.add_argument("--since-file", type=Path)
    args = p.parse_args()

    cfg = TrainConfig()
    data = digits_images()
    split = stratified_split(data, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    # Unseen digits: the held-out test split first, then whatever training never drew from.
    pool = list(zip(split.test.blobs, split.test.labels)) + list(zip(data.blobs, data.labels))
    pool = pool[args.offset: args.offset + args.count]
    if args.since_file:
        args.since_file.write_text(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    answers, flagged, correct, feedback, sent = 0, 0, 0, [], 0
    with httpx.Client(base_url=args.url, timeout=30.0) as client:

        def send_feedback() -> None:
            nonlocal sent
            if args.token and len(feedback) > sent:
                r = client.post("/v1/feedback", json={"feedback": feedback[sent:]},
                                headers={"Authorization": f"Bearer {args.token}"})
                r.raise_for_status()
                sent = len(feedback)

        for i, (png, label) in enumerate(pool):
            body = shifted(png) if args.shift == "bright" else png
            r = client.post("/v1/classify/image", content=body, headers={
                "Content-Type": "image/png", "X-Slices": f"device={args.device}"})
            r.raise_for_status()
            answer = r.json()
            prediction = answer["predictions"][0]
            answers += 1
            flagged += prediction["ood"]
            correct += prediction["label"] == data.classes[label]
            feedback.append({"request_id": answer["request_id"], "label": data.classes[label]})
            if len(feedback) % FEEDBACK_EVERY == 0:
                send_feedback()
        send_feedback()
    print(f"sent {answers} {'shifted ' if args.shift != 'none' else ''}digits tagged "
          f"device={args.device}: accuracy {correct / answers:.1%}, OOD-flagged "
          f"{flagged / answers:.1%}" + (f"; {len(feedback)} labels sent as feedback"
                                        if args.token else ""))


if __name__ == "__main__":
    main()
