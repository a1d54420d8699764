"""The load generator: ``wrk`` closed loop, pinned to one CPU, and the parsing of its report.

Pinned with ``taskset -c 1 wrk -t1 -c<c>`` exactly as the peers' bench does: wrk (~0.03 cores)
then shares a core with the server the same way for every server compared.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .bodies import POST_LUA, Body

LUA_SCRIPT = POST_LUA
WRK_CPU = os.environ.get("CLF_BENCH_WRK_CPU", "1")

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
_DURATION = re.compile(r"^([\d.]+)(us|ms|s|m)$")


class WrkError(RuntimeError):
    """wrk did not run, or printed something this parser does not recognise."""


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    non2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    percentiles_ms: dict[str, float] = field(default_factory=dict)  # "50" -> ms
    max_ms: float | None = None  # the slowest request (wrk's thread stats, over all threads)

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())

    @property
    def ok_per_s(self) -> float:
        """Successful requests per second (the peers' ``rps``)."""
        return (self.requests - self.non2xx) / self.duration_s if self.duration_s else 0.0

    def p(self, pct: str) -> float | None:
        return self.percentiles_ms.get(pct)


def to_ms(text: str) -> float:
    """A wrk duration such as ``812.00us``, ``3.41ms``, ``1.20s`` or ``1.01m`` in milliseconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise WrkError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    """Parse ``wrk --latency`` output (percentiles are optional: the warm-up run has none)."""
    m = re.search(r"(\d+) requests in ([\d.]+(?:us|ms|s|m)),", out)
    if not m:
        raise WrkError(f"wrk output has no request count:\n{out[-2000:]}")
    result = WrkResult(requests=int(m.group(1)), duration_s=to_ms(m.group(2)) / 1e3)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result.non2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        kinds = ("connect", "read", "write", "timeout")
        result.socket_errors = dict(zip(kinds, map(int, m.groups())))
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    if m:
        result.max_ms = to_ms(m.group(1))
    section = out.split("Latency Distribution", 1)
    if len(section) == 2:
        for pct, value in re.findall(r"^\s+(\d+(?:\.\d+)?)%\s+(\S+)\s*$", section[1], re.M):
            result.percentiles_ms[f"{float(pct):g}"] = to_ms(value)  # "50.000" (wrk2) -> "50"
    return result


def wrk_command(url: str, conc: int, seconds: float, headers: list[str], latency: bool,
                timeout_s: int = 10, script: Path = LUA_SCRIPT) -> list[str]:
    cmd = ["taskset", "-c", WRK_CPU, "wrk", "-t1", f"-c{conc}", f"-d{seconds:g}s",
           f"--timeout={timeout_s}s", "-s", str(script)]
    if latency:
        cmd.append("--latency")
    for header in headers:
        cmd += ["-H", header]
    return cmd + [url]


def run_wrk(url: str, body: Body, conc: int, seconds: float,
            latency: bool) -> tuple[WrkResult, str]:
    """Run wrk once (bounded in time); returns the parsed result and wrk's raw output."""
    cmd = wrk_command(url, conc, seconds, body.headers, latency, script=body.script)
    env = dict(os.environ, CLF_BENCH_BODY=str(body.path))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    except FileNotFoundError as exc:
        raise WrkError(f"cannot run {cmd[0]!r}: {exc}; install wrk (apt-get install wrk)") from None
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with {proc.returncode}:\n{out[-2000:]}")
    return parse_wrk(out), out
