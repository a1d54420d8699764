"""The server's log lines as JSON (``CLF_LOG_FORMAT=json``): one object per line, for the log
collectors production runs (Loki, Elasticsearch, Cloud Logging), which split text on newlines
and so cut a traceback into as many records as it has lines.

Every handler BentoML's logging configuration installed (``bentoml._internal.log``: one
``StreamHandler`` to stdout, behind the root logger and ``bentoml``, ``uvicorn.error`` and
``circus``) gets ``JsonFormatter``; which records reach them and at which level is unchanged.
A line holds ``time`` (UTC, ISO 8601 to the millisecond), ``level``, ``logger``, ``component``
(BentoML's, e.g. ``entry_service:clfserve:1`` for worker 1), ``pid``, ``message``,
``request_id`` where the record names one (this service's messages carry it as
``[request_id=...]``; BentoML's trace context is used otherwise) and ``exception`` (the
traceback, one string) where the record has one. ``text`` (the default) leaves BentoML's format
as it is.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re

FORMATS = ("text", "json")
_REQUEST_ID = re.compile(r"\[request_id=([A-Za-z0-9._:-]{1,128})\]")
# the loggers BentoML's server logging configuration gives handlers (bentoml._internal.log)
CONFIGURED = ("", "bentoml", "uvicorn.error", "uvicorn.access", "circus")


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
                      .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "component": str(getattr(record, "component", "")).strip("[]"),
            "pid": record.process,
            "message": message,
        }
        found = _REQUEST_ID.search(message)
        request_id = found.group(1) if found else getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = str(request_id)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def install(fmt: str) -> int:
    """Give every handler of the configured loggers ``JsonFormatter`` when ``fmt`` is "json";
    returns how many handlers it changed (0 for "text")."""
    if fmt != "json":
        return 0
    formatter = JsonFormatter()
    changed = 0
    seen: set[int] = set()
    for name in CONFIGURED:
        for handler in logging.getLogger(name).handlers:
            if id(handler) not in seen:
                seen.add(id(handler))
                handler.setFormatter(formatter)
                changed += 1
    return changed
