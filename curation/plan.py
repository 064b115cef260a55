"""Plan a URL list: number its rows, cut them into parts, find its exact (url, caption) duplicates.

Three steps, each a set of independent tasks (:mod:`sigscale.curation.tasks`), so that no process reads the
whole list:

1. :func:`plan_layout`, once, where `sigscale curate` or `sigscale submit curate` runs: counts every file's rows
   (a parquet file's footer, no row read; a text file is parsed), numbers them in file order, then line order,
   and cuts them into parts of ``output.rows_per_part`` rows: plan.json. The Slurm arrays are sized from it.
2. :func:`plan_file`, a task per input file: reads its file batch by batch, normalises captions, drops invalid
   URLs and empty captions (plan/drops-FFFFF.parquet), appends every other row to the part it falls in
   (inputs/part-NNNNN/file-FFFFF.parquet: a part's rows are its pieces, one per file it overlaps) and a 128-bit
   key of its (url, caption) to one of ``output.dedup_partitions`` partitions by key
   (dedup/keys-KKKKK/file-FFFFF.parquet); its summary, plan/file-FFFFF.json, last: it marks the task done.
3. :func:`dedup_partition`, a task per key partition: every copy of a pair but its smallest row
   (dedup/drops-KKKKK.parquet). Equal pairs share a partition and rows are numbered over the whole list, so the
   rows marked are the same whatever the partition count, the file count or the order the tasks ran in.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sigscale.core.procstat import trim_heap
from sigscale.curation.config import CurationConfig, CurationError
from sigscale.curation.langid import declared_code
from sigscale.curation.partitions import band_layout
from sigscale.curation.sources import COLUMNS as URL_COLUMNS, iter_file, list_files, number_files
from sigscale.curation.tasks import local_pool, task_index, write_json
from sigscale.curation.text_filters import (CLEANED, cleaned_counts, later_copies, normalize_rows, pair_keys,
                                           reasons_by_language, sum_counts)

PLAN = "plan.json"
PLAN_DIR = "plan"  # file-FFFFF.json (a file task's summary) and drops-FFFFF.parquet (its rows dropped)
INPUTS_DIR = "inputs"  # part-NNNNN/file-FFFFF.parquet: the part's rows that file holds
DEDUP_DIR = "dedup"  # keys-KKKKK/file-FFFFF.parquet: a partition's pair keys from that file; drops-KKKKK.parquet
PARTS_DIR = "parts"  # part-NNNNN/: a curated part; done.json marks it finished
DONE = "done.json"
# The work folder's layout, part of the fingerprint: a plan written by an older layout is planned again.
LAYOUT = 2
_DROPS = pa.schema([("row", pa.int64()), ("reason", pa.string())])


@dataclass(frozen=True)
class Part:
    """A contiguous range [start, stop) of input rows, curated on its own."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


def part_dir(cfg: CurationConfig, part: Part) -> Path:
    return cfg.work_dir / PARTS_DIR / part.name


def parts_of(plan: dict) -> List[Part]:
    """The parts, derived from the row count: plan.json stays O(files), so that the tasks which read it once per
    part (the merge, over 10^4-10^5 parts) do not parse a list of every part each time."""
    n, step = plan["input_rows"], plan["rows_per_part"]
    return [Part(k, start, min(n, start + step)) for k, start in enumerate(range(0, n, step))]


def _piece(f: int) -> str:
    """The name of input file ``f``'s share of a part or of a key partition."""
    return f"file-{f:05d}"


def _fingerprint(cfg: CurationConfig) -> dict:
    files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in list_files(cfg.input)]
    return {"files": files, "input": asdict(cfg.input), "rows_per_part": cfg.output.rows_per_part,
            "dedup_partitions": cfg.output.dedup_partitions, "layout": LAYOUT}


def plan_layout(cfg: CurationConfig) -> dict:
    """plan.json: the files with their row counts and first rows, the rows per part (see module doc). Reuses the
    plan of the same input and settings; a changed one is laid out again, unless a part of it has finished."""
    work = cfg.work_dir
    path = work / PLAN
    fingerprint = _fingerprint(cfg)
    if path.is_file():
        plan = json.loads(path.read_text())
        if plan["fingerprint"] == fingerprint:
            return plan
        done = list((work / PARTS_DIR).glob(f"*/{DONE}"))
        if done:
            raise CurationError(
                f"{work} holds {len(done)} finished part(s) of a different URL list, input config or sigscale "
                f"version (input.path={cfg.input.path}); use a new output.dir or delete {work}")
    with local_pool(cfg.output.local_processes) as pool:  # spawns only for text files: parquet has footers
        files = number_files(cfg.input, pool)
    n = sum(rows for _, rows, _ in files)
    for stale in (work / PLAN_DIR, work / INPUTS_DIR, work / DEDUP_DIR):
        shutil.rmtree(stale, ignore_errors=True)
        stale.mkdir(parents=True)
    step = cfg.output.rows_per_part
    plan = {"fingerprint": fingerprint, "input_rows": n, "rows_per_part": step,
            "files": [{"path": str(p.resolve()), "rows": rows, "start": start} for p, rows, start in files],
            "dedup_partitions": cfg.output.dedup_partitions}
    write_json(path, plan)
    print(f"curate: {n:,} rows in {len(files)} file(s), {len(parts_of(plan))} part(s) of up to {step:,} rows",
          flush=True)
    warn_partition_sizes(cfg, n)
    return plan


def read_plan(cfg: CurationConfig) -> dict:
    """plan.json, or a CurationError that says to plan first."""
    path = cfg.work_dir / PLAN
    if not path.is_file():
        raise CurationError(f"no {PLAN} in {cfg.work_dir}; run `sigscale curate` (it plans and runs the parts) first")
    return json.loads(path.read_text())


def _summary(cfg: CurationConfig, f: int) -> Path:
    return cfg.work_dir / PLAN_DIR / f"{_piece(f)}.json"


def unplanned_files(cfg: CurationConfig, plan: dict) -> List[int]:
    """The input files whose plan task has not finished."""
    return [f for f in range(len(plan["files"])) if not _summary(cfg, f).is_file()]


def _require_planned(cfg: CurationConfig, plan: dict) -> None:
    missing = unplanned_files(cfg, plan)
    if missing:
        raise CurationError(
            f"{len(missing)} of {len(plan['files'])} URL-list file(s) are not planned yet, e.g. "
            f"{[Path(plan['files'][f]['path']).name for f in missing[:3]]} (file(s) {missing[:3]}); run "
            "`sigscale curate --plan-file F` for each F (or `sigscale curate`, which runs them) first")


def plan_file(cfg: CurationConfig, index: int) -> Path:
    """The plan task of input file ``index`` (see module doc); skipped when done. Holds one batch of the file
    (``sources.BATCH_ROWS`` rows) and its writers, whatever the file's size."""
    plan = read_plan(cfg)
    f = task_index(index, len(plan["files"]), "plan", "--plan-file")
    out = _summary(cfg, f)
    if out.is_file():
        return out
    work, entry = cfg.work_dir, plan["files"][f]
    t0 = time.perf_counter()
    cleaned: Counter = Counter()
    by_language = []
    dropped, read = 0, entry["start"]
    drops_path = work / PLAN_DIR / f"drops-{f:05d}.parquet"
    with PairKeyWriters(work / DEDUP_DIR, plan["dedup_partitions"], _piece(f)) as keys, \
            pq.ParquetWriter(drops_path.with_suffix(".tmp"), _DROPS) as drop_writer, \
            _InputWriters(work / INPUTS_DIR, cfg.output.rows_per_part, _piece(f), entry["start"]) as inputs:
        for batch in iter_file(cfg.input, Path(entry["path"]), entry["start"]):
            cleaned.update(cleaned_counts(batch["caption"]))
            reason = normalize_rows(batch)
            bad = batch[reason.notna()]
            drops = pd.DataFrame({"row": bad["row"].to_numpy(np.int64), "reason": reason[reason.notna()].to_numpy(object)})
            drop_writer.write_table(pa.Table.from_pandas(drops, _DROPS, preserve_index=False))
            declared = pd.Series([declared_code(x) for x in bad["declared_language"]], index=bad["row"].to_numpy())
            by_language.append(reasons_by_language(drops, declared))
            dropped += len(bad)
            valid = batch[reason.isna()]
            keys.write(valid["row"].to_numpy(np.int64), *pair_keys(valid))
            read = int(batch["row"].iloc[-1]) + 1
            inputs.write(valid, read)
            del batch, valid, bad
            trim_heap()  # each batch's strings fragment glibc's heap: without this the RSS creeps up file by file
        if read - entry["start"] != entry["rows"]:
            raise CurationError(
                f"URL list {entry['path']} has {read - entry['start']} rows now and had {entry['rows']} when the "
                "list was laid out: it changed while being curated; put the original back, or curate it into a "
                "new output.dir")
    drops_path.with_suffix(".tmp").replace(drops_path)
    write_json(out, {"path": entry["path"], "rows": entry["rows"], "dropped": dropped,
                     "captions_cleaned": {k: cleaned[k] for k in CLEANED},
                     "dropped_by_language": sum_counts(by_language), "seconds": round(time.perf_counter() - t0, 3)})
    return out


def plan_stats(cfg: CurationConfig) -> dict:
    """What planning counted, summed over the file tasks: input rows, captions cleaned, rows dropped by reason
    and language, and the tasks' seconds."""
    plan = read_plan(cfg)
    _require_planned(cfg, plan)
    done = [json.loads(_summary(cfg, f).read_text()) for f in range(len(plan["files"]))]
    return {"input_rows": plan["input_rows"], "plan_seconds": round(sum(d["seconds"] for d in done), 3),
            "captions_cleaned": {k: sum(d["captions_cleaned"][k] for d in done) for k in CLEANED},
            "dropped_by_language": sum_counts(d["dropped_by_language"] for d in done)}


# What one task holds at peak, measured by `sigscale bench curation` (BENCHMARKS.md): a dedup task ~110 bytes
# per key of its partition (2M keys: 314 MiB), a near task ~350 bytes per band copy (1M copies: 446 MiB),
# both over a ~100 MiB interpreter. The partition counts that keep a task near 2.5 GiB:
DEDUP_BYTES_PER_ROW, NEAR_BYTES_PER_COPY = 110, 350
DEDUP_ROWS_PER_TASK = 20_000_000
NEAR_COPIES_PER_TASK = 6_000_000


def warn_partition_sizes(cfg: CurationConfig, rows: int) -> None:
    """Say so, before any task runs, when a dedup or near task would hold more than about 2.5 GiB."""
    out, bands = cfg.output, len(band_layout(cfg.image.phash_threshold))
    if rows > DEDUP_ROWS_PER_TASK * out.dedup_partitions:
        print(f"curate: warning: {rows:,} rows in {out.dedup_partitions} exact-dedup partition(s): each dedup task "
              f"holds ~{rows / out.dedup_partitions * DEDUP_BYTES_PER_ROW / 2 ** 30:.1f} GiB; set "
              f"output.dedup_partitions={math.ceil(rows / DEDUP_ROWS_PER_TASK)} (one per {DEDUP_ROWS_PER_TASK:,} "
              "rows; the URL list is planned again with it)", flush=True)
    if cfg.image.phash_threshold >= 0 and rows * bands > NEAR_COPIES_PER_TASK * out.finalize_partitions:
        print(f"curate: warning: up to {rows * bands:,} pHash band copies ({bands} per candidate) in "
              f"{out.finalize_partitions} near-duplicate partition(s): each near task holds up to "
              f"~{rows * bands / out.finalize_partitions * NEAR_BYTES_PER_COPY / 2 ** 30:.1f} GiB; set "
              f"output.finalize_partitions={math.ceil(rows * bands / NEAR_COPIES_PER_TASK)}", flush=True)


class PairKeyWriters:
    """One writer's (row, k1, k2) per exact-duplicate partition, ``folder``/keys-KKKKK/``piece``.parquet, appended
    batch by batch and renamed into place when the writer closes without an error."""

    SCHEMA = pa.schema([("row", pa.int64()), ("k1", pa.uint64()), ("k2", pa.uint64())])

    def __init__(self, folder: Path, partitions: int, piece: str):
        self.paths = [folder / f"keys-{k:05d}" / f"{piece}.parquet" for k in range(partitions)]
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.writers = [pq.ParquetWriter(p.with_suffix(".tmp"), self.SCHEMA) for p in self.paths]

    def write(self, rows: np.ndarray, k1: np.ndarray, k2: np.ndarray) -> None:
        bucket = k1 % np.uint64(len(self.writers))
        for k, writer in enumerate(self.writers):
            mine = bucket == k
            writer.write_table(pa.table({"row": rows[mine], "k1": k1[mine], "k2": k2[mine]}, schema=self.SCHEMA))

    def __enter__(self) -> "PairKeyWriters":
        return self

    def __exit__(self, kind, *exc) -> None:
        for writer in self.writers:
            writer.close()
        if kind is None:
            for path in self.paths:
                path.with_suffix(".tmp").replace(path)


class _InputWriters:
    """One writer's rows, appended to inputs/part-NNNNN/``piece``.parquet batch by batch and published (renamed)
    once every row of the part it can hold has been read, so a task holds one batch, not a part. Every part the
    writer's rows reach gets its piece, empty ones too."""

    SCHEMA = pa.schema([("row", pa.int64()), *((c, pa.string()) for c in (*URL_COLUMNS[1:], "caption_original"))])

    def __init__(self, folder: Path, rows_per_part: int, piece: str, start: int):
        self.folder, self.step, self.piece = folder, rows_per_part, piece
        self.open: Dict[int, pq.ParquetWriter] = {}
        self.next = start // rows_per_part  # the first part not yet published
        self.start = self.read = start  # the writer's first row; rows read so far, counted from the list's first

    def _path(self, k: int, suffix: str) -> Path:
        return self.folder / f"part-{k:05d}" / f"{self.piece}{suffix}"

    def _writer(self, k: int) -> pq.ParquetWriter:
        if k not in self.open:
            self._path(k, "").parent.mkdir(exist_ok=True)
            self.open[k] = pq.ParquetWriter(self._path(k, ".tmp"), self.SCHEMA)
        return self.open[k]

    def write(self, rows: pd.DataFrame, read: int) -> None:
        """Append ``rows`` (ascending) to their parts; publish the parts whose rows all lie below ``read``."""
        for k, chunk in rows.groupby(rows["row"].to_numpy() // self.step, sort=True):
            table = pa.Table.from_pandas(chunk[self.SCHEMA.names], self.SCHEMA, preserve_index=False)
            self._writer(int(k)).write_table(table)
        self.read = read
        while (self.next + 1) * self.step <= read:
            self._publish()

    def _publish(self) -> None:
        k = self.next
        self._writer(k).close()  # a part without rows here gets an empty piece with the schema
        del self.open[k]
        self._path(k, ".tmp").replace(self._path(k, ".parquet"))
        self.next += 1

    def __enter__(self) -> "_InputWriters":
        return self

    def __exit__(self, kind, *exc) -> None:
        try:
            while kind is None and self.start < self.read and self.next * self.step < self.read:  # the last one
                self._publish()
        finally:
            for writer in self.open.values():
                writer.close()


def _files_of(plan: dict, part: Part) -> List[int]:
    """The input files holding rows of ``part``."""
    return [f for f, e in enumerate(plan["files"]) if e["start"] < part.stop and e["start"] + e["rows"] > part.start]


def in_range(path: Path, part: Part) -> pd.DataFrame:
    """The lines of a parquet file keyed by row whose rows fall in the part's."""
    return pq.read_table(path, filters=[("row", ">=", part.start), ("row", "<", part.stop)]).to_pandas()


def _planned_pieces(cfg: CurationConfig, part: Part, path_of) -> List[Path]:
    """``path_of(f)`` for every file holding rows of ``part``, once each exists; else a CurationError."""
    plan = read_plan(cfg)
    paths = [path_of(f) for f in _files_of(plan, part)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CurationError(f"{missing[0]} is missing; plan the URL list (`sigscale curate --plan`, or "
                            "`sigscale curate --plan-file F` for each file) before running parts")
    return paths


def part_rows(cfg: CurationConfig, part: Part, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """The part's rows that planning kept, in row order: its pieces, one per input file it overlaps."""
    paths = _planned_pieces(cfg, part, lambda f: cfg.work_dir / INPUTS_DIR / part.name / f"{_piece(f)}.parquet")
    return pd.concat([pd.read_parquet(p, columns=columns) for p in paths], ignore_index=True)


def plan_drops(cfg: CurationConfig, part: Part) -> pd.DataFrame:
    """The part's rows that planning dropped (row, reason: invalid URL, empty caption), in row order."""
    paths = _planned_pieces(cfg, part, lambda f: cfg.work_dir / PLAN_DIR / f"drops-{f:05d}.parquet")
    return pd.concat([in_range(p, part) for p in paths], ignore_index=True)


def dedup_partition(cfg: CurationConfig, k: int) -> Path:
    """Exact (url, caption) duplicates among one partition of the pair keys: every copy but the smallest
    row, as dedup/drops-KKKKK.parquet (skipped when done). Holds one partition's keys (24 bytes a row) and
    their sort: ~110 bytes a row at peak (`sigscale bench curation --sections plan`)."""
    plan = read_plan(cfg)
    k = task_index(k, plan["dedup_partitions"], "dedup", "--dedup")
    out = cfg.work_dir / DEDUP_DIR / f"drops-{k:05d}.parquet"
    if not out.is_file():
        _require_planned(cfg, plan)
        folder = cfg.work_dir / DEDUP_DIR / f"keys-{k:05d}"
        keys = pa.concat_tables([pq.read_table(folder / f"{_piece(f)}.parquet") for f in range(len(plan["files"]))])
        rows = keys["row"].to_numpy()
        later = later_copies(rows, keys["k1"].to_numpy(), keys["k2"].to_numpy())
        pd.DataFrame({"row": np.sort(rows[later])}).to_parquet(out.with_suffix(".tmp"), index=False)
        out.with_suffix(".tmp").replace(out)
    return out


def duplicates_in(cfg: CurationConfig, part: Part) -> np.ndarray:
    """Rows of ``part`` that repeat a smaller row's (url, caption), from every dedup partition's drops."""
    plan = read_plan(cfg)
    paths = [cfg.work_dir / DEDUP_DIR / f"drops-{k:05d}.parquet" for k in range(plan["dedup_partitions"])]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CurationError(f"exact-duplicate partition(s) {missing[:3]} not run yet ({len(missing)} missing); run "
                            "`sigscale curate --dedup K` for each K (or `sigscale curate`, which runs them) first")
    found = [in_range(p, part)["row"].to_numpy() for p in paths]
    return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)
