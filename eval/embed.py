"""Batched embedding of image files and captions with any loaded SigLIP model."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from sigscale.pretrain.data import preprocess_image
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import SiglipModel


@torch.no_grad()
def embed_images(model: SiglipModel, paths: Sequence[Path], batch_size: int = 256) -> torch.Tensor:
    size = model.cfg.vision.image_size
    out = []
    for s in range(0, len(paths), batch_size):
        pixels = torch.stack([preprocess_image(Path(p).read_bytes(), size) for p in paths[s:s + batch_size]])
        out.append(model.encode_image(pixels))
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: SiglipModel, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
    out = [model.encode_text(tokenizer(list(texts[s:s + batch_size]))) for s in range(0, len(texts), batch_size)]
    return torch.cat(out)
