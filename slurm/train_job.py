"""The training job submitit runs on every task: distributed env from Slurm, train, stop cleanly on signals.

Signals, and what each one means here (``StopSignals`` turns both into a flag that ``train`` polls at
every step boundary; the ranks agree, write a checkpoint and return ``stopped_early``):

- SIGTERM: Slurm preempts the job (``PreemptMode=REQUEUE``: SIGCONT + SIGTERM, then SIGKILL after the
  partition's ``GraceTime``), cancels it (``scancel``: SIGKILL after ``KillWait``) or reaches the time
  limit. The checkpoint must land inside that grace. Then rank 0 asks Slurm whether the job is being
  preempted (``preempted``): if so it requeues the job as for USR2; a cancelled or timed-out job ends.
- USR2 (submitit's signal): ``--signal=USR2@<signal_delay_s>`` before the time limit, or a site's
  ``PreemptParameters=send_user_signal``. After the checkpoint, submitit's own handler runs at this safe
  point: on rank 0 it dumps this callable as the requeued job's pickle, calls ``scontrol requeue``
  (the local executor: exit code 144) and exits.

A node that dies: every rank waits at most ``collective_timeout_s`` in a collective (the process group's
timeout), and multi-rank jobs run a ``Heartbeat``; the surviving rank whose collective failed raises
``PeerLostError`` naming the lost rank(s), their node and the checkpoint a resubmission resumes from.

submitit's handler is never run inside the signal itself: that would checkpoint in the middle of a
step, maybe inside a collective. The requeued job runs the same config: ``train`` resumes from the
newest checkpoint in the same run dir, so metrics.jsonl holds every step exactly once.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Dict, Optional

from submitit.helpers import Checkpointable, TorchDistributedEnvironment

from sigscale.core.errors import SigscaleError

DEFAULT_COLLECTIVE_TIMEOUT_S = 600  # a rank waits this long for its peers in any collective, then fails


class PeerLostError(SigscaleError, RuntimeError):
    """A collective failed because other ranks stopped answering; names them, their nodes and the fix."""


class Heartbeat:
    """Each rank bumps a counter in the job's rendezvous store every ``interval_s`` seconds.

    When a collective fails (a peer's node died: no FIN, no RST, only the collective timeout), the ranks
    whose counters stopped moving are the lost ones, and each rank's host name is in the store too. A
    store that no longer answers means rank 0's node (the store's host) is the one lost.
    """

    def __init__(self, rank: int, world: int, interval_s: float = 1.0) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        self.rank, self.world, self.interval_s = rank, world, interval_s
        self.master = os.environ["MASTER_ADDR"]
        # A second client of the store init_process_group created (rank 0 serves it at MASTER_PORT).
        self.store = dist.TCPStore(self.master, int(os.environ["MASTER_PORT"]), world, is_master=False,
                                   timeout=timedelta(seconds=max(5.0, 5 * interval_s)))
        self.store.set(f"sigscale/host/{rank}", socket.gethostname())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(f"sigscale/beat/{self.rank}", 1)
            except Exception:  # the store's node is gone: lost_peers says so
                return

    def close(self) -> None:
        self._stop.set()

    def lost_peers(self) -> Dict[int, str]:
        """{rank: host} of the peers that stopped beating (watched over a few intervals)."""
        try:
            before = [self.store.add(f"sigscale/beat/{r}", 0) for r in range(self.world)]
            time.sleep(3 * self.interval_s)
            after = [self.store.add(f"sigscale/beat/{r}", 0) for r in range(self.world)]
            return {r: self.store.get(f"sigscale/host/{r}").decode() for r in range(self.world)
                    if r != self.rank and after[r] == before[r]}
        except Exception:  # noqa: BLE001  (any store failure means the same: its host is unreachable)
            return {0: self.master}

    def error(self, lost: Dict[int, str], cause: BaseException, timeout_s: int, checkpoints: Path) -> PeerLostError:
        """The error a surviving rank raises: who was lost, where, and how to go on."""
        from sigscale.pretrain.checkpoint import latest_checkpoint

        who = ", ".join(f"rank {r} on node {host}" for r, host in sorted(lost.items()))
        newest = latest_checkpoint(checkpoints)
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        return PeerLostError(
            f"lost {who}: a collective on rank {self.rank} (node {socket.gethostname()}) failed within the "
            f"{timeout_s} s collective timeout ({type(cause).__name__}: {first}); check that node, then resubmit "
            f"the same config to resume from {newest.name if newest else 'the start (no checkpoint yet)'}")


class StopSignals:
    """While entered, SIGTERM and ``user_signal`` only record themselves; ``train`` polls ``is_set``."""

    def __init__(self, user_signal: int, rank: int) -> None:
        self.signals = (signal.SIGTERM, user_signal)
        self.rank = rank
        self.received: Optional[int] = None  # the first stop signal that arrived
        self.received_at = 0.0
        self._done = threading.Event()
        self._saved: Dict[int, Any] = {}

    def is_set(self) -> bool:
        return self.received is not None

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
            print(f"rank {self.rank}: caught {signal.Signals(signum).name}; stopping at the next step boundary "
                  "with a checkpoint", flush=True)

    def __enter__(self) -> "StopSignals":
        self._saved = {s: signal.getsignal(s) for s in self.signals}
        for s in self.signals:
            signal.signal(s, self._record)
        # DataLoader workers get a C handler that dies on SIGTERM (failing the step before the checkpoint
        # exists), and Slurm signals every process of the task. A signal blocked in the thread that forks
        # stays blocked in the child, so the main thread blocks SIGTERM for the run. This thread, started
        # before the block, keeps it deliverable to the process: the kernel hands it to a thread that does
        # not block it, and Python runs ``_record`` on the main thread.
        threading.Thread(target=self._done.wait, name="sigterm-receiver", daemon=True).start()
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)

    def seconds_since(self) -> float:
        """Seconds from the stop signal to now: what the checkpoint took of the grace time."""
        return time.monotonic() - self.received_at


class TrainJob(Checkpointable):
    """``train(cfg)`` on one task of a submitit job; checkpoints on SIGTERM/USR2 and is requeued."""

    def __init__(self, config_yaml: str, collective_timeout_s: int = DEFAULT_COLLECTIVE_TIMEOUT_S) -> None:
        # The resolved config travels as YAML: the job reruns exactly what was submitted.
        self.config_yaml = config_yaml
        self.collective_timeout_s = collective_timeout_s

    def __call__(self) -> Dict[str, Any]:
        import submitit

        from sigscale.core.distributed import init_distributed
        from sigscale.pretrain.config import config_from_yaml

        env = submitit.JobEnvironment()
        os.environ.setdefault("MASTER_PORT", str(master_port(env.job_id)))
        # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the Slurm (or local) task environment;
        # init_distributed reads them. All GPUs of the node stay visible: LOCAL_RANK picks one.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        print(f"rank {env.global_rank} of {env.num_tasks} on node {socket.gethostname()} "
              f"(master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})", flush=True)
        cfg = config_from_yaml(self.config_yaml, source="submitted config")
        user_signal = env._usr_sig()
        requeue: Callable = signal.getsignal(user_signal)  # submitit's checkpoint-and-requeue handler
        info = init_distributed(timeout_s=self.collective_timeout_s)
        with StopSignals(user_signal, env.global_rank) as stop:
            result = self._train(cfg, info, stop)
        if not result.stopped_early:
            return {"run_dir": str(result.run_dir), "final_weights": str(result.final_weights or ""),
                    "steps": cfg.train.steps, "rank": env.global_rank}
        self._after_stop(env, stop, result.run_dir, requeue, user_signal)
        return {}  # not reached: _after_stop exits

    def _train(self, cfg: Any, info: Any, stop: StopSignals) -> Any:
        """``train`` with a heartbeat on multi-rank jobs: a lost peer fails naming its rank and node."""
        from sigscale.core.rundir import RunDir
        from sigscale.eval.run import BenchmarkEvaluator
        from sigscale.pretrain.train import train

        evaluator = BenchmarkEvaluator(cfg.eval) if cfg.eval.benchmarks else None
        heartbeat = Heartbeat(info.rank, info.world_size) if info.world_size > 1 else None
        try:
            return train(cfg, info=info, should_stop=stop.is_set, evaluator=evaluator)
        except Exception as e:
            if heartbeat is None or isinstance(e, SigscaleError):
                raise
            lost = heartbeat.lost_peers()
            if not lost:  # every peer still beats: not a lost node, the original error says more
                raise
            raise heartbeat.error(lost, e, self.collective_timeout_s, RunDir(cfg.train.out_dir).checkpoints) from e
        finally:
            if heartbeat is not None:
                heartbeat.close()

    @staticmethod
    def _after_stop(env: Any, stop: StopSignals, run_dir: Path, requeue: Callable, user_signal: int) -> None:
        """After the stop checkpoint: requeue (USR2, or a preemption's SIGTERM) or end (other SIGTERMs); exits."""
        import torch.distributed as dist

        from sigscale.core.distributed import any_rank
        from sigscale.core.rundir import RunDir
        from sigscale.pretrain.checkpoint import latest_checkpoint

        # Signals reach the ranks microseconds apart: agree on whether this was a SIGTERM anywhere.
        terminated = any_rank(stop.received == signal.SIGTERM)
        if dist.is_initialized():
            dist.barrier()  # every rank's share of the checkpoint is on disk
            dist.destroy_process_group()
        how = (f"{signal.Signals(stop.received).name} {stop.seconds_since():.1f} s ago"
               if stop.received is not None else "another rank's signal")
        saved = (f"rank {env.global_rank}: checkpoint {latest_checkpoint(RunDir(run_dir).checkpoints).name} "
                 f"written on stop ({how})")
        if env.global_rank != 0:
            print(f"{saved}; exiting (rank 0 decides on the requeue)", flush=True)
        elif terminated and not preempted(env):
            print(f"{saved}; exiting without requeue: SIGTERM without preemption (scancel, or the time limit)",
                  flush=True)
        else:
            print(f"{saved}; requeueing", flush=True)
            if callable(requeue):
                requeue(user_signal, None)  # new pickle, `scontrol requeue` (local: exit code 144), exit
        # No result file for a stopped task: the requeued run writes it.
        sys.exit(os.EX_TEMPFAIL)


def master_port(job_id: str) -> int:
    """The job's rendezvous port, the same on every task: from the job id, below Linux's ephemeral ports.

    submitit's own pick (20000-60000 from the job id) overlaps the ephemeral range (32768-60999), so an
    outgoing connection of any process on the master node can hold it already (EADDRINUSE, seen here).
    """
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 12000


def preempted(env: Any) -> bool:
    """True when Slurm is preempting this job (``PreemptTime`` set: the GraceTime has started).

    A job that ends inside its GraceTime is not requeued by Slurm (it ends FAILED or COMPLETED); only
    one still running when the grace runs out is. So a preempted job requeues itself right after the
    checkpoint, which also hands the preemptor its resources before the grace is over.
    """
    if env.cluster != "slurm":
        return False
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(env.job_id)], capture_output=True, text=True,
                          timeout=60)
    fields = dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)
    return fields.get("PreemptTime", "None") not in ("None", "Unknown")
