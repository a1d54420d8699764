"""Request bodies under ``Content-Encoding`` (service/requests.py ``inflate``): gzip and deflate
are inflated within the body limit on every route (tritonclient's
``request_compression_algorithm`` sends them), anything else is 415 with ``Accept-Encoding``,
and a body that is not what it claims is 400, never a misleading "not an image"."""

from __future__ import annotations

import gzip
import zlib

import pytest

from service.app import STATUS
from service.requests import RequestError, inflate

RAW = b'{"texts": ["hello there", "bonjour tout le monde"]}' * 4


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("encoding, body", [
    ("gzip", gzip.compress(RAW)),
    ("x-gzip", gzip.compress(RAW)),
    ("GZip", gzip.compress(RAW)),
    ("deflate", zlib.compress(RAW)),  # zlib's format: RFC 9110's deflate, tritonclient's
    ("deflate", raw_deflate(RAW)),  # a raw stream, what some clients send
    ("identity", RAW),
    ("", RAW),
    ("gzip, identity", gzip.compress(RAW)),
    ("deflate, gzip", gzip.compress(zlib.compress(RAW))),  # applied in order, undone in reverse
    ("gzip", gzip.compress(RAW[:50]) + gzip.compress(RAW[50:])),  # two gzip members
], ids=["gzip", "x-gzip", "case", "deflate", "raw-deflate", "identity", "empty", "with-identity",
        "stacked", "two-members"])
def test_a_compressed_body_inflates_to_what_was_sent(encoding, body):
    assert inflate(body, encoding, len(RAW)) == RAW


def test_a_body_that_inflates_past_the_limit_is_refused_without_inflating_it_whole():
    bomb = gzip.compress(b"\0" * 50_000_000)  # 49 KB on the wire
    with pytest.raises(RequestError) as err:
        inflate(bomb, "gzip", 1_000_000)
    assert err.value.reason == "too_large" and STATUS["too_large"] == 413
    assert "inflates to over the limit of 1000000 bytes" in err.value.message
    with pytest.raises(RequestError, match="over the limit"):  # one byte over
        inflate(gzip.compress(RAW), "gzip", len(RAW) - 1)
    with pytest.raises(RequestError, match="over the limit"):  # over it across members
        inflate(gzip.compress(RAW) + gzip.compress(RAW), "gzip", len(RAW) + 10)


def test_an_unsupported_coding_is_415_naming_what_is_accepted():
    with pytest.raises(RequestError) as err:
        inflate(RAW, "br", 1000)
    assert err.value.reason == "unsupported_encoding" and STATUS["unsupported_encoding"] == 415
    assert "'br' is not supported" in err.value.message
    assert err.value.headers == [(b"accept-encoding", b"gzip, deflate")]
    with pytest.raises(RequestError, match="'zstd'"):
        inflate(gzip.compress(RAW), "zstd, gzip", 1000)


@pytest.mark.parametrize("encoding, body, words", [
    ("gzip", RAW, "not valid gzip data"),  # sent as it is, labelled gzip
    ("deflate", RAW, "not valid deflate data"),
    ("gzip", gzip.compress(RAW)[:-10], "cut short"),
    ("deflate", zlib.compress(RAW)[:20], "cut short"),
    ("gzip", gzip.compress(RAW) + b"junk", "not valid gzip data"),
    ("deflate", zlib.compress(RAW) + b"junk", "4 bytes after the end of the deflate stream"),
], ids=["not-gzip", "not-deflate", "gzip-cut", "deflate-cut", "gzip-trailing", "deflate-trailing"])
def test_a_body_that_is_not_what_its_coding_says_is_a_bad_request(encoding, body, words):
    with pytest.raises(RequestError) as err:
        inflate(body, encoding, 10_000)
    assert err.value.reason == "bad_request" and words in err.value.message


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", "café déjà vu".encode()),
    ("text/plain; charset=utf-8", "café déjà vu".encode()),
    ("text/plain; charset=US-ASCII", "café déjà vu".encode()),  # ASCII is read as UTF-8
    ("text/plain; charset=ISO-8859-1", "café déjà vu".encode("latin-1")),
    ('text/plain;charset="windows-1252"', "café déjà vu".encode("cp1252")),
    ("text/plain; format=flowed; charset=utf-16", "café déjà vu".encode("utf-16")),
], ids=["none", "utf-8", "ascii", "latin-1", "quoted", "utf-16"])
def test_a_plain_text_is_read_in_the_charset_its_content_type_names(content_type, body):
    from service import requests

    assert requests.texts(body, content_type, 8) == ["café déjà vu"]


def test_an_unknown_charset_is_415_and_bytes_outside_the_named_one_are_bad_encoding():
    from preprocessing import InputError
    from service import requests

    for charset in ("klingon", "zlib", "rot13"):  # not a text encoding: not taken for one
        with pytest.raises(RequestError) as err:
            requests.texts(b"hello", f"text/plain; charset={charset}", 8)
        assert err.value.reason == "unsupported_encoding" and repr(charset) in err.value.message
    with pytest.raises(InputError) as bad:
        requests.texts(b"\xff\xfe\x00", "text/plain; charset=utf-16", 8)
    assert bad.value.reason == "bad_encoding" and "not valid utf-16 (byte 2)" in bad.value.message
    with pytest.raises(InputError, match="not valid UTF-8"):  # no charset: UTF-8, as before
        requests.texts("café".encode("latin-1"), "text/plain", 8)
