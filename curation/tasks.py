"""The tasks of a curation step: written atomically, indexed like a Slurm array, run here or over local processes.

Every step of `sigscale curate` (plan per file, dedup per partition, a task per part, the finalize steps) is a
set of independent tasks, each writing its own output; `sigscale submit curate` runs a step as one array,
the local run through :func:`run_tasks`.
"""
from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

from sigscale.curation.config import CurationError

Call = Tuple[Callable[..., object], tuple]


def write_json(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, renamed into place: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str))
    tmp.replace(path)


def task_index(index: int, count: int, step: str, flag: str = "--task") -> int:
    """``index`` when a step of ``count`` tasks has it, else a CurationError naming the range."""
    if not 0 <= index < count:
        raise CurationError(f"{flag} {index} is out of range for the {step} step: it has {count} task(s) (0..{count - 1})")
    return index


@contextmanager
def local_pool(processes: int) -> Iterator[Optional[ProcessPoolExecutor]]:
    """``processes`` spawned worker processes for :func:`run_tasks` (no state forked from this one), shut down on
    exit; None for 1 (the tasks then run here)."""
    if processes <= 1:
        yield None
        return
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        yield pool


def run_tasks(calls: Sequence[Call], pool: Optional[ProcessPoolExecutor] = None,
              done: Optional[Callable[[], None]] = None) -> None:
    """Run the independent tasks of one step: here, in turn, or over ``pool``'s processes. Each task writes its
    own output; the first failure is raised."""
    if pool is None or len(calls) <= 1:
        for fn, args in calls:
            fn(*args)
            if done:
                done()
        return
    for future in as_completed([pool.submit(fn, *args) for fn, args in calls]):
        future.result()
        if done:
            done()
