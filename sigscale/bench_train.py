"""Training benchmark against the peer: sigscale's engine and open_clip's own trainer, side by side.

Both run as torchrun jobs on the same generated webdataset shards, the same tower shapes (open_clip
builds the identical timm ViT and open_clip text transformer from ``local-dir:`` configs, with our
SentencePiece tokenizer behind a Hugging Face ``SiglipTokenizer``, so vocabularies match too), the
same global batch, number of processes, optimizer settings and fp32 precision, gloo on CPU. Runs are
interleaved (sigscale, open_clip, sigscale, ...) so load from elsewhere hits both alike.

- images/s: each trainer's own per-step log (sigscale ``metrics.jsonl`` with ``log_every=1``,
  open_clip's ``samples/s`` log line with ``--log-every-n-steps 1``): global batch / wall time
  between consecutive step ends on rank 0, median over the steps after the first two.
- memory: peak RSS (VmHWM) of every rank process, polled from /proc by this process, with
  Debian's libjemalloc2 preloaded into both when installed (glibc keeps freed buffers in RSS).
- a capped point: the same command under a per-process address-space limit (RLIMIT_AS), at a
  batch where open_clip's dense b×B loss needs more than the cap; sigscale runs it with its
  chunked loss and embedding-cache accumulation.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sigscale.bench_memory import JEMALLOC, engine_overrides, jemalloc_env, resolve_config, write_bench_data
from sigscale.core.procstat import status_kib

PEERS = ("sigscale", "open_clip")
SKIP_STEPS = 2  # first steps pay for lazy init, optimizer state and worker start-up
OOM_MARKERS = ("can't allocate memory", "Cannot allocate memory", "MemoryError", "out of memory",
               "std::bad_alloc")
QUICK = dict(config="tiny", world=2, batch=32, steps=3, repeats=1, capped=False, samples=256)


def error_line(text: str) -> str:
    """The line of a failed run's log that names the error.

    A rank's own exception ("RuntimeError: ... can't allocate memory ...") wins over what torchrun
    adds after it, which also says "error" (ChildFailedError, "To enable traceback see: .../errors.html").
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()
             and "To enable traceback" not in ln and "ChildFailedError" not in ln]
    for pattern in (r"can't allocate memory|Cannot allocate memory|MemoryError|Killed",
                    r"\b\w*(Error|Exception)\b:", r"rror|memory"):
        hits = [ln for ln in lines if re.search(pattern, ln, re.I if pattern == r"rror|memory" else 0)]
        if hits:
            return hits[-1][:300]
    return (lines or ["(no output)"])[-1][:300]


def write_open_clip_model(out: Path, config: str, tokenizer_model: Path) -> str:
    """An open_clip ``local-dir:`` model with our towers' shapes and our tokenizer; returns its name."""
    from transformers import SiglipTokenizer

    from sigscale.pretrain.config import load_config
    from sigscale.pretrain.tokenizer import Tokenizer

    m = load_config(*resolve_config(config)).model
    v, t = m.vision, m.text
    vocab = Tokenizer(str(tokenizer_model)).vocab_size  # sigscale sizes the text vocabulary the same way
    out, vit = Path(out), Path(out) / "vit"
    vit.mkdir(parents=True, exist_ok=True)
    # timm reads architecture + model_args from a local folder: the same VisionTransformer arguments
    # as pretrain/towers.py build_vision_tower (no class token, MAP head, tanh-GELU, eps 1e-6).
    (vit / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_siglip_224", "num_classes": 0,
        "model_args": {"img_size": v.image_size, "patch_size": v.patch_size, "embed_dim": v.width, "depth": v.depth,
                       "num_heads": v.heads, "mlp_ratio": (v.mlp_dim + 0.5) / v.width, "class_token": False,
                       "global_pool": "map", "act_layer": "gelu_tanh" if v.act == "gelu_tanh" else "gelu"},
        "pretrained_cfg": {"input_size": [3, v.image_size, v.image_size], "mean": [0.5] * 3, "std": [0.5] * 3,
                           "num_classes": 0},
    }))
    text_cfg = {"context_length": t.context_length, "vocab_size": vocab, "width": t.width, "heads": t.heads,
                "layers": t.depth, "mlp_ratio": (t.mlp_dim + 0.5) / t.width, "no_causal_mask": True,
                "proj_bias": True, "pool_type": "last", "proj_type": "linear" if t.projection else "none",
                "norm_kwargs": {"eps": t.ln_eps}, "hf_tokenizer_name": str(out),
                "tokenizer_kwargs": {"clean": "canonicalize"}}
    if t.act == "gelu_tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    (out / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": v.width, "init_logit_bias": m.init_logit_bias, "custom_text": True,
                      "vision_cfg": {"image_size": v.image_size, "timm_model_name": f"local-dir:{vit}",
                                     "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
                      "text_cfg": text_cfg},
        # SigLIP preprocessing as sigscale's loader does it: squash-resize, values in [-1, 1].
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"},
    }))
    # open_clip's local-dir models load their Hugging Face tokenizer from the same folder.
    SiglipTokenizer(str(tokenizer_model), model_max_length=t.context_length).save_pretrained(str(out))
    return f"local-dir:{out}"


def _torchrun(world: int) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def check_point(config: str, world: int, batch: int, strategy: str, accum: int = 1) -> None:
    """Fail before any launch, with the engine's own ConfigError, if sigscale could not run this point."""
    from sigscale.pretrain.config import check_world_size, load_config

    yaml, preset = resolve_config(config)
    cfg = load_config(yaml, [*preset, *engine_overrides(Path("."), Path("."), Path("."), batch, 2, strategy, accum)])
    check_world_size(cfg, world)


def sigscale_command(config: str, world: int, shards: Path, tok: Path, out_dir: Path, batch: int, steps: int,
                     strategy: str, accum: int = 1) -> List[str]:
    """``sigscale train`` under torchrun (what ``sigscale train --nproc W`` runs); ``config`` as resolve_config."""
    yaml, preset = resolve_config(config)
    return _torchrun(world) + ["-m", "sigscale.cli", "train", "--config", yaml, "--no-resume", *preset,
                               *engine_overrides(shards, tok, out_dir, batch, steps, strategy, accum)]


def open_clip_command(model: str, world: int, shards: Path, batch: int, steps: int, accum: int = 1) -> List[str]:
    """open_clip's trainer (``open_clip_train.main --siglip``) with the same optimizer settings as sigscale's."""
    tars = sorted(p.name for p in shards.glob("*.tar"))
    first, last = tars[0].rsplit("-", 1)[1][:-4], tars[-1].rsplit("-", 1)[1][:-4]
    prefix = tars[0].rsplit("-", 1)[0]
    per_rank = batch // (world * accum)
    # Through peer_compat_shim (bottom of this file): two compatibility fixes, no behaviour change.
    return _torchrun(world) + ["-m", "sigscale.bench_train", "open_clip_train.main",
        "--siglip", "--model", model,
        "--train-data", f"{shards}/{prefix}-{{{first}..{last}}}.tar", "--dataset-type", "webdataset",
        "--dataset-resampled", "--train-num-samples", str(batch * steps), "--epochs", "1",
        "--batch-size", str(per_rank), "--accum-freq", str(accum), "--workers", "1", "--precision", "fp32",
        "--device", "cpu", "--dist-backend", "gloo", "--lr", "1e-3", "--beta1", "0.9", "--beta2", "0.95",
        "--eps", "1e-8", "--wd", "0.1", "--warmup", "1", "--grad-clip-norm", "1.0", "--save-frequency", "0",
        "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "1", "--report-to", "",
        "--name", "run", "--seed", "0"]  # logs go to ./logs/run/ (run with cwd=out_dir): torchrun's
    # own parser would reject "--logs" as an ambiguous abbreviation of its "--logs-specs".


def _children(pid: int) -> List[int]:
    kids: List[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _rank_of(pid: int) -> Optional[int]:
    """The RANK torchrun gave a worker process, None for anything else it started."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def run_job(cmd: Sequence[str], log_path: Path, cap_bytes: Optional[int] = None, cwd: Optional[Path] = None,
            timeout: float = 900, poll_s: float = 0.02) -> Dict[str, Any]:
    """Run a torchrun job; per-rank peak RSS (VmHWM) and virtual peak, exit status, wall time."""
    env = jemalloc_env(dict(os.environ, OMP_NUM_THREADS="1", KINETO_LOG_LEVEL="5"))

    def limit() -> None:  # runs in the child: torchrun and every rank inherit the address-space cap
        if cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=limit,
                                cwd=cwd)
        hwm: Dict[int, int] = {}  # rank -> KiB
        vm: Dict[int, int] = {}
        ranks: Dict[int, Optional[int]] = {}  # pid -> rank
        done = threading.Event()

        def watch() -> None:  # ranks are torchrun's direct children; VmHWM only grows, keep the last read
            while not done.is_set():
                for kid in _children(proc.pid):
                    # Not cached while unknown: between fork and exec a worker still has torchrun's environment.
                    rank = ranks.get(kid)
                    if rank is None:
                        rank = ranks[kid] = _rank_of(kid)
                    h, v = status_kib(kid, "VmHWM"), status_kib(kid, "VmPeak")
                    if rank is not None and h is not None:
                        hwm[rank], vm[rank] = max(hwm.get(rank, 0), h), max(vm.get(rank, 0), v or 0)
                time.sleep(poll_s)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        done.set()
        watcher.join()
    text = log_path.read_text(errors="replace")
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 2),
            "rss_peak_bytes_per_rank": [hwm[r] * 1024 for r in sorted(hwm)],
            "vm_peak_bytes_max": max(vm.values(), default=0) * 1024,
            "oom": rc != 0 and any(m in text for m in OOM_MARKERS), "log_tail": text[-1500:] if rc else "",
            "error_marker": next((m for m in OOM_MARKERS if m in text), None) if rc else None,
            "error_line": error_line(text) if rc else None}


def sigscale_throughput(run_dir: Path) -> List[float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["images_per_s"] for r in rows]


def open_clip_throughput(run_dir: Path) -> List[float]:
    text = (run_dir / "logs" / "run" / "out.log").read_text()
    return [float(x) for x in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.eE+-]+)/s,", text)]


def _summary(job: Dict[str, Any], rates: List[float]) -> Dict[str, Any]:
    steady = rates[SKIP_STEPS:] or rates
    return dict(job, images_per_s_per_step=[round(r, 2) for r in rates],
                images_per_s=statistics.median(steady) if steady else None,
                rss_peak_bytes=max(job["rss_peak_bytes_per_rank"], default=None))


def run_pair(name: str, work: Path, model: str, config: str, world: int, shards: Path, tok: Path, batch: int,
             steps: int, strategy: str, accum: int = 1, cap_bytes: Optional[int] = None,
             peers: Sequence[str] = PEERS) -> Dict[str, Any]:
    """One sigscale run and one open_clip run at the same point; their numbers and ratios."""
    out: Dict[str, Any] = {"name": name, "world_size": world, "global_batch": batch, "steps": steps,
                           "accum_steps": accum, "strategy": strategy, "cap_bytes": cap_bytes,
                           "loadavg_1min": round(os.getloadavg()[0], 2)}
    for peer in peers:
        run_dir = work / f"{name}_{peer}"
        if peer == "sigscale":
            cmd = sigscale_command(config, world, shards, tok, run_dir, batch, steps, strategy, accum)
        else:
            cmd = open_clip_command(model, world, shards, batch, steps, accum)
        shutil.rmtree(run_dir, ignore_errors=True)  # open_clip refuses to reuse an experiment folder
        run_dir.mkdir(parents=True)
        job = run_job(cmd, work / f"{name}_{peer}.log", cap_bytes, cwd=run_dir)
        rates: List[float] = []
        if job["rc"] == 0:
            rates = sigscale_throughput(run_dir) if peer == "sigscale" else open_clip_throughput(run_dir)
        out[peer] = _summary(job, rates)
        out[peer]["status"] = "ok" if job["rc"] == 0 else ("oom" if job["oom"] else "failed")
    s, o = out.get("sigscale", {}), out.get("open_clip", {})
    if s.get("status") == o.get("status") == "ok":
        out["throughput_ratio"] = s["images_per_s"] / o["images_per_s"]
        out["memory_ratio"] = s["rss_peak_bytes"] / o["rss_peak_bytes"]
    return out


def run_train_bench(out_json: str | os.PathLike = "bench_results/train.json", config: str = "small",
                    world: int = 2, batch: int = 256, steps: int = 10, repeats: int = 1,
                    strategies: Sequence[str] = ("ddp", "fsdp"), capped: bool = False,
                    cap_config: str = "tiny", cap_batch: int = 16384, cap_accum: int = 16, cap_steps: int = 2,
                    cap_gib: Optional[float] = None, samples: int = 4096, quick: bool = False,
                    workdir: Optional[str] = None) -> Dict[str, Any]:
    """Interleaved sigscale / open_clip training runs; per-pair images/s, per-rank peak RSS and ratios.

    ``repeats`` pairs per strategy (sigscale ``train.strategy``; open_clip always uses DDP). With
    ``capped`` (several minutes more), one more pair at ``cap_batch`` with ``cap_accum`` accumulation
    steps (both trainers) under an RLIMIT_AS of ``cap_gib`` per process (default: the virtual-memory
    peak of one uncapped sigscale step there, plus 1 GiB). ``quick``: tiny config, batch 32, 3 steps,
    one ddp pair, no capped point.
    """
    if quick:
        config, world, batch, steps = QUICK["config"], QUICK["world"], QUICK["batch"], QUICK["steps"]
        repeats, capped, samples, strategies = QUICK["repeats"], QUICK["capped"], QUICK["samples"], ("ddp",)
    for strategy in strategies:
        check_point(config, world, batch, strategy)
    if capped:
        check_point(cap_config, world, cap_batch, "ddp", cap_accum)
        samples = max(samples, cap_batch)  # training refuses a batch larger than its data (repeated samples)
    with tempfile.TemporaryDirectory(prefix="sigscale_bench_train_") as tmp:
        return _run_train_bench(Path(workdir or tmp), out_json, config, world, batch, steps, repeats, strategies,
                                capped, cap_config, cap_batch, cap_accum, cap_steps, cap_gib, samples)


def _run_train_bench(work: Path, out_json: str | os.PathLike, config: str, world: int, batch: int, steps: int,
                     repeats: int, strategies: Sequence[str], capped: bool, cap_config: str, cap_batch: int,
                     cap_accum: int, cap_steps: int, cap_gib: Optional[float], samples: int) -> Dict[str, Any]:
    shards, tok = write_bench_data(work / "data", samples=samples)
    models = {c: write_open_clip_model(work / f"open_clip_{c}", c, tok) for c in {config, cap_config}}
    pairs: List[Dict[str, Any]] = []
    results: Dict[str, Any] = {
        "config": {"config": config, "world_size": world, "global_batch": batch, "steps": steps, "repeats": repeats,
                   "strategies": list(strategies), "precision": "fp32", "backend": "gloo",
                   "capped": {"config": cap_config, "global_batch": cap_batch, "accum_steps": cap_accum,
                              "steps": cap_steps, "cap_gib": cap_gib} if capped else None},
        "machine": {"cpus": os.cpu_count(),
                    "allocator": "jemalloc (LD_PRELOAD)" if os.path.isfile(JEMALLOC) else "glibc",
                    "memory_method": "peak RSS (VmHWM) per rank process, polled from /proc every 20 ms",
                    "throughput_method": "global batch / step wall time on rank 0 from each trainer's own "
                                         f"per-step log, median over steps after the first {SKIP_STEPS}"},
        "pairs": pairs,
    }
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(repeats):
        for strategy in strategies:
            pairs.append(run_pair(f"{strategy}_r{rep}", work, models[config], config, world, shards, tok, batch,
                                  steps, strategy, peers=PEERS if len(pairs) % 2 == 0 else PEERS[::-1]))
            out.write_text(json.dumps(results, indent=2))
    if capped:
        cap = int(cap_gib * 2**30) if cap_gib else None
        if cap is None:  # calibrate: one uncapped sigscale step; its virtual-memory peak + 1 GiB
            probe = run_pair("cap_probe", work, models[cap_config], cap_config, world, shards, tok, cap_batch, 1,
                             "ddp", cap_accum, peers=("sigscale",))
            results["cap_probe"] = probe
            cap = probe["sigscale"]["vm_peak_bytes_max"] + 2**30 if probe["sigscale"]["status"] == "ok" else None
        if cap is not None:
            pairs.append(run_pair("capped", work, models[cap_config], cap_config, world, shards, tok, cap_batch,
                                  cap_steps, "ddp", cap_accum, cap_bytes=cap))
    results["ratios"] = {
        "throughput": [p["throughput_ratio"] for p in pairs if "throughput_ratio" in p and p["name"] != "capped"],
        "memory": [p["memory_ratio"] for p in pairs if "memory_ratio" in p and p["name"] != "capped"],
    }
    out.write_text(json.dumps(results, indent=2))
    return results


def render_markdown(results: Dict[str, Any]) -> str:
    """Markdown of a ``run_train_bench`` result: one row per run pair, then the repeats summarised per strategy."""
    m, c = results["machine"], results["config"]
    cap = c.get("capped")
    runs = (f"Config `{c['config']}`, W = {c['world_size']}, global batch {c['global_batch']}, {c['steps']} steps, "
            f"{c['repeats']} repeat(s) per strategy, interleaved. " if c["repeats"] else "")
    if cap:
        runs += (f"Capped point: config `{cap['config']}`, W = {c['world_size']}, global batch {cap['global_batch']} in "
                 f"{cap['accum_steps']} accumulation steps, {cap['steps']} steps, under a per-process RLIMIT_AS of "
                 + (f"{cap['cap_gib']} GiB. " if cap.get("cap_gib") else
                    "the virtual-memory peak of one uncapped sigscale step plus 1 GiB. "))
    lines = [f"{runs}{c['precision']}, {c['backend']}. images/s: {m['throughput_method']}. Memory: "
             f"{m['memory_method']}, allocator {m['allocator']}.", "",
             "| run | W | global batch | accum | sigscale strategy | sigscale img/s | open_clip img/s | img/s ratio "
             "| sigscale peak RSS / rank (MiB) | open_clip peak RSS / rank (MiB) | memory ratio | load | note |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def cell(r: Dict[str, Any], key: str, scale: float = 1.0) -> str:
        if r.get("status") != "ok":
            marker = r.get("error_marker")
            return f"{r.get('status', '–')} ({marker!r})" if marker else r.get("status", "–")
        return f"{r[key] / scale:.1f}"

    for p in results["pairs"]:
        s, o = p["sigscale"], p["open_clip"]
        note = f"RLIMIT_AS {p['cap_bytes'] / 2**30:.1f} GiB per process" if p.get("cap_bytes") else ""
        tr = f"{p['throughput_ratio']:.2f}×" if "throughput_ratio" in p else "–"
        mr = f"{p['memory_ratio']:.2f}×" if "memory_ratio" in p else "–"
        lines.append(f"| {p['name']} | {p['world_size']} | {p['global_batch']} | {p['accum_steps']} | "
                     f"{p['strategy']} | "
                     f"{cell(s, 'images_per_s')} | {cell(o, 'images_per_s')} | {tr} | "
                     f"{cell(s, 'rss_peak_bytes', 2**20)} | {cell(o, 'rss_peak_bytes', 2**20)} | {mr} | "
                     f"{p['loadavg_1min']} | {note} |")
    summary = summarise_repeats(results)
    if summary:
        lines += ["", "| sigscale strategy | pairs | img/s ratio, median (min–max) | memory ratio, median (min–max) |",
                  "|---|---:|---:|---:|"]
        for strategy, r in summary.items():
            lines.append(f"| {strategy} | {r['pairs']} | {r['throughput'][1]:.2f}× ({r['throughput'][0]:.2f}–"
                         f"{r['throughput'][2]:.2f}) | {r['memory'][1]:.2f}× ({r['memory'][0]:.2f}–{r['memory'][2]:.2f}) |")
    return "\n".join(lines) + "\n"


def summarise_repeats(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per strategy, over the uncapped pairs where both peers ran: (min, median, max) of each ratio."""
    by: Dict[str, List[Dict[str, Any]]] = {}
    for p in results["pairs"]:
        if not p.get("cap_bytes") and "throughput_ratio" in p:
            by.setdefault(p["strategy"], []).append(p)
    spread = lambda xs: (min(xs), statistics.median(xs), max(xs))  # noqa: E731
    return {k: {"pairs": len(v), "throughput": spread([p["throughput_ratio"] for p in v]),
                "memory": spread([p["memory_ratio"] for p in v])} for k, v in by.items()}


def peer_compat_shim(module: str, argv: List[str]) -> None:
    """Run open_clip's trainer ``module`` as __main__ with two compatibility fixes for this stack.

    1. webdataset ≥ 0.2.96 ends every shard with an ``eof_value={}`` marker that open_clip_train's
       ``group_by_keys_nothrow`` cannot read (KeyError 'fname'; webdataset issue #384, open_clip
       issue #935); the fix named there, ``eof_value=None``, is applied to its tar expander.
    2. It wraps the model as ``DistributedDataParallel(model, device_ids=[device])``, which torch
       rejects for CPU modules; DDP ignores device_ids on CPU anyway, so they are dropped there.
    Nothing else of the peer changes: its data pipeline, model, loss and step run as shipped.
    """
    import functools
    import runpy

    import open_clip_train.data as oc_data
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from webdataset.tariterators import tar_file_expander

    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    original = DistributedDataParallel.__init__

    def init(self: Any, module_: Any, device_ids: Any = None, *args: Any, **kwargs: Any) -> None:
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        original(self, module_, device_ids, *args, **kwargs)

    DistributedDataParallel.__init__ = init
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # under torchrun: MODULE [args...]
    peer_compat_shim(sys.argv[1], sys.argv[2:])
