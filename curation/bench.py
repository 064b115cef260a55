"""Curation throughput: end to end on loopback, and the partitioned finalize on synthetic metadata.

``run_curation_bench`` curates a generated list served by :mod:`sigscale.curation.serve` with the
demo config and reads the timings the pipeline records in stats.json (img2dataset's worker
start-up included). ``run_finalize_bench`` runs the exact (url, caption) dedup per key partition on
128-bit pair keys with planted exact copies, the partitioned near-duplicate steps
(:mod:`sigscale.curation.partitions`) on metadata-only candidates with planted near-duplicates,
then the language balance's count and decide steps per part (cap mode over 20 Zipf-distributed
language labels), each task in a fresh process, and reports every task's peak RSS, rows/s, the
planted rows caught and the balance's kept rows against its target.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pandas as pd

from sigscale.core.procstat import peak_rss_mib
from sigscale.curation.assemble import language_cuts, language_keep, language_keys
from sigscale.curation.balance import target_counts
from sigscale.curation.config import BalanceConfig
from sigscale.curation.image_filters import THUMB
from sigscale.curation.partitions import band_layout, chance_pairs, partition_drops, scatter
from sigscale.curation.text_filters import later_copies

THUMB_BYTES = THUMB * THUMB * 3
THUMB_MAX_DIFF = 3.0


def run_curation_bench(out_json: Optional[str | Path] = None, rows: int = 16384, processes: int = 2,
                       threads: int = 32) -> dict:
    """Curate ``rows`` generated URLs from 127.0.0.1: per-stage throughput and how well the filters did.

    The generated list knows the truth of every row (its real language, which rows are planted
    near-duplicates, which URLs are broken and how), so the bench counts the planted near-duplicates
    caught, the other rows dropped as near-duplicates, and the captions language ID dropped or
    labelled wrongly.
    """
    from sigscale.curation.config import load_curation_config
    from sigscale.curation.finalize import curate
    from sigscale.curation.pipeline import load_outcomes
    from sigscale.curation.serve import ImageServer, write_url_list

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, ImageServer() as server:
        urls = write_url_list(Path(tmp) / "urls.parquet", rows, server.base_url, seed=0)
        cfg = load_curation_config("demo", [f"input.path={urls}", f"output.dir={Path(tmp) / 'out'}",
                                            f"download.processes={processes}", f"download.threads={threads}"])
        start = time.perf_counter()
        out = curate(cfg)
        wall = time.perf_counter() - start
        stats = json.loads((out / "stats.json").read_text())
        truth = pd.read_parquet(urls)
        reason = load_outcomes(out).set_index("row")["reason"].reindex(truth.index)
    t = stats["timing"]
    result = {
        "rows": rows, "kept": stats["kept"], "processes": processes, "threads": threads,
        "cpus": os.cpu_count(), "wall_seconds": round(wall, 1),
        "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
        "text_captions_per_second": t["captions_per_second"],
        "download_images_per_second": t["images_per_second"],
        "end_to_end_rows_per_second": round(rows / wall, 1),
        "seconds": {k: t[k] for k in ("plan_seconds", "text_seconds", "download_seconds", "image_seconds",
                                      "finalize_seconds")},
        "stages": stage_throughput(stats), "dropped": stats["dropped"],
        **filter_accuracy(truth, reason, stats["language_id"]),
    }
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


# stats.json timing key of each step of the funnel, in the funnel's order (the rows in are the step before's).
_STAGE_SECONDS = {"text filters": "text_seconds", "download (img2dataset)": "download_seconds",
                  "image checks": "image_seconds", "decontamination, near-duplicates, score": "finalize_seconds"}


def stage_throughput(stats: dict) -> List[dict]:
    """Rows in, rows out, seconds and rows/s of each timed stage, from a run's stats.json funnel and timing."""
    funnel = stats["funnel"]
    rows = []
    for (_, rows_in), (step, rows_out) in zip(funnel, funnel[1:]):
        key = _STAGE_SECONDS.get(step)
        if key:
            secs = stats["timing"][key]
            rows.append({"stage": step, "rows_in": rows_in, "rows_out": rows_out, "seconds": secs,
                         "rows_per_second": round(rows_in / max(secs, 1e-9), 1)})
    return rows


def filter_accuracy(truth: pd.DataFrame, reason: pd.Series, language_id: dict) -> dict:
    """Planted near-duplicates caught, false near-duplicate drops, broken URLs with their expected
    reason, and language-ID mistakes (a caption dropped for its language or kept under another one)."""
    planted = truth["kind"] == "near_duplicate"
    near = reason == "near_duplicate"
    broken = truth["kind"].ne("ok") & ~planted
    return {
        "near_duplicates_planted": int(planted.sum()), "near_duplicates_caught": int((planted & near).sum()),
        "planted_other_outcomes": {("kept" if pd.isna(k) else str(k)): int(v)
                                      for k, v in reason[planted & ~near].value_counts(dropna=False).items()},
        "false_near_duplicate_drops": int((~planted & near).sum()), "originals": int((truth["kind"] == "ok").sum()),
        "broken_urls": int(broken.sum()),
        "broken_with_expected_reason": int((broken & (reason == truth["expect"])).sum()),
        "language_id": {"captions": sum(e["rows"] for e in language_id.values()),
                        "dropped": sum(e["dropped_language"] for e in language_id.values()),
                        "mislabelled": sum(e["mismatched"] for e in language_id.values()),
                        "undetermined": sum(e["undetermined"] for e in language_id.values())},
    }


def render_curation_markdown(r: dict, command: str) -> str:
    """The BENCHMARKS.md tables of :func:`run_curation_bench`: stages, then what the filters caught."""
    lang = r["language_id"]
    wrong = lang["dropped"] + lang["mislabelled"]
    lines = [f"`{command}`", "",
             f"{r['rows']:,} generated URLs, img2dataset {r['processes']} processes × {r['threads']} threads, "
             f"{r['cpus']} CPUs; whole curate {r['wall_seconds']} s ({r['end_to_end_rows_per_second']:,} rows/s), "
             f"1-minute load {r['loadavg_1min'][0]} at start, {r['loadavg_1min'][1]} at end.", "",
             "| stage | rows in | rows out | seconds | rows in / s |", "|---|---:|---:|---:|---:|"]
    for s in r["stages"]:
        lines.append(f"| {s['stage']} | {s['rows_in']:,} | {s['rows_out']:,} | {s['seconds']} | "
                     f"{s['rows_per_second']:,} |")
    other = ", ".join(f"{k} {v}" for k, v in r["planted_other_outcomes"].items()) or "none"
    lines += ["", "| check | result |", "|---|---|",
              f"| kept / input rows | {r['kept']:,} / {r['rows']:,} |",
              f"| planted near-duplicates dropped as near_duplicate | {r['near_duplicates_caught']:,} of "
              f"{r['near_duplicates_planted']:,} (the others: {other}) |",
              f"| other rows dropped as near_duplicate (false drops) | {r['false_near_duplicate_drops']:,} of "
              f"{r['originals']:,} originals |",
              f"| broken URLs dropped with their expected reason | {r['broken_with_expected_reason']:,} of "
              f"{r['broken_urls']:,} |",
              f"| language ID: captions dropped for language / kept under another language | {lang['dropped']} / "
              f"{lang['mislabelled']} of {lang['captions']:,} ({100 * wrong / max(1, lang['captions']):.2f}%); "
              f"{lang['undetermined']} kept undetermined |",
              f"| drops by reason | {', '.join(f'{k} {v}' for k, v in r['dropped'].items())} |"]
    return "\n".join(lines) + "\n"


def planted_rows(start: int, n: int, near_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(copy rows, their source rows) planted among rows [start, start + n): each source is an earlier non-copy row."""
    rng = np.random.default_rng([seed, start])
    copies = np.sort(rng.choice(np.arange(1, n), int(near_fraction * n), replace=False))
    originals = np.setdiff1d(np.arange(n), copies)
    # Source: a random original before the copy (there is one: row 0 of the chunk is never a copy).
    before = np.searchsorted(originals, copies)
    sources = originals[(rng.random(len(copies)) * before).astype(np.int64)]
    return copies + start, sources + start


def planted_candidates(start: int, n: int, near_fraction: float, seed: int,
                       threshold: int = 8) -> Tuple[pd.DataFrame, np.ndarray]:
    """Metadata-only candidates (row, phash, thumb) for rows [start, start + n) with planted near-duplicates.

    Distinct rows get uniform random pHashes and thumbnails (so the colour check rejects chance pHash
    matches); a copy takes its source's pHash with 0..threshold bits flipped and its thumbnail +-1 per
    value. Returns the frame and the copies' rows: exactly the rows the pair rule must drop.
    """
    rng = np.random.default_rng([seed, start, 1])
    hashes = rng.integers(0, 2 ** 63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    thumbs = np.frombuffer(rng.bytes(n * THUMB_BYTES), np.uint8).reshape(n, THUMB_BYTES).copy()
    copies, sources = planted_rows(start, n, near_fraction, seed)
    c, s = copies - start, sources - start
    flips = np.zeros(len(c), np.uint64)
    for k in range(threshold):  # bit k of the flip mask set with probability 1/2, at a random position
        on = rng.random(len(c)) < 0.5
        flips[on] |= np.left_shift(np.uint64(1), rng.integers(0, 64, on.sum()).astype(np.uint64))
    hashes[c] = hashes[s] ^ flips
    noise = rng.integers(-1, 2, (len(c), THUMB_BYTES))
    thumbs[c] = np.clip(thumbs[s].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    frame = pd.DataFrame({"row": np.arange(start, start + n, dtype=np.int64), "phash": hashes,
                          "thumb": [t.tobytes() for t in thumbs]})
    return frame, copies


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014): a bijection of uint64 that spreads every input bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def planted_identities(start: int, n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(identity, copy mask) of rows [start, start + n): a copy's identity is an original at a smaller row anywhere
    in the list (not only in its own part), an original's is itself. A row's fate depends on the row alone."""
    rows = np.arange(start, start + n, dtype=np.uint64)
    salt = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)

    def uniform(r: np.ndarray, stream: int) -> np.ndarray:
        return (_mix64(r ^ salt ^ np.uint64(stream << 56)) >> np.uint64(11)).astype(np.float64) / 2.0 ** 53

    def is_copy(r: np.ndarray) -> np.ndarray:
        return (uniform(r, 1) < fraction) & (r > 0)

    identity = rows.copy()
    todo = np.flatnonzero(is_copy(rows))
    for attempt in range(8):  # a uniformly drawn earlier row that is itself an original
        source = (uniform(rows[todo], 2 + attempt) * rows[todo].astype(np.float64)).astype(np.uint64)
        ok = ~is_copy(source)
        identity[todo[ok]] = source[ok]
        todo = todo[~ok]
    return identity, identity != rows  # the few rows with no original found in 8 draws stay originals


def planted_pair_keys(start: int, n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k1, k2, copy mask) of rows [start, start + n): copies repeat their original's pair keys, so exactly the
    copies are later copies of a pair."""
    identity, copy = planted_identities(start, n, fraction, seed)
    salt = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    return _mix64(identity ^ salt), _mix64(identity ^ salt ^ np.uint64(0xD1B54A32D192ED03)), copy


def _keys_task(folder: str, writer: int, start: int, n: int, partitions: int, fraction: float, seed: int) -> dict:
    """The plan's share of one part: its rows' pair keys into the key partitions, by the planner's own writer."""
    from sigscale.curation.plan import PairKeyWriters

    t0 = time.perf_counter()
    k1, k2, _ = planted_pair_keys(start, n, fraction, seed)
    with PairKeyWriters(Path(folder) / "keys", partitions, f"w{writer:05d}") as keys:
        keys.write(np.arange(start, start + n, dtype=np.int64), k1, k2)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def _dedup_task(folder: str, k: int) -> dict:
    """One key partition: the later copies among its keys (the pipeline's later_copies), written to exact/."""
    t0 = time.perf_counter()
    keys = pd.concat([pd.read_parquet(p) for p in sorted((Path(folder) / "keys" / f"keys-{k:05d}").glob("*.parquet"))])
    rows = keys["row"].to_numpy(np.int64)
    later = later_copies(rows, keys["k1"].to_numpy(np.uint64), keys["k2"].to_numpy(np.uint64))
    pd.DataFrame({"row": rows[later]}).to_parquet(Path(folder) / "exact" / f"p{k:05d}.parquet", index=False)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), "rows": len(rows)}


def _scatter_task(folder: str, writer: int, start: int, n: int, partitions: int, threshold: int,
                  near_fraction: float, seed: int) -> dict:
    """One download part's share: generate its candidates and write their band copies."""
    t0 = time.perf_counter()
    frame, _ = planted_candidates(start, n, near_fraction, seed, threshold)
    copies = scatter(frame, Path(folder) / "bands", writer, partitions, threshold)
    return {"rows": n, "copies": copies, "seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def _near_task(folder: str, k: int, threshold: int) -> dict:
    """One partition: its near-duplicate drops, written to drops/."""
    t0, counts = time.perf_counter(), {}
    drops = partition_drops(Path(folder) / "bands", k, threshold, THUMB_MAX_DIFF, counts=counts)
    drops.to_parquet(Path(folder) / "drops" / f"p{k:05d}.parquet", index=False)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), **counts}


LANGUAGES = 20  # synthetic language labels of the balance steps, Zipf-distributed like a web crawl's
BALANCE_CAP = BalanceConfig(mode="cap", max_fraction=0.1, seed=0)


def synthetic_languages(start: int, n: int, seed: int) -> np.ndarray:
    """Language labels l00..l19 with P(l_i) proportional to 1/(i+1) for rows [start, start + n)."""
    p = 1.0 / np.arange(1, LANGUAGES + 1)
    codes = np.random.default_rng([seed, start, 2]).choice(LANGUAGES, n, p=p / p.sum())
    return np.array([f"l{i:02d}" for i in range(LANGUAGES)])[codes]


def _count_task(folder: str, writer: int, start: int, n: int, seed: int) -> dict:
    """The balance's count step of one part: its sorted per-language keys (the pipeline's language_keys)."""
    t0 = time.perf_counter()
    keys, offsets = language_keys(np.arange(start, start + n, dtype=np.int64), synthetic_languages(start, n, seed),
                                  BALANCE_CAP.seed)
    np.save(Path(folder) / "balance" / f"w{writer:05d}.npy", keys)
    (Path(folder) / "balance" / f"w{writer:05d}.json").write_text(json.dumps(offsets))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def _cut_task(folder: str, writers: int) -> dict:
    """The balance-cut step (one task): every language's rule from all parts' mapped keys (language_cuts)."""
    t0 = time.perf_counter()
    base = Path(folder) / "balance"
    offsets = [json.loads((base / f"w{w:05d}.json").read_text()) for w in range(writers)]
    mapped = [np.load(base / f"w{w:05d}.npy", mmap_mode="r") for w in range(writers)]
    (base / "cut.json").write_text(json.dumps(language_cuts(offsets, mapped, BALANCE_CAP)))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def _decide_task(folder: str, writer: int, start: int, n: int, seed: int) -> dict:
    """The balance's decide step of one part: its rows kept under the cut's rules (language_keep)."""
    t0 = time.perf_counter()
    cuts = json.loads((Path(folder) / "balance" / "cut.json").read_text())
    keep = language_keep(np.arange(start, start + n, dtype=np.int64), synthetic_languages(start, n, seed), writer,
                         cuts, BALANCE_CAP.seed)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), "kept": int(keep.sum())}


def _step(results: List[dict], wall: float, rows: int) -> dict:
    return {"tasks": len(results), "wall_seconds": round(wall, 1), "rows_per_second": round(rows / wall, 1),
            "task_seconds_max": round(max(r["seconds"] for r in results), 2),
            "peak_rss_mib_max": max(r["peak_rss_mib"] for r in results),
            "peak_rss_mib_median": float(np.median([r["peak_rss_mib"] for r in results]))}


def run_finalize_bench(rows: int, threshold: int = 3, rows_per_writer: int = 100_000,
                       copies_per_partition: int = 1_000_000, near_fraction: float = 0.05, workers: int = 2,
                       seed: int = 0, rows_per_dedup_partition: int = 2_000_000, exact_fraction: float = 0.05) -> dict:
    """Partitioned exact dedup and near-duplicate finalize over ``rows`` synthetic rows: per-task peak RSS, rows/s,
    planted copies caught and false drops."""
    exact = _run_exact_dedup(rows, rows_per_writer, rows_per_dedup_partition, exact_fraction, workers, seed)
    bands = len(band_layout(threshold))
    partitions = max(1, math.ceil(rows * bands / copies_per_partition))  # P grows with N: fixed copies per task
    chunks = [(w, start, min(rows_per_writer, rows - start)) for w, start in enumerate(range(0, rows, rows_per_writer))]
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), max_tasks_per_child=1)
    with tempfile.TemporaryDirectory() as tmp, pool:
        (Path(tmp) / "drops").mkdir()
        t0 = time.perf_counter()
        scattered = list(pool.map(_scatter_task, *zip(*[(tmp, w, s, n, partitions, threshold, near_fraction, seed)
                                                        for w, s, n in chunks])))
        t1 = time.perf_counter()
        near = list(pool.map(_near_task, [tmp] * partitions, range(partitions), [threshold] * partitions))
        t2 = time.perf_counter()
        dropped = pd.concat([pd.read_parquet(p) for p in sorted((Path(tmp) / "drops").glob("*.parquet"))])["row"]
        (Path(tmp) / "balance").mkdir()
        counted = list(pool.map(_count_task, *zip(*[(tmp, w, s, n, seed) for w, s, n in chunks])))
        t3 = time.perf_counter()
        cut = pool.submit(_cut_task, tmp, len(chunks)).result()
        t35 = time.perf_counter()
        decided = list(pool.map(_decide_task, *zip(*[(tmp, w, s, n, seed) for w, s, n in chunks])))
        t4 = time.perf_counter()
    languages = Counter(lang for _, s, n in chunks for lang in synthetic_languages(s, n, seed).tolist())
    planted = np.concatenate([planted_rows(s, n, near_fraction, seed)[0] for _, s, n in chunks])
    dropped = np.unique(dropped.to_numpy(np.int64))
    return {"rows": rows, "exact": exact, "phash_threshold": threshold, "bands": bands, "partitions": partitions,
            "writers": len(chunks), "workers": workers, "cpus": os.cpu_count(),
            "copies_per_partition": round(sum(r["copies"] for r in scattered) / partitions),
            "scatter": _step(scattered, t1 - t0, rows), "near": _step(near, t2 - t1, rows),
            "balance_count": _step(counted, t3 - t2, rows), "balance_cut": _step([cut], t35 - t3, rows),
            "balance_decide": _step(decided, t4 - t35, rows),
            "balance_kept": sum(r["kept"] for r in decided),
            "balance_target": sum(target_counts(dict(languages), BALANCE_CAP).values()),
            "rows_per_second": round(rows / (t2 - t0), 1), "planted": len(planted),
            "near_pairs": sum(r["pairs"] for r in near), "chance_pairs": round(chance_pairs(rows, threshold)),
            "near_pairs_per_task_second": round(sum(r["pairs"] for r in near) / sum(r["seconds"] for r in near)),
            "caught": int(np.isin(planted, dropped).sum()), "false_drops": int((~np.isin(dropped, planted)).sum())}


def _run_exact_dedup(rows: int, rows_per_writer: int, rows_per_partition: int, fraction: float, workers: int,
                     seed: int) -> dict:
    partitions = max(1, math.ceil(rows / rows_per_partition))
    chunks = [(w, start, min(rows_per_writer, rows - start)) for w, start in enumerate(range(0, rows, rows_per_writer))]
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), max_tasks_per_child=1)
    with tempfile.TemporaryDirectory() as tmp, pool:
        (Path(tmp) / "keys").mkdir()
        (Path(tmp) / "exact").mkdir()
        t0 = time.perf_counter()
        written = list(pool.map(_keys_task, *zip(*[(tmp, w, s, n, partitions, fraction, seed) for w, s, n in chunks])))
        t1 = time.perf_counter()
        deduped = list(pool.map(_dedup_task, [tmp] * partitions, range(partitions)))
        t2 = time.perf_counter()
        dropped = np.concatenate([pd.read_parquet(p)["row"].to_numpy(np.int64)
                                  for p in sorted((Path(tmp) / "exact").glob("*.parquet"))])
    planted = np.concatenate([np.arange(s, s + n)[planted_pair_keys(s, n, fraction, seed)[2]] for _, s, n in chunks])
    return {"partitions": partitions, "rows_per_partition_max": max(r["rows"] for r in deduped),
            "keys": _step(written, t1 - t0, rows), "dedup": _step(deduped, t2 - t1, rows),
            "planted": len(planted), "caught": int(np.isin(planted, dropped).sum()),
            "false_drops": int((~np.isin(dropped, planted)).sum())}


COLOURS = ("red", "green", "blue")


def _url_list_task(path: str, start: int, n: int, fraction: float, seed: int) -> int:
    """One file of a synthetic URL list, rows [start, start + n), with planted exact copies (every third one's
    caption respaced, equal once normalised); returns the copies planted."""
    identity, copy = planted_identities(start, n, fraction, seed)
    spaced = copy & (np.arange(start, start + n) % 3 == 0)
    ids = identity.tolist()
    frame = pd.DataFrame({
        "url": [f"http://img{i % 9973}.example.org/{i:x}.jpg" for i in ids],
        "caption": [f"a photo {'  ' if sp else ' '}of item {i} on a {COLOURS[i % 3]} table"
                    for i, sp in zip(ids, spaced.tolist())]})
    if path.endswith(".csv"):
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False, row_group_size=100_000)
    return int(copy.sum())


def _layout_task(folder: str, partitions: int, rows_per_part: int, processes: int) -> dict:
    """The plan's layout: every file's row count (parquet footers; text files parsed over ``processes``)."""
    from sigscale.curation.plan import parts_of, plan_layout

    t0 = time.perf_counter()
    plan = plan_layout(_plan_config(folder, partitions, rows_per_part, processes))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), "parts": len(parts_of(plan))}


def _plan_file_task(folder: str, partitions: int, rows_per_part: int, f: int) -> dict:
    """One file's plan task, through the pipeline's own plan_file."""
    from sigscale.curation.plan import plan_file

    t0 = time.perf_counter()
    plan_file(_plan_config(folder, partitions, rows_per_part), f)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def _plan_config(folder: str, partitions: int, rows_per_part: int, processes: int = 1):
    from sigscale.curation.config import load_curation_config

    return load_curation_config("default", [f"input.path={Path(folder) / 'urls'}", f"output.dir={Path(folder) / 'out'}",
                                            f"output.rows_per_part={rows_per_part}",
                                            f"output.dedup_partitions={partitions}",
                                            f"output.local_processes={processes}"])


def _plan_dedup_task(folder: str, partitions: int, rows_per_part: int, k: int) -> dict:
    """One exact-dedup partition of the planned list, through the pipeline's own dedup_partition."""
    from sigscale.curation.plan import dedup_partition

    t0 = time.perf_counter()
    out = dedup_partition(_plan_config(folder, partitions, rows_per_part), k)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(),
            "dropped": pd.read_parquet(out)["row"].to_numpy(np.int64)}


def run_plan_bench(rows: int, rows_per_file: int = 1_000_000, rows_per_part: int = 1_000_000,
                   rows_per_dedup_partition: int = 2_000_000, exact_fraction: float = 0.05, workers: int = 2,
                   seed: int = 0, list_format: str = "parquet") -> dict:
    """The planner (layout, then a task per file over ``workers`` processes) and the exact dedup, through the
    pipeline's own functions, on a synthetic URL list of ``rows`` rows in parquet (or csv) files: peak RSS of
    every task, rows/s, copies caught."""
    partitions = max(1, math.ceil(rows / rows_per_dedup_partition))
    files = [(start, min(rows_per_file, rows - start)) for start in range(0, rows, rows_per_file)]
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), max_tasks_per_child=1)
    with tempfile.TemporaryDirectory() as tmp, pool:
        (Path(tmp) / "urls").mkdir()
        t0 = time.perf_counter()
        list(pool.map(_url_list_task, [str(Path(tmp) / "urls" / f"urls-{i:05d}.{list_format}") for i in range(len(files))],
                      *zip(*[(s, n, exact_fraction, seed) for s, n in files])))
        t1 = time.perf_counter()
        layout = pool.submit(_layout_task, tmp, partitions, rows_per_part, workers).result()
        t2 = time.perf_counter()
        planned = list(pool.map(_plan_file_task, *zip(*[(tmp, partitions, rows_per_part, f)
                                                        for f in range(len(files))])))
        t3 = time.perf_counter()
        deduped = list(pool.map(_plan_dedup_task, [tmp] * partitions, [partitions] * partitions,
                                [rows_per_part] * partitions, range(partitions)))
        t4 = time.perf_counter()
    planted = np.concatenate([np.arange(s, s + n)[planted_identities(s, n, exact_fraction, seed)[1]] for s, n in files])
    dropped = np.concatenate([r.pop("dropped") for r in deduped])
    return {"rows": rows, "files": len(files), "list_format": list_format, "parts": layout["parts"],
            "partitions": partitions,
            "workers": workers, "cpus": os.cpu_count(), "write_list_seconds": round(t1 - t0, 1),
            "layout": _step([layout], t2 - t1, rows), "plan": _step(planned, t3 - t2, rows),
            "plan_rows_per_task_second": round(rows / sum(r["seconds"] for r in planned), 1),
            "dedup": _step(deduped, t4 - t3, rows),
            "planted": len(planted), "caught": int(np.isin(planted, dropped).sum()),
            "false_drops": int((~np.isin(dropped, planted)).sum())}


def render_plan_markdown(results: List[dict], command: str) -> str:
    """The BENCHMARKS.md table of :func:`run_plan_bench` results, with the command that made it."""
    lines = [f"`{command}`", "",
             "| rows | files | parts | key partitions | processes | layout seconds "
             "| peak RSS / plan task (MiB, max) | plan rows/s | plan rows per task-second "
             "| peak RSS / dedup task (MiB, max) | dedup rows/s | planted copies caught | false drops | list format |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['files']} | {r['parts']} | {r['partitions']} | {r['workers']} "
                     f"| {r['layout']['wall_seconds']} | {r['plan']['peak_rss_mib_max']} "
                     f"| {r['plan']['rows_per_second']:,} | {r['plan_rows_per_task_second']:,} "
                     f"| {r['dedup']['peak_rss_mib_max']} | {r['dedup']['rows_per_second']:,} "
                     f"| {r['caught']:,} / {r['planted']:,} | {r['false_drops']} | {r['list_format']} |")
    return "\n".join(lines) + "\n"


def _rate(r: dict) -> float:
    seconds = sum(r[step]["wall_seconds"] for step in ("balance_count", "balance_cut", "balance_decide"))
    return round(r["rows"] / max(seconds, 1e-9), 1)


def render_finalize_markdown(results: List[dict], command: str) -> str:
    """The BENCHMARKS.md table of :func:`run_finalize_bench` results, with the command that made it."""
    lines = [f"`{command}`", "", "Exact (url, caption) dedup on 128-bit pair keys, one task per key partition:", "",
             "| rows | key partitions | rows / partition (max) | peak RSS / key-writing task (MiB, max) "
             "| peak RSS / dedup task (MiB, max) | dedup rows/s | planted copies caught | false drops |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        e = r["exact"]
        lines.append(f"| {r['rows']:,} | {e['partitions']} | {e['rows_per_partition_max']:,} "
                     f"| {e['keys']['peak_rss_mib_max']} | {e['dedup']['peak_rss_mib_max']} "
                     f"| {e['dedup']['rows_per_second']:,} | {e['caught']:,} / {e['planted']:,} | {e['false_drops']} |")
    lines += ["", "Near-duplicates by pHash band, then the language balance per part:", "",
             "| rows | pHash h | bands | partitions | scatter tasks | peak RSS / scatter task (MiB, max) "
             "| peak RSS / near task (MiB, max) | scatter rows/s | near rows/s | end-to-end rows/s "
             "| planted caught | false drops | peak RSS / balance count task (MiB, max) | peak RSS / balance cut "
             "(one task, MiB) | peak RSS / balance decide task (MiB, max) | balance count + cut + decide rows/s "
             "| balance kept / target |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['phash_threshold']} | {r['bands']} | {r['partitions']} | {r['writers']} "
                     f"| {r['scatter']['peak_rss_mib_max']} | {r['near']['peak_rss_mib_max']} "
                     f"| {r['scatter']['rows_per_second']:,} | {r['near']['rows_per_second']:,} "
                     f"| {r['rows_per_second']:,} | {r['caught']:,} / {r['planted']:,} | {r['false_drops']} "
                     f"| {r['balance_count']['peak_rss_mib_max']} | {r['balance_cut']['peak_rss_mib_max']} "
                     f"| {r['balance_decide']['peak_rss_mib_max']} "
                     f"| {_rate(r):,} | {r['balance_kept']:,} / {r['balance_target']:,} |")
    lines += ["", "What the near tasks' time goes into: pairs of rows sharing a band value, each compared:", "",
              "| rows | pHash h | pairs compared | chance_pairs() predicts | pairs per task-second | near task-seconds |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['phash_threshold']} | {r['near_pairs']:.3g} | {r['chance_pairs']:.3g} "
                     f"| {r['near_pairs_per_task_second']:.3g} | {r['near_pairs'] / r['near_pairs_per_task_second']:,.0f} |")
    return "\n".join(lines) + "\n"
