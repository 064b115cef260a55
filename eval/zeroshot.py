"""Zero-shot classification: prompt-ensembled class embeddings, argmax of image·text."""
from __future__ import annotations

from sigscale.errors import SigscaleError
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from sigscale.eval.embed import embed_images, embed_texts
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import SiglipModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".JPEG"}


class ZeroShotError(SigscaleError, ValueError):
    """A classification folder or class-names file is malformed."""


def load_image_folder(root: Path, classnames_file: str = "classnames.txt") -> tuple[List[Path], List[int], List[str]]:
    """ImageFolder layout: one sub-folder per class (sorted order = label), class names one per line."""
    root = Path(root)
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    names_path = root / classnames_file
    if not names_path.is_file():
        raise ZeroShotError(f"{names_path} not found; write one class name per line, in sorted folder order")
    names = [n.strip() for n in names_path.read_text(encoding="utf-8").splitlines() if n.strip()]
    if len(names) != len(dirs):
        raise ZeroShotError(f"{names_path} has {len(names)} names but {root} has {len(dirs)} class folders")
    paths, labels = [], []
    for label, d in enumerate(dirs):
        files = sorted(p for p in d.iterdir() if p.suffix in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ZeroShotError(f"no images under {root}")
    return paths, labels, names


@torch.no_grad()
def class_embeddings(model: SiglipModel, tokenizer: Tokenizer, names: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """Mean of each class's normalised prompt embeddings, re-normalised (CLIP / big_vision)."""
    texts = [t.format(n) for n in names for t in templates]
    emb = embed_texts(model, tokenizer, texts).view(len(names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def evaluate_zeroshot(model: SiglipModel, tokenizer: Tokenizer, root: Path,
                      templates: Sequence[str] = ("a photo of a {}.", "{}"), batch_size: int = 256) -> Dict:
    paths, labels, names = load_image_folder(root)
    img = embed_images(model, paths, batch_size)
    cls = class_embeddings(model, tokenizer, names, templates)
    logits = img @ cls.T
    y = torch.tensor(labels)
    top5 = logits.topk(min(5, len(names)), dim=1).indices
    return {"top1": 100.0 * (top5[:, 0] == y).float().mean().item(),
            "top5": 100.0 * (top5 == y[:, None]).any(1).float().mean().item(),
            "classes": len(names), "images": len(paths), "chance_top1": 100.0 / len(names),
            "templates": list(templates)}
