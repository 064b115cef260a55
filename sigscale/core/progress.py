"""Progress of long work: counts, elapsed time and ETA, as a bar on a terminal and as plain lines in logs.

One owner for how every stage (curation parts and downloads, finalize steps, waiting for cluster jobs,
training) says how far it is and how long is left.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded), the form of every elapsed time and ETA sigscale prints."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def eta_seconds(elapsed: float, done: int, total: int) -> Optional[float]:
    """Time left at the mean rate so far; None before the first unit is done."""
    return elapsed / done * (total - done) if done > 0 else None


class Progress:
    """``label: done/total unit, H:MM:SS elapsed, eta H:MM:SS`` for one stage; safe to update from threads.

    On a terminal a tqdm bar; elsewhere (Slurm logs, CI, pipes) a line at most every ``every_s`` seconds,
    and always the last one, so logs show progress without one line per item.
    """

    def __init__(self, label: str, total: int, unit: str = "", every_s: float = 10.0,
                 stream: Optional[TextIO] = None) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stdout
        self.done, self.t0 = 0, time.monotonic()
        self._printed_at: Optional[float] = None
        self._lock = threading.Lock()
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit.split()[0] if unit else "it", file=self.stream,
                             dynamic_ncols=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        eta = eta_seconds(elapsed, self.done, self.total)
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.label}: {self.done}/{self.total}{unit}, {format_duration(elapsed)} elapsed, "
                f"eta {format_duration(eta) if eta is not None else '?'}")

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
                return
            now = time.monotonic()
            due = self._printed_at is None or now - self._printed_at >= self.every_s
            if due or self.done >= self.total:
                self._printed_at = now
                print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
