"""One live training per run dir: an exclusive ``flock`` on ``<run>/train.lock`` for the run's whole life.

The kernel drops an flock when its holder dies, however it dies (kill -9 included), so a dead run
never leaves a stale lock behind; the file only names the last holder.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from typing import IO, Optional

from sigscale.core.distributed import LAUNCHER_PID_ENV
from sigscale.core.errors import SigscaleError
from sigscale.core.rundir import RunDir


class RunBusyError(SigscaleError):
    """Another live process is training the same run dir."""


class RunLock:
    """The lock a training run holds on its run dir (``RunDir.lock``) while it trains."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._file: Optional[IO[str]] = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`RunBusyError` naming the run dir and the live holder."""
        self.run.root.mkdir(parents=True, exist_ok=True)
        f = open(self.run.lock, "a+")  # not "w": truncating before holding the lock would erase the holder's name
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunBusyError(self.busy_message()) from None
        f.truncate(0)
        launcher = os.environ.get(LAUNCHER_PID_ENV)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "launcher_pid": int(launcher) if launcher else None}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Let the next run in (closing the file drops the flock)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def check_free(self) -> None:
        """Raise :class:`RunBusyError` if a live process holds the lock; a launcher asks before starting ranks."""
        self.acquire().release()

    def busy_message(self) -> str:
        """Who holds the lock, as the holder wrote it, in the one-line error a second run gets."""
        try:
            holder = json.loads(self.run.lock.read_text())
        except (OSError, ValueError):
            holder = {}
        pid = holder.get("launcher_pid") or holder.get("pid")
        who = f"process {pid} on {holder.get('host', '?')}" if pid else "another process"
        return (f"{self.run.root} is being trained by {who} (it holds {self.run.lock}); wait for it to finish, "
                f"stop it (kill {pid or 'that process'}), or set another train.out_dir")

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
