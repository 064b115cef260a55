"""The benchmarks ``sigscale eval`` and the training loop can run, by name: one entry each.

An entry says where its data lives (the ``eval:`` keys and the ``sigscale eval`` flags that set
them; the first is the data its numbers are reported on), which metrics it reports, its chance
level, its protocol, and how it runs. ``clipbench:PATH`` names a CLIP_benchmark webdataset task
by its folder, so the path is part of the name.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn

from sigscale.core.config import ConfigError
from sigscale.eval import babel, clipbench, karpathy, xm3600, xtd10
from sigscale.eval.retrieval import evaluate_shard_retrieval
from sigscale.eval.zeroshot import TEMPLATE_PROTOCOLS, evaluate_zeroshot
from sigscale.pretrain.config import EvalConfig
from sigscale.pretrain.tokenizer import Tokenizer

# (model, tokenizer, eval config, data path, rank, world) -> metrics on rank 0, {} elsewhere
Runner = Callable[[nn.Module, Tokenizer, EvalConfig, Path, int, int], Dict]
RETRIEVAL = ("i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10")
CLASSIFICATION = ("top1", "top5")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: what it reads, what it reports and how it runs."""

    name: str
    data: Tuple[Tuple[str, str], ...]  # (EvalConfig key, `sigscale eval` flag); empty: the path is in the name
    metrics: Tuple[str, ...]
    chance: str  # the level a random scorer reaches; each result carries its value as chance_*
    protocol: str
    run: Runner
    # The protocols it can run, as the ids its results carry (first: the default); published results
    # (eval/references.json) name one, and a report sets them beside a run only under the same id.
    protocol_ids: Tuple[str, ...]


def _opt(value: str) -> Optional[Path]:
    return Path(value) if value else None


BENCHMARKS: Dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("imagenet", (("imagenet_dir", "--imagenet-root"),), CLASSIFICATION, "100/1000 top-1",
              "ImageNet-1k val zero-shot, CLIP class names and templates",
              lambda m, t, c, d, r, w: evaluate_zeroshot(m, t, d, None, c.batch_size, r, w),
              (TEMPLATE_PROTOCOLS[True], TEMPLATE_PROTOCOLS[False])),
    Benchmark("zeroshot", (("classification_dir", "--classification-root"),), CLASSIFICATION, "100/classes top-1",
              "zero-shot classification of a class folder (or shards) with classnames.txt",
              lambda m, t, c, d, r, w: evaluate_zeroshot(m, t, d, None, c.batch_size, r, w, _opt(c.classnames)),
              (TEMPLATE_PROTOCOLS[False], TEMPLATE_PROTOCOLS[True])),
    Benchmark("xm3600", (("xm3600_dir", "--xm3600-root"),), RETRIEVAL, "100/images R@1", xm3600.PROTOCOLS[False],
              lambda m, t, c, d, r, w: xm3600.evaluate_xm3600(m, t, d, c.xm3600_languages or None,
                                                              c.first_caption_only, c.batch_size, r, w),
              (xm3600.PROTOCOL_IDS[False], xm3600.PROTOCOL_IDS[True])),
    Benchmark("retrieval", (("retrieval_shards", "--retrieval-shards"),), RETRIEVAL, "100/pairs R@1",
              "one caption per image of a webdataset split, all pairs and per language",
              lambda m, t, c, d, r, w: evaluate_shard_retrieval(m, t, d, c.batch_size, r, w, c.retrieval_max_samples),
              ("one_caption",)),
    Benchmark("coco", (("coco_dir", "--coco-root"),), RETRIEVAL, "100/images R@1",
              karpathy.PROTOCOL.format(split="test (5k)"),
              lambda m, t, c, d, r, w: karpathy.evaluate_karpathy(m, t, d, "coco", c.karpathy_split, c.batch_size, r, w),
              (karpathy.PROTOCOL_ID.format(split="test"),)),
    Benchmark("flickr30k", (("flickr30k_dir", "--flickr30k-root"),), RETRIEVAL, "100/images R@1",
              karpathy.PROTOCOL.format(split="test (1k)"),
              lambda m, t, c, d, r, w: karpathy.evaluate_karpathy(m, t, d, "flickr30k", c.karpathy_split,
                                                                  c.batch_size, r, w),
              (karpathy.PROTOCOL_ID.format(split="test"),)),
    Benchmark("xtd10", (("xtd10_dir", "--xtd10-root"),), RETRIEVAL, "100/images R@1", xtd10.PROTOCOL,
              lambda m, t, c, d, r, w: xtd10.evaluate_xtd10(m, t, d, _opt(c.xtd10_images), c.xtd10_languages,
                                                            c.batch_size, r, w),
              (xtd10.PROTOCOL_ID,)),
    Benchmark("babel_imagenet", (("imagenet_dir", "--imagenet-root"), ("babel_imagenet_labels", "--babel-imagenet-labels")),
              CLASSIFICATION, "100/classes of the language, top-1", babel.PROTOCOL.format(templates="per-language"),
              lambda m, t, c, d, r, w: babel.evaluate_babel_imagenet(
                  m, t, d, Path(c.babel_imagenet_labels), _opt(c.babel_imagenet_prompts),
                  c.babel_imagenet_languages, c.batch_size, r, w),
              (babel.PROTOCOL_IDS[True], babel.PROTOCOL_IDS[False])),
    Benchmark("clipbench", (), CLASSIFICATION + RETRIEVAL, "100/classes top-1 or 100/images R@1",
              "a CLIP_benchmark webdataset task (test split): classification when samples carry cls, "
              "retrieval when they carry txt",
              lambda m, t, c, d, r, w: clipbench.evaluate_clipbench(m, t, d, c.batch_size, r, w),
              ("clip_benchmark",)),
)}
NAMES: List[str] = [n for n in BENCHMARKS if n != "clipbench"] + [clipbench.PREFIX + "PATH"]


def lookup(name: str) -> Tuple[Benchmark, Optional[Path]]:
    """The entry for a benchmark name, and the path a ``clipbench:PATH`` name carries (else None)."""
    if name.startswith(clipbench.PREFIX) and len(name) > len(clipbench.PREFIX):
        return BENCHMARKS["clipbench"], Path(name[len(clipbench.PREFIX):])
    if name in BENCHMARKS and BENCHMARKS[name].data:
        return BENCHMARKS[name], None
    close = difflib.get_close_matches(name, NAMES, n=1) or [n for n in NAMES if n.startswith(name)][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown benchmark {name!r}{hint}; choose from {NAMES}")


def data_path(name: str, cfg: EvalConfig) -> Path:
    """The data a benchmark's numbers are reported on (its first data key, or the path in its name)."""
    bench, path = lookup(name)
    return path if path is not None else Path(getattr(cfg, bench.data[0][0]))


def check_data(name: str, cfg: EvalConfig) -> None:
    """Every data path a benchmark needs is set and exists; else a ConfigError naming the key and flag."""
    bench, path = lookup(name)
    if path is not None and not path.exists():
        raise ConfigError(f"benchmark {name!r}: {path} does not exist; fix the path after '{clipbench.PREFIX}'")
    for key, flag in bench.data:
        value = getattr(cfg, key, "")
        if not value:
            raise ConfigError(f"benchmark {name!r} needs eval.{key} ({flag}); set it to the data")
        if not Path(value).exists():
            raise ConfigError(f"eval.{key}={value} does not exist; fix the path")


def run_benchmark(name: str, model: nn.Module, tokenizer: Tokenizer, cfg: EvalConfig, rank: int, world: int) -> Dict:
    """Run one benchmark by name; rank 0 gets its metrics, with its protocol if the result has none."""
    bench, _ = lookup(name)
    res = bench.run(model, tokenizer, cfg, data_path(name, cfg), rank, world)
    if rank == 0:
        res.setdefault("protocol", bench.protocol)
        res.setdefault("protocol_id", bench.protocol_ids[0])
    return res
