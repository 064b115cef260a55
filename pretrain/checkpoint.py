"""Sharded checkpoints with torch.distributed.checkpoint, written atomically, resumed exactly.

Layout of ``<run>/checkpoints``::

    step_00000100/          a complete checkpoint: DCP shards + .metadata, rank_<r>.pt, COMPLETE (step, world size)
    step_00000200.tmp/      one being written (or cut short by a kill): never read, removed by the next run
    latest                  name of the newest complete checkpoint

A complete checkpoint damaged afterwards (a truncated or deleted file) is found before loading and
skipped with a warning for the previous complete one.

Model and optimizer go through DCP, so a checkpoint written by W ranks loads on any other world
size (DCP reshards). What is private to a rank (data position, RNG) goes to ``rank_<r>.pt``.
A DeepSpeed engine writes its own ZeRO files (``deepspeed/``) into the same atomic layout; those
reload on the same world size (DeepSpeed's ``ds_to_universal`` converts them for another one).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sigscale.core.config import ConfigError
from sigscale.core.errors import SigscaleError
from sigscale.pretrain.sharding import is_deepspeed

COMPLETE = "COMPLETE"
DEEPSPEED_TAG = "deepspeed"
DCP_METADATA = ".metadata"
# Test seam: "<phase>@<step>" (phase "written": all files in step_X.tmp, not yet published;
# "published": renamed and pointed to) holds rank 0 there until it is killed, after writing PAUSED
# into the checkpoint dir, so that a test can kill -9 at exactly that instant.
PAUSE_ENV = "SIGSCALE_PAUSE_CHECKPOINT"
PAUSED = "paused"


class CheckpointError(SigscaleError):
    """No loadable checkpoint is left to resume from."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def list_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint (damaged or not: see :func:`checkpoint_damage`)."""
    done = list_checkpoints(ckpt_dir)
    return done[-1] if done else None


def _marker(path: Path) -> Optional[Dict[str, Any]]:
    """What COMPLETE records, {"step", "world_size"} (older checkpoints: the step alone); None if unreadable."""
    text = (path / COMPLETE).read_text().strip()
    try:
        marker = json.loads(text) if text.startswith("{") else {"step": int(text)}
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint holds (from its COMPLETE marker, else from its name)."""
    step = (_marker(Path(path)) or {}).get("step")
    return int(step) if step is not None else int(Path(path).name.split("_")[-1])


def _saved_world_size(path: Path) -> Optional[int]:
    return (_marker(path) or {}).get("world_size")


def _dcp_damage(path: Path) -> Optional[str]:
    if not (path / DCP_METADATA).is_file():
        return f"{DCP_METADATA} is missing"
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated pickle raises anything from EOFError to UnpicklingError
        return f"{DCP_METADATA} unreadable: {type(e).__name__}"
    needed: Dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = (path / name).stat().st_size if (path / name).is_file() else None
        if have is None or have < size:
            return f"{name} is {'missing' if have is None else f'{have} of {size} bytes'}"
    return None


def checkpoint_damage(path: Path) -> Optional[str]:
    """What makes the complete checkpoint ``path`` unloadable (a file missing or cut short), or None if intact.

    Checked from sizes and archive directories only, so it costs no load and every rank sees the same.
    """
    path = Path(path)
    if _marker(path) is None:
        return f"{COMPLETE} is unreadable"
    world = _saved_world_size(path)
    ranks = [path / f"rank_{r}.pt" for r in range(world)] if world else sorted(path.glob("rank_*.pt"))
    if not ranks:
        return "no rank_<r>.pt file"
    files = ranks + (sorted((path / DEEPSPEED_TAG).rglob("*.pt")) if (path / DEEPSPEED_TAG).is_dir() else [])
    for f in files:  # torch.save writes zip archives: a cut one has lost its central directory
        if not f.is_file() or not zipfile.is_zipfile(f):
            return f"{f.relative_to(path)} is {'missing' if not f.is_file() else 'truncated'}"
    return None if (path / DEEPSPEED_TAG).is_dir() else _dcp_damage(path)


def newest_loadable(ckpt_dir: Path, warn: bool = True) -> Optional[Path]:
    """The newest complete checkpoint that is not damaged, warning about each damaged newer one it passes.

    Raises :class:`CheckpointError` when there are complete checkpoints but every one is damaged.
    """
    damaged = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        problem = checkpoint_damage(path)
        if problem is None:
            for bad, why in damaged if warn else []:
                warnings.warn(f"checkpoint {bad} is damaged ({why}); resuming from the previous complete one, {path}")
            return path
        damaged.append((path, problem))
    if damaged:
        newest, problem = damaged[0]
        raise CheckpointError(
            f"every complete checkpoint in {ckpt_dir} is damaged, the newest {newest} ({problem}); restore its "
            f"files, or delete {ckpt_dir} to train from the start")
    return None


def discard_partial(ckpt_dir: Path) -> List[Path]:
    """Remove what killed writers left (``step_X.tmp`` dirs, ``latest.tmp``); only while no run writes here."""
    ckpt_dir = Path(ckpt_dir)
    leftovers = sorted(ckpt_dir.glob("step_*.tmp")) + sorted(ckpt_dir.glob("latest.tmp"))
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return leftovers


def _pause_for_test(ckpt_dir: Path, phase: str, step: int) -> None:
    if os.environ.get(PAUSE_ENV) != f"{phase}@{step}":
        return
    (ckpt_dir / PAUSED).write_text(f"{phase}@{step}")
    threading.Event().wait()  # until killed


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    shared: Dict[str, Any], private: Dict[str, Any], keep_last: int = 3) -> Path:
    """Write step ``step`` atomically: every rank writes into a .tmp dir, rank 0 renames it when all are done.

    ``shared`` (schedule, step, ...) is identical on all ranks; ``private`` (data position, RNG) is per rank.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f"step_{step:08d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if is_deepspeed(model):
        model.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"shared": shared, "private": private}, tmp / f"rank_{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        _pause_for_test(ckpt_dir, "written", step)
        world = dist.get_world_size() if dist.is_initialized() else 1
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": world}))
        if final.exists():  # re-saving the same step (e.g. after a requeue): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        pointer = ckpt_dir / "latest.tmp"
        pointer.write_text(final.name)
        pointer.replace(ckpt_dir / "latest")
        for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        _pause_for_test(ckpt_dir, "published", step)
    _barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore model and optimizer in place (resharding as needed); returns shared and private state.

    ``private`` is None when this rank did not exist in the saving run (a larger world size now).
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker); pick another or start fresh")
    saved_world = _saved_world_size(path) or len(list(path.glob("rank_*.pt")))
    world = dist.get_world_size() if dist.is_initialized() else 1
    written_by_deepspeed = (path / DEEPSPEED_TAG).is_dir()
    if written_by_deepspeed != is_deepspeed(model):
        raise ConfigError(
            f"{path} was written by {'DeepSpeed' if written_by_deepspeed else 'FSDP/DDP (DCP)'} but this run uses "
            f"{'DeepSpeed' if is_deepspeed(model) else 'FSDP/DDP'}; resume with the strategy that wrote it, "
            "or start a new train.out_dir"
        )
    if written_by_deepspeed:
        if saved_world != world:
            raise ConfigError(
                f"{path} holds DeepSpeed ZeRO shards of {saved_world} ranks; this run has {world}. Convert it "
                "with DeepSpeed's ds_to_universal.py (stages 1-2 also need --inject_missing_state) and load it "
                "with the universal-checkpoint option, or resume on the same number of ranks"
            )
        model.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_module_strict=True)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mine = path / f"rank_{_rank()}.pt"
    source = mine if mine.is_file() else path / "rank_0.pt"
    extra = torch.load(source, weights_only=True)
    return {"shared": extra["shared"], "private": extra["private"] if saved_world == world else None,
            "saved_world_size": saved_world}


@dataclass
class Restored:
    step: int
    path: Path
    data: Optional[Dict[str, Any]]  # this rank's data position; None when the world size changed
    saved_world_size: int


class Checkpointer:
    """Everything a run needs to continue exactly: model, optimizer, schedule, data position, RNG."""

    def __init__(self, ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
                 keep_last: int) -> None:
        self.dir, self.model, self.optimizer, self.schedule = Path(ckpt_dir), model, optimizer, schedule
        self.keep_last = keep_last

    def restore(self) -> Optional[Restored]:
        """Load the newest intact complete checkpoint in place (RNG included when the world size is unchanged)."""
        path = newest_loadable(self.dir, warn=_rank() == 0)
        if path is None:
            return None
        state = load_checkpoint(path, self.model, self.optimizer)
        self.schedule.load_state_dict(state["shared"]["schedule"])
        private = state["private"]
        if private is not None:
            torch.set_rng_state(private["rng"])
        return Restored(state["shared"]["step"], path, private["data"] if private else None, state["saved_world_size"])

    def has(self, step: int) -> bool:
        return latest_checkpoint(self.dir) == self.dir / f"step_{step:08d}"

    def save(self, step: int, data: Dict[str, Any]) -> Path:
        """Checkpoint ``step`` steps done, with this rank's data position (collective)."""
        return save_checkpoint(self.dir, step, self.model, self.optimizer,
                               shared={"step": step, "schedule": self.schedule.state_dict()},
                               private={"data": data, "rng": torch.get_rng_state()}, keep_last=self.keep_last)
