"""SigLIP towers: a timm ViT image tower and an open_clip text transformer (shapes: config.PRESETS).

Nothing here knows about distribution, precision or checkpointing: ``sharding.py`` wraps
these modules. The towers come from timm and open_clip (no ViT is rewritten here); this file
only picks their shapes and ties them into one module with SigLIP's temperature and bias.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Dict, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from timm.models.vision_transformer import VisionTransformer

from sigscale.core.config import ConfigError
from sigscale.pretrain.config import PRESETS, ModelConfig, TextConfig, VisionConfig, validate_model


def _act(name: str) -> type[nn.Module]:
    return partial(nn.GELU, approximate="tanh") if name == "gelu_tanh" else nn.GELU


def _mlp_ratio(width: int, mlp_dim: int) -> float:
    # timm and open_clip size the MLP as int(width * ratio); nudge so the floor lands on mlp_dim.
    ratio = (mlp_dim + 0.5) / width
    assert int(width * ratio) == mlp_dim
    return ratio


def build_vision_tower(cfg: VisionConfig) -> VisionTransformer:
    """timm ViT as SigLIP uses it: no class token, learned pos-embedding, MAP-head pooling."""
    return VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=0, global_pool="map",
        embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
        mlp_ratio=_mlp_ratio(cfg.width, cfg.mlp_dim), class_token=False,
        norm_layer=partial(nn.LayerNorm, eps=cfg.ln_eps), act_layer=_act(cfg.act),
    )


def build_text_tower(cfg: TextConfig, embed_dim: int) -> TextTransformer:
    """open_clip text transformer: bidirectional, pooled at the last position (big_vision 'last')."""
    return TextTransformer(
        context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
        heads=cfg.heads, layers=cfg.depth, mlp_ratio=_mlp_ratio(cfg.width, cfg.mlp_dim),
        output_dim=embed_dim, no_causal_mask=True, pool_type="last",
        proj_type="linear" if cfg.projection else "none", proj_bias=True,
        act_layer=_act(cfg.act), norm_layer=partial(nn.LayerNorm, eps=cfg.ln_eps),
    )


class SiglipModel(nn.Module):
    """Image tower + text tower + learnable log-temperature t' and bias b."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_vision_tower(cfg.vision)
        self.text = build_text_tower(cfg.text, embed_dim=cfg.vision.width)
        # 1-element tensors rather than scalars: FSDP2 cannot shard 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_logit_bias))

    @property
    def embed_dim(self) -> int:
        return self.cfg.vision.width

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.visual(pixels)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text(token_ids)
        return F.normalize(x, dim=-1) if normalize else x

    def temperature_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """t' (clamped only if the config asks) and b, as 1-element tensors."""
        scale = self.logit_scale
        if self.cfg.max_logit_scale is not None:
            scale = scale.clamp(max=self.cfg.max_logit_scale)
        return scale, self.logit_bias

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor):
        scale, bias = self.temperature_and_bias()
        return self.encode_image(pixels), self.encode_text(token_ids), scale, bias

    def blocks(self) -> Dict[str, list[nn.Module]]:
        """The transformer blocks of each tower: the units sharding and checkpointing wrap."""
        return {"vision": list(self.visual.blocks), "text": list(self.text.transformer.resblocks)}

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter as construction does (meta-device FSDP init copies rank 0's weights instead)."""
        self.visual.init_weights()
        self.visual.attn_pool.init_weights()
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for mod in self.text.modules():
            if isinstance(mod, nn.Linear):
                nn.init.zeros_(mod.bias) if mod.bias is not None else None
            elif isinstance(mod, nn.MultiheadAttention):
                nn.init.zeros_(mod.in_proj_bias)
        self.text.init_parameters()
        self.logit_scale.fill_(self.cfg.init_logit_scale)
        self.logit_bias.fill_(self.cfg.init_logit_bias)


def resolve_model_config(name_or_config: Union[str, ModelConfig], **overrides) -> ModelConfig:
    if isinstance(name_or_config, ModelConfig):
        cfg = name_or_config
    elif name_or_config in PRESETS:
        cfg = dataclasses.replace(PRESETS[name_or_config], preset=name_or_config)
    else:
        raise ConfigError(f"unknown model {name_or_config!r}; choose a preset from {sorted(PRESETS)} or pass a ModelConfig")
    for key, value in overrides.items():
        tower, _, field_name = key.partition("_")
        if tower in ("vision", "text") and hasattr(getattr(cfg, tower), field_name):
            cfg = dataclasses.replace(cfg, **{tower: dataclasses.replace(getattr(cfg, tower), **{field_name: value})})
        else:
            raise ConfigError(f"unknown model override {key!r}; use vision_<field> or text_<field>")
    return cfg


def create_model(name_or_config: Union[str, ModelConfig], device: Union[str, torch.device] = "cpu", **overrides) -> SiglipModel:
    """Build a SigLIP model from a preset name or a ModelConfig (``device='meta'`` costs no memory).

    Overrides like ``text_vocab_size=4000`` replace single tower fields, e.g. to follow a tokenizer.
    """
    cfg = resolve_model_config(name_or_config, **overrides)
    validate_model(cfg)
    with torch.device(device):
        return SiglipModel(cfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tower_flops_per_sample(cfg: ModelConfig) -> Dict[str, float]:
    """Forward matmul FLOPs per sample of each tower (2·MACs), for MFU estimates.

    Counts QKV/out projections, attention scores and weighted sums, MLPs, patch embedding,
    MAP head and text projection; ignores norms, softmax and activations (<1%).
    """
    def encoder(width: int, mlp: int, depth: int, seq: int) -> float:
        proj = 4 * width * width + 2 * width * mlp
        attn = 2 * seq * width
        return 2.0 * depth * seq * (proj + attn)

    v, t = cfg.vision, cfg.text
    n = (v.image_size // v.patch_size) ** 2
    vision = encoder(v.width, v.mlp_dim, v.depth, n) + 2.0 * n * 3 * v.patch_size ** 2 * v.width
    # MAP head: one latent query attending over n tokens, plus its MLP.
    vision += 2.0 * (2 * n * v.width * v.width + 2 * v.width * v.width + 2 * n * v.width + 2 * v.width * v.mlp_dim)
    text = encoder(t.width, t.mlp_dim, t.depth, t.context_length)
    if t.projection:
        text += 2.0 * t.width * v.width
    return {"vision": vision, "text": text}


def param_summary(model: SiglipModel) -> Dict[str, int]:
    return {
        "vision": count_params(model.visual),
        "text": count_params(model.text),
        "total": count_params(model),
    }

