"""Distributed helpers every stage shares: joining the process group, rank agreement, the torchrun launcher.

Nothing here knows about models: how a model is sharded is ``sigscale.pretrain.sharding``'s business.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        return dist.group.WORLD if dist.is_initialized() else None


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Join the job's process group from torchrun/Slurm env vars; a lone process stays single."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return DistInfo(device=torch.device("cuda:0" if torch.cuda.is_available() else "cpu"))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device)


def launched_by_torchrun() -> bool:
    """True inside a rank that torchrun (or Slurm through submitit) started."""
    return "RANK" in os.environ


def torchrun_command(nproc: int, module: str, args: Sequence[str] = ()) -> List[str]:
    """The command that runs ``python -m module args`` on ``nproc`` local ranks (env rendezvous).

    The launcher is torchrun behind ``sigscale.core.torchrun``: a rank's user error ends it with that
    one line and exit status 2 rather than torchrun's traceback.
    """
    return [sys.executable, "-m", "sigscale.core.torchrun", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


# The launching command's pid, in the environment of everything it starts: a rank checks that the
# launcher still lives once its own death signal is armed, and the run lock names it as the holder.
LAUNCHER_PID_ENV = "SIGSCALE_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _death_signal_setter() -> Callable[[], None]:
    """A function that arms PR_SET_PDEATHSIG = SIGKILL for the calling process (a no-op off Linux)."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


# Resolved at import, before any fork: a forked child (a DataLoader worker, the child of
# launch_ranks before exec) should not dlopen, another thread may have held the loader's lock.
_arm_death_signal = _death_signal_setter()


def die_with_parent(*_: object) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); a no-op elsewhere.

    Takes and ignores any arguments, so it also serves as a DataLoader ``worker_init_fn``.
    """
    _arm_death_signal()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def die_with_launcher() -> None:
    """In a rank started by :func:`launch_ranks`: die when torchrun's agent dies, which dies with the launcher.

    torchrun starts each rank in a session of its own, so a kill of the launcher's process group
    misses them; without this they would train on as orphans beside a restarted run.
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is None:
        return
    die_with_parent()
    # The parent may have died before the line above took effect: then the signal never comes.
    if os.getppid() == 1 or not _alive(int(launcher)):
        os._exit(1)


def launch_ranks(command: Sequence[str]) -> int:
    """Run a torchrun ``command`` (see :func:`torchrun_command`) so that it and its ranks die with this process.

    The agent gets PR_SET_PDEATHSIG towards this process and each rank towards the agent
    (:func:`die_with_launcher`): a SIGKILL of this process alone ends the whole tree.
    """
    parent = os.getpid()

    def arm() -> None:  # runs in the child between fork and exec; the flag survives exec
        _arm_death_signal()
        if os.getppid() != parent:
            os._exit(1)

    return subprocess.call(list(command), env=dict(os.environ, **{LAUNCHER_PID_ENV: str(parent)}), preexec_fn=arm)


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the rank's GPU under NCCL, else the CPU."""
    backend = str(dist.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend and torch.cuda.is_available() \
        else torch.device("cpu")


def any_rank(flag: bool, world: Optional[int] = None) -> bool:
    """True on every rank when ``flag`` is true on any rank of ``world`` (default: the whole group).

    Decisions that change control flow (skip a step, stop, end of data) must agree on all ranks,
    or the ranks diverge into different collectives and hang.
    """
    if world == 1 or not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def raise_on_any_rank(error: Optional[BaseException]) -> None:
    """Raise on every rank the error any rank hit (lowest rank first); collective, so every rank must call it.

    A rank that stops alone leaves the others waiting in their next collective (until the timeout under
    NCCL, or for ever when Slurm tasks are not killed together); after this call they all stop.
    """
    if not any_rank(error is not None):
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors: List[Optional[BaseException]] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next(e for e in errors if e is not None)
    raise error


def gather_strided(local: torch.Tensor, world: int) -> torch.Tensor:
    """Reassemble rows that rank r holds for global items r, r + W, ... into the global order, on every rank."""
    if world == 1:
        return local
    dev = collective_device()
    count = torch.tensor([local.shape[0]], device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((sum(sizes), *local.shape[1:]), dtype=local.dtype)
    for r, (part, n) in enumerate(zip(parts, sizes)):
        out[r::world] = part[:n].cpu()
    return out
