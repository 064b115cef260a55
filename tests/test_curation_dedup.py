"""Exact (url, caption) dedup over a whole URL list, streamed in batches and partitioned by pair key."""
import json
import signal
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sigscale.cli import main
from sigscale.curation import pipeline, plan as planning, sources
from sigscale.curation.config import CurationError, load_curation_config
from sigscale.curation.text_filters import normalize_caption


def _url_list(folder):
    """Two parquet files, 330 rows: every duplicate kind the planner must catch or must not."""
    rows = [(f"http://127.0.0.1:9/img/{i}.jpg", f"a photo of thing number {i}", "en") for i in range(300)]
    planted = {}  # row of a later copy -> row of its first occurrence
    for k, first in enumerate((0, 5, 49, 50, 120, 299, 150, 151, 200, 7)):
        url, caption, lang = rows[first]
        if k % 3 == 1:  # the same pair after normalisation: NFD accents and runs of spaces
            caption = unicodedata.normalize("NFD", caption.replace(" ", "   ")) + " \t"
        if k % 3 == 2:
            url = f"  {url} "  # surrounding spaces are not part of a URL
        planted[len(rows)] = first
        rows.append((url, caption, lang))
    planted[len(rows)] = 5
    rows.append(rows[5])  # a third copy
    rows += [("http://127.0.0.1:9/img/1.jpg", "another caption for the same image", "en"),  # same URL, new caption
             ("http://127.0.0.1:9/img/other.jpg", "a photo of thing number 1", "en"),  # same caption, new URL
             ("not a url", "a photo of thing number 2", "en"), ("http://127.0.0.1:9/img/x.jpg", "   ", "en")]
    rows += [(f"http://127.0.0.1:9/img/{i}.jpg", f"a photo of thing number {i}", "de") for i in range(300, 315)]
    frame = pd.DataFrame(rows, columns=["url", "caption", "language"])
    folder.mkdir()
    frame.iloc[:170].to_parquet(folder / "a.parquet", row_group_size=40)
    frame.iloc[170:].to_parquet(folder / "b.parquet", row_group_size=40)
    return frame, planted


def _dense_reference(frame):
    """Later copies by a plain dict over the whole list: no hashing, no partitions."""
    first, later = {}, set()
    for row, (url, caption) in enumerate(zip(frame["url"], frame["caption"])):
        text = normalize_caption(caption)
        if text is None or "://" not in url:
            continue
        key = (url.strip(), text)
        if key in first:
            later.add(row)
        first.setdefault(key, row)
    return later


@pytest.mark.parametrize("partitions, processes", [(1, 1), (3, 2), (7, 1)])
def test_partitioned_dedup_finds_every_later_copy_across_files_parts_and_batches(tmp_path, monkeypatch, partitions,
                                                                                processes):
    frame, planted = _url_list(tmp_path / "urls")
    monkeypatch.setattr(sources, "BATCH_ROWS", 37)  # batches that cut across parts and files
    cfg = load_curation_config("default", [f"input.path={tmp_path / 'urls'}", f"output.dir={tmp_path / 'out'}",
                                           "input.language_col=language", "output.rows_per_part=50",
                                           f"output.dedup_partitions={partitions}", f"output.local_processes={processes}"])
    if processes > 1:  # the dedup tasks cannot run here: they must run in the spawned processes
        monkeypatch.setattr(planning, "later_copies", lambda *a: pytest.fail("ran in the planning process"))
    parts = pipeline.plan_parts(cfg)
    monkeypatch.undo()
    assert len(parts) == 7 and parts[-1].stop == len(frame) == 330
    found = set(np.concatenate([planning.duplicates_in(cfg, p) for p in parts]).tolist())
    assert found == set(planted) == _dense_reference(frame)
    for part in parts:
        assert all(part.start <= r < part.stop for r in planning.duplicates_in(cfg, part))
    # Every row lands once: in its part's input (duplicates too: the part drops and counts them) or in the plan drops.
    inputs = pd.concat([planning.part_rows(cfg, p) for p in parts])
    plan_drops = pd.concat([planning.plan_drops(cfg, p) for p in parts])
    assert sorted(inputs["row"].tolist() + plan_drops["row"].tolist()) == list(range(len(frame)))
    assert dict(zip(plan_drops["row"], plan_drops["reason"])) == {313: "url_invalid", 314: "caption_empty"}
    # Part 3 (rows 150-199) spans both files: a piece from each, written by each file's own task.
    assert sorted(p.name for p in (cfg.work_dir / "inputs" / "part-00003").iterdir()) == [
        "file-00000.parquet", "file-00001.parquet"]
    assert planning.part_rows(cfg, parts[3])["row"].tolist() == list(range(150, 200))
    plan = json.loads((cfg.work_dir / "plan.json").read_text())
    assert plan["dedup_partitions"] == partitions and [(f["rows"], f["start"]) for f in plan["files"]] == [
        (170, 0), (160, 170)]
    assert planning.plan_stats(cfg)["dropped_by_language"] == {"caption_empty": {"en": 1}, "url_invalid": {"en": 1}}
    keys = [pd.concat([pd.read_parquet(p) for p in sorted((cfg.work_dir / "dedup" / f"keys-{k:05d}").iterdir())])
            for k in range(partitions)]
    assert sum(len(k) for k in keys) == len(frame) - 2 and all(len(k) < len(frame) for k in keys[1:])


def test_a_part_refuses_to_run_before_its_duplicates_are_known_and_the_cli_runs_one_partition(tmp_path, capsys):
    frame, planted = _url_list(tmp_path / "urls")
    args = ["curate", "--config", "default", f"input.path={tmp_path / 'urls'}", f"output.dir={tmp_path / 'out'}",
            "output.rows_per_part=200", "output.dedup_partitions=2"]
    cfg = load_curation_config("default", args[3:])
    parts = pipeline.plan_parts(cfg, dedup=False)
    with pytest.raises(CurationError, match=r"exact-duplicate partition\(s\) \['drops-00000.parquet', "
                                            r"'drops-00001.parquet'\] not run yet \(2 missing\); run `sigscale "
                                            r"curate --dedup K` for each K"):
        pipeline.run_part(cfg, parts[0])
    assert main([*args, "--dedup", "1"]) == 0
    assert "exact duplicates of partition 1: " in capsys.readouterr().out
    with pytest.raises(CurationError, match=r"\['drops-00000.parquet'\] not run yet \(1 missing\)"):
        pipeline.run_part(cfg, parts[0])
    assert main([*args, "--dedup", "2"]) == 2
    assert "--dedup 2 is out of range for the dedup step: it has 2 task(s) (0..1)" in capsys.readouterr().err
    assert main([*args, "--dedup", "0"]) == 0
    found = np.concatenate([planning.duplicates_in(cfg, p) for p in parts])
    assert set(found.tolist()) == set(planted)


def test_each_file_is_planned_by_its_own_task_and_steps_refuse_to_run_early(tmp_path, capsys):
    """The CLI's --plan-file runs one file's task; dedup waits for every file, a part for the pieces of its files."""
    frame, planted = _url_list(tmp_path / "urls")
    args = ["curate", "--config", "default", f"input.path={tmp_path / 'urls'}", f"output.dir={tmp_path / 'out'}",
            "output.rows_per_part=100", "output.dedup_partitions=2"]
    cfg = load_curation_config("default", args[3:])
    plan = planning.plan_layout(cfg)
    assert [Path(f["path"]).name for f in plan["files"]] == ["a.parquet", "b.parquet"]
    assert not any((cfg.work_dir / "plan").iterdir())  # the layout reads no row: only the parquet footers
    assert "330 rows in 2 file(s), 4 part(s) of up to 100 rows" in capsys.readouterr().out
    assert main([*args, "--plan-file", "1"]) == 0
    assert "URL-list file 1 planned: " in capsys.readouterr().out
    with pytest.raises(CurationError, match=r"1 of 2 URL-list file\(s\) are not planned yet, e.g. \['a.parquet'\] "
                                            r"\(file\(s\) \[0\]\); run `sigscale curate --plan-file F` for each F"):
        planning.dedup_partition(cfg, 0)
    # Part 1 (rows 100-199) needs a piece from a.parquet, not planned yet; part 3 lies in b.parquet alone.
    parts = planning.parts_of(plan)
    with pytest.raises(CurationError, match=r"inputs/part-00001/file-00000.parquet is missing; plan the URL list"):
        planning.part_rows(cfg, parts[1])
    assert planning.part_rows(cfg, parts[3])["row"].tolist() == [r for r in range(300, 330) if r not in (313, 314)]
    assert main([*args, "--plan-file", "2"]) == 2
    assert "--plan-file 2 is out of range for the plan step: it has 2 task(s) (0..1)" in capsys.readouterr().err
    assert main([*args, "--plan-file", "0"]) == 0
    assert main([*args, "--dedup", "0"]) == 0 and main([*args, "--dedup", "1"]) == 0
    assert set(np.concatenate([planning.duplicates_in(cfg, p) for p in parts]).tolist()) == set(planted)
    # A file that changes under a plan is refused by its task, not numbered anew.
    (cfg.work_dir / "plan" / "file-00001.json").unlink()
    frame.iloc[170:200].to_parquet(tmp_path / "urls" / "b.parquet")
    with pytest.raises(CurationError, match=r"b.parquet has 30 rows now and had 160 when the list was laid out"):
        planning.plan_file(cfg, 1)


# A plan task of file 0 that the kernel kills (SIGKILL, as the OOM killer or a node failure would) after its
# second batch of 37 rows: part 0 (rows 0-49) is published by then, the file's keys and summary are not.
_KILLED_AFTER_TWO_BATCHES = """
import os, signal, sys
from sigscale.curation import plan, sources
from sigscale.curation.config import load_curation_config
sources.BATCH_ROWS = 37
batches = []
def trim_heap_then_die():
    batches.append(1)
    if len(batches) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
plan.trim_heap = trim_heap_then_die
plan.plan_file(load_curation_config("default", sys.argv[1:]), 0)
"""


def test_a_plan_task_killed_mid_file_is_not_done_and_its_rerun_plans_the_file_once(tmp_path):
    frame, planted = _url_list(tmp_path / "urls")
    overrides = [f"input.path={tmp_path / 'urls'}", f"output.dir={tmp_path / 'out'}", "output.rows_per_part=50",
                 "output.dedup_partitions=2"]
    cfg = load_curation_config("default", overrides)
    planning.plan_layout(cfg)
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_TWO_BATCHES, *overrides], capture_output=True,
                            text=True, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    work = cfg.work_dir
    assert (work / "inputs" / "part-00000" / "file-00000.parquet").is_file()  # published before the kill
    assert not (work / "plan" / "file-00000.json").exists() and not (work / "plan" / "drops-00000.parquet").exists()
    assert not (work / "dedup" / "keys-00000" / "file-00000.parquet").exists()  # keys are renamed at the end only
    with pytest.raises(CurationError, match=r"2 of 2 URL-list file\(s\) are not planned yet"):
        planning.dedup_partition(cfg, 0)
    parts = pipeline.plan_parts(cfg)  # plans both files (file 0 again, from its first row), then dedup
    inputs = pd.concat([planning.part_rows(cfg, p) for p in parts])
    drops = pd.concat([planning.plan_drops(cfg, p) for p in parts])
    assert sorted(inputs["row"].tolist() + drops["row"].tolist()) == list(range(len(frame)))  # each row once
    assert set(np.concatenate([planning.duplicates_in(cfg, p) for p in parts]).tolist()) == set(planted)
