"""`sigscale demo`: the whole pipeline, end to end, on the embedded generated corpus.

URL list on a loopback image server → `sigscale curate` (img2dataset and the filters) → SentencePiece
on the curated captions → `sigscale train` (FSDP2 over local processes, or a Slurm job) → evaluation of
every kept checkpoint on held-out sets in the benchmarks' own formats (XM3600, an ImageFolder, Babel-ImageNet,
COCO Karpathy) → JSON/Markdown/HTML report.
Curation and training run through the same command a user would type (`sigscale curate`,
`sigscale train` or `sigscale submit train`), in a subprocess; the tokenizer, the evaluation and the
report are called through the Python API those commands wrap.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from sigscale.core.errors import SigscaleError
from sigscale.curation import synthetic
from sigscale.demo_summary import source_revision, write_summary
from sigscale.eval.babel import write_babel_imagenet
from sigscale.eval.karpathy import write_karpathy
from sigscale.eval.xm3600 import write_xm3600


@dataclass(frozen=True)
class DemoSize:
    samples: int  # URL-list rows served (some broken or near-duplicates on purpose)
    steps: int
    batch: int
    heldout: int  # XM3600-format images; the classification set has ~heldout/24 per class
    lr: float


# Measured on the 2-core machine: the tiny towers leave SigLIP's init plateau (t=10, b=-10) after
# ~200 steps at lr 5e-4; 1e-3 left it ~150 steps later and 2e-3 never did in 1500 steps.
FULL = DemoSize(samples=16384, steps=1500, batch=128, heldout=360, lr=5e-4)
QUICK = DemoSize(samples=4096, steps=700, batch=64, heldout=120, lr=5e-4)


def _stage(name: str) -> None:
    print(f"\n== {name}", flush=True)


def _run(cmd: Sequence[str], what: str, threads: int = 1) -> None:
    """Run one pipeline command; a failure names the stage and the command to rerun alone."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if subprocess.call(list(cmd), env=env) != 0:
        raise RuntimeError(f"demo {what} failed (log above); rerun it alone with:\n  {' '.join(map(str, cmd))}")


def _sigscale(*args: str) -> List[str]:
    return [sys.executable, "-m", "sigscale.cli", *args]


def _heldout_sets(out: Path, size: DemoSize) -> Tuple[Dict[str, Path], Tuple[float, float]]:
    """The held-out sets in their benchmarks' layouts, and the seconds spent writing all / the Babel + COCO ones."""
    t0 = time.perf_counter()
    sets = {"xm3600": write_xm3600(out / "heldout_xm3600", synthetic.xm3600_items(size.heldout, seed=1)),
            "classes": synthetic.write_image_folder(out / "heldout_classes", per_class=max(4, size.heldout // 24), seed=2)}
    t1 = time.perf_counter()
    # Babel-ImageNet indexes ImageNet-1k: the demo's 24 classes stand in for ImageNet classes 0-23, named in the
    # demo's languages (upper-case codes, as released), with templates made from each language's captions.
    babel = write_babel_imagenet(
        out / "heldout_babel", synthetic.class_images(max(4, size.heldout // 24), seed=3),
        {l.upper(): (list(range(len(synthetic.classes()))), synthetic.class_names(l)) for l in synthetic.LANGUAGES},
        {l.upper(): synthetic.class_prompts(l) for l in synthetic.LANGUAGES})
    sets.update({f"babel_{k}": v for k, v in babel.items()})
    sets["coco"] = write_karpathy(out / "heldout_coco", "coco", synthetic.karpathy_items(size.heldout, seed=4))
    return sets, (time.perf_counter() - t0, time.perf_counter() - t1)


def _image_dirs(sets: Dict[str, Path]) -> str:
    """The held-out image folders, comma-separated: curation drops their images (and near-duplicates) from training."""
    return ",".join(str(sets[k]) for k in ("xm3600", "classes", "babel_imagenet", "coco"))  # searched recursively


def _eval_config(sets: Dict[str, Path]):
    """Every held-out set, each under the benchmark whose format it is written in."""
    from sigscale.pretrain.config import EvalConfig

    return EvalConfig(benchmarks=["zeroshot", "xm3600", "babel_imagenet", "coco"], batch_size=128,
                      classification_dir=str(sets["classes"]), xm3600_dir=str(sets["xm3600"]),
                      imagenet_dir=str(sets["babel_imagenet"]), babel_imagenet_labels=str(sets["babel_labels"]),
                      babel_imagenet_prompts=str(sets["babel_prompts"]), coco_dir=str(sets["coco"]))


def _print_babel_and_coco(records: List[dict], sets_seconds: Tuple[float, float]) -> None:
    """The two sets' numbers and what they cost the demo (writing them, evaluating every checkpoint on them)."""
    b, c = records[-1]["benchmarks"]["babel_imagenet"], records[-1]["benchmarks"]["coco"]["all"]
    print(f"   Babel-ImageNet format, {len(b['languages'])} languages: mean top-1 {b['mean']['top1']:.1f}% "
          f"(chance {b['chance_top1']:.1f}%); COCO Karpathy format: I→T R@1 {c['i2t_r@1']:.1f}, T→I R@1 {c['t2i_r@1']:.1f}")
    extra = sum(r["benchmarks"][n]["seconds"] for r in records for n in ("babel_imagenet", "coco"))
    print(f"   eval sets written in {sets_seconds[0]:.1f} s (Babel-ImageNet + COCO: {sets_seconds[1]:.1f} s); "
          f"Babel-ImageNet + COCO evaluated in {extra:.1f} s over {len(records)} checkpoints")


@dataclass(frozen=True)
class DemoData:
    """What curation and the held-out sets leave on disk; training runs of any recipe can share it."""
    sets: Dict[str, Path]  # the held-out sets by name (_heldout_sets)
    sets_seconds: Tuple[float, float]
    shards: Path
    rows: int
    kept: int
    dropped: Dict[str, int]

    @property
    def curation(self) -> Dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "dropped": self.dropped}


def prepare_data(out: Path, size: DemoSize) -> DemoData:
    """The held-out evaluation sets and the curated training shards, written under ``out``."""
    from sigscale.curation.serve import ImageServer, write_url_list

    out = Path(out)
    _stage("held-out evaluation sets: XM3600 layout (9 languages), an ImageFolder of 24 classes, Babel-ImageNet "
           "layout (the 24 classes named in 9 languages) and COCO Karpathy layout (English)")
    sets, sets_seconds = _heldout_sets(out, size)

    _stage(f"curate: {size.samples} URLs served from 127.0.0.1 (some broken, some near-duplicates) "
           "-> img2dataset -> filters -> shards")
    shards = out / "shards"
    shutil.rmtree(shards, ignore_errors=True)  # a new URL list each run: finished parts must not be reused
    with ImageServer(size=64) as server:
        urls = write_url_list(out / "urls.parquet", size.samples, server.base_url, seed=0)
        _run(_sigscale("curate", "--config", "curation/demo", f"input.path={urls}", f"output.dir={shards}",
                       f"image.decontaminate=[{_image_dirs(sets)}]"), "curation")
    return _curated(out, size, sets, sets_seconds)


def load_data(out: Path, size: DemoSize) -> DemoData:
    """The data a finished ``prepare_data(out, size)`` left (the held-out sets written again, identically);
    refuses a folder curated for another size."""
    from sigscale.core.manifest import load_manifest

    load_manifest(Path(out) / "shards")  # a missing or unfinished curation fails here, before anything is written
    return _curated(Path(out), size, *_heldout_sets(Path(out), size))


def _curated(out: Path, size: DemoSize, sets: Dict[str, Path], sets_seconds: Tuple[float, float]) -> DemoData:
    from sigscale.core.manifest import load_manifest

    manifest = load_manifest(out / "shards")
    stats = json.loads((out / "shards" / "stats.json").read_text())
    if stats.get("input_rows") != size.samples:
        raise SigscaleError(f"{out / 'shards'} was curated from {stats.get('input_rows')} rows, not {size.samples}; "
                            "use another --out or delete that folder")
    return DemoData(sets, sets_seconds, out / "shards", size.samples, manifest.num_samples, stats.get("dropped", {}))


def recipe_overrides(data: DemoData, run_dir: Path, size: DemoSize, loss: str, seed: int = 0) -> List[str]:
    """The demo's training recipe as `sigscale train` overrides: the one owner of it (demo and ablation)."""
    return [
        # The run trains its tokenizer (tokenizer.model left empty): BPE, as unigram keeps few whole words on
        # this templated corpus (hi/ru captions: 38-47 pieces vs 9-10 with BPE, measured; the tower reads 16).
        f"data.shards={data.shards}", f"data.caption_corpus={data.shards / 'captions.txt'}",
        "tokenizer.vocab_size=1000", "tokenizer.model_type=bpe",
        f"train.out_dir={run_dir}", "train.strategy=fsdp", f"train.loss={loss}", f"train.seed={seed}",
        f"train.steps={size.steps}", f"train.warmup_steps={size.steps // 15}", f"train.batch_size={size.batch}",
        f"train.lr={size.lr}", "train.log_every=50", f"train.ckpt_every={size.steps // 3}", "train.keep_last=3",
        "data.num_workers=1",
    ]


def train_run(data: DemoData, run_dir: Path, size: DemoSize, loss: str = "sigmoid", seed: int = 0, nproc: int = 2,
              cluster: str = "") -> None:
    """Train the demo recipe into ``run_dir`` (replacing it) through `sigscale train` or `sigscale submit train`."""
    from sigscale.core.rundir import RunDir
    from sigscale.pretrain.tokenizer import Tokenizer

    where = f"a Slurm job ({cluster})" if cluster else f"FSDP2 over {nproc} local processes"
    _stage(f"train: SentencePiece BPE on the curated captions, then tiny SigLIP, {where}, chunked {loss} loss, "
           f"batch {size.batch}, {size.steps} steps, seed {seed}")
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = recipe_overrides(data, run_dir, size, loss, seed)
    threads = max(1, (os.cpu_count() or 2) // nproc)
    if cluster:
        _run(_sigscale("submit", "train", "--config", "tiny", "--cluster", cluster, "--tasks-per-node", str(nproc),
                       "--wait", *overrides), "training", threads)
    else:
        _run(_sigscale("train", "--config", "tiny", "--nproc", str(nproc), "--no-resume", *overrides), "training", threads)
    print(f"   tokenizer: vocab {Tokenizer(RunDir(run_dir).tokenizer).vocab_size}, {RunDir(run_dir).tokenizer}")


def evaluate_run(data: DemoData, run_dir: Path, report_dir: Path, size: DemoSize, loss: str = "sigmoid",
                 seed: int = 0, seconds: float = 0.0) -> Tuple[List[Dict], Dict[str, Path]]:
    """Evaluate every kept checkpoint of a demo run on the held-out sets and write its report into ``report_dir``."""
    from sigscale.core.config import config_hash
    from sigscale.eval.config import EvalJobConfig
    from sigscale.eval.report import write_report
    from sigscale.eval.run import evaluate_checkpoints
    from sigscale.pretrain.config import load_config

    t0 = time.perf_counter()
    _stage("eval: every kept checkpoint on the held-out XM3600, classification, Babel-ImageNet and COCO-format sets")
    overrides = recipe_overrides(data, Path(run_dir), size, loss, seed)
    job = EvalJobConfig(checkpoints=[str(Path(run_dir) / "checkpoints")], out=str(report_dir),
                        eval=_eval_config(data.sets))
    records = evaluate_checkpoints(job)
    paths = write_report(records, Path(job.out),
                         title=f"sigscale demo: tiny SigLIP, {loss} loss, {size.steps} steps, seed {seed}",
                         job={"config": "tiny", "overrides": overrides,
                              "config_hash": config_hash(load_config("tiny", overrides)), "curation": data.curation,
                              "seconds": round(seconds + time.perf_counter() - t0, 1),
                              "revision": source_revision()})
    return records, paths


def train_and_evaluate(data: DemoData, run_dir: Path, report_dir: Path, size: DemoSize, loss: str = "sigmoid",
                       seed: int = 0, nproc: int = 2, cluster: str = "") -> Tuple[List[Dict], Dict[str, Path]]:
    """Train the demo recipe into ``run_dir``, evaluate it and write its report; the eval records and report paths."""
    t0 = time.perf_counter()
    train_run(data, run_dir, size, loss, seed, nproc, cluster)
    return evaluate_run(data, run_dir, report_dir, size, loss, seed, time.perf_counter() - t0)


def _print_summary(record: Dict[str, Any]) -> None:
    from sigscale.eval.report import headline

    z, x = record["benchmarks"]["zeroshot"], record["benchmarks"]["xm3600"]
    print(f"   step {record['step']}: zero-shot top-1 {z['top1']:.1f}% (chance {z['chance_top1']:.1f}%)")
    m = x["mean"]
    print(f"   XM3600-format mean over {len(x['languages'])} languages (chance R@1 {x['chance_r@1']:.1f}%):")
    print(f"     I→T R@1/5/10 {m['i2t_r@1']:.1f} / {m['i2t_r@5']:.1f} / {m['i2t_r@10']:.1f}   "
          f"T→I R@1/5/10 {m['t2i_r@1']:.1f} / {m['t2i_r@5']:.1f} / {m['t2i_r@10']:.1f}")
    for lang, lm in x["languages"].items():
        print(f"     {lang}: I→T R@1 {lm['i2t_r@1']:5.1f}  T→I R@1 {lm['t2i_r@1']:5.1f}")
    print(f"   headline: {json.dumps({k: round(v, 1) for k, v in headline(record).items()}, ensure_ascii=False)}")


def run_demo(out: Path, quick: bool = False, nproc: int = 2, loss: str = "sigmoid", cluster: str = "",
             seed: int = 0) -> Path:
    """Run every stage into ``out``; returns the HTML report's path."""
    size = QUICK if quick else FULL
    out = Path(out)
    t0 = time.perf_counter()
    data = prepare_data(out, size)
    print(f"   kept {data.kept} of {size.samples} rows; dropped: {data.dropped}")
    records, paths = train_and_evaluate(data, out / "run", out / "report", size, loss, seed, nproc, cluster)
    _print_summary(records[-1])
    _print_babel_and_coco(records, data.sets_seconds)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    print(f"summary: {write_summary(out).resolve()}\nreport: {paths['html'].resolve()}")
    return paths["html"]
