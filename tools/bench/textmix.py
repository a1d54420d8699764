"""The text load: a fixed, seeded length mix made from the project's own demo data, written as
one JSON body per line for wrk's ``rotate.lua``, and the mix's statistics.

Real text traffic is mostly short with a tail of long inputs, and a text model's cost follows
the padded token count, so the mix has two kinds:
  short  a demo text of at most ``short_max_words`` words as it is (snippets, short sentences);
  long   demo sentences and paragraphs of one language joined until the text reaches a length
         drawn uniformly from ``long_chars`` (hundreds of characters: the longest pass the
         model's ``max_length`` tokens and are truncated, as users' long texts are).
Kinds are interleaved at random, so the texts that meet in the server's queue are a random
sample of the mix. The demo data itself (``python -m training.text.demo``) is generated in a
child process, so neither Faker nor torch loads into the bench.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .bodies import ROTATE_LUA, TEXT_ROUTE, V2_INFER_ROUTE, Body

SHORT, LONG = "short", "long"


@dataclass(frozen=True)
class MixSpec:
    bodies: int = 512
    short_share: float = 0.8
    short_max_words: int = 6
    long_chars: tuple[int, int] = (200, 600)
    seed: int = 0
    demo_per_class: int = 400  # demo texts per language to draw from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MixItem:
    text: str
    label: str
    kind: str  # SHORT or LONG


def build_mix(texts: Sequence[str], labels: Sequence[str], spec: MixSpec) -> list[MixItem]:
    """``spec.bodies`` texts, ``short_share`` of them short, in a seeded random order."""
    if not 0.0 <= spec.short_share <= 1.0 or spec.bodies < 1:
        raise ValueError(f"need bodies >= 1 and short_share in [0, 1], got {spec}")
    lo, hi = spec.long_chars
    rng = np.random.default_rng(spec.seed)
    words = [len(t.split()) for t in texts]
    short = [i for i, n in enumerate(words) if n <= spec.short_max_words]
    pieces: dict[str, list[int]] = {}
    for i, n in enumerate(words):
        if n > spec.short_max_words:
            pieces.setdefault(labels[i], []).append(i)
    n_short = round(spec.bodies * spec.short_share)
    kinds = rng.permutation([SHORT] * n_short + [LONG] * (spec.bodies - n_short))
    if n_short and not short:
        raise ValueError(f"no text of at most {spec.short_max_words} words to draw short ones from")
    if n_short < spec.bodies and not pieces:
        raise ValueError(f"no text of more than {spec.short_max_words} words to build long ones")
    short_order = rng.permutation(short).tolist() if short else []
    languages = sorted(pieces)
    items = []
    for k, kind in enumerate(kinds):
        if kind == SHORT:
            i = short_order[k % len(short_order)]
            items.append(MixItem(texts[i], labels[i], SHORT))
            continue
        label = languages[int(rng.integers(len(languages)))]
        target = int(rng.integers(lo, hi + 1))
        text = ""
        while len(text) < target:
            piece = texts[pieces[label][int(rng.integers(len(pieces[label])))]]
            text = f"{text} {piece}" if text else piece
        items.append(MixItem(text, label, LONG))
    return items


def rotation_lines(texts: Sequence[str]) -> bytes:
    """One ``{"text": ...}`` JSON body per line, UTF-8 as clients send it (``json.dumps``
    escapes every control character, so no body spans two lines)."""
    lines = [json.dumps({"text": t}, ensure_ascii=False, separators=(",", ":")) for t in texts]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def mix_stats(items: Sequence[MixItem], tokens: Sequence[int], truncated: Sequence[bool],
              max_length: int) -> dict:
    """The mix as numbers: shares, mean characters and tokens per kind, truncation, body bytes.
    ``tokens`` = what the model sees per text (special tokens in, after truncation)."""
    out: dict = {"bodies": len(items), "max_length": max_length}
    body_bytes = [len(b) for b in rotation_lines([i.text for i in items]).splitlines()]
    out["mean_body_bytes"] = _mean(body_bytes)
    for kind in (SHORT, LONG, "all"):
        idx = [k for k, i in enumerate(items) if kind in ("all", i.kind)]
        out[kind] = {
            "share": len(idx) / len(items) if items else None,
            "mean_chars": _mean([len(items[k].text) for k in idx]),
            "mean_tokens": _mean([tokens[k] for k in idx]),
            "max_tokens": max((tokens[k] for k in idx), default=None),
            "truncated_share": _mean([float(truncated[k]) for k in idx]),
        }
    lengths = np.asarray(tokens)
    out["tokens_p50_p90_p99"] = ([float(np.percentile(lengths, p)) for p in (50, 90, 99)]
                                 if len(lengths) else None)
    return out


def describe_mix(stats: dict, spec: MixSpec) -> str:
    """One line for the table's caption, e.g. '512 texts: 80% short (...), 20% long (...)'."""
    s, lg, a = stats[SHORT], stats[LONG], stats["all"]

    def part(d: dict, what: str) -> str:
        if not d["share"]:
            return f"0% {what}"
        return (f"{100 * d['share']:.0f}% {what} (mean {d['mean_chars']:.0f} chars, "
                f"{d['mean_tokens']:.1f} tokens)")

    lo, hi = spec.long_chars
    cut = f"{100 * (lg['truncated_share'] or 0.0):.0f}% cut at {stats['max_length']} tokens"
    short_what = f"short (<= {spec.short_max_words} words)"
    long_what = f"long (sentences joined to {lo}-{hi} chars, {cut})"
    return (f"{stats['bodies']} texts, {part(s, short_what)}, {part(lg, long_what)}; "
            f"all: mean {a['mean_chars']:.0f} chars, {a['mean_tokens']:.1f} tokens "
            f"(model tokens incl. special ones), {stats['mean_body_bytes']:.0f} B JSON body")


def write_text_body(folder: Path, name: str, items: Sequence[MixItem], description: str) -> Body:
    """Write the mix's bodies to ``folder/name.jsonl`` for ``rotate.lua``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    path.write_bytes(rotation_lines([i.text for i in items]))
    return Body(path=path, headers=["Content-Type: application/json"], description=description,
                texts=tuple(i.text for i in items), route=TEXT_ROUTE, script=ROTATE_LUA)


def write_v2_text_body(folder: Path, name: str, body: Body) -> Body:
    """The same mix as Open Inference Protocol v2 requests (``POST /v2/models/{name}/infer``):
    one JSON body per text, the text as a one-element BYTES tensor (the JSON form: the binary
    extension's header length differs per body, and wrk sends fixed headers)."""
    lines = [json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                     "data": [t]}]}, ensure_ascii=False, separators=(",", ":"))
             for t in body.texts]
    path = folder / f"{name}-v2.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return Body(path=path, headers=["Content-Type: application/json"],
                description=body.description + "; as v2 JSON BYTES requests", texts=body.texts,
                route=V2_INFER_ROUTE.format(name=name), script=ROTATE_LUA)


def read_labelled_csv(path: Path) -> tuple[list[str], list[str]]:
    """The demo CSV's ``text`` and ``label`` columns."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def demo_data(folder: Path, per_class: int, seed: int, cwd: Path) -> tuple[list[str], list[str]]:
    """The project's demo texts, written by ``python -m training.text.demo`` in a child process."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"demo-{per_class}-{seed}.csv"
    cmd = [sys.executable, "-m", "training.text.demo", "--out", str(out),
           "--per-class", str(per_class), "--seed", str(seed)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed (rc={proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-2000:])
    return read_labelled_csv(out)
