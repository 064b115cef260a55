"""`sigscale submit | status | cancel`: run a stage on Slurm (or locally through submitit) and follow it."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, List

from sigscale.eval.cli import add_job_arguments

def _resources(args: argparse.Namespace):
    from sigscale.slurm.executor import Resources, parse_time

    return Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                     cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account,
                     time_min=parse_time(args.time), array_parallelism=args.array_parallelism)


def cmd_submit(args: argparse.Namespace) -> int:
    from sigscale.slurm import jobs, submit

    res = _resources(args)
    if args.what == "train":
        from sigscale.pretrain.config import load_config

        sub = submit.submit_train(load_config(args.config, args.overrides), args.cluster, res, args.dry_run,
                                  args.collective_timeout)
    elif args.what == "curate":
        from sigscale.curation.config import load_curation_config

        sub = submit.submit_curate(load_curation_config(args.config, args.overrides), args.cluster, res,
                                   args.dry_run)
    else:
        from sigscale.eval.cli import job_from_args

        sub = submit.submit_eval(job_from_args(args), args.cluster, res, args.dry_run)
    if args.dry_run:
        print(sub.script, end="")
        print(f"# dry run: nothing submitted ({len(sub.names)} task(s)"
              + (f", {len(sub.skipped)} already done" if sub.skipped else "") + "); NNN is numbered at submission")
        return 0
    if sub.skipped:
        print(f"{len(sub.skipped)} task(s) already done, not resubmitted: {', '.join(sub.skipped)}")
    if not sub.jobs:
        print(f"nothing to submit: every {args.what} task in {sub.run_dir} is done")
        return 0
    ids = ", ".join(sub.job_ids)
    print(f"submitted {args.what} ({args.cluster}): job {ids}; logs in {sub.folder}")
    if args.cluster == "local" or args.wait:
        results = jobs.wait(sub)
        print(f"{args.what} finished: {len(sub.jobs)} job(s) completed; last result: {results[-1]}")
    else:
        print(f"follow it with: sigscale status {sub.run_dir}")
    return 0


def _print_rows(run: Path, rows: List[dict]) -> None:
    print(f"{run}")
    if not rows:
        return
    cols = ("submission", "kind", "job", "name", "state", "log")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  " + "  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  " + "  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def cmd_status(args: argparse.Namespace) -> int:
    from sigscale.slurm import jobs

    runs = [Path(args.run)] if args.run else jobs.known_runs()[-args.last:]
    if not runs:
        print("no submissions recorded yet; `sigscale submit ...` records them")
        return 0
    for run in runs:
        _print_rows(run, jobs.status(run))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from sigscale.slurm import jobs

    if args.run:
        run = Path(args.run)
    else:
        runs = jobs.known_runs()
        if not runs:
            print("no submissions recorded yet: nothing to cancel")
            return 0
        run = runs[-1]
    cancelled = jobs.cancel(run)
    print(f"{run}: cancelled {', '.join(cancelled)}" if cancelled else f"{run}: no unfinished job to cancel")
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the cluster subcommands to the top-level CLI (cheap: no torch, no submitit at import)."""
    s = add("submit", cmd_submit, "run a stage on Slurm (or locally) through submitit: train, curate or eval")
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                         help="slurm: sbatch through submitit; local: the same jobs as processes on this machine")
    options.add_argument("--nodes", type=int, default=1, help="nodes of the training job (default 1)")
    options.add_argument("--gpus-per-node", type=int, default=0, help="training runs one task per GPU")
    options.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node, or 1 (CPU: ranks per node)")
    options.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: the cluster's)")
    options.add_argument("--partition", help="Slurm partition (default: the cluster's default partition)")
    options.add_argument("--account", help="Slurm account to charge (default: your default account)")
    options.add_argument("--time", default="60", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default 60)")
    options.add_argument("--array-parallelism", type=int, default=256,
                         help="curate/eval: array tasks running at once (default 256)")
    options.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    options.add_argument("--wait", action="store_true",
                         help="block until the jobs end (always on with --cluster local)")
    stages = s.add_subparsers(dest="what", required=True, metavar="STAGE")
    for stage, what in (("train", "one multi-task job (one task per GPU), requeued on preemption"),
                        ("curate", "an array over the URL-list parts, then finalize"),
                        ("eval", "an array over checkpoints x benchmarks, then the report")):
        sp = stages.add_parser(stage, parents=[options], help=what, description=what)
        if stage == "eval":  # the flags of `sigscale eval`, so its errors' advice (--checkpoint PATH) holds here
            add_job_arguments(sp)
            continue
        sp.add_argument("--config", required=True, help="the stage's YAML (path, or a name in configs/)")
        sp.add_argument("overrides", nargs="*", help="dot-list overrides, as for the stage's own command")
        if stage == "train":
            sp.add_argument("--collective-timeout", type=int, metavar="SECONDS",
                            help="a rank that waits this long for its peers fails the job, naming the lost rank "
                                 "and node (default 600)")

    st = add("status", cmd_status, "state and log file of every job `sigscale submit` recorded for a run")
    st.add_argument("run", nargs="?", help="run dir (default: the runs submitted from this account)")
    st.add_argument("--last", type=int, default=5, help="without RUN: how many recent runs to show (default 5)")

    c = add("cancel", cmd_cancel, "cancel the unfinished jobs of a run")
    c.add_argument("run", nargs="?", help="run dir (default: the most recently submitted run)")
