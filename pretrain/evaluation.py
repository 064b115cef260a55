"""Periodic evaluation inside training, as an object the caller hands in.

pretrain/ never imports eval/: the CLI (or a Slurm job) builds an :class:`Evaluator` from
``sigscale.eval`` and passes it to ``train``; tests pass any callable with the same shape.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, Tuple

import torch.nn as nn

from sigscale.core.distributed import DistInfo
from sigscale.pretrain.metrics import RunLog
from sigscale.pretrain.tokenizer import Tokenizer


class Evaluator(Protocol):
    def __call__(self, model: nn.Module, tokenizer: Tokenizer, info: DistInfo) -> Tuple[Dict[str, Any], Dict[str, float]]:
        """Collective (every rank calls it): rank 0 gets (full results, headline numbers), others ({}, {})."""


class PeriodicEval:
    """Runs the evaluator every ``every`` steps (0: never mid-run) and after the last step."""

    def __init__(self, evaluator: Optional[Evaluator], every: int, total_steps: int) -> None:
        self.evaluator, self.every, self.total = evaluator, every, total_steps

    def due(self, done: int) -> bool:
        return self.evaluator is not None and (done == self.total or bool(self.every and done % self.every == 0))

    def maybe_run(self, done: int, model: nn.Module, tokenizer: Tokenizer, info: DistInfo, log: RunLog) -> None:
        if self.due(done):
            results, headline = self.evaluator(model, tokenizer, info)
            log.eval(done, results, headline)
