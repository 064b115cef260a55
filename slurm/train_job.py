"""The training job submitit runs on every task: distributed env from Slurm, train, requeue on preemption.

Preemption protocol. Slurm (or ``scancel --signal=USR2``, or submitit's ``job._interrupt()``) sends
USR2 to every task. submitit's own handler would checkpoint and requeue right inside the signal
handler, i.e. in the middle of a step, maybe inside a collective. Instead, while ``train`` runs, USR2
only sets a flag; ``train`` polls it at each step boundary, the ranks agree, write a checkpoint and
return ``stopped_early``. Only then, on the main thread at a safe point, submitit's handler runs:
on rank 0 it dumps this callable as the requeued job's pickle (``Checkpointable.checkpoint``),
calls ``scontrol requeue`` (the local executor: exit code 144) and exits. The requeued job runs the
same config: ``train`` resumes from the newest checkpoint in the same run dir and truncates
nothing it has not redone, so metrics.jsonl holds every step exactly once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Dict

from submitit.helpers import Checkpointable, TorchDistributedEnvironment


class TrainJob(Checkpointable):
    """``train(cfg)`` on one task of a submitit job; checkpoints and requeues itself on USR2."""

    def __init__(self, config_yaml: str) -> None:
        # The resolved config travels as YAML: the job reruns exactly what was submitted.
        self.config_yaml = config_yaml

    def __call__(self) -> Dict[str, Any]:
        import submitit
        import torch.distributed as dist

        from sigscale.eval.run import BenchmarkEvaluator
        from sigscale.pretrain.config import config_from_yaml
        from sigscale.pretrain.train import train

        env = submitit.JobEnvironment()
        # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the Slurm (or local) task environment;
        # init_distributed reads them. All GPUs of the node stay visible: LOCAL_RANK picks one.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfg = config_from_yaml(self.config_yaml, source="submitted config")
        evaluator = BenchmarkEvaluator(cfg.eval) if cfg.eval.benchmarks else None
        sig = env._usr_sig()
        requeue = signal.getsignal(sig)  # submitit's checkpoint-and-requeue handler
        stop = threading.Event()
        signal.signal(sig, lambda signum, frame: stop.set())
        # Preemption starts with SIGTERM to every process of the step, DataLoader workers included, and
        # torch gives each worker a C handler that dies on it (which then fails the step). submitit
        # ignores SIGTERM in this process anyway; a blocked signal stays blocked in forked/spawned
        # workers, so block it for the whole run: only USR2 (the flag) and SIGKILL act.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            result = train(cfg, should_stop=stop.is_set, evaluator=evaluator)
        finally:
            signal.signal(sig, requeue)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if not result.stopped_early:
            return {"run_dir": str(result.run_dir), "final_weights": str(result.final_weights or ""),
                    "steps": cfg.train.steps, "rank": env.global_rank}
        if dist.is_initialized():
            dist.barrier()  # every rank's share of the checkpoint is on disk
            dist.destroy_process_group()
        print(f"rank {env.global_rank}: stopped at a step boundary with a checkpoint; requeueing", flush=True)
        if callable(requeue):
            requeue(sig, None)  # rank 0: new pickle, requeue, exit; other ranks: returns
        # No result file for a preempted task: the requeued run writes it.
        sys.exit(os.EX_TEMPFAIL)
