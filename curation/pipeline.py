"""Curation in parts: plan, run each part (locally or one per Slurm array task), finalize.

``plan_parts`` plans the URL list (:mod:`sigscale.curation.plan`: its layout, a task per input file, a task per
exact-dedup partition). ``run_part`` drops its rows marked as exact duplicates and takes the rest through the
text stage, img2dataset and the image checks into ``work/parts/part-NNNNN/`` and marks it done; a rerun skips
it. A part keeps img2dataset's tars (download/shards/, the only copy of its images) and candidates.parquet
(metadata, pHash, thumbnail, and where each image is in the tars). The finalize steps here (prepare, scatter
per part, near per partition) find eval and near duplicates; :mod:`sigscale.curation.finalize` runs the rest
per part and merges. Every input row ends kept or with one counted drop reason.

Layout under ``output.dir``: shard-NNNNN.tar, manifest.json, stats.json, captions.txt, report.md, report.html,
plots, and work/ (plan.json, plan/, inputs/, dedup/, parts/, finalize/, assemble-*/, outcomes.parquet).
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from sigscale.core.config import config_hash
from sigscale.curation.balance import BALANCE_REASONS
from sigscale.curation.config import CurationConfig, CurationError, part_config_hash
from sigscale.curation.download import DOWNLOAD_REASONS, download
from sigscale.curation.image_filters import IMAGE_REASONS, check_images, eval_images, hash_files
from sigscale.curation.langid import declared_code
from sigscale.curation.partitions import (PAIRS_PER_SECOND, PARTITION_REASONS, chance_pairs, narrowest_band,
                                         partition_drops, rows_per_cpu_hour, scatter)
from sigscale.curation.plan import (DONE, Part, dedup_partition, duplicates_in, part_dir, part_rows, parts_of,
                                    plan_file, plan_layout, plan_stats, read_plan, unplanned_files)
from sigscale.curation.tasks import local_pool, run_tasks, task_index, write_json
from sigscale.curation.text_filters import (DUPLICATE_URL_CAPTION, TEXT_REASONS, filter_text, language_outcomes,
                                           reasons_by_language)
from sigscale.curation.url_policy import UrlPolicy

OUTCOMES = "outcomes.parquet"  # one line per input row: row, reason (null: kept)
SAMPLES = "samples.parquet"  # a part's first dropped images per image-stage reason, for report.html
SAMPLES_PER_REASON = 8
KEPT_SAMPLES = 24
# Drop reasons of the finalize step; with the text, download and image stages' these are every reason there is.
LOW_SCORE, BALANCE = "low_score", "balance"
FINALIZE_REASONS = (*PARTITION_REASONS, LOW_SCORE, BALANCE)
# A URL reason can come from the text stage or, at fetch time, from the download: listed once.
DROP_REASONS = tuple(dict.fromkeys(TEXT_REASONS + DOWNLOAD_REASONS + IMAGE_REASONS + FINALIZE_REASONS + BALANCE_REASONS))
# The partitioned finalize's work folder: settings.json, eval.parquet, bands/pNNNNN/, scattered/, drops/.
FINALIZE_DIR = "finalize"
# A candidate's columns; "shard" and "key" name its image in img2dataset's tars (download/shards/).
_META = ["row", "part", "url", "caption", "caption_original", "declared_language", "extras", "language",
         "language_confidence", "width", "height", "original_width", "original_height", "nbytes", "phash",
         "thumb", "score", "final_url", "shard", "key"]


def plan_parts(cfg: CurationConfig, dedup: bool = True) -> List[Part]:
    """Plan the URL list here (reusing a plan of the same input, see :mod:`sigscale.curation.plan`): its layout,
    then every file not yet planned and, with ``dedup``, every exact-dedup partition not yet done, over
    ``output.local_processes`` processes (`sigscale submit curate` runs them as arrays instead)."""
    plan = plan_layout(cfg)
    todo = unplanned_files(cfg, plan)
    tasks = max(len(todo), plan["dedup_partitions"] if dedup else 0)
    with local_pool(min(cfg.output.local_processes, tasks)) as pool:
        run_tasks([(plan_file, (cfg, f)) for f in todo], pool)
        if todo:
            stats = plan_stats(cfg)
            dropped = sum(sum(by.values()) for by in stats["dropped_by_language"].values())
            print(f"curate: planned {len(todo)} file(s) in {stats['plan_seconds']:.1f} task-seconds; {dropped:,} of "
                  f"{plan['input_rows']:,} rows dropped before download (invalid URL, empty caption)", flush=True)
        if dedup:
            run_tasks([(dedup_partition, (cfg, k)) for k in range(plan["dedup_partitions"])], pool)
    return parts_of(plan)


def run_part(cfg: CurationConfig, part: Part) -> Path:
    """Curate one part into work/parts/<name> (idempotent: a finished part is skipped)."""
    final = part_dir(cfg, part)
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
    rows = part_rows(cfg, part)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt; img2dataset needs a fresh folder
    tmp.mkdir(parents=True)

    t0 = time.perf_counter()
    dedup_drops = pd.DataFrame({"row": duplicates_in(cfg, part), "reason": DUPLICATE_URL_CAPTION})
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
    write_json(tmp / DONE, {
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
    _warn_quadratic_near(cfg, sum(json.loads((part_dir(cfg, p) / DONE).read_text())["candidates"] for p in parts))
    evals = eval_set_hashes(cfg)
    if evals is not None:
        evals.to_parquet(folder / "eval.parquet")
    write_json(folder / "settings.json", settings)
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
    part = parts[task_index(index, len(parts), "scatter")]
    marker = folder / "scattered" / part.name
    if not marker.is_file():
        cands = pd.read_parquet(part_dir(cfg, part) / "candidates.parquet", columns=["row", "phash", "thumb"])
        copies = scatter(cands, folder / "bands", part.index, cfg.output.finalize_partitions, cfg.image.phash_threshold)
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(str(copies))
    return marker


def near_partition(cfg: CurationConfig, k: int) -> Path:
    """Finalize step per partition: its eval and near duplicates into drops/ (skipped when done)."""
    folder = _prepared(cfg)
    k = task_index(k, cfg.output.finalize_partitions, "near")
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


def _finished_parts(cfg: CurationConfig) -> List[Part]:
    """The planned parts, once every one of them is finished; else a CurationError that says what to run."""
    parts = parts_of(read_plan(cfg))
    missing = [p.name for p in parts if not (part_dir(cfg, p) / DONE).is_file()]
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
