"""CPU time of a server's processes from /proc: the server and every worker in its process group.

A server started with start_new_session=True leads its own process group, and the workers it
forks stay in it. Per process /proc/<pid>/stat gives utime and stime (all its threads) and
cutime and cstime (children it has already waited for), in clock ticks. Summing all four over
the group, before and after a phase, counts every process that ran during the phase, including
a worker that exited and was reaped by its parent in between.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    pid: int
    pgid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def ticks(self) -> int:
        return self.utime + self.stime + self.cutime + self.cstime


def parse_stat(text: str) -> ProcStat:
    """Fields of one /proc/<pid>/stat line; the command name may hold spaces and parentheses."""
    head, _, rest = text.rpartition(")")
    if not head:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()  # fields[0] is field 3 (state) of proc(5)
    return ProcStat(pid=pid, pgid=int(fields[2]), utime=int(fields[11]), stime=int(fields[12]),
                    cutime=int(fields[13]), cstime=int(fields[14]))


def group_stats(pgid: int, proc: Path = Path("/proc")) -> list[ProcStat]:
    """Every live process of process group pgid (processes that vanish while reading are skipped)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        if stat.pgid == pgid:
            found.append(stat)
    return found


def group_ticks(pgid: int, proc: Path = Path("/proc")) -> int:
    """utime + stime + cutime + cstime summed over the process group, in clock ticks."""
    return sum(stat.ticks for stat in group_stats(pgid, proc))


def clock_ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


def cpu_ms_per_request(ticks_before: int, ticks_after: int, requests: int, ticks_per_second: int) -> float:
    """Server CPU milliseconds per answered request over a phase; NaN without requests."""
    if requests <= 0:
        return float("nan")
    return (ticks_after - ticks_before) * 1000.0 / ticks_per_second / requests


class GroupCpu:
    """Snapshots of one process group's CPU ticks: `mark()` before a phase, `since(mark)` after it."""

    def __init__(self, pgid: int, proc: Path = Path("/proc")) -> None:
        self.pgid = pgid
        self.proc = proc
        self.hz = clock_ticks_per_second()

    def mark(self) -> int:
        return group_ticks(self.pgid, self.proc)

    def phase(self, before: int, requests: int, seconds: float, after: int | None = None) -> dict[str, float]:
        """CPU ms per request and cores busy (CPU seconds per wall second) from `before` to `after` (default now)."""
        after = self.mark() if after is None else after
        cpu_seconds = (after - before) / self.hz
        return {
            "server_cpu_seconds": round(cpu_seconds, 3),
            "server_cpu_ms_per_request": round(cpu_ms_per_request(before, after, requests, self.hz), 4),
            "server_cores_busy": round(cpu_seconds / seconds, 3) if seconds > 0 else float("nan"),
        }
