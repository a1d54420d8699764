"""Strings -> ``input_ids`` and ``attention_mask``: the one text path for training and serving.

``normalize_text`` validates and normalises one string (pure Python, no tokenizer): the service
calls it per request item, so one bad text gets its own 4xx instead of failing a whole batch.
``TextPreprocessor`` adds the Hugging Face ``tokenizers`` file the spec names (the Rust library
alone: no ``transformers`` on the serving path), truncation to the spec's ``max_length`` and
padding to the batch's own longest sequence. The training dataset's collate function calls the
very same ``encode``.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import InputError
from .spec import SpecError, TextSpec

# C0/C1 controls that Python counts as whitespace (tab, line breaks, the separators \x1c-\x1f,
# NEL) become a space, so "a\tb" stays two words; every other C0/C1 control goes. Format
# characters (Cf: zero-width joiners inside emoji, RTL marks) are left to the tokenizer's own
# normaliser, which knows what its vocabulary expects.
_CONTROLS = (*range(0x00, 0x20), *range(0x7F, 0xA0))
_STRIP_TABLE = {cp: (" " if chr(cp).isspace() else None) for cp in _CONTROLS}

# Characters that carry no content: a text made only of these is empty.
_INVISIBLE_CATEGORIES = ("Cc", "Cf", "Zs", "Zl", "Zp")


@dataclass(frozen=True)
class TokenStats:
    """What tokenizing one text revealed; ``tokens`` and ``unknown`` count the text's own tokens
    (no special tokens) before truncation, so monitoring sees how long inputs really are."""

    tokens: int
    unknown: int
    truncated: bool


@dataclass(frozen=True)
class EncodedBatch:
    """int64 ``input_ids`` and ``attention_mask`` ``[N, L]`` (L = the longest row) and per-text
    statistics."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    stats: tuple[TokenStats, ...]


def decode_text(data: bytes) -> str:
    """UTF-8 bytes (an optional BOM is dropped) -> str; anything else is ``bad_encoding``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError("bad_encoding", f"the text is not valid UTF-8 (byte {exc.start}); "
                         "send UTF-8") from None


def normalize_text(text: str, spec: TextSpec) -> str:
    """Validate one text and apply the spec's character rules; raises ``InputError``.

    Refused: a non-string, more than ``max_chars`` characters, NUL (UTF-16 or binary read as
    text), lone surrogates (not encodable as UTF-8), nothing visible. Then controls are
    stripped, the text Unicode-normalised and lowercased.
    """
    if not isinstance(text, str):
        raise InputError("bad_field", f"a text must be a string, got {type(text).__name__}")
    if len(text) > spec.max_chars:
        raise InputError("text_too_long", f"the text has {len(text)} characters; the limit is "
                         f"{spec.max_chars}")
    if "\x00" in text:
        raise InputError("bad_encoding", "the text contains NUL characters; is it UTF-16 or "
                         "binary data? send UTF-8 text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("bad_encoding", "the text contains unpaired surrogate code points "
                         "(broken UTF-16); send valid Unicode") from None
    if spec.strip_control:
        text = text.translate(_STRIP_TABLE)
    text = unicodedata.normalize(spec.normalization, text)
    if spec.lowercase:
        # Normalise again: lowercasing can leave a sequence that is no longer in normal form
        # (and NFKC before lowercasing can produce capitals, e.g. U+210C -> "H").
        text = unicodedata.normalize(spec.normalization, text.lower())
    if not any(unicodedata.category(ch) not in _INVISIBLE_CATEGORIES for ch in text):
        raise InputError("empty_text", "the text is empty or holds only whitespace and "
                         "invisible characters")
    return text


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id rows -> int64 ``input_ids`` and ``attention_mask`` ``[N, L]``, L the longest row:
    ``pad_id`` (mask 0) after each row's end. The service's batcher pads with this too."""
    longest = max((len(r) for r in rows), default=0)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask


class TextPreprocessor:
    """A ``TextSpec`` plus its tokenizer: ``encode(texts) -> (input_ids, attention_mask)``.

    Built from the spec and the tokenizer JSON *text* (the artifact's ``tokenizer.json``); a
    tokenizer that does not match the spec's sha256, or lacks its pad/unknown tokens, is a
    ``SpecError``: the service stops at start-up rather than tokenize differently.
    """

    def __init__(self, spec: TextSpec, tokenizer_json: str) -> None:
        digest = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
        if spec.tokenizer_sha256 and digest != spec.tokenizer_sha256:
            raise SpecError(f"{spec.tokenizer} has sha256 {digest[:12]}..., the spec expects "
                            f"{spec.tokenizer_sha256[:12]}...; the artifact is inconsistent")
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # the Rust side raises plain Exception for a bad file
            raise SpecError(f"{spec.tokenizer} is not a valid tokenizers JSON file: {exc}") from exc
        # Padding and truncation settings inside the file are ignored: the spec decides both.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.spec = spec
        self.tokenizer_sha256 = digest
        self._tokenizer = tokenizer
        self.pad_id = self._token_id(spec.pad_token, "pad_token")
        self.unk_id = self._token_id(spec.unk_token, "unk_token")
        self._budget = spec.max_length - tokenizer.num_special_tokens_to_add(False)
        if self._budget < 1:
            raise SpecError(f"max_length {spec.max_length} leaves no room beside the tokenizer's "
                            "special tokens")

    def _token_id(self, token: str, name: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise SpecError(f"the tokenizer has no {name} {token!r}")
        return token_id

    @classmethod
    def from_folder(cls, folder: str | Path, spec: TextSpec) -> "TextPreprocessor":
        """Build from an artifact folder holding the spec's tokenizer file."""
        path = Path(folder) / spec.tokenizer
        if not path.is_file():
            raise SpecError(f"the spec names tokenizer {spec.tokenizer!r}, missing in {folder}")
        return cls(spec, path.read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def prepare(self, text: str) -> str:
        """Validate and normalise one text (``normalize_text`` with this spec)."""
        return normalize_text(text, self.spec)

    def tokenize(self, prepared: Sequence[str]) -> EncodedBatch:
        """Already-``prepare``d texts -> padded int64 arrays and per-text stats."""
        encodings = self._tokenizer.encode_batch(list(prepared), add_special_tokens=False)
        rows, stats = [], []
        for enc in encodings:
            ids = enc.ids
            truncated = len(ids) > self._budget
            stats.append(TokenStats(len(ids), ids.count(self.unk_id), truncated))
            if truncated:
                enc.truncate(self._budget)
            # The tokenizer's own template adds the special tokens ([CLS] ... [SEP] for BERT).
            rows.append(self._tokenizer.post_process(enc).ids)
        input_ids, attention_mask = pad_ids(rows, self.pad_id)
        return EncodedBatch(input_ids, attention_mask, tuple(stats))

    def encode_batch(self, texts: Sequence[str]) -> EncodedBatch:
        """Raw texts -> ``EncodedBatch``; the first invalid text raises ``InputError``."""
        return self.tokenize([self.prepare(t) for t in texts])

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw texts -> ``(input_ids, attention_mask)``, int64 ``[N, L]``."""
        batch = self.encode_batch(texts)
        return batch.input_ids, batch.attention_mask
