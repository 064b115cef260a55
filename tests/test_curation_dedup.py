"""Exact (url, caption) dedup over a whole URL list, streamed in batches and partitioned by pair key."""
import json
import unicodedata

import numpy as np
import pandas as pd
import pytest

from sigscale.cli import main
from sigscale.curation import pipeline, sources
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
        monkeypatch.setattr(pipeline, "later_copies", lambda *a: pytest.fail("ran in the planning process"))
    parts = pipeline.plan_parts(cfg)
    monkeypatch.undo()
    assert len(parts) == 7 and parts[-1].stop == len(frame) == 330
    found = set(np.concatenate([pipeline._duplicates_in(cfg, p) for p in parts]).tolist())
    assert found == set(planted) == _dense_reference(frame)
    for part in parts:
        assert all(part.start <= r < part.stop for r in pipeline._duplicates_in(cfg, part))
    # Every row lands once: in its part's input (duplicates too: the part drops and counts them) or in the plan drops.
    inputs = pd.concat([pd.read_parquet(cfg.work_dir / "inputs" / f"{p.name}.parquet") for p in parts])
    plan_drops = pd.read_parquet(cfg.work_dir / "plan_drops.parquet")
    assert sorted(inputs["row"].tolist() + plan_drops["row"].tolist()) == list(range(len(frame)))
    assert dict(zip(plan_drops["row"], plan_drops["reason"])) == {313: "url_invalid", 314: "caption_empty"}
    plan = json.loads((cfg.work_dir / "plan.json").read_text())
    assert plan["dedup_partitions"] == partitions and plan["dropped_by_language"] == {
        "caption_empty": {"en": 1}, "url_invalid": {"en": 1}}
    keys = [pd.read_parquet(cfg.work_dir / "dedup" / f"keys-{k:05d}.parquet") for k in range(partitions)]
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
    found = np.concatenate([pipeline._duplicates_in(cfg, p) for p in parts])
    assert set(found.tolist()) == set(planted)
