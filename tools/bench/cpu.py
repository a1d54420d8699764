"""CPU accounting from /proc: the server's process tree, the load generator, everyone else.

The box has 2 cores shared with other people's work, so every measurement records how much CPU
foreign processes and the hypervisor (steal) took meanwhile; the peers' bench does the same.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

HZ = os.sysconf("SC_CLK_TCK")
# A cell during which others took more than this many cores is re-measured or flagged (peers: 0.25).
FOREIGN_THRESHOLD = 0.25
T = TypeVar("T")

# pid -> (session id, cpu jiffies, parent pid, start time)
ProcTable = dict[int, tuple[int, int, int, int]]


def proc_status(pid: int) -> dict[str, str] | None:
    """The fields of ``/proc/<pid>/status`` (``"VmRSS": "123 kB"``, ``"Threads": "8"``, ...);
    None where the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return None


def rss_mb(status: dict[str, str]) -> float:
    """Resident memory in MB from ``proc_status``'s fields (0 for a kernel thread's)."""
    return int(status.get("VmRSS", "0 kB").split()[0]) / 1024


def proc_table() -> ProcTable:
    """Every live (non-zombie) process with its session, CPU jiffies, parent and start time."""
    table: ProcTable = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # after ')': state(0) ppid(1) pgrp(2) session(3) ... utime(11) stime(12) starttime(19)
        rest = stat[stat.rfind(")") + 2:].split()
        if rest[0] == "Z":
            continue
        jiffies = int(rest[11]) + int(rest[12])
        table[int(entry)] = (int(rest[3]), jiffies, int(rest[1]), int(rest[19]))
    return table


class ProcessTree:
    """Every process a server started: the leader's descendants and the members of their sessions.

    BentoML (circus) starts its workers in new sessions, so process groups are not enough.
    Members are remembered as (pid, start time): an orphaned worker is still found after the
    leader exits, and a recycled PID is never mistaken for ours.
    """

    def __init__(self, leader: int) -> None:
        self.leader = leader
        self.known: set[tuple[int, int]] = set()

    def refresh(self, table: ProcTable | None = None) -> set[int]:
        table = table if table is not None else proc_table()
        self.known &= {(pid, v[3]) for pid, v in table.items()}
        children: dict[int, list[int]] = {}
        for pid, v in table.items():
            children.setdefault(v[2], []).append(pid)
        sessions, seen = set(), set()
        frontier = [self.leader] + [pid for pid, _ in self.known]
        while frontier:
            pid = frontier.pop()
            if pid in seen or pid not in table:
                continue
            seen.add(pid)
            sessions.add(table[pid][0])
            frontier.extend(children.get(pid, []))
        seen |= {pid for pid, v in table.items() if v[0] in sessions and v[0] != 0}
        self.known |= {(pid, table[pid][3]) for pid in seen}
        return {pid for pid, _ in self.known}


def _system_jiffies() -> tuple[int, int]:
    """(busy jiffies incl. steal, steal jiffies) over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4], v[7]


@dataclass(frozen=True)
class CpuUse:
    seconds: float  # wall time of the window
    server_cpu_s: float  # CPU seconds of the server's process tree
    wrk_cores: float
    foreign_cores: float  # processes that are neither the server, the bench nor wrk
    steal_cores: float
    system_busy_cores: float

    @property
    def server_cores(self) -> float:
        return self.server_cpu_s / self.seconds if self.seconds else 0.0

    @property
    def noise(self) -> float:
        """CPU the bench lost to others: foreign processes plus hypervisor steal (cores)."""
        return self.foreign_cores + self.steal_cores

    def to_dict(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 3), "server_cpu_s": round(self.server_cpu_s, 3),
                "server_cores": round(self.server_cores, 3), "wrk_cores": round(self.wrk_cores, 3),
                "foreign_cores": round(self.foreign_cores, 3),
                "steal_cores": round(self.steal_cores, 3),
                "system_busy_cores": round(self.system_busy_cores, 3)}


class CpuWindow:
    """Open before a measurement, ``close()`` after: who used how much CPU in between."""

    def __init__(self, tree: ProcessTree | None = None) -> None:
        self.tree = tree
        self.t0 = time.perf_counter()
        self.p0 = proc_table()
        self.s0 = _system_jiffies()
        self.r0 = resource.getrusage(resource.RUSAGE_CHILDREN)

    def close(self) -> CpuUse:
        dt = time.perf_counter() - self.t0
        p1, s1 = proc_table(), _system_jiffies()
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_pids = self.tree.refresh(p1) if self.tree else set()
        own = {os.getpid()}
        server = foreign = 0
        for pid, v in p1.items():
            before = self.p0.get(pid)
            used = v[1] - (before[1] if before and before[3] == v[3] else 0)
            if pid in server_pids:
                server += used
            elif pid not in own:
                foreign += used
        # wrk has exited and been reaped by now: its CPU is in our children's rusage.
        wrk = (r1.ru_utime + r1.ru_stime) - (self.r0.ru_utime + self.r0.ru_stime)
        return CpuUse(seconds=dt, server_cpu_s=server / HZ, wrk_cores=wrk / dt,
                      foreign_cores=foreign / HZ / dt, steal_cores=(s1[1] - self.s0[1]) / HZ / dt,
                      system_busy_cores=(s1[0] - self.s0[0]) / HZ / dt)


def wait_quiet(max_wait: float, threshold: float, log: Callable[[str], None]) -> float:
    """Wait (bounded) until others take < ``threshold`` cores over 2 s; returns the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        window = CpuWindow()
        time.sleep(2.0)
        noise = window.close().noise
        if noise < threshold:
            return noise
        if time.monotonic() > deadline:
            log(f"  [warn] foreign+steal CPU still {noise:.2f} cores after {max_wait:.0f} s; "
                "going on")
            return noise


@dataclass
class Attempts(Generic[T]):
    """The least-contaminated of up to 1 + retries attempts at one measurement."""

    best: T
    cpu: CpuUse
    noise_per_attempt: list[float]

    @property
    def contaminated(self) -> bool:
        return self.cpu.noise > FOREIGN_THRESHOLD


def least_contaminated(measure: Callable[[], tuple[T, CpuUse]], *, what: str, retries: int,
                       quiet_wait: float, may_retry: Callable[[], bool],
                       log: Callable[[str], None],
                       unsuitable: Callable[[T], str | None] = lambda _: None) -> Attempts[T]:
    """Measure after the box is quiet; re-measure (bounded) while others took > 0.25 cores, or
    while ``unsuitable`` names a reason the attempt does not measure what it should. The kept
    attempt is a suitable one if any, the least contaminated among those."""
    tried: list[tuple[T, CpuUse]] = []
    for attempt in range(retries + 1):
        wait_quiet(quiet_wait, FOREIGN_THRESHOLD, log)
        tried.append(measure())
        noise, reason = tried[-1][1].noise, unsuitable(tried[-1][0])
        if noise <= FOREIGN_THRESHOLD and reason is None:
            break
        again = attempt < retries and may_retry()
        why = (reason if reason is not None else
               f"foreign+steal CPU {noise:.2f} cores > {FOREIGN_THRESHOLD}")
        log(f"  [noise] {what}: {why}: "
            f"{'measuring again' if again else 'keeping the best attempt'}")
        if not again:
            break
    best, cpu = min(tried, key=lambda t: (unsuitable(t[0]) is not None, t[1].noise))
    return Attempts(best, cpu, [round(c.noise, 3) for _, c in tried])
