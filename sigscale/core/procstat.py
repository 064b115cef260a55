"""A process's memory as Linux reports it in /proc/<pid>/status: the one reader every benchmark uses.

VmHWM, not ``getrusage().ru_maxrss``: Linux carries ru_maxrss across execve, so a process spawned
by a large parent reports at least the parent's RSS (a spawned child of an 800 MiB parent: ru_maxrss
814 MiB, VmHWM 16 MiB, measured); VmHWM belongs to the process's own address space.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def status_kib(pid: int | str, field: str) -> Optional[int]:
    """A kB field of /proc/<pid>/status (VmHWM, VmPeak, VmRSS, ...); None when the process or field is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mib(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) in MiB, 0.0 when unknown."""
    return round((status_kib(pid, "VmHWM") or 0) / 1024, 1)
