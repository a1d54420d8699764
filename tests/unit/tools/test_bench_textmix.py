"""The bench's text load: a seeded short/long mix, one JSON body per line, and its statistics."""

from __future__ import annotations

import json

import pytest

from service.requests import texts as request_texts
from tools.bench.bodies import ROTATE_LUA, TEXT_ROUTE
from tools.bench.textmix import (LONG, SHORT, MixItem, MixSpec, build_mix, describe_mix, mix_stats,
                                 read_labelled_csv, rotation_lines, write_text_body)

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)

TEXTS = ["hola", "buenos días", "la casa es muy grande y tiene un jardín bonito",
         "el perro corre por el parque todos los días sin parar nunca", "bonjour",
         "le chat dort sur le canapé toute la journée sans bouger du tout", "merci beaucoup",
         "la maison est grande et le jardin est très beau en été comme en hiver"]
LABELS = ["es", "es", "es", "es", "fr", "fr", "fr", "fr"]


def test_mix_has_the_asked_share_of_short_texts_and_is_seeded() -> None:
    spec = MixSpec(bodies=50, short_share=0.8, short_max_words=3, long_chars=(100, 150), seed=1)
    items = build_mix(TEXTS, LABELS, spec)
    assert len(items) == 50
    assert sum(i.kind == SHORT for i in items) == 40
    assert items == build_mix(TEXTS, LABELS, spec)
    assert items != build_mix(TEXTS, LABELS, MixSpec(**{**spec.to_dict(), "seed": 2}))
    kinds = [i.kind for i in items]
    assert kinds != sorted(kinds)  # interleaved, not 40 short then 10 long


def test_short_texts_are_demo_texts_as_they_are() -> None:
    items = build_mix(TEXTS, LABELS, MixSpec(bodies=20, short_max_words=3, long_chars=(100, 150)))
    for item in items:
        if item.kind == SHORT:
            assert item.text in TEXTS and len(item.text.split()) <= 3
            assert LABELS[TEXTS.index(item.text)] == item.label


def test_long_texts_join_one_language_to_the_drawn_length() -> None:
    spec = MixSpec(bodies=30, short_share=0.0, short_max_words=3, long_chars=(100, 150))
    long_pieces = {t: lab for t, lab in zip(TEXTS, LABELS) if len(t.split()) > 3}
    for item in build_mix(TEXTS, LABELS, spec):
        assert item.kind == LONG and len(item.text) >= 100
        # every piece of a long text comes from its own language's longer texts
        rest = item.text
        while rest:
            piece = next(p for p in long_pieces if rest.startswith(p))
            assert long_pieces[piece] == item.label
            rest = rest[len(piece):].lstrip(" ")


def test_mix_refuses_what_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="short"):
        build_mix(["one two three four"], ["en"], MixSpec(bodies=4, short_max_words=2))
    with pytest.raises(ValueError, match="long"):
        build_mix(["one"], ["en"], MixSpec(bodies=4, short_share=0.5, short_max_words=2))
    with pytest.raises(ValueError):
        build_mix(TEXTS, LABELS, MixSpec(short_share=1.5))


def test_rotation_lines_are_one_json_body_each_that_the_service_accepts() -> None:
    texts = ["plain", 'quote " and back\\slash', "line\nbreak\ttab", "кириллица ünïcödé"]
    data = rotation_lines(texts)
    lines = data.splitlines()
    assert data.endswith(b"\n") and len(lines) == len(texts)
    for line, text in zip(lines, texts):
        assert json.loads(line) == {"text": text}
        assert request_texts(line, "application/json", max_texts=64) == [text]
    assert "кириллица".encode() in data  # UTF-8 as clients send it, not \\u escapes


def test_rotation_lines_never_put_a_raw_newline_inside_a_body() -> None:
    weird = "a\r\nb\u2028c\x00d"
    lines = rotation_lines([weird, "x"]).split(b"\n")
    assert json.loads(lines[0])["text"] == weird and lines[1] == b'{"text":"x"}'


def test_mix_stats_on_a_hand_made_mix() -> None:
    items = [MixItem("ab", "en", SHORT), MixItem("abcd", "en", SHORT),
             MixItem("x" * 300, "en", LONG), MixItem("y" * 500, "en", LONG)]
    stats = mix_stats(items, tokens=[3, 5, 100, 128], truncated=[False, False, False, True],
                      max_length=128)
    assert stats["bodies"] == 4 and stats["max_length"] == 128
    assert stats[SHORT] == {"share": 0.5, "mean_chars": 3.0, "mean_tokens": 4.0, "max_tokens": 5,
                            "truncated_share": 0.0}
    assert stats[LONG]["mean_chars"] == 400.0 and stats[LONG]["truncated_share"] == 0.5
    assert stats["all"]["mean_tokens"] == pytest.approx(59.0)
    assert stats["all"]["share"] == 1.0
    assert stats["mean_body_bytes"] == pytest.approx(len('{"text":""}') + 201.5)
    text = describe_mix(stats, MixSpec(short_max_words=6, long_chars=(200, 600)))
    assert text.startswith("4 texts, 50% short (<= 6 words) (mean 3 chars, 4.0 tokens), ")
    assert "50% long (sentences joined to 200-600 chars, 50% cut at 128 tokens)" in text


def test_mix_stats_of_an_all_short_mix_says_zero_long() -> None:
    items = [MixItem("ab", "en", SHORT)]
    stats = mix_stats(items, [3], [False], 128)
    assert stats[LONG]["share"] == 0.0 and stats[LONG]["mean_chars"] is None
    assert "0% long" in describe_mix(stats, MixSpec())


def test_write_text_body_is_for_the_rotating_script_on_the_text_route(tmp_path) -> None:
    items = [MixItem("a", "en", SHORT), MixItem("b c", "en", SHORT)]
    body = write_text_body(tmp_path, "m", items, "two texts")
    assert body.path.read_bytes() == b'{"text":"a"}\n{"text":"b c"}\n'
    assert (body.route, body.script, body.texts) == (TEXT_ROUTE, ROTATE_LUA, ("a", "b c"))
    assert body.headers == ["Content-Type: application/json"]


def test_read_labelled_csv(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"a, b",en\nc,fr\n', encoding="utf-8")
    assert read_labelled_csv(path) == (["a, b", "c"], ["en", "fr"])
