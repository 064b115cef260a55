"""`sigscale report compare` over seed replicates: groups by recipe, mean ± 95% CI, Welch's test.

The reports are written by ``write_report`` from records in the exact shape ``evaluate_checkpoints``
returns (the training config from ``load_config``, the benchmark results as the zero-shot and XM3600
benchmarks return them); every expected number is computed here with scipy, not with sigscale.eval.seeds.
"""
import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import stats

from eval_fixtures import parse_html
from sigscale.cli import main
from sigscale.eval.report import write_report
from sigscale.eval.seeds import estimate, welch
from sigscale.pretrain.config import load_config

# zero-shot top-1 and XM3600 I→T R@1 per (loss, seed): top-1 is far apart between the losses with a small
# spread (distinguishable), I→T overlaps (not distinguishable).
VALUES = {("sigmoid", 0): (46.1, 8.3), ("sigmoid", 1): (45.2, 7.1), ("sigmoid", 2): (47.0, 9.0),
          ("softmax", 0): (38.4, 7.8), ("softmax", 1): (39.9, 8.9), ("softmax", 2): (37.6, 6.5)}


def _record(root, loss: str, seed: int, top1: float, i2t: float, batch: int = 128, step: int = 1500):
    """One eval record as evaluate_checkpoints writes it, for a run of the demo recipe in its own run dir."""
    run = root / f"{loss}-b{batch}-s{seed}" / "run"
    cfg = load_config("tiny", [f"train.loss={loss}", f"train.seed={seed}", f"train.batch_size={batch}",
                               f"train.out_dir={run}", f"tokenizer.model={run / 'tokenizer.model'}",
                               "train.steps=1500"])
    xm_mean = {"i2t_r@1": i2t, "t2i_r@1": i2t - 0.5, "i2t_r@5": 30.0 + seed, "t2i_r@5": 29.0,
               "i2t_r@10": 50.0, "t2i_r@10": 49.0}
    return {"checkpoint": str(run / "checkpoints" / f"step_{step:08d}"), "kind": "dcp", "step": step,
            "config_hash": f"{seed:016x}", "run_dir": str(run), "tokenizer": str(run / "tokenizer.model"),
            "model": "ViT 64x2/8 @32px, text 64x2, vocab 1000", "name": "tiny",
            "recipe": f"{loss} loss, batch {batch}, 1500 steps, lr 0.0005, fsdp, fp32, seed {seed}",
            "config": dataclasses.asdict(cfg), "processes": 1, "seconds": 5.0,
            "benchmarks": {
                "zeroshot": {"top1": top1, "top5": 98.0, "images": 360, "classes": 24, "classes_present": 24,
                             "chance_top1": 100 / 24, "chance_top5": 500 / 24, "templates": 81, "data": "image_folder",
                             "protocol": "zero-shot classification (81 templates)", "seconds": 2.0},
                "xm3600": {"protocol": "all captions per image and language (SigLIP paper)", "first_caption_only": False,
                           "images": 360, "captions": 720, "languages": {"en": xm_mean, "de": xm_mean},
                           "mean": xm_mean, "missing_official_languages": [], "chance_r@1": 100 / 360,
                           "chance_t2i_r@10": 1000 / 360, "seconds": 3.0}}}


def _reports(root, points):
    out = []
    for loss, seed, batch in points:
        top1, i2t = VALUES[(loss, seed)]
        rec = _record(root, loss, seed, top1, i2t, batch)
        out.append(write_report([rec], root / f"{loss}-b{batch}-s{seed}" / "report")["json"].parent)
    return out


def _ci(values):
    """(mean, half-width) of the 95% Student t interval, by scipy."""
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    return np.mean(values), (hi - lo) / 2


def test_compare_groups_seed_replicates_with_confidence_intervals_and_welch(tmp_path):
    points = [(loss, seed, 128) for seed in (0, 1, 2) for loss in ("sigmoid", "softmax")] + [("sigmoid", 0, 64)]
    reports = _reports(tmp_path, points)
    cmp = tmp_path / "cmp"
    assert main(["report", "compare", *map(str, reports), "--out", str(cmp)]) == 0
    doc = json.loads((cmp / "compare.json").read_text())

    groups = {g["label"]: g for g in doc["groups"]}
    # The seven runs differ in seed, run dir and tokenizer path (ignored), loss and batch (the recipe).
    assert sorted(groups) == ["batch_size=128, loss=sigmoid",
                              "batch_size=128, loss=softmax",
                              "batch_size=64, loss=sigmoid"]
    for loss in ("sigmoid", "softmax"):
        g = groups[f"batch_size=128, loss={loss}"]
        assert g["n"] == 3 and g["seeds"] == [0, 1, 2]
        for metric, col in (("zeroshot top1", 0), ("xm3600 i2t_r@1", 1)):
            vals = [VALUES[(loss, s)][col] for s in (0, 1, 2)]
            mean, half = _ci(vals)
            assert g["metrics"][metric]["mean"] == pytest.approx(mean, rel=1e-12)
            assert g["metrics"][metric]["half"] == pytest.approx(half, rel=1e-9)
            # and by the textbook formula: t(0.975, 2) = 4.302653 times s / sqrt(3)
            assert half == pytest.approx(4.302653 * np.std(vals, ddof=1) / math.sqrt(3), rel=1e-6)
    single = groups["batch_size=64, loss=sigmoid"]
    assert single["n"] == 1 and single["metrics"]["zeroshot top1"] == {"n": 1, "mean": 46.1, "half": None, "sd": None}

    (test,) = [t for t in doc["tests"] if "batch_size=128" in t["a"] and "batch_size=128" in t["b"]]
    for metric, col, verdict in (("zeroshot top1", 0, True), ("xm3600 i2t_r@1", 1, False)):
        a = [VALUES[("sigmoid", s)][col] for s in (0, 1, 2)]
        b = [VALUES[("softmax", s)][col] for s in (0, 1, 2)]
        ref = stats.ttest_ind(a, b, equal_var=False)
        got = test["welch"][metric]
        assert got["p"] == pytest.approx(ref.pvalue, rel=1e-9) and got["t"] == pytest.approx(ref.statistic, rel=1e-9)
        assert got["diff"] == pytest.approx(np.mean(a) - np.mean(b)) and bool(ref.pvalue < 0.05) is verdict
    # A pair with the n = 1 group has no test.
    assert all(v["p"] is None for t in doc["tests"] if "batch_size=64" in t["a"] + t["b"] for v in t["welch"].values())

    md = (cmp / "compare.md").read_text(encoding="utf-8")
    mean, half = _ci([VALUES[("sigmoid", s)][0] for s in (0, 1, 2)])
    row = next(line for line in md.splitlines() if line.startswith("| batch_size=128, loss=sigmoid |"))
    assert "| 3 | 0, 1, 2 |" in row and f"| {mean:.1f} ± {half:.1f} |" in row
    assert "| batch_size=64, loss=sigmoid | 1500 | n = 1, no interval | 0 |" in md
    assert "Welch's unequal-variance t-test" in md and "95% Student t interval" in md
    verdicts = [line for line in md.splitlines() if "| zeroshot top1 |" in line or "| xm3600 i2t_r@1 |" in line]
    assert any(line.endswith("| distinguishable |") and "zeroshot top1" in line for line in verdicts)
    assert any(line.endswith("| not distinguishable |") and "xm3600 i2t_r@1" in line for line in verdicts)
    assert "| n = 1 in a group, no test |" in md
    page = parse_html(cmp / "compare.html")
    assert page.tables == 3 and len(page.srcs) == 1  # groups, tests, every checkpoint; the bars with CIs
    html = (cmp / "compare.html").read_text(encoding="utf-8")
    assert f"{mean:.1f} ± {half:.1f}" in html and "n = 1, no interval" in html


def test_one_run_given_twice_is_refused_and_unknown_recipes_stand_alone(tmp_path, capsys):
    (a,) = _reports(tmp_path, [("sigmoid", 0, 128)])
    assert main(["report", "compare", str(a), str(a / "report.json"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "seed 0 at step 1500 is given twice" in err and "pass each run's report once" in err

    # Records without a training config (HF dirs, foreign weights) are groups of one, labelled by checkpoint.
    rec = _record(tmp_path, "softmax", 1, *VALUES[("softmax", 1)])
    rec.update(config=None, run_dir=None, name="hf_export", step=None)
    b = write_report([rec], tmp_path / "hf_report")["json"].parent
    assert main(["report", "compare", str(a), str(b), "--out", str(tmp_path / "c2")]) == 0
    doc = json.loads((tmp_path / "c2" / "compare.json").read_text())
    assert [(g["label"], g["n"]) for g in doc["groups"]] == [("tiny", 1), ("hf_export", 1)]
    assert doc["tests"] == []


def test_estimate_and_welch_edge_cases():
    # Equal values: a zero-width interval; two constant groups are told apart exactly when their means differ.
    assert estimate([5.0, 5.0, 5.0]).half == 0.0
    assert welch([5.0, 5.0], [5.0, 5.0]).p == 1.0 and welch([5.0, 5.0], [6.0, 6.0]).p == 0.0
    assert welch([1.0], [2.0, 3.0]).p is None and welch([1.0], [2.0, 3.0]).verdict() == "n = 1 in a group, no test"
    a, b = [1.0, 2.0, 4.0, 8.0], [3.0, 3.5]
    assert welch(a, b).p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="no values"):
        estimate([])
