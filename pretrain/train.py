"""The training loop. One step reads top to bottom: data → towers → loss → backward → step → log."""
from __future__ import annotations

import json
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from sigscale.errors import SigscaleError
from sigscale.pretrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sigscale.pretrain.config import ConfigError, ExperimentConfig, TrainConfig, check_world_size, config_hash, to_yaml
from sigscale.pretrain.data import DataPosition, make_loader
from sigscale.pretrain.loss import chunked_sigmoid_loss, softmax_loss
from sigscale.pretrain.optim import build_optimizer, build_schedule, tower_of
from sigscale.pretrain.sharding import (DistInfo, backward, deepspeed_engine, full_state_dict, gradient_sync,
                                       init_distributed, optimizer_step, parallelize, uses_deepspeed)
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import SiglipModel, create_model, resolve_model_config, tower_flops_per_sample


class NonFiniteLossError(SigscaleError, RuntimeError):
    """Too many consecutive steps had a NaN/inf loss: the run stops instead of corrupting weights."""


@dataclass
class TrainResult:
    run_dir: Path
    losses: List[float] = field(default_factory=list)
    final_weights: Optional[Path] = None
    skipped_samples: Dict[str, int] = field(default_factory=dict)
    # True when ``should_stop`` ended the run early (preemption): a checkpoint was written, no weights.
    stopped_early: bool = False


def contrastive_loss(cfg: ExperimentConfig, img, txt, scale, bias, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss and its (mean positive logit, mean negative logit); NaNs for softmax."""
    if cfg.train.loss == "softmax":
        nan = torch.full((2,), float("nan"), device=img.device)
        return softmax_loss(img, txt, scale, group=group, validate=False), nan
    # No per-step validation: the engine guarantees shapes, and a non-finite loss is handled by the
    # skip-then-stop policy in train() rather than raised from inside the loss.
    loss, stats = chunked_sigmoid_loss(img, txt, scale, bias, group=group, chunk_size=cfg.train.loss_chunk_size,
                                       validate=False, return_stats=True)
    return loss, torch.stack([stats["pos_logit"], stats["neg_logit"]]).float()


# Dense bf16 peak of one device, for MFU (vendor datasheets). Others: set train.peak_tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "GH200": 989.0}


def peak_tflops(cfg: TrainConfig, device: torch.device) -> Optional[float]:
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@dataclass
class StepStats:
    loss: torch.Tensor  # this rank's share; the mean over ranks is the global-batch loss
    logits: torch.Tensor  # this rank's mean positive and negative logit
    t: float  # temperature exp(t') and bias b, read before the update
    b: float
    grad_norm: float = float("nan")
    finite: bool = True


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, micro_batches: List[Tuple[torch.Tensor, torch.Tensor]],
               cfg: ExperimentConfig, info: DistInfo) -> StepStats:
    """One optimizer step on the global contrastive batch made of this rank's ``micro_batches``.

    With one micro-batch: forward, loss, backward. With k > 1 (embedding-cache accumulation, as in
    GradCache, Gao et al. 2021): embed all k micro-batches without keeping activations, run the loss
    over the whole contrastive batch to get d loss / d embedding, then re-run the towers one
    micro-batch at a time and backpropagate those embedding gradients. The gradient equals the
    full-batch gradient; activation memory is that of one micro-batch.
    """
    cached = None
    if len(micro_batches) == 1:
        img, txt, scale, bias = model(*micro_batches[0])
    else:
        with torch.no_grad():
            cached = [model(pixels, tokens) for pixels, tokens in micro_batches]
        img = torch.cat([c[0] for c in cached]).requires_grad_()
        txt = torch.cat([c[1] for c in cached]).requires_grad_()
        scale = cached[0][2].detach().clone().requires_grad_()
        bias = cached[0][3].detach().clone().requires_grad_()
    loss, logits = contrastive_loss(cfg, img, txt, scale, bias, info.group)
    # Read now: FSDP frees the unsharded t', b once backward is done with them.
    stats = StepStats(loss.detach().clone(), logits, scale.detach().float().exp().item(), bias.item(),
                      finite=not _any_rank(not torch.isfinite(loss).item(), info))
    if not stats.finite:  # every rank agrees to skip, or ranks would diverge
        return stats
    if cached is None:
        backward(model, loss)
    else:
        loss.backward()  # gradients w.r.t. the cached embeddings, t and b only
        start = 0
        for j, (pixels, tokens) in enumerate(micro_batches):
            rows = slice(start, start + pixels.shape[0])
            start = rows.stop
            last = j == len(micro_batches) - 1
            with gradient_sync(model, enabled=last):
                i_j, t_j, s_j, b_j = model(pixels, tokens)
                surrogate = (i_j * img.grad[rows]).sum() + (t_j * txt.grad[rows]).sum()
                # t and b enter the loss once. They take part in every pass (with zero weight before the
                # last) so that DDP and ZeRO see the same parameters receive gradients in each backward.
                weight = 1.0 if last else 0.0
                surrogate = surrogate + weight * ((s_j * scale.grad).sum() + (b_j * bias.grad).sum())
                backward(model, surrogate)
    stats.grad_norm = optimizer_step(model, opt, cfg.train.grad_clip)
    return stats


def _any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    t = torch.tensor([float(flag)], device=info.device)
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Drop lines of steps a resumed run will redo (metrics, evals), so no file repeats a step."""
    if path.is_file():
        keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] < start_step]
        path.write_text("".join(l + "\n" for l in keep))


def load_pretrained(model: SiglipModel, cfg: TrainConfig) -> Set[str]:
    """Copy the towers named in ``train.init_towers`` from ``train.init_from``; return the names copied.

    t' and b come along only when both towers do: a new tower pair needs a fresh temperature and bias.
    """
    from sigscale.pretrain.interop import load_model

    source = load_model(cfg.init_from).state_dict()
    towers = set(cfg.init_towers) | ({"head"} if set(cfg.init_towers) >= {"vision", "text"} else set())
    copied = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if tower_of(name) not in towers:
                continue
            if name not in source or source[name].shape != param.shape:
                have = tuple(source[name].shape) if name in source else "missing"
                raise ConfigError(
                    f"train.init_from={cfg.init_from}: {name} is {have} there but {tuple(param.shape)} here; "
                    "use the same model preset as the checkpoint (and its tokenizer, for the text tower), "
                    "or leave that tower out of train.init_towers"
                )
            param.copy_(source[name])
            copied.add(name)
    return copied


def build_model(cfg: ExperimentConfig, info: DistInfo, vocab_size: int) -> Tuple[torch.nn.Module, Set[str]]:
    """Towers → pretrained weights → frozen towers → sharding; returns the model and the pretrained names.

    Under FSDP on several ranks only rank 0 ever holds the full weights, and on the host: every rank
    builds the towers on the meta device, shards them, allocates its shard, and receives its slice of
    rank 0's initialisation. Every rank then starts from exactly what one process would build.
    """
    torch.manual_seed(cfg.train.seed)
    meta = cfg.train.strategy == "fsdp" and info.world_size > 1
    pretrained: Set[str] = set()
    if not meta or info.is_main:
        model = create_model(cfg.model, text_vocab_size=vocab_size)
        if cfg.train.init_from:
            pretrained = load_pretrained(model, cfg.train)
    if meta:
        full = model.state_dict() if info.is_main else {}
        model = create_model(cfg.model, device="meta", text_vocab_size=vocab_size)
    for name, param in model.named_parameters():
        param.requires_grad_(tower_of(name) not in cfg.train.freeze)
    if meta:
        # Every rank needs the same set of pretrained names for its optimizer groups.
        names = [sorted(pretrained)]
        dist.broadcast_object_list(names, src=0)
        pretrained = set(names[0])
    model = parallelize(model, cfg.train, info)
    if meta:
        model.to_empty(device=info.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    torch.manual_seed(cfg.train.seed + 1)  # ranks consumed different amounts of randomness above
    return model, pretrained


def train(cfg: ExperimentConfig, info: Optional[DistInfo] = None, resume: bool = True,
          should_stop: Optional[Callable[[], bool]] = None) -> TrainResult:
    """Train from ``cfg`` on this process's rank, resuming from the run's latest checkpoint if any.

    ``should_stop`` is polled at every step boundary (e.g. a flag set by a preemption signal); when it
    is true on any rank, all ranks write a checkpoint of the steps done so far and return with
    ``stopped_early`` set, so a requeued job resumes exactly there.
    """
    info = info or init_distributed()
    micro = check_world_size(cfg, info.world_size)
    if cfg.eval.benchmarks:  # a typo in a benchmark must not wait for the first eval to surface
        from sigscale.eval.config import validate_benchmarks

        validate_benchmarks(cfg.eval)
    run_dir = Path(cfg.train.out_dir)
    tokenizer = Tokenizer(cfg.tokenizer.model, cfg.tokenizer.context_length, cfg.tokenizer.pad_id,
                          cfg.tokenizer.canonicalize)
    # The text vocabulary follows the tokenizer.
    model, pretrained = build_model(cfg, info, tokenizer.vocab_size)
    flops = tower_flops_per_sample(resolve_model_config(cfg.model, text_vocab_size=tokenizer.vocab_size))
    peak = peak_tflops(cfg.train, info.device)
    opt = build_optimizer(model, cfg.train, pretrained)
    sched = build_schedule(opt, cfg.train)
    if uses_deepspeed(cfg.train, info):
        model = deepspeed_engine(model, opt, cfg.train, info, micro)
    ckpt_dir = run_dir / "checkpoints"
    start_step, position, data_seed = 0, DataPosition.start(cfg.data.num_workers), cfg.data.seed + cfg.train.seed
    resume_from = latest_checkpoint(ckpt_dir) if resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, opt)
        start_step = state["shared"]["step"]
        sched.load_state_dict(state["shared"]["schedule"])
        if state["private"] is not None:
            position = DataPosition(**state["private"]["data"])
            torch.set_rng_state(state["private"]["rng"])
        else:  # another world size: streams are laid out differently, start a fresh shard order
            data_seed += start_step
            if info.is_main:
                warnings.warn(f"resuming {resume_from} written by {state['saved_world_size']} ranks on "
                              f"{info.world_size}: weights and optimizer resharded, data order restarts")
        if info.is_main:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    loader = make_loader(cfg.data.shards, tokenizer, cfg.model.vision.image_size, micro, info.rank,
                         info.world_size, cfg.data.num_workers, data_seed, cfg.data.shuffle_buffer, position)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)
        _truncate_metrics(run_dir / "eval.jsonl", start_step + 1)
    metrics = open(run_dir / "metrics.jsonl", "a") if info.is_main else None
    tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step) if info.is_main else None
    result = TrainResult(run_dir)
    skipped: Counter = Counter()
    bad_steps, t_last = 0, time.perf_counter()
    data = iter(loader)
    # A progress bar with ETA on an interactive terminal; plain log lines otherwise (Slurm logs, CI).
    bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True) \
        if info.is_main and sys.stdout.isatty() else None
    def maybe_evaluate(done: int) -> None:
        every = cfg.eval.every_steps
        if not cfg.eval.benchmarks or not (done == cfg.train.steps or (every and done % every == 0)):
            return
        from sigscale.eval.report import headline
        from sigscale.eval.run import evaluate

        results = evaluate(model, tokenizer, cfg.eval, info.rank, info.world_size)  # collective
        if info.is_main:
            with open(run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": done, "eval": results}) + "\n")
            numbers = headline({"benchmarks": results})
            for name, value in numbers.items():
                tb.add_scalar(f"eval/{name.replace(' ', '/')}", value, done)
            line = "  ".join(f"{k} {v:.1f}" for k, v in numbers.items())
            bar.write(f"eval @ {done}: {line}") if bar else print(f"eval @ {done}: {line}", flush=True)

    def checkpoint(done: int) -> None:
        save_checkpoint(ckpt_dir, done, model, opt,
                        shared={"step": done, "schedule": sched.state_dict()},
                        private={"data": {"batches": position.batches, "raw": list(position.raw)},
                                 "rng": torch.get_rng_state()},
                        keep_last=cfg.train.keep_last)

    for step in range(start_step, cfg.train.steps):
        if should_stop is not None and _any_rank(should_stop(), info):
            if latest_checkpoint(ckpt_dir) != ckpt_dir / f"step_{step:08d}":
                checkpoint(step)
            result.stopped_early = True
            break
        micro_batches = []
        for _ in range(cfg.train.accum_steps):
            batch = next(data)
            position.advance(batch)
            skipped.update(batch["skipped"])
            micro_batches.append((batch["pixels"].to(info.device), batch["tokens"].to(info.device)))
        stats = train_step(model, opt, micro_batches, cfg, info)
        if not stats.finite:
            bad_steps += 1
            warnings.warn(f"step {step}: non-finite loss {stats.loss.item()}, step skipped ({bad_steps} in a row)")
            if bad_steps >= cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{bad_steps} consecutive non-finite losses up to step {step}; lower train.lr, check the "
                    "data for broken samples, or raise train.max_nonfinite_steps"
                )
            opt.zero_grad(set_to_none=True)
            continue
        bad_steps = 0
        sched.step()
        # Each rank holds its share of the loss and its mean logits; the mean over ranks is the global value.
        summary = torch.cat([stats.loss.view(1).float(), stats.logits])
        if info.world_size > 1:
            dist.all_reduce(summary, op=dist.ReduceOp.AVG)
        global_loss, pos_logit, neg_logit = summary.tolist()
        result.losses.append(global_loss)
        if metrics and (step % cfg.train.log_every == 0 or step == cfg.train.steps - 1):
            now = time.perf_counter()
            images_per_s = cfg.train.batch_size * (1 if step == 0 else cfg.train.log_every) / (now - t_last)
            t_last = now
            # Model FLOPs (fwd + 2x for bwd); recomputation and the accumulation re-run are not counted.
            tflops = images_per_s * 3 * (flops["vision"] + flops["text"]) / 1e12
            record = {
                "step": step, "loss": result.losses[-1], "t": stats.t, "b": stats.b, "lr": sched.get_last_lr()[0],
                "pos_logit": pos_logit, "neg_logit": neg_logit,
                "grad_norm": stats.grad_norm, "images_per_s": images_per_s, "tflops_per_s": tflops,
                "mfu": tflops / (peak * info.world_size) if peak else None,
                "skipped": dict(skipped),
            }
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            for key, value in record.items():
                if isinstance(value, float):
                    tb.add_scalar(f"train/{key}", value, step)
            line = (f"step {step:>6}  loss {record['loss']:.4f}  t {record['t']:.2f}  b {record['b']:.2f}  "
                    f"lr {record['lr']:.2e}  {images_per_s:.0f} img/s")
            bar.write(line) if bar else print(line, flush=True)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        done = step + 1
        maybe_evaluate(done)  # before the checkpoint: a run killed in between redoes the step and its eval
        if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps:
            checkpoint(done)
    if bar:
        bar.close()
    result.skipped_samples = dict(skipped)
    if result.stopped_early:
        if info.is_main:
            metrics.close()
            tb.close()
        return result
    # Full (unsharded) weights for evaluation and export: every rank takes part in the gather.
    state = full_state_dict(model)
    if info.is_main:
        metrics.close()
        tb.close()
        result.final_weights = run_dir / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(result.final_weights),
                  metadata={"config_hash": config_hash(cfg), "config": to_yaml(cfg)})
    return result
