"""The training stream: rank/worker split without overlap, skips counted, exact resume."""
import io
import tarfile
from collections import Counter

import pytest
import torch

from sigscale.core.manifest import ManifestError, load_manifest, write_shards
from sigscale.curation.synthetic import shard_records
from sigscale.pretrain.data import DataPosition, make_loader
from sigscale.pretrain.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    records = list(shard_records(96, seed=1))
    records[5]["jpg"] = b"\xff\xd8 truncated jpeg"
    records[17]["txt"] = "   "
    write_shards(records, out, samples_per_shard=12)
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory, shards):
    corpus = [r["txt"] for r in shard_records(300, seed=9)]
    path = train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=500)
    return Tokenizer(path, context_length=16)


def keys_of(batch):
    return batch["captions"]


def test_manifest_accounts_for_every_sample(shards):
    m = load_manifest(shards)
    assert len(m.shards) == 8 and m.num_samples == 96
    assert sum(m.languages.values()) == 96 and len(m.languages) == 9


def test_batches_are_normalised_and_tokenised(shards, tok):
    batch = next(iter(make_loader(shards, tok, image_size=32, batch_size=8, shuffle_buffer=1)))
    assert batch["pixels"].shape == (8, 3, 32, 32) and batch["tokens"].shape == (8, 16)
    assert -1.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0
    assert batch["pixels"].std() > 0.1


def one_epoch(shards, tok, rank, world, workers, batches):
    loader = make_loader(shards, tok, image_size=32, batch_size=4, rank=rank, world_size=world,
                         num_workers=workers, shuffle_buffer=1)
    seen, skipped = [], Counter()
    for _, batch in zip(range(batches), loader):
        seen += batch["captions"]
        skipped.update(batch["skipped"])
    return seen, skipped


def test_ranks_and_workers_read_disjoint_shards_and_count_skips(shards, tok):
    # 96 samples, 2 bad ones, 2 ranks x 2 workers: each stream owns 2 shards (24 samples) per epoch.
    all_seen, skipped = [], Counter()
    per_rank = []
    for rank in range(2):
        # 4 batches of 4 per worker stay inside the first epoch of every stream (>= 22 good samples)
        seen, sk = one_epoch(shards, tok, rank, 2, 2, batches=8)
        per_rank.append(set(seen))
        all_seen += seen
        skipped.update(sk)
    assert not per_rank[0] & per_rank[1]
    assert len(all_seen) == 64
    # every good caption in a stream is distinct (shards don't overlap), bad samples are counted
    assert sum(skipped.values()) <= 2


def test_every_bad_sample_is_counted_over_an_epoch(shards, tok):
    # 24 batches of 4 = 96 good samples: all 94 good ones of epoch 1, then 2 from epoch 2, whose first
    # samples are not the bad ones (they sit at position 5 of their shards; no shuffle buffer).
    seen, skipped = one_epoch(shards, tok, 0, 1, 0, batches=24)
    assert skipped == Counter({"undecodable_image": 1, "empty_caption": 1})
    assert len(seen) == 96


def test_resume_continues_exactly(shards, tok):
    for workers in (0, 2):
        ref = make_loader(shards, tok, 32, 4, num_workers=workers, shuffle_buffer=8)
        expected, position = [], DataPosition.start(workers)
        it = iter(ref)
        for step in range(10):
            batch = next(it)
            expected.append(batch)
            if step < 5:
                position.advance(batch)
        resumed = iter(make_loader(shards, tok, 32, 4, num_workers=workers, shuffle_buffer=8, position=position))
        for step in range(5, 10):
            got = next(resumed)
            assert got["captions"] == expected[step]["captions"]
            assert torch.equal(got["pixels"], expected[step]["pixels"])


def test_corrupt_shard_is_counted_not_fatal(tmp_path, tok):
    write_shards(list(shard_records(20, seed=2)), tmp_path, samples_per_shard=10)
    shard = tmp_path / "shard-00000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut mid-member
    with pytest.warns(UserWarning, match="corrupt shard"):
        seen, skipped = one_epoch(tmp_path, tok, 0, 1, 0, batches=3)
    assert skipped["corrupt_shard"] >= 1 and len(seen) == 12


def test_missing_shards_and_too_few_shards(tmp_path, shards, tok):
    with pytest.raises(ManifestError, match="no manifest.json"):
        make_loader(tmp_path, tok, 32, 4)
    with pytest.raises(ManifestError, match="cannot feed 4 rank"):
        make_loader(shards, tok, 32, 4, rank=0, world_size=4, num_workers=4)
    write_shards(list(shard_records(4, seed=3)), tmp_path / "gone", samples_per_shard=2)
    (tmp_path / "gone" / "shard-00001.tar").unlink()
    with pytest.raises(ManifestError, match="1 shard\\(s\\) listed .* are missing"):
        make_loader(tmp_path / "gone", tok, 32, 4)
