"""Typed configs of an evaluation job: which checkpoints, which benchmarks, where their data lives.

``BenchmarkConfig`` is ``pretrain.config.EvalConfig``, so the training loop's ``eval:`` section and
``sigscale eval`` read the same keys. A YAML in ``configs/eval/`` holds an ``EvalJobConfig``; dot-list overrides apply on top.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from sigscale.core import config as core_config
from sigscale.core.config import ConfigError
from sigscale.eval.registry import NAMES, check_data
from sigscale.pretrain.config import EvalConfig

# One schema for the benchmarks, shared with the experiment's ``eval:`` section (periodic eval in training).
BenchmarkConfig = EvalConfig


@dataclass
class EvalJobConfig:
    checkpoints: List[str] = field(default_factory=list)
    tokenizer: str = ""  # SentencePiece .model; empty: the run's tokenizer.model or the HF dir's spiece.model
    model: str = ""  # model config for open_clip weights: a preset name or an experiment YAML
    out: str = ""  # report folder
    eval: BenchmarkConfig = field(default_factory=BenchmarkConfig)


def validate_benchmarks(cfg: BenchmarkConfig) -> None:
    """Unknown benchmark names and benchmarks without data stop before any model is loaded."""
    if not cfg.benchmarks:
        raise ConfigError(f"eval.benchmarks is empty; choose from {NAMES}, e.g. --benchmarks xm3600")
    for name in cfg.benchmarks:
        check_data(name, cfg)
    if cfg.batch_size <= 0:
        raise ConfigError(f"eval.batch_size={cfg.batch_size} must be positive")


def load_eval_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> EvalJobConfig:
    """An eval job from a YAML (a path or a name in configs/eval/) plus dot-list overrides (see validate_job)."""
    return core_config.load(EvalJobConfig, path, overrides, folders=("eval",))


def validate_job(cfg: EvalJobConfig) -> None:
    """A job that cannot run stops here, before any checkpoint is loaded."""
    if not cfg.checkpoints:
        raise ConfigError("no checkpoints to evaluate; pass --checkpoint PATH (or checkpoints=[...] in the config)")
    if not cfg.out:
        raise ConfigError("no report folder; pass --out reports/NAME (or out=... in the config)")
    validate_benchmarks(cfg.eval)
