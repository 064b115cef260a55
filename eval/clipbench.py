"""Any CLIP_benchmark webdataset task on disk (e.g. the DataComp 38), as ``clipbench:PATH``.

The layout is CLIP_benchmark's (``clip_benchmark/datasets/builder.py`` ``build_wds_dataset``; the
``clip-benchmark/wds_*`` sets on the Hugging Face hub)::

    PATH/classnames.txt                          one class name per line (classification)
    PATH/zeroshot_classification_templates.txt   one template per line, the class as ``{c}``
    PATH/dataset_type.txt                        optional: ``retrieval`` (else classification)
    PATH/test/nshards.txt                        the number of shards N
    PATH/test/0.tar ... PATH/test/{N-1}.tar      samples: an image (webp/png/jpg) and ``cls`` or ``txt``

A task is retrieval when its samples carry ``txt`` (one caption per line, several per image) and
classification when they carry ``cls`` (an index into classnames.txt). Classification is the
zero-shot protocol of eval/zeroshot.py with the task's own class names and templates; retrieval is
recall@1/5/10 over all captions (I→T hit if any caption of the image is in the top k).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List

import torch
import torch.nn as nn

from sigscale.eval.embed import embed_images, eval_mode
from sigscale.eval.retrieval import grouped_recall
from sigscale.eval.sources import EvalDataError, url_samples
from sigscale.eval.zeroshot import CLASSNAMES_FILE, class_embeddings, read_lines, topk_accuracy
from sigscale.pretrain.tokenizer import Tokenizer

PREFIX = "clipbench:"
SPLIT = "test"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


class ClipBenchError(EvalDataError):
    """A CLIP_benchmark webdataset folder is incomplete or malformed."""


def shard_files(root: Path, split: str = SPLIT) -> List[str]:
    """``root/<split>/0.tar .. N-1.tar`` as counted by ``nshards.txt`` (numeric order, not lexical)."""
    count_file = Path(root) / split / "nshards.txt"
    if not count_file.is_file():
        raise ClipBenchError(f"{count_file} not found; a CLIP_benchmark webdataset task needs {split}/nshards.txt "
                             f"and {split}/0.tar..; point clipbench: at the task folder (e.g. wds_cifar10)")
    try:
        n = int(count_file.read_text().strip())
    except ValueError as e:
        raise ClipBenchError(f"{count_file} must hold one integer, the number of shards") from e
    urls = [Path(root) / split / f"{i}.tar" for i in range(n)]
    missing = [str(u) for u in urls if not u.is_file()]
    if n <= 0 or missing:
        raise ClipBenchError(f"{count_file} says {n} shards but {missing[:1] or 'none'} is missing; restore the "
                             "shards or fix nshards.txt")
    return [str(u) for u in urls]


def task_kind(root: Path, urls: List[str]) -> str:
    """'classification' when the first sample carries ``cls``, 'retrieval' when it carries ``txt``."""
    declared = Path(root) / "dataset_type.txt"
    if declared.is_file() and declared.read_text().strip().lower() == "multilabel":
        raise ClipBenchError(f"{declared} says multilabel (npy labels, mean average precision); sigscale evaluates "
                             "single-label classification and retrieval tasks only")
    first = next(url_samples(urls), None)
    if first is None:
        raise ClipBenchError(f"the shards {urls[0]}.. hold no samples")
    if first["cls"] is not None:
        return "classification"
    if first["txt"] is not None:
        return "retrieval"
    raise ClipBenchError(f"sample {first['key']!r} in {first['url']} has neither cls nor txt; CLIP_benchmark "
                         "tasks label each image with a class index (cls) or captions (txt)")


def clip_templates(path: Path) -> List[str]:
    """CLIP_benchmark templates (class as ``{c}``) in our '{}' form."""
    if not path.is_file():
        raise ClipBenchError(f"{path} not found; a classification task needs its templates file")
    lines = [l.replace("{c}", "{}") for l in read_lines(path, "templates")]
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise ClipBenchError(f"templates in {path} need exactly one '{{c}}' each; fix {bad[:3]}")
    return lines


def _classification(model: nn.Module, tokenizer: Tokenizer, root: Path, urls: List[str], batch_size: int,
                    rank: int, world: int) -> Dict:
    names_path = Path(root) / CLASSNAMES_FILE
    if not names_path.is_file():
        raise ClipBenchError(f"{names_path} not found; a classification task needs its class names")
    names = read_lines(names_path, "class-names")
    templates = clip_templates(Path(root) / TEMPLATES_FILE)
    labels: List[int] = []

    def images() -> Iterator[bytes]:
        for s in url_samples(urls):
            if s["cls"] is None or not 0 <= s["cls"] < len(names):
                raise ClipBenchError(f"sample {s['key']!r} in {s['url']} has class {s['cls']} outside "
                                     f"0..{len(names) - 1} of {names_path}")
            labels.append(s["cls"])
            yield s["image"]

    with eval_mode(model):
        img = embed_images(model, images(), batch_size, rank, world)
        cls = class_embeddings(model, tokenizer, names, templates, 4 * batch_size, rank, world)
    if rank != 0:
        return {}
    return {"task": "classification", **topk_accuracy(img, cls, torch.tensor(labels)), "images": len(labels),
            "classes": len(names), "templates": len(templates), "chance_top1": 100.0 / len(names),
            "protocol": f"CLIP_benchmark webdataset task, zero-shot classification over {len(names)} classes "
                        f"with its {len(templates)} templates (big_vision prompt canonicalisation)"}


def _retrieval(model: nn.Module, tokenizer: Tokenizer, urls: List[str], batch_size: int, rank: int, world: int) -> Dict:
    texts: List[str] = []
    owners: List[int] = []

    def images() -> Iterator[bytes]:
        for i, s in enumerate(url_samples(urls)):
            caps = (s["txt"] or "").splitlines()  # CLIP_benchmark: str.splitlines of the txt field
            if not caps:
                raise ClipBenchError(f"sample {s['key']!r} in {s['url']} has no caption (txt); retrieval needs one")
            texts.extend(caps)
            owners.extend([i] * len(caps))
            yield s["image"]

    # grouped_recall reads the images before it embeds the captions the generator collects.
    res = grouped_recall(model, tokenizer, images(), {"all": (texts, owners)}, batch_size, rank, world)
    if rank != 0:
        return {}
    n_img = owners[-1] + 1
    return {"task": "retrieval", "images": n_img, "captions": len(texts), "all": res["all"],
            "chance_r@1": 100.0 / n_img,
            "protocol": "CLIP_benchmark webdataset task, retrieval over all captions: I→T hit if any caption "
                        "of the image is in the top k, T→I per caption"}


def evaluate_clipbench(model: nn.Module, tokenizer: Tokenizer, root: Path, batch_size: int = 256,
                       rank: int = 0, world: int = 1) -> Dict:
    """Classification or retrieval on a CLIP_benchmark webdataset task's test split; {} off rank 0."""
    urls = shard_files(root)
    if task_kind(root, urls) == "classification":
        return _classification(model, tokenizer, root, urls, batch_size, rank, world)
    return _retrieval(model, tokenizer, urls, batch_size, rank, world)
