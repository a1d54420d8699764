"""The robustness and adversarial figures an export writes into metrics.json (images and texts).

Called by ``training/export.py`` and ``training/text/export.py`` once the ONNX model is built and
parity-checked. The robustness suite (``robustness``) runs through what is served: the ONNX
Runtime session behind the shared preprocessing, from the variations' encoded bytes (images) or
strings (texts). The image attacks need gradients and run on the PyTorch model in float32
(``adversarial``); the text attack is black-box through the served path. The OOD flag (the
service's ``monitoring.ood.fit_ood`` on the same reference profile, default quantiles) is
measured on the successful adversarial examples at the reference strength, beside its rate on
the clean test inputs; nothing here claims it catches them.

Keys (both kinds): ``robustness`` ({"clean": acc, variation: acc}), ``robustness_worst``
({"variation", "accuracy", "drop"}), ``adversarial`` ({"fgsm": {eps: rate}, "pgd": {eps: rate}}
or {"charedit": {edits: rate}}), ``attack_success`` (the rate at the reference strength: PGD at
eps 8/255 for images, 2 edits for texts), ``adversarial_ood_flag_rate`` (None where not
measured), and ``adversarial_info`` (how: reference, eps scale, steps, counts, accuracies under
attack, the OOD flag's clean rate, seconds).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from torch import nn

from preprocessing import ImageSpec, decode_image, image_to_array, text_features

from . import adversarial as adv
from .robustness import (SUITE_SEED, image_suite, image_variation_names, suite_accuracy,
                         text_suite, worst_variation)

if TYPE_CHECKING:
    import onnxruntime as ort

    from monitoring.ood import OODScorer
    from preprocessing import TextPreprocessor

log = logging.getLogger("training")

OUTPUTS = ("logits", "embedding")
# Bounds that keep an export's measurement to seconds on a big test split (seeded samples).
MAX_SUITE_IMAGES, MAX_ATTACK_IMAGES = 2000, 1000
MAX_SUITE_TEXTS, MAX_ATTACK_TEXTS = 1000, 200


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ood_scorer(profile: Mapping[str, np.ndarray], classes: Sequence[str]) -> "OODScorer | None":
    """The service's OOD scorer, fitted on this export's reference profile (None where it
    cannot be: too few reference rows)."""
    from monitoring.ood import fit_ood
    from monitoring.reference import Reference

    reference = Reference(
        feature_names=tuple(str(n) for n in profile["feature_names"]),
        features=np.asarray(profile["features"], dtype=np.float64),
        embeddings=np.asarray(profile["embeddings"], dtype=np.float32),
        logits=np.asarray(profile["logits"], dtype=np.float32),
        labels=np.asarray(profile["labels"], dtype=np.int64),
        predicted=np.asarray(profile["predicted"], dtype=np.int64),
        confidence=np.asarray(profile["confidence"], dtype=np.float32),
        classes=tuple(classes))
    try:
        return fit_ood(reference)
    except ValueError as exc:
        log.info("no OOD scorer for the adversarial figures: %s", exc)
        return None


# -- images -----------------------------------------------------------------------------------

def image_arrays(blobs: Sequence[bytes], spec: ImageSpec) -> np.ndarray:
    """The served tensors of encoded images: ``decode_image`` -> ``image_to_array``."""
    return np.stack([image_to_array(decode_image(b, spec), spec) for b in blobs]).astype(
        np.float32)


def run_image_session(session: "ort.InferenceSession", x: np.ndarray, batch: int = 256
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and embeddings of normalised tensors ``x`` from the ONNX model."""
    logits, emb = [], []
    for i in range(0, len(x), batch):
        out_logits, out_emb = session.run(list(OUTPUTS), {"input": x[i:i + batch]})
        logits.append(out_logits)
        emb.append(out_emb)
    return np.concatenate(logits), np.concatenate(emb)


def image_predictor(session: "ort.InferenceSession", spec: ImageSpec, batch: int = 256):
    """``predict(list of image bytes) -> class indices``, the served path (in batches: only one
    batch of tensors in memory)."""
    def predict(blobs: list) -> np.ndarray:
        return np.concatenate([
            run_image_session(session, image_arrays(blobs[i:i + batch], spec))[0].argmax(1)
            for i in range(0, len(blobs), batch)] or [np.zeros(0, np.int64)])

    return predict


def image_metrics(model: nn.Module, session: "ort.InferenceSession", spec: ImageSpec,
                  blobs: Sequence[bytes], labels: Sequence[int],
                  profile: Mapping[str, np.ndarray], classes: Sequence[str],
                  variations: Sequence[str] | None = None, seed: int = SUITE_SEED,
                  epsilons: Sequence[float] = adv.EPSILONS, steps: int = adv.PGD_STEPS,
                  max_suite: int = MAX_SUITE_IMAGES, max_attack: int = MAX_ATTACK_IMAGES
                  ) -> dict[str, Any]:
    """Robustness suite (through ONNX Runtime) and FGSM/PGD (through PyTorch) on (at most
    ``max_suite`` / ``max_attack`` seeded samples of) a test split."""
    start = time.perf_counter()
    names = image_variation_names(spec.color_mode) if variations is None else variations
    keep = _subsample(len(blobs), max_suite, seed)
    suite = image_suite([blobs[i] for i in keep], seed, names, spec,
                        max_side=4 * max(spec.height, spec.width))
    robustness = suite_accuracy(image_predictor(session, spec), suite,
                                [int(labels[i]) for i in keep])
    suite_seconds = time.perf_counter() - start

    t0 = time.perf_counter()
    pick = attack_pick(len(blobs), seed, max_suite, max_attack)
    x, report = _image_attack(model, spec, blobs, labels, pick, epsilons, steps, seed)
    scorer = ood_scorer(profile, classes)
    clean_flags = adv_flags = None
    if scorer is not None:
        logits, emb = run_image_session(session, x)
        clean_flags = float(scorer.score(_softmax(logits), emb)[1].mean()) if len(x) else None
        if report.reference_examples is not None and len(report.reference_examples):
            a_logits, a_emb = run_image_session(session, report.reference_examples)
            adv_flags = float(scorer.score(_softmax(a_logits), a_emb)[1].mean())
    reference = adv.eps_key(adv.REFERENCE_EPS)
    out = {
        "robustness": robustness,
        "robustness_worst": worst_variation(robustness),
        "adversarial": report.metrics(),
        "attack_success": report.pgd.get(reference),
        "adversarial_ood_flag_rate": adv_flags,
        "adversarial_info": {
            "reference": f"pgd eps={reference} (8/255)", "eps_scale": "pixels in [0, 1]",
            "pgd_steps": steps, "pgd_step_size": "2.5 * eps / steps, random start",
            "attacked": report.attacked, "attack_sample": len(pick),
            "suite_sample": len(keep), "test_inputs": len(blobs),
            "clean_accuracy_torch": report.clean_accuracy,
            "accuracy_under_attack": report.adversarial_accuracy,
            "ood_flag_rate_clean_test": clean_flags,
            "ood_flagged_examples": (0 if report.reference_examples is None
                                     else len(report.reference_examples)),
            "ood_examples_from": f"pgd successes at eps={reference}",
            "suite_seed": seed, "suite_seconds": round(suite_seconds, 2),
            "attack_seconds": round(time.perf_counter() - t0, 2),
        },
    }
    log.info("robustness: clean %.4f, worst %s %.4f; PGD@%s success %.3f, OOD flags %s of them "
             "(%.1fs + %.1fs)", robustness["clean"], out["robustness_worst"]["variation"],
             out["robustness_worst"]["accuracy"] or float("nan"), reference,
             out["attack_success"] or 0.0, "-" if adv_flags is None else f"{adv_flags:.3f}",
             suite_seconds, out["adversarial_info"]["attack_seconds"])
    return out


# -- texts ------------------------------------------------------------------------------------

def text_outputs(session: "ort.InferenceSession", pre: "TextPreprocessor", texts: Sequence[str],
                 batch: int = 128) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Logits, embeddings and monitored features of texts through the served path; texts are
    batched by length (least padding) and put back in their order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    logits: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    emb: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    feats: list[dict[str, float]] = [{}] * len(texts)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        chunk = [texts[i] for i in idx]
        enc = pre.encode_batch(chunk)
        out_logits, out_emb = session.run(list(OUTPUTS), {
            "input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
        for k, i in enumerate(idx):
            logits[i], emb[i] = out_logits[k], out_emb[k]
            feats[i] = text_features(chunk[k], enc.stats[k])
    if not texts:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), []
    return np.stack(logits), np.stack(emb), feats


def attack_pick(n: int, seed: int, max_suite: int, max_attack: int) -> np.ndarray:
    """The indices, into a test split of ``n`` inputs, of those an export attacks: a seeded
    sample (``seed + 1``) of the robustness suite's seeded sample (``seed``). The same inputs in
    the same order give the same pick, which is how the retraining gate attacks a challenger on
    the very inputs the champion's figure is over (``image_attack_success``)."""
    keep = _subsample(n, max_suite, seed)
    return keep[_subsample(len(keep), max_attack, seed + 1)]


def _image_attack(model: nn.Module, spec: ImageSpec, blobs: Sequence[bytes],
                  labels: Sequence[int], pick: np.ndarray, epsilons: Sequence[float],
                  steps: int, seed: int) -> tuple[np.ndarray, "adv.ImageAttackReport"]:
    x = image_arrays([blobs[i] for i in pick], spec)
    return x, adv.image_attacks(model, x, [int(labels[i]) for i in pick], spec, epsilons, steps,
                                seed)


def image_attack_success(model: nn.Module, spec: ImageSpec, blobs: Sequence[bytes],
                         labels: Sequence[int], seed: int = SUITE_SEED,
                         epsilons: Sequence[float] = adv.EPSILONS, steps: int = adv.PGD_STEPS,
                         max_suite: int = MAX_SUITE_IMAGES, max_attack: int = MAX_ATTACK_IMAGES
                         ) -> tuple[float | None, int]:
    """``image_metrics``' ``attack_success`` and ``adversarial_info.attacked`` alone: the same
    inputs of ``blobs`` attacked the same way (PGD at the reference strength), no suite."""
    pick = attack_pick(len(blobs), seed, max_suite, max_attack)
    _, report = _image_attack(model, spec, blobs, labels, pick, epsilons, steps, seed)
    return report.pgd.get(adv.eps_key(adv.REFERENCE_EPS)), report.attacked


def text_attack_success(session: "ort.InferenceSession", pre: "TextPreprocessor",
                        texts: Sequence[str], labels: Sequence[int], seed: int = SUITE_SEED,
                        max_suite: int = MAX_SUITE_TEXTS, max_attack: int = MAX_ATTACK_TEXTS,
                        candidates: int = 16) -> tuple[float | None, int]:
    """``text_metrics``' ``attack_success`` and ``adversarial_info.attacked`` alone: the same
    inputs of ``texts`` attacked the same way (2 character edits), no suite."""
    pick = attack_pick(len(texts), seed, max_suite, max_attack)
    report = _text_attack(session, pre, texts, labels, pick, candidates, seed)
    return report.charedit.get(str(adv.REFERENCE_EDITS)), report.attacked


def _text_attack(session: "ort.InferenceSession", pre: "TextPreprocessor",
                 texts: Sequence[str], labels: Sequence[int], pick: np.ndarray, candidates: int,
                 seed: int) -> "adv.TextAttackReport":
    def proba(items: list) -> np.ndarray:
        return _softmax(text_outputs(session, pre, items)[0])

    return adv.char_attack(proba, [texts[i] for i in pick], [int(labels[i]) for i in pick],
                           candidates=candidates, seed=seed)


def _subsample(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def text_metrics(session: "ort.InferenceSession", pre: "TextPreprocessor", texts: Sequence[str],
                 labels: Sequence[int], profile: Mapping[str, np.ndarray],
                 classes: Sequence[str], seed: int = SUITE_SEED,
                 max_suite: int = MAX_SUITE_TEXTS, max_attack: int = MAX_ATTACK_TEXTS,
                 candidates: int = 16) -> dict[str, Any]:
    """Robustness suite and the character-edit attack on (at most ``max_suite`` /
    ``max_attack`` seeded samples of) a test split, through ONNX Runtime."""
    start = time.perf_counter()
    keep = _subsample(len(texts), max_suite, seed)
    sub_texts = [texts[i] for i in keep]
    sub_labels = [int(labels[i]) for i in keep]
    suite = text_suite(sub_texts, seed)

    def predict(items: list) -> np.ndarray:
        return text_outputs(session, pre, items)[0].argmax(1)

    robustness = suite_accuracy(predict, suite, sub_labels)
    suite_seconds = time.perf_counter() - start

    t0 = time.perf_counter()
    pick = attack_pick(len(texts), seed, max_suite, max_attack)
    report = _text_attack(session, pre, texts, labels, pick, candidates, seed)
    scorer = ood_scorer(profile, classes)
    clean_flags = adv_flags = None
    if scorer is not None:
        logits, emb, feats = text_outputs(session, pre, sub_texts)
        clean_flags = float(scorer.score(_softmax(logits), emb, feats)[1].mean()) \
            if sub_texts else None
        if report.adversarial_texts:
            a_logits, a_emb, a_feats = text_outputs(session, pre, report.adversarial_texts)
            adv_flags = float(scorer.score(_softmax(a_logits), a_emb, a_feats)[1].mean())
    out = {
        "robustness": robustness,
        "robustness_worst": worst_variation(robustness),
        "adversarial": {"charedit": report.charedit},
        "attack_success": report.charedit.get(str(adv.REFERENCE_EDITS)),
        "adversarial_ood_flag_rate": adv_flags,
        "adversarial_info": {
            "reference": f"charedit {adv.REFERENCE_EDITS} edits",
            "attack": f"greedy black-box, {candidates} random edits tried per step, at most "
                      f"{max(adv.TEXT_EDITS)} edits",
            "attacked": report.attacked, "attack_sample": len(pick),
            "suite_sample": len(keep), "test_inputs": len(texts),
            "ood_flag_rate_clean_test": clean_flags,
            "ood_flagged_examples": len(report.adversarial_texts),
            "ood_examples_from": f"charedit successes within {max(adv.TEXT_EDITS)} edits",
            "suite_seed": seed, "suite_seconds": round(suite_seconds, 2),
            "attack_seconds": round(time.perf_counter() - t0, 2),
        },
    }
    log.info("robustness: clean %.4f, worst %s %.4f; %d-edit attack success %.3f (%.1fs + %.1fs)",
             robustness["clean"], out["robustness_worst"]["variation"],
             out["robustness_worst"]["accuracy"] or float("nan"), adv.REFERENCE_EDITS,
             out["attack_success"] or 0.0, suite_seconds,
             out["adversarial_info"]["attack_seconds"])
    return out


def summary_line(metrics: Mapping[str, Any]) -> str | None:
    """The CLI's summary line for the robustness and attack figures (None where not measured)."""
    worst = metrics.get("robustness_worst") or {}
    if not worst.get("variation"):
        return None
    reference = (metrics.get("adversarial_info") or {}).get("reference", "reference")
    attack = metrics.get("attack_success")
    flags = metrics.get("adversarial_ood_flag_rate")
    return (f"robustness     worst {worst['variation']} {worst['accuracy']:.4f} (clean "
            f"{metrics['robustness']['clean']:.4f}, drop {worst['drop']:+.4f}); attack success "
            f"{'-' if attack is None else f'{attack:.3f}'} ({reference}), OOD-flagged "
            f"{'-' if flags is None else f'{flags:.3f}'} of those")
