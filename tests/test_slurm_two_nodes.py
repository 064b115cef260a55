"""Training on a two-node Slurm (slurm/local_cluster.sh start two-node): each slurmd in its own network
and UTS namespace, so the ranks sit on two hosts with different names and addresses."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from slurm_fixtures import two_node_cluster, two_nodes  # noqa: F401  (fixtures)
from test_slurm import CKPT_EVERY, STEPS, _times, reference  # noqa: F401  (reference is a fixture)
from test_train import data, metric_losses, overrides  # noqa: F401  (data is a fixture)

from slurm_fixtures import SCRIPT
from sigscale.cli import main
from sigscale.pretrain.checkpoint import latest_checkpoint
from sigscale.pretrain.config import load_config
from sigscale.slurm.arrays import ArrayTask, is_done, submit_array
from sigscale.slurm.executor import Resources, max_array_size
from sigscale.slurm.jobs import JobFailedError, read_records, wait
from sigscale.slurm.submit import submit_train

slurm = pytest.mark.slurm
ONE_RANK_PER_NODE = Resources(nodes=2, tasks_per_node=1, cpus_per_task=1, time_min=60)
COLLECTIVE_TIMEOUT_S = 20


def _rank_lines(folder, job_id: str) -> dict:
    """rank -> (its node, the master address it joined) from each task's log."""
    found = {}
    for rank in (0, 1):
        log = (folder / f"{job_id}_{rank}_log.out").read_text()
        m = re.search(rf"^rank {rank} of 2 on node (\S+) \(master (\S+):\d+\)", log, re.M)
        assert m, log[-2000:]
        found[rank] = m.groups()
    return found


@slurm
def test_two_node_job_matches_torchrun_and_logs_each_ranks_node(two_nodes, data, reference, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    assert main(["submit", "train", "--cluster", "slurm", "--nodes", "2", "--cpus-per-task", "1", "--wait",
                 "--config", "tiny", *overrides(data, run, STEPS, CKPT_EVERY)]) == 0
    assert metric_losses(run) == pytest.approx(reference, rel=1e-5, abs=1e-6)
    rec = read_records(run)[-1]
    job_id = rec["jobs"][0]["id"]
    assert rec["jobs"][0]["tasks"] == 2
    # one rank per node, both joined the master on node1 by name
    assert _rank_lines(tmp_path / "run" / "slurm" / "001-train", job_id) == {0: ("node1", "node1"),
                                                                             1: ("node2", "node1")}


def _cluster(*args: str) -> None:
    subprocess.run(["bash", str(SCRIPT), *args, "two-node"], check=True, capture_output=True, timeout=300)


@slurm
def test_dead_node_fails_the_job_naming_rank_and_node_then_resubmission_resumes(two_nodes, data, reference,  # noqa: F811
                                                                                tmp_path):
    """node2 dies mid-run (link cut, every process killed: its peer sees silence, not a closed socket):
    rank 0 on node1 gives up after the collective timeout, not at the time limit, and says who was lost."""
    run = tmp_path / "run"
    cfg = load_config("tiny", overrides(data, run, STEPS, 8))
    sub = submit_train(cfg, "slurm", ONE_RANK_PER_NODE, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    job = sub.jobs[0]
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 12):
        assert time.time() < deadline and not job.task(0).paths.result_pickle.exists(), "training never got going"
        time.sleep(0.1)
    try:
        _cluster("kill-node", "node2")
        with pytest.raises(JobFailedError) as err:
            wait(sub, poll_s=1, timeout_s=300)
        newest = latest_checkpoint(run / "checkpoints").name
        assert (f"train task 'train' (job {job.job_id}, rank 0) failed: sigscale.slurm.train_job.PeerLostError: lost rank 1 on node node2: "
                f"a collective on rank 0 (node node1) failed within the {COLLECTIVE_TIMEOUT_S} s collective "
                "timeout") in str(err.value)
        assert f"resubmit the same config to resume from {newest}; full traceback in " in str(err.value)
        subprocess.run(["scancel", job.job_id], check=True)
    finally:
        _cluster("revive-node", "node2")
    again = submit_train(cfg, "slurm", ONE_RANK_PER_NODE, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    wait(again, poll_s=1, timeout_s=300)
    out = again.jobs[0].task(0).paths.stdout.read_text()
    assert re.findall(r"^resumed from \S*/(step_\d+) ", out, re.M) == [newest]
    assert metric_losses(run) == pytest.approx(reference, rel=1e-5, abs=1e-6)


@slurm
def test_a_step_longer_than_the_clusters_max_array_size_runs_as_arrays_one_after_another(two_nodes, tmp_path):
    """This cluster's MaxArraySize is 4 (sites lower Slurm's 1001 too): sbatch refuses a 5-task array, so 9 tasks
    go as arrays of 4, 4 and 1, each starting once the one before has ended; never more than the cap at once."""
    refused = subprocess.run(["sbatch", "--array=0-4", "--wrap", "true"], capture_output=True, text=True)
    assert refused.returncode != 0 and "Invalid job array specification" in refused.stderr
    assert max_array_size() == 4
    tasks = [ArrayTask(f"nap{i}", time.sleep, (2,)) for i in range(9)]
    res = Resources(cpus_per_task=1, time_min=10, array_parallelism=2)
    sub = submit_array(tmp_path / "run", "naps", tasks, "slurm", res)
    arrays = list(dict.fromkeys(job.job_id.split("_")[0] for job in sub.jobs))
    assert len(arrays) == 3 and sub.names == [t.name for t in tasks]
    wait(sub, poll_s=1, timeout_s=300)
    assert all(is_done(tmp_path / "run", t.name) for t in tasks)
    for before, after in zip(arrays, arrays[1:]):
        assert max(_times(before, "End")) <= min(_times(after, "Start"))
    spans = [span for a in arrays for span in zip(_times(a, "Start"), _times(a, "End"))]
    assert len(spans) == 9 and max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2
    assert submit_array(tmp_path / "run", "naps", tasks, "slurm", res).skipped == sub.names  # done: none again
