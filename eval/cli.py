"""`sigscale eval` and `sigscale report`: thin shells over sigscale.eval.run and sigscale.eval.report.

Importing this module stays cheap (no torch): the work is imported inside the commands.
"""
from __future__ import annotations

import argparse
from typing import Callable

# flag -> field of EvalJobConfig ("eval." = its BenchmarkConfig); flags override the YAML.
_FLAGS = {
    "checkpoint": "checkpoints", "tokenizer": "tokenizer", "model": "model", "out": "out",
    "benchmarks": "eval.benchmarks", "imagenet_root": "eval.imagenet_dir",
    "classification_root": "eval.classification_dir", "classnames": "eval.classnames",
    "xm3600_root": "eval.xm3600_dir", "xm3600_languages": "eval.xm3600_languages",
    "first_caption_only": "eval.first_caption_only", "retrieval_shards": "eval.retrieval_shards",
    "max_samples": "eval.retrieval_max_samples", "batch_size": "eval.batch_size",
    "coco_root": "eval.coco_dir", "flickr30k_root": "eval.flickr30k_dir", "karpathy_split": "eval.karpathy_split",
    "xtd10_root": "eval.xtd10_dir", "xtd10_images": "eval.xtd10_images", "xtd10_languages": "eval.xtd10_languages",
    "babel_imagenet_labels": "eval.babel_imagenet_labels", "babel_imagenet_prompts": "eval.babel_imagenet_prompts",
    "babel_imagenet_languages": "eval.babel_imagenet_languages",
}
_LISTS = ("benchmarks", "xm3600_languages", "xtd10_languages", "babel_imagenet_languages")


def job_from_args(args: argparse.Namespace):
    """The eval job of ``sigscale eval`` / ``sigscale submit eval``: the YAML, its overrides, then the flags."""
    from sigscale.eval.config import load_eval_config

    job = load_eval_config(args.config, args.overrides)
    for flag, field in _FLAGS.items():
        value = getattr(args, flag)
        if value is None or value is False:
            continue
        if flag in _LISTS:
            value = [v.strip() for v in value.split(",") if v.strip()]
        target = job.eval if field.startswith("eval.") else job
        setattr(target, field.split(".")[-1], value)
    return job


def cmd_eval(args: argparse.Namespace) -> int:
    from sigscale.core.distributed import die_with_launcher, launch_ranks, launched_by_torchrun, torchrun_command
    from sigscale.eval.config import validate_job

    job = job_from_args(args)
    validate_job(job)  # fail here, not in every rank
    if args.nproc > 1 and not launched_by_torchrun():
        # Re-run the resolved job under torchrun: each rank embeds a slice of every set.
        from pathlib import Path

        from omegaconf import OmegaConf

        Path(job.out).mkdir(parents=True, exist_ok=True)
        resolved = Path(job.out) / "eval_job.yaml"
        resolved.write_text(OmegaConf.to_yaml(OmegaConf.structured(job)))
        return launch_ranks(torchrun_command(args.nproc, "sigscale.cli",
                                             ["eval", "--config", str(resolved), "--title", args.title]))
    die_with_launcher()
    from dataclasses import asdict

    import torch.distributed as dist

    from sigscale.eval.report import headline, label, write_report
    from sigscale.eval.run import evaluate_checkpoints
    from sigscale.core.distributed import init_distributed

    info = init_distributed()
    try:
        records = evaluate_checkpoints(job, info.rank, info.world_size, device=str(info.device))
        if info.is_main:
            paths = write_report(records, job.out, title=args.title, job=asdict(job))
            for r in records:
                print(label(r) + ": " + ", ".join(f"{k} {v:.2f}" for k, v in headline(r).items()))
            print(f"report: {paths['html']}  ({paths['json'].name}, {paths['md'].name})")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sigscale.eval.report import compare_reports

    paths = compare_reports(args.reports, args.out, title=args.title)
    print(f"comparison: {paths['html']}  ({paths['json'].name}, {paths['md'].name})")
    return 0


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of an eval job (``sigscale eval`` and ``sigscale submit eval`` take the same ones)."""
    p.add_argument("--config", help="eval job YAML (path, or a name in configs/eval/); flags below override it")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. eval.batch_size=128")
    p.add_argument("--checkpoint", nargs="+", help="HF SiglipModel dir, sigscale run dir, run/checkpoints/step_N "
                   "(or run/checkpoints for every step), open_clip weights")
    p.add_argument("--tokenizer", help="SentencePiece .model (default: the run's, or spiece.model in an HF dir)")
    p.add_argument("--model", help="model config for open_clip weights: preset name or experiment YAML")
    p.add_argument("--benchmarks", help="comma-separated: imagenet,zeroshot,xm3600,retrieval,coco,flickr30k,xtd10,"
                   "babel_imagenet, clipbench:PATH (a CLIP_benchmark webdataset task folder)")
    p.add_argument("--out", help="report folder, e.g. reports/NAME")
    p.add_argument("--imagenet-root", help="ImageNet val: synset folders (n01440764/...) or shards with a class")
    p.add_argument("--classification-root", help="classification folder (or shards) with classnames.txt")
    p.add_argument("--classnames", help="class-names file for --classification-root")
    p.add_argument("--xm3600-root", help="folder with captions.jsonl and images/")
    p.add_argument("--xm3600-languages", help="comma-separated language codes (default: all in the file)")
    p.add_argument("--first-caption-only", action="store_true", help="CLIP_benchmark's XM3600 protocol")
    p.add_argument("--retrieval-shards", help="webdataset split for generic retrieval")
    p.add_argument("--max-samples", type=int, help="retrieval: first N samples only")
    p.add_argument("--coco-root", help="folder with dataset_coco.json (Karpathy splits) and the COCO images")
    p.add_argument("--flickr30k-root", help="folder with dataset_flickr30k.json (Karpathy splits) and the images")
    p.add_argument("--karpathy-split", help="coco/flickr30k split (default test)")
    p.add_argument("--xtd10-root", help="XTD10 release: test_image_names.txt + test_1kcaptions_<lang>.txt")
    p.add_argument("--xtd10-images", help="folder of the images XTD10 lists (default: <xtd10-root>/images)")
    p.add_argument("--xtd10-languages", help="comma-separated (default: every caption file)")
    p.add_argument("--babel-imagenet-labels", help="babel_imagenet.json; images from --imagenet-root")
    p.add_argument("--babel-imagenet-prompts", help="per-language templates JSON (default: English templates)")
    p.add_argument("--babel-imagenet-languages", help="comma-separated (default: every language in the labels)")
    p.add_argument("--batch-size", type=int, help="images or captions per forward pass (default eval.batch_size)")


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    e = add("eval", cmd_eval, "evaluate checkpoints (ImageNet, Babel-ImageNet, XM3600, XTD10, COCO, Flickr30k, CLIP_benchmark tasks, retrieval) and write a report")
    add_job_arguments(e)
    e.add_argument("--nproc", type=int, default=1,
                   help="local processes (torchrun, default 1); under torchrun the env decides")
    e.add_argument("--title", default="sigscale evaluation", help="report title (default: sigscale evaluation)")

    r = add("report", cmd_report, "compare eval reports: `sigscale report compare A B ... --out DIR`")
    r.add_argument("action", choices=["compare"], help="compare: one table and plots over the reports")
    r.add_argument("reports", nargs="+", help="report folders (or their report.json)")
    r.add_argument("--out", required=True, help="folder for compare.{json,md,html}")
    r.add_argument("--title", default="sigscale comparison", help="title (default: sigscale comparison)")
