"""Finalize in steps that each hold one download part: score cut, balance, shards, then a small merge.

After the partitioned near-duplicate search (:mod:`sigscale.curation.pipeline`: prepare, scatter,
near) every step below runs once per download part (a Slurm array task, or here, in turn or over
``output.local_processes`` processes):

- ``score``: the part's rows left after near/eval duplicates and ``image.score.min_score``; with
  ``image.score.top_fraction`` it writes their sorted score keys.
- ``score-cut`` (one task): the global top-fraction rule over every part's score keys
  (:func:`~sigscale.curation.assemble.cut_at`), a small JSON file.
- ``count``: applies that cut, then writes the part's language counts and, per language, its sorted
  balance keys (``cap``/``temperature``) or its metadata-entry counts (``metadata``).
- ``balance-cut`` (one task): sums the parts' counts, derives the per-language targets and writes
  each language's rule (its cutoff key and each part's share of the ties), or the summed entry
  counts; computed once, so no part's task reads every part's files.
- ``decide``: decides each of its rows by a rule of the row alone and those sums: the target-many
  smallest seeded keys of each language, or MetaCLIP's min(1, t / count). Checks the part's accounting.
- ``write``: cuts the kept rows into shards at global boundaries (shard s holds kept rows s·S..),
  reading each image from img2dataset's tar (no copy of the images in between).
- ``merge`` (one task): hard-links the shards into the output folder; manifest.json, stats.json,
  captions.txt, outcomes, report.

Each step's output is its done marker under ``work/finalize/assemble-<settings hash>/``, so a
changed balance or score setting reruns these steps and not the near-duplicate search.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sigscale.core.config import config_hash
from sigscale.core.manifest import Manifest, ShardInfo, save_manifest, write_shard
from sigscale.core.progress import Progress
from sigscale.curation.assemble import (TarImages, cut_at, descending_keys, keep_by_cut, language_cuts, language_keep,
                                        language_keys, sorted_keys)
from sigscale.curation.balance import (METADATA_UNMATCHED, caption_counts, entry_counts, load_metadata, match_entries,
                                       metadata_keep, metadata_summary)
from sigscale.curation.config import CurationConfig, CurationError
from sigscale.curation.partitions import EVAL_DUPLICATE, NEAR_DUPLICATE
from sigscale.curation.pipeline import (BALANCE, DROP_REASONS, KEPT_SAMPLES, LOW_SCORE, OUTCOMES, SAMPLES,
                                        SAMPLES_PER_REASON, _finished_parts, _flat, _prepared, finalize_key,
                                        near_partition, plan_parts, prepare_finalize, run_part, scatter_part,
                                        short_side_histogram)
from sigscale.curation.plan import DONE, Part, in_range, part_dir, part_rows, plan_drops, plan_stats
from sigscale.curation.report import write_report
from sigscale.curation.tasks import local_pool, run_tasks, task_index, write_json
from sigscale.curation.text_filters import merge_language_outcomes, reasons_by_language, sum_counts

# Candidate columns the steps after the near-duplicate search read (no thumbnail, no image).
_COLUMNS = ["row", "url", "caption", "caption_original", "declared_language", "extras", "language",
            "language_confidence", "width", "height", "original_width", "original_height", "score", "final_url",
            "shard", "key"]
SCORE_CUT, BALANCE_CUT, ENTRY_TOTALS = "score-cut.json", "balance-cut.json", "entries-total.npz"


def _settings(cfg: CurationConfig) -> dict:
    s = cfg.image.score
    return {"min_score": s.min_score, "top_fraction": s.top_fraction, "balance": asdict(cfg.balance),
            "samples_per_shard": cfg.output.samples_per_shard, "corpus": cfg.output.corpus}


def assemble_key(cfg: CurationConfig) -> str:
    """A short hash of these steps' settings: names their folder and Slurm tasks, so a change reruns them."""
    return config_hash(_settings(cfg))[:10]


def assemble_dir(cfg: CurationConfig) -> Path:
    """The folder of the steps after the near-duplicate search, named by their settings' hash."""
    return _prepared(cfg) / f"assemble-{assemble_key(cfg)}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(path)


def _need(path: Path, step: str) -> Path:
    if not path.is_file():
        how = (f"`sigscale curate --finalize-step {step}` (one task)" if step.endswith("-cut") else
               f"`sigscale curate --finalize-step {step} --task I` for every part")
        raise CurationError(f"{path} is missing: run {how} first (same config)")
    return path


def _candidates(cfg: CurationConfig, part: Part) -> pd.DataFrame:
    """A part's candidates without images or thumbnails, in row order."""
    path = part_dir(cfg, part) / "candidates.parquet"
    if "shard" not in pq.read_schema(path).names:
        raise CurationError(f"{path} was written by an older sigscale (images inside it, not in img2dataset's tars); "
                            "curate into a new output.dir or delete its work/parts")
    return pd.read_parquet(path, columns=_COLUMNS)


def _state(cfg: CurationConfig, part: Part) -> Tuple[pd.DataFrame, np.ndarray]:
    """A part's candidates (no images) and each one's reason so far (None: alive): eval/near duplicate, min_score."""
    folder = _prepared(cfg)
    meta = _candidates(cfg, part)
    near = [in_range(_need(folder / "drops" / f"p{k:05d}.parquet", "near"), part)
            for k in range(cfg.output.finalize_partitions)]
    early = pd.concat(near, ignore_index=True).drop_duplicates("row").set_index("row")["reason"]
    reason = meta["row"].map(early).to_numpy(object)
    reason[pd.isna(reason)] = None
    if cfg.image.score.min_score is not None:
        reason[(meta["score"].to_numpy(np.float64) < cfg.image.score.min_score) & pd.isna(reason)] = LOW_SCORE
    return meta, reason


def _task(cfg: CurationConfig, index: int, step: str, output: str) -> Tuple[List[Part], Part, Path]:
    """(all parts, the part of task ``index``, its step's output file assemble-*/<step dir>/<part><output>)."""
    parts = _finished_parts(cfg)
    part = parts[task_index(index, len(parts), step)]
    return parts, part, assemble_dir(cfg) / output.format(part=part.name)


def score_part(cfg: CurationConfig, index: int) -> Path:
    """Step per part: the sorted score keys of its rows alive before the top-fraction cut (empty without one)."""
    _, part, out = _task(cfg, index, "score", "score/{part}.npy")
    if not out.is_file():
        keys = np.zeros(0, np.uint64)
        if cfg.image.score.top_fraction is not None:
            meta, reason = _state(cfg, part)
            alive = pd.isna(reason)
            keys = sorted_keys(descending_keys(meta["score"].to_numpy(np.float64)[alive]),
                               meta["row"].to_numpy(np.int64)[alive])[0]
        _save_npy(out, keys)
    return out


def score_cut(cfg: CurationConfig) -> Path:
    """Step, one task: the global top-fraction rule over every part's score keys (empty without one)."""
    out = assemble_dir(cfg) / SCORE_CUT
    if not out.is_file():
        cut = {}
        if cfg.image.score.top_fraction is not None:
            folder = assemble_dir(cfg) / "score"
            arrays = [np.load(_need(folder / f"{p.name}.npy", "score"), mmap_mode="r") for p in _finished_parts(cfg)]
            cut = cut_at(arrays, math.ceil(cfg.image.score.top_fraction * sum(len(a) for a in arrays)))
        write_json(out, cut)
    return out


def _score_cut(cfg: CurationConfig, part: Part, meta: pd.DataFrame, reason: np.ndarray) -> None:
    """Mark LOW_SCORE the part's rows outside the global top fraction (ties: smaller row first)."""
    if cfg.image.score.top_fraction is None:
        return
    cut = json.loads(_need(assemble_dir(cfg) / SCORE_CUT, "score-cut").read_text())
    alive = np.flatnonzero(pd.isna(reason))
    keep = keep_by_cut(descending_keys(meta["score"].to_numpy(np.float64)[alive]),
                       meta["row"].to_numpy(np.int64)[alive], cut, part.index)
    reason[alive[~keep]] = LOW_SCORE


def _alive(cfg: CurationConfig, part: Part) -> Tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(candidates, reason so far, positions of the rows the balance decides on, their languages and row ids)."""
    meta, reason = _state(cfg, part)
    _score_cut(cfg, part, meta, reason)
    alive = np.flatnonzero(pd.isna(reason))
    return (meta, reason, alive, meta["language"].to_numpy(object)[alive].astype(str),
            meta["row"].to_numpy(np.int64)[alive])


def count_part(cfg: CurationConfig, index: int) -> Path:
    """Step per part: language counts of its rows after the score cut, and what the balance mode needs of them."""
    _, part, out = _task(cfg, index, "count", "counts/{part}.json")
    folder = assemble_dir(cfg)
    if out.is_file():
        return out
    meta, _, alive, langs, rows = _alive(cfg, part)
    counts: dict = {}
    if cfg.balance.mode in ("cap", "temperature"):
        keys, counts["offsets"] = language_keys(rows, langs, cfg.balance.seed)
        _save_npy(folder / "balance" / f"{part.name}.npy", keys)
    if cfg.balance.mode == "metadata":
        entries = load_metadata(cfg.balance)
        matched = match_entries(meta["caption"].to_numpy(object)[alive], langs, entries)
        _save_npz(folder / "entries" / f"{part.name}.npz", entry_counts(matched, langs, entries))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, counts)
    return out


def _save_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def _summed_npz(paths: List[Path]) -> Dict[str, np.ndarray]:
    total: Dict[str, np.ndarray] = {}
    for path in paths:
        with np.load(path) as z:
            for lang in z.files:
                total[lang] = total[lang] + z[lang] if lang in total else z[lang].copy()
    return total


def balance_cut(cfg: CurationConfig) -> Path:
    """Step, one task: every language's cap/temperature rule from all parts' keys, or (metadata) the entries'
    counts summed over the parts; the decide tasks read this instead of every part's files."""
    folder = assemble_dir(cfg)
    out = folder / BALANCE_CUT
    if out.is_file():
        return out
    parts = _finished_parts(cfg)
    cuts: dict = {}
    if cfg.balance.mode in ("cap", "temperature"):
        offsets = [json.loads(_need(folder / "counts" / f"{p.name}.json", "count").read_text())["offsets"] for p in parts]
        mapped = [np.load(_need(folder / "balance" / f"{p.name}.npy", "count"), mmap_mode="r") for p in parts]
        cuts = language_cuts(offsets, mapped, cfg.balance)
    elif cfg.balance.mode == "metadata":
        _save_npz(folder / ENTRY_TOTALS, _summed_npz([_need(folder / "entries" / f"{p.name}.npz", "count")
                                                      for p in parts]))
    write_json(out, {"languages": cuts})
    return out


def decide_part(cfg: CurationConfig, index: int) -> Path:
    """Step per part: every candidate kept or dropped (decided/<part>.parquet) and its counts (<part>.json)."""
    _, part, out = _task(cfg, index, "decide", "decided/{part}.json")
    folder = out.parent
    if out.is_file():
        return out
    meta, reason, alive, langs, rows = _alive(cfg, part)
    cuts = json.loads(_need(assemble_dir(cfg) / BALANCE_CUT, "balance-cut").read_text())["languages"]
    info: dict = {}
    if cfg.balance.mode in ("cap", "temperature"):
        reason[alive[~language_keep(rows, langs, part.index, cuts, cfg.balance.seed)]] = BALANCE
    elif cfg.balance.mode == "metadata":
        entries = load_metadata(cfg.balance)
        totals = _summed_npz([assemble_dir(cfg) / ENTRY_TOTALS])
        matched = match_entries(meta["caption"].to_numpy(object)[alive], langs, entries)
        keep, unmatched = metadata_keep(rows, matched, langs, totals, cfg.balance)
        reason[alive[unmatched]] = METADATA_UNMATCHED
        reason[alive[~keep & ~unmatched]] = BALANCE
        _save_npz(folder / f"{part.name}-kept.npz", entry_counts(matched, langs, entries, keep))
        info["metadata_captions"] = caption_counts(matched, langs, keep)
    decided = pd.DataFrame({"row": meta["row"].to_numpy(np.int64), "reason": reason})
    _check_accounting(cfg, part, decided)
    folder.mkdir(parents=True, exist_ok=True)
    decided.to_parquet(folder / f"{part.name}.parquet", index=False)
    dropped = decided[decided["reason"].notna()]
    language = pd.Series(meta["language"].to_numpy(object), index=meta["row"].to_numpy())
    info.update({"kept": int(decided["reason"].isna().sum()), "final": dict(Counter(dropped["reason"])),
                 "dropped_by_language": reasons_by_language(dropped, language)})
    write_json(out, info)
    return out


def _check_accounting(cfg: CurationConfig, part: Part, decided: pd.DataFrame) -> None:
    """Every input row of the part: dropped before download, dropped in the part, or decided here, once."""
    plan = plan_drops(cfg, part)["row"].to_numpy(np.int64)
    early = pd.read_parquet(part_dir(cfg, part) / "drops.parquet", columns=["row"])["row"].to_numpy(np.int64)
    seen = np.sort(np.concatenate([plan, early, decided["row"].to_numpy(np.int64)]))
    if not np.array_equal(seen, np.arange(part.start, part.stop)):
        raise RuntimeError(f"accounting broken in {part.name}: rows {part.start}-{part.stop} but {len(plan)} plan "
                           f"+ {len(early)} part drops + {len(decided)} candidates")


def _kept(cfg: CurationConfig, part: Part) -> pd.DataFrame:
    """The part's kept candidates in row order."""
    decided = pd.read_parquet(_need(assemble_dir(cfg) / "decided" / f"{part.name}.parquet", "decide"))
    meta = _candidates(cfg, part)
    return meta[meta["row"].isin(decided.loc[decided["reason"].isna(), "row"])].sort_values("row")


def _record(r, images: TarImages) -> dict:
    meta = json.loads(r.extras)
    meta.update({"language": r.language, "language_confidence": round(float(r.language_confidence), 4),
                 "url": r.url, "final_url": r.final_url, "caption_original": r.caption_original, "row": int(r.row),
                 "width": int(r.width), "height": int(r.height),
                 "original_width": int(r.original_width), "original_height": int(r.original_height)})
    if r.declared_language is not None:
        meta["declared_language"] = r.declared_language
    if not np.isnan(r.score):
        meta["score"] = round(float(r.score), 5)
    return {"key": f"{int(r.row):012d}", "jpg": images.get(r.shard, r.key), "txt": r.caption, "json": meta}


def _records(cfg: CurationConfig, parts: List[Part]) -> Iterator[dict]:
    """Shard records of the kept rows of ``parts``, in row order, read lazily one part at a time."""
    for part in parts:
        with TarImages(part_dir(cfg, part) / "download" / "shards") as images:
            for r in _kept(cfg, part).itertuples(index=False):
                yield _record(r, images)


def write_part(cfg: CurationConfig, index: int) -> Path:
    """Step per part: the shards whose first kept row lies in this part (they may reach into later parts)."""
    parts, part, out = _task(cfg, index, "write", "written/{part}.json")
    folder = assemble_dir(cfg)
    if out.is_file():
        return out
    kept = [json.loads(_need(folder / "decided" / f"{p.name}.json", "decide").read_text())["kept"] for p in parts]
    per, first = cfg.output.samples_per_shard, sum(kept[:part.index])
    shards = range(-(-first // per), -(-(first + kept[part.index]) // per))  # those starting in [first, first + kept)
    infos = []
    if len(shards):
        records = _records(cfg, parts[part.index:])
        for _ in range(shards[0] * per - first):  # the tail of the shard an earlier part started
            next(records)
        (folder / "shards").mkdir(parents=True, exist_ok=True)
        for s in shards:
            chunk = [rec for _, rec in zip(range(per), records)]
            infos.append(asdict(write_shard(chunk, folder / "shards", f"shard-{s:05d}.tar")))
    if cfg.output.corpus:
        captions = _kept(cfg, part)["caption"]
        (folder / "written").mkdir(parents=True, exist_ok=True)
        (folder / "written" / f"{part.name}.txt").write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"shards": infos})
    return out


@dataclass(frozen=True)
class FinalizeStep:
    """One step of the finalize chain: run once (``fn(cfg)``) or once per part/partition (``fn(cfg, index)``);
    its tasks as (Slurm task name, function, arguments)."""
    name: str
    fn: Callable
    once: bool
    tasks: List[Tuple[str, Callable, tuple]]


def finalize_steps(cfg: CurationConfig, parts: List[Part]) -> List[FinalizeStep]:
    """The finalize chain in order, as both the local run and `sigscale submit curate` run it. Task names carry
    the settings' hashes: a changed near or assemble setting names (and so reruns) its steps anew."""
    key, akey = finalize_key(cfg, parts), assemble_key(cfg)

    def once(name: str, fn: Callable, tag: str) -> FinalizeStep:
        return FinalizeStep(name, fn, True, [(f"{name}-{tag}", fn, (cfg,))])

    def each(name: str, fn: Callable, tag: str) -> FinalizeStep:
        return FinalizeStep(name, fn, False, [(f"{name}-{tag}-{p.name}", fn, (cfg, p.index)) for p in parts])

    return [once("prepare", prepare_finalize, key), each("scatter", scatter_part, key),
            FinalizeStep("near", near_partition, False, [(f"near-{key}-p{k:05d}", near_partition, (cfg, k))
                                                         for k in range(cfg.output.finalize_partitions)]),
            each("score", score_part, f"{key}-{akey}"), once("score-cut", score_cut, f"{key}-{akey}"),
            each("count", count_part, f"{key}-{akey}"), once("balance-cut", balance_cut, f"{key}-{akey}"),
            each("decide", decide_part, f"{key}-{akey}"), each("write", write_part, f"{key}-{akey}")]


def run_finalize_steps(cfg: CurationConfig, parts: List[Part]) -> None:
    """Run here every partitioned step not yet done (a done task is skipped), step after step; the tasks of
    one step over ``output.local_processes`` processes."""
    steps = [[(fn, args) for _, fn, args in step.tasks] for step in finalize_steps(cfg, parts)]
    progress = Progress("curate: finalize", sum(len(s) for s in steps),
                        "steps done (prepare, scatter per part, near per partition, then score, score-cut, count, "
                        "balance-cut, decide, write)")
    with local_pool(cfg.output.local_processes) as pool:  # started once: each spawn imports pandas and pyarrow
        for calls in steps:
            run_tasks(calls, pool, progress.update)
    progress.close()


def finalize(cfg: CurationConfig) -> Path:
    """Run the steps not yet done, then merge: manifest.json, stats.json, captions.txt, outcomes, report."""
    parts = _finished_parts(cfg)
    plan = plan_stats(cfg)
    t0 = time.perf_counter()
    run_finalize_steps(cfg, parts)
    folder, out = assemble_dir(cfg), cfg.out_dir
    done = [json.loads((part_dir(cfg, p) / DONE).read_text()) for p in parts]
    decided = [json.loads((folder / "decided" / f"{p.name}.json").read_text()) for p in parts]
    infos = [ShardInfo(**s) for p in parts for s in json.loads((folder / "written" / f"{p.name}.json").read_text())["shards"]]
    manifest = Manifest(shards=infos, config_hash=config_hash(cfg), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    save_manifest(manifest, out)
    _publish_shards(folder, out, infos)
    if cfg.output.corpus:
        with open(out / "captions.txt", "w", encoding="utf-8") as f:
            for p in parts:
                f.write((folder / "written" / f"{p.name}.txt").read_text(encoding="utf-8"))
    _write_outcomes(cfg, parts)
    stats = _stats(cfg, plan, done, decided, manifest)
    if cfg.balance.mode == "metadata":
        entries = load_metadata(cfg.balance)
        stats["metadata_balance"] = metadata_summary(
            entries, _summed_npz([folder / ENTRY_TOTALS]),
            _summed_npz([folder / "decided" / f"{p.name}-kept.npz" for p in parts]),
            _sum_lists(d["metadata_captions"] for d in decided), cfg.balance)
    else:
        stats["metadata_balance"] = {}
    stats["timing"]["finalize_seconds"] = round(time.perf_counter() - t0, 3)
    write_json(out / "stats.json", stats)
    write_report(stats, out, plots=cfg.output.plots, name=cfg.name, samples=_report_samples(cfg, parts))
    print(f"curate: kept {manifest.num_samples} of {plan['input_rows']} rows in {len(infos)} shard(s) at {out}",
          flush=True)
    if not manifest.num_samples:
        raise CurationError(f"no sample survived curation of {cfg.input.path}; see {out / 'stats.json'} for the drop reasons")
    return out


def _publish_shards(folder: Path, out: Path, infos: List[ShardInfo]) -> None:
    """Hard-link this setting's shards into the output folder (no bytes copied); drop other settings' work."""
    names = {s.path for s in infos}
    for old in out.glob("shard-*.tar"):  # a shard of an earlier, longer run
        if old.name not in names:
            old.unlink()
    for info in infos:
        tmp = out / (info.path + ".tmp")
        tmp.unlink(missing_ok=True)
        os.link(folder / "shards" / info.path, tmp)
        tmp.replace(out / info.path)
    for other in folder.parent.glob("assemble-*"):  # their shards are no longer published: free the disk
        if other != folder:
            shutil.rmtree(other)


def _sum_lists(tables: Iterator[Dict[str, List[int]]]) -> Dict[str, List[int]]:
    out: Dict[str, List[int]] = {}
    for table in tables:
        for key, counts in table.items():
            out[key] = [a + b for a, b in zip(out.get(key, [0] * len(counts)), counts)]
    return out


def _write_outcomes(cfg: CurationConfig, parts: List[Part]) -> None:
    """work/outcomes.parquet (row, reason; null: kept) in row order, written part by part."""
    path = cfg.work_dir / OUTCOMES
    tmp = path.with_name(path.name + ".tmp")
    schema = pa.schema([("row", pa.int64()), ("reason", pa.string())])
    with pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            rows = pd.concat([plan_drops(cfg, part),
                              pd.read_parquet(part_dir(cfg, part) / "drops.parquet"),
                              pd.read_parquet(assemble_dir(cfg) / "decided" / f"{part.name}.parquet")],
                             ignore_index=True).sort_values("row", ignore_index=True)
            writer.write_table(pa.Table.from_pandas(rows[["row", "reason"]].astype({"row": np.int64}), schema,
                                                    preserve_index=False))
    tmp.replace(path)


def _stats(cfg: CurationConfig, plan: dict, done: List[dict], decided: List[dict], manifest: Manifest) -> dict:
    """stats.json of a finalized run (finalize adds its own seconds): counts, funnel, languages, config, timing."""
    final = sum((Counter(d["final"]) for d in decided), Counter())
    dropped = Counter({r: sum(by.values()) for r, by in plan["dropped_by_language"].items()})
    for d in done:
        dropped.update(d["dropped"])
    dropped.update(final)
    unknown = set(dropped) - set(DROP_REASONS)
    if unknown:  # a stage invented a reason without declaring it: stats would not be comparable across runs
        raise RuntimeError(f"undeclared drop reasons {sorted(unknown)}; add them to their stage's *_REASONS")
    n = plan["input_rows"]
    text_s = sum(d["text_seconds"] for d in done)
    download_s = sum(d["download_seconds"] for d in done)
    return {
        "input_rows": n, "kept": manifest.num_samples, "dropped_total": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
        "funnel": _funnel(n, plan, done, final),
        "dropped_by_language": sum_counts([plan["dropped_by_language"],
                                           *(d.get("dropped_by_language", {}) for d in done),
                                           *(d["dropped_by_language"] for d in decided)]),
        # Captions kept after removing these characters (counted per caption), not dropped.
        "captions_cleaned": plan["captions_cleaned"],
        "languages_before": dict(sorted(sum((Counter(d["languages_text"]) for d in done), Counter()).items())),
        "languages_after": manifest.languages,
        "language_id": merge_language_outcomes(d.get("language_id", {}) for d in done),
        "short_side_histogram": {k: sum(d["short_side_histogram"][k] for d in done)
                                 for k in short_side_histogram([])},
        "shards": len(manifest.shards), "parts": len(done), "config_hash": config_hash(cfg), "config": _flat(asdict(cfg)),
        "timing": {
            "plan_seconds": plan["plan_seconds"], "text_seconds": round(text_s, 3),
            "download_seconds": round(download_s, 3),
            "image_seconds": round(sum(d["image_seconds"] for d in done), 3),
            "captions_per_second": round(sum(d["rows"] for d in done) / max(text_s, 1e-9), 1),
            "images_per_second": round(sum(d["downloaded"] for d in done) / max(download_s, 1e-9), 1),
        },
    }


# The funnel's steps after the text stage: each stage's reasons, in the order rows meet them.
_FUNNEL = (("download (img2dataset)", "download"), ("image checks", "image"))


def _funnel(n: int, plan: dict, done: List[dict], final: Counter) -> List[list]:
    """[[step, rows left after it], ...] from the input rows to the kept ones."""
    plan_dropped = sum(sum(v.values()) for v in plan["dropped_by_language"].values())
    steps = [["input rows", n], ["plan: invalid URLs, empty captions", n - plan_dropped]]
    for label, stage in (("exact (url, caption) duplicates", "exact"), ("text filters", "text"), *_FUNNEL):
        steps.append([label, steps[-1][1] - sum(sum(d.get("dropped_by_stage", {}).get(stage, {}).values())
                                                for d in done)])
    merge = sum(final[r] for r in (EVAL_DUPLICATE, NEAR_DUPLICATE, LOW_SCORE))
    steps.append(["decontamination, near-duplicates, score", steps[-1][1] - merge])
    steps.append(["balance (kept)", steps[-1][1] - final[BALANCE] - final[METADATA_UNMATCHED]])
    return steps


def _report_samples(cfg: CurationConfig, parts: List[Part]) -> dict:
    """Images for report.html: the first kept samples, and the first dropped ones per reason that has an image."""
    kept, finals, early = [], {}, {}
    for part in parts:
        folder = part_dir(cfg, part)
        samples = pd.read_parquet(folder / SAMPLES) if (folder / SAMPLES).is_file() else pd.DataFrame()
        samples = samples[[len(early.get(r, [])) < SAMPLES_PER_REASON for r in samples.get("reason", [])]]
        if len(samples):  # image-stage drops: their captions are in the part's input rows
            inputs = part_rows(cfg, part, ["row", "caption"])
            caption = inputs.set_index("row")["caption"]
            for r in samples.itertuples(index=False):
                early.setdefault(r.reason, []).append((caption[r.row], None, r.jpg))
        decided = pd.read_parquet(assemble_dir(cfg) / "decided" / f"{part.name}.parquet")
        want = set(decided.loc[decided["reason"].isna(), "row"].head(KEPT_SAMPLES - len(kept)))
        picked = {rsn: set(g["row"].head(SAMPLES_PER_REASON - len(finals.get(rsn, []))))
                  for rsn, g in decided[decided["reason"].notna()].groupby("reason")}
        if not want and not any(picked.values()):
            continue
        meta = _candidates(cfg, part)
        meta = meta[meta["row"].isin(want.union(*picked.values()))]
        with TarImages(folder / "download" / "shards") as images:
            for r in meta.itertuples(index=False):
                item = (r.caption, r.language, images.get(r.shard, r.key))
                if r.row in want:
                    kept.append(item)
                for rsn, rows in picked.items():
                    if r.row in rows:
                        finals.setdefault(rsn, []).append(item)
    dropped = {rsn: items[:SAMPLES_PER_REASON] for rsn, items in sorted(early.items())}
    dropped.update(sorted(finals.items()))
    return {"kept": kept, "dropped": dropped}


def curate(cfg: CurationConfig) -> Path:
    """Plan, run every unfinished part here, and finalize; returns the output folder."""
    parts = plan_parts(cfg)
    progress = Progress("curate: parts", parts[-1].stop if parts else 0, "input rows done", every_s=0)
    for part in parts:
        run_part(cfg, part)
        progress.update(part.stop - part.start)
    progress.close()
    return finalize(cfg)
