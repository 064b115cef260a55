"""What a run tells the world: metrics.jsonl, eval.jsonl, TensorBoard scalars and the terminal.

Only rank 0 writes; on other ranks every method is a no-op, so the loop calls them unconditionally.
Throughput is measured over the steps since the previous log line (not ``log_every`` steps), so the
last step of a run and the first after a resume report what really happened.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, Optional

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from sigscale.core.progress import eta_seconds, format_duration
from sigscale.core.rundir import RunDir
from sigscale.pretrain.config import TrainConfig

# Dense bf16 peak of one device, for MFU (vendor datasheets). Others: set train.peak_tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "GH200": 989.0}


def peak_tflops(cfg: TrainConfig, device: torch.device) -> Optional[float]:
    """The device's bf16 peak for MFU: ``train.peak_tflops``, else the datasheet of a known GPU."""
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class RunLog:
    """Per-step metrics and evaluation results of one run, on rank 0."""

    def __init__(self, run: RunDir, cfg: TrainConfig, start_step: int, is_main: bool,
                 flops_per_sample: float, peak_total_tflops: Optional[float]) -> None:
        self.cfg, self.is_main = cfg, is_main
        self.flops_per_sample, self.peak = flops_per_sample, peak_total_tflops
        self.last_done, self.t_last = start_step, time.perf_counter()
        self.start_step, self.t_start = start_step, self.t_last
        self.metrics = self.tb = self.bar = None
        if not is_main:
            return
        run.truncate_from(run.metrics, start_step)
        run.truncate_from(run.evals, start_step + 1)
        self.metrics = open(run.metrics, "a")
        self.evals_path = run.evals
        self.tb = SummaryWriter(str(run.tensorboard), purge_step=start_step)
        self._rewrite_eval_at(start_step)
        # A progress bar with ETA on an interactive terminal; plain log lines otherwise (Slurm logs, CI).
        if sys.stdout.isatty():
            self.bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _rewrite_eval_at(self, step: int) -> None:
        """TensorBoard's purge drops every tag from ``step`` on, but the evaluation at the resume step ran
        before its checkpoint and stays (eval.jsonl keeps it): write its scalars again."""
        if not step or not self.evals_path.is_file():
            return
        for line in self.evals_path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("step") == step:
                self._eval_scalars(step, record.get("headline", {}))

    def _eval_scalars(self, step: int, headline: Dict[str, float]) -> None:
        for name, value in headline.items():
            self.tb.add_scalar(f"eval/{name.replace(' ', '/')}", value, step)

    def print(self, line: str) -> None:
        if self.is_main:
            self.bar.write(line) if self.bar else print(line, flush=True)

    def due(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.steps - 1

    def step(self, step: int, values: Dict[str, Any]) -> None:
        """Log ``values`` of ``step`` (loss, t, b, lr, ...) with throughput, when due."""
        if not self.is_main:
            return
        if self.due(step):
            now = time.perf_counter()
            images_per_s = self.cfg.batch_size * (step + 1 - self.last_done) / (now - self.t_last)
            self.last_done, self.t_last = step + 1, now
            # Model FLOPs (fwd + 2x for bwd); recomputation and the accumulation re-run are not counted.
            tflops = images_per_s * 3 * self.flops_per_sample / 1e12
            record = {"step": step, **values, "images_per_s": images_per_s, "tflops_per_s": tflops,
                      "mfu": tflops / self.peak if self.peak else None, "time": time.time()}
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            for key, value in record.items():
                if isinstance(value, float) and key != "time":
                    self.tb.add_scalar(f"train/{key}", value, step)
            self.print(f"step {step:>6}/{self.cfg.steps}  loss {record['loss']:.4f}  t {record['t']:.2f}  "
                       f"b {record['b']:.2f}  lr {record['lr']:.2e}  {images_per_s:.0f} img/s  "
                       f"eta {self._eta(step + 1, now)}")
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['loss']:.3f}")

    def _eta(self, done: int, now: float) -> str:
        """Time left at the mean step time since this process started (resume included)."""
        left = eta_seconds(now - self.t_start, done - self.start_step, self.cfg.steps - self.start_step)
        return format_duration(left or 0.0)

    def eval(self, done: int, results: Dict[str, Any], headline: Dict[str, float]) -> None:
        """One periodic evaluation: full results to eval.jsonl, headline numbers to TensorBoard and the terminal."""
        if not self.is_main:
            return
        with open(self.evals_path, "a") as f:
            f.write(json.dumps({"step": done, "eval": results, "headline": headline, "time": time.time()}) + "\n")
        self._eval_scalars(done, headline)
        self.print(f"eval @ {done}: " + "  ".join(f"{k} {v:.1f}" for k, v in headline.items()))

    def close(self) -> None:
        for handle in (self.bar, self.metrics, self.tb):
            if handle is not None:
                handle.close()
