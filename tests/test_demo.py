"""The shortened demo, end to end through the real CLI: curation from a loopback server, FSDP2
training over 2 processes, evaluation, and a report that shows the model really learned."""
import json
import subprocess
import sys

import pytest

from eval_fixtures import html_tables, parse_html
from sigscale.curation.synthetic import LANGUAGES, classes


@pytest.mark.slow
@pytest.mark.multiproc
def test_quick_demo_learns_far_above_chance_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "sigscale.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html_path = out / "report" / "report.html"
    assert f"report: {html_path.resolve()}" in proc.stdout

    # curation did real work and accounted for every row
    stats = json.loads((out / "shards" / "stats.json").read_text())
    assert stats["kept"] + stats["dropped_total"] == stats["input_rows"] == 4096
    assert stats["dropped"].get("http_404", 0) > 0 and stats["dropped"].get("near_duplicate", 0) > 0

    # the report: one record per kept checkpoint, the last one far above chance
    report = json.loads((out / "report" / "report.json").read_text())
    records = report["records"]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records) and records[-1]["step"] == 700
    zs, xm = records[-1]["benchmarks"]["zeroshot"], records[-1]["benchmarks"]["xm3600"]
    assert zs["top1"] > 2.5 * zs["chance_top1"], zs
    assert len(xm["languages"]) == 9
    chance_r5 = 5 * xm["chance_r@1"]
    assert xm["mean"]["i2t_r@5"] > 3 * chance_r5 and xm["mean"]["t2i_r@5"] > 3 * chance_r5, xm["mean"]
    # the multilingual zero-shot set (Babel-ImageNet layout) and the English retrieval set (COCO Karpathy layout)
    babel, coco = records[-1]["benchmarks"]["babel_imagenet"], records[-1]["benchmarks"]["coco"]
    assert {l: v["classes"] for l, v in babel["languages"].items()} == {l.upper(): len(classes()) for l in LANGUAGES}
    assert babel["mean"]["top1"] > 2 * babel["chance_top1"], babel["mean"]
    assert coco["images"] == 120 and coco["captions"] == 4 * 120 and coco["split"] == "test"
    assert coco["all"]["i2t_r@5"] > 2 * 5 * coco["chance_r@1"] and coco["all"]["t2i_r@5"] > 2 * 5 * coco["chance_r@1"]
    assert "Babel-ImageNet format, 9 languages" in proc.stdout and "Babel-ImageNet + COCO evaluated in" in proc.stdout
    # and training itself lowered the loss
    losses = [json.loads(l)["loss"] for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 3

    assert f"Trained on {stats['kept']} curated pairs of 4096 URL-list rows" in html_path.read_text(encoding="utf-8")
    tables = html_tables(html_path).tables
    title = next(t for t in tables if t.startswith("babel_imagenet per language"))
    rows = {r[0]: r for r in tables[title][1][1:]}
    for lang, v in babel["languages"].items():
        assert rows[lang][1:4] == [f"{v['top1']:.2f}", f"{v['top5']:.2f}", str(v["classes"])]
    coco_table = tables[next(t for t in tables if t.startswith("coco ("))][1]
    assert coco_table[1][coco_table[0].index("i2t_r@1")] == f"{coco['all']['i2t_r@1']:.2f}"
    view = tables[next(t for t in tables if t.startswith("Languages view"))][1]
    assert [r[0] for r in view[1:]] == sorted(LANGUAGES) and "—" not in sum(view, [])
    page = parse_html(html_path)
    assert page.tables >= 2 and len(page.srcs) >= 3
    assert all(src.startswith("data:image/png;base64,") for src in page.srcs)

    # summary.md: the demo's own table, rendered from the same stats, metrics and report
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert f"summary: {(out / 'summary.md').resolve()}" in proc.stdout
    assert f"| curation | {stats['kept']:,} of 4,096 URL-list rows kept" in summary
    assert "700 steps of global batch 64" in summary and f"→ {losses[-1]:.2f} |" in summary
    assert f"| eval: zeroshot | top1 {zs['top1']:.1f}%" in summary and "| eval: xm3600 |" in summary
