"""The image stage: size, aspect, bytes and decode checks, perceptual hashes, near-duplicates, decontamination.

Near-duplicates are pairs whose 64-bit pHashes (imagehash.phash: 32x32 luminance DCT, 8x8 low
frequencies) differ in at most ``phash_threshold`` bits and, since pHash ignores colour, whose
16x16 RGB thumbnails differ by at most ``thumb_max_diff`` on average. On the generated corpus
(4000 images + 300 re-encoded, resized copies, measured here) pHash alone at distance <= 8 finds
8331 pairs of distinct images, with the thumbnail check 0, while 299 of 300 copies are still found.

Pairs are found by comparing all pairs in blocks with ``np.bitwise_count`` up to ~4e8 pairs and
beyond that with multi-index hashing (Norouzi et al., CVPR 2012): the hash is cut into 4 bands of
16 bits; two hashes within distance t agree within t // 4 bits on at least one band, so only
hashes in the neighbourhood of a band value are compared.
"""
from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from sigscale.curation.config import ImageConfig

IMAGE_TOO_SMALL = "image_too_small"
IMAGE_ASPECT = "image_aspect"
IMAGE_BYTES = "image_bytes"
IMAGE_DECODE = "image_decode"
IMAGE_REASONS = (IMAGE_TOO_SMALL, IMAGE_ASPECT, IMAGE_BYTES, IMAGE_DECODE)
THUMB = 16
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ALL_PAIRS_MAX = 400_000_000
_BANDS, _BAND_BITS = 4, 16


def hash_image(source: bytes | Path) -> Tuple[int, bytes]:
    """64-bit pHash and 16x16 RGB thumbnail of an image; raises OSError/ValueError if it does not decode."""
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
        # JPEG: decode at 1/2..1/8 scale when the image is much larger than the hash needs (~1.6x faster).
        img.draft("RGB", (64, 64))
        img = img.convert("RGB")
        thumb = np.asarray(img.resize((THUMB, THUMB), Image.BOX), dtype=np.uint8).tobytes()
        bits = imagehash.phash(img).hash
    return int.from_bytes(np.packbits(bits).tobytes(), "big"), thumb


def expand_ranges(lo: np.ndarray, hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(query index, position) for every position in each half-open range [lo, hi)."""
    counts = hi - lo
    q = np.repeat(np.arange(len(lo)), counts)
    pos = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)
    return q, pos


def _pairs_all(a: np.ndarray, b: np.ndarray, threshold: int, self_pairs: bool, block: int = 2048):
    out_i, out_j = [], []
    for start in range(0, len(a), block):
        d = np.bitwise_count(a[start:start + block, None] ^ b[None, :])
        i, j = np.nonzero(d <= threshold)
        i += start
        if self_pairs:
            keep = i < j
            i, j = i[keep], j[keep]
        out_i.append(i)
        out_j.append(j)
    return out_i, out_j


def _pairs_index(a: np.ndarray, b: np.ndarray, threshold: int, self_pairs: bool, block: int = 4096):
    radius = threshold // _BANDS
    masks = np.array([sum(1 << k for k in bits) for r in range(radius + 1)
                      for bits in itertools.combinations(range(_BAND_BITS), r)], dtype=np.int64)
    out_i, out_j = [], []
    for band in range(_BANDS):
        shift = np.uint64(band * _BAND_BITS)
        keys = ((b >> shift) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        for start in range(0, len(a), block):
            qa = ((a[start:start + block] >> shift) & np.uint64(0xFFFF)).astype(np.int64)
            for mask in masks:
                q = qa ^ mask
                qi, pos = expand_ranges(np.searchsorted(keys, q, "left"), np.searchsorted(keys, q, "right"))
                i, j = qi + start, order[pos]
                close = np.bitwise_count(a[i] ^ b[j]) <= threshold
                if self_pairs:
                    close &= i < j
                out_i.append(i[close])
                out_j.append(j[close])
    return out_i, out_j


def close_pairs(a: np.ndarray, b: Optional[np.ndarray], threshold: int, method: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """All (i, j) with Hamming(a[i], b[j]) <= threshold, sorted by (j, i); b=None pairs a with itself, i < j."""
    a = np.asarray(a, dtype=np.uint64)
    self_pairs = b is None
    b = a if b is None else np.asarray(b, dtype=np.uint64)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if method == "auto":
        method = "all_pairs" if len(a) * len(b) <= ALL_PAIRS_MAX else "index"
    find = {"all_pairs": _pairs_all, "index": _pairs_index}[method]
    out_i, out_j = find(a, b, threshold, self_pairs)
    i, j = np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)
    pairs = np.unique(np.stack([j, i], axis=1), axis=0)  # sorted by j, then i; index may repeat a pair
    return pairs[:, 1], pairs[:, 0]


def same_colours(thumbs_a: np.ndarray, thumbs_b: np.ndarray, i: np.ndarray, j: np.ndarray, limit: float) -> np.ndarray:
    """Whether thumbs_a[i] and thumbs_b[j] differ by at most ``limit`` on average (a negative limit: always)."""
    if limit < 0:
        return np.ones(len(i), dtype=bool)
    diff = np.abs(thumbs_a[i].astype(np.int16) - thumbs_b[j].astype(np.int16)).mean(axis=1)
    return diff <= limit


def near_duplicates(hashes: np.ndarray, thumbs: np.ndarray, threshold: int, thumb_max_diff: float,
                    method: str = "auto") -> np.ndarray:
    """Mask of items to drop: each item close to any earlier item, kept or not.

    Judging pairs only (not against the items an earlier decision kept) makes the result
    independent of how the items are split into partitions (see :mod:`sigscale.curation.partitions`).
    """
    dropped = np.zeros(len(hashes), dtype=bool)
    if threshold < 0:
        return dropped
    i, j = close_pairs(hashes, None, threshold, method)
    dropped[j[same_colours(thumbs, thumbs, i, j, thumb_max_diff)]] = True
    return dropped


def contaminated(hashes: np.ndarray, thumbs: np.ndarray, eval_hashes: np.ndarray, eval_thumbs: np.ndarray,
                 threshold: int, thumb_max_diff: float, method: str = "auto") -> np.ndarray:
    """Mask of training items that are near-duplicates of any evaluation image."""
    hit = np.zeros(len(hashes), dtype=bool)
    if threshold < 0 or len(eval_hashes) == 0:
        return hit
    i, j = close_pairs(hashes, eval_hashes, threshold, method)
    ok = same_colours(thumbs, eval_thumbs, i, j, thumb_max_diff)
    hit[i[ok]] = True
    return hit


def eval_images(folders: Iterable[str | Path]) -> List[Path]:
    """Every image file under the given folders (ImageFolder trees, XM3600's images/), sorted."""
    return sorted(p for f in folders for p in Path(f).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def hash_files(paths: List[Path]) -> Tuple[np.ndarray, np.ndarray, List[Path]]:
    """Hashes and thumbnails of image files; files that do not decode are returned separately."""
    hashes, thumbs, bad = [], [], []
    for p in paths:
        try:
            h, t = hash_image(p)
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(p)
            continue
        hashes.append(h)
        thumbs.append(np.frombuffer(t, np.uint8))
    return (np.array(hashes, dtype=np.uint64),
            np.stack(thumbs) if thumbs else np.zeros((0, THUMB * THUMB * 3), np.uint8), bad)


def read_tar(path: Path) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of an img2dataset webdataset tar, in file order."""
    with tarfile.open(path) as tar:
        key, sample = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.partition(".")
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = tar.extractfile(member).read()
        if sample:
            yield key, sample


def check_images(results: pd.DataFrame, shards_dir: Path, cfg: ImageConfig,
                 samples: Optional[Dict[str, List[Tuple[int, bytes]]]] = None,
                 per_reason: int = 0) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Per-image checks on downloaded rows (reason None); returns (candidates, drops).

    Candidates hold row, jpg, shard, key (where the jpg is), width, height, nbytes, phash, thumb; drops hold
    row, reason.
    ``samples`` (reason -> [(row, jpg)]) receives the first ``per_reason`` dropped images of each
    reason, for the report: the downloads are gone once the part is done.
    """
    ok = results[results["reason"].isna()]
    wanted = dict(zip(zip(ok["shard"], ok["key"]), zip(ok["row"], ok["original_width"], ok["original_height"])))
    kept, drops = [], []
    for shard in sorted(set(ok["shard"])):
        for key, sample in read_tar(Path(shards_dir) / f"{shard}.tar"):
            if (shard, key) not in wanted or "jpg" not in sample:
                continue
            row, ow, oh = wanted.pop((shard, key))
            data = sample["jpg"]
            reason = None
            if min(ow, oh) < cfg.min_side:
                reason = IMAGE_TOO_SMALL
            elif max(ow, oh) / max(1, min(ow, oh)) > cfg.max_aspect:
                reason = IMAGE_ASPECT
            elif len(data) < cfg.min_bytes or (cfg.max_bytes and len(data) > cfg.max_bytes):
                reason = IMAGE_BYTES
            else:
                try:
                    phash, thumb = hash_image(data)
                    meta = json.loads(sample.get("json", b"{}"))
                except (OSError, ValueError, Image.DecompressionBombError):
                    reason = IMAGE_DECODE
            if reason:
                drops.append((row, reason))
                if samples is not None and len(samples.setdefault(reason, [])) < per_reason:
                    samples[reason].append((row, data))
                continue
            kept.append({"row": row, "jpg": data, "shard": shard, "key": key, "width": meta.get("width"), "height": meta.get("height"),
                         "original_width": int(ow), "original_height": int(oh), "nbytes": len(data),
                         "phash": np.uint64(phash), "thumb": thumb})
    # A row img2dataset reported as a success whose image is not in its tar: counted, not lost.
    drops += [(row, "download_missing") for row, _, _ in wanted.values()]
    candidates = pd.DataFrame(kept, columns=["row", "jpg", "shard", "key", "width", "height", "original_width", "original_height",
                                             "nbytes", "phash", "thumb"])
    candidates["phash"] = candidates["phash"].astype(np.uint64)
    return (candidates.sort_values("row").reset_index(drop=True),
            pd.DataFrame(drops, columns=["row", "reason"]).astype({"row": np.int64}))
