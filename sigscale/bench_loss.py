"""Loss benchmark: per-rank peak memory and fwd+bwd time of the SigLIP loss implementations on gloo/CPU.

``run_loss_bench`` launches W processes per (world size, global batch) point and, in each, runs every
implementation once under the torch profiler (peak live tensor bytes from the CPU allocator's
allocation/free events: exact, unlike RSS, which glibc keeps high) and ``repeats`` more times for the
median wall time between barriers. Points that would take too long or need too much memory are
recorded as skipped with the reason. ``render_markdown`` turns the JSON into the table for BENCHMARKS.md.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import socket
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

IMPLS = ("sigscale", "open_clip_bidir", "open_clip_gather", "naive_allgather")
EXTRA_IMPLS = ("open_clip_shift", "open_clip_reduce")
MEMORY_METHOD = "peak live tensor bytes: torch.profiler allocation/free events of the CPU allocator"
QUICK = dict(world_sizes=(1, 2), batch_sizes=(64,), dim=32, repeats=1)


def peak_tensor_bytes(fn: Callable[[], Any]) -> Tuple[Any, int]:
    """Run ``fn`` under the torch profiler; return its result and the peak of bytes allocated minus freed."""
    from torch.profiler import ProfilerActivity, profile

    from sigscale.bench_memory import profiled_peak

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence kineto's "no GPU" error lines on CPU machines

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return result, profiled_peak(prof)


def _allocator() -> str:
    """The malloc this process really runs with (LD_PRELOAD may name a library that is absent)."""
    return "jemalloc" if "libjemalloc" in Path("/proc/self/maps").read_text() else "glibc"


def loss_step(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
              img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> float:
    """One fwd+bwd of loss ``fn`` on fresh leaves of ``img``/``txt``; the loss value."""
    i, t = img.detach().requires_grad_(), txt.detach().requires_grad_()
    loss = fn(i, t, scale, bias)
    loss.backward()
    scale.grad = bias.grad = None
    return float(loss.detach())


def measure_step(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> Dict[str, Any]:
    """One profiled fwd+bwd of loss ``fn``: its loss, seconds, peak live tensor bytes and peak RSS.

    The RSS peak (VmHWM) is reset first, so it is this step's; with glibc it overstates what the
    step keeps alive (freed buffers stay resident), with jemalloc preloaded much less so.
    """
    from sigscale.core.procstat import rss_hwm_bytes

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux ≥ 4.0)
    rss_before = rss_hwm_bytes()
    t0 = time.perf_counter()
    loss, peak = peak_tensor_bytes(lambda: loss_step(fn, img, txt, scale, bias))
    return {"loss": loss, "seconds": time.perf_counter() - t0, "peak_bytes": peak, "rss_before_bytes": rss_before,
            "rss_peak_bytes": rss_hwm_bytes(), "allocator": _allocator()}


def _naive_allgather(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor) -> torch.Tensor:
    """Baseline: all_gather texts with gradient, one dense b×B logit matrix per rank."""
    from sigscale.pretrain.loss import all_gather_with_grad

    rank, b = dist.get_rank(), img.shape[0]
    all_txt = all_gather_with_grad(txt) if dist.get_world_size() > 1 else txt
    logits = img @ all_txt.T * logit_scale.exp() + logit_bias
    z = -torch.ones_like(logits)
    z[:, rank * b:(rank + 1) * b].diagonal().fill_(1.0)
    return -F.logsigmoid(z * logits).sum() / b


def _loss_fn(impl: str, rank: int, world: int, chunk_size: Optional[int]) -> Callable:
    """The loss callable (img, txt, t', b) -> loss for one implementation name."""
    if impl == "sigscale":
        from sigscale.pretrain.loss import chunked_sigmoid_loss

        return lambda i, t, s, b: chunked_sigmoid_loss(i, t, s, b, chunk_size=chunk_size)
    if impl.startswith("open_clip_"):
        from open_clip.loss import SigLipLoss

        oc = SigLipLoss(rank=rank, world_size=world, dist_impl=impl[len("open_clip_"):])
        return lambda i, t, s, b: oc(i, t, s.exp(), b)  # open_clip takes t = exp(t')
    if impl == "naive_allgather":
        return _naive_allgather
    raise ValueError(f"unknown loss implementation {impl!r}; choose from {IMPLS + EXTRA_IMPLS}")


def _worker(rank: int, world: int, port: int, out_dir: str, batch: int, dim: int, chunk_size: Optional[int],
            repeats: int, impls: Sequence[str], seed: int) -> None:
    """One rank of one (W, B) point: every impl once profiled (memory), then ``repeats`` timed runs."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's gather uses a deprecated torch API
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    try:
        b = batch // world
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        img = F.normalize(torch.randn(b, dim, generator=gen), dim=-1)
        txt = F.normalize(torch.randn(b, dim, generator=gen), dim=-1)
        scale = torch.tensor([math.log(10.0)], requires_grad=True)
        bias = torch.tensor([-10.0], requires_grad=True)
        out: Dict[str, Any] = {"threads": torch.get_num_threads()}
        fns = {impl: _loss_fn(impl, rank, world, chunk_size) for impl in impls}
        for impl, fn in fns.items():  # the profiled run doubles as warm-up
            dist.barrier()
            out[impl] = m = measure_step(fn, img, txt, scale, bias)
            m["profiled_run_s"], m["times_s"] = m.pop("seconds"), []
        for rep in range(repeats):  # interleave impls, rotating the order, so load from elsewhere hits all alike
            for impl in impls[rep % len(impls):] + impls[:rep % len(impls)]:
                dist.barrier()
                t0 = time.perf_counter()
                loss_step(fns[impl], img, txt, scale, bias)
                dist.barrier()  # the step ends when the slowest rank is done
                out[impl]["times_s"].append(time.perf_counter() - t0)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _launch(world: int, **kwargs: Any) -> List[Dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench_loss_") as out_dir:
        a = kwargs
        mp.spawn(_worker, args=(world, port, out_dir, a["batch"], a["dim"], a["chunk_size"], a["repeats"],
                                a["impls"], a["seed"]), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]


def matmul_gflops() -> float:
    """Machine matmul throughput (all cores), to predict how long a point takes."""
    x = torch.randn(2048, 1152)
    x @ x.T
    t0 = time.perf_counter()
    for _ in range(3):
        x @ x.T
    return 3 * 2 * 2048 * 2048 * 1152 / (time.perf_counter() - t0) / 1e9


def _est_bytes_per_rank(impl: str, batch: int, world: int, dim: int, chunk_size: Optional[int]) -> int:
    """Predicted per-rank peak: measured ~5.5-7× one b×B fp32 matrix for the dense impls (3 kept for backward)."""
    b = batch // world
    if impl == "sigscale":
        from sigscale.pretrain.loss import default_chunk_size

        chunk = min(chunk_size or default_chunk_size(b), b)
        return 4 * (12 * b * dim + 2 * b * chunk)
    return 4 * 7 * b * batch


def mem_total() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bench_point(world: int, batch: int, dim: int, chunk_size: Optional[int], repeats: int, impls: Sequence[str],
                 max_seconds: float, mem_cap: float, gflops: float, seed: int) -> Dict[str, Any]:
    """Measure one (W, B) point, or record why it is skipped or failed."""
    point: Dict[str, Any] = {"world_size": world, "batch": batch, "local_batch": batch // world, "dim": dim,
                             "impls": {}}
    if batch % world:
        point.update(status="skipped", reason=f"batch {batch} not divisible by world size {world}")
        return point
    runnable = []
    for impl in impls:
        need = world * _est_bytes_per_rank(impl, batch, world, dim, chunk_size)
        if need > mem_cap:
            point["impls"][impl] = {"status": "skipped", "reason": f"needs ~{need / 2**30:.1f} GiB over "
                                    f"{world} ranks > cap {mem_cap / 2**30:.1f} GiB"}
        else:
            runnable.append(impl)
    # fwd+bwd = 3 matmuls of B×B×d over the whole machine, per impl and run; ×1.5 for everything else.
    est = 1.5 * len(runnable) * (repeats + 1) * 6 * batch * batch * dim / (gflops * 1e9)
    point["estimated_s"] = round(est, 1)
    if not runnable or est > max_seconds:
        point.update(status="skipped", reason=f"predicted {est:.0f} s > max_seconds {max_seconds:.0f}"
                     if runnable else "no implementation fits in memory")
        for impl in runnable:
            point["impls"][impl] = {"status": "skipped", "reason": point["reason"]}
        point["impls"] = {impl: point["impls"][impl] for impl in impls}
        return point
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    try:
        ranks = _launch(world, batch=batch, dim=dim, chunk_size=chunk_size, repeats=repeats,
                        impls=tuple(runnable), seed=seed)
    except Exception as exc:  # keep the other points; record why this one failed
        point.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[-500:]}")
        for impl in runnable:
            point["impls"][impl] = {"status": "failed", "reason": point["reason"]}
        point["impls"] = {impl: point["impls"][impl] for impl in impls}
        return point
    # Load average before/after: other work on the machine inflates times (all impls alike).
    point.update(status="ok", wall_s=round(time.perf_counter() - t0, 1), threads_per_rank=ranks[0]["threads"],
                 loadavg_1min=[round(load0, 2), round(os.getloadavg()[0], 2)])
    for impl in runnable:
        per_rank = [r[impl] for r in ranks]
        # Timings are between barriers, so every rank saw the same step times; take rank 0's. Without
        # timed repeats, the profiled run's time: from a barrier to the slowest rank's end.
        times = per_rank[0]["times_s"]
        point["impls"][impl] = {
            "status": "ok",
            "time_median_s": statistics.median(times) if times else max(r["profiled_run_s"] for r in per_rank),
            "times_s": per_rank[0]["times_s"],
            "profiled_run_s": max(r["profiled_run_s"] for r in per_rank),
            "peak_bytes_max": max(r["peak_bytes"] for r in per_rank),
            "peak_bytes_per_rank": [r["peak_bytes"] for r in per_rank],
            "loss_mean": statistics.fmean(r["loss"] for r in per_rank),
            "rss_peak_bytes_max": max(r["rss_peak_bytes"] for r in per_rank),
            "rss_peak_bytes_per_rank": [r["rss_peak_bytes"] for r in per_rank],
            "rss_before_bytes_max": max(r["rss_before_bytes"] for r in per_rank),
            "allocator": per_rank[0]["allocator"],
        }
    point["impls"] = {impl: point["impls"][impl] for impl in impls}  # table rows in the order asked for
    return point


def run_loss_bench(
    out_json: str | os.PathLike = "bench_results/loss.json",
    world_sizes: Iterable[int] = (1, 2, 4, 8),
    batch_sizes: Iterable[int] = (4096, 16384, 32768),
    dim: int = 1152,
    chunk_size: Optional[int] = None,
    repeats: int = 3,
    impls: Sequence[str] = IMPLS,
    max_seconds: float = 900.0,
    max_memory_gib: Optional[float] = None,
    quick: bool = False,
    seed: int = 0,
) -> Dict[str, Any]:
    """Benchmark the loss implementations at every (world size, global batch); write and return the JSON dict.

    ``max_seconds`` bounds the predicted wall time of one point and ``max_memory_gib`` (default 60% of
    RAM) the predicted memory of all its ranks; points or impls beyond them are recorded as skipped.
    ``quick=True`` is a smoke test: W = 1, 2, B = 64, d = 32, one timed repeat.
    """
    if quick:
        world_sizes, batch_sizes = QUICK["world_sizes"], QUICK["batch_sizes"]
        dim, repeats = QUICK["dim"], QUICK["repeats"]
    world_sizes, batch_sizes, impls = tuple(world_sizes), tuple(batch_sizes), tuple(impls)
    for impl in impls:
        if impl not in IMPLS + EXTRA_IMPLS:
            raise ValueError(f"unknown loss implementation {impl!r}; choose from {IMPLS + EXTRA_IMPLS}")
    mem_cap = (max_memory_gib * 2**30) if max_memory_gib else 0.6 * mem_total()
    gflops = matmul_gflops()
    points: List[Dict[str, Any]] = []
    results = {
        "config": {"world_sizes": list(world_sizes), "batch_sizes": list(batch_sizes), "dim": dim,
                   "chunk_size": chunk_size, "repeats": repeats, "impls": list(impls),
                   "max_seconds": max_seconds, "max_memory_gib": round(mem_cap / 2**30, 2)},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "matmul_gflops": round(gflops, 1),
                    "memory_method": MEMORY_METHOD,
                    "time_method": "median wall time of fwd+bwd between barriers (slowest rank)"},
        "points": points,
    }
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for world in world_sizes:
        for batch in batch_sizes:
            points.append(bench_point(world, batch, dim, chunk_size, repeats, impls, max_seconds, mem_cap, gflops,
                                       seed))
            out.write_text(json.dumps(results, indent=2))  # after every point: a long run keeps what it measured
    return results


def render_markdown(results: Dict[str, Any]) -> str:
    """Markdown table of a ``run_loss_bench`` result, with ratios against open_clip's bidir ring."""
    m = results["machine"]
    lines = [f"Peak memory: {m['memory_method']}, per rank (max over ranks). Time: {m['time_method']}. "
             f"{m['cpus']} CPUs shared by the W gloo processes, torch {m['torch']}, d = {results['config']['dim']}.",
             "",
             "| W | B | b/rank | impl | fwd+bwd median (s) | peak loss memory / rank (MiB) | time vs open_clip_bidir "
             "| memory vs open_clip_bidir | note |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for p in results["points"]:
        head = f"| {p['world_size']} | {p['batch']} | {p['local_batch']} "
        if p.get("status") != "ok" and not p["impls"]:
            lines.append(head + f"| – | – | – | – | – | {p['status']}: {p['reason']} |")
            continue
        ref = p["impls"].get("open_clip_bidir", {})
        for impl, r in p["impls"].items():
            if r.get("status") != "ok":
                lines.append(head + f"| {impl} | – | – | – | – | {r['status']}: {r['reason']} |")
                continue
            t_ratio = m_ratio = "–"
            if ref.get("status") == "ok":
                t_ratio = f"{r['time_median_s'] / ref['time_median_s']:.2f}×"
                m_ratio = f"{r['peak_bytes_max'] / ref['peak_bytes_max']:.3f}×"
            lines.append(head + f"| {impl} | {r['time_median_s']:.3f} | {r['peak_bytes_max'] / 2**20:.2f} | "
                         f"{t_ratio} | {m_ratio} | |")
    return "\n".join(lines) + "\n"
