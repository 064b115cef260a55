"""Hostile input to `sigscale train`: refused before the ranks start, or stopped on every rank, with one line and rc 2.

Real processes throughout: the CLI, torchrun behind sigscale's launcher, gloo ranks. Subprocess timeouts are
the guard against the hangs these errors used to be.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sigscale.core.manifest import write_shards
from sigscale.curation.synthetic import shard_records
from sigscale.pretrain.tokenizer import train_tokenizer

USER_ERROR_EXIT = 2
NOT_A_JPEG = b"\xff\xd8 not a jpeg"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([r["txt"] for r in shard_records(600, seed=5)],
                           tmp_path_factory.mktemp("tok") / "t.model", vocab_size=600)


def write_data(root, undecodable=False):
    records = list(shard_records(64, seed=4))
    for r in records:
        r["jpg"] = NOT_A_JPEG if undecodable else r["jpg"]
    write_shards(records, root, samples_per_shard=16)
    return root


def sigscale_train(tok, shards, out_dir, nproc, *extra, timeout=240):
    cmd = [sys.executable, "-m", "sigscale.cli", "train", "--config", "tiny", "--nproc", str(nproc),
           f"data.shards={shards}", f"tokenizer.model={tok}", f"train.out_dir={out_dir}", "train.steps=4",
           "train.warmup_steps=1", "train.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=8", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def user_error_lines(proc):
    """The lines the user sees for an error: every stderr line but Python warnings about skipped input."""
    lines = proc.stderr.splitlines()
    return [l for l in lines if "Warning" not in l and not l.startswith("  ")]


@pytest.mark.multiproc
def test_two_ranks_on_undecodable_images_end_with_one_line_and_rc_2(tmp_path, tok):
    shards = write_data(tmp_path / "shards", undecodable=True)
    proc = sigscale_train(tok, shards, tmp_path / "run", 2)
    assert proc.returncode == USER_ERROR_EXIT, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = user_error_lines(proc)
    assert len(lines) == 1, proc.stderr[-4000:]  # once, from the launcher: not once per rank
    # Two streams read all four shards through shuffle buffers: at least the 64 samples were decoded.
    undecodable = re.fullmatch(
        re.escape(f"sigscale: error: no usable sample in a full pass over the 4 shard(s) of {shards} (shard-00000.tar, "
                  "shard-00001.tar, shard-00002.tar, shard-00003.tar): 0 corrupt shard(s), ") + r"(\d+)" +
        re.escape(" undecodable image(s), 0 empty caption(s), 0 missing image(s); re-run curation, or point "
                  "data.shards at shards whose images decode and whose captions are not empty"), lines[0])
    assert undecodable and int(undecodable.group(1)) >= 64, lines[0]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_one_process_on_garbage_shards_ends_with_one_line_and_rc_2(tmp_path, tok):
    shards = write_data(tmp_path / "shards")
    for tar in shards.glob("*.tar"):
        tar.write_bytes(b"no tar here " * 50)
    proc = sigscale_train(tok, shards, tmp_path / "run", 1)
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-4000:]
    assert [l for l in proc.stderr.splitlines() if l.startswith("sigscale:")] == [
        f"sigscale: error: no usable sample in a full pass over the 4 shard(s) of {shards} (shard-00000.tar, "
        "shard-00001.tar, shard-00002.tar, shard-00003.tar): 4 corrupt shard(s), 0 undecodable image(s), "
        "0 empty caption(s), 0 missing image(s); re-run curation, or point data.shards at shards whose images "
        "decode and whose captions are not empty"]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("batch,message", [
    ("33", "sigscale: config error: train.batch_size=33 is not divisible by world size 2 x train.accum_steps=1; "
           "choose a batch that is a multiple of 2"),
    ("100000", "sigscale: config error: train.batch_size=100000 is larger than the 64 samples in {shards}: every "
               "batch would repeat samples; set train.batch_size to at most 64 (a multiple of 2), or add shards to "
               "{shards}"),
])
def test_the_launcher_refuses_a_bad_batch_before_starting_ranks(tmp_path, tok, batch, message):
    shards = write_data(tmp_path / "shards")
    proc = sigscale_train(tok, shards, tmp_path / "run", 2, f"train.batch_size={batch}", timeout=120)
    assert proc.returncode == USER_ERROR_EXIT
    assert proc.stderr.splitlines() == [message.format(shards=shards)]
    assert not (tmp_path / "run").exists()  # no rank ever started: nothing written


def _one_rank_fails(rank, world_size):
    from sigscale.core.distributed import raise_on_any_rank
    from sigscale.pretrain.data import NoUsableDataError

    error = NoUsableDataError("rank 1 found nothing to train on") if rank == 1 else None
    try:
        raise_on_any_rank(error)  # rank 0 got its batch and would go on to the step's collectives
    except NoUsableDataError as e:
        return str(e)
    return "went on"


@pytest.mark.multiproc
def test_a_data_error_on_one_rank_stops_every_rank():
    from dist_helpers import run_distributed

    assert run_distributed(_one_rank_fails, 2, timeout=60) == ["rank 1 found nothing to train on"] * 2


def launch_two(kind):
    script = Path(__file__).parent / "scripts" / "rank_fails.py"
    cmd = [sys.executable, "-m", "sigscale.core.torchrun", "--standalone", "--nproc_per_node=2", str(script), kind]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_the_launcher_reports_a_user_error_of_one_rank_once_while_it_stops_the_other():
    """Rank 0 is stopped by SIGTERM (no error of its own): the line of rank 1 is still the one shown."""
    proc = launch_two("user-error")
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "sigscale: error: rank 1 was given nothing to train on; point data.shards at real shards"]


def test_the_launcher_leaves_other_failures_to_torchrun():
    proc = launch_two("bug")
    assert proc.returncode == 1
    assert "RuntimeError: a bug, not a user error" in proc.stderr and "ChildFailedError" in proc.stderr
