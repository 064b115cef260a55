"""The training loop. One step reads top to bottom: data → towers → loss → backward → step → log.

``train`` sets up (run dir, tokenizer, model, optimizer, resume), then loops; what happens around
a step lives in named parts: :class:`~sigscale.pretrain.metrics.RunLog` (metrics.jsonl, TensorBoard,
terminal), :class:`~sigscale.pretrain.checkpoint.Checkpointer`, :class:`~sigscale.pretrain.evaluation.PeriodicEval`
(an evaluator handed in by the caller), the non-finite-loss policy and the preemption stop. Step
hooks (``StepEvent``) let benchmarks and tests look at each step without patching anything.
"""
from __future__ import annotations

import dataclasses
import filecmp
import shutil
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from sigscale.core.config import ConfigError, config_hash, to_yaml
from sigscale.core.distributed import DistInfo, any_rank, init_distributed, raise_on_any_rank
from sigscale.core.errors import SigscaleError
from sigscale.core.manifest import load_manifest
from sigscale.core.rundir import RunDir
from sigscale.core.runlock import RunBusyError, RunLock
from sigscale.pretrain.checkpoint import Checkpointer, discard_partial, latest_checkpoint
from sigscale.pretrain.config import (ExperimentConfig, TrainConfig, check_world_size, config_from_yaml, resume_changes,
                                       with_run_dir)
from sigscale.pretrain.data import DataPosition, check_input, make_loader
from sigscale.pretrain.evaluation import Evaluator, PeriodicEval
from sigscale.pretrain.interop import load_model
from sigscale.pretrain.loss import chunked_sigmoid_loss, softmax_loss
from sigscale.pretrain.metrics import RunLog, peak_tflops
from sigscale.pretrain.optim import build_optimizer, build_schedule, tower_of
from sigscale.pretrain.sharding import (backward, compute_precision, deepspeed_engine, full_state_dict, gradient_sync,
                                       optimizer_step, parallelize, uses_deepspeed)
from sigscale.pretrain.tokenizer import Tokenizer, train_tokenizer
from sigscale.pretrain.towers import SiglipModel, count_params, create_model, tower_flops_per_sample


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
                                       kernel=cfg.train.loss_kernel, validate=False, return_stats=True)
    return loss, torch.stack([stats["pos_logit"], stats["neg_logit"]]).float()


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
        with compute_precision(cfg.train, info):
            img, txt, scale, bias = model(*micro_batches[0])
    else:
        with torch.no_grad(), compute_precision(cfg.train, info):
            cached = [model(pixels, tokens) for pixels, tokens in micro_batches]
        img = torch.cat([c[0] for c in cached]).requires_grad_()
        txt = torch.cat([c[1] for c in cached]).requires_grad_()
        scale = cached[0][2].detach().clone().requires_grad_()
        bias = cached[0][3].detach().clone().requires_grad_()
    loss, logits = contrastive_loss(cfg, img, txt, scale, bias, info.group)
    # Read now: FSDP frees the unsharded t', b once backward is done with them.
    stats = StepStats(loss.detach().clone(), logits, scale.detach().float().exp().item(), bias.item(),
                      finite=not any_rank(not torch.isfinite(loss).item()))
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
                with compute_precision(cfg.train, info):
                    i_j, t_j, s_j, b_j = model(pixels, tokens)
                surrogate = (i_j * img.grad[rows]).sum() + (t_j * txt.grad[rows]).sum()
                # t and b enter the loss once. They take part in every pass (with zero weight before the
                # last) so that DDP and ZeRO see the same parameters receive gradients in each backward.
                weight = 1.0 if last else 0.0
                surrogate = surrogate + weight * ((s_j * scale.grad).sum() + (b_j * bias.grad).sum())
                backward(model, surrogate)
    stats.grad_norm = optimizer_step(model, opt, cfg.train.grad_clip)
    return stats


def load_pretrained(model: SiglipModel, cfg: TrainConfig) -> Set[str]:
    """Copy the towers named in ``train.init_towers`` from ``train.init_from``; return the names copied.

    t' and b come along only when both towers do: a new tower pair needs a fresh temperature and bias.
    """
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


@dataclass
class StepEvent:
    """What a step hook sees after each optimizer step (benchmarks measure memory here)."""
    step: int
    model: torch.nn.Module  # as the step calls it: FSDP2 module, DDP wrapper or DeepSpeed engine
    optimizer: torch.optim.Optimizer
    stats: StepStats


StepHook = Callable[[StepEvent], None]


def _install_tokenizer(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> None:
    """Put the tokenizer into the run: a copy of ``tokenizer.model``, or one trained on ``data.caption_corpus``."""
    t = cfg.tokenizer
    if not t.model and not cfg.data.caption_corpus:
        raise ConfigError("tokenizer.model is empty and so is data.caption_corpus; set tokenizer.model=PATH.model "
                          "(`sigscale tokenizer` trains one) or data.caption_corpus=captions.txt to train one here")
    # Checked on every rank, so that a bad path fails everywhere alike instead of hanging a barrier.
    if t.model:
        Tokenizer(t.model)
    elif not Path(cfg.data.caption_corpus).is_file():
        raise ConfigError(f"data.caption_corpus={cfg.data.caption_corpus} is not a file; give the captions.txt "
                          "that `sigscale curate` writes, or set tokenizer.model")
    if not info.is_main:
        return
    run.root.mkdir(parents=True, exist_ok=True)
    if not t.model:
        train_tokenizer(cfg.data.caption_corpus, run.tokenizer, vocab_size=t.vocab_size, model_type=t.model_type)
    elif Path(t.model).absolute() != run.tokenizer:
        shutil.copyfile(t.model, run.tokenizer)


def prepare_tokenizer(cfg: ExperimentConfig, run: RunDir, info: DistInfo, resume: bool = True) -> Tokenizer:
    """The run's own copy of its tokenizer. A run that resumes keeps it: a different file given now is refused."""
    t = cfg.tokenizer
    if resume and latest_checkpoint(run.checkpoints) is not None and run.tokenizer.is_file():
        if t.model and Path(t.model).absolute() != run.tokenizer and not filecmp.cmp(t.model, run.tokenizer, False):
            raise ConfigError(f"tokenizer.model={t.model} differs from the tokenizer {run.root} was trained with; "
                              "resume without tokenizer.model (the run keeps its copy) or start a new train.out_dir")
    else:
        _install_tokenizer(cfg, run, info)
    if info.world_size > 1:
        dist.barrier()
    return Tokenizer(run.tokenizer, t.context_length, t.pad_id, t.canonicalize)


def built_config(cfg: ExperimentConfig, tokenizer: Tokenizer) -> ExperimentConfig:
    """The config as the run was built: the tokenizer's vocabulary and file, absolute data paths."""
    built = dataclasses.replace(cfg)
    built.model = dataclasses.replace(cfg.model, text=dataclasses.replace(cfg.model.text, vocab_size=tokenizer.vocab_size))
    built.tokenizer = dataclasses.replace(cfg.tokenizer, model=str(tokenizer.path))
    built.data = dataclasses.replace(cfg.data, shards=str(Path(cfg.data.shards).absolute()) if cfg.data.shards else "",
                                     caption_corpus=str(Path(cfg.data.caption_corpus).absolute()) if cfg.data.caption_corpus else "")
    built.train = dataclasses.replace(cfg.train, out_dir=str(Path(cfg.train.out_dir).absolute()))
    return built


def check_resume(run: RunDir, cfg: ExperimentConfig) -> None:
    """Refuse to continue a run under a different model or recipe than it was trained with, naming the keys."""
    if not (run.config.is_file() and latest_checkpoint(run.checkpoints) is not None):
        return
    changes = resume_changes(config_from_yaml(run.config.read_text(), source=str(run.config)), cfg)
    if changes:
        raise ConfigError(
            f"{run.root} was trained with another config; resuming would change {'; '.join(changes)}. Start a new "
            f"train.out_dir, train --no-resume, or (not for model.*) list the keys in train.allow_changes")


def _resume(ckpt: Checkpointer, cfg: ExperimentConfig, info: DistInfo, resume: bool) -> Tuple[int, DataPosition, int]:
    """(start step, data position, data seed) from the newest checkpoint, or a fresh start."""
    position, data_seed = DataPosition.start(cfg.data.num_workers), cfg.data.seed + cfg.train.seed
    if info.is_main:  # what a killed writer left; safe, this run holds the run dir's lock
        discard_partial(ckpt.dir)
    restored = ckpt.restore() if resume else None
    if restored is None:
        return 0, position, data_seed
    if restored.data is not None:
        position = DataPosition(**restored.data)
    else:  # another world size: streams are laid out differently, start a fresh shard order
        data_seed += restored.step
        if info.is_main:
            warnings.warn(f"resuming {restored.path} written by {restored.saved_world_size} ranks on "
                          f"{info.world_size}: weights and optimizer resharded, data order restarts")
    if info.is_main:
        print(f"resumed from {restored.path} at step {restored.step}", flush=True)
    return restored.step, position, data_seed


class NonFinitePolicy:
    """Skip a step whose loss is NaN/inf; stop after ``limit`` in a row instead of corrupting weights."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def check(self, step: int, stats: StepStats) -> bool:
        """True when the step counts; raises after too many skipped steps in a row."""
        if stats.finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        warnings.warn(f"step {step}: non-finite loss {stats.loss.item()}, step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} consecutive non-finite losses up to step {step}; lower train.lr, check the "
                "data for broken samples, or raise train.max_nonfinite_steps")
        return False


def _global_values(stats: StepStats, lr: float, world: int, skipped: Counter) -> Dict:
    """The step's loss and mean logits over the global batch (each rank holds its share), for the log."""
    summary = torch.cat([stats.loss.view(1).float(), stats.logits])
    if world > 1:
        dist.all_reduce(summary, op=dist.ReduceOp.AVG)
    loss, pos_logit, neg_logit = summary.tolist()
    return {"loss": loss, "t": stats.t, "b": stats.b, "lr": lr, "pos_logit": pos_logit, "neg_logit": neg_logit,
            "grad_norm": stats.grad_norm, "skipped": dict(skipped)}


def _next_micro_batches(data, position: DataPosition, skipped: Counter, accum: int, device: torch.device) -> List:
    """This step's micro-batches; a user error of the data on any rank stops every rank (no rank left waiting)."""
    batches, error = [], None
    try:
        for _ in range(accum):
            batch = next(data)
            position.advance(batch)
            skipped.update(batch["skipped"])
            batches.append((batch["pixels"].to(device), batch["tokens"].to(device)))
    except SigscaleError as e:
        error = e
    raise_on_any_rank(error)
    return batches


def _start_summary(cfg: ExperimentConfig, info: DistInfo, run: RunDir, start: int) -> str:
    """One line that says what this run is before its first step."""
    params = count_params(create_model(cfg.model, device="meta"))
    t, samples = cfg.train, load_manifest(Path(cfg.data.shards)).num_samples
    micro = t.batch_size // (info.world_size * t.accum_steps)
    where = f"resuming at step {start}" if start else "from step 0"
    return (f"train {cfg.name}: {params / 1e6:.1f}M params, batch {t.batch_size} = {micro} x {t.accum_steps} accum x "
            f"{info.world_size} rank(s) ({t.strategy if info.world_size > 1 else 'single process'}, {t.precision}, "
            f"{t.loss} loss), {t.steps} steps {where}, data {samples} samples, run dir {run.root}")


def _save_final_weights(model: torch.nn.Module, cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> Optional[Path]:
    """Full (unsharded) weights with the config in their metadata; every rank takes part in the gather."""
    state = full_state_dict(model)
    if not info.is_main:
        return None
    save_file({k: v.contiguous() for k, v in state.items()}, str(run.weights),
              metadata={"config_hash": config_hash(cfg), "config": to_yaml(cfg)})
    run.weights.chmod(0o644)  # shared like the rest of the run dir (safetensors writes 0600)
    return run.weights


def build_engine(cfg: ExperimentConfig, info: DistInfo, vocab_size: int
                 ) -> Tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Model (sharded, or a DeepSpeed engine), optimizer and schedule, as the training loop steps them."""
    model, pretrained = build_model(cfg, info, vocab_size)
    opt = build_optimizer(model, cfg.train, pretrained)
    sched = build_schedule(opt, cfg.train)
    if uses_deepspeed(cfg.train, info):
        model = deepspeed_engine(model, opt, cfg.train, info, check_world_size(cfg, info.world_size))
    return model, opt, sched


@contextmanager
def training_lock(run: RunDir, info: DistInfo) -> Iterator[None]:
    """Hold ``run``'s lock (rank 0) while the body trains; every rank raises alike when a live run holds it."""
    lock, busy = RunLock(run), None
    if info.is_main:
        try:
            lock.acquire()
        except RunBusyError as e:
            busy = e
    try:
        raise_on_any_rank(busy)
        yield
    finally:
        lock.release()


def train(cfg: ExperimentConfig, info: Optional[DistInfo] = None, resume: bool = True,
          should_stop: Optional[Callable[[], bool]] = None, evaluator: Optional[Evaluator] = None,
          hooks: Sequence[StepHook] = ()) -> TrainResult:
    """Train from ``cfg`` on this process's rank, resuming from the run's latest checkpoint if any.

    ``should_stop`` is polled at every step boundary (e.g. a flag set by a preemption signal); when it
    is true on any rank, all ranks write a checkpoint of the steps done so far and return with
    ``stopped_early`` set, so a requeued job resumes exactly there. ``evaluator`` runs every
    ``eval.every_steps`` and at the end; ``hooks`` see every step.
    """
    info = info or init_distributed()
    micro = check_input(cfg, info.world_size)
    if cfg.eval.benchmarks and evaluator is None:
        raise ConfigError("eval.benchmarks is set but train() was given no evaluator; pass "
                          "evaluator=sigscale.eval.run.BenchmarkEvaluator(cfg.eval) (the CLI does), or clear eval.benchmarks")
    if not cfg.train.out_dir and info.world_size > 1:
        raise ConfigError("train.out_dir is empty on several ranks: each would name its own new run dir; set it "
                          "(`sigscale train` and `sigscale submit` do) before the ranks start")
    cfg = with_run_dir(cfg)
    with training_lock(RunDir(cfg.train.out_dir), info):
        return _train_locked(cfg, info, micro, resume, should_stop, evaluator, hooks)


def _train_locked(cfg: ExperimentConfig, info: DistInfo, micro: int, resume: bool,
                  should_stop: Optional[Callable[[], bool]], evaluator: Optional[Evaluator],
                  hooks: Sequence[StepHook]) -> TrainResult:
    run = RunDir(cfg.train.out_dir)
    tokenizer = prepare_tokenizer(cfg, run, info, resume)
    cfg = built_config(cfg, tokenizer)
    if resume:
        check_resume(run, cfg)
    model, opt, sched = build_engine(cfg, info, tokenizer.vocab_size)
    ckpt = Checkpointer(run.checkpoints, model, opt, sched, cfg.train.keep_last)
    start, position, data_seed = _resume(ckpt, cfg, info, resume)
    loader = make_loader(cfg.data.shards, tokenizer, cfg.model.vision.image_size, micro, info.rank, info.world_size,
                         cfg.data.num_workers, data_seed, cfg.data.shuffle_buffer, position)
    if info.is_main:
        run.config.write_text(to_yaml(cfg))
    peak = peak_tflops(cfg.train, info.device)
    log = RunLog(run, cfg.train, start, info.is_main, sum(tower_flops_per_sample(cfg.model).values()),
                 peak * info.world_size if peak else None)
    log.print(_start_summary(cfg, info, run, start))
    periodic_eval = PeriodicEval(evaluator, cfg.eval.every_steps, cfg.train.steps)
    nonfinite = NonFinitePolicy(cfg.train.max_nonfinite_steps)
    result, skipped, data = TrainResult(run.root), Counter(), iter(loader)
    for step in range(start, cfg.train.steps):
        if should_stop is not None and any_rank(should_stop()):
            if not ckpt.has(step):
                ckpt.save(step, dataclasses.asdict(position))
            result.stopped_early = True
            break
        micro_batches = _next_micro_batches(data, position, skipped, cfg.train.accum_steps, info.device)
        stats = train_step(model, opt, micro_batches, cfg, info)
        if not nonfinite.check(step, stats):
            opt.zero_grad(set_to_none=True)
            continue
        lr = sched.get_last_lr()[0]  # the rate this step trained at
        sched.step()
        values = _global_values(stats, lr, info.world_size, skipped)
        result.losses.append(values["loss"])
        log.step(step, values)
        for hook in hooks:
            hook(StepEvent(step, model, opt, stats))
        done = step + 1
        periodic_eval.maybe_run(done, model, tokenizer, info, log)  # before the checkpoint: a kill in between redoes both
        if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps:
            ckpt.save(done, dataclasses.asdict(position))
    log.close()
    result.skipped_samples = dict(skipped)
    if not result.stopped_early:
        result.final_weights = _save_final_weights(model, cfg, run, info)
    return result
