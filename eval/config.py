"""Typed configs of an evaluation job: which checkpoints, which benchmarks, where their data lives.

``BenchmarkConfig`` is ``pretrain.config.EvalConfig``, so the training loop's ``eval:`` section and
``sigscale eval`` read the same keys. A YAML in ``configs/eval/`` holds an ``EvalJobConfig``; dot-list overrides apply on top.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from sigscale import CONFIG_DIR
from sigscale.pretrain.config import ConfigError, EvalConfig

BENCHMARKS = ("imagenet", "zeroshot", "xm3600", "retrieval")
# The data key each benchmark reads, and the `sigscale eval` flag that sets it.
DATA_KEYS = {"imagenet": ("imagenet_dir", "--imagenet-root"), "zeroshot": ("classification_dir", "--classification-root"),
             "xm3600": ("xm3600_dir", "--xm3600-root"), "retrieval": ("retrieval_shards", "--retrieval-shards")}


# One schema for the benchmarks, shared with the experiment's ``eval:`` section (periodic eval in training).
BenchmarkConfig = EvalConfig


@dataclass
class EvalJobConfig:
    checkpoints: List[str] = field(default_factory=list)
    tokenizer: str = ""  # SentencePiece .model; empty: the run's tokenizer.model or the HF dir's spiece.model
    model: str = ""  # model config for open_clip weights: a preset name or an experiment YAML
    out: str = ""  # report folder
    eval: BenchmarkConfig = field(default_factory=BenchmarkConfig)


def _keys(schema: type, prefix: str = "") -> List[str]:
    out = []
    for f in dataclasses.fields(schema):
        out.append(prefix + f.name)
        if f.name == "eval":
            out += _keys(BenchmarkConfig, "eval.")
    return out


def validate_benchmarks(cfg: BenchmarkConfig) -> None:
    """Unknown benchmark names and benchmarks without data stop before any model is loaded."""
    if not cfg.benchmarks:
        raise ConfigError(f"eval.benchmarks is empty; choose from {list(BENCHMARKS)}, e.g. --benchmarks xm3600")
    for name in cfg.benchmarks:
        if name not in BENCHMARKS:
            close = difflib.get_close_matches(name, BENCHMARKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown benchmark {name!r}{hint}; choose from {list(BENCHMARKS)}")
        key, flag = DATA_KEYS[name]
        value = getattr(cfg, key, "")
        if not value:
            raise ConfigError(f"benchmark {name!r} needs eval.{key} ({flag}); set it to the data")
        if not Path(value).exists():
            raise ConfigError(f"eval.{key}={value} does not exist; fix the path")
    if cfg.batch_size <= 0:
        raise ConfigError(f"eval.batch_size={cfg.batch_size} must be positive")


def load_eval_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> EvalJobConfig:
    """An eval job from a YAML (path, or a name in configs/eval/) plus dot-list overrides (see validate_job)."""
    node = OmegaConf.create()
    source = str(path) if path else "<command line>"
    if path:
        p = Path(path)
        for candidate in (p, CONFIG_DIR / "eval" / p, CONFIG_DIR / "eval" / f"{p}.yaml", CONFIG_DIR / p):
            if candidate.is_file():
                p = candidate
                break
        else:
            raise ConfigError(f"eval config {path} does not exist; give a YAML path or a name in {CONFIG_DIR / 'eval'}")
        node = OmegaConf.load(p)
    try:
        node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
        cfg: EvalJobConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalJobConfig), node))
    except ConfigKeyError as e:
        key = getattr(e, "full_key", "?")
        close = difflib.get_close_matches(str(key), _keys(EvalJobConfig), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "see eval/config.py for the schema"
        raise ConfigError(f"unknown eval config key '{key}' in {source}; {hint}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid eval config in {source} at '{getattr(e, 'full_key', '?')}': "
                          f"{str(e).splitlines()[0]}; fix the value") from None
    return cfg


def validate_job(cfg: EvalJobConfig) -> None:
    """A job that cannot run stops here, before any checkpoint is loaded."""
    if not cfg.checkpoints:
        raise ConfigError("no checkpoints to evaluate; pass --checkpoint PATH (or checkpoints=[...] in the config)")
    if not cfg.out:
        raise ConfigError("no report folder; pass --out reports/NAME (or out=... in the config)")
    validate_benchmarks(cfg.eval)
