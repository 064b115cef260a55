"""Evaluate models on the configured benchmarks: one API for ``sigscale eval`` and the training loop.

``evaluate(model, tokenizer, cfg, rank, world)`` is collective: every rank calls it with the same
config and its own (plain, DDP, DeepSpeed or FSDP2-sharded) model; each rank embeds a slice of
every set, and rank 0 returns the metrics (the other ranks get ``{}``). The numbers equal those of
one process. ``evaluate_checkpoints`` loads checkpoints from disk (any format ``load_model`` reads)
and evaluates each one.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from sigscale.core.distributed import DistInfo
from sigscale.core.rundir import RunDir
from sigscale.eval.config import BenchmarkConfig, EvalJobConfig, validate_benchmarks, validate_job
from sigscale.eval.registry import data_path, run_benchmark
from sigscale.eval.report import headline
from sigscale.pretrain.checkpoint import list_checkpoints
from sigscale.pretrain.config import load_config
from sigscale.pretrain.interop import load_model, resolve_checkpoint
from sigscale.pretrain.sharding import inference_module
from sigscale.pretrain.tokenizer import Tokenizer, TokenizerError


def evaluate(model: nn.Module, tokenizer: Tokenizer, cfg: BenchmarkConfig, rank: int = 0, world: int = 1) -> Dict[str, Dict]:
    """Run ``cfg.benchmarks`` on ``model``; rank 0 returns ``{benchmark: metrics}``, other ranks ``{}``.

    Collective over the default process group when ``world`` > 1: every rank must call it.
    The model's train/eval mode is restored afterwards.
    """
    validate_benchmarks(cfg)
    inference_module(model)  # register FSDP hooks once, before any rank starts encoding
    out: Dict[str, Dict] = {}
    for name in cfg.benchmarks:
        t0 = time.perf_counter()
        res = run_benchmark(name, model, tokenizer, cfg, rank, world)
        if rank == 0:  # what was evaluated on what: the data folder travels with its numbers
            data = str(data_path(name, cfg).absolute())
            out[name] = {**res, "data": data, "seconds": round(time.perf_counter() - t0, 2)}
    return out


class BenchmarkEvaluator:
    """The training loop's periodic evaluation (``sigscale.pretrain.evaluation.Evaluator``) for ``cfg``.

    Built before training starts, so a typo in a benchmark or a missing data folder stops the run
    at once instead of at the first evaluation.
    """

    def __init__(self, cfg: BenchmarkConfig) -> None:
        validate_benchmarks(cfg)
        self.cfg = cfg

    def __call__(self, model: nn.Module, tokenizer: Tokenizer, info: DistInfo) -> Tuple[Dict, Dict[str, float]]:
        results = evaluate(model, tokenizer, self.cfg, info.rank, info.world_size)
        return results, (headline({"benchmarks": results}) if info.is_main else {})


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    tokenizer: Tokenizer
    info: Dict[str, Any]  # checkpoint, kind, step, config_hash, run_dir, tokenizer, model shapes


def load_tokenizer(source, model: nn.Module, explicit: str = "") -> Tokenizer:
    """The checkpoint's tokenizer: ``explicit``, else the copy in its run dir, else the path its config
    records, else an HF dir's spiece.model."""
    ctx = model.cfg.text.context_length
    exp = source.experiment
    run = RunDir.of(source.weights)
    pad, canon = (exp.tokenizer.pad_id, exp.tokenizer.canonicalize) if exp else (1, True)
    if explicit:
        if not Path(explicit).is_file():
            raise TokenizerError(f"--tokenizer {explicit} does not exist; pass the SentencePiece .model "
                                 f"{source.path} was trained with")
        tok = Tokenizer(explicit, ctx, pad, canon)
    elif run is not None and run.tokenizer.is_file():
        tok = Tokenizer(run.tokenizer, ctx, pad, canon)
    elif exp is not None and exp.tokenizer.model:
        if not Path(exp.tokenizer.model).is_file():  # a path relative to where an old run was started, a moved file
            raise TokenizerError(f"no tokenizer is known for {source.path}: it has no run dir copy and the "
                                 f"tokenizer.model its config names ({exp.tokenizer.model}) does not exist here; "
                                 "pass --tokenizer PATH.model (the SentencePiece model it was trained with)")
        tok = Tokenizer(exp.tokenizer.model, ctx, exp.tokenizer.pad_id, exp.tokenizer.canonicalize)
    elif source.kind == "hf" and (source.weights / "spiece.model").is_file():
        tok = Tokenizer(source.weights / "spiece.model", ctx)
    else:
        raise TokenizerError(f"no tokenizer is known for {source.path}; pass --tokenizer PATH.model "
                             "(the SentencePiece model the checkpoint was trained with)")
    if tok.vocab_size > model.cfg.text.vocab_size:
        raise TokenizerError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but {source.path} embeds only "
                             f"{model.cfg.text.vocab_size}; pass the tokenizer the checkpoint was trained with")
    return tok


def _model_config_arg(model: str):
    """--model: a preset name, or an experiment YAML whose ``model`` section is used."""
    if not model:
        return None
    if model.endswith((".yaml", ".yml")):
        return load_config(model).model
    return model


def _recipe(exp: Any) -> str:
    """The training recipe in a few words, for reports."""
    t = exp.train
    return (f"{t.loss} loss, batch {t.batch_size}, {t.steps} steps, lr {t.lr:g}, {t.strategy}, {t.precision}, "
            f"seed {t.seed}")


def load_for_eval(checkpoint: str, tokenizer: str = "", model: str = "") -> LoadedCheckpoint:
    """Load a checkpoint and its tokenizer for evaluation (plain model on this process's device)."""
    src = resolve_checkpoint(checkpoint)
    net = load_model(src, _model_config_arg(model))
    tok = load_tokenizer(src, net, tokenizer)
    run = RunDir.of(src.weights)
    c = net.cfg
    info = {"checkpoint": str(checkpoint), "kind": src.kind, "step": src.step, "config_hash": src.config_hash,
            "run_dir": str(run.root) if run else None, "tokenizer": str(tok.path),
            "model": f"ViT {c.vision.width}x{c.vision.depth}/{c.vision.patch_size} @{c.vision.image_size}px, "
                     f"text {c.text.width}x{c.text.depth}, vocab {c.text.vocab_size}",
            "name": src.experiment.name if src.experiment else Path(checkpoint).name,
            "recipe": _recipe(src.experiment) if src.experiment else None,
            # The whole training config, so that `report compare` can tell seed replicates of one recipe apart.
            "config": dataclasses.asdict(src.experiment) if src.experiment else None}
    return LoadedCheckpoint(net, tok, info)


def expand_checkpoints(paths: List[str]) -> List[str]:
    """A run's ``checkpoints`` folder stands for all its complete step checkpoints, oldest first."""
    out: List[str] = []
    for p in paths:
        run = RunDir.of(p)
        steps = list_checkpoints(run.checkpoints) if run and Path(p).absolute() == run.checkpoints else []
        out += [str(s) for s in steps] if steps else [p]
    return out


def evaluate_checkpoints(job: EvalJobConfig, rank: int = 0, world: int = 1,
                         device: Optional[str] = None) -> List[Dict[str, Any]]:
    """Evaluate every checkpoint of ``job``; rank 0 gets one record per checkpoint, the others []."""
    validate_job(job)
    records = []
    checkpoints = expand_checkpoints(job.checkpoints)
    for i, ckpt in enumerate(checkpoints, 1):
        loaded = load_for_eval(ckpt, job.tokenizer, job.model)
        model = loaded.model.to(device) if device else loaded.model
        if rank == 0:  # long evaluations say where they are
            print(f"eval [{i}/{len(checkpoints)}] {ckpt}: {', '.join(job.eval.benchmarks)}", flush=True)
        t0 = time.perf_counter()
        metrics = evaluate(model, loaded.tokenizer, job.eval, rank, world)
        if rank == 0:
            records.append({**loaded.info, "benchmarks": metrics, "processes": world,
                            "seconds": round(time.perf_counter() - t0, 2)})
            print(f"eval [{i}/{len(checkpoints)}] done in {records[-1]['seconds']:.0f} s", flush=True)
    return records

