"""Memory planner: per-GPU bytes of weights, gradients, optimizer state, activations and the loss for
each sharding strategy, and the micro-batch and accumulation that reach the configured global batch.

Everything is derived from the tower shapes (no model is built), so `sigscale plan` answers for a
256-GPU So400M run on a laptop. Parameter, gradient and optimizer bytes are exact (FSDP2 shards
every parameter along dim 0 like ``torch.chunk``); activation and loss bytes are a model of what
autograd keeps, calibrated against peak live tensor bytes measured on CPU (tests/test_plan.py holds
it to ±30%) and checked on shapes outside that calibration (``sigscale bench memory --check``: within
12% on other widths, depths, sequence lengths, batches and world sizes; a test holds one to 15%).
Mixed-precision accounting follows ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054 §3): with Adam,
K = 12 bytes of optimizer state per parameter (fp32 master, m, v) when the model runs in bf16, and 8
(m, v) when the fp32 parameters are themselves the master copy.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from sigscale.core.errors import SigscaleError
from sigscale.pretrain.config import ExperimentConfig, ModelConfig

# The memory layouts the planner models (one per strategy and ZeRO stage), not train.strategy values.
MEMORY_LAYOUTS = ("ddp", "fsdp", "zero1", "zero2", "zero3")
# What peak live tensor bytes leave unaccounted on a GPU: the CUDA context, cuBLAS workspaces and
# caching-allocator fragmentation. The planner keeps this fraction of each GPU free.
DEFAULT_RESERVE = 0.10
# DeepSpeed's default reduce bucket (elements) for ZeRO-1/2 gradient reduction (``reduce_bucket_size``).
DS_BUCKET_ELEMENTS = 500_000_000
# Chunked-loss block budget: the same constant as pretrain/loss.py (one b×chunk fp32 block ≤ 2^24
# elements); repeated here so planning never imports torch.
CHUNK_ELEMENTS = 2**24
MIN_CHUNK = 256

Shape = Tuple[int, ...]


class PlanError(SigscaleError, ValueError):
    """A plan request that cannot be met or makes no sense; the message says what to change."""


@dataclass
class Param:
    name: str
    shape: Shape
    unit: str  # the FSDP2 unit owning it: "root", "vision.blocks.<i>" or "text.blocks.<i>"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _linear(prefix: str, out_f: int, in_f: int, unit: str) -> List[Param]:
    return [Param(f"{prefix}.weight", (out_f, in_f), unit), Param(f"{prefix}.bias", (out_f,), unit)]


def _norm(prefix: str, width: int, unit: str) -> List[Param]:
    return [Param(f"{prefix}.weight", (width,), unit), Param(f"{prefix}.bias", (width,), unit)]


def parameter_shapes(m: ModelConfig) -> List[Param]:
    """Every parameter of ``create_model(m)`` with its shape and FSDP2 unit, without building it.

    Mirrors timm's VisionTransformer (no class token, MAP head) and open_clip's TextTransformer as
    pretrain/towers.py configures them; tests compare it name by name with a meta-device model.
    """
    v, t = m.vision, m.text
    w, n = v.width, (v.image_size // v.patch_size) ** 2
    ps: List[Param] = [
        Param("visual.patch_embed.proj.weight", (w, 3, v.patch_size, v.patch_size), "root"),
        Param("visual.patch_embed.proj.bias", (w,), "root"),
        Param("visual.pos_embed", (1, n, w), "root"),
    ]
    for i in range(v.depth):
        u, p = f"vision.blocks.{i}", f"visual.blocks.{i}"
        ps += _norm(f"{p}.norm1", w, u) + _linear(f"{p}.attn.qkv", 3 * w, w, u) + _linear(f"{p}.attn.proj", w, w, u)
        ps += _norm(f"{p}.norm2", w, u) + _linear(f"{p}.mlp.fc1", v.mlp_dim, w, u)
        ps += _linear(f"{p}.mlp.fc2", w, v.mlp_dim, u)
    ps += _norm("visual.norm", w, "root")
    a = "visual.attn_pool"
    ps += [Param(f"{a}.latent", (1, 1, w), "root")] + _linear(f"{a}.q", w, w, "root")
    ps += _linear(f"{a}.kv", 2 * w, w, "root")
    ps += _linear(f"{a}.proj", w, w, "root") + _norm(f"{a}.norm", w, "root")
    ps += _linear(f"{a}.mlp.fc1", v.mlp_dim, w, "root") + _linear(f"{a}.mlp.fc2", w, v.mlp_dim, "root")
    tw = t.width
    ps += [Param("text.token_embedding.weight", (t.vocab_size, tw), "root"),
           Param("text.positional_embedding", (t.context_length, tw), "root")]
    for i in range(t.depth):
        u, p = f"text.blocks.{i}", f"text.transformer.resblocks.{i}"
        ps += _norm(f"{p}.ln_1", tw, u) + [Param(f"{p}.attn.in_proj_weight", (3 * tw, tw), u),
                                            Param(f"{p}.attn.in_proj_bias", (3 * tw,), u)]
        ps += _linear(f"{p}.attn.out_proj", tw, tw, u) + _norm(f"{p}.ln_2", tw, u)
        ps += _linear(f"{p}.mlp.c_fc", t.mlp_dim, tw, u) + _linear(f"{p}.mlp.c_proj", tw, t.mlp_dim, u)
    ps += _norm("text.ln_final", tw, "root")
    if t.projection:
        ps += _linear("text.text_projection", w, tw, "root")
    ps += [Param("logit_scale", (1,), "root"), Param("logit_bias", (1,), "root")]
    return ps


def shard_numel(shape: Shape, world: int, rank: int) -> int:
    """Elements of ``rank``'s FSDP2 shard: dim 0 split like ``torch.chunk`` (the last ranks may get less)."""
    rows = math.ceil(shape[0] / world)
    mine = max(0, min(rows, shape[0] - rank * rows))
    return mine * math.prod(shape[1:])


def fsdp_rank_numel(params: Sequence[Param], world: int, rank: int) -> int:
    """Parameter elements stored by one FSDP2 rank (its DTensor ``to_local()`` shards)."""
    return sum(shard_numel(p.shape, world, rank) for p in params)


def adamw_state_bytes(numel: int, tensors: int) -> int:
    """torch AdamW state: fp32 exp_avg and exp_avg_sq per element, plus a 4-byte fp32 ``step`` per tensor."""
    return 8 * numel + 4 * tensors


def block_act_elems(seq: int, width: int, mlp: int, heads: int) -> float:
    """Elements one pre-LN transformer block keeps for backward per sample.

    Per token: LN1 in/out (2w), fused QKV (3w), attention output and its re-layout for the output
    projection (2w), LN2 in/out (2w), MLP hidden before and after GELU (2m), and the fp32 attention
    log-sum-exp per head that fused (flash / memory-efficient) attention keeps instead of s×s scores.
    """
    return seq * (9 * width + 2 * mlp + heads)


# Outside the blocks: the embedding output, the final norm's input/output and the pooling head's
# inputs (vision ≈ 4·s·w, text ≈ 3·s·w); with checkpointing the recomputed block's neighbours
# shrink to ≈ 2·s·w. Calibrated against CPU peak-tensor measurements of the tiny/small presets.
_EXTRA = {"vision": 4, "text": 3}
_EXTRA_CKPT = 2


def tower_activation_bytes(m: ModelConfig, tower: str, act_bytes: int, checkpointing: bool) -> float:
    """Peak bytes per sample that the forward of ``tower`` keeps for its backward."""
    tc = getattr(m, tower)
    seq = (tc.image_size // tc.patch_size) ** 2 if tower == "vision" else tc.context_length
    block = block_act_elems(seq, tc.width, tc.mlp_dim, tc.heads)
    if checkpointing:  # block inputs only, plus one block re-materialised during its backward
        elems = tc.depth * seq * tc.width + block + _EXTRA_CKPT * seq * tc.width
    else:
        elems = tc.depth * block + _EXTRA[tower] * seq * tc.width
    return elems * act_bytes


def default_chunk(local_batch: int) -> int:
    """Texts per logit block of the chunked loss (same rule as ``pretrain.loss.default_chunk_size``)."""
    return max(MIN_CHUNK, CHUNK_ELEMENTS // max(1, local_batch))


def loss_bytes(local_batch: int, global_batch: int, dim: int, world: int, chunk: Optional[int],
               dense: bool = False) -> float:
    """Per-rank working set of the sigmoid loss over a rank's ``local_batch`` of the global batch.

    Chunked ring loss: fp32 embeddings and their gradients (4·b·d), one b×chunk logit block and its
    gradient (2·b·chunk), and for W > 1 the text block in flight around the ring (2·b·d).
    Dense (open_clip ``SigLipLoss``): ≈ 5 fp32 b×B matrices kept for backward. Both coefficients are
    fitted to the measured loss table in BENCHMARKS.md (within ±30% over W = 1–8, B = 4k–32k).
    """
    b, d = local_batch, dim
    if dense:
        return 4.0 * (5 * b * global_batch + 4 * b * d)
    block = min(chunk or default_chunk(b), b)
    return 4.0 * (4 * b * d + 2 * b * block + (2 * b * d if world > 1 else 0))


@dataclass
class StrategyPlan:
    """Per-GPU bytes for one sharding strategy, and the batch split it allows."""

    strategy: str
    params: int
    grads: int
    optimizer: int
    buffers: int  # transient: FSDP/ZeRO-3 gathered units, DDP/ZeRO reduction buckets
    act_per_sample: float  # both towers, with the checkpointing the config asks for
    act_per_sample_no_ckpt: float
    act_per_sample_ckpt: float
    loss: float
    embedding_cache: float
    max_micro: int  # largest micro-batch that fits (0: nothing fits)
    micro: int  # micro-batch of the chosen accumulation (0 when impossible)
    accum_steps: int
    peak: float  # predicted peak at ``micro``
    fits: bool
    note: str = ""

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass
class CheckpointingOff:
    """Activation checkpointing the chosen strategy does not need: these towers fit without it."""

    towers: List[str]
    micro: int
    accum_steps: int
    peak: float


@dataclass
class Plan:
    """What `sigscale plan` prints: the model, the request and one row per sharding strategy."""

    name: str
    world_size: int
    gpu_mem_bytes: int
    usable_bytes: int
    global_batch: int
    local_batch: int
    precision: str
    checkpointing: Dict[str, bool]
    param_counts: Dict[str, int]
    chosen: str
    strategies: Dict[str, StrategyPlan] = field(default_factory=dict)
    checkpointing_off: Optional[CheckpointingOff] = None

    @property
    def best(self) -> StrategyPlan:
        return self.strategies[self.chosen]


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '141G', '24000MiB' → bytes (GB means GiB, as GPU specs do); a unit is required."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise PlanError(f"--gpu-mem {text!r} is not a size; write it like 80GB, 141GiB or 24000MiB")
    if not m.group(2) and not m.group(3):  # '80' would be 80 bytes: surely meant as GB
        raise PlanError(f"--gpu-mem {text!r} has no unit; write {text}GB for a GPU of {text} GB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise PlanError(f"--gpu-mem {text!r} must be positive")
    return value


def human(n: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _units(params: Sequence[Param]) -> Dict[str, int]:
    sizes: Dict[str, int] = {}
    for p in params:
        sizes[p.unit] = sizes.get(p.unit, 0) + p.numel
    return sizes


def _static_bytes(strategy: str, params: Sequence[Param], world: int, bf16: bool) -> Tuple[int, int, int, int]:
    """(params, grads, optimizer, transient buffers) bytes on the most loaded rank."""
    total, tensors = sum(p.numel for p in params), len(params)
    units = _units(params)
    # FSDP2/ZeRO-3 hold the root unit gathered for the whole step plus the current and the prefetched
    # block; gradients of one block are unsharded until reduce-scattered in fp32.
    largest_block = max([s for u, s in units.items() if u != "root"], default=0)
    gathered = (2 if bf16 else 4) * (units.get("root", 0) + 2 * largest_block) + 4 * largest_block
    if strategy == "ddp" or world == 1:
        # fp32 weights and gradients; DDP also keeps flat reduction buckets the size of all gradients.
        return 4 * total, 4 * total, adamw_state_bytes(total, tensors), (4 * total if world > 1 else 0)
    if strategy == "fsdp":
        local = fsdp_rank_numel(params, world, 0)
        return 4 * local, 4 * local, adamw_state_bytes(local, tensors), gathered
    stage = int(strategy[-1])
    part = math.ceil(total / world)
    model_b = 2 if bf16 else 4
    optimizer = 12 * part  # fp32 master partition + Adam moments, for every stage (ZeRO paper's K = 12)
    # DeepSpeed allocates its gradient reduce bucket at full size whatever the model's size (measured:
    # ZeRO-1 on the 4.9M-parameter small preset peaks 1.9 GiB higher, 5e8 fp32 elements).
    bucket = model_b * DS_BUCKET_ELEMENTS
    if stage == 1:
        return model_b * total, model_b * total, optimizer, bucket
    if stage == 2:
        return model_b * total, model_b * part, optimizer, bucket
    return model_b * part, model_b * part, optimizer, gathered


def _split(local_batch: int, max_micro: int) -> Tuple[int, int]:
    """Fewest accumulation steps k (a divisor of the rank's batch) whose micro-batch fits."""
    if max_micro <= 0:
        return 0, 0
    for k in range(1, local_batch + 1):
        if local_batch % k == 0 and local_batch // k <= max_micro:
            return local_batch // k, k
    return 0, 0


def _fit(static: float, loss: float, cache: float, act: float, local: int, usable: int) -> Tuple[int, int, int]:
    """(largest micro-batch that fits, chosen micro-batch, accumulation steps) for per-sample activations ``act``.

    Embedding-cache accumulation (k > 1): the loss runs on the cached embeddings, then the towers are re-run
    micro-batch by micro-batch, so loss and activations are never live together; the cache (image and text
    embeddings and their gradients, fp32: 4·b·d, part of the loss's working set) stays while the towers re-run.
    """
    if static + loss + act * local <= usable:
        max_micro = local
    elif static + loss <= usable:
        max_micro = max(0, min(local - 1, int((usable - static - cache) // act)))
    else:
        max_micro = 0
    return (max_micro, *_split(local, max_micro))


def _peak(static: float, loss: float, cache: float, act: float, micro: int, k: int) -> float:
    return static + (loss + act * micro if k == 1 else max(loss, cache + act * micro))


def plan(cfg: ExperimentConfig, gpus: int, gpu_mem_bytes: int, nodes: int = 1,
         reserve: float = DEFAULT_RESERVE, strategies: Sequence[str] = MEMORY_LAYOUTS) -> Plan:
    """Per-GPU memory of every sharding strategy for ``cfg`` on ``gpus × nodes`` GPUs of ``gpu_mem_bytes``.

    The chosen strategy is the config's (``train.strategy``/``zero_stage``); the micro-batch is the
    largest that fits next to the weights, optimizer state and the loss over the rank's share of the
    global batch, and ``accum_steps`` the fewest embedding-cache accumulation steps reaching it.
    """
    if gpus <= 0 or nodes <= 0:
        raise PlanError(f"--gpus-per-node {gpus} and --nodes {nodes} must be positive")
    if not 0 <= reserve < 1:
        raise PlanError(f"reserve={reserve} must be a fraction in [0, 1)")
    world = gpus * nodes
    t, m = cfg.train, cfg.model
    if t.batch_size % world:
        raise PlanError(f"train.batch_size={t.batch_size} does not split over {world} GPUs ({gpus} x {nodes} "
                        f"nodes); choose a batch that is a multiple of {world}")
    local = t.batch_size // world
    bf16 = t.precision == "bf16"
    params = parameter_shapes(m)
    counts = {"vision": sum(p.numel for p in params if p.name.startswith("visual.")),
              "text": sum(p.numel for p in params if p.name.startswith("text."))}
    counts["total"] = sum(p.numel for p in params)
    chosen = {"fsdp": "fsdp", "ddp": "ddp", "single": "ddp", "deepspeed": f"zero{t.zero_stage}"}[t.strategy]
    if chosen == "zero0":  # ZeRO stage 0 is plain data parallelism
        chosen = "ddp"
    usable = int(gpu_mem_bytes * (1 - reserve))
    ckpt = {"vision": t.grad_checkpointing.vision, "text": t.grad_checkpointing.text}
    result = Plan(cfg.name, world, gpu_mem_bytes, usable, t.batch_size, local, t.precision, ckpt, counts, chosen)
    # bf16 activations under every strategy: FSDP2's policy, DeepSpeed's bf16, autocast for DDP.
    act_b = 2 if bf16 else 4
    per_tower = {ck: sum(tower_activation_bytes(m, tw, act_b, ck) for tw in ("vision", "text")) for ck in (False, True)}
    chosen_act = sum(tower_activation_bytes(m, tw, act_b, ckpt[tw]) for tw in ("vision", "text"))
    loss = loss_bytes(local, t.batch_size, m.vision.width, world, t.loss_chunk_size, dense=t.loss == "softmax")
    cache = 4.0 * 4 * local * m.vision.width
    for strategy in dict.fromkeys((*strategies, chosen)):
        if strategy not in MEMORY_LAYOUTS:
            raise PlanError(f"unknown strategy {strategy!r}; choose from {list(MEMORY_LAYOUTS)}")
        p_b, g_b, o_b, buf_b = _static_bytes(strategy, params, world, bf16)
        static = p_b + g_b + o_b + buf_b
        max_micro, micro, k = _fit(static, loss, cache, chosen_act, local, usable)
        note = ""
        if not micro:
            need = static + max(loss, cache + chosen_act)
            note = (f"does not fit: needs ≥ {human(need)} per GPU for one sample "
                    f"(weights, gradients, optimizer and buffers {human(static)}, loss {human(loss)})")
        result.strategies[strategy] = StrategyPlan(
            strategy, p_b, g_b, o_b, buf_b, chosen_act, per_tower[False], per_tower[True], loss,
            cache if k > 1 else 0.0, max_micro, micro, k,
            _peak(static, loss, cache, chosen_act, micro, k) if micro else float("nan"), bool(micro), note)
    result.checkpointing_off = checkpointing_off(result, m, act_b, cache)
    return result


def checkpointing_off(p: Plan, m: ModelConfig, act_bytes: int, cache: float) -> Optional[CheckpointingOff]:
    """The most activation checkpointing the chosen strategy can drop at the same accumulation, or None.

    Without checkpointing a tower keeps every block's activations (several times more per sample) but
    skips the recompute of its forward in backward (~1/3 of its FLOPs); worth it whenever the batch still
    splits into the same micro-batch x accumulation. Tried in order: both towers off, then each alone.
    """
    row = p.best
    on = [tw for tw, v in p.checkpointing.items() if v]
    if not row.fits or not on:
        return None
    static = row.static + row.buffers
    for off in ([on] + ([[tw] for tw in on] if len(on) > 1 else [])):
        act = sum(tower_activation_bytes(m, tw, act_bytes, p.checkpointing[tw] and tw not in off)
                  for tw in ("vision", "text"))
        _, micro, k = _fit(static, row.loss, cache, act, p.local_batch, p.usable_bytes)
        if micro and k <= row.accum_steps:
            return CheckpointingOff(towers=list(off), micro=micro, accum_steps=k,
                                    peak=_peak(static, row.loss, cache, act, micro, k))
    return None


def check_fits(p: Plan) -> StrategyPlan:
    """The chosen strategy's row, or a PlanError naming what to change when it cannot run."""
    row = p.best
    if row.fits:
        return row
    options = [s for s, r in p.strategies.items() if r.fits]
    hint = (f"switch train.strategy to one of {options}" if options else
            "add GPUs, enable train.grad_checkpointing, or lower train.batch_size")
    raise PlanError(f"{p.name}: strategy {row.strategy} on {p.world_size} GPU(s) of {human(p.gpu_mem_bytes)} "
                    f"({human(p.usable_bytes)} planned) {row.note}; {hint}")


def render(p: Plan) -> str:
    """A readable table of a Plan (GiB per GPU; MiB for GPUs under 8 GiB, e.g. CPU test runs)."""
    unit, unit_name = (2**30, "GiB") if p.gpu_mem_bytes >= 8 * 2**30 else (2**20, "MiB")

    def size(x: float) -> str:
        return "–" if x != x else f"{x / unit:.2f}"

    c = p.param_counts
    ck = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in p.checkpointing.items())
    lines = [
        f"{p.name}: {c['total'] / 1e6:.1f}M parameters (vision {c['vision'] / 1e6:.1f}M, text {c['text'] / 1e6:.1f}M), "
        f"{p.precision}, activation checkpointing {ck}",
        f"{p.world_size} GPU(s) x {human(p.gpu_mem_bytes)} ({human(p.usable_bytes)} planned, the rest kept "
        f"for CUDA context and fragmentation); global batch {p.global_batch} = {p.local_batch} per GPU",
        "",
        "| strategy | params | grads | optimizer | buffers | act/sample MiB (no ckpt / ckpt) | loss | max micro "
        "| micro x accum | peak | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in p.strategies.items():
        mark = " (config)" if name == p.chosen else ""
        split = f"{r.micro} x {r.accum_steps}" if r.fits else "–"
        lines.append(
            f"| {name}{mark} | {size(r.params)} | {size(r.grads)} | {size(r.optimizer)} | {size(r.buffers)} | "
            f"{r.act_per_sample_no_ckpt / 2**20:.2f} / {r.act_per_sample_ckpt / 2**20:.2f} | {size(r.loss)} | "
            f"{r.max_micro} | {split} | {size(r.peak)} | {r.note} |")
    lines.append("")
    off = p.checkpointing_off
    if off:
        keys = " ".join(f"train.grad_checkpointing.{tw}=false" for tw in off.towers)
        lines += [f"Activation checkpointing can be switched off ({keys}): {p.chosen} still fits {off.micro} x "
                  f"{off.accum_steps} without it (peak {size(off.peak)} {unit_name}) and saves recomputing their "
                  "forward in backward (4/3 of their FLOPs become 1).", ""]
    lines.append(f"{unit_name} per GPU unless stated. params/grads/optimizer exact (AdamW, fp32 state); "
                 "buffers = gathered "
                 "FSDP/ZeRO-3 units or DDP/ZeRO reduction buckets; activations and loss are a model calibrated on "
                 "CPU measurements (±30%; within 12% on held-out shapes, `sigscale bench memory --check`).")
    return "\n".join(lines) + "\n"
