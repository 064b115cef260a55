"""Submit a stage to a cluster: what `sigscale submit train|curate|eval` calls."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sigscale.slurm.arrays import ArrayTask, submit_array
from sigscale.slurm.executor import Resources, SubmitError, make_executor, sbatch_errors, sbatch_script
from sigscale.slurm.jobs import Submission, new_folder, nothing_left_if_refused, record, wait


def _absolute(path: str) -> str:
    # The job may start in another directory (sbatch --chdir, a requeue): pin relative paths now.
    return str(Path(path).absolute()) if path else path


def submit_train(cfg, cluster: str, res: Resources, dry_run: bool = False,
                 collective_timeout_s: Optional[int] = None) -> Submission:
    """One job of ``nodes × tasks_per_node`` ranks running ``train(cfg)``; it requeues itself on preemption.

    ``collective_timeout_s``: how long a rank waits for its peers in a collective before the job fails
    naming the lost rank and node (default ``train_job.DEFAULT_COLLECTIVE_TIMEOUT_S``).
    """
    from sigscale.core.config import to_yaml
    from sigscale.pretrain.config import check_world_size, with_run_dir
    from sigscale.slurm.train_job import DEFAULT_COLLECTIVE_TIMEOUT_S, TrainJob

    timeout_s = DEFAULT_COLLECTIVE_TIMEOUT_S if collective_timeout_s is None else collective_timeout_s
    if timeout_s < 1:
        raise SubmitError(f"--collective-timeout={timeout_s} must be at least 1 (seconds)")

    cfg = with_run_dir(cfg)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, shards=_absolute(cfg.data.shards)),
        tokenizer=dataclasses.replace(cfg.tokenizer, model=_absolute(cfg.tokenizer.model)),
        train=dataclasses.replace(cfg.train, out_dir=_absolute(cfg.train.out_dir)))
    world = res.nodes * res.ntasks_per_node
    check_world_size(cfg, world)  # a batch that does not split fails here, not in the queue
    if cfg.train.strategy == "single" and world > 1:
        raise SubmitError(f"train.strategy=single cannot use {world} tasks; set train.strategy=fsdp (or ddp), "
                          "or submit with --tasks-per-node 1 --nodes 1")
    if res.job_name == Resources.job_name:
        res = dataclasses.replace(res, job_name=f"sigscale-train-{cfg.name}")
    run_dir = Path(cfg.train.out_dir)
    if dry_run:
        folder = run_dir / "slurm" / "NNN-train"
        return Submission(run_dir, "train", cluster, folder, ["train"],
                          script=sbatch_script(folder, res, requeue=True))
    with nothing_left_if_refused(run_dir):
        folder = new_folder(run_dir, "train")
        executor = make_executor(cluster, folder, res, requeue=True)
        with sbatch_errors():
            job = executor.submit(TrainJob(to_yaml(cfg), timeout_s))
    sub = Submission(run_dir, "train", cluster, folder, ["train"], [job])
    record(sub)
    return sub


def _then(first: Submission, kind: str, tasks: Sequence[ArrayTask], cluster: str, res: Resources) -> Submission:
    """Submit ``tasks`` (one capped array) to run once every job of ``first`` succeeded; returns both as one."""
    if first.jobs and cluster == "local":
        wait(first)  # a failed part stops here, naming it and its log
    if first.jobs and cluster == "slurm":
        array_ids = sorted({job.job_id.split("_")[0] for job in first.jobs})
        # afterok on the array id waits for all its tasks; if one fails Slurm drops this job too.
        res = dataclasses.replace(res, extra={**res.extra, "dependency": "afterok:" + ":".join(array_ids),
                                              "kill-on-invalid-dep": "yes"})
    last = submit_array(first.run_dir, kind, tasks, cluster,
                        res if len(tasks) > 1 else dataclasses.replace(res, array_parallelism=1))
    return Submission(first.run_dir, first.kind, cluster, first.folder, first.names + last.names,
                      first.jobs + last.jobs, first.skipped + last.skipped)


def submit_curate(cfg, cluster: str, res: Resources, dry_run: bool = False) -> Submission:
    """Arrays chained by afterok: the plan per URL-list file, exact dedup per key partition, a task per part,
    the finalize steps (:func:`sigscale.curation.finalize.finalize_steps`: per part, per partition or once),
    then the merge. Only the layout (every file's row count) is computed here."""
    from sigscale.curation.finalize import finalize, finalize_steps
    from sigscale.curation.pipeline import run_part
    from sigscale.curation.plan import dedup_partition, parts_of, plan_file, plan_layout

    run_dir = Path(cfg.output.dir).absolute()
    cfg = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, path=_absolute(cfg.input.path)),
                              output=dataclasses.replace(cfg.output, dir=str(run_dir)))
    if res.job_name == Resources.job_name:
        res = dataclasses.replace(res, job_name=f"sigscale-curate-{cfg.name}")
    with nothing_left_if_refused(run_dir):
        plan = plan_layout(cfg)  # row counts only: parquet footers; text files are parsed (ship big lists as parquet)
        parts = parts_of(plan)
        part_tasks = [ArrayTask(part.name, run_part, (cfg, part)) for part in parts]
        if dry_run:
            return submit_array(run_dir, "curate", part_tasks, cluster, res, dry_run)
        sub = submit_array(run_dir, "curate-plan", [ArrayTask(f"plan-{f:05d}", plan_file, (cfg, f))
                                                    for f in range(len(plan["files"]))], cluster, res)
        sub = dataclasses.replace(sub, kind="curate")  # the chain's name in progress lines and failures
    steps = [("dedup", [ArrayTask(f"dedup-{k:05d}", dedup_partition, (cfg, k)) for k in range(plan["dedup_partitions"])]),
             ("curate", part_tasks),
             *((step.name, [ArrayTask(*task) for task in step.tasks]) for step in finalize_steps(cfg, parts)),
             ("finalize", [ArrayTask("finalize", finalize, (cfg,))])]
    for kind, step in steps:
        sub = _then(sub, kind if kind == "curate" else f"curate-{kind}", step, cluster, res)
    return sub


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "x"


def eval_one(job, checkpoint: str, benchmark: str, out: Path) -> Path:
    """Evaluate one checkpoint on one benchmark in this process; writes its record as JSON to ``out``."""
    from sigscale.eval.run import evaluate, load_for_eval

    loaded = load_for_eval(checkpoint, job.tokenizer, job.model)
    t0 = time.perf_counter()
    metrics = evaluate(loaded.model, loaded.tokenizer, dataclasses.replace(job.eval, benchmarks=[benchmark]))
    rec = {**loaded.info, "benchmarks": metrics, "processes": 1, "seconds": round(time.perf_counter() - t0, 2)}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, default=str))
    tmp.rename(out)
    return out


def eval_report(job, parts: Sequence[Sequence[Path]], title: str = "sigscale evaluation") -> Dict[str, Any]:
    """Merge per-benchmark records (``parts[i]``: checkpoint i's files) into one report of the job."""
    from sigscale.eval.report import write_report

    records: List[Dict[str, Any]] = []
    for files in parts:
        recs = [json.loads(Path(f).read_text()) for f in files]
        merged = {**recs[0], "benchmarks": {}, "seconds": round(sum(r["seconds"] for r in recs), 2)}
        for r in recs:
            merged["benchmarks"].update(r["benchmarks"])
        records.append(merged)
    paths = write_report(records, job.out, title=title, job=dataclasses.asdict(job))
    return {k: str(v) for k, v in paths.items()}


def submit_eval(job, cluster: str, res: Resources, dry_run: bool = False) -> Submission:
    """One array task per checkpoint × benchmark (single process each) of the eval job ``job``
    (an ``EvalJobConfig``), then one job writing the report."""
    from sigscale.eval.config import validate_job
    from sigscale.eval.run import expand_checkpoints

    job = dataclasses.replace(job)
    job.out = _absolute(job.out)
    job.checkpoints = [_absolute(c) for c in job.checkpoints]
    validate_job(job)  # missing data or checkpoints fail here, not in every array task
    run_dir = Path(job.out)
    if res.job_name == Resources.job_name:
        res = dataclasses.replace(res, job_name="sigscale-eval")
    with nothing_left_if_refused(run_dir):
        records = run_dir / "records"
        if not dry_run:
            records.mkdir(parents=True, exist_ok=True)
        tasks, parts = [], []
        for i, ckpt in enumerate(expand_checkpoints(job.checkpoints)):
            files = []
            for bench in job.eval.benchmarks:
                name = f"{i:03d}-{_slug(Path(ckpt).name)}-{bench}"
                files.append(records / f"{name}.json")
                tasks.append(ArrayTask(name, eval_one, (job, ckpt, bench, files[-1])))
            parts.append(files)
        sub = submit_array(run_dir, "eval", tasks, cluster, res, dry_run)
    if dry_run:
        return sub
    return _then(sub, "eval-report", [ArrayTask("report", eval_report, (job, parts))], cluster, res)
