"""Near-duplicates and decontamination of the candidates, partitioned by pHash band so that no step holds them all.

Multi-index hashing (Norouzi, Punjani & Fleet, CVPR 2012) with exact band matches: the 64-bit
pHash is cut into h+1 bands (h = ``image.phash_threshold``) of ⌊64/(h+1)⌋ or one more bits. Two
hashes within Hamming distance h differ in at most h bands, so by pigeonhole they agree exactly on
at least one. ``scatter`` (one task per download part) writes each candidate's (row, pHash,
thumbnail) once per band into partition hash(band, band value) mod P; ``partition_drops`` (one
task per partition) compares rows that share a band value, verifies the full Hamming distance and
the colour-thumbnail difference, and drops a row when a verified near-duplicate with a smaller
row id exists. That rule looks only at pairs, not at which rows an earlier decision kept, so the
union over partitions is the same set for every P (and equals :func:`near_duplicates`).
Decontamination is row-local (a candidate against the small eval set), checked in the same tasks;
contaminated rows take no part in the near-duplicate pairs, as in the single-process order.

Memory per partition task: its share of the (h+1)·N band copies (~800 bytes each), i.e. constant when P
grows with N, down to one band group (N / 2^⌊64/(h+1)⌋ rows) as the floor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from sigscale.curation.balance import row_uniforms
from sigscale.curation.image_filters import THUMB, contaminated, expand_ranges, same_colours

EVAL_DUPLICATE, NEAR_DUPLICATE = "eval_duplicate", "near_duplicate"
PARTITION_REASONS = (EVAL_DUPLICATE, NEAR_DUPLICATE)
PAIRS_PER_BLOCK = 2_000_000  # candidate pairs verified at once: bounds a task's memory inside a large band group
_PARTITION_SEED = 0x5167  # fixed: every writer must send a band value to the same partition


def band_layout(threshold: int) -> List[Tuple[int, int]]:
    """(shift, width) of each band: h+1 bands covering 64 bits; one 64-bit band when near-duplicates are off."""
    if threshold >= 64:  # every pair is within h: one band of no bits, one group
        return [(0, 0)]
    bands = max(threshold, 0) + 1
    widths = [64 // bands + (1 if k < 64 % bands else 0) for k in range(bands)]
    return [(sum(widths[:k]), w) for k, w in enumerate(widths)]


def band_values(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
    """The bits [shift, shift + width) of each hash, as int64."""
    mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    return ((np.asarray(hashes, np.uint64) >> np.uint64(shift)) & mask).view(np.int64)


def partition_of(band: int, values: np.ndarray, partitions: int) -> np.ndarray:
    """Partition index of each (band, band value): a hash, so band groups spread evenly over the tasks."""
    key = values.view(np.uint64) ^ (np.uint64(band) << np.uint64(58))
    return (row_uniforms(key, _PARTITION_SEED) * partitions).astype(np.int64)


def partition_dir(folder: Path, k: int) -> Path:
    """Folder of partition k: one parquet per writer."""
    return Path(folder) / f"p{k:05d}"


def scatter(frame: pd.DataFrame, folder: Path, writer: int, partitions: int, threshold: int) -> int:
    """Write one writer's candidates (row, phash, thumb) into the band partitions; returns the copies written."""
    hashes = frame["phash"].to_numpy(np.uint64)
    pieces = []
    for band, (shift, width) in enumerate(band_layout(threshold)):
        values = band_values(hashes, shift, width)
        pieces.append(pd.DataFrame({"band": np.full(len(frame), band, np.int8), "value": values,
                                    "row": frame["row"].to_numpy(np.int64), "phash": hashes,
                                    "thumb": frame["thumb"].to_numpy(object),
                                    "partition": partition_of(band, values, partitions)}))
    copies = pd.concat(pieces, ignore_index=True)
    for k, group in copies.groupby("partition", sort=True):
        path = partition_dir(folder, int(k)) / f"w{writer:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        group.drop(columns="partition").to_parquet(path.with_suffix(".tmp"), index=False)
        path.with_suffix(".tmp").replace(path)
    return len(copies)


def _thumbs(column: pd.Series) -> np.ndarray:
    if not len(column):
        return np.zeros((0, THUMB * THUMB * 3), np.uint8)
    return np.frombuffer(b"".join(column), np.uint8).reshape(len(column), -1)


def _group_ends(bands: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each position of a (band, value)-sorted array, the end of its group."""
    starts = np.flatnonzero((bands[1:] != bands[:-1]) | (values[1:] != values[:-1])) + 1
    bounds = np.concatenate([[0], starts, [len(bands)]])
    return np.repeat(bounds[1:], np.diff(bounds))


def _group_pairs(ends: np.ndarray, block: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(p, q) with p < q inside each group of a sorted array (group of p ends at ends[p]), in bounded blocks."""
    counts = ends - np.arange(len(ends)) - 1
    start = 0
    while start < len(ends):
        total = np.cumsum(counts[start:])
        stop = start + max(1, int(np.searchsorted(total, block, "right")))
        p, q = expand_ranges(np.arange(start, stop) + 1, ends[start:stop])
        yield p + start, q
        start = stop


def partition_drops(folder: Path, k: int, threshold: int, thumb_max_diff: float,
                    eval_set: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                    block: int = PAIRS_PER_BLOCK) -> pd.DataFrame:
    """Rows of partition k dropped as eval duplicates or near-duplicates (columns row, reason); see module doc."""
    files = sorted(partition_dir(folder, k).glob("w*.parquet"))
    copies = (pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files
              else pd.DataFrame(columns=["band", "value", "row", "phash", "thumb"]))
    hashes = copies["phash"].to_numpy(np.uint64)
    thumbs = _thumbs(copies["thumb"])
    eval_hit = np.zeros(len(copies), dtype=bool)
    if eval_set is not None:
        eval_hit = contaminated(hashes, thumbs, eval_set[0], eval_set[1], max(threshold, 0), thumb_max_diff)
    out = [pd.DataFrame({"row": copies["row"].to_numpy(np.int64)[eval_hit], "reason": EVAL_DUPLICATE})]
    if threshold >= 0:
        alive = np.flatnonzero(~eval_hit)
        order = alive[np.lexsort((copies["row"].to_numpy()[alive], copies["value"].to_numpy()[alive],
                                  copies["band"].to_numpy()[alive]))]
        ends = _group_ends(copies["band"].to_numpy(np.int64)[order], copies["value"].to_numpy(np.int64)[order])
        rows = copies["row"].to_numpy(np.int64)[order]
        for p, q in _group_pairs(ends, block):
            i, j = order[p], order[q]  # rows ascend inside a group: rows[q] > rows[p]
            close = np.bitwise_count(hashes[i] ^ hashes[j]) <= threshold
            close[close] = same_colours(thumbs, thumbs, i[close], j[close], thumb_max_diff)
            out.append(pd.DataFrame({"row": rows[q[close]], "reason": NEAR_DUPLICATE}))
    return pd.concat(out, ignore_index=True).drop_duplicates("row").sort_values("row", ignore_index=True)
