"""Curation throughput: the text stage in captions/s and img2dataset end to end in images/s, on loopback.

Curates a generated list served by :mod:`sigscale.curation.serve` with the demo config and reads
the timings the pipeline records in stats.json (img2dataset's worker start-up included).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional


def run_curation_bench(out_json: Optional[str | Path] = None, rows: int = 16384, processes: int = 2,
                       threads: int = 32) -> dict:
    """Curate ``rows`` generated URLs from 127.0.0.1 and return (and write) the throughput numbers."""
    from sigscale.curation.config import load_curation_config
    from sigscale.curation.pipeline import curate
    from sigscale.curation.serve import ImageServer, write_url_list

    with tempfile.TemporaryDirectory() as tmp, ImageServer() as server:
        urls = write_url_list(Path(tmp) / "urls.parquet", rows, server.base_url, seed=0)
        cfg = load_curation_config("demo", [f"input.path={urls}", f"output.dir={Path(tmp) / 'out'}",
                                            f"download.processes={processes}", f"download.threads={threads}"])
        start = time.perf_counter()
        out = curate(cfg)
        wall = time.perf_counter() - start
        stats = json.loads((out / "stats.json").read_text())
    t = stats["timing"]
    result = {
        "rows": rows, "kept": stats["kept"], "processes": processes, "threads": threads,
        "cpus": os.cpu_count(), "wall_seconds": round(wall, 1),
        "text_captions_per_second": t["captions_per_second"],
        "download_images_per_second": t["images_per_second"],
        "end_to_end_rows_per_second": round(rows / wall, 1),
        "seconds": {k: t[k] for k in ("plan_seconds", "text_seconds", "download_seconds", "image_seconds",
                                      "finalize_seconds")},
    }
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result
