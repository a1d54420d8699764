"""Time arguments of the monitoring and retraining commands: ISO 8601, ``now`` or ``24h``."""

from __future__ import annotations

import argparse
import re
import time
from datetime import datetime, timezone

_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """ISO 8601 (naive = UTC), ``now``, or a duration before now (``90m``, ``24h``, ``7d``;
    ``--since=-24h`` works too: argparse takes ``--since -24h`` for an option)."""
    now = time.time() if now is None else now
    if text == "now":
        return now
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ISO 8601, 'now' or like 24h") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()
