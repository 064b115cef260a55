"""AdamW with SigLIP's defaults, parameter groups without decay, warmup + cosine schedule."""
from __future__ import annotations

import math
from typing import AbstractSet, Dict, List, Tuple

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


def plain_name(name: str) -> str:
    """Parameter name in the plain model: without DDP's ``module.`` and checkpoint wrappers' segments."""
    parts = [p for p in name.split(".") if p != "_checkpoint_wrapped_module"]
    return ".".join(parts[1:] if parts and parts[0] == "module" else parts)


def tower_of(name: str) -> str:
    """vision | text | head (t', b) for a plain parameter name."""
    first = name.split(".", 1)[0]
    return {"visual": "vision", "text": "text"}.get(first, "head")


def param_groups(model: nn.Module, cfg: TrainConfig, pretrained: AbstractSet[str] = frozenset()) -> List[dict]:
    """One group per (tower, decayed?) with its own lr and weight decay.

    Per-tower lr multipliers and "no decay on pretrained weights" are the fine-tuning recipe of
    the SigLIP paper §4. Weight decay is big_vision's decoupled form, ``p -= sched * wd * p``; torch
    applies ``p -= lr_group * sched * wd_torch * p``, so each group gets ``wd_torch = wd / lr_group``.
    """
    groups: Dict[Tuple[str, bool], List[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = plain_name(name)
        decays = not no_decay(plain, p) and (cfg.pretrained_weight_decay or plain not in pretrained)
        groups.setdefault((tower_of(plain), decays), []).append(p)
    out = []
    for (tower, decays), params in sorted(groups.items()):
        lr = cfg.lr * (getattr(cfg.lr_mult, tower) if tower != "head" else 1.0)
        wd = cfg.weight_decay / lr if decays and lr > 0 else 0.0
        out.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"{tower}/{'decay' if decays else 'no_decay'}"})
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, pretrained: AbstractSet[str] = frozenset()) -> torch.optim.AdamW:
    """AdamW(β2=0.95 by default) over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, cfg, pretrained), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Linear warmup from 0, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.warmup_steps, cfg.steps))
