"""`sigscale bench gpu --dry-run`: the GPU benchmark's every section runs on the CPU at tiny shapes."""
import json

from sigscale.bench_gpu import render_markdown
from sigscale.cli import main


def test_gpu_bench_dry_run_writes_every_section_and_renders(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--dry-run", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["device"] == "cpu (dry run)"
    assert {(x["batch"], x["dtype"]) for x in r["loss"]} == {(64, "float32"), (128, "float32")}
    for x in r["loss"]:
        assert x["simulated"] and x["local"] == x["batch"] // x["world"]
        assert all(x[k]["seconds"] > 0 for k in ("sigscale", "open_clip", "matmul_bound"))
        assert x["sigscale_over_bound"] > 0
    assert {(x["tower"], x["grad_checkpointing"]) for x in r["towers"]} == {
        ("vision", False), ("vision", True), ("text", False), ("text", True)}
    assert all(x["largest_micro_batch"] >= x["batch"] and x["samples_per_s"] > 0 for x in r["towers"])
    assert r["data"][0]["images_per_s"] > 0
    table = capsys.readouterr().out
    assert table == render_markdown(r) + "\n" and "| 128 | 4 | float32 |" in table
