"""submit/status/cancel on a real single-node Slurm (slurm/local_cluster.sh): training with exact
resume after preemption, curation and eval job arrays, failures that name their task and log."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import time
from datetime import datetime

import pytest

from slurm_fixtures import queued_jobs, slurm_cluster  # noqa: F401  (fixture)
from test_train import cli_train, data, metric_losses, overrides  # noqa: F401  (data is a fixture)

from sigscale.cli import main
from sigscale.pretrain.checkpoint import list_checkpoints
from sigscale.pretrain.config import load_config
from sigscale.slurm.arrays import ArrayTask, is_done, submit_array
from sigscale.slurm.executor import Resources
from sigscale.slurm.jobs import JobFailedError, Submission, read_records, status, wait
from sigscale.slurm.submit import submit_curate, submit_eval, submit_train

slurm = pytest.mark.slurm

STEPS, CKPT_EVERY = 48, 24
TWO_RANKS = Resources(tasks_per_node=2, cpus_per_task=1, time_min=60)  # ≥ 60 min: see slurm/train_job.py
ONE_CPU = Resources(cpus_per_task=1, time_min=60)
PREEMPTIBLE, PREEMPTING = "debug", "urgent"  # slurm/local_cluster.sh: PriorityTier 1 and 2, PreemptMode=REQUEUE


@pytest.fixture
def cluster(slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    """The cluster for one test; whatever the test left queued is cancelled afterwards."""
    monkeypatch.setenv("SIGSCALE_STATE_DIR", str(tmp_path / "state"))
    before = queued_jobs()
    yield slurm_cluster
    left = queued_jobs() - before
    if left:
        subprocess.run(["scancel", *left], check=False)


def tiny(data, run_dir):  # noqa: F811
    return load_config("tiny", overrides(data, run_dir, STEPS, CKPT_EVERY))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):  # noqa: F811
    """The same config on 2 ranks under torchrun (`sigscale train --nproc 2`): what every 2-task job must
    reproduce (the data stream is split by rank, so only the same world size gives the same batches)."""
    run = tmp_path_factory.mktemp("slurm_ref") / "run"
    proc = cli_train(data, run, STEPS, CKPT_EVERY, nproc=2)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    return metric_losses(run)


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, data, tmp_path_factory):  # noqa: F811
    """One 2-task training job through sbatch, run to completion."""
    run = tmp_path_factory.mktemp("slurm_train") / "run"
    sub = submit_train(tiny(data, run), "slurm", TWO_RANKS)
    results = wait(sub, poll_s=1, timeout_s=300)
    return run, sub, results


@slurm
def test_two_task_training_job_matches_torchrun_and_leaves_checkpoints(cluster, slurm_run, reference):
    run, sub, results = slurm_run
    assert results[0]["final_weights"] == str(run / "model.safetensors") and (run / "model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000024", "step_00000048"]
    assert metric_losses(run) == pytest.approx(reference, rel=1e-5, abs=1e-6)
    # both ranks ran under Slurm and logged into the run dir
    job = sub.jobs[0]
    for rank in (0, 1):
        assert (sub.folder / f"{job.job_id}_{rank}_log.out").is_file()
        assert (sub.folder / f"{job.job_id}_{rank}_result.pkl").is_file()
    assert sub.folder.parent == run / "slurm"
    script = (sub.folder / f"{job.job_id}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --requeue" in script
    rec = read_records(run)[-1]
    assert rec["kind"] == "train" and rec["jobs"][0]["id"] == job.job_id and rec["jobs"][0]["tasks"] == 2


def _wait_for_steps(run, job, n: int) -> None:
    """Until the run has logged ``n`` steps (the job is mid-run)."""
    metrics, deadline = run / "metrics.jsonl", time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        assert time.time() < deadline and not job.paths.result_pickle.exists(), "training never started"
        time.sleep(0.1)


def _stop_and_resume_steps(job) -> tuple:
    """(the step each rank stopped at with a checkpoint, the step the requeued attempt resumed from)."""
    out = "".join(job.task(rank).paths.stdout.read_text() for rank in (0, 1))
    saved = sorted({int(m) for m in re.findall(r"rank \d: checkpoint step_(\d+) written on stop", out)})
    resumed = [int(m) for m in re.findall(r"^resumed from \S*step_(\d+)", out, re.M)]
    return saved, resumed


@slurm
def test_slurm_preemption_sigterm_checkpoints_within_grace_time_and_requeued_job_resumes_exactly(
        cluster, data, reference, tmp_path):  # noqa: F811
    """Real preemption: a job in the high-priority partition needs the CPUs, Slurm preempts the training
    job (PreemptMode=REQUEUE: SIGTERM, GraceTime, SIGKILL) and requeues it; no USR2 is ever sent."""
    run = tmp_path / "run"
    sub = submit_train(tiny(data, run), "slurm", dataclasses.replace(TWO_RANKS, partition=PREEMPTIBLE))
    job = sub.jobs[0]
    _wait_for_steps(run, job, 3)
    cpus = subprocess.run(["sinfo", "-h", "-p", PREEMPTING, "-o", "%c"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    urgent = subprocess.run(["sbatch", "--parsable", "-p", PREEMPTING, "-c", cpus, "-o", str(tmp_path / "urgent.out"),
                             "--wrap", "echo urgent ran"], capture_output=True, text=True, check=True).stdout.strip()
    wait(sub, poll_s=1, timeout_s=400)
    out = job.paths.stdout.read_text()
    for rank in (0, 1):  # each task caught Slurm's SIGTERM, with its DataLoader worker still alive
        log = job.task(rank).paths.stdout.read_text()
        assert f"rank {rank}: caught SIGTERM" in log and f"rank {rank}: caught SIGUSR2" not in log
        assert re.search(rf"rank {rank}: checkpoint step_\d+ written on stop \(SIGTERM", log)
    assert "rank 0: caught SIGTERM" in out and "; requeueing" in out and "Requeued job" in out
    saved, resumed = _stop_and_resume_steps(job)
    assert len(saved) == 1 and resumed == saved and 3 <= saved[0] < STEPS  # resumed where SIGTERM stopped it
    assert metric_losses(run) == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert (tmp_path / "urgent.out").read_text() == "urgent ran\n"
    deadline = time.time() + 60
    while (states := _states(job.job_id))[-1] == "RUNNING" and time.time() < deadline:
        time.sleep(1)
    assert states == ["REQUEUED", "COMPLETED"] and _states(urgent) == ["COMPLETED"]
    # the urgent job ran on the CPUs the training job gave up, before its requeued attempt started
    (first_end, _), (_, second_start), (urgent_start,) = (
        _times(job.job_id, "End", duplicates=True), _times(job.job_id, "Start", duplicates=True),
        _times(urgent, "Start"))
    assert first_end <= urgent_start <= second_start


@slurm
def test_usr2_before_time_limit_checkpoints_and_submitit_requeues_exactly(cluster, data, reference, tmp_path):  # noqa: F811
    """The time-limit signal (``--signal=USR2@...``; here sent by scancel at once): submitit requeues."""
    run = tmp_path / "run"
    sub = submit_train(tiny(data, run), "slurm", TWO_RANKS)
    job = sub.jobs[0]
    _wait_for_steps(run, job, 3)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # to every task, as Slurm does
    wait(sub, poll_s=1, timeout_s=300)
    # both attempts log into the same files (open-mode append)
    assert "rank 0: caught SIGUSR2" in job.paths.stdout.read_text()
    assert "Requeued job" in job.paths.stdout.read_text()
    saved, resumed = _stop_and_resume_steps(job)
    assert len(saved) == 1 and resumed == saved and 3 <= saved[0] < STEPS
    # one metrics file, every step exactly once (metric_losses checks), equal to the uninterrupted run
    assert metric_losses(run) == pytest.approx(reference, rel=1e-5, abs=1e-6)
    # Slurm's record: the first attempt REQUEUED, the second COMPLETED (once its processes have exited)
    deadline = time.time() + 60
    while (states := _states(job.job_id))[-1] == "RUNNING" and time.time() < deadline:
        time.sleep(1)
    assert states == ["REQUEUED", "COMPLETED"]


def _states(job_id: str) -> list:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State", "--duplicates"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def _times(job_id: str, field: str, duplicates: bool = False) -> list:
    """sacct's Start or End of a job (every task of an array; with ``duplicates``, every attempt)."""
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", field] + ["--duplicates"] * duplicates,
                         capture_output=True, text=True, check=True).stdout
    return [datetime.fromisoformat(t) for t in out.split()]


@slurm
def test_curation_array_runs_every_part_then_finalizes_and_resubmission_skips_them(cluster, tmp_path):
    import pandas as pd

    from sigscale.curation.config import load_curation_config
    from sigscale.core.manifest import load_manifest
    from sigscale.curation.finalize import assemble_key
    from sigscale.curation.pipeline import finalize_key
    from sigscale.curation.plan import parts_of, read_plan
    from sigscale.curation.serve import ImageServer, write_url_list

    with ImageServer() as server:
        urls = pd.read_parquet(write_url_list(tmp_path / "urls.parquet", 60, server.base_url, seed=3))
        (tmp_path / "urls").mkdir()  # two files: a plan task each; part 1 (rows 20-39) takes rows from both
        urls.iloc[:30].to_parquet(tmp_path / "urls" / "a.parquet")
        urls.iloc[30:].to_parquet(tmp_path / "urls" / "b.parquet")
        cfg = load_curation_config("demo", [f"input.path={tmp_path / 'urls'}", f"output.dir={tmp_path / 'curated'}",
                                            "output.rows_per_part=20", "download.processes=1",
                                            "download.threads=4", "output.plots=false",
                                            "output.finalize_partitions=2", "output.dedup_partitions=2"])
        sub = submit_curate(cfg, "slurm", Resources(cpus_per_task=1, time_min=60, array_parallelism=2))
        key = finalize_key(cfg, parts_of(read_plan(cfg)))
        steps = [f"prepare-{key}", *(f"scatter-{key}-part-0000{i}" for i in range(3)),
                 *(f"near-{key}-p0000{k}" for k in range(2)),
                 *(f"score-{key}-{assemble_key(cfg)}-part-0000{i}" for i in range(3)),
                 f"score-cut-{key}-{assemble_key(cfg)}",
                 *(f"count-{key}-{assemble_key(cfg)}-part-0000{i}" for i in range(3)),
                 f"balance-cut-{key}-{assemble_key(cfg)}",
                 *(f"{step}-{key}-{assemble_key(cfg)}-part-0000{i}" for step in ("decide", "write") for i in range(3)),
                 "finalize"]
        parts = ["plan-00000", "plan-00001", "dedup-00000", "dedup-00001", "part-00000", "part-00001", "part-00002"]
        assert sub.names == [*parts, *steps]
        wait(sub, poll_s=1, timeout_s=400)
    out = tmp_path / "curated"
    manifest = load_manifest(out / "manifest.json")
    stats = json.loads((out / "stats.json").read_text())
    assert manifest.num_samples > 0 and stats["input_rows"] == 60
    assert sorted(p.name for p in (out / "work" / "inputs" / "part-00001").iterdir()) == [
        "file-00000.parquet", "file-00001.parquet"]  # each file's plan task wrote its share of the part
    parts_array = sub.jobs[4].job_id.split("_")[0]
    (script_path,) = (out / "slurm").glob(f"*-curate/{parts_array}_submission.sh")  # each array has its folder
    script = script_path.read_text()
    assert "#SBATCH --array=0-2%2" in script
    # each step started after the one before ended (afterok dependency on the arrays)
    arrays = list(dict.fromkeys(job.job_id.split("_")[0] for job in sub.jobs))
    # plan, dedup, parts, prepare, scatter, near, score, score-cut, count, balance-cut, decide, write, merge
    assert len(arrays) == 13
    for before, after in zip(arrays, arrays[1:]):
        assert max(_times(before, "End")) <= min(_times(after, "Start"))
    assert len(list((out / "work" / "finalize" / "drops").glob("p*.parquet"))) == 2
    # resubmission: every part and the finalize step are done, nothing is queued
    again = submit_curate(cfg, "slurm", Resources(cpus_per_task=1, array_parallelism=2))
    assert again.jobs == [] and again.skipped == [*parts, *steps]


@slurm
def test_eval_array_one_task_per_checkpoint_and_benchmark_matches_in_process_eval(cluster, slurm_run, data, tmp_path):  # noqa: F811
    from sigscale.eval.config import load_eval_config
    from sigscale.eval.run import evaluate_checkpoints

    run = slurm_run[0]
    overrides_ = [f"checkpoints=[{run / 'checkpoints'}]", f"out={tmp_path / 'report'}",
                  "eval.benchmarks=[retrieval]", f"eval.retrieval_shards={data[0]}", "eval.retrieval_max_samples=64"]
    sub = submit_eval(load_eval_config(None, overrides_), "slurm", Resources(cpus_per_task=1, time_min=60, array_parallelism=2))
    assert sub.names == ["000-step_00000024-retrieval", "001-step_00000048-retrieval", "report"]
    wait(sub, poll_s=1, timeout_s=300)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    expected = evaluate_checkpoints(load_eval_config(None, overrides_))
    assert [r["step"] for r in report["records"]] == [24, 48]
    for got, want in zip(report["records"], expected):
        got, want = got["benchmarks"]["retrieval"], want["benchmarks"]["retrieval"]
        got.pop("seconds"), want.pop("seconds")
        assert json.loads(json.dumps(want)) == got  # the same numbers, to the last digit
    assert (tmp_path / "report" / "report.html").is_file()


@slurm
def test_failing_array_task_error_names_the_task_and_its_log(cluster, data, tmp_path):  # noqa: F811
    from sigscale.core.manifest import load_manifest

    tasks = [ArrayTask("good", load_manifest, (data[0] / "manifest.json",)),
             ArrayTask("bad", load_manifest, (tmp_path / "missing" / "manifest.json",))]
    sub = submit_array(tmp_path / "run", "check", tasks, "slurm", ONE_CPU)
    with pytest.raises(JobFailedError) as err:
        wait(sub, poll_s=1, timeout_s=180)
    bad = sub.jobs[1]
    msg = str(err.value)
    assert f"check task 'bad' (job {bad.job_id}) failed: " in msg and "ManifestError" in msg
    log = bad.paths.stderr
    assert msg.endswith(f"full traceback in {log}") and "missing/manifest.json" in log.read_text()
    wait(Submission(sub.run_dir, "check", "slurm", sub.folder, ["good"], [sub.jobs[0]]), timeout_s=120)
    assert is_done(tmp_path / "run", "good") and not is_done(tmp_path / "run", "bad")
    # a resubmission would run only the failed task
    dry = submit_array(tmp_path / "run", "check", tasks, "slurm", ONE_CPU, dry_run=True)
    assert dry.names == ["bad"] and dry.skipped == ["good"]


@slurm
def test_status_shows_the_cap_and_cancel_stops_the_jobs(cluster, tmp_path, capsys):
    run = tmp_path / "run"
    tasks = [ArrayTask(f"sleep{i}", time.sleep, (600,)) for i in range(3)]
    sub = submit_array(run, "sleep", tasks, "slurm", Resources(cpus_per_task=1, time_min=60, array_parallelism=1))
    deadline = time.time() + 60
    while sorted(r["state"] for r in status(run)) != ["PENDING", "PENDING", "RUNNING"]:
        assert time.time() < deadline, status(run)
        time.sleep(1)
    time.sleep(3)  # two scheduler passes later, the cap still holds one task back per running one
    assert sorted(r["state"] for r in status(run)) == ["PENDING", "PENDING", "RUNNING"]
    assert main(["status", str(run)]) == 0
    table = capsys.readouterr().out
    assert all(job_id in table for job_id in sub.job_ids) and "RUNNING" in table and str(sub.folder) in table
    assert main(["cancel"]) == 0  # without RUN: the most recently submitted run
    assert capsys.readouterr().out.startswith(f"{run}: cancelled ")
    deadline = time.time() + 60
    while {r["state"] for r in status(run)} != {"CANCELLED"}:
        assert time.time() < deadline, status(run)
        time.sleep(1)
    with pytest.raises(JobFailedError, match=r"ended in state CANCELLED without a result; see its log .*_log.err"):
        wait(sub, timeout_s=30)
    assert main(["cancel", str(run)]) == 0
    assert "no unfinished job to cancel" in capsys.readouterr().out


@pytest.mark.multiproc
def test_local_cluster_runs_the_same_two_task_job(data, reference, tmp_path, monkeypatch):  # noqa: F811
    """`--cluster local`: submitit's local executor, same TrainJob, same numbers, no Slurm needed."""
    monkeypatch.setenv("SIGSCALE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    sub = submit_train(tiny(data, run), "local", Resources(tasks_per_node=2, time_min=60))
    results = wait(sub, poll_s=0.5, timeout_s=300)
    assert results[0]["final_weights"] == str(run / "model.safetensors")
    assert metric_losses(run) == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert sorted(p.name for p in sub.folder.glob("*_log.out")) == [f"{sub.job_ids[0]}_{r}_log.out" for r in (0, 1)]
