"""Resources → a submitit executor (Slurm or local), and the sbatch script a submission would use."""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from sigscale.core.errors import SigscaleError

CLUSTERS = ("slurm", "local")
# What sbatch says when it never reached a controller (no or bad slurm.conf, controller down or
# unreachable): the fix is SLURM_CONF or the cluster, not the job's options.
UNREACHABLE = ("Unable to contact slurm controller", "Unable to process configuration file",
               "s_p_parse_file", "Unable to establish controller", "Socket timed out on send/recv",
               "Zero Bytes were transmitted or received")


class SubmitError(SigscaleError, ValueError):
    """A submission cannot be made as asked; the message names the option or tool and the fix."""


@dataclass
class Resources:
    """What one job (or one array task) asks the cluster for."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None  # default: one task per GPU, else one
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time_min: int = 60
    array_parallelism: int = 256  # at most this many array tasks run at once
    # Slurm sends the preemption signal (USR2) this long before the time limit, time enough to
    # finish a step and write a checkpoint.
    signal_delay_s: int = 120
    job_name: str = "sigscale"
    extra: Dict[str, Any] = field(default_factory=dict)  # more `#SBATCH --key=value` lines

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def check(self) -> None:
        for name in ("nodes", "array_parallelism", "time_min"):
            if getattr(self, name) < 1:
                raise SubmitError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SubmitError(f"--{name.replace('_', '-')}={value} must not be negative")
        if self.gpus_per_node and self.tasks_per_node and self.tasks_per_node != self.gpus_per_node:
            raise SubmitError(
                f"--tasks-per-node={self.tasks_per_node} with --gpus-per-node={self.gpus_per_node}: training runs "
                "one task per GPU; leave --tasks-per-node out or make it equal to --gpus-per-node"
            )


def parse_time(text: str) -> int:
    """Slurm time limit (``MIN``, ``HH:MM:SS``, ``MM:SS``, ``D-HH[:MM[:SS]]``) → whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SubmitError(f"--time={text!r} is not a Slurm time; write minutes (90), HH:MM:SS (01:30:00) "
                          "or D-HH:MM:SS (1-00:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:
        seconds = int(a) * 60
    return max(1, -(-seconds // 60))


def slurm_parameters(res: Resources, requeue: bool = False) -> Dict[str, Any]:
    """submitit SlurmExecutor parameters (its native names) for ``res``."""
    params: Dict[str, Any] = dict(job_name=res.job_name, time=res.time_min, nodes=res.nodes,
                                  ntasks_per_node=res.ntasks_per_node, signal_delay_s=res.signal_delay_s,
                                  array_parallelism=res.array_parallelism)
    for key in ("cpus_per_task", "partition", "account"):
        if getattr(res, key) is not None:
            params[key] = getattr(res, key)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    extra = dict(res.extra)
    if requeue:  # allow `scontrol requeue` even where the site's JobRequeue default is 0
        extra["requeue"] = True
    if extra:
        params["additional_parameters"] = extra
    return params


# Slurm's default MaxArraySize: an array's indices run 0..MaxArraySize-1, so it holds at most this many tasks.
DEFAULT_MAX_ARRAY_SIZE = 1001


def max_array_size() -> int:
    """The most tasks one array may hold on this cluster: its controller's MaxArraySize (`scontrol show config`),
    or Slurm's default where scontrol does not answer (sbatch then says why)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY_SIZE
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(found.group(1)) if found else DEFAULT_MAX_ARRAY_SIZE


def make_executor(cluster: str, folder: Path, res: Resources, requeue: bool = False):
    """A submitit executor writing its pickles and every task's logs into ``folder``."""
    import submitit

    res.check()
    if cluster == "slurm":
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise SubmitError("--cluster slurm: sbatch/srun not found on PATH; run on a Slurm login node, start the "
                              "test cluster with `slurm/local_cluster.sh start` (then export SLURM_CONF), or use "
                              "--cluster local")
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
        ex.update_parameters(**slurm_parameters(res, requeue))
        return ex
    if cluster == "local":
        if res.nodes != 1:
            raise SubmitError(f"--cluster local runs on this machine only; --nodes={res.nodes} needs --cluster slurm")
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=3)
        ex.update_parameters(timeout_min=res.time_min, tasks_per_node=res.ntasks_per_node,
                             gpus_per_node=res.gpus_per_node, signal_delay_s=res.signal_delay_s)
        return ex
    raise SubmitError(f"--cluster={cluster!r} is not one of {', '.join(CLUSTERS)}")


def sbatch_script(folder: Path, res: Resources, requeue: bool = False, array_size: Optional[int] = None) -> str:
    """The sbatch file submitit would submit for ``res`` (what ``--dry-run`` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    res.check()
    # The same command line SlurmExecutor puts after `srun`: it unpickles and runs the job.
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size,
                               **slurm_parameters(res, requeue))


@contextlib.contextmanager
def sbatch_errors() -> Iterator[None]:
    """Turn sbatch's refusal (bad partition, account, limits) into a one-line user error."""
    from submitit.core.utils import FailedJobError

    try:
        yield
    except FailedJobError as e:
        msg = " ".join(str(e).split())
        if any(sign in msg for sign in UNREACHABLE):
            conf = os.environ.get("SLURM_CONF") or "unset, so the default /etc/slurm/slurm.conf"
            raise SubmitError(f"--cluster slurm: sbatch cannot reach a Slurm controller ({msg}); SLURM_CONF is {conf}: "
                              "point SLURM_CONF at the cluster's slurm.conf and check that its controller answers "
                              "(`scontrol ping`), or use --cluster local") from None
        raise SubmitError(f"sbatch refused the job: {msg}; check --partition, --account, --time and the resources "
                          "against `sinfo` / `sacctmgr show assoc`") from None
