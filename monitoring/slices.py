"""Slices: the metadata a request may carry (tags) and the ones derived from its input features.

Tags are bounded twice, because every distinct value becomes a row of every slice report and a
label-like dimension downstream:
  * keys: only those the settings allow (``SliceRules``); an unknown key is the client's
    mistake and ``SliceRules.apply`` says so (the service answers 400);
  * values: a key may list its values (``device=ios|android|web``): anything else folds into
    ``other``, the same way in every worker because the list comes from the settings. A key
    without a list accepts free values, capped at ``max_values`` distinct values per key for the
    whole log: the prediction log admits the first ``max_values`` values it commits and folds
    later ones into ``other`` inside the same transaction (``store.PredictionLog``), so all
    workers, which share the file, agree on which values those are. "First seen" kept per
    process would differ between workers and between restarts.

Derived slices are computed from the logged features when a report runs, not stored, so the
bucket edges can change without rewriting the log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

OTHER = "other"
MISSING = "(none)"
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# Bucket edges: (upper bound exclusive, name); the last name takes everything above.
SIZE_BUCKETS = ((64, "tiny"), (256, "small"), (1024, "medium"), (4096, "large"))
SIZE_TOP = "huge"
BRIGHTNESS_BUCKETS = ((0.2, "dark"), (0.4, "dim"), (0.6, "mid"), (0.8, "bright"))
BRIGHTNESS_TOP = "very_bright"
TEXT_LENGTH_BUCKETS = ((16, "short"), (64, "medium"), (256, "long"))
TEXT_LENGTH_TOP = "very_long"


class SliceError(ValueError):
    """Slice metadata the settings do not allow; the message names what is accepted."""


@dataclass(frozen=True)
class SliceRules:
    """Allowed slice keys; each maps to its allowed values, or None for free (capped) values."""

    keys: Mapping[str, frozenset[str] | None] = field(default_factory=dict)
    max_values: int = 20
    max_length: int = 64

    @classmethod
    def parse(cls, spec: str, max_values: int = 20) -> "SliceRules":
        """``"device=ios|android|web;region=eu|us;customer"`` (the settings' format)."""
        keys: dict[str, frozenset[str] | None] = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            key, _, values = part.partition("=")
            key = key.strip()
            if not _KEY.match(key):
                raise SliceError(f"slice key {key!r}: use 1-32 of a-z, 0-9, _, starting with "
                                 "a letter")
            allowed = frozenset(v.strip() for v in values.split("|") if v.strip())
            if OTHER in allowed:
                raise SliceError(f"slice key {key!r}: {OTHER!r} is reserved for folded values")
            keys[key] = allowed or None
        if max_values < 1:
            raise SliceError("max_values must be >= 1")
        return cls(keys, max_values)

    def apply(self, tags: Mapping[str, object]) -> dict[str, str]:
        """Validated, folded tags of one request; SliceError for a key or value not accepted."""
        unknown = sorted(set(tags) - set(self.keys))
        if unknown:
            allowed = ", ".join(sorted(self.keys)) or "none"
            raise SliceError(f"unknown slice key(s) {unknown}; allowed: {allowed}")
        out = {}
        for key, value in tags.items():
            if not isinstance(value, str) or not value or len(value) > self.max_length:
                raise SliceError(f"slice {key!r} must be a non-empty string of at most "
                                 f"{self.max_length} characters")
            allowed = self.keys[key]
            out[key] = value if allowed is None or value in allowed else OTHER
        return out


def cap_values(slices: Mapping[str, str], admitted: Mapping[str, set[str]], max_values: int
               ) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Fold values beyond the first ``max_values`` per key into ``other``.

    ``admitted`` is what the log has admitted so far (read inside the write transaction). Returns
    the folded slices and the (key, value) pairs newly admitted, which the caller must record
    in the same transaction; ``admitted`` is updated in place.
    """
    out, new = {}, []
    for key, value in slices.items():
        seen = admitted.setdefault(key, set())
        if value == OTHER or value in seen:
            out[key] = value
        elif len(seen) < max_values:
            seen.add(value)
            new.append((key, value))
            out[key] = value
        else:
            out[key] = OTHER
    return out, new


def _bucket(value: float, edges: tuple[tuple[float, str], ...], top: str) -> str:
    for bound, name in edges:
        if value < bound:
            return name
    return top


def size_bucket(width: float, height: float) -> str:
    """Image size by its longer side (px): tiny < 64 <= small < 256 <= medium < 1024 <= large
    < 4096 <= huge."""
    return _bucket(max(width, height), SIZE_BUCKETS, SIZE_TOP)


def brightness_bucket(brightness: float) -> str:
    """Mean grey level in [0, 1], in five equal bands from dark to very_bright."""
    return _bucket(brightness, BRIGHTNESS_BUCKETS, BRIGHTNESS_TOP)


def text_length_bucket(n_chars: float) -> str:
    """Text length in characters: short < 16 <= medium < 64 <= long < 256 <= very_long."""
    return _bucket(n_chars, TEXT_LENGTH_BUCKETS, TEXT_LENGTH_TOP)


def derived_slices(features: Mapping[str, float]) -> dict[str, str]:
    """The slices an input's features imply (image: size, brightness; text: length in chars)."""
    out = {}
    if "width" in features and "height" in features:
        out["size"] = size_bucket(features["width"], features["height"])
    if "brightness" in features:
        out["brightness"] = brightness_bucket(features["brightness"])
    if "chars" in features:  # preprocessing.TEXT_FEATURES
        out["length"] = text_length_bucket(features["chars"])
    return out
