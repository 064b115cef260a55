"""Zero-shot classification (big_vision / open_clip protocol): prompt-ensembled class embeddings, argmax.

Each class name is put into every template; prompts are canonicalised as big_vision does
(``prompt_engineering._canonicalize``: '_' to space, punctuation removed except ',' in names and
'{}' in templates, lower case, whitespace collapsed), then encoded (the tokenizer canonicalises
again when configured). A class embedding is the mean of its L2-normalised prompt embeddings,
re-normalised; an image's prediction is the argmax of image · class (CLIP, Radford et al. 2021).

Data: an ImageFolder tree (one sub-folder per class, sorted order = label) with a class-names file,
or the standard ImageNet val layout (``n01440764/...``) with no file, which is classified against
all 1000 CLIP class names; or webdataset shards whose samples carry a class (``.cls`` or json
``"class"``/``"label"``: an index, a synset id or a name).
"""
from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sigscale.eval.embed import embed_images, embed_texts, eval_mode
from sigscale.eval.imagenet import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES, WNID_TO_INDEX
from sigscale.eval.sources import EvalDataError, eval_shards, shard_samples
from sigscale.pretrain.tokenizer import Tokenizer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
# CLIP's 80 templates + '{}' as big_vision prompts ImageNet, or the templates a folder brings.
TEMPLATE_PROTOCOLS = {True: "clip_templates", False: "own_templates"}


class ZeroShotError(EvalDataError):
    """A classification folder, shard set or class-names file is malformed."""


def canonicalize_prompt(text: str, keep: str) -> str:
    """big_vision's prompt canonicalisation, keeping the exact string ``keep`` (',' or '{}')."""
    text = text.replace("_", " ")
    text = keep.join(part.translate(str.maketrans("", "", string.punctuation)) for part in text.split(keep))
    return re.sub(r"\s+", " ", text.lower()).strip()


def prompts(names: Sequence[str], templates: Sequence[str]) -> List[str]:
    """Class-major prompt list: ``templates`` for class 0, then for class 1, ..."""
    names = [canonicalize_prompt(n, ",") for n in names]
    templates = [canonicalize_prompt(t, "{}") for t in templates]
    return [t.format(n) for n in names for t in templates]


def read_lines(path: Path, what: str) -> List[str]:
    """The non-empty stripped lines of a class-names or templates file; an empty file is an error."""
    lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise ZeroShotError(f"{what} file {path} is empty; write one entry per line")
    return lines


def read_templates(path: Path) -> List[str]:
    """Prompt templates, one per line, each with one '{}' where the class name goes."""
    templates = read_lines(path, "templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ZeroShotError(f"templates in {path} need exactly one '{{}}' each; fix {bad[:3]}")
    return templates


def default_templates(root: Path) -> List[str]:
    """``root/templates.txt`` if present, else the 80 CLIP templates + '{}'."""
    path = Path(root) / TEMPLATES_FILE
    return read_templates(path) if path.is_file() else list(IMAGENET_TEMPLATES)


def load_image_folder(root: Path, classnames: Optional[Path] = None) -> Tuple[List[Path], List[int], List[str]]:
    """Image paths, labels and candidate class names of a classification folder.

    With a class-names file (``classnames`` or ``root/classnames.txt``), names follow the sorted
    sub-folders. Without one, every sub-folder must be an ImageNet synset id: labels are ImageNet
    indices and all 1000 classes are candidates, even when the folder holds only some of them.
    """
    root = Path(root)
    if not root.is_dir():
        raise ZeroShotError(f"classification folder {root} does not exist; point it at an ImageFolder tree "
                            "(one sub-folder of images per class)")
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not dirs:
        raise ZeroShotError(f"{root} has no class sub-folders; expected e.g. {root}/n01440764/*.JPEG")
    names_path = Path(classnames) if classnames else root / CLASSNAMES_FILE
    if names_path.is_file():
        names = read_lines(names_path, "class-names")
        if len(names) != len(dirs):
            raise ZeroShotError(f"{names_path} has {len(names)} names but {root} has {len(dirs)} class folders; "
                                "write one name per folder, in sorted folder order")
        label_of = {d.name: i for i, d in enumerate(dirs)}
    elif classnames:
        raise ZeroShotError(f"class-names file {classnames} does not exist")
    else:
        unknown = [d.name for d in dirs if d.name not in WNID_TO_INDEX]
        if unknown:
            raise ZeroShotError(f"{root} has no {CLASSNAMES_FILE} and folders {unknown[:3]} are not ImageNet synset "
                                f"ids; write {names_path} with one class name per folder, in sorted order")
        names, label_of = list(IMAGENET_CLASSNAMES), WNID_TO_INDEX
    paths, labels, empty = [], [], []
    for d in dirs:
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            empty.append(d.name)
        paths += files
        labels += [label_of[d.name]] * len(files)
    if empty:
        raise ZeroShotError(f"class folders {empty[:3]} under {root} hold no images ({sorted(IMAGE_SUFFIXES)}); "
                            "restore them or remove the folders")
    return paths, labels, names


def _label(sample: Dict, index: Dict[str, int], names_given: bool) -> object:
    if sample["cls"] is not None:
        return sample["cls"]
    meta = sample["json"]
    value = meta.get("class", meta.get("label"))
    if value is None:
        raise ZeroShotError(f"sample {sample['key']!r} in {sample['url']} has no class: add a .cls member "
                            "or a 'class' field to its json")
    if isinstance(value, str) and names_given:
        if value not in index:
            raise ZeroShotError(f"sample {sample['key']!r} in {sample['url']} has class {value!r}, not in the "
                                "class-names file; fix the file or the sample")
        return index[value]
    return value


def scan_shard_classes(shards: Path, classnames: Optional[Path] = None) -> Tuple[List[int], List[str]]:
    """Labels (sample order) and candidate class names of classification shards; reads no image."""
    names = read_lines(Path(classnames), "class-names") if classnames else None
    index = {n: i for i, n in enumerate(names)} if names else {}
    raw = [_label(s, index, names is not None) for s in shard_samples(shards)]
    if not raw:
        raise ZeroShotError(f"the shards at {shards} hold no samples")
    if all(isinstance(v, int) for v in raw):
        if names is None:
            names = list(IMAGENET_CLASSNAMES)
        if max(raw) >= len(names) or min(raw) < 0:
            raise ZeroShotError(f"class index {max(raw)} in {shards} is out of range for {len(names)} class names; "
                                "pass the class-names file the labels index")
        return list(raw), names
    strings = [str(v) for v in raw]
    if names is None and all(v in WNID_TO_INDEX for v in strings):
        return [WNID_TO_INDEX[v] for v in strings], list(IMAGENET_CLASSNAMES)
    if names is None:  # class names are the labels themselves
        names = sorted(set(strings))
        index = {n: i for i, n in enumerate(names)}
    return [index[v] for v in strings], names


def _shard_images(shards: Path) -> Iterator[bytes]:
    for sample in shard_samples(shards):
        yield sample["image"]


@torch.no_grad()
def class_embeddings(model: nn.Module, tokenizer: Tokenizer, names: Sequence[str], templates: Sequence[str],
                     batch_size: int = 1024, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Mean of each class's normalised prompt embeddings, re-normalised (CLIP / big_vision)."""
    emb = embed_texts(model, tokenizer, prompts(names, templates), batch_size, rank, world)
    return F.normalize(emb.view(len(names), len(templates), -1).mean(dim=1), dim=-1)


def topk_accuracy(img: torch.Tensor, cls: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5),
                  block: int = 4096) -> Dict[str, float]:
    """Top-k accuracy in % of argmax(image · class); ties broken by torch.topk (lowest index first)."""
    k_max = min(max(ks), cls.shape[0])
    hits = {k: 0 for k in ks}
    for s in range(0, img.shape[0], block):
        top = (img[s:s + block] @ cls.T).topk(k_max, dim=1).indices
        match = top == labels[s:s + block, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(1).sum())
    return {f"top{k}": 100.0 * hits[k] / img.shape[0] for k in ks}


def evaluate_zeroshot(model: nn.Module, tokenizer: Tokenizer, root: Path, templates: Optional[Sequence[str]] = None,
                      batch_size: int = 256, rank: int = 0, world: int = 1,
                      classnames: Optional[Path] = None) -> Dict:
    """Top-1/top-5 on a classification folder or classification shards; the metrics on rank 0, {} elsewhere.

    ``templates``: None uses ``root/templates.txt`` if present, else the 80 CLIP templates + '{}'.
    """
    root = Path(root)
    if templates is None:
        templates = default_templates(root)
    is_shards = root.is_file() or (root.is_dir() and any(root.glob("*.tar")))
    with eval_mode(model):
        if is_shards:
            eval_shards(root)
            labels, names = scan_shard_classes(root, classnames)
            img = embed_images(model, _shard_images(root), batch_size, rank, world)
        else:
            paths, labels, names = load_image_folder(root, classnames)
            img = embed_images(model, paths, batch_size, rank, world)
        cls = class_embeddings(model, tokenizer, names, templates, 4 * batch_size, rank, world)
    if rank != 0:
        return {}
    y = torch.tensor(labels)
    return {**topk_accuracy(img, cls, y), "images": len(labels), "classes": len(names),
            "classes_present": len(set(labels)), "chance_top1": 100.0 / len(names),
            "chance_top5": 100.0 * min(5, len(names)) / len(names), "templates": len(templates),
            "data": "shards" if is_shards else "image_folder",
            "protocol_id": TEMPLATE_PROTOCOLS[list(templates) == list(IMAGENET_TEMPLATES)],
            "protocol": "zero-shot classification: mean of L2-normalised prompt embeddings per class, "
                        f"re-normalised, argmax over {len(names)} classes ({len(templates)} templates, "
                        "big_vision prompt canonicalisation)"}
