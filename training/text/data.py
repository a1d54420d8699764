"""Labelled texts from a user's CSV, TSV or JSONL file, a deterministic split, and the torch
Dataset whose batches come from ``preprocessing.text`` (the service's own tokenization).

Training starts from the raw strings, the same thing the service receives: the dataset's
``collate`` calls ``TextPreprocessor.encode`` on each batch, so ids and masks are padded to the
batch's longest text exactly as they are at serving time. Nothing here tokenizes on its own.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from preprocessing import InputError, TextPreprocessor, TextSpec, normalize_text

from ..data import DataError
from ..robustness import TEXT_VARIATIONS

__all__ = ["DataError", "LabelledTexts", "TextDataset", "TextSplits", "read_texts"]


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels indexing ``classes``; ``names`` say where each came from
    (``file:line``), for error messages."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    names: tuple[str, ...]
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "LabelledTexts":
        idx = [int(i) for i in indices]
        return LabelledTexts(tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx),
                             tuple(self.names[i] for i in idx), self.classes, self.source)

    @classmethod
    def from_names(cls, texts: Sequence[str], label_names: Sequence[str], names: Sequence[str],
                   source: str) -> "LabelledTexts":
        """Texts with string labels; classes are the sorted distinct labels."""
        classes = tuple(sorted(set(label_names)))
        index = {c: i for i, c in enumerate(classes)}
        return cls(tuple(texts), tuple(index[c] for c in label_names), tuple(names), classes,
                   source)


@dataclass(frozen=True)
class TextSplits:
    train: LabelledTexts
    val: LabelledTexts
    test: LabelledTexts


def read_texts(path: str | Path, text_column: str = "text",
               label_column: str = "label") -> LabelledTexts:
    """A ``.csv``, ``.tsv`` or ``.jsonl`` file (UTF-8) -> labelled texts. Every row needs a
    non-empty text and label; a bad row is named by its line, not skipped."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise DataError(f"{path}: expected a .csv, .tsv or .jsonl file")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 (byte {exc.start}); re-save it as UTF-8") from None
    if not content.strip():
        raise DataError(f"{path} is empty")
    rows = (_jsonl_rows(content, path) if suffix == ".jsonl"
            else _delimited_rows(content, path, "\t" if suffix == ".tsv" else ","))
    texts, labels, names = [], [], []
    for line, row in rows:
        text, label = _pick(row, text_column, label_column, path, line)
        texts.append(text)
        labels.append(label)
        names.append(f"{path.name}:{line}")
    if not texts:
        raise DataError(f"{path} has a header but no rows")
    return LabelledTexts.from_names(texts, labels, names, str(path))


def _delimited_rows(content: str, path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(content.splitlines(keepends=True), delimiter=delimiter)
    try:
        for row in reader:
            if None in row:  # more fields than the header names: a delimiter inside a text
                raise DataError(f"{path}:{reader.line_num}: more fields than the header has; "
                                "quote texts that contain the delimiter")
            yield reader.line_num, row
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: {exc}") from None


def _jsonl_rows(content: str, path: Path) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: each line must be a JSON object")
        yield line, row


def _pick(row: dict, text_column: str, label_column: str, path: Path,
          line: int) -> tuple[str, str]:
    missing = [c for c in (text_column, label_column) if c not in row]
    if missing:
        raise DataError(f"{path}:{line}: no column {missing} (columns: {sorted(map(str, row))}); "
                        "set --text-column/--label-column")
    text, label = row[text_column], row[label_column]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}:{line}: the text is empty or not a string")
    if isinstance(label, (dict, list)) or label is None or not str(label).strip():
        raise DataError(f"{path}:{line}: the label is empty or not a plain value")
    return text, str(label).strip()


def check_texts(data: LabelledTexts, spec: TextSpec) -> None:
    """Every text must pass the service's validation; the first that does not is named."""
    for text, name in zip(data.texts, data.names):
        try:
            normalize_text(text, spec)
        except InputError as exc:
            raise DataError(f"{name}: {exc.message}") from None


def stratified_split(data: LabelledTexts, seed: int, val_fraction: float = 0.15,
                     test_fraction: float = 0.15) -> TextSplits:
    """Deterministic stratified train/val/test split: the same seed gives the same split."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(np.asarray(data.labels), minlength=len(data.classes))
    if len(data.classes) < 2:
        raise DataError(f"need at least 2 labels, found {list(data.classes)}")
    if counts.min() < 3:
        small = [data.classes[i] for i in np.flatnonzero(counts < 3)]
        raise DataError(f"every label needs at least 3 texts (train/val/test); too few: {small}")
    idx, labels = np.arange(len(data)), np.asarray(data.labels)
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels,
                                      random_state=seed)
        train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction),
                                      stratify=labels[rest], random_state=seed)
    except ValueError as exc:
        raise DataError(f"{len(data)} texts in {len(data.classes)} classes are too few for a "
                        f"stratified {val_fraction:g}/{test_fraction:g} val/test split: {exc}"
                        ) from exc
    return TextSplits(data.subset(train), data.subset(val), data.subset(test))


def stratified_subset(data: LabelledTexts, n: int, seed: int) -> LabelledTexts:
    """A stratified sample of ``n`` texts (quick runs and tests)."""
    if n >= len(data):
        return data
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(data)), train_size=n,
                               stratify=np.asarray(data.labels), random_state=seed)
    return data.subset(np.sort(keep))


def data_hash(data: LabelledTexts) -> str:
    """sha256 over the sorted (label, sha256(text)) pairs: independent of row order."""
    pairs = sorted(f"{data.classes[label]}\t{hashlib.sha256(text.encode()).hexdigest()}"
                   for text, label in zip(data.texts, data.labels))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """``losses.balanced_class_weights`` (n / (k * count_c) per class), a class without
    training texts being a ``DataError``."""
    from ..losses import balanced_class_weights as balanced

    try:
        return balanced(labels, num_classes)
    except ValueError:
        raise DataError("a class has no training texts; cannot weight it") from None


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of texts of similar length (cf. transformers' ``group_by_length``).

    Each epoch: a random permutation, cut into windows of ``window`` batches; each window is
    sorted by length and cut into batches; the batches are shuffled. Padding to the batch's
    longest text then wastes little, while the order stays random and seeded.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                 window: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.window = window * batch_size

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(perm), self.window):
            part = sorted(perm[start:start + self.window], key=self.lengths.__getitem__)
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        for k in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[k]

    def __len__(self) -> int:
        n, w, b = len(self.lengths), self.window, self.batch_size
        return sum(-(-min(w, n - s) // b) for s in range(0, n, w))


class TextDataset(Dataset):
    """``(text, label)`` items; ``collate`` turns a batch into ``((input_ids, attention_mask),
    labels)`` with ``TextPreprocessor.encode``, padded to the batch's longest text, and
    ``batch_sampler`` groups texts of similar length when training.

    ``augment`` (training split only): the share of items replaced by a random variation of
    ``training.robustness.TEXT_VARIATIONS``, seeded by (seed, epoch, index) like the images'."""

    def __init__(self, data: LabelledTexts, pre: TextPreprocessor, augment: float = 0.0,
                 seed: int = 0) -> None:
        self.texts = data.texts
        self.labels = data.labels
        self.pre = pre
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        text = self.texts[index]
        if self.augment > 0:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if rng.random() < self.augment:
                names = list(TEXT_VARIATIONS)
                text = TEXT_VARIATIONS[names[int(rng.integers(len(names)))]](text, rng)
        return text, self.labels[index]

    def batch_sampler(self, batch_size: int, generator: torch.Generator) -> LengthGroupedBatches:
        return LengthGroupedBatches([len(t) for t in self.texts], batch_size, generator)

    def collate(self, batch: Sequence[tuple[str, int]]
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        ids, mask = self.pre.encode([text for text, _ in batch])
        labels = torch.tensor([label for _, label in batch], dtype=torch.long)
        return (torch.from_numpy(ids), torch.from_numpy(mask)), labels
