"""Labelled images as encoded bytes, a deterministic split, and the torch Dataset over them.

Training starts from image *files' bytes*, the same thing the service receives, and turns them
into tensors with ``preprocessing``'s ``decode_image``, ``resize_image`` and ``image_to_array``:
the very functions the service calls. Nothing here resizes or normalises on its own.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from preprocessing import ImageSpec, InputError, decode_image, image_to_array, resize_image

from .augment import Augment
from .config import DIGITS

# What a class folder may hold; anything else (README, .DS_Store, thumbs.db) is ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """Training data that cannot be used as given; the message says what to fix."""


@dataclass(frozen=True)
class LabelledImages:
    """Encoded images with integer labels indexing ``classes``; ``names`` identify each item."""

    blobs: tuple[bytes, ...]
    labels: tuple[int, ...]
    names: tuple[str, ...]
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.blobs)

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        idx = [int(i) for i in indices]
        return LabelledImages(
            blobs=tuple(self.blobs[i] for i in idx),
            labels=tuple(self.labels[i] for i in idx),
            names=tuple(self.names[i] for i in idx),
            classes=self.classes,
            source=self.source,
        )


@dataclass(frozen=True)
class Splits:
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages


def digits_images(size: int = 32) -> LabelledImages:
    """scikit-learn's 1,797 real 8x8 digits as PNG files' bytes, upscaled to ``size`` px.

    Values 0..16 become 0..255 (white ink on black), upscaled with bicubic so strokes look like
    a small scanned digit rather than 8x8 blocks.
    """
    from sklearn.datasets import load_digits  # heavy import; only when the digits are used

    bunch = load_digits()
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    blobs = tuple(_png_bytes(Image.fromarray(p, mode="L").resize((size, size), Image.BICUBIC))
                  for p in pixels)
    labels = tuple(int(t) for t in bunch.target)
    names = tuple(f"digits/{i:04d}" for i in range(len(blobs)))
    return LabelledImages(blobs, labels, names, tuple(str(d) for d in range(10)), DIGITS)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def folder_images(root: str | Path) -> LabelledImages:
    """A folder with one sub-folder per class (``root/<class>/<file>``); classes sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files_per_class = {d.name: _image_files(d) for d in class_dirs}
    classes = tuple(name for name, files in files_per_class.items() if files)
    if len(classes) < 2:
        raise DataError(
            f"data folder {root} needs at least 2 class sub-folders holding images "
            f"({', '.join(IMAGE_SUFFIXES)}); found {len(classes)}: {list(classes)}"
        )
    blobs, labels, names = [], [], []
    for label, name in enumerate(classes):
        for path in files_per_class[name]:
            blobs.append(path.read_bytes())
            labels.append(label)
            names.append(str(path.relative_to(root)))
    return LabelledImages(tuple(blobs), tuple(labels), tuple(names), classes, str(root))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def load_images(source: str, digits_size: int = 32) -> LabelledImages:
    """``"digits"`` or a folder path -> labelled images."""
    return digits_images(digits_size) if source == DIGITS else folder_images(source)


def stratified_split(
    data: LabelledImages, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> Splits:
    """Deterministic stratified train/val/test split: the same seed gives the same split."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(np.asarray(data.labels), minlength=len(data.classes))
    if counts.min() < 3:
        small = [data.classes[i] for i in np.flatnonzero(counts < 3)]
        raise DataError(f"every class needs at least 3 images (train/val/test); too few: {small}")
    idx = np.arange(len(data))
    labels = np.asarray(data.labels)
    val_share = val_fraction / (1.0 - test_fraction)
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels,
                                      random_state=seed)
        train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest],
                                      random_state=seed)
    except ValueError as exc:  # sklearn's message names sizes, ours says what to change
        raise DataError(f"{len(data)} images in {len(data.classes)} classes are too few for a "
                        f"stratified {val_fraction:g}/{test_fraction:g} val/test split: {exc}; "
                        "add images or raise --limit") from exc
    return Splits(data.subset(train), data.subset(val), data.subset(test))


def stratified_subset(data: LabelledImages, n: int, seed: int) -> LabelledImages:
    """A stratified sample of ``n`` images (quick runs and tests)."""
    if n >= len(data):
        return data
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(
        np.arange(len(data)), train_size=n, stratify=np.asarray(data.labels), random_state=seed
    )
    return data.subset(np.sort(keep))


def data_hash(data: LabelledImages) -> str:
    """sha256 over the sorted (class name, sha256(bytes)) pairs: independent of file order."""
    pairs = sorted(
        f"{data.classes[label]}\t{hashlib.sha256(blob).hexdigest()}"
        for blob, label in zip(data.blobs, data.labels)
    )
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def decode_for_model(data: LabelledImages, spec: ImageSpec) -> list[Image.Image]:
    """Decode every image with the service's decoder and resize it with the service's resize
    rule; a bad file is named, not skipped.

    Keeping images at the model's size (not as decoded) bounds memory for folders of large
    photos, and ``image_to_array`` leaves an image already at that size untouched, so the
    tensors are bit-identical to the service's.
    """
    images = []
    for blob, name in zip(data.blobs, data.names):
        try:
            images.append(resize_image(decode_image(blob, spec), spec))
        except InputError as exc:
            raise DataError(f"{data.source}: cannot use {name}: {exc.message}") from exc
    return images


class ImageDataset(Dataset):
    """(tensor, label) pairs: decode and resize once, then per item augment (train only) and
    ``image_to_array``.

    The augmentation's randomness is seeded by (seed, epoch, index), so an item looks the same
    whatever order the loader asks for it in; call ``set_epoch`` to get fresh variations.
    """

    def __init__(
        self,
        data: LabelledImages,
        spec: ImageSpec,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.images = decode_for_model(data, spec)
        self.labels = torch.tensor(data.labels, dtype=torch.long)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[index]
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            img = self.augment(img, rng, self.spec)
        return torch.from_numpy(image_to_array(img, self.spec)), self.labels[index]
