"""`sigscale bench scale`: large batches measured; a simulated rank runs the real ring's code and numbers."""
from __future__ import annotations

import json
import math
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from dist_helpers import run_distributed
from sigscale.bench_scale import SimulatedRing, render_markdown, simulated_rank_loss
from sigscale.cli import main
from sigscale.pretrain.loss import chunked_sigmoid_loss

B_LOC, DIM, WORLD, SEED, CHUNK = 5, 4, 3, 7, 2  # odd b: unequal ring halves; chunk not dividing b
LOG_T, BIAS = math.log(4.0), -1.5
TOL = dict(rtol=1e-10, atol=1e-13)


def _images(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return F.normalize(torch.randn(B_LOC, DIM, generator=g, dtype=torch.float64), dim=-1)


def _ring() -> SimulatedRing:
    return SimulatedRing(WORLD, B_LOC, DIM, seed=SEED, dtype=torch.float64, keep_sent=True)


def _grads(loss_fn, img: torch.Tensor, txt: torch.Tensor) -> Dict[str, torch.Tensor]:
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor([LOG_T], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([BIAS], dtype=torch.float64, requires_grad=True)
    loss = loss_fn(img, txt, scale, bias)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad, "bias": bias.grad}


def _real_rank(rank: int, world: int) -> Dict[str, torch.Tensor]:
    """A real gloo rank whose texts are the ones the simulated ring hands out for it."""
    return _grads(lambda i, t, s, b: chunked_sigmoid_loss(i, t, s, b, chunk_size=CHUNK),
                  _images(rank), _ring().texts(rank))


def _dense_rank0() -> Dict[str, torch.Tensor]:
    """Rank 0's loss share (1/b) Σ_{i rank 0} Σ_j ℓ_ij by autograd through the dense b×B logits."""
    texts = torch.cat([_ring().texts(q) for q in range(WORLD)]).requires_grad_()
    img = _images(0).requires_grad_()
    scale = torch.tensor([LOG_T], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([BIAS], dtype=torch.float64, requires_grad=True)
    logits = img @ texts.T * scale.exp() + bias
    z = -torch.ones_like(logits)
    z[:, :B_LOC] += 2 * torch.eye(B_LOC, dtype=torch.float64)
    loss = -F.logsigmoid(z * logits).sum() / B_LOC
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "texts": texts.grad, "scale": scale.grad, "bias": bias.grad}


@pytest.mark.multiproc
def test_simulated_rank_equals_real_rank_zero_and_the_dense_loss():
    """Loss, image and scalar gradients of the simulated rank 0 are the real ring's and the dense oracle's (fp64);
    the text gradients it computes (its own texts' share, and the blocks it passes on) are ∂L_0/∂y of the oracle."""
    real = run_distributed(_real_rank, WORLD)[0]
    ring = _ring()
    sim = _grads(lambda i, t, s, b: simulated_rank_loss(i, t, s, b, ring, CHUNK), _images(0), ring.texts(0))
    dense = _dense_rank0()
    for key in ("loss", "img", "scale", "bias"):
        torch.testing.assert_close(sim[key], real[key], **TOL)
        torch.testing.assert_close(sim[key], dense[key], **TOL)
    rows = lambda q: dense["texts"][q * B_LOC:(q + 1) * B_LOC]  # noqa: E731
    torch.testing.assert_close(sim["txt"], rows(0), **TOL)
    h = (B_LOC + 1) // 2
    assert len(ring.sent) == 2 * (WORLD - 1)  # every remote half got its gradient block, once
    for stream, step, block in ring.sent:
        q = (-(step + 1) if stream == 0 else step + 1) % WORLD
        half = rows(q)[:h] if stream == 0 else rows(q)[h:]
        torch.testing.assert_close(block / B_LOC, half, **TOL)  # sent unscaled; the owner applies 1/b


@pytest.mark.multiproc
def test_scale_quick_measures_real_and_simulated_points_and_renders(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert main(["bench", "scale", "--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    rows: List[Dict] = r["loss"]
    ours = [x for x in rows if x["impl"] == "sigscale"]
    assert [(x["mode"], x["world_size"], x["batch"]) for x in ours] == [
        ("real (2 gloo processes)", 2, 128), ("simulated (1 of 2 ranks)", 2, 128), ("simulated (1 of 8 ranks)", 8, 512)]
    for x in ours:
        assert x["status"] == "ok" and x["seconds"] > 0 and x["peak_bytes"] > 0
        assert x["rss_peak_bytes"] >= x["rss_before_bytes"] > 0
        assert x["allocator"] == ("jemalloc" if "absent" not in r["machine"]["jemalloc"] else "glibc")
    assert {x["impl"] for x in rows if x["mode"].startswith("real")} == {"sigscale", "open_clip_bidir",
                                                                          "open_clip_gather"}
    real128, sim128, sim512 = ours
    # Same shape, same ring buffers: the simulated rank holds what a real one does (the real one also
    # runs the input check's tiny all_gather). 4× the batch at the same b: a W=8 ring holds incoming
    # texts and gradient hops besides a W=2 one's (+~20% here), but nothing that grows with B (holding
    # every rank's texts would double it).
    assert abs(sim128["peak_bytes"] - real128["peak_bytes"]) <= 0.05 * real128["peak_bytes"]
    assert sim512["peak_bytes"] <= 1.3 * sim128["peak_bytes"]
    assert r["train"] == []  # the training section is left out of --quick (bench train --quick covers its runner)
    table = capsys.readouterr().out
    assert table == render_markdown(r) + "\n"
    assert "| simulated (1 of 8 ranks) | 8 | 512 | 64 | sigscale |" in table and "ns per rank per B·b" in table


def test_scale_rejects_an_unknown_section_in_one_line(capsys):
    assert main(["bench", "scale", "--sections", "real,gpu", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown section(s) ['gpu']" in err and "real" in err


def test_a_failed_trainer_is_named_by_its_exception_not_by_torchruns_trailer():
    """torchrun ends every failed run with a line that says "errors.html": the table must show the cause."""
    from sigscale.bench_train import error_line as _error_line

    log = ("Traceback (most recent call last):\n  File \"loss.py\", line 9, in forward\n"
           "RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
           "you tried to allocate 4294967296 bytes.\n"
           "E1128 torch.distributed.elastic.multiprocessing.api: failed (exitcode: 1)\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
           "traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html\n")
    assert _error_line(log).startswith("RuntimeError: [enforce fail at alloc_cpu.cpp:117]")
    assert "can't allocate memory" in _error_line(log)
    assert _error_line("") == "(no output)"
