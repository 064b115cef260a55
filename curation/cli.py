"""`sigscale curate`: URL lists -> filtered, deduplicated, balanced webdataset shards."""
from __future__ import annotations

import argparse
from typing import Callable

# The partitioned finalize's steps as `sigscale curate --finalize-step` names them (curation/finalize.py runs
# them). Kept here, not in curation.config: that pulls omegaconf and py3langid, and `sigscale --help` must not.
FINALIZE_STEPS = ("prepare", "scatter", "near", "score", "score-cut", "count", "balance-cut", "decide", "write")


def cmd_curate(args: argparse.Namespace) -> int:
    from sigscale.curation.config import load_curation_config
    from sigscale.curation.finalize import curate, finalize, finalize_steps
    from sigscale.curation.pipeline import _finished_parts, plan_parts, run_part
    from sigscale.curation.plan import dedup_partition, plan_file, plan_layout

    cfg = load_curation_config(args.config, args.overrides)
    if args.plan:
        print(f"{len(plan_parts(cfg))} part(s) planned in {cfg.work_dir}")
        return 0
    if args.plan_file is not None:
        plan_layout(cfg)
        print(f"URL-list file {args.plan_file} planned: {plan_file(cfg, args.plan_file)}")
        return 0
    if args.dedup is not None:
        print(f"exact duplicates of partition {args.dedup}: {dedup_partition(cfg, args.dedup)}")
        return 0
    if args.part is not None:
        parts = plan_parts(cfg)
        if not 0 <= args.part < len(parts):
            from sigscale.curation.config import CurationError

            raise CurationError(f"--part {args.part} is out of range: the URL list has {len(parts)} part(s) (0..{len(parts) - 1})")
        print(f"part done: {run_part(cfg, parts[args.part])}")
        return 0
    if args.finalize_step:
        (step,) = [s for s in finalize_steps(cfg, _finished_parts(cfg)) if s.name == args.finalize_step]
        print(f"finalize step {step.name} done: {step.fn(cfg) if step.once else step.fn(cfg, args.task)}")
        return 0
    out = finalize(cfg) if args.finalize else curate(cfg)
    print(f"shards, manifest.json, stats.json, report.md, report.html: {out}")
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("curate", cmd_curate, "curate URL lists into webdataset shards + manifest, stats and report "
            "(e.g. --config curation/default input.path=urls.parquet output.dir=curated)", config=True,
            what="curation YAML", example="text.min_confidence=0.3")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true",
                      help="only split the URL list into parts and find its exact (url, caption) duplicates")
    mode.add_argument("--plan-file", type=int, metavar="F",
                      help="plan the URL list's file F only (one Slurm array task, one per file in input.path, "
                      "in name order)")
    mode.add_argument("--dedup", type=int, metavar="K",
                      help="find the exact duplicates of key partition K only (one Slurm array task; "
                      "output.dedup_partitions of them), once every file is planned")
    mode.add_argument("--part", type=int, help="run only this part (one Slurm array task); skips it when done")
    mode.add_argument("--finalize", action="store_true", help="only merge the finished parts into shards")
    mode.add_argument("--finalize-step", choices=FINALIZE_STEPS,
                      help="one partitioned finalize task, in this order: prepare (once), scatter --task PART, "
                      "near --task PARTITION, score --task PART, score-cut (once), count --task PART, balance-cut "
                      "(once), decide and write --task PART; --finalize merges")
    p.add_argument("--task", type=int, default=0, help="task index of --finalize-step (a part or a partition)")
