"""What was submitted, where its logs are, and how it ended: records, waiting, status, cancel.

Every submission gets its own submitit folder ``<run>/slurm/NNN-<kind>/`` (pickles and every task's
``<job>_<task>_log.out/err``) and one line in ``<run>/slurm/jobs.jsonl``. Run dirs are also listed in
``$SIGSCALE_STATE_DIR/runs.txt`` (default ``~/.local/state/sigscale``) so ``sigscale status`` and
``sigscale cancel`` work without naming the run.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO

from sigscale.core.errors import SigscaleError
from sigscale.core.progress import Progress

RECORDS = "jobs.jsonl"
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "PREEMPTED",
          "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING")


class JobFailedError(SigscaleError, RuntimeError):
    """A submitted task failed or vanished; the message names the task and its log file."""


class RunNotFoundError(SigscaleError, FileNotFoundError):
    """``status``/``cancel`` were pointed at a directory with no submission records."""


@dataclass
class Submission:
    """One sbatch (a job or a job array) or one local launch, with the names of its tasks."""

    run_dir: Path
    kind: str
    cluster: str
    folder: Path
    names: List[str] = field(default_factory=list)  # one per job / array task
    jobs: List[Any] = field(default_factory=list)  # submitit Job objects, same order as names
    skipped: List[str] = field(default_factory=list)  # array tasks already done, not resubmitted
    script: str = ""  # the sbatch file (dry runs only)

    @property
    def job_ids(self) -> List[str]:
        return [job.job_id for job in self.jobs]


def state_dir() -> Path:
    return Path(os.environ.get("SIGSCALE_STATE_DIR") or Path.home() / ".local" / "state" / "sigscale")


def new_folder(run_dir: Path, kind: str) -> Path:
    """A fresh submitit folder: job ids restart when a cluster's state is wiped, so never reuse one."""
    root = Path(run_dir).absolute() / "slurm"
    root.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for p in root.iterdir() if p.is_dir())
    while (root / f"{n:03d}-{kind}").exists():
        n += 1
    folder = root / f"{n:03d}-{kind}"
    folder.mkdir()
    return folder


@contextlib.contextmanager
def nothing_left_if_refused(run_dir: Path) -> Iterator[None]:
    """A submission that fails before any job is recorded (sbatch unreachable or refusing) removes what it
    created: the run dir when it made it, else its new ``slurm/`` folders. Recorded jobs keep everything."""
    run_dir = Path(run_dir).absolute()
    slurm = run_dir / "slurm"
    existed = run_dir.exists()
    before = set(slurm.iterdir()) if slurm.is_dir() else None

    def records_size() -> int:
        return (slurm / RECORDS).stat().st_size if (slurm / RECORDS).is_file() else 0

    size = records_size()
    try:
        yield
    except SigscaleError:
        if records_size() == size:
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            elif before is None:
                shutil.rmtree(slurm, ignore_errors=True)
            else:
                for path in set(slurm.iterdir()) - before:
                    shutil.rmtree(path, ignore_errors=True)
        raise


def record(sub: Submission) -> None:
    """Append ``sub`` to the run's jobs.jsonl and the run to the user's list of runs."""
    line = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kind": sub.kind,
            "cluster": sub.cluster, "folder": str(sub.folder), "skipped": sub.skipped,
            "jobs": [{"id": job.job_id, "name": name, "tasks": job.num_tasks} for name, job in zip(sub.names, sub.jobs)]}
    path = Path(sub.run_dir) / "slurm" / RECORDS
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
    index = state_dir() / "runs.txt"
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(index, "a") as f:
        f.write(f"{Path(sub.run_dir).absolute()}\n")


def read_records(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / "slurm" / RECORDS
    if not path.is_file():
        raise RunNotFoundError(f"{run_dir} has no {path.relative_to(run_dir)}: nothing was submitted there; give the "
                               "run dir a `sigscale submit` printed (train.out_dir / output.dir)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def known_runs() -> List[Path]:
    """Runs submitted from this account, most recent last, each once."""
    index = state_dir() / "runs.txt"
    runs = index.read_text().splitlines() if index.is_file() else []
    seen: Dict[str, None] = {}
    for run in runs:
        seen.pop(run, None)
        seen[run] = None
    return [Path(r) for r in seen if (Path(r) / "slurm" / RECORDS).is_file()]


def _job(cluster: str, folder: str, job_id: str, tasks: int):
    import submitit

    cls = submitit.SlurmJob if cluster == "slurm" else submitit.LocalJob
    return cls(folder=folder, job_id=job_id, tasks=list(range(tasks)))


def _outcome(job) -> Optional[str]:
    """'success' / 'error' from the task's result pickle, None when it wrote none."""
    from submitit.core.utils import pickle_load

    path = job.paths.result_pickle
    return pickle_load(path)[0] if path.exists() else None


def _local_state(job) -> str:
    outcomes = [_outcome(job.task(t) if job.num_tasks > 1 else job) for t in range(job.num_tasks)]
    if all(o == "success" for o in outcomes):
        return "COMPLETED"
    if "error" in outcomes:
        return "FAILED"
    process = getattr(job, "_process", None)
    if process is not None:
        running = process.poll() is None
    else:
        try:  # the local controller's pid is the job id
            os.kill(int(job.job_id), 0)
            running = True
        except (OSError, ValueError):
            running = False
    return "RUNNING" if running else "STOPPED"


def job_state(cluster: str, job) -> str:
    """Slurm's state word (from sacct, as submitit reads it) or the local equivalent."""
    if cluster == "local":
        return _local_state(job)
    return job.watcher.get_state(job.job_id, mode="cache").split()[0].upper()


def _refresh(cluster: str, jobs: Sequence) -> None:
    """One sacct call for every registered job, instead of one per job."""
    if cluster == "slurm" and jobs:
        jobs[0].watcher.update()


def _failure(kind: str, name: str, job, state: str) -> JobFailedError:
    """The error for a finished job that did not succeed, naming its task and log."""
    from submitit.core.utils import pickle_load

    tasks = [job.task(t) for t in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    for rank, task in enumerate(tasks):  # a task that raised explains more than one killed after it
        if _outcome(task) == "error":
            trace = pickle_load(task.paths.result_pickle)[1].strip().splitlines()
            where = f", rank {rank}" if len(tasks) > 1 else ""
            return JobFailedError(f"{kind} task {name!r} (job {job.job_id}{where}) failed: {trace[-1]}; "
                                  f"full traceback in {task.paths.stderr}")
    missing = next((r for r, t in enumerate(tasks) if _outcome(t) is None), 0)
    return JobFailedError(f"{kind} task {name!r} (job {job.job_id}) ended in state {state} without a result; "
                          f"see its log {tasks[missing].paths.stderr} (and .out beside it)")


def _done(cluster: str, job) -> bool:
    if cluster == "local":
        return job.done()
    outcomes = [_outcome(job.task(t) if job.num_tasks > 1 else job) for t in range(job.num_tasks)]
    # One task's error decides: the tasks of a dead node never write a result, and Slurm may take
    # SlurmdTimeout (minutes) to notice that node.
    if "error" in outcomes or all(o is not None for o in outcomes):
        return True
    state = job_state(cluster, job)
    return state not in ACTIVE and state != "UNKNOWN"


def wait(sub: Submission, poll_s: float = 2.0, timeout_s: Optional[float] = None,
         progress: Optional[TextIO] = None) -> List[Any]:
    """Block until every job of ``sub`` ends; return task 0's results, or raise naming the failed task.

    As each job ends, a line with tasks done/total, elapsed time and ETA goes to ``progress`` (default stdout).
    """
    from submitit.core.utils import pickle_load

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(zip(sub.names, sub.jobs))
    bar = Progress(f"{sub.kind} ({sub.cluster})", len(pending), "task(s) done", every_s=0,
                   stream=progress) if pending else None
    while pending:
        _refresh(sub.cluster, [job for _, job in pending])
        still = []
        for name, job in pending:
            if not _done(sub.cluster, job):
                still.append((name, job))
                continue
            tasks = [job.task(t) for t in range(job.num_tasks)] if job.num_tasks > 1 else [job]
            if not all(_outcome(t) == "success" for t in tasks):
                # Every other job keeps running: the caller decides (a resubmission skips what finished).
                raise _failure(sub.kind, name, job, job_state(sub.cluster, job))
        if bar is not None and len(still) < len(pending):
            bar.update(len(pending) - len(still))
        pending = still
        if pending:
            if deadline is not None and time.monotonic() > deadline:
                raise JobFailedError(f"{sub.kind}: {len(pending)} job(s) still running after {timeout_s:.0f} s "
                                     f"({', '.join(j.job_id for _, j in pending)}); see `sigscale status "
                                     f"{sub.run_dir}`")
            time.sleep(poll_s)
    if bar is not None:
        bar.close()
    out = []
    for job in sub.jobs:
        task = job.task(0) if job.num_tasks > 1 else job
        out.append(pickle_load(task.paths.result_pickle)[1])
    return out


def status(run_dir: Path) -> List[Dict[str, str]]:
    """One row per submitted job: submission, kind, job id, task name, state, log file."""
    rows, jobs = [], []
    for rec in read_records(run_dir):
        for j in rec["jobs"]:
            job = _job(rec["cluster"], rec["folder"], j["id"], j["tasks"])
            jobs.append((rec, j, job))
    slurm_jobs = [job for rec, _, job in jobs if rec["cluster"] == "slurm"]
    _refresh("slurm", slurm_jobs)
    for rec, j, job in jobs:
        task0 = job.task(0) if job.num_tasks > 1 else job
        rows.append({"submission": Path(rec["folder"]).name, "kind": rec["kind"], "cluster": rec["cluster"],
                     "job": j["id"], "name": j["name"], "state": job_state(rec["cluster"], job),
                     "log": str(task0.paths.stdout)})
    return rows


def cancel(run_dir: Path) -> List[str]:
    """Cancel every job of ``run_dir`` that has not finished; returns the cancelled job ids."""
    cancelled, slurm_ids = [], []
    for row in status(run_dir):
        if row["state"] not in ACTIVE + ("UNKNOWN",):
            continue
        if row["cluster"] == "slurm":
            slurm_ids.append(row["job"])
        else:
            try:  # the local controller stops its tasks on SIGINT, as submitit's LocalJob.cancel does
                os.kill(int(row["job"]), signal.SIGINT)
            except (ProcessLookupError, ValueError):
                continue
        cancelled.append(row["job"])
    if slurm_ids:
        proc = subprocess.run(["scancel", *slurm_ids], capture_output=True, text=True)
        if proc.returncode != 0:
            raise JobFailedError(f"scancel {' '.join(slurm_ids)} failed: {proc.stderr.strip()}; check SLURM_CONF "
                                 "points at the cluster the jobs were submitted to")
    return cancelled
