"""Crash anywhere: kill -9 at any instant, damaged checkpoints, a second launcher on a live run.

The runs are real `sigscale train` processes (one process, or two FSDP ranks under torchrun) killed
with SIGKILL; every process of a run carries a tag in its environment, so the test finds the ones
that left the launcher's process group too (torchrun starts ranks in sessions of their own).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, List

import pytest

from sigscale.core.rundir import RunDir
from sigscale.core.runlock import RunBusyError, RunLock
from sigscale.pretrain.checkpoint import (PAUSE_ENV, PAUSED, CheckpointError, checkpoint_damage, latest_checkpoint,
                                          list_checkpoints, newest_loadable)
from sigscale.pretrain.config import load_config
from sigscale.pretrain.train import train
from test_train import data, metric_losses, overrides  # noqa: F401  (data is a fixture)

RUN_TAG = "SIGSCALE_TEST_RUN"
STEPS, CKPT_EVERY = 12, 4
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
    """Poll ``condition`` until true; a generous deadline only guards against a hang, it measures nothing."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def run_processes(tag: str) -> List[int]:
    """Live processes whose environment carries ``tag`` (zombies have none): the launcher and all it started."""
    needle = f"{RUN_TAG}={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                pids.append(int(d.name))
    return pids


class Launch:
    """One `sigscale train` process tree, started in a session (process group) of its own."""

    def __init__(self, data, run: Path, nproc: int, pause: str = "") -> None:
        self.tag = uuid.uuid4().hex
        env = dict(os.environ, OMP_NUM_THREADS="1", **{RUN_TAG: self.tag})
        env.pop(PAUSE_ENV, None)
        if pause:
            env[PAUSE_ENV] = pause
        cmd = [sys.executable, "-m", "sigscale.cli", "train", "--config", "tiny", "--nproc", str(nproc),
               *overrides(data, run, STEPS, CKPT_EVERY)]
        self.log = run.parent / f"{run.name}-{self.tag}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def resumed_at(self) -> int:
        """The step the launch resumed from (0 when it started fresh)."""
        found = RESUMED.findall(self.output())
        return int(found[0]) if found else 0

    def kill(self, group: bool = True) -> None:
        """SIGKILL the launcher's process group (or the launcher alone); assert rc -9 and no process of the run left."""
        (os.killpg if group else os.kill)(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL
        # The kernel delivers the death signals as each parent exits: wait for them, then name survivors.
        try:
            wait_for(lambda: not run_processes(self.tag), "the run's processes to die", timeout=60)
        except AssertionError:
            raise AssertionError(f"processes of the killed run survived: {run_processes(self.tag)}") from None

    def finish(self) -> None:
        assert self.proc.wait(timeout=600) == 0, self.output()[-3000:]


def second_launcher_is_refused(data, run: Path, nproc: int, live: Launch) -> None:
    """A second `sigscale train` on a live run dir: rc 2, one line naming the run dir and the live launcher."""
    other = subprocess.run([sys.executable, "-m", "sigscale.cli", "train", "--config", "tiny", "--nproc", str(nproc),
                            *overrides(data, run, STEPS, CKPT_EVERY)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert other.returncode == 2, other.stderr[-3000:]
    line = other.stderr.strip()
    assert "\n" not in line and str(run) in line and f"process {live.proc.pid} " in line, line


def ckpt_names(run: Path) -> List[str]:
    return sorted(p.name for p in (run / RunDir.CHECKPOINTS).iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.multiproc)])
def test_kill_9_anywhere_then_resume_equals_uninterrupted(tmp_path, data, nproc):
    """Killed mid-step, mid-checkpoint-write (process group) and just after a checkpoint (the launcher
    alone), then resumed each time: the losses equal an uninterrupted run's exactly and each step is
    logged once; no process outlives a kill, and a second launcher on the live run is refused."""
    ref = Launch(data, tmp_path / "ref", nproc)
    ref.finish()
    run = tmp_path / "killed"
    ckpts = run / RunDir.CHECKPOINTS

    # 1. Mid-step: step 5 is logged, the checkpoint of step 4 written, the next steps under way.
    first = Launch(data, run, nproc)
    wait_for(lambda: len(RunDir(run).read_jsonl(RunDir(run).metrics)) >= 6 or first.proc.poll() is not None,
             "step 5 to be logged")
    if nproc > 1:  # the ranks sit outside the launcher's process group: killpg alone would miss them
        assert any(os.getsid(pid) != first.proc.pid for pid in run_processes(first.tag))
    first.kill()
    logged = len(RunDir(run).read_jsonl(RunDir(run).metrics))
    at_kill = int(latest_checkpoint(ckpts).name.split("_")[-1])
    assert logged > at_kill  # steps were lost and must be redone

    # 2. Mid-checkpoint-write: every file of step 8 is in step_00000008.tmp, nothing published yet.
    second = Launch(data, run, nproc, pause="written@8")
    wait_for(lambda: (ckpts / PAUSED).is_file() or second.proc.poll() is not None, "the writer to pause")
    assert second.resumed_at() == at_kill
    assert "step_00000008.tmp" in ckpt_names(run) and "step_00000008" not in ckpt_names(run)
    second_launcher_is_refused(data, run, nproc, live=second)
    second.kill()
    (ckpts / PAUSED).unlink()

    # 3. Just after a checkpoint: step 8 published and pointed to, the run not yet past it.
    third = Launch(data, run, nproc, pause="published@8")
    wait_for(lambda: (ckpts / PAUSED).is_file() or third.proc.poll() is not None, "the writer to pause")
    assert third.resumed_at() == 4  # the half-written step 8 was never read
    assert "step_00000008" in ckpt_names(run) and not [n for n in ckpt_names(run) if n.endswith(".tmp")]
    third.kill(group=False)  # the launcher alone: the agent, the ranks and data workers must follow it
    (ckpts / PAUSED).unlink()

    last = Launch(data, run, nproc)  # the lock died with the killed run: nothing refuses this one
    last.finish()
    assert last.resumed_at() == 8
    assert metric_losses(run) == metric_losses(tmp_path / "ref")  # exact, and metric_losses checks each step once


def short_run(data, run: Path):
    """10 planned steps with a checkpoint every 2, kept 3."""
    return load_config("tiny", overrides(data, run, 10, 2, ["train.keep_last=3"]))


def stopped_at_step_8(data, run: Path) -> Path:
    """A single-process run of 10 steps stopped after 8 (as a preemption stops it): checkpoints 4, 6 and 8."""
    done = []
    assert train(short_run(data, run), should_stop=lambda: len(done) == 8, hooks=[done.append]).stopped_early
    assert [p.name for p in list_checkpoints(run / RunDir.CHECKPOINTS)] == ["step_00000004", "step_00000006",
                                                                          "step_00000008"]
    return run


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, data):
    return stopped_at_step_8(data, tmp_path_factory.mktemp("ckpt") / "run")


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(RunDir.LOCK))
    return dst


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage,named", [
    (lambda step: truncate(next(step.glob("*.distcp"))), r"__\d+_\d+\.distcp is \d+ of \d+ bytes"),
    (lambda step: (step / ".metadata").unlink(), r"\.metadata is missing"),
    (lambda step: truncate(step / "rank_0.pt"), r"rank_0\.pt is truncated"),
    (lambda step: (step / "rank_0.pt").unlink(), r"rank_0\.pt is missing"),
    (lambda step: (step / "COMPLETE").write_text('{"step": 8, "wor'), r"COMPLETE is unreadable"),
], ids=["truncated-shard", "deleted-metadata", "truncated-rank-file", "deleted-rank-file", "cut-marker"])
def test_damaged_checkpoint_is_found_and_named(tmp_path, checkpointed, damage, named):
    """Each kind of damage is seen before loading and named; with none intact left, the error says what to do."""
    ckpts = copy_run(checkpointed, tmp_path / "run") / RunDir.CHECKPOINTS
    steps = list_checkpoints(ckpts)
    assert all(checkpoint_damage(s) is None for s in steps)
    damage(steps[-1])
    assert re.fullmatch(named, checkpoint_damage(steps[-1]))
    with pytest.warns(UserWarning, match=f"{re.escape(str(steps[-1]))} is damaged .*resuming from the previous "
                                         f"complete one, {re.escape(str(steps[-2]))}"):
        assert newest_loadable(ckpts) == steps[-2]
    for older in steps[:-1]:
        shutil.rmtree(older)
    newest = re.escape(str(steps[-1]))
    with pytest.raises(CheckpointError, match=f"every complete checkpoint in {re.escape(str(ckpts))} is damaged, "
                                              f"the newest {newest} \\({named}\\).*delete .* to train from the start"):
        newest_loadable(ckpts)


def test_truncated_newest_checkpoint_resumes_from_the_previous_and_cleans_leftovers(tmp_path, data):
    """A cut shard of step 8 sends the resume to step 6 with a warning; the redone steps 6-7 have exactly
    the first run's losses, each step is logged once, and what killed writers left is removed."""
    run = stopped_at_step_8(data, tmp_path / "run")
    first = metric_losses(run)
    ckpts = run / RunDir.CHECKPOINTS
    truncate(next((ckpts / "step_00000008").glob("*.distcp")))
    (ckpts / "step_00000009.tmp").mkdir()
    (ckpts / "step_00000009.tmp" / "__0_0.distcp").write_bytes(b"half")
    (ckpts / "latest.tmp").write_text("step_00000009")
    with pytest.warns(UserWarning, match="step_00000008 is damaged .*previous complete one, .*step_00000006"):
        train(short_run(data, run))
    again = metric_losses(run)
    assert len(again) == 10 and again[6:8] == first[6:8]
    assert ckpt_names(run) == ["latest", "step_00000006", "step_00000008", "step_00000010"]


def test_cli_stops_with_one_line_when_every_checkpoint_is_damaged(tmp_path, data):
    """No intact checkpoint left: `sigscale train` exits 2 with one line naming the broken file and the fix."""
    run = stopped_at_step_8(data, tmp_path / "run")
    ckpts = run / RunDir.CHECKPOINTS
    for step in list_checkpoints(ckpts):
        truncate(step / "rank_0.pt")
    out = subprocess.run([sys.executable, "-m", "sigscale.cli", "train", "--config", "tiny",
                          *overrides(data, run, 10, 2, ["train.keep_last=3"])],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert out.stderr.strip() == line, out.stderr  # one line, no traceback, no warnings before it
    assert f"the newest {ckpts / 'step_00000008'} (rank_0.pt is truncated)" in line and f"delete {ckpts}" in line


def test_run_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    """A held lock refuses a second holder by name; a holder killed with SIGKILL leaves no stale lock."""
    run = RunDir(tmp_path / "run")
    hold = ("import sys, time; from sigscale.core.rundir import RunDir; from sigscale.core.runlock import RunLock; "
            "lock = RunLock(RunDir(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run.root)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(RunBusyError, match=f"{re.escape(str(run.root))} is being trained by process {holder.pid} "
                                           f".*kill {holder.pid}.*another train.out_dir"):
        RunLock(run).check_free()
    holder.kill()
    assert holder.wait() == -signal.SIGKILL
    with RunLock(run):  # the kernel dropped the dead holder's lock
        with pytest.raises(RunBusyError, match=f"process {os.getpid()} "):
            RunLock(run).acquire()  # exclusive within one process too: each RunLock opens its own file
    RunLock(run).check_free()
