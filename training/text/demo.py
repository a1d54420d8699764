"""The built-in demo data: language identification over generated text, offline and seeded.

No installed package ships labelled sentences, and nothing may be downloaded, so the demo data
is made from Faker's per-locale word lists (its ``lorem`` providers hold real words of each
language, plus local person and street names). Eleven languages, chosen so that some are
easy to tell apart (Cyrillic vs Latin script) and some are not: Romance (es/fr/it), West
Germanic and Nordic (en/de/nl/da), West Slavic (pl/cs) and East Slavic (ru/uk, the same script).
Lengths are mixed on purpose: 1-3 word snippets (often ambiguous: "partner" is Czech and Dutch),
sentences, and paragraphs, some with a local name, a date or a number, some all in capitals.
Every text is unique across the whole set, so no text can sit in both train and test. The data
is a function of the seed (and Faker's version) only: not of the process's hash seed, nor of the
clock (see ``DATES_END``).

    python -m training.text.demo --out demo.csv     # the same data as a CSV, for a look
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import sys
from typing import Sequence

import numpy as np

from .data import DataError, LabelledTexts

# label -> Faker locale. Only locales with their own lorem word list (pt, sv, no fall back
# to Latin lorem ipsum in Faker, so they are not here).
LOCALES: dict[str, str] = {
    "cs": "cs_CZ", "da": "da_DK", "de": "de_DE", "en": "en_US", "es": "es_ES", "fr": "fr_FR",
    "it": "it_IT", "nl": "nl_NL", "pl": "pl_PL", "ru": "ru_RU", "uk": "uk_UA",
}
# Share of snippets, sentences and paragraphs.
LENGTH_MIX = {"snippet": 0.3, "sentence": 0.5, "paragraph": 0.2}
# The latest date a text may mention. Faker's ``date()`` draws between 1970 and *now* by default
# (start + (now - start) * u), so the same seed gave a few different dates, hence different
# texts, a different BPE vocabulary and different weights, from one run to the next: the
# language model's 0.924-0.932 run-to-run spread with one seed. A fixed end removes it.
DATES_END = _dt.date(2025, 12, 31)


def _body(fake, rng: np.random.Generator) -> str:
    kind = rng.choice(list(LENGTH_MIX), p=list(LENGTH_MIX.values()))
    if kind == "snippet":
        words = fake.words(int(rng.integers(1, 4)))
        return " ".join(words).capitalize() if rng.random() < 0.5 else " ".join(words)
    if kind == "sentence":
        return fake.sentence(nb_words=int(rng.integers(3, 13)))
    return fake.paragraph(nb_sentences=int(rng.integers(2, 6)))


def _decorate(text: str, fake, rng: np.random.Generator) -> str:
    """Local names, dates and numbers, and casing noise: what real short texts carry."""
    if rng.random() < 0.25:
        # Not fake.city: it_IT draws cities from a set, whose order changes with each process's
        # hash seed, so the data would differ from run to run (a test guards this).
        name = [fake.name, fake.street_name, fake.last_name][int(rng.integers(3))]()
        text = f"{name}: {text}" if rng.random() < 0.5 else f"{text} {name}"
    if rng.random() < 0.08:
        text = (f"{text} {fake.date(end_datetime=DATES_END)}" if rng.random() < 0.5
                else f"{rng.integers(1, 1000)} {text}")
    if rng.random() < 0.04:
        text = text.upper()
    return text


def demo_texts(per_class: int = 400, seed: int = 0) -> LabelledTexts:
    """``per_class`` unique texts per language; the same (per_class, seed) gives the same data
    (with the same Faker version)."""
    from faker import Faker  # a training-only dependency, imported when the demo is used

    seen: set[str] = set()
    texts, labels, names = [], [], []
    for index, (label, locale) in enumerate(sorted(LOCALES.items())):
        fake = Faker(locale)
        fake.seed_instance(seed * 1000 + index)
        rng = np.random.default_rng([seed, index])
        made, attempts = 0, 0
        while made < per_class:
            attempts += 1
            if attempts > 50 * per_class:
                raise DataError(f"could not make {per_class} unique {label} texts")
            text = _decorate(_body(fake, rng), fake, rng)
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
            names.append(f"demo/{label}/{made:04d}")
            made += 1
    return LabelledTexts.from_names(texts, labels, names, source="demo")


def write_csv(data: LabelledTexts, out, text_column: str = "text",
              label_column: str = "label") -> None:
    writer = csv.writer(out)
    writer.writerow([text_column, label_column])
    for text, label in zip(data.texts, data.labels):
        writer.writerow([text, data.classes[label]])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.text.demo",
                                description="Write the demo language-identification data as CSV.")
    p.add_argument("--out", default="-", help="file path, or - for stdout")
    p.add_argument("--per-class", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data = demo_texts(args.per_class, args.seed)
    if args.out == "-":
        write_csv(data, sys.stdout)
    else:
        with open(args.out, "w", newline="", encoding="utf-8") as out:
            write_csv(data, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
