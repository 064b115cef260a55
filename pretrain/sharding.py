"""The one place that applies distribution to the plain towers: FSDP2, DeepSpeed ZeRO, DDP, checkpointing.

The model code knows nothing of this (torchtitan's ``parallelize`` pattern): each transformer
block of each tower is optionally wrapped for activation checkpointing and becomes its own FSDP2
unit, then the root is sharded so t', b and the embeddings are too. DeepSpeed needs the optimizer
to build its engine, so it is applied by ``deepspeed_engine`` after the optimizer exists; the few
places where the step differs (backward, optimizer step, gradient sync) are the small functions
at the bottom of this file.
"""
from __future__ import annotations

import contextlib
import json
import os
import weakref
from pathlib import Path
from typing import Any, Dict, Iterator

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from sigscale.core.config import ConfigError
from sigscale.core.distributed import DistInfo
from sigscale.pretrain.config import STRATEGIES, TrainConfig
from sigscale.pretrain.towers import SiglipModel


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
    if strategy in ("single", "deepspeed"):  # deepspeed: wrapped by deepspeed_engine() once the optimizer exists
        return model
    raise ConfigError(f"train.strategy={cfg.strategy!r} is unknown; use one of {list(STRATEGIES)}")


def compute_precision(cfg: TrainConfig, info: DistInfo) -> contextlib.AbstractContextManager:
    """The context the towers run in: bf16 autocast where the strategy does not cast by itself.

    FSDP2 casts through its MixedPrecisionPolicy and DeepSpeed through its bf16 config; DDP and a
    single process would silently compute in fp32, so ``precision=bf16`` autocasts them.
    """
    strategy = cfg.strategy if info.world_size > 1 else "single"
    if cfg.precision == "bf16" and strategy in ("ddp", "single"):
        return torch.autocast(info.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_deepspeed(cfg: TrainConfig, info: DistInfo) -> bool:
    return cfg.strategy == "deepspeed" and info.world_size > 1


def deepspeed_config(cfg: TrainConfig, micro_batch: int, world_size: int) -> Dict[str, Any]:
    """Our config in DeepSpeed's terms; a user JSON (train.deepspeed_config) may add keys, not contradict."""
    ours: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.accum_steps,
        "train_batch_size": micro_batch * cfg.accum_steps * world_size,
        # The step owns accumulation (embedding cache): backward() only accumulates, step() reduces.
        "managed_gradient_accumulation": False,
        # DeepSpeed would clip at 1.0 by default; make ours explicit (0 disables, as in torch).
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": False},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not cfg.deepspeed_config:
        return ours
    path = Path(cfg.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed_config={path}: cannot read it as JSON ({e})") from e

    def merge(base: Dict[str, Any], extra: Dict[str, Any], where: str) -> Dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                out[key] = merge(base[key], value, f"{where}{key}.")
            elif key in base and base[key] != value and value != "auto":
                raise ConfigError(
                    f"{path}: {where}{key}={value!r} contradicts sigscale's {base[key]!r} (derived from train.*); "
                    f"set it through the sigscale config instead, or write \"auto\""
                )
            elif key not in base:
                out[key] = value
        return out

    return merge(ours, user, "")


def deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, info: DistInfo,
                     micro_batch: int) -> nn.Module:
    """Wrap the plain model and our optimizer in a DeepSpeed ZeRO engine (stage from train.zero_stage)."""
    if info.device.type == "cpu":
        # Without this DeepSpeed may pick its CUDA accelerator from a CUDA build of torch on a GPU-less host.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if info.device.type == "cpu":
        # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce (~150 s per fresh machine);
        # marking the op unavailable makes it use the torch.distributed (gloo) collectives instead.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, micro_batch, info.world_size),
                                      dist_init_required=False)
    return engine


def is_deepspeed(model: nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def backward(model: nn.Module, loss: torch.Tensor) -> None:
    if is_deepspeed(model):
        model.backward(loss, scale_wrt_gas=False)  # our micro-batch gradients are already exact
    else:
        loss.backward()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip DDP's all-reduce on all but the last micro-batch; FSDP2 reduce-scatters each one so
    gradients stay sharded, DeepSpeed reduces in step()."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip, step, zero the gradients; returns the global gradient norm before clipping."""
    if is_deepspeed(model):
        model.step()  # clips at train.grad_clip (see deepspeed_config), steps, zeroes
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unsharded fp32 weights on CPU, named as in the plain model; collective (every rank calls it)."""
    if is_deepspeed(model):
        import deepspeed

        params = list(model.module.parameters())
        # ZeRO-3 keeps only a shard per rank; gathering is a no-op for stages 0-2.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in model.module.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


_INFERENCE_HOOKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def inference_module(model: nn.Module) -> nn.Module:
    """The module whose ``encode_image``/``encode_text`` to call: DDP and DeepSpeed unwrapped, FSDP2 hooked.

    FSDP2 only gathers a module's parameters around ``forward``; registering the encode methods makes
    them gather the root's parameters too (``register_fsdp_forward_method``), once per model: a
    second registration would wrap the methods twice.
    """
    if isinstance(model, FSDPModule):
        if model not in _INFERENCE_HOOKED:
            register_fsdp_forward_method(model, "encode_image")
            register_fsdp_forward_method(model, "encode_text")
            _INFERENCE_HOOKED.add(model)
        return model
    inner = getattr(model, "module", None)  # DistributedDataParallel, DeepSpeedEngine
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "encode_image") else model


def reshard_after_inference(model: nn.Module) -> None:
    """Shard FSDP2 parameters again after encoding outside a training step.

    FSDP2 keeps the root's parameters gathered after a forward (expecting a backward): mid-training
    that would leave full copies in memory and unsharded tensors where the optimizer and
    checkpointing expect shards.
    """
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
