"""Per-answer OOD flags against real domain shift: ROC AUC per signal, flag rates, cost.

    .venv/bin/python -m tools.ood_report                      # both parts (~15 min on 2 busy cores)
    .venv/bin/python -m tools.ood_report --work /tmp/ood      # keep the models; reruns take ~1 min
    .venv/bin/python -m tools.ood_report --part digits --json ood.json
    .venv/bin/python -m tools.ood_report --part text --text-model transformer

Each model is trained briefly (seeded) and exported into a temporary folder by the project's own
export (ONNX, parity check, reference profile of the validation split; no robustness suite, and
the model store is not touched), then fed held-out in-domain inputs and foreign ones through
the served path (the shared preprocessing -> ONNX Runtime) and scored by ``monitoring.ood``
fitted on that reference profile, as the service does when it loads the model:

a. text: frozen MiniLM + head (or the small from-scratch transformer) on the SMS Spam
   Collection (``../shared/data/sms-spam``); in-domain: its test split. Foreign: the demo's
   generated texts (11 languages, and its English ones alone), English prose (first paragraphs
   of the Python standard library's docstrings), random strings.
b. images: the digits CNN (``python -m training``'s recipe, fewer epochs); in-domain: its test
   split. Foreign: letters rendered with Pillow's built-in font the way the digits were made
   (32x32 bitmap -> 8x8 counts of 0..16 -> upscaled), crops of scikit-learn's sample photos,
   uniform noise.

Each model is exported with a sample of its training split's embeddings, as ``python -m
training`` exports it. Per pair: ROC AUC of each signal (in-domain negative, foreign positive)
and of the combined score before (format 3: each signal thresholded at its whole tail of the
flag budget) and after (format 4: each signal at half its tail, the other half to the joint
signal, Fisher's combination of the signals' p-values), and the share flagged at the calibrated
thresholds. Energy
(-logsumexp of the logits) is shown for comparison only: the service hands the scorer
probabilities, not logits. Then the cost of ``OODScorer.score`` per answer, batches of 1 and 64.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import random
import string
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SMS = ROOT.parent / "shared" / "data" / "sms-spam" / "sms_spam.tsv"
SIGNALS = ("confidence", "distance", "knn", "features", "fragmentation", "joint", "energy")
DOC_MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "csv",
               "datetime", "decimal", "difflib", "email", "fractions", "functools", "gzip",
               "heapq", "http.client", "inspect", "itertools", "json", "logging", "os",
               "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3",
               "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
               "unittest", "urllib.parse", "uuid", "zipfile")


@dataclass
class Outputs:
    """What the service computes per answer: probabilities, logits, embedding, features."""

    logits: np.ndarray
    embeddings: np.ndarray
    features: list[dict[str, float]] | None
    seconds: float = 0.0  # preprocessing + model, the whole set

    @property
    def probs(self) -> np.ndarray:
        from monitoring.reference import softmax

        return softmax(self.logits)

    def rows(self, idx: Sequence[int] | slice) -> "Outputs":
        idx = np.arange(len(self.logits))[idx]
        feats = None if self.features is None else [self.features[i] for i in idx]
        return Outputs(self.logits[idx], self.embeddings[idx], feats)


@dataclass
class Part:
    name: str
    folder: Path
    in_domain: Outputs
    foreign: dict[str, Outputs]
    info: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # foreign set -> group per row


# -- foreign inputs ----------------------------------------------------------------------------

def random_strings(n: int, seed: int = 0) -> list[str]:
    """Letters, digits, punctuation and spaces, 5-60 characters (as the service tests send)."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def docstring_prose(n: int, seed: int = 0) -> list[str]:
    """First paragraphs of standard-library docstrings (20-400 characters): real English
    sentences from another domain than text messages. Seeded sample of the unique ones."""
    import importlib

    seen: set[str] = set()
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            if 20 <= len(para) <= 400 and not para.startswith(("(", "Return type")):
                seen.add(para)
    texts = sorted(seen)
    rng = np.random.default_rng(seed)
    return [texts[i] for i in sorted(rng.choice(len(texts), min(n, len(texts)), replace=False))]


def demo_texts_by_language(per_class: int, seed: int) -> tuple[dict[str, list[str]], list[str]]:
    """The demo's generated texts (all, and the English ones) and each text's language."""
    from training.text.demo import demo_texts

    data = demo_texts(per_class=per_class, seed=seed)
    every = list(data.texts)
    english = [t for t, y in zip(data.texts, data.labels) if data.classes[y] == "en"]
    languages = [data.classes[y] for y in data.labels]
    return {"demo texts (11 languages)": every, "demo texts (English)": english}, languages


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rendered_letters(variants: int = 4, seed: int = 0, size: int = 32) -> list[bytes]:
    """Letters A-Z and a-z drawn with Pillow's built-in font the way scikit-learn's digits were
    made: a bitmap scaled to fill a 32x32 box, counted in 4x4 blocks (8x8 values 0..16), then
    turned into PNGs as ``training.data.digits_images`` turns the digits (x255/16, bicubic to
    ``size``). ``variants`` per letter: stroke width, aspect and position drawn at random."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=64)
    blobs = []
    for letter in string.ascii_uppercase + string.ascii_lowercase:
        for _ in range(variants):
            big = Image.new("L", (128, 128), 0)
            draw = ImageDraw.Draw(big)
            draw.text((20, 20), letter, fill=255, font=font, stroke_width=int(rng.integers(2, 6)),
                      stroke_fill=255)
            glyph = big.crop(big.getbbox())
            height = int(rng.integers(26, 33))
            width = max(4, min(30, round(glyph.width * height / glyph.height
                                         * rng.uniform(0.8, 1.2))))
            glyph = glyph.resize((width, height), Image.BILINEAR)
            box = Image.new("L", (32, 32), 0)
            box.paste(glyph, ((32 - width) // 2 + int(rng.integers(-1, 2)), (32 - height) // 2))
            bits = np.asarray(box) >= 128
            counts = bits.reshape(8, 4, 8, 4).sum(axis=(1, 3))  # 0..16, as the digits' 8x8
            pixels = np.clip(np.rint(counts * (255.0 / 16.0)), 0, 255).astype(np.uint8)
            blobs.append(_png(Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC)))
    return blobs


def photo_crops(n: int, seed: int = 0) -> list[bytes]:
    """Square crops (24-160 px) of scikit-learn's two bundled sample photos, as RGB PNGs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(24, 161))
        top = int(rng.integers(0, photo.shape[0] - side))
        left = int(rng.integers(0, photo.shape[1] - side))
        blobs.append(_png(Image.fromarray(photo[top:top + side, left:left + side], "RGB")))
    return blobs


def noise_images(n: int, seed: int = 0) -> list[bytes]:
    """Uniform noise, half 32x32 grey, half 48x40 RGB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    grey = [_png(Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L"))
            for _ in range(n // 2)]
    rgb = [_png(Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), "RGB"))
           for _ in range(n - n // 2)]
    return grey + rgb


# -- the served path over an exported folder ---------------------------------------------------

def image_outputs(folder: Path, blobs: Sequence[bytes], batch: int = 64) -> Outputs:
    """decode_image -> image_features and image_to_array -> ONNX, as the service runs an image
    model."""
    from preprocessing import decode_image, image_features, image_to_array, load_spec
    from training.export import ort_session

    spec = load_spec((folder / "spec.json").read_text())
    session = ort_session(folder / "model.onnx")
    start = time.perf_counter()
    logits, emb, feats = [], [], []
    for i in range(0, len(blobs), batch):
        images = [decode_image(b, spec) for b in blobs[i:i + batch]]
        feats += [image_features(img) for img in images]
        x = np.stack([image_to_array(img, spec) for img in images])
        out = session.run(["logits", "embedding"], {"input": x})
        logits.append(out[0])
        emb.append(out[1])
    return Outputs(np.concatenate(logits), np.concatenate(emb), feats,
                   time.perf_counter() - start)


def text_outputs(folder: Path, texts: Sequence[str], batch: int = 64) -> Outputs:
    """encode_batch -> text_features and ONNX, as the service runs a text model."""
    from preprocessing import TextPreprocessor, load_spec, text_features
    from training.export import ort_session

    spec = load_spec((folder / "spec.json").read_text())
    pre = TextPreprocessor(spec, (folder / spec.tokenizer).read_text(encoding="utf-8"))
    session = ort_session(folder / "model.onnx")
    start = time.perf_counter()
    logits, emb, feats = [], [], []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        enc = pre.encode_batch(chunk)
        feats += [text_features(t, s) for t, s in zip(chunk, enc.stats)]
        out = session.run(["logits", "embedding"], {"input_ids": enc.input_ids,
                                                    "attention_mask": enc.attention_mask})
        logits.append(out[0])
        emb.append(out[1])
    return Outputs(np.concatenate(logits), np.concatenate(emb), feats,
                   time.perf_counter() - start)


# -- the two parts -----------------------------------------------------------------------------

def _trained(folder: Path, train_and_stage: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Train and stage into ``folder`` unless a previous run (``--work``) left it there."""
    info_path = folder / "report_info.json"
    if not info_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        info = train_and_stage(folder)
        info["train_export_s"] = round(time.perf_counter() - start, 1)
        info_path.write_text(json.dumps(info) + "\n")
    return json.loads(info_path.read_text())


def text_config(work: Path, model: str, seed: int, epochs: int | None) -> Any:
    from training.text.config import TextTrainConfig

    if epochs is None and model == "transformer":
        epochs = 6
    return TextTrainConfig(model=model, data=str(SMS), text_column="SMS", label_column="Label",
                           vocab_size=2000, d_model=64, layers=1, heads=2, ff_dim=128,
                           max_length=64, epochs=epochs, seed=seed, progress=False,
                           out_dir=str(work / f"text-{model}"))


def text_part(work: Path, model: str, seed: int, epochs: int | None) -> Part:
    from training.text.data import stratified_split
    from training.text.train import load_data

    cfg = text_config(work, model, seed, epochs)

    def train_and_stage(folder: Path) -> dict[str, Any]:
        from training.text.export import stage_text_artifact
        from training.text.train import train

        result = train(cfg)
        stage_text_artifact(result.model.cpu(), folder, pre=result.pre,
                            tokenizer_json=result.tokenizer_json, labels=result.classes,
                            reference_texts=result.splits.val.texts,
                            reference_labels=result.splits.val.labels, metrics={},
                            manifest={}, curves=None, train_texts=result.splits.train.texts,
                            train_labels=result.splits.train.labels)
        return {"test_accuracy": result.test_accuracy}

    folder = work / f"text-{model}-artifact"
    info = _trained(folder, train_and_stage)
    splits = stratified_split(load_data(cfg), cfg.seed, cfg.val_fraction, cfg.test_fraction)
    demo, languages = demo_texts_by_language(40, seed + 321)
    foreign = {**demo, "English prose (stdlib docstrings)": docstring_prose(300, seed),
               "random strings": random_strings(300, seed)}
    return Part(f"SMS spam, {model}", folder, text_outputs(folder, list(splits.test.texts)),
                {k: text_outputs(folder, v) for k, v in foreign.items()},
                {**info, "reference_rows": len(splits.val)},
                {"demo texts (11 languages)": languages})


def digits_config(work: Path, seed: int, epochs: int | None) -> Any:
    from training.config import TrainConfig

    # The pre-robustness augmentation (affine only), as the tests' digits model: the default
    # recipe's robustness variations need its 40 epochs to reach its accuracy.
    return TrainConfig(epochs=epochs or 15, warmup_epochs=1.0, patience=15, robust_augment=0.0,
                       max_rotate=10.0, max_translate=0.08, seed=seed, progress=False,
                       out_dir=str(work / "digits"))


def digits_part(work: Path, seed: int, epochs: int | None) -> Part:
    from training.train import prepare_splits

    cfg = digits_config(work, seed, epochs)

    def train_and_stage(folder: Path) -> dict[str, Any]:
        from training.export import stage_artifact
        from training.train import train

        result = train(cfg)
        stage_artifact(result.model.cpu(), folder, spec=result.spec, labels=result.classes,
                       reference_blobs=result.splits.val.blobs,
                       reference_labels=result.splits.val.labels, metrics={}, manifest={},
                       curves=None, train_blobs=result.splits.train.blobs,
                       train_labels=result.splits.train.labels)
        return {"test_accuracy": result.test_accuracy}

    folder = work / "digits-artifact"
    info = _trained(folder, train_and_stage)
    splits, _ = prepare_splits(cfg)
    foreign = {"rendered letters": rendered_letters(4, seed),
               "photo crops (sklearn samples)": photo_crops(200, seed),
               "uniform noise": noise_images(200, seed)}
    return Part("digits CNN", folder, image_outputs(folder, list(splits.test.blobs)),
                {k: image_outputs(folder, v) for k, v in foreign.items()},
                {**info, "reference_rows": len(splits.val)})


# -- measuring ---------------------------------------------------------------------------------

def roc_auc(negative: np.ndarray, positive: np.ndarray) -> float:
    """P(a foreign score > an in-domain score), ties counted half (the Mann-Whitney U)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([negative, positive]))
    n, p = len(negative), len(positive)
    return float((ranks[n:].sum() - p * (p + 1) / 2) / (n * p))


def signal_values(scorer: Any, out: Outputs) -> dict[str, np.ndarray]:
    values = scorer.signals(out.probs, out.embeddings, out.features)
    values.setdefault("confidence", 1.0 - out.probs.max(axis=1))  # shown even where unused
    z = out.logits.astype(np.float64)
    m = z.max(axis=1)
    values["energy"] = -(m + np.log(np.exp(z - m[:, None]).sum(axis=1)))
    return values


def score_cost_us(scorer: Any, out: Outputs, batch: int, rounds: int = 7) -> float:
    """Microseconds per answer of ``scorer.score`` on batches of ``batch`` in-domain answers:
    the best of ``rounds`` rounds (each over up to 50 batches), since other work on shared cores
    only ever adds time."""
    n = len(out.logits)
    batches = [out.rows(slice(i, i + batch)) for i in range(0, n - batch + 1, batch)][:50]
    prepared = [(b.probs, b.embeddings, b.features) for b in batches]
    scorer.score(*prepared[0])  # warm
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for p in prepared * max(1, 200 // (len(prepared) * batch)):
            scorer.score(*p)
        calls = len(prepared) * max(1, 200 // (len(prepared) * batch))
        best = min(best, (time.perf_counter() - start) / (calls * batch) * 1e6)
    return best


def measure(part: Part, knn_k: int) -> dict[str, Any]:
    from monitoring.ood import fit_ood
    from monitoring.reference import load_reference

    reference = load_reference(part.folder)
    start = time.perf_counter()
    after = fit_ood(reference, knn_k=knn_k)
    fit_s = time.perf_counter() - start
    before = fit_ood(reference, knn_k=knn_k, joint_share=0)  # format 3's: no joint signal
    ind = signal_values(after, part.in_domain)
    rows = []
    for name, out in part.foreign.items():
        values = signal_values(after, out)
        row = {"foreign": name, "n": len(out.logits),
               "auc": {s: roc_auc(ind[s], values[s]) for s in SIGNALS if s in values},
               "auc_before": roc_auc(before.score(part.in_domain.probs, part.in_domain.embeddings,
                                                  part.in_domain.features)[0],
                                     before.score(out.probs, out.embeddings, out.features)[0]),
               "auc_after": roc_auc(after.score(part.in_domain.probs, part.in_domain.embeddings,
                                                part.in_domain.features)[0],
                                    after.score(out.probs, out.embeddings, out.features)[0]),
               "flagged_before": float(before.score(out.probs, out.embeddings,
                                                    out.features)[1].mean()),
               "flagged_after": float(after.score(out.probs, out.embeddings,
                                                  out.features)[1].mean())}
        row["knn_auc_by_k"] = {k: roc_auc(_knn(after, part.in_domain, k), _knn(after, out, k))
                               for k in (1, 3, 5, 10, 20, 50)}
        if name in part.groups:
            groups = np.array(part.groups[name])
            flags = after.score(out.probs, out.embeddings, out.features)[1]
            row["flagged_after_by_group"] = {g: float(flags[groups == g].mean())
                                             for g in sorted(set(groups))}
        rows.append(row)
    ind_out = part.in_domain
    n_in = len(ind_out.logits)
    return {
        "part": part.name, **part.info, "in_domain_n": n_in, "knn_k": after.knn_k,
        "knn_bank_rows": int(after.knn_bank.shape[0]), "fit_s": round(fit_s, 3),
        "expected_flag_rate": {"before": before.expected_flag_rate,
                               "after": after.expected_flag_rate},
        "in_domain_flagged": {
            "before": float(before.score(ind_out.probs, ind_out.embeddings,
                                         ind_out.features)[1].mean()),
            "after": float(after.score(ind_out.probs, ind_out.embeddings,
                                       ind_out.features)[1].mean()),
            "by_signal": {s: float((v > 1).mean()) for s, v in ind.items()
                          if s != "energy" and (s != "confidence" or after.confidence_quantile > 0)}},
        "foreign": rows,
        "model_us_per_answer": ind_out.seconds / n_in * 1e6,
        "score_us_per_answer": {f"{label} batch {b}": score_cost_us(s, ind_out, b)
                                for label, s in (("before", before), ("after", after))
                                for b in (1, 64)},
    }


def _knn(scorer: Any, out: Outputs, k: int) -> np.ndarray:
    from monitoring.ood import kth_neighbour_distance, unit_rows

    return kth_neighbour_distance(unit_rows(out.embeddings), scorer.knn_bank,
                                  min(k, len(scorer.knn_bank)))


def format_report(results: Sequence[dict[str, Any]]) -> str:
    head = ["pair", "n", *[f"AUC {s}" for s in SIGNALS], "AUC before", "AUC after",
            "flagged before", "flagged after"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        ind = r["in_domain_flagged"]
        out.append("| " + " | ".join([f"{r['part']}: held-out (in-domain)", str(r["in_domain_n"]),
                                      *["" for _ in SIGNALS], "", "",
                                      f"{ind['before']:.1%}", f"{ind['after']:.1%}"]) + " |")
        for f in r["foreign"]:
            aucs = [f"{f['auc'][s]:.3f}" if s in f["auc"] else "-" for s in SIGNALS]
            out.append("| " + " | ".join([f"{r['part']}: {f['foreign']}", str(f["n"]), *aucs,
                                          f"{f['auc_before']:.3f}", f"{f['auc_after']:.3f}",
                                          f"{f['flagged_before']:.1%}",
                                          f"{f['flagged_after']:.1%}"]) + " |")
    out.append("")
    for r in results:
        cost = ", ".join(f"{k} {v:.1f}" for k, v in r["score_us_per_answer"].items())
        by_signal = ", ".join(f"{k} {v:.1%}"
                              for k, v in r["in_domain_flagged"]["by_signal"].items())
        out += [f"{r['part']}: test accuracy {r['test_accuracy']:.3f}; reference "
                f"{r['reference_rows']} rows, k-NN bank {r['knn_bank_rows']}, k={r['knn_k']}; "
                f"fit_ood {r['fit_s']} s; "
                f"nominal flag rate (tails summed) before {r['expected_flag_rate']['before']:.1%},"
                f" after {r['expected_flag_rate']['after']:.1%}",
                f"  in-domain flagged by signal: {by_signal}",
                f"  score() us/answer: {cost}; model + preprocessing "
                f"{r['model_us_per_answer']:.0f} us/answer (batches of 64)",
                *[f"  flagged after, {f['foreign']} by group: " + ", ".join(
                    f"{g} {v:.0%}" for g, v in f["flagged_after_by_group"].items())
                  for f in r["foreign"] if "flagged_after_by_group" in f],
                "  k-NN AUC by k: " + "; ".join(
                    f"{f['foreign']}: " + " ".join(f"k{k}={v:.3f}" for k, v in
                                                   f["knn_auc_by_k"].items())
                    for f in r["foreign"])]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.ood_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "text", "digits"), default="all")
    p.add_argument("--text-model", choices=("minilm", "transformer"), default="minilm")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 15 digits, 6 transformer, MiniLM's default)")
    p.add_argument("--knn-k", type=int, default=None, help="k of the neighbour signal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--work", type=Path, default=None,
                   help="keep the trained artifacts here and reuse them on the next run "
                   "(default: a temporary folder)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from monitoring.ood import KNN_K

    parts: list[Callable[[Path], Part]] = []
    if args.part in ("all", "digits"):
        parts.append(lambda w: digits_part(w, args.seed, args.epochs))
    if args.part in ("all", "text"):
        parts.append(lambda w: text_part(w, args.text_model, args.seed, args.epochs))
    results = []
    with tempfile.TemporaryDirectory(prefix="ood-report-") as tmp:
        work = args.work or Path(tmp)
        for make in parts:
            results.append(measure(make(work), args.knn_k or KNN_K))
    print(format_report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
