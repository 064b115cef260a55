"""Curation concept balancing (MetaCLIP): substring matching, per-entry caps, seeded per-row sampling."""
import numpy as np
import pytest

from sigscale.core.config import ConfigError
from sigscale.curation.balance import load_metadata, match_entries, metadata_balance, row_uniforms
from sigscale.curation.config import BalanceConfig, CurationError, load_curation_config

# Entry -> captions mentioning it: a long-tailed list (MetaCLIP's head/tail picture in miniature).
EN_COUNTS = {"alpha": 3000, "bravo": 1200, "charlie": 400, "delta": 100, "echo": 30, "foxtrot": 5}
T = 100
UNMATCHED = 20


def entries_file(tmp_path, lang, entries):
    path = tmp_path / f"entries_{lang}.txt"
    path.write_text("\n".join(entries) + "\n\n", encoding="utf-8")
    return str(path)


def long_tailed_list():
    """(rows, captions, languages): one entry per caption, a few captions with two, some with none."""
    captions = [f"a photo of {entry} on a table" for entry, n in EN_COUNTS.items() for _ in range(n)]
    captions += ["Alpha and foxtrot together"] * 4  # two entries, mixed case: foxtrot (the rarer) decides
    captions += ["a photo of nothing known"] * UNMATCHED
    rows = np.arange(len(captions), dtype=np.int64) * 7 + 3  # row ids of an input list, not positions
    return rows, captions, ["en"] * len(captions)


def test_head_entries_are_capped_at_about_t_and_the_tail_is_kept_whole(tmp_path):
    cfg = BalanceConfig(mode="metadata", metadata={"en": entries_file(tmp_path, "en", EN_COUNTS)}, threshold=T, seed=1)
    rows, captions, langs = long_tailed_list()
    keep, unmatched, summary = metadata_balance(rows, captions, langs, cfg)
    assert unmatched.sum() == UNMATCHED and not keep[unmatched].any()
    caps = np.array(captions)
    for entry, n in EN_COUNTS.items():
        kept = keep[caps == f"a photo of {entry} on a table"].sum()
        if n <= T:  # tail: min(1, t / n) = 1
            assert kept == n, (entry, kept)
        else:  # head: Binomial(n, t / n), mean t, sd sqrt(t (1 - t / n)) < 10; within 4 sd
            assert abs(kept - T) <= 40, (entry, kept)
    assert keep[caps == "Alpha and foxtrot together"].all()  # foxtrot matched 9 times: probability 1
    # Exactly the algorithm: keep iff u(seed, row) < min(1, t / count of the rarest matched entry).
    count = {e: n for e, n in EN_COUNTS.items()}
    count["alpha"] += 4
    count["foxtrot"] += 4
    p = np.array([min(1.0, T / min(count[e] for e in EN_COUNTS if e in c.lower())) if any(e in c.lower() for e in EN_COUNTS)
                  else 0.0 for c in captions])
    assert np.array_equal(keep, row_uniforms(rows, 1) < p)
    en = summary["en"]
    assert en["entries"] == 6 and en["captions_matched"] == len(captions) - UNMATCHED and en["kept"] == keep.sum()
    assert en["head"][0][:2] == ["alpha", 3004] and en["head"][-1][:2] == ["echo", 30]


def test_sampling_is_seeded_per_row_and_independent_of_order(tmp_path):
    cfg = BalanceConfig(mode="metadata", metadata={"en": entries_file(tmp_path, "en", EN_COUNTS)}, threshold=T, seed=5)
    rows, captions, langs = long_tailed_list()
    keep, _, _ = metadata_balance(rows, captions, langs, cfg)
    order = np.random.default_rng(0).permutation(len(rows))
    shuffled, _, _ = metadata_balance(rows[order], [captions[i] for i in order], [langs[i] for i in order], cfg)
    assert set(rows[order][shuffled]) == set(rows[keep])
    other, _, _ = metadata_balance(rows, captions, langs, BalanceConfig(**{**cfg.__dict__, "seed": 6}))
    assert not np.array_equal(other, keep) and abs(int(other.sum()) - int(keep.sum())) < 120


def test_row_uniforms_are_uniform():
    u = row_uniforms(np.arange(100_000), seed=0)
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.abs(counts - 10_000).max() < 500  # sd 95 per bin: 5 sd
    assert np.array_equal(row_uniforms([7, 8], 0), u[[7, 8]])


def test_each_language_has_its_entries_and_threshold(tmp_path):
    cfg = BalanceConfig(mode="metadata", threshold=1000, thresholds={"de": 10},
                        metadata={"en": entries_file(tmp_path, "en", ["circle"]),
                                  "de": entries_file(tmp_path, "de", ["kreis"]),
                                  "zh": entries_file(tmp_path, "zh", ["圆形"])})
    captions = ["a red circle"] * 50 + ["zwei Kreise in Rot"] * 50 + ["两个红色的圆形"] * 5 + ["un cercle rouge"] * 5
    langs = ["en"] * 50 + ["de"] * 50 + ["zh"] * 5 + ["fr"] * 5
    assert [len(ids) for ids in match_entries(["a circle", "圆形和圆形", "circle"], ["en", "zh", "de"],
                                              load_metadata(cfg))] == [1, 1, 0]  # per language, once per caption
    keep, unmatched, summary = metadata_balance(np.arange(110), captions, langs, cfg)
    assert keep[:50].all() and keep[100:105].all()  # under t: everything stays
    assert 2 <= keep[50:100].sum() <= 22  # Binomial(50, 10/50): mean 10, sd 2.8
    assert unmatched.tolist() == [False] * 105 + [True] * 5  # no French entries: French matches nothing
    assert summary["de"]["threshold"] == 10 and summary["en"]["threshold"] == 1000


def test_metadata_settings_are_checked(tmp_path):
    base = ["input.path=urls.parquet", "output.dir=out", "balance.mode=metadata"]
    with pytest.raises(ConfigError, match=r"balance.mode=metadata needs balance.metadata"):
        load_curation_config(None, base)
    with pytest.raises(ConfigError, match=r"balance.metadata.en file .*nope.txt does not exist"):
        load_curation_config(None, base + [f"balance.metadata.en={tmp_path / 'nope.txt'}"])
    good = entries_file(tmp_path, "en", ["circle"])
    with pytest.raises(ConfigError, match=r"balance.thresholds names language\(s\) \['de'\] without"):
        load_curation_config(None, base + [f"balance.metadata.en={good}", "balance.thresholds.de=5"])
    with pytest.raises(ConfigError, match=r"balance.threshold=0 must be a positive"):
        load_curation_config(None, base + [f"balance.metadata.en={good}", "balance.threshold=0"])
    empty = entries_file(tmp_path, "de", [" "])
    with pytest.raises(CurationError, match=r"balance.metadata.de file .* holds no entries"):
        load_metadata(BalanceConfig(mode="metadata", metadata={"de": empty}))
