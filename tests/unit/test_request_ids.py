"""Request ids: the client's X-Request-ID when sane, else a UUIDv7 that sorts by time."""

from __future__ import annotations

import time
import uuid

from service.requests import new_request_id, request_id


def test_a_fresh_id_is_a_uuid7_in_32_hex_digits() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:50]:
        parsed = uuid.UUID(value)
        assert len(value) == 32 and parsed.hex == value
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    stamp_ms = int(ids[0][:12], 16)
    assert abs(stamp_ms - time.time() * 1000) < 60_000


def test_ids_made_later_sort_later() -> None:
    """Ids of different milliseconds sort by time: the log's request index grows at its right
    edge (inside one millisecond the order is random)."""
    first = new_request_id()
    time.sleep(0.003)
    second = new_request_id()
    assert first < second
    batches = []
    for _ in range(5):
        batches.append(new_request_id())
        time.sleep(0.002)
    assert batches == sorted(batches)


def test_the_clients_id_is_kept_when_sane() -> None:
    assert request_id({"x-request-id": "order-42:retry.1"}) == "order-42:retry.1"
    for bad in ("", "has space", "x" * 129, "semi;colon"):
        fresh = request_id({"x-request-id": bad})
        assert fresh != bad and uuid.UUID(fresh).version == 7
