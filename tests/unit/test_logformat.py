"""``CLF_LOG_FORMAT=json`` (service/logformat.py): a record is one line of JSON, its traceback
one string in it, the request id of ``[request_id=...]`` a field of its own."""

from __future__ import annotations

import io
import json
import logging

from service.logformat import JsonFormatter, install


def test_a_failure_with_its_traceback_and_request_id_is_one_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.logformat")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            {}["missing"]
        except KeyError:
            logger.exception("unexpected failure [request_id=%s]", "01abc-def")
        logger.warning('a "quoted" message\nover two lines: café')
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the traceback's and the message's newlines stay inside the JSON
    failure, warning = map(json.loads, lines)
    assert failure["level"] == "ERROR" and failure["logger"] == "tests.logformat"
    assert failure["request_id"] == "01abc-def"
    assert failure["message"] == "unexpected failure [request_id=01abc-def]"
    assert "Traceback" in failure["exception"] and "KeyError: 'missing'" in failure["exception"]
    assert failure["time"].endswith("+00:00") and isinstance(failure["pid"], int)
    assert warning["message"] == 'a "quoted" message\nover two lines: café'
    assert "request_id" not in warning and "exception" not in warning


def test_install_changes_the_configured_handlers_only_for_json():
    from service.logformat import CONFIGURED

    handler = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(handler)
    before = {h: h.formatter for name in CONFIGURED for h in logging.getLogger(name).handlers}
    try:
        assert install("text") == 0 and not isinstance(handler.formatter, JsonFormatter)
        assert install("json") == len(before) and isinstance(handler.formatter, JsonFormatter)
    finally:
        root.removeHandler(handler)
        for h, formatter in before.items():  # pytest's own handlers among them
            h.setFormatter(formatter)
