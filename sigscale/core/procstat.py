"""A process's memory: as Linux reports it in /proc/<pid>/status (the one reader every benchmark uses), and
glibc's free heap handed back to the system.

VmHWM, not ``getrusage().ru_maxrss``: Linux carries ru_maxrss across execve, so a process spawned
by a large parent reports at least the parent's RSS (a spawned child of an 800 MiB parent: ru_maxrss
814 MiB, VmHWM 16 MiB, measured); VmHWM belongs to the process's own address space.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
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


def rss_hwm_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) in bytes, 0 when unknown."""
    return (status_kib(pid, "VmHWM") or 0) * 1024


def peak_rss_mib(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) in MiB, 0.0 when unknown."""
    return round(rss_hwm_bytes(pid) / 2 ** 20, 1)


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Hand glibc's free heap pages back to the system (malloc_trim); a no-op without glibc.

    A loop that builds and drops large pandas batches of Python strings leaves the heap fragmented, and
    its RSS then creeps up batch after batch (the planner: ~6 MiB per million rows from 20M to 60M rows,
    measured); trimming once per batch keeps only what is in use."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
