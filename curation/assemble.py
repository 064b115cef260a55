"""The finalize steps after the near-duplicate search, one download part at a time.

A global rule ("keep the top 30% by score", "keep C rows of each language") becomes a per-part
decision through :func:`kth_smallest`: every part writes the sorted keys of its rows (a score, or a
seeded per-row uniform from :func:`~sigscale.curation.balance.row_uniforms`) to a ``.npy`` file;
one task (:func:`cut_at`) maps all of them and bisects the 64-bit key range for the k-th smallest
key K, touching only O(64 · parts · log rows) pages, and writes K and each part's share of the keys
equal to K. A part then keeps its rows with a key below K and, of the rows equal to K, its share
(parts are contiguous row ranges, so this is "ties go to the smaller row id"). Nothing depends on
how the rows are cut into parts, and a part's task reads one small file, not every part's keys.

Shards are cut from the kept rows in row order at global boundaries (shard s holds kept rows
s·S .. s·S+S-1), so their contents do not depend on the parts either. The images come from
img2dataset's own tars (:class:`TarImages`), where they were written once.
"""
from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sigscale.curation.balance import balance_keys, target_counts
from sigscale.curation.config import BalanceConfig

_TOP = (1 << 64) - 1


def descending_keys(scores: np.ndarray) -> np.ndarray:
    """uint64 keys that sort float64 scores from highest to lowest (NaN last)."""
    bits = np.asarray(scores, np.float64).view(np.uint64)
    sign = np.uint64(1 << 63)
    ascending = np.where(bits & sign, ~bits, bits | sign)  # the IEEE order as unsigned integers
    keys = ~ascending
    keys[np.isnan(scores)] = np.uint64(_TOP)
    return keys


def sorted_keys(keys: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(keys, rows) sorted by key, then row: the order the selection rule reads a part in."""
    order = np.lexsort((rows, keys))
    return keys[order], rows[order]


def kth_smallest(arrays: Sequence[np.ndarray], k: int) -> Optional[int]:
    """The k-th smallest value (1-based) over sorted uint64 arrays; None when k exceeds their total."""
    if k <= 0 or k > sum(len(a) for a in arrays):
        return None
    lo, hi = 0, _TOP
    while lo < hi:  # the smallest v with at least k values <= v
        mid = (lo + hi) // 2
        if sum(int(np.searchsorted(a, np.uint64(mid), "right")) for a in arrays) >= k:
            hi = mid
        else:
            lo = mid + 1
    return lo


def ties_taken(arrays: Sequence[np.ndarray], k: int, cutoff: Optional[int]) -> List[int]:
    """Per array (in part order): how many of its keys equal to ``cutoff`` are kept so that k are kept in all."""
    if cutoff is None:
        return [len(a) for a in arrays]  # nothing is cut: every key is kept
    below = [int(np.searchsorted(a, np.uint64(cutoff), "left")) for a in arrays]
    equal = [int(np.searchsorted(a, np.uint64(cutoff), "right")) - b for a, b in zip(arrays, below)]
    need, out = k - sum(below), []
    for e in equal:
        out.append(min(e, max(need, 0)))
        need -= out[-1]
    return out


def keep_smallest(keys: np.ndarray, rows: np.ndarray, cutoff: Optional[int], ties: int,
                  k: Optional[int] = None) -> np.ndarray:
    """Mask over one part's (unsorted) rows: key below ``cutoff``, or one of the first ``ties`` rows equal to it.

    ``cutoff`` None means every row is kept, unless k == 0 (then none is).
    """
    if cutoff is None:
        return np.full(len(keys), k != 0)
    keep = keys < np.uint64(cutoff)
    equal = np.flatnonzero(keys == np.uint64(cutoff))
    keep[equal[np.argsort(rows[equal], kind="stable")[:ties]]] = True
    return keep


def language_keys(rows: np.ndarray, langs: np.ndarray, seed: int) -> Tuple[np.ndarray, Dict[str, List[int]]]:
    """A part's balance keys sorted by (language, key, row), and each language's [start, end) in them."""
    keys, offsets, pieces, at = balance_keys(rows, seed), {}, [], 0
    for lang in sorted(set(langs.tolist())):
        mine = langs == lang
        pieces.append(sorted_keys(keys[mine], rows[mine])[0])
        offsets[lang] = [at, at + len(pieces[-1])]
        at += len(pieces[-1])
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.uint64)), offsets


def cut_at(arrays: Sequence[np.ndarray], k: int) -> dict:
    """The rule "keep the k smallest keys over all parts" as each part applies it: the cutoff key and, per
    part, how many of the keys equal to it it keeps. Computed once (a single task), read by every part."""
    cutoff = kth_smallest(arrays, k)
    return {"k": k, "cutoff": cutoff, "ties": ties_taken(arrays, k, cutoff)}


def keep_by_cut(keys: np.ndarray, rows: np.ndarray, cut: dict, index: int) -> np.ndarray:
    """Keep-mask of part ``index``'s (unsorted) rows under a :func:`cut_at` rule."""
    return keep_smallest(keys, rows, cut["cutoff"], cut["ties"][index], cut["k"])


def language_cuts(offsets: Sequence[Dict[str, List[int]]], mapped: Sequence[np.ndarray],
                  cfg: BalanceConfig) -> Dict[str, dict]:
    """Per language over target: the :func:`cut_at` rule keeping its target-many smallest balance keys,
    from every part's sorted keys and offsets (:func:`language_keys`); the totals are their summed counts."""
    totals: Counter = Counter()
    for off in offsets:
        totals.update({lang: end - start for lang, (start, end) in off.items()})
    cuts = {}
    for lang, target in sorted(target_counts(dict(totals), cfg).items()):
        if target < totals[lang]:
            cuts[lang] = cut_at([m[slice(*off.get(lang, (0, 0)))] for m, off in zip(mapped, offsets)], target)
    return cuts


def language_keep(rows: np.ndarray, langs: np.ndarray, index: int, cuts: Dict[str, dict], seed: int) -> np.ndarray:
    """Keep-mask of part ``index``'s rows under cap/temperature balance: each language's :func:`language_cuts` rule."""
    keys = balance_keys(rows, seed)
    keep = np.ones(len(rows), dtype=bool)
    for lang, cut in cuts.items():
        mine = langs == lang
        keep[mine] = keep_by_cut(keys[mine], rows[mine], cut, index)
    return keep


class TarImages:
    """The images of img2dataset webdataset tars by (shard, key), read without unpacking; one tar open at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._shard: Optional[str] = None
        self._index: Dict[str, Tuple[int, int]] = {}
        self._file = None

    def get(self, shard: str, key: str) -> bytes:
        """The jpg bytes of sample ``key`` in ``shard``.tar."""
        if shard != self._shard:
            self.close()
            path = self.folder / f"{shard}.tar"
            with tarfile.open(path) as tar:  # headers only: the index maps each jpg to its bytes in the file
                self._index = {m.name[:-4]: (m.offset_data, m.size) for m in tar if m.isfile() and m.name.endswith(".jpg")}
            self._file, self._shard = open(path, "rb"), shard
        offset, size = self._index[key]
        self._file.seek(offset)
        return self._file.read(size)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._shard = None, None

    def __enter__(self) -> "TarImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
