"""Curation in parts: plan, run each part (locally or one per Slurm array task), finalize.

``plan_parts`` reads the URL list once, batch by batch, normalises captions, drops invalid URLs and
empty captions, cuts the rest into parts of ``output.rows_per_part`` input rows, and writes a 128-bit
key of each (url, caption) into one of ``output.dedup_partitions`` partitions by key.
``dedup_partition`` (one task per partition) marks every copy of a pair but its smallest row: the
same rows whatever the partition count, since equal pairs share a partition. ``run_part`` drops its
rows marked so and takes the rest through the text stage, img2dataset and the image checks into
``work/parts/part-NNNNN/`` and marks it done; a rerun skips it. A part keeps img2dataset's tars
(download/shards/, the only copy of its images) and candidates.parquet (metadata, pHash, thumbnail,
and where each image is in the tars). The finalize steps here (prepare, scatter per part, near per
partition) find eval and near duplicates; :mod:`sigscale.curation.finalize` runs the rest per part
and merges. Every input row ends kept or with one counted drop reason.

Layout under ``output.dir``: shard-NNNNN.tar, manifest.json, stats.json, captions.txt, report.md, report.html,
plots, and work/ (plan.json, plan_drops.parquet, inputs/, dedup/, parts/).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sigscale.core.config import config_hash
from sigscale.core.procstat import trim_heap
from sigscale.curation.balance import BALANCE_REASONS
from sigscale.curation.config import CurationConfig, CurationError, part_config_hash
from sigscale.curation.download import DOWNLOAD_REASONS, download
from sigscale.curation.image_filters import IMAGE_REASONS, check_images, eval_images, hash_files
from sigscale.curation.langid import declared_code
from sigscale.curation.partitions import (PAIRS_PER_SECOND, PARTITION_REASONS, band_layout, chance_pairs,
                                         narrowest_band, partition_drops, rows_per_cpu_hour, scatter)
from sigscale.curation.sources import COLUMNS as URL_COLUMNS, iter_url_list, list_files
from sigscale.curation.text_filters import (CLEANED, DUPLICATE_URL_CAPTION, TEXT_REASONS, cleaned_counts, filter_text,
                                           language_outcomes, later_copies, normalize_rows, pair_keys)
from sigscale.curation.url_policy import UrlPolicy

PLAN = "plan.json"
DONE = "done.json"
OUTCOMES = "outcomes.parquet"  # one line per input row: row, reason (null: kept)
SAMPLES = "samples.parquet"  # a part's first dropped images per image-stage reason, for report.html
SAMPLES_PER_REASON = 8
KEPT_SAMPLES = 24
# Drop reasons of the finalize step; with the text, download and image stages' these are every reason there is.
LOW_SCORE, BALANCE = "low_score", "balance"
FINALIZE_REASONS = (*PARTITION_REASONS, LOW_SCORE, BALANCE)
# A URL reason can come from the text stage or, at fetch time, from the download: listed once.
DROP_REASONS = tuple(dict.fromkeys(TEXT_REASONS + DOWNLOAD_REASONS + IMAGE_REASONS + FINALIZE_REASONS + BALANCE_REASONS))
# Exact (url, caption) duplicates, partitioned by pair key: keys-NNNNN.parquet from the plan, drops-NNNNN.parquet.
DEDUP_DIR = "dedup"
_DROPS = pa.schema([("row", pa.int64()), ("reason", pa.string())])
# The partitioned finalize's work folder: settings.json, eval.parquet, bands/pNNNNN/, scattered/, drops/.
FINALIZE_DIR = "finalize"
# A candidate's columns; "shard" and "key" name its image in img2dataset's tars (download/shards/).
_META = ["row", "part", "url", "caption", "caption_original", "declared_language", "extras", "language",
         "language_confidence", "width", "height", "original_width", "original_height", "nbytes", "phash",
         "thumb", "score", "final_url", "shard", "key"]


@dataclass(frozen=True)
class Part:
    """A contiguous range [start, stop) of input rows, curated on its own."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str))
    tmp.replace(path)


def _fingerprint(cfg: CurationConfig) -> dict:

    files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in list_files(cfg.input)]
    return {"files": files, "input": asdict(cfg.input), "rows_per_part": cfg.output.rows_per_part,
            "dedup_partitions": cfg.output.dedup_partitions}


def _parts_from(plan: dict) -> List[Part]:
    return [Part(**p) for p in plan["parts"]]


def _part_dir(cfg: CurationConfig, part: Part) -> Path:
    return cfg.work_dir / "parts" / part.name


def plan_parts(cfg: CurationConfig, dedup: bool = True) -> List[Part]:
    """Split the URL list into parts (reusing an existing plan of the same input); see module doc.

    Reads the list batch by batch and holds one batch and the parts it is filling, whatever the list's
    size. ``dedup`` also runs the exact-duplicate partitions not yet done, here, over
    ``output.local_processes`` processes (`sigscale submit curate` runs them as an array instead).
    """
    work = cfg.work_dir
    plan_path = work / PLAN
    fingerprint = _fingerprint(cfg)
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        if plan["fingerprint"] == fingerprint:
            return _planned(cfg, plan, dedup)
        done = [p.name for p in _parts_from(plan) if (_part_dir(cfg, p) / DONE).is_file()]
        if done:
            raise CurationError(
                f"{work} holds {len(done)} finished part(s) of a different URL list or input config "
                f"(input.path={cfg.input.path}); use a new output.dir or delete {work}"
            )
    t0 = time.perf_counter()
    for stale in (work / "inputs", work / DEDUP_DIR):
        shutil.rmtree(stale, ignore_errors=True)
        stale.mkdir(parents=True)
    step, buckets = cfg.output.rows_per_part, cfg.output.dedup_partitions
    cleaned: Counter = Counter()
    by_language: List[Dict[str, Dict[str, int]]] = []
    n = dropped = 0
    drops_path = work / "plan_drops.parquet"
    with PairKeyWriters(work / DEDUP_DIR, buckets) as keys, pq.ParquetWriter(drops_path, _DROPS) as drop_writer, \
            _InputWriters(work / "inputs", step) as inputs:
        for batch in iter_url_list(cfg.input):
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
            n = int(batch["row"].iloc[-1]) + 1
            inputs.write(valid, n)
            del batch, valid, bad
            trim_heap()
    parts = [Part(k, start, min(n, start + step)) for k, start in enumerate(range(0, n, step))]
    plan = {"fingerprint": fingerprint, "input_rows": n, "parts": [asdict(p) for p in parts],
            "dedup_partitions": buckets, "captions_cleaned": {k: cleaned[k] for k in CLEANED},
            "plan_seconds": round(time.perf_counter() - t0, 3),
            "dropped_by_language": _sum_counts(by_language)}
    _write_json(plan_path, plan)
    print(f"curate: planned {n} rows in {len(parts)} part(s); {dropped} dropped before download (invalid URL, "
          "empty caption)", flush=True)
    _warn_partition_sizes(cfg, n)
    return _planned(cfg, plan, dedup)


# What one task holds at peak, measured by `sigscale bench curation` (BENCHMARKS.md): a dedup task ~110 bytes
# per key of its partition (2M keys: 314 MiB), a near task ~350 bytes per band copy (1M copies: 446 MiB),
# both over a ~100 MiB interpreter. The partition counts that keep a task near 2.5 GiB:
DEDUP_BYTES_PER_ROW, NEAR_BYTES_PER_COPY = 110, 350
DEDUP_ROWS_PER_TASK = 20_000_000
NEAR_COPIES_PER_TASK = 6_000_000


def _warn_partition_sizes(cfg: CurationConfig, rows: int) -> None:
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
    """One parquet file of (row, k1, k2) per exact-duplicate partition, appended batch by batch."""

    SCHEMA = pa.schema([("row", pa.int64()), ("k1", pa.uint64()), ("k2", pa.uint64())])

    def __init__(self, folder: Path, partitions: int):
        self.paths = [folder / f"keys-{k:05d}.parquet" for k in range(partitions)]
        self.writers = [pq.ParquetWriter(p, self.SCHEMA) for p in self.paths]

    def write(self, rows: np.ndarray, k1: np.ndarray, k2: np.ndarray) -> None:
        bucket = k1 % np.uint64(len(self.writers))
        for k, writer in enumerate(self.writers):
            mine = bucket == k
            writer.write_table(pa.table({"row": rows[mine], "k1": k1[mine], "k2": k2[mine]}, schema=self.SCHEMA))

    def __enter__(self) -> "PairKeyWriters":
        return self

    def __exit__(self, *exc) -> None:
        for writer in self.writers:
            writer.close()


class _InputWriters:
    """work/inputs/part-NNNNN.parquet, appended batch by batch and published (renamed) once every row of the part
    has been read, so the planner holds one batch, not a part. Every part gets its file, empty ones too."""

    SCHEMA = pa.schema([("row", pa.int64()), *((c, pa.string()) for c in (*URL_COLUMNS[1:], "caption_original"))])

    def __init__(self, folder: Path, rows_per_part: int):
        self.folder, self.step = folder, rows_per_part
        self.open: Dict[int, pq.ParquetWriter] = {}
        self.next = 0  # the first part not yet published
        self.read = 0  # input rows read so far

    def _path(self, k: int, suffix: str) -> Path:
        return self.folder / f"part-{k:05d}{suffix}"

    def _writer(self, k: int) -> pq.ParquetWriter:
        if k not in self.open:
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
        self._writer(k).close()  # a part without rows gets an empty file with the schema
        del self.open[k]
        self._path(k, ".tmp").replace(self._path(k, ".parquet"))
        self.next += 1

    def __enter__(self) -> "_InputWriters":
        return self

    def __exit__(self, kind, *exc) -> None:
        try:
            while kind is None and self.next * self.step < self.read:  # the last part, shorter than the others
                self._publish()
        finally:
            for writer in self.open.values():
                writer.close()


def _planned(cfg: CurationConfig, plan: dict, dedup: bool) -> List[Part]:
    if dedup:
        with local_pool(min(cfg.output.local_processes, plan["dedup_partitions"])) as pool:
            run_tasks([(dedup_partition, (cfg, k)) for k in range(plan["dedup_partitions"])], pool)
    return _parts_from(plan)


Call = Tuple[Callable[..., object], tuple]


@contextmanager
def local_pool(processes: int) -> Iterator[Optional[ProcessPoolExecutor]]:
    """``processes`` spawned worker processes for :func:`run_tasks` (no state forked from this one), shut down on
    exit; None for 1 (the tasks then run here)."""
    if processes <= 1:
        yield None
        return
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        yield pool


def run_tasks(calls: Sequence[Call], pool: Optional[ProcessPoolExecutor] = None,
              done: Optional[Callable[[], None]] = None) -> None:
    """Run the independent tasks of one step: here, in turn, or over ``pool``'s processes. Each task writes its
    own output; the first failure is raised."""
    if pool is None or len(calls) <= 1:
        for fn, args in calls:
            fn(*args)
            if done:
                done()
        return
    for future in as_completed([pool.submit(fn, *args) for fn, args in calls]):
        future.result()
        if done:
            done()


def dedup_partition(cfg: CurationConfig, k: int) -> Path:
    """Exact (url, caption) duplicates among one partition of the pair keys: every copy but the smallest
    row, as work/dedup/drops-NNNNN.parquet (skipped when done). Holds one partition's keys (24 bytes a row) and
    their sort: ~110 bytes a row at peak (`sigscale bench curation --sections plan`)."""
    plan = _plan(cfg)
    k = _task_index(k, plan["dedup_partitions"], "dedup", "--dedup")
    out = cfg.work_dir / DEDUP_DIR / f"drops-{k:05d}.parquet"
    if not out.is_file():
        keys = pq.read_table(cfg.work_dir / DEDUP_DIR / f"keys-{k:05d}.parquet")
        rows = keys["row"].to_numpy()
        later = later_copies(rows, keys["k1"].to_numpy(), keys["k2"].to_numpy())
        pd.DataFrame({"row": np.sort(rows[later])}).to_parquet(out.with_suffix(".tmp"), index=False)
        out.with_suffix(".tmp").replace(out)
    return out


def _duplicates_in(cfg: CurationConfig, part: Part) -> np.ndarray:
    """Rows of ``part`` that repeat a smaller row's (url, caption), from every dedup partition's drops."""
    plan = _plan(cfg)
    paths = [cfg.work_dir / DEDUP_DIR / f"drops-{k:05d}.parquet" for k in range(plan["dedup_partitions"])]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CurationError(f"exact-duplicate partition(s) {missing[:3]} not run yet ({len(missing)} missing); run "
                            "`sigscale curate --dedup K` for each K (or `sigscale curate`, which runs them) first")
    found = [pq.read_table(p, filters=[("row", ">=", part.start), ("row", "<", part.stop)])["row"].to_numpy()
             for p in paths]
    return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)


def run_part(cfg: CurationConfig, part: Part) -> Path:
    """Curate one part into work/parts/<name> (idempotent: a finished part is skipped)."""
    final = _part_dir(cfg, part)
    want = part_config_hash(cfg)
    if (final / DONE).is_file():
        have = json.loads((final / DONE).read_text()).get("config_hash")
        if have != want:
            raise CurationError(
                f"{final} was curated with another config (hash {have}, now {want}); finalize-only settings "
                "(decontaminate, phash, score thresholds, balance, shards) may change, the rest may not: "
                "use a new output.dir or delete the work folder"
            )
        return final
    input_path = cfg.work_dir / "inputs" / f"{part.name}.parquet"
    if not input_path.is_file():
        raise CurationError(f"{input_path} is missing; run plan_parts (sigscale curate) before running parts")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt; img2dataset needs a fresh folder
    tmp.mkdir(parents=True)
    rows = pd.read_parquet(input_path)

    t0 = time.perf_counter()
    dedup_drops = pd.DataFrame({"row": _duplicates_in(cfg, part), "reason": DUPLICATE_URL_CAPTION})
    kept, text_drops = filter_text(rows[~rows["row"].isin(dedup_drops["row"])], cfg.text)
    t1 = time.perf_counter()
    print(f"curate: {part.name} text: {len(rows)} rows, {len(kept)} kept ({t1 - t0:.1f} s)", flush=True)
    results = download(kept[["row", "url", "caption"]], tmp / "download", cfg.download,
                       UrlPolicy.from_config(cfg.text), label=part.name)
    t2 = time.perf_counter()
    samples: Dict[str, list] = {}
    candidates, image_drops = check_images(results, tmp / "download" / "shards", cfg.image, samples, SAMPLES_PER_REASON)
    candidates = candidates.merge(
        kept[["row", "url", "caption", "caption_original", "declared_language", "extras", "language",
              "language_confidence"]], on="row", how="left")
    candidates = candidates.merge(results[["row", "final_url"]], on="row", how="left")
    candidates["part"] = part.index
    candidates["score"] = np.nan
    if cfg.image.score.model and len(candidates):
        from sigscale.curation.score import score_pairs

        candidates["score"] = score_pairs(list(candidates["jpg"]), list(candidates["caption"]), cfg.image.score)
    t3 = time.perf_counter()

    download_drops = results.loc[results["reason"].notna(), ["row", "reason"]]
    drops = pd.concat([dedup_drops, text_drops, download_drops, image_drops], ignore_index=True).astype({"row": np.int64})
    if len(drops) + len(candidates) != len(rows) or drops["row"].duplicated().any():
        raise RuntimeError(f"{part.name}: {len(rows)} rows in, {len(candidates)} kept + {len(drops)} dropped out")
    candidates[_META].to_parquet(tmp / "candidates.parquet", index=False)
    drops.to_parquet(tmp / "drops.parquet", index=False)
    pd.DataFrame([(row, reason, jpg) for reason, items in samples.items() for row, jpg in items],
                 columns=["row", "reason", "jpg"]).to_parquet(tmp / SAMPLES, index=False)
    if not cfg.output.keep_downloads:  # the tars stay: the final shards are cut from them
        for path in (tmp / "download").rglob("*"):
            if path.is_file() and not (path.parent.name == "shards" and path.suffix == ".tar"):
                path.unlink()
    arrived = results[results["reason"].isna()]
    fetched = len(arrived)
    language = _row_languages(rows, kept)
    _write_json(tmp / DONE, {
        "part": asdict(part), "config_hash": want, "rows": len(rows), "candidates": len(candidates),
        "dropped": dict(Counter(drops["reason"])), "languages_text": dict(Counter(kept["language"])),
        "language_id": language_outcomes(rows, kept, text_drops),
        "dropped_by_stage": {"exact": {DUPLICATE_URL_CAPTION: len(dedup_drops)},
                             "text": dict(Counter(text_drops["reason"])),
                             "download": dict(Counter(download_drops["reason"])),
                             "image": dict(Counter(image_drops["reason"]))},
        "dropped_by_language": reasons_by_language(drops, language),
        "text_seconds": round(t1 - t0, 3), "download_seconds": round(t2 - t1, 3),
        "image_seconds": round(t3 - t2, 3), "downloaded": fetched, "download_attempts": len(kept),
        "short_side_histogram": short_side_histogram(np.minimum(arrived["original_width"], arrived["original_height"])),
    })
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    print(f"curate: {part.name} rows {part.start}-{part.stop}: {len(rows)} in, {len(kept)} fetched "
          f"({fetched} arrived, {fetched / max(t2 - t1, 1e-9):.0f} images/s), {len(candidates)} candidates", flush=True)
    return final


def _row_languages(rows: pd.DataFrame, kept: pd.DataFrame) -> pd.Series:
    """Language per row of a part: detected where the text stage kept it, else the declared one, else "und"."""
    declared = pd.Series([declared_code(x) or "und" for x in rows["declared_language"]], index=rows["row"].to_numpy())
    declared[kept["row"].to_numpy()] = kept["language"].to_numpy()
    return declared


def reasons_by_language(drops: pd.DataFrame, language: pd.Series) -> Dict[str, Dict[str, int]]:
    """{reason: {language: rows}} of a drops frame (row, reason); rows without a language count as "und"."""
    langs = language.reindex(drops["row"].to_numpy()).fillna("und").to_numpy(object)
    out: Dict[str, Dict[str, int]] = {}
    for reason, lang in zip(drops["reason"], langs):
        out.setdefault(reason, Counter())[lang] += 1
    return {reason: dict(sorted(c.items())) for reason, c in sorted(out.items())}


def _sum_counts(tables: Iterable[Dict[str, Dict[str, int]]]) -> Dict[str, Dict[str, int]]:
    out: Dict[str, Counter] = {}
    for table in tables:
        for key, counts in table.items():
            out.setdefault(key, Counter()).update(counts)
    return {key: dict(sorted(c.items())) for key, c in sorted(out.items())}


SIZE_BINS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048)


def short_side_histogram(short_sides) -> Dict[str, int]:
    """Counts of images by the shorter side of the original, in power-of-two bins ("64-127": n)."""
    counts = np.histogram(np.asarray(short_sides, dtype=np.float64), bins=[*SIZE_BINS, np.inf])[0]
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(SIZE_BINS, SIZE_BINS[1:])] + [f"{SIZE_BINS[-1]}+"]
    return {label: int(c) for label, c in zip(labels, counts)}


def _finalize_settings(cfg: CurationConfig, parts: List[Part]) -> dict:
    return {"partitions": cfg.output.finalize_partitions, "phash_threshold": cfg.image.phash_threshold,
            "thumb_max_diff": cfg.image.thumb_max_diff, "parts": [p.name for p in parts],
            "decontaminate": [str(Path(f).resolve()) for f in cfg.image.decontaminate]}


def finalize_key(cfg: CurationConfig, parts: List[Part]) -> str:
    """A short hash of the partitioned steps' settings: names their Slurm tasks, so a change reruns them."""
    return config_hash(_finalize_settings(cfg, parts))[:10]


def eval_set_hashes(cfg: CurationConfig) -> Optional[pd.DataFrame]:
    """pHash and colour thumbnail of every decontamination image (image.decontaminate); None without any."""
    if not cfg.image.decontaminate:
        return None
    paths = eval_images(cfg.image.decontaminate)
    if not paths:
        raise CurationError(f"image.decontaminate folders {cfg.image.decontaminate} hold no images; check the paths")
    hashes, thumbs, bad = hash_files(paths)
    if bad:
        print(f"curate: {len(bad)} eval image(s) do not decode and are not checked, e.g. {bad[0]}", flush=True)
    return pd.DataFrame({"phash": hashes, "thumb": [t.tobytes() for t in thumbs]})


def prepare_finalize(cfg: CurationConfig) -> Path:
    """First finalize step: its settings and the eval images' hashes; a change of settings starts it afresh."""
    parts = _finished_parts(cfg)
    folder = cfg.work_dir / FINALIZE_DIR
    settings = _finalize_settings(cfg, parts)
    if (folder / "settings.json").is_file() and json.loads((folder / "settings.json").read_text()) == settings:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _warn_quadratic_near(cfg, sum(json.loads((_part_dir(cfg, p) / DONE).read_text())["candidates"] for p in parts))
    evals = eval_set_hashes(cfg)
    if evals is not None:
        evals.to_parquet(folder / "eval.parquet")
    _write_json(folder / "settings.json", settings)
    return folder


def _warn_quadratic_near(cfg: CurationConfig, candidates: int) -> None:
    """Say so before the near-duplicate search compares more chance pairs than run in about a CPU-hour."""
    h = cfg.image.phash_threshold
    pairs = chance_pairs(candidates, h) if h >= 0 else 0.0
    hours = pairs / PAIRS_PER_SECOND / 3600
    if hours > 1:
        lower = "; ".join(f"{t}: {narrowest_band(t)}-bit bands, a CPU-hour of chance pairs at "
                          f"~{rows_per_cpu_hour(t):.2g} candidates" for t in (3, 1) if t < h)
        print(f"curate: warning: near-duplicates at image.phash_threshold={h} over {candidates:,} candidates compare "
              f"at least {pairs:.2g} chance pairs (quadratic in rows: its {narrowest_band(h)}-bit pHash "
              f"bands), about {hours:,.1f} CPU-hour(s) over the near tasks; give them more tasks "
              f"(output.finalize_partitions), or lower image.phash_threshold ({lower}), or set it to -1", flush=True)


def _prepared(cfg: CurationConfig) -> Path:
    """The finalize folder, once prepare_finalize ran with the current settings."""
    folder = cfg.work_dir / FINALIZE_DIR
    path = folder / "settings.json"
    if not path.is_file() or json.loads(path.read_text()) != _finalize_settings(cfg, _finished_parts(cfg)):
        raise CurationError(f"{folder} is not prepared for these settings; run `sigscale curate --finalize-step "
                            "prepare` (same config) first")
    return folder


def scatter_part(cfg: CurationConfig, index: int) -> Path:
    """Finalize step per download part: its candidates' band copies into the partitions (skipped when done)."""
    folder = _prepared(cfg)
    parts = _finished_parts(cfg)
    part = parts[_task_index(index, len(parts), "scatter")]
    marker = folder / "scattered" / part.name
    if not marker.is_file():
        cands = pd.read_parquet(_part_dir(cfg, part) / "candidates.parquet", columns=["row", "phash", "thumb"])
        copies = scatter(cands, folder / "bands", part.index, cfg.output.finalize_partitions, cfg.image.phash_threshold)
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(str(copies))
    return marker


def near_partition(cfg: CurationConfig, k: int) -> Path:
    """Finalize step per partition: its eval and near duplicates into drops/ (skipped when done)."""
    folder = _prepared(cfg)
    k = _task_index(k, cfg.output.finalize_partitions, "near")
    out = folder / "drops" / f"p{k:05d}.parquet"
    if out.is_file():
        return out
    missing = [p.name for p in _finished_parts(cfg) if not (folder / "scattered" / p.name).is_file()]
    if missing:
        raise CurationError(f"{len(missing)} part(s) are not scattered yet, e.g. {missing[:3]}; run "
                            "`sigscale curate --finalize-step scatter --task I` for each part first")
    eval_set = None
    ev = pd.read_parquet(folder / "eval.parquet") if (folder / "eval.parquet").is_file() else ()
    if len(ev):  # none when no eval image decodes: nothing to check against
        eval_set = (ev["phash"].to_numpy(np.uint64), np.stack([np.frombuffer(t, np.uint8) for t in ev["thumb"]]))
    drops = partition_drops(folder / "bands", k, cfg.image.phash_threshold, cfg.image.thumb_max_diff, eval_set)
    out.parent.mkdir(exist_ok=True)
    drops.to_parquet(out.with_suffix(".tmp"), index=False)
    out.with_suffix(".tmp").replace(out)
    return out


def _task_index(index: int, count: int, step: str, flag: str = "--task") -> int:
    if not 0 <= index < count:
        raise CurationError(f"{flag} {index} is out of range for the {step} step: it has {count} task(s) (0..{count - 1})")
    return index


def _plan(cfg: CurationConfig) -> dict:
    """plan.json, or a CurationError that says to plan first."""
    plan_path = cfg.work_dir / PLAN
    if not plan_path.is_file():
        raise CurationError(f"no {PLAN} in {cfg.work_dir}; run `sigscale curate` (it plans and runs the parts) first")
    return json.loads(plan_path.read_text())


def _finished_parts(cfg: CurationConfig) -> List[Part]:
    """The planned parts, once every one of them is finished; else a CurationError that says what to run."""
    parts = _parts_from(_plan(cfg))
    missing = [p.name for p in parts if not (_part_dir(cfg, p) / DONE).is_file()]
    if missing:
        raise CurationError(
            f"{len(missing)} of {len(parts)} part(s) are not finished, e.g. {missing[:3]}; run them "
            "(`sigscale curate --config ...`, or the Slurm array) before finalizing"
        )
    return parts


def _flat(tree: dict, prefix: str = "") -> Dict[str, object]:
    """A nested config dict as dotted keys ("text.min_confidence": 0.5), the way overrides name them."""
    out: Dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_outcomes(out_dir: Path) -> pd.DataFrame:
    """Where every input row of a curated folder went: columns row, reason (None: kept)."""
    path = Path(out_dir) / "work" / OUTCOMES
    if not path.is_file():
        raise CurationError(f"no {OUTCOMES} under {out_dir}/work; run `sigscale curate` to produce it")
    return pd.read_parquet(path)
