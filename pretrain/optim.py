"""AdamW with SigLIP's defaults, parameter groups without decay, warmup + cosine schedule."""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn

from sigscale.pretrain.config import TrainConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, embeddings, positional embeddings, the MAP latent, t' and b get no decay."""
    leaf = name.rsplit(".", 1)[-1]
    return (
        param.ndim <= 1
        or leaf in {"pos_embed", "positional_embedding", "latent", "logit_scale", "logit_bias"}
        or "token_embedding" in name
    )


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(β2=0.95); big_vision's decoupled wd (p -= sched·wd·p) equals torch's wd/lr."""
    # torch applies p -= lr_t * weight_decay * p; big_vision applies p -= (lr_t / lr) * wd * p.
    torch_wd = cfg.weight_decay / cfg.lr if cfg.lr > 0 else 0.0
    return torch.optim.AdamW(param_groups(model, torch_wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Linear warmup from 0, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.warmup_steps, cfg.steps))
