"""The memory planner held against the real engine on shapes it was not fitted to (issue #19.4).

``pretrain/plan.py`` models activations and the loss with coefficients calibrated on the ``tiny`` and
``small`` presets (per-sample slopes of each tower, the small preset's whole step at batch 64, engine
peaks of the small preset at W = 1, 2, 4) and on the loss table (d = 1152, W = 1–8). Each point here
trains the engine (``sigscale train`` under torchrun, as ``sigscale bench memory`` does) at another
width, depth, sequence length, batch and world size, and sets its measured peak of live tensor bytes
per rank beside the planner's prediction. One calibration point is kept in the table for contrast.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sigscale.bench_memory import (MEMORY_METHOD, engine_overrides, launch_engine, planned_row, resolve_config,
                                   split_strategy, write_bench_data)

CALIBRATION = ("tiny/small presets: per-sample activation slopes (batch 8 → 24), the small preset's step at "
               "batch 64, engine peaks of small at batch 64, W = 1, 2, 4; loss: d = 1152, W = 1–8")


def _towers(vision: Tuple[int, int, int, int], text: Tuple[int, int, int, int]) -> Tuple[str, ...]:
    """Overrides of the small preset: (width, depth, heads, image size) and (width, depth, heads, context)."""
    (vw, vd, vh, img), (tw, td, th, ctx) = vision, text
    return (f"model.vision.width={vw}", f"model.vision.depth={vd}", f"model.vision.heads={vh}",
            f"model.vision.mlp_dim={4 * vw}", f"model.vision.image_size={img}",
            f"model.text.width={tw}", f"model.text.depth={td}", f"model.text.heads={th}",
            f"model.text.mlp_dim={4 * tw}", f"model.text.context_length={ctx}", f"tokenizer.context_length={ctx}")


@dataclass(frozen=True)
class CheckPoint:
    name: str
    calibration: bool  # True: a point of the set the planner's coefficients were fitted to
    world: int
    batch: int
    strategy: str  # train.strategy, deepspeed:N for ZeRO stage N
    model: Tuple[str, ...] = ()  # overrides on top of the small preset
    checkpointing: bool = False


CKPT = ("train.grad_checkpointing.vision=true", "train.grad_checkpointing.text=true")
POINTS = (
    CheckPoint("small", True, 2, 64, "fsdp"),
    CheckPoint("wide", False, 3, 96, "ddp", _towers((256, 6, 8, 64), (256, 3, 8, 32))),
    CheckPoint("long", False, 2, 32, "fsdp", _towers((128, 8, 4, 128), (128, 6, 4, 64))),
    CheckPoint("long", False, 4, 64, "fsdp", _towers((128, 8, 4, 128), (128, 6, 4, 64)), checkpointing=True),
    CheckPoint("deep", False, 3, 48, "deepspeed:3", _towers((96, 12, 4, 48), (96, 8, 4, 24))),
)
# The test suite's point: small enough for CI, off the calibration set in every dimension.
QUICK = (CheckPoint("narrow", False, 3, 24, "fsdp", _towers((96, 3, 4, 48), (96, 3, 4, 24))),)


def _shape(cfg: Any) -> Dict[str, Any]:
    v, t = cfg.model.vision, cfg.model.text
    return {"vision": [v.width, v.depth, (v.image_size // v.patch_size) ** 2],
            "text": [t.width, t.depth, t.context_length]}


def run_check_point(p: CheckPoint, run_dir: Path, shards: Path, tok: Path, steps: int) -> Dict[str, Any]:
    """Train the engine at one point; measured and planned peak per rank and the planner's relative error."""
    config, preset = resolve_config("small")
    name, stage = split_strategy(p.strategy)
    extra = [*preset, *p.model, *(CKPT if p.checkpointing else ()), *stage]
    ov = engine_overrides(shards, tok, run_dir, p.batch, steps, name, extra=extra)
    cfg, row = planned_row(config, ov, tok, p.world)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    ranks = launch_engine(p.world, config, ov, timeout=1200)
    measured = max(r["peak_live_bytes"] for r in ranks)
    return {**asdict(p), **_shape(cfg), "measured_peak_bytes": measured, "planned_peak_bytes": row.peak,
            "relative_error": row.peak / measured - 1, "wall_s": round(time.perf_counter() - t0, 1),
            "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def run_plan_check(out_json: str | os.PathLike = "bench_results/plan_check.json",
                   points: Sequence[CheckPoint] = POINTS, steps: int = 3, quick: bool = False,
                   workdir: Optional[str] = None) -> Dict[str, Any]:
    """Every point in ``points`` (``quick``: the one CI point) through the engine; write and return JSON."""
    points = QUICK if quick else points
    rows: List[Dict[str, Any]] = []
    results = {"calibration": CALIBRATION, "memory_method": MEMORY_METHOD, "steps": steps, "points": rows}
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sigscale_plan_check_") as tmp:
        work = Path(workdir or tmp)
        shards, tok = write_bench_data(work / "data")
        for i, p in enumerate(points):
            rows.append(run_check_point(p, work / f"run_{i}", shards, tok, steps))
            out.write_text(json.dumps(results, indent=2))
    return results


def render_markdown(results: Dict[str, Any]) -> str:
    """Predicted against measured peak per rank, one row per point, and the error over the held-out rows."""
    lines = [f"Calibration set: {results['calibration']}. Measured: {results['memory_method']}; fp32, "
             f"{results['steps']} steps, max over ranks.", "",
             "| point | set | vision width / depth / tokens | text width / depth / tokens | checkpointing | strategy "
             "| W | global batch | measured peak / rank (MiB) | planner's peak / rank (MiB) | planner error | load |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    held_out = []
    for r in results["points"]:
        if not r["calibration"]:
            held_out.append(abs(r["relative_error"]))
        lines.append(f"| {r['name']} | {'calibration' if r['calibration'] else 'held out'} | "
                     f"{' / '.join(map(str, r['vision']))} | {' / '.join(map(str, r['text']))} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['strategy']} | {r['world']} | {r['batch']} | "
                     f"{r['measured_peak_bytes'] / 2**20:.1f} | {r['planned_peak_bytes'] / 2**20:.1f} | "
                     f"{100 * r['relative_error']:+.1f}% | {r['loadavg_1min'][0]} |")
    if held_out:
        lines += ["", f"Held-out points: {len(held_out)}, mean |error| {100 * sum(held_out) / len(held_out):.1f}%, "
                      f"max |error| {100 * max(held_out):.1f}%."]
    return "\n".join(lines) + "\n"
