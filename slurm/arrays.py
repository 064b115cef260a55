"""Fan a list of independent tasks out as one Slurm job array, capped, skipping what already finished.

A task is done when its marker ``<run>/slurm/done/<name>.json`` exists; the marker is written by the
array task itself after its function returned, so a resubmission (after a failure, a cancel or a
cluster outage) runs only what is missing. Locally the same tasks run through submitit's local
executor in waves of at most ``array_parallelism`` processes.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Sequence

from sigscale.slurm.executor import (Resources, SubmitError, make_executor, max_array_size, sbatch_errors,
                                     sbatch_script)
from sigscale.slurm.jobs import Submission, new_folder, record

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass
class ArrayTask:
    """One element of an array: ``fn(*args, **kwargs)``, known by a unique, file-name-safe name."""

    name: str
    fn: Callable[..., Any]
    args: Sequence[Any] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)


def done_dir(run_dir: Path) -> Path:
    return Path(run_dir).absolute() / "slurm" / "done"


def is_done(run_dir: Path, name: str) -> bool:
    return (done_dir(run_dir) / f"{name}.json").is_file()


class MarkDone:
    """The callable an array task runs: the task's function, then its done marker (atomically)."""

    def __init__(self, task: ArrayTask, marker: Path) -> None:
        self.task, self.marker = task, marker

    def __call__(self) -> Any:
        result = self.task.fn(*self.task.args, **self.task.kwargs)
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"name": self.task.name, "result": repr(result)[:500],
                                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        tmp.rename(self.marker)
        return result


def _check_names(tasks: Sequence[ArrayTask]) -> None:
    seen = set()
    for t in tasks:
        if not NAME.fullmatch(t.name):
            raise SubmitError(f"array task name {t.name!r} is not file-name safe; use letters, digits and ._+-")
        if t.name in seen:
            raise SubmitError(f"array task name {t.name!r} appears twice; names identify done markers and logs")
        seen.add(t.name)


def submit_array(run_dir: Path, kind: str, tasks: Sequence[ArrayTask], cluster: str, res: Resources,
                 dry_run: bool = False) -> Submission:
    """Submit the tasks of ``tasks`` not yet done as arrays of at most ``res.array_parallelism`` running at once.

    Slurm: one array, or, past the cluster's MaxArraySize (1001 by default: 10k curation parts would be refused
    whole), arrays of that many tasks, each starting once the one before has ended (``afterany``) so the cap
    holds over all of them; returns right after sbatch (``jobs.wait`` blocks). Local: runs the waves and returns
    when all have ended (failures are raised by ``jobs.wait`` on the returned submission, like on Slurm).
    """
    _check_names(tasks)
    run_dir = Path(run_dir).absolute()
    todo = [t for t in tasks if not is_done(run_dir, t.name)]
    skipped = [t.name for t in tasks if is_done(run_dir, t.name)]
    if dry_run:
        folder = run_dir / "slurm" / f"NNN-{kind}"
        return Submission(run_dir, kind, cluster, folder, [t.name for t in todo], skipped=skipped,
                          script=sbatch_script(folder, res, array_size=len(todo) if len(todo) > 1 else None))
    if not todo:
        return Submission(run_dir, kind, cluster, run_dir / "slurm", skipped=skipped)
    folder = new_folder(run_dir, kind)
    done_dir(run_dir).mkdir(parents=True, exist_ok=True)
    executor = make_executor(cluster, folder, res)
    calls = [MarkDone(t, done_dir(run_dir) / f"{t.name}.json") for t in todo]
    sub = Submission(run_dir, kind, cluster, folder, skipped=skipped)
    size = max_array_size() if cluster == "slurm" else res.array_parallelism
    waves = [calls[i:i + size] for i in range(0, len(calls), size)]
    try:
        for wave in waves:
            if cluster == "slurm" and wave is not waves[0]:
                executor.update_parameters(additional_parameters=_after(res, sub.jobs[-1].job_id.split("_")[0]))
            # One sbatch with `--array=0-(n-1)%cap` (submitit's map_array path); locally, one process each.
            with sbatch_errors(), executor.batch():
                wave_jobs = [executor.submit(call) for call in wave]
            sub.jobs += wave_jobs
            sub.names += [call.task.name for call in wave]
            if cluster == "local" and wave is not waves[-1]:
                # The cap: the next wave starts when this one ended; failures are raised by wait().
                while not all(job.done() for job in wave_jobs):
                    time.sleep(0.5)
    finally:
        if sub.jobs:
            record(sub)
    return sub


def _after(res: Resources, array_id: str) -> Dict[str, Any]:
    """``res``'s extra sbatch options with the job also waiting for array ``array_id`` to end, ok or not (its
    failures fail the step after it, through that step's afterok)."""
    extra = dict(res.extra)
    waits = [extra["dependency"]] if extra.get("dependency") else []
    extra["dependency"] = ",".join([*waits, f"afterany:{array_id}"])  # a comma: every condition must hold
    return extra
