"""`sigscale bench scale` (issue #19): global batches of 32k to 1M measured, not extrapolated.

Three sections, each timed and measured on this machine:

* **real**: the chunked sigmoid loss, forward + backward, over W gloo processes at global batch B
  (``bench_loss.bench_point``, open_clip's peers recorded as skipped where they cannot fit), one
  profiled run per point: peak live tensor bytes and peak RSS per rank, with Debian's libjemalloc2
  preloaded so that freed buffers leave the RSS, and the time from a barrier to the slowest rank's end.
* **simulated**: one rank of a W-rank ring in its own process; the other ranks' texts come from a
  seeded generator (``SimulatedRing``) through the ring code the real ranks run
  (``loss.ring_sigmoid_loss``: the same buffers, blocks and gradient hops), same measurements.
* **train**: ``sigscale train`` on ``nproc`` torchrun processes (what ``sigscale train --nproc``
  runs) at a large global batch with embedding-cache accumulation, and open_clip_train at the same
  batch and accumulation (``bench_train.run_pair``), open_clip under an address-space cap of this
  machine's share (its dense b×B loss would otherwise push every other process out of memory).

A rank's loss work is 6·b·B·d flops (three products per logit), so at fixed b the time per rank
grows as B·b while its memory, O(b·(d + chunk)), stays flat: the table prints both.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.multiprocessing as mp

from sigscale.bench_loss import bench_point, matmul_gflops, measure_step, mem_total
from sigscale.core.errors import SigscaleError
from sigscale.pretrain.loss import ring_sigmoid_loss

SECTIONS = ("real", "simulated", "train")
PEER_IMPLS = ("sigscale", "open_clip_bidir", "open_clip_gather")
FULL = dict(dim=1152, real=((8, 32768), (8, 65536), (8, 131072)), simulated=((8, 131072), (64, 1048576)),
            train=dict(config="tiny", nproc=2, batch=32768, accum=32, steps=2))
# Quick: the same code at tiny shapes; the simulated W=2 point has the real one's shape, W=8 its b at 4× B.
QUICK = dict(dim=32, real=((2, 128),), simulated=((2, 128), (8, 512)), train=None)

class SimulatedRing:
    """Rank 0's view of a ring of ``world`` ranks: what the others send comes from a seeded generator.

    Rank q's texts are two halves (the ring's two streams), each drawn from its own seeded generator
    straight into the receive buffer the ring posted, so a simulated rank holds exactly the buffers
    a real one does. Gradient hops arriving from upstream ranks are zeros (their images are not
    simulated), so rank 0's text gradient is its own share; its image gradient, loss and scalar
    gradients are those of a real rank 0 whose peers hold ``texts(q)``. ``sent`` (when kept) records
    the text-gradient blocks rank 0 passes on, as (stream, step − 1, tensor).
    """

    def __init__(self, world: int, local_batch: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu"), keep_sent: bool = False):
        self.world, self.b, self.dim, self.seed = world, local_batch, dim, seed
        self.dtype, self.device = dtype, device
        self.received: Dict[int, int] = {}  # tag -> receives so far
        self.sent: Optional[List[tuple]] = [] if keep_sent else None

    def _fill(self, out: torch.Tensor, rank: int, stream: int) -> torch.Tensor:
        g = torch.Generator(device=out.device).manual_seed(self.seed * 1_000_003 + 2 * rank + stream)
        torch.randn(out.shape, generator=g, out=out)
        return out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True))

    def texts(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s L2-normalised texts (b, d): what a real rank would hold."""
        h = (self.b + 1) // 2
        out = torch.empty(self.b, self.dim, dtype=self.dtype, device=self.device)
        self._fill(out[:h], rank, 0)
        self._fill(out[h:], rank, 1)
        return out

    def __call__(self, sends: Sequence[tuple], recvs: Sequence[tuple]) -> List:
        """The ring's ``Exchange``: fill the receive buffers at once (nothing to wait on)."""
        if self.sent is not None:
            self.sent += [(tag // 2, self.received.get(tag, 0), t.clone()) for t, _, tag in sends if tag % 2]
        for buf, _, tag in recvs:
            k = self.received[tag] = self.received.get(tag, 0) + 1
            if tag % 2:
                buf.zero_()
            else:  # stream 0 brings rank −k's first half at its k-th receive, stream 1 rank +k's second half
                stream = tag // 2
                self._fill(buf, (-k if stream == 0 else k) % self.world, stream)
        return []


def simulated_rank_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                        ring: SimulatedRing, chunk: Optional[int] = None, kernel: str = "eager") -> torch.Tensor:
    """Rank 0's loss of ``ring.world`` ranks by the ring code the real ranks run (differentiable)."""
    ring.received.clear()
    return ring_sigmoid_loss(img, txt, logit_scale, logit_bias, ring, 0, ring.world, chunk, kernel)


def _sim_worker(_: int, out_dir: str, world: int, batch: int, dim: int, seed: int) -> None:
    """One simulated rank (all cores): a profiled fwd+bwd with its memory and time."""
    torch.set_num_threads(os.cpu_count() or 1)
    b = batch // world
    ring = SimulatedRing(world, b, dim, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(b, dim, generator=gen), dim=-1)
    scale = torch.tensor([math.log(10.0)], requires_grad=True)
    bias = torch.tensor([-10.0], requires_grad=True)
    m = measure_step(lambda i, t, s, bb: simulated_rank_loss(i, t, s, bb, ring), img, ring.texts(0), scale, bias)
    torch.save(dict(m, threads=torch.get_num_threads()), Path(out_dir) / "rank0.pt")


def _jemalloc_launch(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with jemalloc preloaded into the processes it spawns (when installed)."""
    from sigscale.bench_memory import jemalloc_env

    saved = os.environ.get("LD_PRELOAD")
    os.environ.update(jemalloc_env({}))
    try:
        return fn(*args)
    finally:
        if saved is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = saved


def _loss_row(mode: str, world: int, batch: int, ranks_here: int, m: Dict[str, Any], load: Tuple) -> Dict[str, Any]:
    return {"mode": mode, "world_size": world, "batch": batch, "local_batch": batch // world, "impl": "sigscale",
            "status": "ok", "ranks_run_here": ranks_here, "seconds": m["seconds"], "peak_bytes": m["peak_bytes"],
            "rss_peak_bytes": m["rss_peak_bytes"], "rss_before_bytes": m["rss_before_bytes"],
            "allocator": m["allocator"], "loadavg_1min": [round(x, 2) for x in load]}


def simulated_point(world: int, batch: int, dim: int, seed: int = 0) -> Dict[str, Any]:
    """Rank 0 of ``world`` ranks at global batch ``batch``, simulated in one fresh process."""
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as out:
        _jemalloc_launch(lambda: mp.spawn(_sim_worker, args=(out, world, batch, dim, seed), nprocs=1, join=True))
        m = torch.load(Path(out) / "rank0.pt")
    row = _loss_row(f"simulated (1 of {world} ranks)", world, batch, 1, m, (load0, os.getloadavg()[0]))
    return dict(row, threads_per_rank=m["threads"], loss=m["loss"])


def real_point(world: int, batch: int, dim: int, mem_cap: float, gflops: float, max_seconds: float,
               seed: int = 0) -> List[Dict[str, Any]]:
    """The loss over ``world`` gloo processes: sigscale measured, the peers measured or skipped with the reason."""
    p = _jemalloc_launch(bench_point, world, batch, dim, None, 0, PEER_IMPLS, max_seconds, mem_cap, gflops, seed)
    rows = []
    for impl, r in p["impls"].items():
        base = {"mode": f"real ({world} gloo processes)", "world_size": world, "batch": batch,
                "local_batch": batch // world, "impl": impl}
        if r.get("status") != "ok":
            rows.append(dict(base, status=r["status"], reason=r["reason"]))
            continue
        m = {"seconds": r["time_median_s"], "peak_bytes": r["peak_bytes_max"],
             "rss_peak_bytes": r["rss_peak_bytes_max"],
             "rss_before_bytes": r["rss_before_bytes_max"], "allocator": r["allocator"]}
        rows.append(dict(_loss_row(base["mode"], world, batch, world, m, tuple(p["loadavg_1min"])), impl=impl,
                         peak_bytes_per_rank=r["peak_bytes_per_rank"],
                         rss_peak_bytes_per_rank=r["rss_peak_bytes_per_rank"], threads_per_rank=p["threads_per_rank"]))
    return rows


def train_section(work: Path, config: str, nproc: int, batch: int, accum: int, steps: int) -> List[Dict[str, Any]]:
    """sigscale uncapped, then open_clip_train capped at sigscale's virtual-memory peak + 1 GiB, at one batch.

    Uncapped, open_clip's dense b×B loss would take what the machine's other processes hold (the
    OOM killer picks any of them); the cap is bench train's rule for its capped point.
    """
    from sigscale.bench_memory import write_bench_data
    from sigscale.bench_train import check_point, run_pair, write_open_clip_model

    check_point(config, nproc, batch, "ddp", accum)
    shards, tok = write_bench_data(work / "data", samples=batch)  # training refuses a batch larger than its data
    model = write_open_clip_model(work / "open_clip", config, tok)
    rows: List[Dict[str, Any]] = []
    cap: Optional[int] = None
    for peer in ("sigscale", "open_clip"):
        pair = run_pair(f"scale_{peer}", work, model, config, nproc, shards, tok, batch, steps, "ddp", accum,
                        cap_bytes=cap, peers=(peer,))
        r = pair[peer]
        rows.append({"trainer": peer, "world_size": nproc, "global_batch": batch, "accum_steps": accum,
                     "config": config, "steps": steps, "status": r["status"], "images_per_s": r["images_per_s"],
                     "images_per_s_per_step": r["images_per_s_per_step"],
                     "rss_peak_bytes_per_rank": r["rss_peak_bytes_per_rank"],
                     "vm_peak_bytes_max": r["vm_peak_bytes_max"],
                     "wall_s": r["wall_s"], "cap_bytes": cap, "loadavg_1min": pair["loadavg_1min"],
                     "error": r["error_line"] if r["status"] != "ok" else None})
        if peer == "sigscale" and r["status"] == "ok":
            cap = r["vm_peak_bytes_max"] + 2**30
        elif peer == "sigscale":  # without sigscale's peak there is no cap: do not let the peer take the machine
            break
    return rows


def run_scale_bench(out_json: str | os.PathLike = "bench_results/scale.json", sections: Sequence[str] = SECTIONS,
                    quick: bool = False, max_seconds: float = 4 * 3600, seed: int = 0,
                    workdir: Optional[str] = None) -> Dict[str, Any]:
    """Measure the asked sections (see the module docstring); the JSON is rewritten after every point."""
    from sigscale.bench_memory import JEMALLOC

    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SigscaleError(f"bench scale: unknown section(s) {bad} in --sections; choose from {list(SECTIONS)}")
    p = QUICK if quick else FULL
    gflops, mem_cap = matmul_gflops(), 0.6 * mem_total()
    jemalloc = os.path.isfile(JEMALLOC)
    results: Dict[str, Any] = {
        "command": "sigscale bench scale" + (" --quick" if quick else "")
                   + ("" if tuple(sections) == SECTIONS else f" --sections {','.join(sections)}"),
        "date": datetime.date.today().isoformat(), "dim": p["dim"], "quick": quick,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "matmul_gflops": round(gflops, 1),
                    "memory_gib": round(mem_total() / 2**30, 1),
                    "jemalloc": JEMALLOC if jemalloc else f"absent: {JEMALLOC} not found (apt install libjemalloc2); "
                                                          "RSS is glibc's, which keeps freed buffers"},
        "loss": [], "train": [],
    }
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "real" in sections:
        for world, batch in p["real"]:
            results["loss"] += real_point(world, batch, p["dim"], mem_cap, gflops, max_seconds, seed)
            out.write_text(json.dumps(results, indent=1))
    if "simulated" in sections:
        for world, batch in p["simulated"]:
            results["loss"].append(simulated_point(world, batch, p["dim"], seed))
            out.write_text(json.dumps(results, indent=1))
    if "train" in sections and p["train"]:
        with tempfile.TemporaryDirectory(prefix="bench_scale_train_") as tmp:
            results["train"] = train_section(Path(workdir or tmp), **p["train"])
    out.write_text(json.dumps(results, indent=1))
    return results


def _mib(n: Optional[float]) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def render_markdown(r: Dict[str, Any]) -> str:
    """The tables for BENCHMARKS.md, exactly as they go there."""
    m = r["machine"]
    lines = [f"`{r['command']}`, {r['date']}: d = {r['dim']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, torch "
             f"{m['torch']}, jemalloc: {m['jemalloc']}.",
             ""]
    if r["loss"]:
        lines += ["Live tensors: peak of torch-profiler allocation/free events in one fwd+bwd. RSS: VmHWM reset "
                  "before the step. Time: that one profiled fwd+bwd, from a barrier to the slowest rank's end. A "
                  "rank's work is 6·b·B·d flops; the real ranks share the CPUs, so per rank = time ÷ ranks run here.",
                  "",
                  "| mode | W | B | b/rank | impl | peak live tensors / rank (MiB) | peak RSS / rank (MiB) "
                  "| RSS rise in the step (MiB) | time (s) | ranks run here | s per rank | ns per rank per B·b "
                  "| load (1 min) | note |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for x in r["loss"]:
        head = f"| {x['mode']} | {x['world_size']} | {x['batch']} | {x['local_batch']} | {x['impl']} "
        if x["status"] != "ok":
            lines.append(head + f"| – | – | – | – | – | – | – | – | {x['status']}: {x['reason']} |")
            continue
        per_rank = x["seconds"] / x["ranks_run_here"]
        per_pair_ns = 1e9 * per_rank / (x["batch"] * x["local_batch"])
        lines.append(head + f"| {_mib(x['peak_bytes'])} | {_mib(x['rss_peak_bytes'])} "
                     f"| {_mib(x['rss_peak_bytes'] - x['rss_before_bytes'])} | {x['seconds']:.2f} "
                     f"| {x['ranks_run_here']} | {per_rank:.2f} | {per_pair_ns:.1f} "
                     f"| {x['loadavg_1min'][0]}–{x['loadavg_1min'][1]} | allocator {x['allocator']} |")
    if r["train"]:
        if r["loss"]:
            lines.append("")  # the loss table ends here; the header's blank line already precedes a lone train table
        lines += ["Training: `sigscale train` (embedding-cache accumulation) and open_clip_train at the same global "
                  "batch, same towers and shards; images/s from each trainer's own step log; peak RSS per rank "
                  "(VmHWM) with jemalloc; open_clip capped at sigscale's virtual-memory peak + 1 GiB per process.",
                  "",
                  "| trainer | W | global batch | accumulation | config | steps | status | images/s "
                  "| peak RSS / rank (MiB) | cap per process | load (1 min) | note |",
                  "|---|---:|---:|---:|---|---:|---|---:|---|---|---:|---|"]
        for x in r["train"]:
            rate = "–" if x["images_per_s"] is None else f"{x['images_per_s']:.1f}"
            cap = "none" if x["cap_bytes"] is None else f"RLIMIT_AS {x['cap_bytes'] / 2**30:.1f} GiB"
            rss = ", ".join(_mib(v) for v in x["rss_peak_bytes_per_rank"]) or "–"
            lines.append(f"| {x['trainer']} | {x['world_size']} | {x['global_batch']} | {x['accum_steps']} "
                         f"| {x['config']} | {x['steps']} | {x['status']} | {rate} | {rss} | {cap} "
                         f"| {x['loadavg_1min']} | {x['error'] or ''} |")
    return "\n".join(lines) + "\n"
