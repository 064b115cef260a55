"""The training stream: rank/worker split without overlap, skips counted, exact resume, hostile input refused."""
import contextlib
import json
from collections import Counter

import pytest
import torch

from sigscale.core.config import ConfigError
from sigscale.core.manifest import MANIFEST, ManifestError, load_manifest, write_shards
from sigscale.curation.synthetic import shard_records
from sigscale.pretrain.config import load_config
from sigscale.pretrain.data import DataPosition, NoUsableDataError, check_input, make_loader
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


NOT_A_JPEG = b"\xff\xd8 not a jpeg"


def unusable_shards(root, kind):
    """16 samples in 4 shards with nothing to train on: garbage tars, or images that do not decode."""
    records = list(shard_records(16, seed=6))
    for r in records:
        r["jpg"] = NOT_A_JPEG if kind == "images" else r["jpg"]
    records[3]["txt"] = ""
    write_shards(records, root, samples_per_shard=4)
    if kind == "shards":
        for tar in root.glob("*.tar"):
            tar.write_bytes(b"this is no tar archive " * 40)
    return root


# pytest-timeout is the guard: before the fix the stream looped over epochs for ever without a batch.
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,counts", [
    ("shards", "4 corrupt shard(s), 0 undecodable image(s), 0 empty caption(s), 0 missing image(s)"),
    ("images", "0 corrupt shard(s), 15 undecodable image(s), 1 empty caption(s), 0 missing image(s)"),
])
def test_unusable_data_stops_after_one_pass_naming_shards_and_skips(tmp_path, tok, kind, counts):
    root = unusable_shards(tmp_path, kind)
    loader = make_loader(root, tok, 32, 4, shuffle_buffer=1)
    warns = pytest.warns(UserWarning, match="corrupt shard") if kind == "shards" else contextlib.nullcontext()
    with warns, pytest.raises(NoUsableDataError) as err:
        next(iter(loader))
    assert str(err.value) == (
        f"no usable sample in a full pass over the 4 shard(s) of {root} (shard-00000.tar, shard-00001.tar, "
        f"shard-00002.tar, shard-00003.tar): {counts}; re-run curation, or point data.shards at shards whose "
        "images decode and whose captions are not empty")


@pytest.mark.timeout(120)
def test_unusable_data_error_comes_out_of_dataloader_workers_as_itself(tmp_path, tok):
    """Four streams (2 ranks x 2 workers) each own one shard an epoch: the error waits until this stream
    has read all four, through a shuffle buffer, and arrives as the error itself, not a worker traceback."""
    root = unusable_shards(tmp_path, "images")
    loader = make_loader(root, tok, 32, 4, rank=1, world_size=2, num_workers=2, shuffle_buffer=8)
    with pytest.raises(NoUsableDataError, match=r"^no usable sample in a full pass over the 4 shard\(s\)") as err:
        next(iter(loader))
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    undecodable = int(str(err.value).split(" undecodable")[0].rsplit(" ", 1)[-1])
    assert undecodable >= 15  # every shard read in full at least once


@pytest.mark.timeout(120)
def test_a_stream_whose_slice_is_unusable_for_an_epoch_moves_on(tmp_path, tok):
    """One bad shard of four, one shard per stream and epoch: that stream skips it and trains on the others."""
    records = list(shard_records(16, seed=6))
    for r in records[:4]:
        r["jpg"] = NOT_A_JPEG
    write_shards(records, tmp_path, samples_per_shard=4)
    seen, skipped = Counter(), Counter()
    loader = make_loader(tmp_path, tok, 32, 4, rank=0, world_size=4, shuffle_buffer=1)
    for _, batch in zip(range(12), loader):
        seen.update(batch["captions"])
        skipped.update(batch["skipped"])
    assert skipped["undecodable_image"] % 4 == 0 and skipped["undecodable_image"] >= 4  # it met the bad shard
    assert not set(seen) & {r["txt"] for r in records[:4]} and len(set(seen)) == 12


def batch_config(shards, batch, workers, accum=1):
    return load_config("tiny", [f"data.shards={shards}", f"train.batch_size={batch}", f"data.num_workers={workers}",
                                f"train.accum_steps={accum}"])


def test_a_batch_larger_than_the_data_is_refused_before_any_work(shards):
    # 96 samples in 8 shards of 12
    with pytest.raises(ConfigError) as err:
        check_input(batch_config(shards, 100000, 1), 1)
    assert str(err.value) == (
        f"train.batch_size=100000 is larger than the 96 samples in {shards}: every batch would repeat samples; "
        f"set train.batch_size to at most 96 (a multiple of 1), or add shards to {shards}")
    # 2 ranks x 2 workers: each stream is dealt 2 shards (24 samples) an epoch, so micro-batches of 32 repeat
    with pytest.raises(ConfigError) as err:
        check_input(batch_config(shards, 64, 2), 2)
    assert str(err.value) == (
        f"train.batch_size=64 gives micro-batches of 32 samples, each read by one of 4 data stream(s) (2 rank(s) x "
        f"2 worker(s)) that each see about 24 of the 96 samples in an epoch: micro-batches would repeat samples; "
        f"set train.batch_size to at most 48 (a multiple of 2), or add shards to {shards}, or lower data.num_workers")
    with pytest.raises(ConfigError, match=r"^train.batch_size=192 is larger than the 96 samples .* at most 96 "
                                          r"\(a multiple of 4\)"):
        check_input(batch_config(shards, 192, 0, accum=4), 1)
    assert check_input(batch_config(shards, 48, 2), 2) == 24
    assert check_input(batch_config(shards, 96, 0, accum=4), 1) == 24


def rewrite_manifest(folder, edit):
    data = json.loads((folder / MANIFEST).read_text())
    edit(data["shards"])
    (folder / MANIFEST).write_text(json.dumps(data))


def test_shard_paths_must_stay_inside_the_data_folder(tmp_path):
    write_shards(list(shard_records(4, seed=3)), tmp_path / "d", samples_per_shard=2)
    folder = tmp_path / "d"
    (tmp_path / "outside.tar").write_bytes((folder / "shard-00001.tar").read_bytes())
    for bad in ("../../../../etc/passwd", "/etc/passwd", "../outside.tar", "sub/../../outside.tar"):
        rewrite_manifest(folder, lambda shards: shards[1].update(path=bad))
        with pytest.raises(ManifestError) as err:
            load_manifest(folder)
        assert str(err.value) == (
            f"{folder / MANIFEST} shards[1] path {bad!r} points outside the data folder {folder.resolve()}; list "
            "shards by their path relative to the manifest's folder and keep the files inside it")
    (folder / "link.tar").symlink_to(tmp_path / "outside.tar")
    rewrite_manifest(folder, lambda shards: shards[1].update(path="link.tar"))
    with pytest.raises(ManifestError, match=r"shards\[1\] path 'link.tar' points outside the data folder"):
        load_manifest(folder)
    rewrite_manifest(folder, lambda shards: shards[1].update(path="./shard-00001.tar"))
    assert load_manifest(folder).num_samples == 4


def test_manifest_entries_without_a_sample_count_are_named(tmp_path):
    write_shards(list(shard_records(4, seed=3)), tmp_path, samples_per_shard=2)
    rewrite_manifest(tmp_path, lambda shards: shards[0].pop("samples"))
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / MANIFEST} shards[0] (shard-00000.tar) has samples=None, not a count of samples; re-run the "
        "curation merge step, or set it to the number of samples in that tar")
    rewrite_manifest(tmp_path, lambda shards: shards[0].update(samples=2, extra=1))
    with pytest.raises(ManifestError, match=r"shards\[0\] \(shard-00000.tar\) has unknown field\(s\) \['extra'\]"):
        load_manifest(tmp_path)
    rewrite_manifest(tmp_path, lambda shards: shards.__setitem__(0, "shard-00000.tar"))
    with pytest.raises(ManifestError, match=r"shards\[0\] is 'shard-00000.tar', not an entry with a 'path'"):
        load_manifest(tmp_path)
