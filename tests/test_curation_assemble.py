"""The per-part finalize rules: a global "k smallest" from parts' sorted keys, the same for any cut into parts."""
import io
import json
import tarfile

import numpy as np
import pytest

from sigscale.curation.assemble import (TarImages, cut_at, descending_keys, keep_by_cut, language_cuts, language_keep,
                                        language_keys, sorted_keys)
from sigscale.curation.balance import balance, balance_keys
from sigscale.curation.config import BalanceConfig


def select_in_parts(keys: np.ndarray, rows: np.ndarray, k: int, cuts) -> np.ndarray:
    """Rows kept by the per-part rule when rows (ascending) are cut into contiguous parts at ``cuts``."""
    bounds = [0, *cuts, len(rows)]
    parts = [(keys[a:b], rows[a:b]) for a, b in zip(bounds, bounds[1:])]
    cut = json.loads(json.dumps(cut_at([sorted_keys(kk, rr)[0] for kk, rr in parts], k)))  # as the cut step writes it
    return np.concatenate([rr[keep_by_cut(kk, rr, cut, i)] for i, (kk, rr) in enumerate(parts)])


def reference(keys: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """One process: sort by (key, row), keep the first k."""
    return np.sort(rows[np.lexsort((rows, keys))[:k]])


@pytest.mark.parametrize("k", [0, 1, 37, 500, 999, 1000, 1500])
def test_k_smallest_over_parts_equals_one_sort_for_any_cut_with_many_ties(k):
    rng = np.random.default_rng(k)
    rows = np.arange(1000, dtype=np.int64)
    keys = rng.integers(0, 20, 1000).astype(np.uint64)  # 20 values: every cutoff falls in a run of ties
    want = reference(keys, rows, k)
    for cuts in ([], [500], [1, 2, 3, 999], sorted(rng.choice(np.arange(1, 1000), 9, replace=False))):
        assert np.array_equal(np.sort(select_in_parts(keys, rows, k, cuts)), want)


def test_k_smallest_handles_the_full_64_bit_range():
    rows = np.arange(6, dtype=np.int64)
    keys = np.array([2 ** 64 - 1, 0, 2 ** 63, 2 ** 64 - 2, 5, 2 ** 64 - 1], dtype=np.uint64)
    for k in range(7):
        assert np.array_equal(np.sort(select_in_parts(keys, rows, k, [2, 3])), reference(keys, rows, k))


def test_descending_keys_order_scores_high_to_low_with_nan_last():
    scores = np.array([0.5, -1.0, 0.9, np.nan, -0.0, 0.0, 1e-300, -np.inf, np.inf])
    order = np.argsort(descending_keys(scores), kind="stable")
    assert scores[order][:-1].tolist() == sorted(scores[~np.isnan(scores)].tolist(), reverse=True)
    assert np.isnan(scores[order][-1])


def test_top_fraction_by_score_keeps_the_best_rows_ties_to_the_smaller_row():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4, 0.3, 0.3])
    rows = np.arange(len(scores))
    kept = select_in_parts(descending_keys(scores), rows, 8, [4, 7])  # 0.3 ties at rows 3, 4, 10, 11: two kept
    assert sorted(kept.tolist()) == [0, 2, 3, 4, 5, 7, 8, 9]


def test_language_balance_keeps_the_same_rows_in_any_order_and_across_parts():
    rng = np.random.default_rng(0)
    langs = np.array(["en"] * 600 + ["de"] * 300 + ["fr"] * 100)[rng.permutation(1000)]
    rows = np.arange(1000) * 3 + 7  # row ids need not be contiguous
    cfg = BalanceConfig(mode="cap", max_fraction=0.4, seed=3)
    keep = balance(langs, cfg, rows)
    assert {lang: int((langs[keep] == lang).sum()) for lang in ("en", "de", "fr")} == {"en": 200, "de": 200, "fr": 100}
    order = rng.permutation(1000)
    assert np.array_equal(balance(langs[order], cfg, rows[order]), keep[order])
    en = langs == "en"
    in_parts = select_in_parts(balance_keys(rows[en], cfg.seed), rows[en], 200, [150, 151, 420])
    assert np.array_equal(np.sort(in_parts), np.sort(rows[keep & en]))


@pytest.mark.parametrize("cuts", [[], [333], [1, 2, 500, 998]])
def test_language_cuts_computed_once_keep_what_one_process_keeps(cuts):
    rng = np.random.default_rng(1)
    langs = np.array(["en"] * 600 + ["de"] * 300 + ["fr"] * 100)[rng.permutation(1000)]
    rows = np.arange(1000) * 2 + 5
    cfg = BalanceConfig(mode="cap", max_fraction=0.4, seed=3)
    bounds = [0, *cuts, 1000]
    parts = [(rows[a:b], langs[a:b]) for a, b in zip(bounds, bounds[1:])]
    written = [language_keys(r, lang, cfg.seed) for r, lang in parts]  # each part's count step
    rules = json.loads(json.dumps(language_cuts([o for _, o in written], [k for k, _ in written], cfg)))
    assert set(rules) == {"en", "de"} and [rules[x]["k"] for x in ("en", "de")] == [200, 200]  # fr is under its cap
    kept = np.concatenate([language_keep(r, lang, i, rules, cfg.seed) for i, (r, lang) in enumerate(parts)])
    assert np.array_equal(kept, balance(langs, cfg, rows))


def test_tar_images_reads_each_jpg_by_shard_and_key(tmp_path):
    blobs = {f"{i:09d}": bytes([i]) * (i * 97 + 1) for i in range(5)}
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, data in blobs.items():
            for ext, payload in (("jpg", data), ("txt", b"caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with TarImages(tmp_path) as images:
        assert all(images.get("00000", key) == data for key, data in reversed(blobs.items()))
