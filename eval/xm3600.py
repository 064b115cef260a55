"""Crossmodal-3600 retrieval, per language, in the official file layout.

``captions.jsonl`` has one line per image: ``{"image/key": KEY, "<lang>": {"caption": [...]}, ...}``
and images live in ``images/<KEY>.jpg`` (Thapliyal et al. 2022). Protocol as in the SigLIP paper:
all captions of a language, image→text hit if any of the image's captions is in the top k,
text→image per caption, recall@1/5/10 per language and their unweighted mean.
"""
from __future__ import annotations

from sigscale.errors import SigscaleError
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from sigscale.eval.embed import embed_images, embed_texts
from sigscale.eval.retrieval import recall_at_k
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import SiglipModel

XM3600_LANGUAGES = (
    "ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt quz ro ru sv sw te th tr uk vi zh"
).split()


class XM3600Error(SigscaleError, ValueError):
    """The XM3600 folder is incomplete or malformed."""


def load_xm3600(root: Path) -> tuple[List[str], List[Path], List[dict]]:
    root = Path(root)
    index = root / "captions.jsonl"
    if not index.is_file():
        raise XM3600Error(f"{index} not found; point eval.xm3600_dir at a folder with captions.jsonl and images/")
    keys, paths, rows = [], [], []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        key = row.get("image/key")
        if key is None:
            raise XM3600Error(f"{index}:{n} has no 'image/key'")
        path = root / "images" / f"{key}.jpg"
        if not path.is_file():
            raise XM3600Error(f"image {path} listed at {index}:{n} is missing; restore it or drop the line")
        keys.append(key)
        paths.append(path)
        rows.append(row)
    return keys, paths, rows


def evaluate_xm3600(model: SiglipModel, tokenizer: Tokenizer, root: Path,
                    languages: Optional[Sequence[str]] = None, first_caption_only: bool = False,
                    batch_size: int = 256) -> Dict:
    """Recall@k per language and the unweighted mean over languages."""
    _, paths, rows = load_xm3600(root)
    present = sorted({k for r in rows for k in r if k != "image/key"})
    languages = list(languages) if languages else present
    img = embed_images(model, paths, batch_size)
    per_lang = {}
    for lang in languages:
        texts, owners = [], []
        for i, row in enumerate(rows):
            caps = row.get(lang, {}).get("caption", [])
            for c in caps[:1] if first_caption_only else caps:
                texts.append(c)
                owners.append(i)
        if not texts:
            raise XM3600Error(f"language {lang!r} has no captions in {root}; languages present: {present}")
        # Images without a caption in this language are still candidates for text→image.
        txt = embed_texts(model, tokenizer, texts, batch_size)
        per_lang[lang] = recall_at_k(img, txt, torch.tensor(owners))
        per_lang[lang]["captions"] = len(texts)
    metrics = [m for m in next(iter(per_lang.values())) if m != "captions"]
    mean = {m: sum(v[m] for v in per_lang.values()) / len(per_lang) for m in metrics}
    return {"protocol": "first_caption_only" if first_caption_only else "all_captions (SigLIP paper)",
            "images": len(paths), "languages": per_lang, "mean": mean,
            "chance_r@1": 100.0 / len(paths)}
