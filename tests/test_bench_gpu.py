"""`sigscale bench gpu --dry-run`: the GPU benchmark's every section runs on the CPU at tiny shapes."""
import json

import torch
import torch.nn.functional as F

from sigscale.bench_gpu import render_markdown, simulated_rank_loss
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


def test_simulated_rank_computes_rank_zeros_share_of_the_dense_loss():
    """The simulated rank's block code gives rank 0's loss share and image gradient of the dense loss (fp64)."""
    g = torch.Generator().manual_seed(0)
    b, world, d = 6, 4, 5
    x = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    texts = [F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1) for _ in range(world)]
    t, bias = torch.tensor(3.0, dtype=torch.float64), torch.full((1,), -2.0, dtype=torch.float64)
    loss, dx = simulated_rank_loss(x.detach(), texts, t, bias, chunk=4)
    logits = x @ torch.cat(texts).T * t + bias  # rank 0's rows of the global B x B logits
    z = -torch.ones_like(logits)
    z[:, :b] += 2 * torch.eye(b, dtype=torch.float64)
    dense = -F.logsigmoid(z * logits).sum() / b
    dense.backward()
    assert torch.allclose(loss, dense, rtol=1e-12, atol=0)
    assert torch.allclose(dx * t / b, x.grad, rtol=1e-10, atol=1e-14)
