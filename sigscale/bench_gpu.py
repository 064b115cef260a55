"""The GPU benchmark (issue #19): one command to run the day a GPU is lent, in under 8 minutes.

``run_gpu_bench`` measures, on one device:

* **loss**: rank 0 of W = 8 simulated ranks at global batch B, with the eager and the compiled
  (``train.loss_kernel``) elementwise pass. The other ranks' text blocks come
  from a seeded generator (``SimulatedRing``) through the ring code the real ranks run
  (``loss.ring_sigmoid_loss``: buffers, blocks, gradient hops); no communication is
  timed. Beside it open_clip's ``SigLipLoss`` doing the same rank's work (its ``_loss`` per
  neighbour block, autograd), and the bare matrix products the loss cannot avoid (logits, G·y,
  Gᵀ·x per block) as the compute bound; fp32 and bf16 embeddings; all four interleaved.
* **towers**: the So400M/14 image tower and the So400M/16-i18n text tower, forward + backward in
  bf16 autocast, with and without activation checkpointing: step time, samples/s, TFLOP/s, MFU
  against the device's bf16 peak, peak memory and the largest micro-batch that fits (doubling).
* **data**: the training data stream's images/s per DataLoader worker (one CPU core each).

``--dry-run`` runs every section on the CPU at tiny shapes, so the suite keeps the code working.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from open_clip.loss import SigLipLoss

from sigscale.bench_memory import write_bench_data
from sigscale.bench_scale import SimulatedRing, simulated_rank_loss
from sigscale.pretrain.data import make_loader
from sigscale.pretrain.loss import default_chunk_size, warm_compiled_kernel
from sigscale.pretrain.metrics import PEAK_TFLOPS
from sigscale.pretrain.sharding import apply_activation_checkpointing
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import create_model, tower_flops_per_sample

FULL = dict(world=8, batches=(16384, 32768, 65536), dim=1152, repeats=3, towers=("so400m14_224", "so400m16_i18n_256"),
            tower_batch=64, max_batch=4096, data_samples=2048, workers=(1, 4))
DRY = dict(world=4, batches=(64, 128), dim=16, repeats=1, towers=("tiny",), tower_batch=4, max_batch=8,
           data_samples=128, workers=(1,))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> Dict[str, Optional[float]]:
    """Median seconds of ``fn`` after one warm-up call, and its peak device memory (CUDA only)."""
    fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def _embeddings(n: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, dim, generator=g, device=device)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


def _interleaved(fns: Dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                 warmups: Optional[Dict[str, Callable[[], Any]]] = None) -> Dict[str, Dict[str, Any]]:
    """Median seconds and peak device memory (CUDA) of each fn, repeats interleaved after a warm-up.

    Each round runs every fn once, rotating the order, so load from elsewhere hits them alike. The
    warm-up is each fn itself, or with ``warmups`` only the ones named there (e.g. a compile).
    """
    out: Dict[str, Dict[str, Any]] = {}
    times: Dict[str, List[float]] = {}
    for name, fn in fns.items():
        try:
            (fn if warmups is None else warmups.get(name, lambda: None))()
            _sync(device)
            times[name], out[name] = [], {"peak_bytes": None}
        except torch.cuda.OutOfMemoryError as e:
            out[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
    names = list(times)
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                out[name]["peak_bytes"] = max(out[name]["peak_bytes"] or 0, torch.cuda.max_memory_allocated(device))
    for name in names:
        out[name].update(seconds=statistics.median(times[name]), times=times[name])
    return out


def loss_point(batch: int, world: int, dim: int, dtype: torch.dtype, device: torch.device,
               repeats: int, peer: bool = True, full_warmup: bool = True) -> Dict[str, Any]:
    """Rank 0's share of the loss at global batch ``batch`` over ``world`` simulated ranks, every impl interleaved.

    ``peer=False`` leaves open_clip out; ``full_warmup=False`` warms up only the compiled kernel, on
    one block (on a CPU a full pass takes minutes and its first call costs nothing extra).
    """
    b = batch // world
    ring = SimulatedRing(world, b, dim, seed=1, dtype=dtype, device=device)
    x = _embeddings(b, dim, dtype, device, 0)
    texts = [ring.texts(r) for r in range(world)]  # [0]: rank 0's own texts; open_clip and the bound hold all
    t, bias = torch.tensor(10.0, device=device), torch.full((1,), -10.0, device=device)
    log_t = t.log()
    chunk = default_chunk_size(b)

    def ring_step(kernel: str) -> None:
        xi, yi = x.detach().requires_grad_(), texts[0].detach().requires_grad_()
        simulated_rank_loss(xi, yi, log_t, bias, ring, chunk, kernel=kernel).backward()

    oc = SigLipLoss(rank=0, world_size=1)

    def open_clip() -> None:
        xi = x.detach().requires_grad_()
        ys = [y.detach().requires_grad_() for y in texts]
        loss = sum(oc._loss(xi, y, t, bias, negative_only=r > 0) for r, y in enumerate(ys)) / b
        loss.backward()

    def bound() -> None:  # the three products per block, nothing elementwise
        xt = x.float()
        for y in texts:
            for j in range(0, b, chunk):
                yc = y[j:j + chunk].float()
                g = xt @ yc.T
                _ = g @ yc, g.T @ xt

    def compile_blocks() -> None:  # every block width the ring meets: its own texts and the two travelling halves
        widths = [min(chunk, n - j) for n in {b, (b + 1) // 2, b // 2} - {0} for j in range(0, n, chunk)]
        warm_compiled_kernel(b, widths, torch.promote_types(dtype, torch.float32), device)

    out = {"batch": batch, "world": world, "local": b, "dim": dim, "dtype": str(dtype).replace("torch.", ""),
           "chunk": chunk, "simulated": True, "repeats": repeats, "timing": "interleaved",
           "warmup": "full pass each" if full_warmup else "compile on one block"}
    fns = {"sigscale": lambda: ring_step("eager"), "sigscale_compiled": lambda: ring_step("compiled"),
           "open_clip": open_clip, "matmul_bound": bound}
    if not peer:
        del fns["open_clip"]
        out["open_clip"] = {"error": "not run"}
    out.update(_interleaved(fns, device, repeats, None if full_warmup else {"sigscale_compiled": compile_blocks}))
    for name in ("sigscale", "sigscale_compiled"):
        if "seconds" in out[name] and "seconds" in out["matmul_bound"]:
            out[f"{name}_over_bound"] = out[name]["seconds"] / out["matmul_bound"]["seconds"]
    if "seconds" in out["sigscale"] and "seconds" in out.get("open_clip", {}):
        out["open_clip_over_sigscale"] = out["open_clip"]["seconds"] / out["sigscale"]["seconds"]
    return out


def _tower_step(tower: torch.nn.Module, inputs: torch.Tensor, device: torch.device) -> None:
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with ctx:
        out = tower(inputs)
    out.float().square().mean().backward()


def _tower_inputs(which: str, cfg: Any, batch: int, device: torch.device) -> torch.Tensor:
    if which == "vision":
        return torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    return torch.randint(0, cfg.text.vocab_size, (batch, cfg.text.context_length), device=device)


def _largest_batch(tower: torch.nn.Module, which: str, cfg: Any, start: int, cap: int, device: torch.device) -> int:
    """The largest power-of-two micro-batch (from ``start``, up to ``cap``) whose step fits in memory."""
    fits, batch = 0, start
    while batch <= cap:
        try:
            _tower_step(tower, _tower_inputs(which, cfg, batch, device), device)
            tower.zero_grad(set_to_none=True)
            fits, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return fits


def _tower_point(preset: str, which: str, ckpt: bool, p: Dict[str, Any], device: torch.device,
                 peak_tflops: Optional[float]) -> Dict[str, Any]:
    model = create_model(preset)
    apply_activation_checkpointing(model, vision=ckpt and which == "vision", text=ckpt and which == "text")
    tower = (model.visual if which == "vision" else model.text).to(device)
    batch = p["tower_batch"]
    inputs = _tower_inputs(which, model.cfg, batch, device)
    timing = _timed(lambda: _tower_step(tower, inputs, device), device, p["repeats"])
    per_s = batch / timing["seconds"]
    tflops = per_s * 3 * tower_flops_per_sample(model.cfg)[which] / 1e12  # fwd + 2x for bwd, recompute not counted
    largest = _largest_batch(tower, which, model.cfg, batch, p["max_batch"], device)
    return {"preset": preset, "tower": which, "grad_checkpointing": ckpt, "batch": batch,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32 (CPU dry run)",
            "step_s": timing["seconds"], "samples_per_s": per_s, "tflops_per_s": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None, "peak_bytes": timing["peak_bytes"],
            "largest_micro_batch": largest, "largest_searched_up_to": p["max_batch"]}


def _data_point(workers: int, shards: Path, tok: Path, batch: int) -> Dict[str, Any]:
    loader = make_loader(shards, Tokenizer(tok, 16), 224, batch, num_workers=workers, seed=0, shuffle_buffer=64)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n, t0 = 0, time.perf_counter()
    for _ in range(8):
        n += next(it)["pixels"].shape[0]
    per_s = n / (time.perf_counter() - t0)
    return {"workers": workers, "images_per_s": per_s, "images_per_s_per_worker": per_s / workers,
            "resolution": 224}


def _device_peak(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def run_gpu_bench(out_json: str | os.PathLike = "bench_results/gpu.json", dry_run: bool = False) -> Dict[str, Any]:
    """Every section on this process's device (CUDA, or the CPU for ``dry_run``); JSON written and returned."""
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("sigscale bench gpu needs a CUDA device; use --dry-run to exercise it on the CPU")
    p, device = (DRY, torch.device("cpu")) if dry_run else (FULL, torch.device("cuda", 0))
    peak = _device_peak(device)
    t0 = time.perf_counter()
    dtypes = (torch.float32,) if dry_run else (torch.float32, torch.bfloat16)
    loss = [loss_point(b, p["world"], p["dim"], dt, device, p["repeats"]) for b in p["batches"] for dt in dtypes]
    towers = [_tower_point(preset, which, ckpt, p, device, peak)
              for preset in p["towers"] for which in ("vision", "text") for ckpt in (False, True)]
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as work:
        shards, tok = write_bench_data(Path(work), samples=p["data_samples"])
        data = [_data_point(w, shards, tok, 32) for w in p["workers"]]
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
               "peak_bf16_tflops": peak, "dry_run": dry_run, "seconds": time.perf_counter() - t0,
               "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "command": "sigscale bench gpu" + (" --dry-run" if dry_run else ""),
               "loss": loss, "towers": towers, "data": data}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(results, indent=1))
    return results


def run_bound_bench(out_json: str | os.PathLike = "bench_results/bound.json", batches: Sequence[int] = (16384,),
                    world: int = 1, dim: int = 1152, repeats: int = 1) -> Dict[str, Any]:
    """The loss section alone on the CPU: loss time against its matmul bound, eager and compiled (no peer)."""
    t0 = time.perf_counter()
    loss = [loss_point(b, world, dim, torch.float32, torch.device("cpu"), repeats, peer=False, full_warmup=False)
            for b in batches]
    results = {"device": f"cpu ({os.cpu_count()} cores)", "peak_bf16_tflops": None, "dry_run": False,
               "seconds": time.perf_counter() - t0, "date": datetime.date.today().isoformat(),
               "torch": torch.__version__, "loss": loss, "towers": [], "data": [],
               "command": f"sigscale bench bound --batch-sizes {','.join(map(str, batches))} --world-sizes {world} "
                          f"--dim {dim} --repeats {repeats}"}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(results, indent=1))
    return results


def _gib(n: Optional[float]) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def _cell(res: Dict[str, Any], key: str = "seconds") -> str:
    return res.get("error", "—") if key not in res else f"{res[key]:.3f}"


def render_markdown(r: Dict[str, Any]) -> str:
    """The tables for BENCHMARKS.md, exactly as they go there."""
    lines: List[str] = [f"Device: {r['device']} (bf16 peak {r['peak_bf16_tflops'] or '—'} TFLOP/s), torch "
                        f"{r['torch']}, {r['date']}, `{r['command']}`, {r['seconds']:.0f} s in all.", "",
                        "| B | W (simulated) | dtype | sigscale s | compiled s | open_clip s | matmul bound s "
                        "| sigscale / bound | compiled / bound | open_clip / sigscale | sigscale peak GiB | open_clip peak GiB |",
                        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["loss"]:
        ratio = lambda k: f"{x[k]:.2f}" if k in x else "—"  # noqa: E731
        lines.append(f"| {x['batch']} | {x['world']} | {x['dtype']} | {_cell(x['sigscale'])} "
                     f"| {_cell(x['sigscale_compiled'])} | {_cell(x['open_clip'])} | {_cell(x['matmul_bound'])} "
                     f"| {ratio('sigscale_over_bound')} | {ratio('sigscale_compiled_over_bound')} "
                     f"| {ratio('open_clip_over_sigscale')} "
                     f"| {_gib(x['sigscale'].get('peak_bytes'))} | {_gib(x['open_clip'].get('peak_bytes'))} |")
    if not r["towers"]:
        return "\n".join(lines)
    lines += ["", "| preset | tower | act. ckpt | batch | step s | samples/s | TFLOP/s | MFU | peak GiB | largest batch |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["towers"]:
        mfu = "—" if x["mfu"] is None else f"{100 * x['mfu']:.1f}%"
        lines.append(f"| {x['preset']} | {x['tower']} | {'yes' if x['grad_checkpointing'] else 'no'} | {x['batch']} "
                     f"| {x['step_s']:.3f} | {x['samples_per_s']:.0f} | {x['tflops_per_s']:.1f} | {mfu} "
                     f"| {_gib(x['peak_bytes'])} | {x['largest_micro_batch']} (searched to {x['largest_searched_up_to']}) |")
    lines += ["", "| DataLoader workers | images/s | images/s per worker |", "|---|---|---|"]
    lines += [f"| {x['workers']} | {x['images_per_s']:.0f} | {x['images_per_s_per_worker']:.0f} |" for x in r["data"]]
    return "\n".join(lines)
