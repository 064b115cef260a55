"""`sigscale bench ablation --quick`: the demo recipe over losses × seeds on one curation, for real.

Curation from the loopback server, training through `sigscale train`, evaluation as the demo does;
the expected statistics are computed here with scipy from the runs' own numbers.
"""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from scipy import stats

from sigscale.bench_ablation import render_markdown, run_ablation
from sigscale.cli import main


@pytest.mark.slow
@pytest.mark.timeout(2400)  # four trainings and twelve evaluations: ~5 min on a quiet 2-core machine
def test_quick_ablation_curates_once_seeds_differ_and_renders_the_table(tmp_path, capsys):
    out = tmp_path / "ablation.json"
    result = run_ablation(str(out), seeds=(0, 1), quick=True, nproc=1)
    work = tmp_path / "ablation"
    shards = work / "data" / "shards"
    curated = json.loads((shards / "stats.json").read_text())
    assert curated["input_rows"] == 1024 and result["curation"]["kept"] == curated["kept"]
    assert json.loads(out.read_text())["groups"] == result["groups"]

    by = {(r["loss"], r["seed"]): r for r in result["runs"]}
    assert sorted(by) == [("sigmoid", 0), ("sigmoid", 1), ("softmax", 0), ("softmax", 1)]
    for (loss, seed), r in by.items():  # every run trained its own recipe on the one curation
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert cfg["data"]["shards"] == str(shards)
        assert (cfg["train"]["loss"], cfg["train"]["seed"], cfg["train"]["steps"]) == (loss, seed, 30)
    for loss in ("sigmoid", "softmax"):
        # The seed changes the towers' init and the data order: another first loss, other final weights.
        a, b = by[(loss, 0)], by[(loss, 1)]
        assert a["first_loss"] != b["first_loss"]
        wa, wb = (load_file(str(Path(r["run_dir"]) / "model.safetensors")) for r in (a, b))
        assert wa.keys() == wb.keys() and not any(torch.equal(wa[k], wb[k]) for k in wa if wa[k].numel() > 1)

    t = stats.t.ppf(0.975, 1)
    for g in result["groups"]:
        assert g["n"] == 2 and g["seeds"] == [0, 1] and g["batch"] == 32 and g["step"] == 30
        for key in ("zeroshot top1", "xm3600 i2t_r@1", "xm3600 t2i_r@1"):
            vals = [by[(g["loss"], s)]["headline"][key] for s in (0, 1)]
            assert g["metrics"][key]["mean"] == pytest.approx(np.mean(vals))
            assert g["metrics"][key]["half"] == pytest.approx(t * np.std(vals, ddof=1) / math.sqrt(2), abs=1e-9)
    (test,) = result["tests"]
    vals = {loss: [by[(loss, s)]["headline"]["xm3600 i2t_r@1"] for s in (0, 1)] for loss in ("sigmoid", "softmax")}
    if np.std(vals["sigmoid"]) + np.std(vals["softmax"]) > 0:  # scipy has no p for two constant groups
        ref = stats.ttest_ind(vals["sigmoid"], vals["softmax"], equal_var=False).pvalue
        assert test["metrics"]["xm3600 i2t_r@1"]["p"] == pytest.approx(ref)

    md = render_markdown(result)
    assert md.startswith(f"```\nsigscale bench ablation --losses sigmoid,softmax --seeds 0,1 --quick --nproc 1 "
                         f"--out {out}\n```")
    rows = [line for line in md.splitlines() if line.startswith("| 32 |")]
    assert [r.split(" | ")[1:3] for r in rows] == [["sigmoid", "2"], ["softmax", "2"]]
    assert "**Verdict, batch 32, sigmoid − softmax** (Welch's t-test, two-sided)" in md

    # The same command again reuses the curation and every finished run, and renders the same table.
    manifest = (shards / "manifest.json").stat().st_mtime_ns
    assert main(["bench", "ablation", "--quick", "--seeds", "0,1", "--nproc", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    again = json.loads(out.read_text())
    assert all(r["reused"] for r in again["runs"]) and again["groups"] == result["groups"]
    assert (shards / "manifest.json").stat().st_mtime_ns == manifest
    assert "\n".join(rows) in printed

    # A run trained by an invocation that stopped before its report is evaluated again, not trained again.
    point = by[("softmax", 1)]
    weights = (Path(point["run_dir"]) / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(point["report"])
    third = run_ablation(str(out), seeds=(0, 1), quick=True, nproc=1)
    redone = {(r["loss"], r["seed"]): r for r in third["runs"]}
    assert [k for k, r in redone.items() if not r["reused"]] == [("softmax", 1)]
    assert (Path(point["run_dir"]) / "model.safetensors").stat().st_mtime_ns == weights
    assert redone[("softmax", 1)]["headline"] == point["headline"] and third["groups"] == result["groups"]
    assert "training only, from metrics.jsonl timestamps" in render_markdown(third)


@pytest.mark.parametrize("argv, message", [
    (["--losses", "sigmoid,cosine"], "--losses: unknown loss 'cosine'; choose from sigmoid, softmax"),
    (["--seeds", "0,x"], "--seeds 0,x: give comma-separated integers"),
    (["--seeds", "1,1"], "--seeds: 1,1 repeats a value"),
    (["--batch-sizes", "33"], "--batch-sizes: 33 is not a positive multiple of --nproc 2; use e.g. 32"),
])
def test_bad_ablation_flags_stop_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "ablation.json"
    assert main(["bench", "ablation", "--quick", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ablation").exists()  # nothing curated, nothing trained
