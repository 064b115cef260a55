"""`sigscale bench ablation`: the demo's recipe over losses × seeds (× batch sizes), with error bars.

The demo's data is curated once into ``WORK/data`` (``sigscale demo``'s own held-out sets and curation);
every run then trains the demo recipe on those shards with one loss, seed and batch, and is evaluated as
the demo evaluates (every kept checkpoint, zero-shot on the 24 held-out classes and XM3600-format
retrieval), its report written to ``WORK/reports/NAME``. A rerun of the same command reuses the curated
data and every run whose report is complete, so an interrupted ablation continues where it stopped.
The table groups the final checkpoints with ``sigscale.eval.seeds`` (the one owner of the statistics):
mean ± 95% Student t interval over seeds per loss, and Welch's t-test between the losses at each batch.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sigscale.demo import FULL, DemoSize

# Small enough for the test suite: a few seconds of training per run on 2 cores, still on the real data path.
QUICK = DemoSize(samples=1024, steps=30, batch=32, heldout=48, lr=5e-4)

# (headline key, column title) of the table, in order.
METRICS = (("zeroshot top1", "zero-shot top-1 (%)"), ("xm3600 i2t_r@1", "XM3600 I→T R@1 (%)"),
           ("xm3600 t2i_r@1", "XM3600 T→I R@1 (%)"))


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def _data(work: Path, size: DemoSize):
    """The demo's curated data under ``work``: reused when a previous run finished curating it."""
    from sigscale.core.errors import SigscaleError
    from sigscale.demo import load_data, prepare_data

    try:
        return load_data(work, size)
    except (SigscaleError, OSError, ValueError):
        return prepare_data(work, size)


def _finished(report: Path, size: DemoSize, loss: str, seed: int) -> Optional[List[Dict[str, Any]]]:
    """The records of a complete earlier run of this point, or None."""
    path = report / "report.json"
    if not path.is_file():
        return None
    records = json.loads(path.read_text(encoding="utf-8")).get("records", [])
    train = (records[-1].get("config") or {}).get("train", {}) if records else {}
    same = (train.get("loss"), train.get("seed"), train.get("batch_size"), train.get("steps")) == \
        (loss, seed, size.batch, size.steps)
    return records if same and records[-1].get("step") == size.steps else None


def _first_loss(run_dir: Path) -> Optional[float]:
    from sigscale.core.rundir import RunDir

    run = RunDir(run_dir)
    rows = [r for r in run.read_jsonl(run.metrics) if "loss" in r]
    return rows[0]["loss"] if rows else None


def _trained(run_dir: Path, size: DemoSize, loss: str, seed: int) -> bool:
    """Whether ``run_dir`` holds a finished training of this point (final weights, the same recipe)."""
    import yaml

    cfg = run_dir / "config.yaml"
    if not (run_dir / "model.safetensors").is_file() or not cfg.is_file():
        return False
    train = (yaml.safe_load(cfg.read_text()) or {}).get("train", {})
    return (train.get("loss"), train.get("seed"), train.get("batch_size"), train.get("steps")) == \
        (loss, seed, size.batch, size.steps)


def _training_timing(run_dir: Path) -> Dict[str, Any]:
    """Seconds between the first and the last logged step: the training's time when no invocation timed it."""
    from sigscale.core.rundir import RunDir

    run = RunDir(run_dir)
    times = [r["time"] for r in run.read_jsonl(run.metrics) if "time" in r]
    return {"seconds": round(times[-1] - times[0], 1), "loadavg_start": None, "loadavg_end": _loadavg(),
            "timed": "training only, from metrics.jsonl timestamps"}


def _run_point(work: Path, data, size: DemoSize, loss: str, seed: int, nproc: int) -> Dict[str, Any]:
    from sigscale.demo import evaluate_run, train_and_evaluate
    from sigscale.eval.report import headline

    name = f"{loss}-b{size.batch}-s{seed}"
    run_dir, report = work / "runs" / name, work / "reports" / name
    timing = report / "ablation_timing.json"  # how long the point took when it ran, kept for a rerun's table
    records = _finished(report, size, loss, seed)
    reused = records is not None and timing.is_file()
    if not reused and _trained(run_dir, size, loss, seed):
        # An earlier invocation trained it and stopped before the report: evaluate, do not train again.
        records, _ = evaluate_run(data, run_dir, report, size, loss, seed)
        report.joinpath("ablation_timing.json").write_text(json.dumps(_training_timing(run_dir)))
    elif not reused:
        load0, t0 = _loadavg(), time.perf_counter()
        records, _ = train_and_evaluate(data, run_dir, report, size, loss, seed, nproc)
        timing.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "loadavg_start": load0,
                                      "loadavg_end": _loadavg()}))
    return {"name": name, "loss": loss, "seed": seed, "batch": size.batch, "report": str(report),
            "run_dir": str(run_dir), "reused": reused, **json.loads(timing.read_text()),
            "first_loss": _first_loss(run_dir), "step": records[-1]["step"], "headline": headline(records[-1])}


def summarise(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Per (batch, loss): mean ± CI of each metric over seeds; per batch: Welch's test between the losses."""
    from sigscale.eval.report import headline, read_report
    from sigscale.eval.seeds import estimate, group_records, pairs, welch

    finals = [{**read_report(Path(r["report"]))["records"][-1], "report": r["report"]} for r in runs]
    groups = group_records(finals, [r["name"] for r in runs])
    rows = []
    for g in groups:
        cells = {key: asdict(estimate(g.values(key, headline))) for key, _ in METRICS}
        rows.append({"batch": g.recipe["train.batch_size"], "loss": g.recipe["train.loss"], "n": len(g.records),
                     "seeds": g.seeds, "step": g.step, "metrics": cells})
    tests = []
    for a, b in pairs(groups):
        if a.recipe["train.batch_size"] != b.recipe["train.batch_size"]:
            continue  # the losses are compared at one batch; batches against each other only through the table
        tests.append({"batch": a.recipe["train.batch_size"], "a": a.recipe["train.loss"], "b": b.recipe["train.loss"],
                      "metrics": {key: asdict(welch(a.values(key, headline), b.values(key, headline)))
                                  for key, _ in METRICS}})
    return {"groups": rows, "tests": tests}


def check_points(losses: Sequence[str], seeds: Sequence[int], batch_sizes: Sequence[int], nproc: int) -> None:
    """Refuse an ablation that could not run, before any curation or training."""
    from sigscale.core.config import ConfigError
    from sigscale.pretrain.config import LOSSES

    for loss in losses:
        if loss not in LOSSES:
            raise ConfigError(f"--losses: unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    for flag, values in (("--losses", losses), ("--seeds", seeds), ("--batch-sizes", batch_sizes)):
        if len(set(values)) != len(values):
            raise ConfigError(f"{flag}: {','.join(map(str, values))} repeats a value; give each once")
    if not losses or not seeds:
        raise ConfigError("--losses and --seeds need at least one value each, e.g. --seeds 0,1,2")
    for batch in batch_sizes:
        if batch <= 0 or batch % nproc:
            raise ConfigError(f"--batch-sizes: {batch} is not a positive multiple of --nproc {nproc}; "
                              f"use e.g. {max(nproc, batch - batch % nproc)}")


def run_ablation(out_json: str = "bench_results/ablation.json", losses: Sequence[str] = ("sigmoid", "softmax"),
                 seeds: Sequence[int] = (0, 1, 2), batch_sizes: Sequence[int] = (), quick: bool = False,
                 nproc: int = 2, command: str = "") -> Dict[str, Any]:
    """Run (or reuse) every loss × seed × batch point and write the JSON with the grouped summary."""
    size = QUICK if quick else FULL
    check_points(losses, seeds, batch_sizes, nproc)
    command = command or " ".join(
        ["sigscale bench ablation", f"--losses {','.join(losses)}", f"--seeds {','.join(map(str, seeds))}"]
        + ([f"--batch-sizes {','.join(map(str, batch_sizes))}"] if batch_sizes else [])
        + (["--quick"] if quick else []) + ([f"--nproc {nproc}"] if nproc != 2 else []) + [f"--out {out_json}"])
    work = Path(out_json).with_suffix("")
    data = _data(work / "data", size)
    t0 = time.perf_counter()
    runs = []
    for batch in batch_sizes or (size.batch,):
        for seed in seeds:
            for loss in losses:  # losses interleaved inside a seed: machine load falls on both alike
                runs.append(_run_point(work, data, replace(size, batch=batch), loss, seed, nproc))
    result = {"command": command, "size": asdict(size), "nproc": nproc, "cpus": os.cpu_count(),
              "curation": data.curation, "losses": list(losses), "seeds": list(seeds),
              "batch_sizes": list(batch_sizes or (size.batch,)), "seconds": round(time.perf_counter() - t0, 1),
              "runs": runs, **summarise(runs)}
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    return result


def _cell(e: Dict[str, Any]) -> str:
    return f"{e['mean']:.1f}" if e["half"] is None else f"{e['mean']:.1f} ± {e['half']:.1f}"


def render_markdown(result: Dict[str, Any]) -> str:
    """The table for BENCHMARKS.md, with the command above it and the verdict below."""
    from sigscale.eval.seeds import ALPHA, LEVEL

    size = result["size"]
    lines = ["```", result["command"] or "sigscale bench ablation", "```", "",
             f"Demo recipe (tiny SigLIP, FSDP2 over {result['nproc']} processes, {size['steps']} steps, lr {size['lr']:g}) "
             f"on one curation ({result['curation']['kept']} of {result['curation']['rows']} rows kept), "
             f"final checkpoint; mean ± half-width of the {LEVEL:.0%} Student t interval over seeds "
             f"{', '.join(map(str, result['seeds']))}.", "",
             "| batch | loss | n | " + " | ".join(t for _, t in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for g in result["groups"]:
        n = str(g["n"]) if g["n"] > 1 else "1 (no interval)"
        lines.append(f"| {g['batch']} | {g['loss']} | {n} | " +
                     " | ".join(_cell(g["metrics"][k]) for k, _ in METRICS) + " |")
    lines += ["", "Per run (seed: " + ", ".join(t for _, t in METRICS) + "; training + eval seconds, 1-min load "
              "at start):", ""]
    for r in result["runs"]:
        vals = " / ".join(f"{r['headline'][k]:.1f}" for k, _ in METRICS)
        load = "load unknown" if r["loadavg_start"] is None else f"load {r['loadavg_start']:.2f}"
        lines.append(f"- {r['name']}: {vals}; {r['seconds']:.0f} s" + (f" ({r['timed']})" if r.get("timed") else "")
                     + f", {load}" + (" (reused from an earlier invocation)" if r["reused"] else ""))
    lines.append("")
    for t in result["tests"]:
        parts = []
        for key, title in METRICS:
            w = t["metrics"][key]
            p = "no test (n = 1)" if w["p"] is None else f"p = {w['p']:.2f}"
            parts.append(f"{title.split(' (')[0]} {w['diff']:+.1f} ({p})")
        verdicts = [t["metrics"][k]["p"] is not None and t["metrics"][k]["p"] < ALPHA for k, _ in METRICS]
        words = ("distinguishable at 5% on " + ", ".join(title.split(" (")[0] for (_, title), v in zip(METRICS, verdicts)
                                                          if v)) if any(verdicts) else "not distinguishable at 5% on any metric"
        lines.append(f"**Verdict, batch {t['batch']}, {t['a']} − {t['b']}** (Welch's t-test, two-sided): "
                     + "; ".join(parts) + f" → {words}.")
    return "\n".join(lines)
