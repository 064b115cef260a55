"""Curation image stage: pHash near-duplicates, the index, decontamination, language balance, model scores."""
import io
import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sigscale.curation import synthetic
from sigscale.eval.xm3600 import write_xm3600
from sigscale.curation.balance import balance, target_counts
from sigscale.curation.config import BalanceConfig, CurationError, ScoreConfig
from sigscale.curation.image_filters import (
    close_pairs, contaminated, eval_images, hash_files, hash_image, near_duplicates,
)
from sigscale.curation.serve import near_duplicate


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def hashes_of(blobs):
    pairs = [hash_image(b) for b in blobs]
    return (np.array([h for h, _ in pairs], dtype=np.uint64),
            np.stack([np.frombuffer(t, np.uint8) for _, t in pairs]))


def planted_hashes(n: int, near: int, max_flips: int, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    base = [rng.getrandbits(64) for _ in range(n)]
    for _ in range(near):  # copies of random items with a few bits flipped
        h = rng.choice(base)
        for bit in rng.sample(range(64), rng.randint(0, max_flips)):
            h ^= 1 << bit
        base.append(h)
    return np.array(base, dtype=np.uint64)


@pytest.mark.parametrize("threshold", [0, 3, 8, 11])
def test_close_pairs_all_pairs_and_index_match_brute_force(threshold):
    small = planted_hashes(500, 80, threshold + 2, seed=threshold)
    ints = [int(h) for h in small]
    reference = sorted((i, j) for j in range(len(ints)) for i in range(j)
                       if bin(ints[i] ^ ints[j]).count("1") <= threshold)
    assert len(reference) >= 20
    for method in ("all_pairs", "index"):
        i, j = close_pairs(small, None, threshold, method)
        assert sorted(zip(i.tolist(), j.tolist())) == reference
    big = planted_hashes(4000, 800, threshold + 2, seed=100 + threshold)
    queries = planted_hashes(300, 0, 0, seed=7)
    queries[:50] = big[:50] ^ np.uint64(1)  # 50 queries one bit away from indexed items
    for a, b in ((big, None), (queries, big)):
        want = close_pairs(a, b, threshold, "all_pairs")
        got = close_pairs(a, b, threshold, "index")
        assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert len(close_pairs(queries, big, threshold, "index")[0]) >= (50 if threshold >= 1 else 0)


def test_near_duplicates_drop_every_item_with_an_earlier_close_item_dropped_or_not():
    a = 0
    b = a ^ 0b1111  # 4 bits from a
    c = b ^ (0b1111 << 8)  # 4 bits from b, 8 from a
    d = 0xFFFFFFFF00000000  # 32+ bits from all
    thumbs = np.zeros((4, 768), np.uint8)
    dropped = near_duplicates(np.array([a, b, c, d], dtype=np.uint64), thumbs, 5, 3.0)
    # c's only close item (b) is itself dropped; the pair rule still drops c, so no partitioning changes the answer.
    assert dropped.tolist() == [False, True, True, False]
    assert near_duplicates(np.array([a, a], dtype=np.uint64), thumbs[:2], -1, 3.0).tolist() == [False, False]


def test_near_duplicates_on_generated_images_found_and_distinct_images_kept():
    originals = [jpeg(synthetic.render(synthetic.indexed_sample(5, i)[0])) for i in range(600)]
    copies = [jpeg(near_duplicate(Image.open(io.BytesIO(originals[k]))), 85) for k in range(0, 600, 10)]
    hashes, thumbs = hashes_of(originals + copies)
    dropped = near_duplicates(hashes, thumbs, 8, 3.0)
    assert dropped[600:].sum() >= 59, dropped[600:].sum()  # measured 299/300 on 4000 images
    assert dropped[:600].sum() == 0
    # pHash sees luminance only: without the colour check, distinct scenes collide.
    assert near_duplicates(hashes, thumbs, 8, -1.0)[:600].sum() > 30


def test_hash_decodes_large_jpegs_at_reduced_size_consistently():
    img = synthetic.render(synthetic.indexed_sample(1, 1)[0], 1024)
    h_big, _ = hash_image(jpeg(img))
    h_small, _ = hash_image(jpeg(img.resize((64, 64), Image.BICUBIC)))
    assert bin(h_big ^ h_small).count("1") <= 4
    with pytest.raises(OSError):
        hash_image(b"<html>not an image</html>")


def test_decontamination_drops_eval_images_and_keeps_the_rest(tmp_path):
    folder = synthetic.write_image_folder(tmp_path / "imagenet_val", per_class=2, seed=2)
    xm = write_xm3600(tmp_path / "xm3600", synthetic.xm3600_items(24, seed=1))
    paths = eval_images([folder, xm])
    assert len(paths) == 48 + 24 and all(p.suffix == ".jpg" for p in paths)
    eval_h, eval_t, bad = hash_files(paths)
    assert not bad and len(eval_h) == 72
    # Training candidates: 12 eval images as re-uploaded elsewhere, then 300 fresh generated images.
    leaked = [jpeg(near_duplicate(Image.open(p).convert("RGB")), 80) for p in paths[::6]]
    fresh = [jpeg(synthetic.render(synthetic.indexed_sample(9, i)[0])) for i in range(300)]
    hashes, thumbs = hashes_of(leaked + fresh)
    hit = contaminated(hashes, thumbs, eval_h, eval_t, 8, 3.0)
    assert hit[:12].all() and hit[12:].sum() == 0


def test_cap_balance_numbers():
    counts = {"en": 600, "de": 300, "fr": 100}
    # C <= f * sum(min(n, C)): f=0.5 gives C=400 (400 = 0.5 * 800); f=0.4 gives C=200 (200 = 0.4 * 500).
    assert target_counts(counts, BalanceConfig(mode="cap", max_fraction=0.5)) == {"en": 400, "de": 300, "fr": 100}
    assert target_counts(counts, BalanceConfig(mode="cap", max_fraction=0.4)) == {"en": 200, "de": 200, "fr": 100}
    assert target_counts(counts, BalanceConfig(mode="cap", max_fraction=0.9)) == counts
    with pytest.raises(CurationError, match=r"balance.max_fraction=0.3 cannot hold with only 3 language\(s\).*0.333"):
        target_counts(counts, BalanceConfig(mode="cap", max_fraction=0.3))


def test_temperature_balance_numbers():
    counts = {"en": 600, "de": 300, "fr": 100}
    assert target_counts(counts, BalanceConfig(mode="temperature", temperature=1.0)) == counts
    got = target_counts(counts, BalanceConfig(mode="temperature", temperature=2.0))
    p = np.sqrt([600, 300, 100]) / np.sqrt([600, 300, 100]).sum()  # p_l proportional to n_l^(1/2)
    assert np.allclose(1000 * p, [472.7, 334.3, 193.0], atol=0.05)
    assert got == {"en": 472, "de": 300, "fr": 100}  # en cut to its share; de and fr cannot fill theirs
    flat = target_counts(counts, BalanceConfig(mode="temperature", temperature=1e6))
    assert flat == {"en": 333, "de": 300, "fr": 100}  # uniform shares of 1000/3


def test_balance_mask_is_deterministic_and_meets_the_targets():
    langs = ["en"] * 600 + ["de"] * 300 + ["fr"] * 100
    random.Random(0).shuffle(langs)
    cfg = BalanceConfig(mode="cap", max_fraction=0.4, seed=3)
    keep = balance(langs, cfg)
    kept = pd.Series(np.array(langs)[keep]).value_counts().to_dict()
    assert kept == {"en": 200, "de": 200, "fr": 100}
    assert np.array_equal(keep, balance(langs, cfg))
    assert not np.array_equal(keep, balance(langs, BalanceConfig(mode="cap", max_fraction=0.4, seed=4)))
    assert balance(langs, BalanceConfig()).all()


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory):
    """A tiny SigLIP checkpoint (sigscale run-dir format) and a tokenizer trained on generated captions."""
    import torch
    from safetensors.torch import save_file

    from sigscale.core.config import to_yaml
    from sigscale.pretrain.config import load_config
    from sigscale.pretrain.tokenizer import train_tokenizer
    from sigscale.pretrain.towers import create_model

    d = tmp_path_factory.mktemp("scorer")
    tok = train_tokenizer([c for _, _, c in synthetic.samples(600, seed=0)], d / "tok.model", vocab_size=600,
                          model_type="bpe")
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = create_model(cfg.model)
    save_file(model.state_dict(), str(d / "model.safetensors"), metadata={"config": to_yaml(cfg)})
    return d, tok


def test_score_filter_scores_each_pair_like_the_model(tiny_scorer):
    import torch

    from sigscale.curation.score import score_pairs
    from sigscale.pretrain.data import preprocess_image
    from sigscale.pretrain.interop import load_model
    from sigscale.pretrain.tokenizer import Tokenizer

    run_dir, tok_path = tiny_scorer
    items = [synthetic.indexed_sample(4, i) for i in range(7)]
    images = [jpeg(synthetic.render(s)) for s, _, _ in items]
    captions = [c for _, _, c in items]
    scores = score_pairs(images, captions, ScoreConfig(model=str(run_dir), tokenizer=str(tok_path), batch_size=3))
    model = load_model(run_dir).eval()
    tok = Tokenizer(tok_path, context_length=model.cfg.text.context_length)
    with torch.no_grad():
        for k in (0, 4, 6):  # one pair at a time, outside the batching
            x = model.encode_image(preprocess_image(images[k], model.cfg.vision.image_size)[None])
            y = model.encode_text(tok([captions[k]]))
            assert scores[k] == pytest.approx(float((x * y).sum()), abs=1e-5)
    assert len(set(np.round(scores, 6))) == 7


def test_score_filter_rejects_a_tokenizer_larger_than_the_model(tiny_scorer, tmp_path):
    from sigscale.curation.score import score_pairs
    from sigscale.pretrain.tokenizer import train_tokenizer

    run_dir, _ = tiny_scorer
    corpus = [c for _, _, c in synthetic.samples(3000, seed=1)] + [f"word{i} token{i * 7}" for i in range(3000)]
    big = train_tokenizer(corpus, tmp_path / "big.model", vocab_size=2000, model_type="bpe")
    with pytest.raises(CurationError, match=r"big.model has \d{4} pieces but the model's text tower only 1000;"):
        score_pairs([b""], ["x"], ScoreConfig(model=str(run_dir), tokenizer=str(big)))


def test_score_filter_names_an_unloadable_checkpoint(tiny_scorer, tmp_path):
    from sigscale.curation.score import score_pairs

    _, tok = tiny_scorer
    with pytest.raises(CurationError, match=r"image.score.model .* cannot be loaded: .* is neither a Hugging Face"):
        score_pairs([b""], ["x"], ScoreConfig(model=str(tmp_path), tokenizer=str(tok)))


def test_top_fraction_keeps_the_best_scored_candidates_over_every_part_through_a_real_scorer(tiny_scorer, tmp_path):
    """curate with image.score.top_fraction over 3 parts: each part scores its images with the checkpoint, one task
    cuts, and the rows kept are exactly the dense reference's: the top half of all candidates left after the
    near-duplicate search, by score, over the whole list."""
    import json
    import math

    from sigscale.curation.config import load_curation_config
    from sigscale.curation.finalize import curate
    from sigscale.curation.pipeline import load_outcomes
    from sigscale.curation.serve import ImageServer, write_url_list

    run_dir, tok = tiny_scorer
    with ImageServer() as server:
        urls = write_url_list(tmp_path / "urls.parquet", 72, server.base_url, seed=5)
        cfg = load_curation_config("demo", [
            f"input.path={urls}", f"output.dir={tmp_path / 'out'}", "output.rows_per_part=24",
            "download.processes=1", "download.threads=4", "output.plots=false", "output.local_processes=1",
            f"image.score.model={run_dir}", f"image.score.tokenizer={tok}", "image.score.top_fraction=0.5",
            "balance.mode=none"])
        out = curate(cfg)
    reasons = load_outcomes(out).set_index("row")["reason"]
    parts = sorted((cfg.work_dir / "parts").iterdir())
    cands = pd.concat([pd.read_parquet(p / "candidates.parquet", columns=["row", "score"]) for p in parts])
    assert len(parts) == 3 and cands["score"].notna().all() and cands["score"].nunique() == len(cands)
    alive = cands[~cands["row"].map(reasons).isin(["near_duplicate", "eval_duplicate"])]
    top = alive.sort_values(["score", "row"], ascending=[False, True]).head(math.ceil(0.5 * len(alive)))
    kept = set(reasons[reasons.isna()].index)
    assert kept == set(top["row"]) and len(kept) >= 10
    assert set(reasons[reasons == "low_score"].index) == set(alive["row"]) - kept
    # The cut is global: the top half of each part on its own would keep other rows (so the test can tell).
    per_part = set()
    for p in parts:
        mine = alive[alive["row"].isin(pd.read_parquet(p / "candidates.parquet", columns=["row"])["row"])]
        per_part |= set(mine.sort_values(["score", "row"], ascending=[False, True]).head(math.ceil(0.5 * len(mine)))["row"])
    assert per_part != kept
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"]["low_score"] == len(alive) - len(kept) and stats["kept"] == len(kept)
