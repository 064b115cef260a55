"""The one place that applies distribution to the plain towers: FSDP2, DDP, activation checkpointing.

The model code knows nothing of this (torchtitan's ``parallelize`` pattern): each transformer
block of each tower is optionally wrapped for activation checkpointing and becomes its own FSDP2
unit, then the root is sharded so t', b and the embeddings are too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from sigscale.pretrain.config import ConfigError, TrainConfig
from sigscale.pretrain.towers import SiglipModel


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


def apply_activation_checkpointing(model: SiglipModel, vision: bool, text: bool) -> None:
    """Recompute each chosen tower's blocks in backward instead of storing their activations."""
    if vision:
        for i, blk in enumerate(model.visual.blocks):
            model.visual.blocks[i] = checkpoint_wrapper(blk)
    if text:
        for i, blk in enumerate(model.text.transformer.resblocks):
            model.text.transformer.resblocks[i] = checkpoint_wrapper(blk)


def parallelize(model: SiglipModel, cfg: TrainConfig, info: DistInfo) -> nn.Module:
    """Apply checkpointing and the configured strategy; returns the module to call in the step."""
    apply_activation_checkpointing(model, cfg.grad_checkpointing.vision, cfg.grad_checkpointing.text)
    strategy = cfg.strategy if info.world_size > 1 else "single"
    if strategy == "fsdp":
        bf16 = cfg.precision == "bf16"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for blocks in model.blocks().values():
            for blk in blocks:
                fully_shard(blk, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if strategy == "ddp":
        return DistributedDataParallel(model)
    if strategy == "single":
        return model
    raise ConfigError(
        f"train.strategy={cfg.strategy!r} is not available in this build yet; use fsdp, ddp or single"
    )
