"""Run a function on W gloo processes on this machine and collect what each rank returns.

Usage from any test file::

    from dist_helpers import run_distributed

    def _work(rank, world_size, n):          # top level, so spawned processes can import it
        return torch.distributed.get_rank() * n

    assert run_distributed(_work, 2, 10) == [0, 10]

The function runs after ``init_process_group("gloo")`` (default group = all W processes) and its
return value must be picklable by ``torch.save``. An exception on any rank fails the call with
that rank's traceback; a collective stuck for ``timeout`` seconds raises instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port the OS reports free on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, threads: int,
           timeout: float, args: tuple, kwargs: dict) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, threads: Optional[int] = None,
                    timeout: float = 120.0, **kwargs: Any) -> List[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo processes; per-rank results.

    ``threads`` (torch intra-op threads per process) defaults to sharing the machine's cores.
    """
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="dist_helpers_") as out_dir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), out_dir, threads, timeout, args, kwargs),
                 nprocs=world_size, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
