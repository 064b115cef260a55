"""`sigscale submit` without a cluster: the sbatch script of --dry-run, errors, and local job arrays."""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from sigscale.cli import main
from sigscale.core.manifest import load_manifest, write_shards
from sigscale.curation.synthetic import shard_records
from sigscale.slurm.arrays import ArrayTask, is_done, submit_array
from sigscale.slurm.executor import Resources, SubmitError, make_executor, parse_time
from sigscale.slurm.jobs import JobFailedError, RunNotFoundError, Submission, read_records, status, wait


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGSCALE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def sbatch_lines(text: str) -> set:
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


def test_dry_run_prints_the_sbatch_script_of_a_multi_node_gpu_training_job(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["submit", "train", "--config", "tiny", f"train.out_dir={run}", "train.batch_size=64",
                 "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8", "--partition", "gpu",
                 "--account", "proj42", "--time", "1-02:30:00", "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    folder = run.absolute() / "slurm" / "NNN-train"
    assert sbatch_lines(out) == {
        "#SBATCH --job-name=sigscale-train-tiny", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42", "#SBATCH --time=1590", "#SBATCH --signal=USR2@120", "#SBATCH --requeue",
        "#SBATCH --wckey=submitit", "#SBATCH --open-mode=append",
        f"#SBATCH --output={folder}/%j_0_log.out", f"#SBATCH --error={folder}/%j_0_log.err"}
    # one srun task per GPU, each unpickling the job with this interpreter
    assert (f"srun --unbuffered --output {folder}/%j_%t_log.out --error {folder}/%j_%t_log.err "
            f"{sys.executable} -u -m submitit.core._submit {folder}") in out
    assert "export SUBMITIT_EXECUTOR=slurm" in out
    assert out.rstrip().endswith("# dry run: nothing submitted (1 task(s)); NNN is numbered at submission")
    assert not (run / "slurm").exists()  # nothing written


def test_dry_run_of_curation_is_a_capped_array_over_the_url_list_parts(tmp_path, capsys):
    from sigscale.curation.serve import write_url_list

    urls = write_url_list(tmp_path / "urls.parquet", 60, "http://127.0.0.1:9", seed=3)
    code = main(["submit", "curate", "--config", "demo", f"input.path={urls}", f"output.dir={tmp_path / 'out'}",
                 "output.rows_per_part=20", "--array-parallelism", "2", "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2%2" in out and "#SBATCH --job-name=sigscale-curate-demo" in out
    assert "%A_%a_0_log.out" in out  # one log per array task
    assert out.rstrip().endswith("# dry run: nothing submitted (3 task(s)); NNN is numbered at submission")


@pytest.mark.parametrize("text, minutes", [("90", 90), ("01:30:00", 90), ("10:30", 11), ("2-00", 2880),
                                           ("1-00:00:30", 1441), ("0", 1)])
def test_parse_time_reads_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


def test_submit_errors_name_the_option_and_the_fix(tmp_path, capsys, monkeypatch):
    def error(*argv):
        assert main(["submit", *argv]) == 2
        return capsys.readouterr().err.strip()

    train = ["train", "--config", "tiny", f"train.out_dir={tmp_path / 'run'}"]
    assert error(*train, "--time", "1h") == ("sigscale: error: --time='1h' is not a Slurm time; write minutes (90), "
                                             "HH:MM:SS (01:30:00) or D-HH:MM:SS (1-00:00:00)")
    msg = error(*train, "--tasks-per-node", "3", "--dry-run")
    assert msg == ("sigscale: config error: train.batch_size=128 is not divisible by world size 3 x "
                   "train.accum_steps=1; choose a batch that is a multiple of 3")
    msg = error(*train, "--gpus-per-node", "4", "--tasks-per-node", "2", "--dry-run")
    assert "--tasks-per-node=2 with --gpus-per-node=4: training runs one task per GPU" in msg
    msg = error(*train, "--nodes", "2", "--cluster", "local")
    assert msg == "sigscale: error: --cluster local runs on this machine only; --nodes=2 needs --cluster slurm"
    msg = error(*train, "train.strategy=single", "--tasks-per-node", "2", "--dry-run")
    assert "train.strategy=single cannot use 2 tasks; set train.strategy=fsdp" in msg
    msg = error(*train, "--array-parallelism", "0", "--dry-run")
    assert msg == "sigscale: error: --array-parallelism=0 must be at least 1"
    msg = error(*train, "--collective-timeout", "0", "--dry-run")
    assert msg == "sigscale: error: --collective-timeout=0 must be at least 1 (seconds)"
    # no Slurm client on PATH: say how to get one
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    msg = error(*train, "--cluster", "slurm")
    assert msg.startswith("sigscale: error: --cluster slurm: sbatch/srun not found on PATH; run on a Slurm login "
                          "node, start the test cluster with `slurm/local_cluster.sh start`")


def test_sbatch_refusal_is_a_one_line_error_naming_what_to_check(tmp_path, monkeypatch):
    # A real executable named sbatch that refuses as Slurm does (the cluster-backed tests cover acceptance).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", "echo 'sbatch: error: invalid partition specified: nope' >&2; exit 1"),
                       ("srun", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SubmitError, match=r"^sbatch refused the job: .*invalid partition specified: nope.*; check "
                                          r"--partition, --account, --time"):
        submit_array(tmp_path / "run", "check", [ArrayTask("a", len, ("x",))], "slurm", Resources(partition="nope"))


def test_array_task_names_must_be_unique_and_file_safe(tmp_path):
    with pytest.raises(SubmitError, match="array task name 'a/b' is not file-name safe"):
        submit_array(tmp_path, "x", [ArrayTask("a/b", len, ("x",))], "local", Resources())
    with pytest.raises(SubmitError, match="array task name 'a' appears twice"):
        submit_array(tmp_path, "x", [ArrayTask("a", len, ("x",)), ArrayTask("a", len, ("y",))], "local", Resources())
    with pytest.raises(SubmitError, match="--cluster='pbs' is not one of slurm, local"):
        make_executor("pbs", tmp_path, Resources())


def test_status_and_cancel_of_a_run_without_submissions_say_so(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sigscale: error: {tmp_path} has no slurm/jobs.jsonl: nothing was submitted there; give the run dir a "
        "`sigscale submit` printed (train.out_dir / output.dir)")
    with pytest.raises(RunNotFoundError):
        read_records(tmp_path)
    assert main(["status"]) == 0 and "no submissions recorded yet" in capsys.readouterr().out
    assert main(["cancel"]) == 0 and "nothing to cancel" in capsys.readouterr().out


@pytest.fixture
def shards(tmp_path):
    write_shards(shard_records(8, seed=1), tmp_path / "shards", samples_per_shard=4)
    return tmp_path / "shards" / "manifest.json"


def log_time(job, event: str) -> datetime:
    """When submitit logged ``event`` in the task's log: `submitit INFO (2026-01-01 12:00:00,123) - event`."""
    for line in job.paths.stdout.read_text().splitlines():
        if event in line:
            return datetime.strptime(line.split("(", 1)[1].split(")", 1)[0], "%Y-%m-%d %H:%M:%S,%f")
    raise AssertionError(f"{event!r} not in {job.paths.stdout}")


def test_local_array_runs_in_capped_waves_skips_done_tasks_and_names_a_failure(tmp_path, shards, capsys):
    run = tmp_path / "run"
    good = [ArrayTask(f"ok{i}", load_manifest, (shards,)) for i in range(3)]
    bad = ArrayTask("broken", load_manifest, (tmp_path / "nowhere" / "manifest.json",))
    sub = submit_array(run, "check", good + [bad], "local", Resources(array_parallelism=2))
    with pytest.raises(JobFailedError) as err:
        wait(sub, poll_s=0.2, timeout_s=120)
    failed = sub.jobs[3]
    msg = str(err.value)
    assert msg.startswith(f"check task 'broken' (job {failed.job_id}) failed: ")
    assert "ManifestError" in msg and msg.endswith(f"; full traceback in {failed.paths.stderr}")
    assert "nowhere/manifest.json" in failed.paths.stderr.read_text()
    results = wait(Submission(run, "check", "local", sub.folder, sub.names[:3], sub.jobs[:3]), timeout_s=60)
    assert all(r.num_samples == 8 for r in results)
    assert [is_done(run, t.name) for t in good + [bad]] == [True, True, True, False]
    # waves of at most 2: the second wave started after both tasks of the first had exited
    first_wave_end = max(log_time(job, "Exiting after successful completion") for job in sub.jobs[:2])
    assert all(log_time(job, "Starting with") >= first_wave_end for job in sub.jobs[2:])
    rows = status(run)
    assert [r["state"] for r in rows] == ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED"]
    assert all(Path(r["log"]).parent == sub.folder for r in rows)
    # resubmission runs only the task that failed
    again = submit_array(run, "check", good + [bad], "local", Resources(array_parallelism=2), dry_run=True)
    assert again.names == ["broken"] and again.skipped == ["ok0", "ok1", "ok2"]


def test_wait_says_tasks_done_elapsed_and_eta_as_each_job_ends(tmp_path):
    """`submit --wait` (and the local cluster) print progress while jobs run, not only when all are done."""
    gate = tmp_path / "gate"
    quick = [ArrayTask(f"quick{i}", subprocess.run, (["true"],)) for i in range(2)]
    slow = ArrayTask("slow", subprocess.run, (["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done"],))
    sub = submit_array(tmp_path / "run", "check", quick + [slow], "local", Resources())
    out = io.StringIO()  # not a terminal: one plain line per finished job
    waiter = threading.Thread(target=wait, args=(sub,), kwargs=dict(poll_s=0.2, timeout_s=120, progress=out))
    waiter.start()
    deadline = time.monotonic() + 90
    while "check (local): 2/3 task(s) done" not in out.getvalue():
        assert time.monotonic() < deadline and waiter.is_alive(), out.getvalue()
        time.sleep(0.2)
    assert not sub.jobs[2].done()  # said while the slow task still runs
    gate.touch()
    waiter.join(120)
    clock = r"\d+:\d\d:\d\d"
    lines = out.getvalue().splitlines()
    assert re.fullmatch(rf"check \(local\): 2/3 task\(s\) done, {clock} elapsed, eta {clock}", lines[-2])
    assert re.fullmatch(rf"check \(local\): 3/3 task\(s\) done, {clock} elapsed, eta 0:00:00", lines[-1])


def test_unreachable_slurm_blames_slurm_conf_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """The real sbatch against a slurm.conf whose controller does not answer: the error names SLURM_CONF and
    the controller (with sbatch's own words), not --partition/--account, and nothing is left on disk."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        pytest.skip("the Slurm client (sbatch, srun) is not installed here")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={port}\n"
                    "MessageTimeout=1\nTCPTimeout=1\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    run = tmp_path / "run"
    assert main(["submit", "train", "--config", "tiny", f"train.out_dir={run}", "--cluster", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sigscale: error: --cluster slurm: sbatch cannot reach a Slurm controller (")
    assert "Unable to contact slurm controller" in err and f"SLURM_CONF is {conf}" in err
    assert "`scontrol ping`" in err and "--partition" not in err
    assert not run.exists()  # no stray run dir or submitit folder
    # a run dir that existed keeps what it had, and gets no new slurm/ folder
    run.mkdir()
    (run / "keep.txt").write_text("x")
    assert main(["submit", "train", "--config", "tiny", f"train.out_dir={run}", "--cluster", "slurm"]) == 2
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_submit_eval_takes_the_flags_its_error_names(tmp_path, shards, capsys):
    """`submit eval` says "pass --checkpoint PATH" when it has none, and takes --checkpoint like `sigscale eval`."""
    assert main(["submit", "eval", "--dry-run"]) == 2
    assert "pass --checkpoint PATH" in capsys.readouterr().err
    ckpts = [tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"]
    argv = ["submit", "eval", "--dry-run", "--checkpoint", *map(str, ckpts), "--out", str(tmp_path / "report"),
            "--benchmarks", "retrieval", "--retrieval-shards", str(shards.parent), "--max-samples", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-1%" in out and "(2 task(s))" in out  # one array task per checkpoint x benchmark
    assert not (tmp_path / "report").exists()  # a dry run writes nothing
