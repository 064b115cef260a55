"""Babel-ImageNet: ImageNet zero-shot classification in many languages (Geigle et al. 2023, arXiv 2306.08658).

The labels file as released (github.com/gregor-ge/Babel-ImageNet ``data/babel_imagenet.json``, also
shipped by CLIP_benchmark) maps a language code to ``[class indices into ImageNet-1k, class names]``;
a language lacks the classes nobody could name in it. The optional prompts file
(``data/nllb_dist13b_prompts.json``) maps a language code to templates with ``{}``; a language
without prompts there uses the English templates (the ImageNet folder's ``templates.txt``, else
CLIP's 80 + ``{}``). Images come from an ImageNet val folder (``n01440764/...``).

Protocol (Babel-ImageNet paper; CLIP_benchmark's ``babel_imagenet``): for each language, only the
val images of that language's classes, classified among those classes; top-1/top-5 per language,
the number of classes per language, and the unweighted mean over languages.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from sigscale.eval.embed import embed_images, eval_mode
from sigscale.eval.imagenet import IMAGENET_CLASSNAMES, IMAGENET_WNIDS
from sigscale.eval.sources import EvalDataError
from sigscale.eval.zeroshot import class_embeddings, default_templates, load_image_folder, topk_accuracy
from sigscale.pretrain.tokenizer import Tokenizer

PROTOCOL = ("per language: the ImageNet val images of the classes named in that language, classified among "
            "those classes ({templates} templates); unweighted mean over languages")
PROTOCOL_IDS = {True: "language_prompts", False: "english_templates"}


class BabelImageNetError(EvalDataError):
    """The Babel-ImageNet labels or prompts file is missing or malformed."""


def _read_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BabelImageNetError(f"Babel-ImageNet {what} file {path} does not exist; fix the path") from e
    except json.JSONDecodeError as e:
        raise BabelImageNetError(f"{path} is not valid JSON ({e}); restore the released {what} file") from e
    if not isinstance(doc, dict) or not doc:
        raise BabelImageNetError(f"{path} must map language codes to {what}; it holds {type(doc).__name__}")
    return doc


def load_babel_labels(path: Path, languages: Sequence[str] = ()) -> Dict[str, Tuple[List[int], List[str]]]:
    """``{language: (ImageNet class indices, class names)}`` from a ``babel_imagenet.json``."""
    doc = _read_json(path, "labels")
    wanted = list(languages) or sorted(doc)
    unknown = [l for l in wanted if l not in doc]
    if unknown:
        raise BabelImageNetError(f"languages {unknown} are not in {path}; it has {sorted(doc)[:10]}...")
    out = {}
    for lang in wanted:
        entry = doc[lang]
        ok = (isinstance(entry, list) and len(entry) == 2 and len(entry[0]) == len(entry[1]) > 0
              and all(isinstance(i, int) and 0 <= i < len(IMAGENET_CLASSNAMES) for i in entry[0])
              and len(set(entry[0])) == len(entry[0]))
        if not ok:
            raise BabelImageNetError(f"{path}[{lang!r}] must be [distinct ImageNet class indices 0-999, names of the "
                                     "same length]; restore the released babel_imagenet.json")
        out[lang] = (list(entry[0]), [str(n) for n in entry[1]])
    return out


def write_babel_imagenet(root: Path, images: Iterable[Tuple[int, bytes]], labels: Dict[str, Tuple[List[int], List[str]]],
                         prompts: Optional[Dict[str, List[str]]] = None) -> Dict[str, Path]:
    """Write (ImageNet class index, JPEG bytes) images as an ImageNet val folder (``val/n01440764/...``), the
    labels as ``babel_imagenet.json`` and the per-language templates as ``prompts.json``, in the released layout."""
    root = Path(root)
    val = root / "val"
    for n, (index, jpeg) in enumerate(images, 1):
        (val / IMAGENET_WNIDS[index]).mkdir(parents=True, exist_ok=True)
        (val / IMAGENET_WNIDS[index] / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(jpeg)
    out = {"imagenet": val, "labels": root / "babel_imagenet.json"}
    out["labels"].write_text(json.dumps({l: [list(i), list(n)] for l, (i, n) in labels.items()}, ensure_ascii=False),
                             encoding="utf-8")
    if prompts:
        out["prompts"] = root / "prompts.json"
        out["prompts"].write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
    return out


def _classify(img: torch.Tensor, labels: torch.Tensor, cls: torch.Tensor, idxs: List[int]) -> Dict[str, float]:
    """Top-k among one language's classes, on the images of those classes."""
    local = torch.full((len(IMAGENET_CLASSNAMES),), -1, dtype=torch.long)
    local[torch.tensor(idxs)] = torch.arange(len(idxs))
    keep = local[labels] >= 0
    return topk_accuracy(img[keep], cls, local[labels[keep]])


def evaluate_babel_imagenet(model: nn.Module, tokenizer: Tokenizer, imagenet_dir: Path, labels_file: Path,
                            prompts_file: Optional[Path] = None, languages: Sequence[str] = (),
                            batch_size: int = 256, rank: int = 0, world: int = 1) -> Dict:
    """Top-1/top-5 and class count per language, and the mean; the metrics on rank 0, {} on the other ranks."""
    babel = load_babel_labels(labels_file, languages)
    prompts = _read_json(prompts_file, "prompts") if prompts_file else {}
    english = default_templates(imagenet_dir)
    paths, labels, names = load_image_folder(imagenet_dir)
    if len(names) != len(IMAGENET_CLASSNAMES):
        raise BabelImageNetError(f"{imagenet_dir} is not an ImageNet val folder (synset sub-folders, no "
                                 "classnames.txt); Babel-ImageNet indexes the 1000 ImageNet classes")
    y = torch.tensor(labels)
    per_lang, without_images = {}, []
    with eval_mode(model):
        img = embed_images(model, paths, batch_size, rank, world)
        for lang, (idxs, lang_names) in babel.items():
            templates = prompts.get(lang) or english
            cls = class_embeddings(model, tokenizer, lang_names, templates, 4 * batch_size, rank, world)
            images = int(torch.isin(y, torch.tensor(idxs)).sum())
            if rank != 0:
                continue
            if not images:  # none of its classes in the folder: nothing to measure, said so
                without_images.append(lang)
                continue
            per_lang[lang] = {**_classify(img, y, cls, idxs), "classes": len(idxs), "images": images,
                              "templates": len(templates), "chance_top1": 100.0 / len(idxs)}
    if rank != 0:
        return {}
    if not per_lang:
        raise BabelImageNetError(f"no image under {imagenet_dir} belongs to a class named in {labels_file}")
    mean = {m: sum(v[m] for v in per_lang.values()) / len(per_lang) for m in ("top1", "top5")}
    return {"protocol": PROTOCOL.format(templates="per-language" if prompts else "English"),
            "protocol_id": PROTOCOL_IDS[bool(prompts)],
            "images": len(paths), "languages": per_lang, "mean": mean,
            "languages_without_images": without_images,
            "chance_top1": sum(v["chance_top1"] for v in per_lang.values()) / len(per_lang)}
