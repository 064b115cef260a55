"""XTD10 multilingual retrieval (Aggarwal & Kale 2020, arXiv 2012.05107) in its distributed layout.

The release (github.com/adobe-research/Cross-lingual-Test-Dataset-XTD10) holds 1,000 MSCOCO images
listed one file name per line in ``XTD10/test_image_names.txt``, and one caption file per language
aligned line by line with it: ``XTD10/test_1kcaptions_<lang>.txt`` for en es it ko pl ru tr zh,
``MIC/test_1kcaptions_{de,fr}.txt`` and ``STAIR/test_1kcaptions_jp.txt`` (CLIP_benchmark's
``multilingual_mscoco`` loader reads the same files). Point eval.xtd10_dir at the repository root
(or at a folder holding the name list and the caption files); the images, named as listed, live
in eval.xtd10_images (default ``<xtd10_dir>/images``).

Protocol: one caption per image and language; recall@1/5/10 per language against the 1,000 images
and the unweighted mean over languages.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from sigscale.eval.retrieval import grouped_recall, mean_over
from sigscale.eval.sources import EvalDataError
from sigscale.pretrain.tokenizer import Tokenizer

NAMES_FILE = "test_image_names.txt"
CAPTION_FILE = re.compile(r"test_1kcaptions_(.+)\.txt")
RELEASE_FOLDERS = ("XTD10", "MIC", "STAIR")
PROTOCOL = "one caption per image and language, 1k images: recall@k per language; unweighted mean over languages"
PROTOCOL_ID = "one_caption"  # CLIP_benchmark's multilingual_mscoco_captions reads the same files the same way


class XTD10Error(EvalDataError):
    """The XTD10 folder is incomplete or its files are not aligned."""


def _lines(path: Path) -> List[str]:
    # Split on newlines only: str.splitlines would also split captions at U+2028 and break the alignment.
    return [l.rstrip("\r") for l in Path(path).read_text(encoding="utf-8").rstrip("\r\n").split("\n")]


def caption_files(root: Path) -> Dict[str, Path]:
    """``{language: caption file}`` in ``root`` and the release's sub-folders (XTD10, MIC, STAIR)."""
    found: Dict[str, Path] = {}
    for folder in (root, *(root / f for f in RELEASE_FOLDERS)):
        for path in sorted(folder.glob("test_1kcaptions_*.txt")):
            lang = CAPTION_FILE.fullmatch(path.name).group(1)
            if lang in found:
                raise XTD10Error(f"two caption files for {lang!r}: {found[lang]} and {path}; keep one")
            found[lang] = path
    return found


def load_xtd10(root: Path, images: Optional[Path] = None,
               languages: Sequence[str] = ()) -> Tuple[List[Path], Dict[str, List[str]]]:
    """Image paths and, per language, the captions aligned with them (all files checked)."""
    root = Path(root)
    names_path = next((p for p in (root / NAMES_FILE, root / "XTD10" / NAMES_FILE) if p.is_file()), None)
    if names_path is None:
        raise XTD10Error(f"{root / NAMES_FILE} not found (nor in {root / 'XTD10'}); point eval.xtd10_dir at the "
                         "XTD10 release (adobe-research/Cross-lingual-Test-Dataset-XTD10)")
    names = _lines(names_path)
    image_dir = Path(images) if images else root / "images"
    paths = [image_dir / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise XTD10Error(f"{len(missing)} images listed in {names_path} are missing, e.g. {missing[0]}; "
                         "set eval.xtd10_images to the folder holding them (MSCOCO 2014 images)")
    files = caption_files(root)
    wanted = list(languages) or sorted(files)
    unknown = [l for l in wanted if l not in files]
    if unknown or not wanted:
        raise XTD10Error(f"no caption file test_1kcaptions_<lang>.txt for {unknown or 'any language'} under {root}; "
                         f"languages present: {sorted(files)}")
    captions = {}
    for lang in wanted:
        lines = _lines(files[lang])
        if len(lines) != len(names) or not all(l.strip() for l in lines):
            raise XTD10Error(f"{files[lang]} has {len(lines)} lines (some empty?) but {names_path} lists "
                             f"{len(names)} images; caption files must align line by line with the image list")
        captions[lang] = lines
    return paths, captions


def evaluate_xtd10(model: nn.Module, tokenizer: Tokenizer, root: Path, images: Optional[Path] = None,
                   languages: Sequence[str] = (), batch_size: int = 256, rank: int = 0, world: int = 1) -> Dict:
    """Recall@1/5/10 per language and their mean; the metrics on rank 0, {} on the other ranks."""
    paths, captions = load_xtd10(root, images, languages)
    owners = list(range(len(paths)))
    per_lang = grouped_recall(model, tokenizer, paths, {l: (c, owners) for l, c in captions.items()},
                              batch_size, rank, world)
    if rank != 0:
        return {}
    return {"protocol": PROTOCOL, "protocol_id": PROTOCOL_ID, "images": len(paths), "languages": per_lang, "mean": mean_over(per_lang),
            "chance_r@1": 100.0 / len(paths)}
