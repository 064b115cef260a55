"""The demo's summary table (``<out>/summary.md``), rendered from what the run wrote and nothing else.

Sources: the curation's ``shards/stats.json``, the training run's ``metrics.jsonl`` and the eval
report's ``report.json`` (its job block holds the demo's overrides and wall time). Every benchmark
in the last evaluated checkpoint gets a row, so eval sets added to the demo show up by themselves.
``python -m sigscale.demo_summary OUT`` re-renders it for a finished demo folder.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

from sigscale.eval.report import headline, read_report

# Chance level a benchmark reports next to its metrics, by the key it uses.
CHANCE_KEYS = ("chance_top1", "chance_r@1")


def source_revision() -> str:
    """``git describe --always --dirty`` of the checkout this package runs from, or 'unknown'."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _overrides(job: Dict[str, Any]) -> Dict[str, str]:
    return dict(o.split("=", 1) for o in job.get("overrides", []) if "=" in o)


def _training_row(out: Path, job: Dict[str, Any]) -> str:
    ov = _overrides(job)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in rows[1:]] or [r["images_per_s"] for r in rows]  # step 0 pays start-up
    return (f"| training | {job.get('config', '?')} towers, {ov.get('train.strategy', '?')}, {ov.get('train.loss', '?')} "
            f"loss, {rows[-1]['step'] + 1} steps of global batch {ov.get('train.batch_size', '?')}; median "
            f"{statistics.median(rates):.0f} img/s over {len(rates)} log lines; loss {rows[0]['loss']:.2f} → "
            f"{rows[-1]['loss']:.2f} |")


def _benchmark_rows(record: Dict[str, Any]) -> List[str]:
    numbers = headline(record)
    rows = []
    for name, res in record.get("benchmarks", {}).items():
        values = ", ".join(f"{k.split(' ', 1)[1]} {v:.1f}%" for k, v in numbers.items() if k.split(" ", 1)[0] == name)
        stats = res.get("mean", res) if isinstance(res, dict) else {}
        chance = next((f"{k.replace('_', ' ')} {src[k]:.2f}%" for src in (stats, res) for k in CHANCE_KEYS
                       if k in src), None)
        rows.append(f"| eval: {name} | {values or 'no headline numbers'}"
                    f"{f' ({chance})' if chance else ''} |")
    return rows


def render_summary(out: Path) -> str:
    """The summary table of a finished demo folder ``out`` (percentages as the report gives them)."""
    out = Path(out)
    doc = read_report(out / "report")
    job, last = doc.get("job", {}), doc["records"][-1]
    stats = json.loads((out / "shards" / "stats.json").read_text())
    drops = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()) or "none"
    lines = [f"Demo folder `{out}`: run at sigscale {doc.get('sigscale_version', '?')}, revision "
             f"{job.get('revision', 'not recorded')}; report created {doc.get('created', '?')}; this table rendered at "
             f"revision {source_revision()}.", "",
             "| stage | result |", "|---|---|",
             f"| whole run | {job.get('seconds', float('nan')):.0f} s (set-up excluded) |",
             f"| curation | {stats['kept']:,} of {stats['input_rows']:,} URL-list rows kept (dropped: {drops}) |",
             _training_row(out, job),
             f"| evaluated checkpoint | step {last.get('step', '?')}, the last of {len(doc['records'])} evaluated |",
             *_benchmark_rows(last)]
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> Path:
    """Render the summary of demo folder ``out`` into ``out/summary.md``; returns its path."""
    path = Path(out) / "summary.md"
    path.write_text(render_summary(Path(out)), encoding="utf-8")
    return path


if __name__ == "__main__":  # python -m sigscale.demo_summary OUT
    print(write_summary(Path(sys.argv[1])).read_text(encoding="utf-8"), end="")
