"""COCO and Flickr30k retrieval on Karpathy's splits, in the file layout they are distributed in.

``dataset_coco.json`` / ``dataset_flickr30k.json`` (Karpathy & Fei-Fei 2015, "Deep Visual-Semantic
Alignments", cs.stanford.edu/people/karpathy/deepimagesent) is one object::

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
                 "split": "test", "sentids": [0, 1, ...], "cocoid": 391895,
                 "sentences": [{"tokens": [...], "raw": "A man ...", "imgid": 0, "sentid": 0}, ...]}, ...],
     "dataset": "coco"}

(``cocoid`` in COCO only; Flickr30k has no ``filepath``). An image is read from
``<folder>/<filepath>/<filename>``, else ``<folder>/images/<filename>``. The test split holds 5,000
images for COCO and 1,000 for Flickr30k, 5 captions each.

Protocol (CLIP, Radford et al. 2021, Table 13; SigLIP, Zhai et al. 2023, Table 2): every ``raw``
caption of the split; image→text is a hit when any of the image's captions is in the top k,
text→image is scored per caption; recall@1/5/10.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch.nn as nn

from sigscale.eval.retrieval import grouped_recall
from sigscale.eval.sources import EvalDataError
from sigscale.pretrain.tokenizer import Tokenizer

KARPATHY_FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
PROTOCOL = ("Karpathy {split} split, all captions: I→T hit if any of the image's captions is in the top k, "
            "T→I per caption (CLIP / SigLIP papers)")
PROTOCOL_ID = "karpathy_{split}_all_captions"  # CLIP_benchmark's mscoco_captions / flickr30k protocol too


class KarpathyError(EvalDataError):
    """A Karpathy-split JSON or its image folder is missing or malformed."""


def write_karpathy(root: Path, dataset: str, items: Iterable[Tuple[str, str, bytes, List[str]]]) -> Path:
    """Write (split, file name, JPEG bytes, captions) items as ``dataset_<dataset>.json`` + images, every field
    of the release: COCO entries carry ``filepath`` (images under it) and ``cocoid``, Flickr30k's sit in images/."""
    root = Path(root)
    folder = "val2014" if dataset == "coco" else "images"
    (root / folder).mkdir(parents=True, exist_ok=True)
    images, sentid = [], 0
    for imgid, (split, filename, jpeg, captions) in enumerate(items):
        (root / folder / filename).write_bytes(jpeg)
        sentences = [{"tokens": re.findall(r"\w+", raw.lower()), "raw": raw, "imgid": imgid, "sentid": sentid + j}
                     for j, raw in enumerate(captions)]
        entry = {"filepath": folder, "filename": filename} if dataset == "coco" else {"filename": filename}
        entry.update({"imgid": imgid, "split": split, "sentids": [s["sentid"] for s in sentences],
                      "sentences": sentences})
        if dataset == "coco":
            entry["cocoid"] = imgid
        images.append(entry)
        sentid += len(sentences)
    index = root / KARPATHY_FILES[dataset]
    index.write_text(json.dumps({"images": images, "dataset": dataset}, ensure_ascii=False), encoding="utf-8")
    return root


def _image_path(root: Path, entry: dict) -> Path:
    first = root / entry.get("filepath", "") / entry["filename"]
    return first if first.is_file() else root / "images" / entry["filename"]


def load_karpathy(root: Path, dataset: str, split: str = "test") -> Tuple[List[Path], List[str], List[int]]:
    """Image paths, captions and each caption's image index for one split of ``root/dataset_<dataset>.json``."""
    index = Path(root) / KARPATHY_FILES[dataset]
    if not index.is_file():
        raise KarpathyError(f"{index} not found; point the {dataset} data folder at the folder holding "
                            f"{KARPATHY_FILES[dataset]} (Karpathy splits) and its images")
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        entries = [(e, [s["raw"] for s in e["sentences"]]) for e in doc["images"] if e["split"] == split]
        names = [e["filename"] for e, _ in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise KarpathyError(f"{index} is not a Karpathy-split file (missing or malformed {e!s}); restore the "
                            f"original {KARPATHY_FILES[dataset]}") from e
    if not entries:
        splits = sorted({e.get("split") for e in doc["images"]})
        raise KarpathyError(f"{index} has no images in split {split!r}; its splits are {splits}; "
                            "set eval.karpathy_split to one of them")
    paths, texts, owners = [], [], []
    for i, ((entry, raws), name) in enumerate(zip(entries, names)):
        path = _image_path(Path(root), entry)
        if not path.is_file():
            raise KarpathyError(f"image {name} (imgid {entry.get('imgid')}) of {index} is missing at "
                                f"{Path(root) / entry.get('filepath', '') / name} or {path}; restore it")
        paths.append(path)
        texts += raws
        owners += [i] * len(raws)
    return paths, texts, owners


def evaluate_karpathy(model: nn.Module, tokenizer: Tokenizer, root: Path, dataset: str, split: str = "test",
                      batch_size: int = 256, rank: int = 0, world: int = 1) -> Dict:
    """Recall@1/5/10 on a Karpathy split of COCO or Flickr30k; the metrics on rank 0, {} on the other ranks."""
    paths, texts, owners = load_karpathy(root, dataset, split)
    res = grouped_recall(model, tokenizer, paths, {"all": (texts, owners)}, batch_size, rank, world)
    if rank != 0:
        return {}
    return {"protocol": PROTOCOL.format(split=split), "protocol_id": PROTOCOL_ID.format(split=split), "split": split, "images": len(paths), "captions": len(texts),
            "all": res["all"], "chance_r@1": 100.0 / len(paths)}
