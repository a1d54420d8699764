from __future__ import annotations

import httpx
import pytest

from service.requests import RequestError as InputError
from service.requests import boundary_of, parse_multipart


def _encode(files) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x", files=files)
    return request.read(), request.headers["content-type"]


def test_parses_what_a_real_client_sends():
    body, ctype = _encode([("image", ("a.png", b"\x00\r\n--not-a-boundary\r\n", "image/png")),
                           ("image", ("b.png", b"second", "image/png"))])
    parts = parse_multipart(body, boundary_of(ctype), max_parts=10)
    assert parts == [("image", "a.png", b"\x00\r\n--not-a-boundary\r\n"), ("image", "b.png", b"second")]


def test_curl_style_quoted_boundary():
    assert boundary_of('multipart/form-data; boundary="abc def"') == b"abc def"
    with pytest.raises(InputError, match="boundary"):
        boundary_of("multipart/form-data")


@pytest.mark.parametrize("mutate", [
    lambda b: b.replace(b"\r\n\r\n", b"\r\n", 1),     # headers never end
    lambda b: b[: len(b) // 2],                        # cut before the closing boundary
    lambda b: b"no boundary here at all",
])
def test_malformed_bodies_are_bad_requests(mutate):
    body, ctype = _encode([("image", ("a.png", b"data" * 10, "image/png"))])
    with pytest.raises(InputError) as info:
        parse_multipart(mutate(body), boundary_of(ctype), max_parts=10)
    assert info.value.reason == "bad_request"


def test_part_count_is_bounded_while_parsing():
    body, ctype = _encode([("image", (f"{i}.png", b"x", "image/png")) for i in range(5)])
    with pytest.raises(InputError) as info:
        parse_multipart(body, boundary_of(ctype), max_parts=4)
    assert info.value.reason == "too_many_items"
