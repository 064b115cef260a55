"""The layout of a training run: the one place that knows where a run keeps what.

::

    <run>/config.yaml          the config as built: resolved preset, the tokenizer's vocabulary, absolute paths
    <run>/tokenizer.model      a copy of the tokenizer the run trains with
    <run>/checkpoints/         step checkpoints (their inner layout: sigscale.pretrain.checkpoint)
    <run>/metrics.jsonl        one line per logged step
    <run>/eval.jsonl           one line per periodic evaluation
    <run>/tensorboard/         the same scalars for TensorBoard
    <run>/model.safetensors    final full weights, the config in their metadata
    <run>/train.lock           locked (flock) by the live training of this run: one at a time

A run dir is self-contained: evaluation, export and resume find everything through it, from any
working directory and any node.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import List, Optional, Union

PathLike = Union[str, Path]


class RunDir:
    """A training run's folder; ``RunDir.of(path)`` finds the run a checkpoint or weights file belongs to."""

    CONFIG = "config.yaml"
    TOKENIZER = "tokenizer.model"
    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.jsonl"
    EVALS = "eval.jsonl"
    TENSORBOARD = "tensorboard"
    WEIGHTS = "model.safetensors"
    LOCK = "train.lock"

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.root / self.TOKENIZER

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def evals(self) -> Path:
        return self.root / self.EVALS

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def weights(self) -> Path:
        return self.root / self.WEIGHTS

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    def exists(self) -> bool:
        return self.config.is_file()

    @classmethod
    def new(cls, name: str, parent: PathLike = "runs") -> "RunDir":
        """A fresh run dir for experiment ``name``: ``<parent>/<name>-<UTC time>``, one per launch."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        return cls(Path(parent) / f"{name}-{stamp}")

    @classmethod
    def of(cls, path: PathLike) -> Optional["RunDir"]:
        """The run that ``path`` (the run itself, its checkpoints/, a step checkpoint, its weights) belongs to."""
        p = Path(path).absolute()
        candidates = [p]
        if p.name == cls.WEIGHTS or p.name == cls.CHECKPOINTS:
            candidates.append(p.parent)
        if p.parent.name == cls.CHECKPOINTS:
            candidates.append(p.parents[1])
        for c in candidates:
            if (c / cls.CONFIG).is_file() and ((c / cls.CHECKPOINTS).is_dir() or (c / cls.WEIGHTS).is_file()):
                return cls(c)
        return None

    def read_jsonl(self, path: Path) -> List[dict]:
        """The records of one of the run's JSONL logs (metrics, evals); [] when it is absent."""
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_from(self, path: Path, step: int) -> None:
        """Drop the lines of steps >= ``step`` (a resumed run redoes them), so no step appears twice."""
        if not path.is_file():
            return
        records = self.read_jsonl(path)
        path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] < step))
