"""The local test Slurm cluster as a pytest fixture: started by slurm/local_cluster.sh, never mocked.

Where it cannot run (no root/apt) the tests skip with the command that enables them; under CI=true
a cluster that does not come up fails them instead.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sigscale import REPO_ROOT

SCRIPT = REPO_ROOT / "slurm" / "local_cluster.sh"
CANNOT_RUN_HERE = 3  # local_cluster.sh: not root / no apt
HOW_TO_ENABLE = ("the Slurm tests need the local test cluster: run `sudo slurm/local_cluster.sh start` once "
                 "(Debian/Ubuntu; installs slurmctld, slurmd, slurmdbd, munge, MariaDB), or `make slurm-up`")


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message}")
    pytest.skip(f"{message}; {HOW_TO_ENABLE}")


def _start(*mode: str) -> None:
    """``local_cluster.sh start [MODE]``, or skip/fail the test saying why it cannot run here."""
    proc = subprocess.run(["bash", str(SCRIPT), "start", *mode], capture_output=True, text=True, timeout=600)
    if proc.returncode == CANNOT_RUN_HERE:
        _unavailable(f"the local Slurm cluster cannot be started here ({proc.stderr.strip().splitlines()[-1]})")
    if proc.returncode != 0:
        _unavailable(f"slurm/local_cluster.sh start {' '.join(mode)} failed (exit {proc.returncode}): "
                     f"{proc.stderr[-2000:]}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Path:
    """Start (or reuse) the single-node cluster; clients find it through SLURM_CONF."""
    slurm_dir = Path(os.environ.get("SIGSCALE_SLURM_DIR", "/tmp/sigscale-slurm"))
    _start()
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "OMP_NUM_THREADS", "SIGSCALE_STATE_DIR")}
    os.environ["SLURM_CONF"] = str(slurm_dir / "etc" / "slurm.conf")
    os.environ["SIGSCALE_STATE_DIR"] = str(tmp_path_factory.mktemp("sigscale_state"))  # not the user's list of runs
    os.environ["OMP_NUM_THREADS"] = "1"  # jobs inherit this environment (sbatch --export=ALL)
    yield slurm_dir
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def two_node_cluster() -> Path:
    """Start (or reuse) the two-node cluster (a network and UTS namespace per node); returns its dir."""
    _start("two-node")
    return Path(os.environ.get("SIGSCALE_SLURM_2N_DIR", "/tmp/sigscale-slurm-2n"))


@pytest.fixture
def two_nodes(two_node_cluster, tmp_path, monkeypatch) -> Path:
    """The two-node cluster for one test (SLURM_CONF points at it); what the test left queued is cancelled."""
    monkeypatch.setenv("SLURM_CONF", str(two_node_cluster / "etc" / "slurm.conf"))
    monkeypatch.setenv("SIGSCALE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = queued_jobs()
    yield two_node_cluster
    left = queued_jobs() - before
    if left:
        subprocess.run(["scancel", *left], check=False)


def queued_jobs() -> set:
    out = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, check=True).stdout
    return set(out.split())
