"""Per-rank memory of the real training engine against world size (issue #4: sharding must shrink it).

``run_memory_bench`` launches ``sigscale.pretrain.train.train`` under torchrun for each (strategy, W)
and records, on every rank, the bytes of the tensors it owns after an optimizer step (parameters,
gradients and optimizer state; FSDP2 DTensors counted by their local shard) and the peak live tensor
bytes of the steady-state steps (torch profiler allocation/free events from the end of step 0 to the
end of the last step, added to the bytes live at its start). With Debian's libjemalloc2 present it is
preloaded and each rank's RSS high-water mark is recorded too. ``render_markdown`` makes the table.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch._C._autograd import DeviceType
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from sigscale import CONFIG_DIR
from sigscale.core.config import ConfigError, find_config
from sigscale.core.distributed import init_distributed, torchrun_command
from sigscale.core.manifest import write_shards
from sigscale.core.procstat import rss_hwm_bytes
from sigscale.curation.synthetic import shard_records
from sigscale.pretrain.config import PRESETS, load_config
from sigscale.pretrain.sharding import is_deepspeed
from sigscale.pretrain.tokenizer import train_tokenizer
from sigscale.pretrain.train import train

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
MEMORY_METHOD = ("owned bytes: parameters + gradients + optimizer state after an optimizer step (DTensor "
                 "to_local() shards); peak: bytes owned at the end of step 0 + peak of torch-profiler CPU "
                 "allocation/free events over the following steps")


def write_bench_data(root: Path, samples: int = 512, vocab_size: int = 600, seed: int = 4) -> Tuple[Path, Path]:
    """Generated webdataset shards + manifest and a SentencePiece tokenizer for engine benchmarks."""




    root = Path(root)
    shards = root / "shards"
    if not (shards / "manifest.json").is_file():
        write_shards(shard_records(samples, seed=seed), shards, samples_per_shard=64)
    tok = root / "tok.model"
    if not tok.is_file():
        train_tokenizer([r["txt"] for r in shard_records(600, seed=seed + 1)], tok, vocab_size=vocab_size)
    return shards, tok


def jemalloc_env(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` with jemalloc preloaded when installed: glibc would keep freed buffers in the RSS."""
    if os.path.isfile(JEMALLOC):
        env = dict(env, LD_PRELOAD=JEMALLOC)
    return env


def local_bytes(t: Any) -> int:
    """Bytes this rank stores for ``t``: the local shard of a DTensor, the tensor itself otherwise."""


    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def owned_bytes(opt: Any, model: Any) -> Dict[str, int]:
    """Parameter, gradient and optimizer-state bytes this rank holds for ``model`` trained by ``opt``."""
    params = list(model.parameters())
    state = [v for g in opt.param_groups for p in g["params"] for v in opt.state.get(p, {}).values()
             if isinstance(v, torch.Tensor)]
    return {"params": sum(local_bytes(p) for p in params),
            "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(v) for v in state), "master": 0, "param_tensors": len(params)}


def step_owned_bytes(opt: Any, model: Any) -> Dict[str, int]:
    """``owned_bytes`` read by a step hook, after the step released the gradients: each trainable
    parameter held a gradient of its own (local) size between backward and the optimizer step."""
    owned = owned_bytes(opt, model)
    owned["grads"] = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
    return owned


def profiled_peak(prof: Any) -> int:
    """Peak of (bytes allocated − bytes freed) on the CPU allocator over a finished profiler session
    (one call, as ``bench_loss.peak_tensor_bytes``, or steps in the middle of a training run)."""

    allocator = [e for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    in_time_order = (e.nbytes() for e in sorted(allocator, key=lambda e: e.start_ns()))
    return max(itertools.accumulate(in_time_order, initial=0))


def deepspeed_owned_bytes(engine: Any) -> Dict[str, int]:
    """Bytes a DeepSpeed ZeRO rank holds after its step: model partitions (``ds_tensor`` under ZeRO-3),
    the fp32 master partitions its torch optimizer steps, and their Adam moments. ZeRO releases its
    gradient partitions inside ``step()``, so none are held at this point."""

    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    master = sum(local_bytes(p) for p in base.state)
    moments = sum(local_bytes(v) for st in base.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    params = list(engine.module.parameters())
    return {"params": sum(local_bytes(getattr(p, "ds_tensor", p)) for p in params), "grads": 0,
            "optimizer": moments + master, "master": master, "param_tensors": len(params)}


class StepMemoryRecorder:
    """A training step hook: owned bytes after step 0, profiler peak over steps 1..last."""

    def __init__(self, steps: int):
        self.steps, self.calls, self.prof = steps, 0, None
        self.owned: Dict[str, int] = {}
        self.peak_delta: Optional[int] = None

    def __call__(self, event: Any) -> None:


        self.calls += 1
        if self.calls == 1:
            model = event.model
            self.owned = deepspeed_owned_bytes(model) if is_deepspeed(model) else step_owned_bytes(event.optimizer, model)
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.start()
        elif self.calls == self.steps and self.prof is not None:
            self.prof.stop()
            self.peak_delta = profiled_peak(self.prof)
            self.prof = None


def _worker(out_dir: str, config: str, overrides: List[str]) -> None:
    """One rank: train with a recorder attached, write rank<r>.json."""





    cfg = load_config(config, overrides)
    info = init_distributed()
    rec = StepMemoryRecorder(cfg.train.steps)
    t0 = time.perf_counter()
    result = train(cfg, info, resume=False, hooks=[rec])
    owned = sum(rec.owned[k] for k in ("params", "grads", "optimizer"))
    record = {"rank": info.rank, "world_size": info.world_size, **rec.owned, "owned": owned,
              "params_plus_optimizer": rec.owned["params"] + rec.owned["optimizer"],
              "peak_live_bytes": owned + rec.peak_delta if rec.peak_delta is not None else None,
              "rss_hwm_bytes": rss_hwm_bytes(),
              "allocator": "jemalloc" if JEMALLOC in os.environ.get("LD_PRELOAD", "") else "glibc",
              "train_s": time.perf_counter() - t0, "final_loss": result.losses[-1] if result.losses else None}
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_engine(world: int, config: str, overrides: Sequence[str], timeout: float = 600) -> List[Dict[str, Any]]:
    """Run the engine on ``world`` torchrun processes with the recorder; per-rank records."""
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as out:
        cmd = torchrun_command(world, "sigscale.bench_memory", [out, config, *overrides])
        env = jemalloc_env(dict(os.environ, OMP_NUM_THREADS="1", KINETO_LOG_LEVEL="5"))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"engine run W={world} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def resolve_config(name: str) -> Tuple[str, List[str]]:
    """A benchmark's towers: an experiment YAML, or a model preset trained with the tiny experiment's settings."""
    try:
        find_config(name)
        return name, []
    except ConfigError:
        if name not in PRESETS:
            raise ConfigError(f"benchmark config {name!r} is neither an experiment YAML in {CONFIG_DIR} nor a model "
                              f"preset; pass one of those or a preset from {sorted(PRESETS)}") from None
    return "tiny", [f"model.preset={name}", f"tokenizer.context_length={PRESETS[name].text.context_length}"]


def engine_overrides(shards: Path, tok: Path, out_dir: Path, batch: int, steps: int, strategy: str,
                     accum: int = 1, extra: Sequence[str] = ()) -> List[str]:
    """Dot-list overrides of a benchmark run: fp32, one log line per step, no checkpoint until the end."""
    return [f"data.shards={shards}", f"tokenizer.model={tok}", f"train.out_dir={out_dir}", f"train.steps={steps}",
            "train.warmup_steps=1", f"train.ckpt_every={100 * steps}", f"train.batch_size={batch}",
            f"train.accum_steps={accum}", f"train.strategy={strategy}", "train.precision=fp32", "train.log_every=1",
            "data.num_workers=1", "data.shuffle_buffer=64", *extra]


def split_strategy(spec: str) -> Tuple[str, List[str]]:
    """'fsdp' → ('fsdp', []); 'deepspeed:3' → ('deepspeed', ['train.zero_stage=3'])."""
    name, _, stage = spec.partition(":")
    return name, [f"train.zero_stage={stage}"] if stage else []


def _plan_strategy(cfg: Any) -> str:
    """The planner's name for the config's strategy (deepspeed → zero<stage>)."""
    t = cfg.train
    return {"deepspeed": f"zero{t.zero_stage}", "single": "ddp"}.get(t.strategy, t.strategy)


def planned_row(config: str, overrides: Sequence[str], tok: Path, world: int) -> Tuple[Any, Any]:
    """The config a benchmark run trains and the planner's row for it (room enough: one micro-batch)."""
    from sigscale.pretrain.plan import plan
    from sigscale.pretrain.tokenizer import Tokenizer

    cfg = load_config(config, list(overrides))
    # The engine sizes the text vocabulary from the tokenizer, as the planner must too.
    cfg.model.text.vocab_size = Tokenizer(str(tok)).vocab_size
    return cfg, plan(cfg, world, 2**50, strategies=(_plan_strategy(cfg),)).best


def run_memory_bench(out_json: str | os.PathLike = "bench_results/memory.json", config: str = "small",
                     world_sizes: Sequence[int] = (1, 2, 4), strategies: Sequence[str] = ("fsdp",),
                     batch: int = 64, steps: int = 4, extra: Sequence[str] = (), quick: bool = False,
                     workdir: Optional[str] = None) -> Dict[str, Any]:
    """Per-rank owned and peak bytes of the real engine for every (strategy, W); write and return JSON.

    ``strategies`` are ``train.strategy`` values; ``deepspeed:N`` picks ZeRO stage N.
    ``quick``: the tiny config, W = 1, 2, batch 16, 3 steps.
    """
    from sigscale.pretrain.config import check_world_size, load_config

    if quick:
        config, world_sizes, batch, steps = "tiny", (1, 2), 16, 3
    name = config
    config, preset = resolve_config(config)
    extra = [*preset, *extra]
    for strategy in strategies:  # the engine's own errors, before anything is launched
        for world in world_sizes:
            name_, stage = split_strategy(strategy)
            check_world_size(load_config(config, engine_overrides(Path("."), Path("."), Path("."), batch, steps,
                                                                  name_, extra=[*extra, *stage])), world)
    with tempfile.TemporaryDirectory(prefix="sigscale_bench_memory_") as tmp:
        results = _run_memory_bench(Path(workdir or tmp), out_json, config, world_sizes, strategies, batch, steps,
                                    extra)
    results["config"]["config"] = name  # the name asked for; its preset overrides are in "extra"
    Path(out_json).write_text(json.dumps(results, indent=2))
    return results


def _run_memory_bench(work: Path, out_json: str | os.PathLike, config: str, world_sizes: Sequence[int],
                      strategies: Sequence[str], batch: int, steps: int, extra: Sequence[str]) -> Dict[str, Any]:

    from sigscale.pretrain.plan import fsdp_rank_numel, parameter_shapes

    shards, tok = write_bench_data(work / "data")
    points: List[Dict[str, Any]] = []
    results: Dict[str, Any] = {
        "config": {"config": config, "world_sizes": list(world_sizes), "strategies": list(strategies),
                   "batch": batch, "steps": steps, "extra": list(extra)},
        "machine": {"cpus": os.cpu_count(), "memory_method": MEMORY_METHOD,
                    "rss": "VmHWM per rank" + (" with jemalloc preloaded" if os.path.isfile(JEMALLOC) else " (glibc)")},
        "points": points,
    }
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for strategy in strategies:
        for world in world_sizes:
            name_, stage = split_strategy(strategy)
            ov = engine_overrides(shards, tok, work / f"run_{strategy.replace(':', '')}_{world}", batch, steps, name_,
                                  extra=[*extra, *stage])
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            point: Dict[str, Any] = {"strategy": strategy, "world_size": world}
            try:
                ranks = launch_engine(world, config, ov)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                point.update(status="failed", reason=str(exc)[-1500:])
                points.append(point)
                out.write_text(json.dumps(results, indent=2))
                continue
            cfg, row = planned_row(config, ov, tok, world)
            shapes = parameter_shapes(cfg.model)
            # FSDP2 shards per parameter (exact per rank); ZeRO and DDP as the planner's busiest rank.
            predicted = ([4 * fsdp_rank_numel(shapes, world, r) for r in range(world)]
                         if name_ == "fsdp" and world > 1 else [row.params] * world)
            point.update(status="ok", wall_s=round(time.perf_counter() - t0, 1),
                         loadavg_1min=[round(load0, 2), round(os.getloadavg()[0], 2)], ranks=ranks,
                         planned_param_bytes_per_rank=predicted, planned_peak_bytes=row.peak)
            points.append(point)
            out.write_text(json.dumps(results, indent=2))
    return results


def render_markdown(results: Dict[str, Any]) -> str:
    """Markdown table of a ``run_memory_bench`` result (MiB, max over ranks; ratios against W = 1)."""
    c = results["config"]
    lines = [f"Config `{c['config']}`, global batch {c['batch']}, {c['steps']} steps, fp32, gloo. "
             f"{results['machine']['memory_method']}. RSS: {results['machine']['rss']}.", "",
             "| strategy | W | params / rank | grads / rank | optimizer / rank | params+optimizer / rank | vs W=1 "
             "| peak live tensors / rank | planner's peak / rank | RSS high-water / rank |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base: Dict[str, float] = {}
    mib = lambda x: f"{x / 2**20:.2f}"  # noqa: E731
    for p in results["points"]:
        if p["status"] != "ok":
            lines.append(f"| {p['strategy']} | {p['world_size']} | – | – | – | – | – | – | – | {p['status']} |")
            continue
        r = p["ranks"]
        po = max(x["params_plus_optimizer"] for x in r)
        base.setdefault(p["strategy"], po) if p["world_size"] == 1 else None
        ratio = f"{po / base[p['strategy']]:.3f}×" if p["strategy"] in base else "–"
        peak = max((x["peak_live_bytes"] or 0) for x in r)
        lines.append(f"| {p['strategy']} | {p['world_size']} | {mib(max(x['params'] for x in r))} | "
                     f"{mib(max(x['grads'] for x in r))} | {mib(max(x['optimizer'] for x in r))} | {mib(po)} | "
                     f"{ratio} | "
                     f"{mib(peak)} | {mib(p['planned_peak_bytes'])} | {mib(max(x['rss_hwm_bytes'] for x in r))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one torchrun rank: OUT_DIR CONFIG [overrides...]
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
