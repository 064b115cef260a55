"""Near-duplicates and decontamination of the candidates, partitioned by pHash band so that no step holds them all.

Multi-index hashing (Norouzi, Punjani & Fleet, CVPR 2012) with exact band matches: the 64-bit
pHash is cut into h+1 bands (h = ``image.phash_threshold``) of ⌊64/(h+1)⌋ or one more bits. Two
hashes within Hamming distance h differ in at most h bands, so by pigeonhole they agree exactly on
at least one. ``scatter`` (one task per download part) writes each candidate's (row, pHash, where
its thumbnail is) once per band into partition hash(band, band value) mod P and its colour thumbnail
once beside them (thumbs/, mapped by the partition tasks, which read only the thumbnails of
pHash-close pairs); ``partition_drops`` (one
task per partition) compares rows that share a band value, verifies the full Hamming distance and
the colour-thumbnail difference, and drops a row when a verified near-duplicate with a smaller
row id exists. That rule looks only at pairs, not at which rows an earlier decision kept, so the
union over partitions is the same set for every P (and equals :func:`near_duplicates`).
Decontamination is row-local (a candidate against the small eval set), checked in the same tasks;
contaminated rows take no part in the near-duplicate pairs, as in the single-process order.

Memory per partition task: its share of the (h+1)·N band copies (33 bytes each), i.e. constant when P
grows with N, down to one band group (N / 2^⌊64/(h+1)⌋ rows) as the floor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa

from sigscale.curation.balance import row_uniforms
from sigscale.curation.image_filters import THUMB, close_pairs, expand_ranges, same_colours

EVAL_DUPLICATE, NEAR_DUPLICATE = "eval_duplicate", "near_duplicate"
PARTITION_REASONS = (EVAL_DUPLICATE, NEAR_DUPLICATE)
THUMB_BYTES = THUMB * THUMB * 3
PAIRS_PER_BLOCK = 2_000_000  # candidate pairs compared at once: bounds a task's memory inside a large band group
VERIFY_PAIRS = 65_536  # close pairs whose thumbnails are read at once (2 x 768 bytes each: ~100 MB)
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


# Candidate pairs one near task compares per second on one CPU core, measured: 2.8e8 at h = 8 (300k rows,
# groups of ~2,300 copies compared as tiles; `sigscale bench curation --rows 300000 --phash-threshold 8`,
# BENCHMARKS.md). Groups under TILE_GROUP copies pair one by one, at about a quarter of that.
PAIRS_PER_SECOND = 2.8e8


def narrowest_band(threshold: int) -> int:
    """Bits of the narrowest band at ``threshold``: the one whose groups are the largest."""
    return min(w for _, w in band_layout(threshold))


def chance_pairs(rows: int, threshold: int) -> float:
    """Pairs that share a band by chance among ``rows`` uniform pHashes, all of which the near tasks verify:
    (bands) · N² / 2^(width+1). Quadratic in N: real pHashes, which cluster, give more, never fewer."""
    return len(band_layout(threshold)) * float(rows) ** 2 / 2.0 ** (narrowest_band(threshold) + 1)


def rows_per_cpu_hour(threshold: int) -> float:
    """Candidates whose chance pairs at ``threshold`` take one CPU-hour of near tasks (the inverse of the above)."""
    return (3600 * PAIRS_PER_SECOND / chance_pairs(1, threshold)) ** 0.5


def partition_dir(folder: Path, k: int) -> Path:
    """Folder of partition k: one Arrow file per writer."""
    return Path(folder) / f"p{k:05d}"


def scatter(frame: pd.DataFrame, folder: Path, writer: int, partitions: int, threshold: int) -> int:
    """Write one writer's candidates (row, phash, thumb) into the band partitions; returns the copies written."""
    n = len(frame)
    hashes = frame["phash"].to_numpy(np.uint64)
    rows = frame["row"].to_numpy(np.int64)
    thumbs = thumb_matrix(frame["thumb"])
    layout = band_layout(threshold)
    values = np.concatenate([band_values(hashes, shift, width) for shift, width in layout])
    bands = np.repeat(np.arange(len(layout), dtype=np.int8), n)
    where = np.concatenate([partition_of(b, values[b * n:(b + 1) * n], partitions) for b in range(len(layout))])
    order = np.argsort(where, kind="stable")
    _write_arrow(thumbs_path(folder, writer), pa.table({"thumb": _fixed_binary(thumbs)}))
    cuts = np.searchsorted(where[order], np.arange(partitions + 1))
    for k in np.flatnonzero(np.diff(cuts)):
        pick = order[cuts[k]:cuts[k + 1]]
        path = partition_dir(folder, int(k)) / f"w{writer:05d}.arrow"
        src = pick % n  # copy i of band b comes from candidate i - b·n
        _write_arrow(path, pa.table({"band": bands[pick], "value": values[pick], "row": rows[src],
                                     "phash": hashes[src], "writer": np.full(len(src), writer, np.int32),
                                     "index": src.astype(np.int32)}))
    return len(values)


def thumbs_path(folder: Path, writer: int) -> Path:
    """A writer's colour thumbnails, in its candidates' order: stored once, not once per band copy."""
    return Path(folder) / "thumbs" / f"w{writer:05d}.arrow"


def _write_arrow(path: Path, table: pa.Table) -> None:
    """Arrow IPC, uncompressed: the partition task maps it instead of decoding it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(str(path.with_suffix(".tmp")), table.schema) as sink:
        sink.write_table(table)
    path.with_suffix(".tmp").replace(path)


def _read_arrow(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _gather_thumbs(folder: Path, writers: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Thumbnails of the given (writer, index) copies, from the writers' mapped files. Each file is mapped for
    this gather only: the kernel reads ahead around every page touched, so a map kept for the whole task would
    end up resident in full (768 bytes a candidate: 14 GiB at 20M rows, measured); unmapped, it is one file."""
    out = np.empty((len(writers), THUMB_BYTES), np.uint8)
    for w in np.unique(writers).tolist():
        mine = writers == w
        out[mine] = thumb_matrix(_read_arrow(thumbs_path(folder, w)).column("thumb"))[index[mine]]
    return out


def _fixed_binary(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(THUMB_BYTES), len(matrix), [None, pa.py_buffer(matrix)])


def thumb_matrix(column) -> np.ndarray:
    """Colour thumbnails as an (n, THUMB_BYTES) uint8 matrix, from bytes objects or an Arrow binary column."""
    if isinstance(column, pa.ChunkedArray):  # one chunk per file written here: a view, not a copy
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if isinstance(column, pa.FixedSizeBinaryArray):
        data = np.frombuffer(column.buffers()[1], np.uint8) if len(column) else np.zeros(0, np.uint8)
        start = column.offset * THUMB_BYTES
        return data[start:start + len(column) * THUMB_BYTES].reshape(len(column), THUMB_BYTES)
    if isinstance(column, pa.Array):
        column = column.to_pylist()
    if not len(column):
        return np.zeros((0, THUMB_BYTES), np.uint8)
    return np.frombuffer(b"".join(column), np.uint8).reshape(len(column), THUMB_BYTES)


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


# A group of this many copies or more is compared as tiles of its sorted pHashes (contiguous XORs,
# ~10x the pairs/s of listing each pair); smaller ones, the many groups of wide bands, pair by pair.
TILE_GROUP = 64
TILE_ROWS = 512


def _close_pairs_sorted(hashes: np.ndarray, ends: np.ndarray, threshold: int,
                        block: int) -> Iterator[Tuple[np.ndarray, np.ndarray, int]]:
    """(p, q, pairs compared) for positions p < q of one group of the sorted ``hashes`` within ``threshold``."""
    sizes = ends - np.arange(len(ends))
    starts = np.flatnonzero(np.r_[True, ends[1:] != ends[:-1]]) if len(ends) else np.zeros(0, np.int64)
    big = starts[sizes[starts] >= TILE_GROUP]
    small_ends = ends.copy()
    for a in big.tolist():  # their pairs come from the tiles below
        small_ends[a:ends[a]] = np.arange(a, ends[a]) + 1
    for p, q in _group_pairs(small_ends, block):
        close = np.bitwise_count(hashes[p] ^ hashes[q]) <= threshold
        yield p[close], q[close], len(p)
    cols = max(TILE_ROWS, block // TILE_ROWS)
    for a in big.tolist():
        b = int(ends[a])
        for s in range(a, b, TILE_ROWS):
            e = min(s + TILE_ROWS, b)
            for t in range(s, b, cols):
                u = min(t + cols, b)
                close = np.bitwise_count(hashes[s:e, None] ^ hashes[None, t:u]) <= threshold
                if t == s:  # the tile on the diagonal: only q > p (each pair once, no row with itself)
                    close = np.triu(close, 1)
                hit = np.flatnonzero(close.any(axis=1))  # few rows have a close pair: nonzero on those only
                pi, qi = np.nonzero(close[hit])
                yield hit[pi] + s, qi + t, 0
        yield np.zeros(0, np.int64), np.zeros(0, np.int64), (b - a) * (b - a - 1) // 2


def _batched(close: Iterator[Tuple[np.ndarray, np.ndarray, int]], size: int,
             tally: Dict[str, int]) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """The close pairs (p, q) in batches of about ``size``, so that their thumbnails are read in few gathers;
    the pairs compared and found are added to ``tally``."""
    pending: List[Tuple[np.ndarray, np.ndarray]] = []
    waiting = 0
    for p, q, compared in close:
        tally["pairs"] += compared
        tally["close_pairs"] += len(p)
        if len(p):
            pending.append((p, q))
            waiting += len(p)
        if waiting >= size:
            yield np.concatenate([a for a, _ in pending]), np.concatenate([b for _, b in pending])
            pending, waiting = [], 0
    if pending:
        yield np.concatenate([a for a, _ in pending]), np.concatenate([b for _, b in pending])


def partition_drops(folder: Path, k: int, threshold: int, thumb_max_diff: float,
                    eval_set: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                    block: int = PAIRS_PER_BLOCK, counts: Optional[Dict[str, int]] = None) -> pd.DataFrame:
    """Rows of partition k dropped as eval duplicates or near-duplicates (columns row, reason); see module doc.

    ``counts``, if given, receives the band copies read, the pairs compared (sharing a band value) and
    the pairs within the threshold whose thumbnails were compared: what the task's time goes into."""
    files = sorted(partition_dir(folder, k).glob("w*.arrow"))
    table = pa.concat_tables([_read_arrow(f) for f in files]) if files else None

    def column(name: str, dtype: type) -> np.ndarray:
        return table.column(name).to_numpy().astype(dtype, copy=False) if table is not None else np.zeros(0, dtype)

    band, value, row, hashes = column("band", np.int64), column("value", np.int64), column("row", np.int64), \
        column("phash", np.uint64)
    writer, index = column("writer", np.int64), column("index", np.int64)
    eval_hit = np.zeros(len(row), dtype=bool)
    if eval_set is not None and len(row):
        i, j = close_pairs(hashes, eval_set[0], max(threshold, 0))
        ok = same_colours(_gather_thumbs(folder, writer[i], index[i]), eval_set[1], np.arange(len(i)), j,
                          thumb_max_diff)
        eval_hit[i[ok]] = True
    out = [pd.DataFrame({"row": row[eval_hit], "reason": EVAL_DUPLICATE})]
    tally = {"copies": len(row), "pairs": 0, "close_pairs": 0}
    if threshold >= 0:
        alive = np.flatnonzero(~eval_hit)
        order = alive[np.lexsort((row[alive], value[alive], band[alive]))]
        ends = _group_ends(band[order], value[order])
        rows, near = row[order], []
        for p, q in _batched(_close_pairs_sorted(hashes[order], ends, threshold, block), VERIFY_PAIRS, tally):
            i, j = order[p], order[q]  # rows ascend inside a group: rows[q] > rows[p]
            pair = np.arange(len(i))
            same = same_colours(_gather_thumbs(folder, writer[i], index[i]), _gather_thumbs(folder, writer[j], index[j]),
                                pair, pair, thumb_max_diff)
            near.append(rows[q[same]])
        out.append(pd.DataFrame({"row": np.concatenate(near or [np.zeros(0, np.int64)]), "reason": NEAR_DUPLICATE}))
    if counts is not None:
        counts.update(tally)
    return pd.concat(out, ignore_index=True).drop_duplicates("row").sort_values("row", ignore_index=True)
