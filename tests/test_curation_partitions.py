"""Partitioned finalize: pHash bands, near-duplicates and decontamination per partition, equal for every partition count."""
import itertools

import numpy as np
import pandas as pd
import pytest

from sigscale.curation.image_filters import contaminated, near_duplicates
from sigscale.curation.partitions import (EVAL_DUPLICATE, NEAR_DUPLICATE, PAIRS_PER_BLOCK, _close_pairs_sorted,
                                          band_layout, band_values, partition_drops, scatter)
from sigscale.curation.bench import planted_candidates, render_finalize_markdown, run_finalize_bench

THRESHOLD, THUMB_DIFF = 8, 3.0
WRITERS = 3


def run_partitioned(frame: pd.DataFrame, folder, partitions: int, threshold: int = THRESHOLD, eval_set=None,
                    block: int = PAIRS_PER_BLOCK) -> pd.Series:
    for w in range(WRITERS):
        scatter(frame.iloc[w::WRITERS], folder, w, partitions, threshold)
    drops = [partition_drops(folder, k, threshold, THUMB_DIFF, eval_set, block) for k in range(partitions)]
    return pd.concat(drops).drop_duplicates("row").set_index("row")["reason"].sort_index()


@pytest.mark.parametrize("threshold", [0, 3, 8, 20, 63])
def test_bands_cover_64_bits_and_close_pairs_share_one(threshold):
    layout = band_layout(threshold)
    assert len(layout) == threshold + 1 and sum(w for _, w in layout) == 64
    assert [s for s, _ in layout] == list(itertools.accumulate([0] + [w for _, w in layout[:-1]]))
    rng = np.random.default_rng(threshold)
    a = rng.integers(0, 2 ** 63, 2000, dtype=np.uint64) * np.uint64(2)
    flips = [rng.choice(64, threshold, replace=False) for _ in a]
    b = np.array([x ^ np.uint64(sum(1 << int(f) for f in fl)) for x, fl in zip(a, flips)], dtype=np.uint64)
    shared = np.zeros(len(a), bool)
    for shift, width in layout:
        shared |= band_values(a, shift, width) == band_values(b, shift, width)
    assert shared.all()  # pigeonhole: exactly `threshold` differing bits leave one of threshold+1 bands intact


def test_threshold_64_puts_every_row_in_one_group(tmp_path):
    frame, _ = planted_candidates(0, 50, near_fraction=0.0, seed=4)
    frame["thumb"] = [bytes(768)] * len(frame)  # same colours: every pair is a near-duplicate
    assert band_layout(64) == [(0, 0)]
    assert run_partitioned(frame, tmp_path, 3, threshold=64).index.tolist() == list(range(1, 50))


def test_planted_near_duplicates_caught_with_no_false_drops_for_any_partition_count(tmp_path):
    frame, planted = planted_candidates(0, 6000, near_fraction=0.1, seed=1)
    for p in (1, 4, 13):
        got = run_partitioned(frame, tmp_path / f"p{p}", p)
        assert set(got.index) == set(planted.tolist()) and set(got) == {NEAR_DUPLICATE}, p


def test_partitioned_equals_the_single_process_pair_rule_on_clustered_hashes(tmp_path):
    rng = np.random.default_rng(3)
    n = 2500
    hashes = rng.integers(0, 2 ** 63, n, dtype=np.uint64)
    hashes[::4] = hashes[0]  # one crowded band group in every band
    for k in range(1, n, 5):  # chains: each a few bits from the one before
        hashes[k] = hashes[k - 1] ^ np.uint64(1 << int(rng.integers(64))) ^ np.uint64(1 << int(rng.integers(64)))
    thumbs = rng.integers(0, 256, (n, 768), dtype=np.uint8)
    thumbs[::4] = thumbs[0]
    thumbs[1::5] = thumbs[0::5]
    rows = np.sort(rng.choice(10 * n, n, replace=False))
    eval_hashes, eval_thumbs = hashes[[7, 400]] ^ np.uint64(0b101), thumbs[[7, 400]]
    frame = pd.DataFrame({"row": rows, "phash": hashes, "thumb": [t.tobytes() for t in thumbs]}).sample(frac=1, random_state=0)
    want = pd.Series(None, index=rows, dtype=object)
    hit = contaminated(hashes, thumbs, eval_hashes, eval_thumbs, THRESHOLD, THUMB_DIFF)
    want[hit] = EVAL_DUPLICATE
    alive = np.flatnonzero(~hit)
    want.iloc[alive[near_duplicates(hashes[alive], thumbs[alive], THRESHOLD, THUMB_DIFF)]] = NEAR_DUPLICATE
    want = want.dropna()
    assert want.value_counts().to_dict()[NEAR_DUPLICATE] > 300 and len(want[want == EVAL_DUPLICATE]) >= 2
    for p in (1, 2, 7, 64):
        got = run_partitioned(frame, tmp_path / f"p{p}", p, eval_set=(eval_hashes, eval_thumbs))
        pd.testing.assert_series_equal(got, want, check_names=False, check_index_type=False)


def test_partition_task_verifies_big_band_groups_in_bounded_blocks(tmp_path, monkeypatch):
    frame, planted = planted_candidates(0, 3000, near_fraction=0.2, seed=2)
    frame.loc[:, "phash"] = frame["phash"].to_numpy(np.uint64) & np.uint64(0xFFFFFFFFFFFFFF00)  # one 8-bit band shared
    want = run_partitioned(frame, tmp_path / "one", 1)
    pd.testing.assert_series_equal(run_partitioned(frame, tmp_path / "small", 1, block=997), want)
    monkeypatch.setattr("sigscale.curation.partitions.VERIFY_PAIRS", 7)  # thumbnails read in many small gathers
    pd.testing.assert_series_equal(run_partitioned(frame, tmp_path / "gathers", 1, block=997), want)
    assert set(want.index) == set(planted.tolist())


def test_finalize_bench_runs_each_task_in_its_own_process_and_reports_recall():
    result = run_finalize_bench(6000, threshold=3, rows_per_writer=3000, copies_per_partition=12000, near_fraction=0.1,
                                rows_per_dedup_partition=2500)
    exact = result["exact"]  # copies of originals anywhere earlier in the list, found across parts and partitions
    assert exact["partitions"] == exact["dedup"]["tasks"] == 3 and exact["keys"]["tasks"] == 2
    assert 200 < exact["planted"] == exact["caught"] and exact["false_drops"] == 0
    assert exact["rows_per_partition_max"] < 6000 and exact["dedup"]["peak_rss_mib_max"] > 0
    assert (result["partitions"], result["writers"], result["scatter"]["tasks"], result["near"]["tasks"]) == (2, 2, 2, 2)
    assert result["planted"] == result["caught"] == 600 and result["false_drops"] == 0
    assert result["balance_kept"] == result["balance_target"] < 6000  # the cap cut rows, exactly to its target
    assert result["balance_decide"]["tasks"] == 2 and result["balance_decide"]["peak_rss_mib_max"] > 0
    assert result["near"]["peak_rss_mib_max"] > 0 and result["rows_per_second"] > 0
    table = render_finalize_markdown([result], "sigscale bench curation --rows 6000")
    assert "| 6,000 | 3 | 4 | 2 | 2 |" in table and "| 600 / 600 | 0 |" in table
    assert f"| 6,000 | 3 | {exact['rows_per_partition_max']:,} |" in table
    assert f"| {exact['planted']:,} / {exact['planted']:,} | 0 |" in table


def test_plan_bench_runs_the_pipeline_planner_and_dedup_on_a_generated_url_list():
    from sigscale.curation.bench import render_plan_markdown, run_plan_bench

    result = run_plan_bench(12000, rows_per_file=7000, rows_per_part=4000, rows_per_dedup_partition=6000)
    assert (result["files"], result["parts"], result["partitions"], result["dedup"]["tasks"]) == (2, 3, 2, 2)
    assert result["plan"]["tasks"] == 2 and result["plan_rows_per_task_second"] > 0  # a plan task per file
    # Copies of originals in other files and parts, some respaced: all caught by the pipeline's own dedup.
    assert 400 < result["planted"] == result["caught"] and result["false_drops"] == 0
    assert result["plan"]["peak_rss_mib_max"] > 0 and result["dedup"]["rows_per_second"] > 0
    table = render_plan_markdown([result], "sigscale bench curation --rows 12000 --sections plan")
    assert (f"| 12,000 | 2 | 3 | 2 | 2 | {result['layout']['wall_seconds']} | {result['plan']['peak_rss_mib_max']} "
            f"| {result['plan']['rows_per_second']:,} |") in table
    assert f"| {result['planted']:,} / {result['planted']:,} | 0 |" in table
    # A csv list: the layout parses the two files to count them (over two processes), the plan tasks again.
    csv = run_plan_bench(6000, rows_per_file=3000, rows_per_part=4000, rows_per_dedup_partition=6000,
                         list_format="csv")
    assert (csv["files"], csv["parts"], csv["list_format"]) == (2, 2, "csv")
    assert 200 < csv["planted"] == csv["caught"] and csv["false_drops"] == 0


def test_a_quadratic_near_duplicate_search_is_announced_with_its_fix(capsys):
    from sigscale.curation.config import load_curation_config
    from sigscale.curation.partitions import PAIRS_PER_SECOND, chance_pairs
    from sigscale.curation.pipeline import _warn_quadratic_near

    # h = 3: four 16-bit bands, each pair of rows shares one with probability 4 / 2^16.
    assert chance_pairs(20_000_000, 3) == pytest.approx(4 * 20e6 ** 2 / 2 ** 17)
    assert chance_pairs(1000, 64) == pytest.approx(1000 ** 2 / 2)  # one band of no bits: every pair
    cfg = load_curation_config("default", ["input.path=x", "output.dir=y"])  # phash_threshold 8: 7-bit bands
    _warn_quadratic_near(cfg, 1_000_000)
    assert capsys.readouterr().out == ""  # 3.5e10 pairs: ~2 CPU-minutes
    _warn_quadratic_near(cfg, 10_000_000)
    out = capsys.readouterr().out
    assert "near-duplicates at image.phash_threshold=8 over 10,000,000 candidates compare at least 3.5e+12" in out
    assert "about 3.5 CPU-hour(s)" in out and "more tasks (output.finalize_partitions)" in out
    # the lower thresholds' reach follows from the same formula: N = sqrt(3600 s * rate * 2^(w+1) / bands)
    assert f"3: 16-bit bands, a CPU-hour of chance pairs at ~{(3600 * PAIRS_PER_SECOND * 2 ** 17 / 4) ** 0.5:.2g}" in out


def test_partition_counts_too_small_for_the_list_are_announced_with_their_fix(capsys):
    from sigscale.curation.config import load_curation_config
    from sigscale.curation.plan import warn_partition_sizes

    cfg = load_curation_config("default", ["input.path=x", "output.dir=y"])  # 1 and 1 partitions, h = 8: 9 bands
    warn_partition_sizes(cfg, 600_000)
    assert capsys.readouterr().out == ""  # 5.4M band copies: one task of each holds it
    warn_partition_sizes(cfg, 50_000_000)
    out = capsys.readouterr().out
    assert "50,000,000 rows in 1 exact-dedup partition(s): each dedup task holds ~5.1 GiB; set " \
           "output.dedup_partitions=3 (one per 20,000,000 rows" in out
    assert "up to 450,000,000 pHash band copies (9 per candidate) in 1 near-duplicate partition(s)" in out
    assert "set output.finalize_partitions=75" in out
    cfg = load_curation_config("default", ["input.path=x", "output.dir=y", "output.dedup_partitions=3",
                                           "output.finalize_partitions=75"])
    warn_partition_sizes(cfg, 50_000_000)
    assert capsys.readouterr().out == ""


def test_tiled_and_pairwise_comparison_find_every_close_pair_inside_groups():
    """Groups from 1 to 1,500 copies (tiles of 512 rows, blocks crossing groups) against every pair checked."""
    rng = np.random.default_rng(5)
    sizes = [1, 2, 3, 63, 64, 65, 700, 1500, 5, 1]
    base = rng.integers(0, 2 ** 63, len(sizes), dtype=np.uint64)
    # inside a group: the same top 16 bits and a few flipped low bits, so many pairs are close
    hashes = np.concatenate([(b & np.uint64(0xFFFF << 48)) | rng.integers(0, 2 ** 12, n, dtype=np.uint64)
                             for b, n in zip(base, sizes)])
    bounds = np.cumsum([0] + sizes)
    ends = np.repeat(bounds[1:], sizes)
    expected, found = set(), set()
    for a, b in zip(bounds[:-1], bounds[1:]):
        for p in range(a, b):
            d = np.bitwise_count(hashes[p] ^ hashes[p + 1:b])
            expected |= {(p, int(q)) for q in np.flatnonzero(d <= 5) + p + 1}
    compared = 0
    for p, q, n in _close_pairs_sorted(hashes, ends, 5, block=1000):
        assert (p < q).all() and (ends[p] == ends[q]).all()
        found |= set(zip(p.tolist(), q.tolist()))
        compared += n
    assert found == expected and len(expected) > 10_000
    assert compared == sum(n * (n - 1) // 2 for n in sizes)
