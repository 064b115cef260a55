"""The experiment schema (model, tokenizer, data, train, eval sections) and its validation.

Loading (``compose:``, dot-list overrides, "did you mean") is the core loader's
(:mod:`sigscale.core.config`). ``model.preset`` names a tower preset from
``PRESETS`` below; keys given next to it override the preset.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from sigscale.core import config as core_config
from sigscale.core.config import ConfigError, choice
from sigscale.core.rundir import RunDir


@dataclass
class VisionConfig:
    """A SigLIP ViT image tower (timm VisionTransformer, no class token, MAP-head pooling)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    # big_vision's ViT uses the tanh approximation of GELU (flax nn.gelu default).
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6


@dataclass
class TextConfig:
    """A bidirectional text transformer pooled at the last position (SigLIP's text tower)."""

    context_length: int = 64
    vocab_size: int = 32000
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    # mSigLIP (So400M/16-i18n) has no text projection: text width must equal the image width.
    projection: bool = True
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # SigLIP paper §3.2: t' = log 10, b = -10.
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0
    # None: t is never clamped (the paper does not clamp). A float caps t' at this value.
    max_logit_scale: Optional[float] = None


@dataclass
class TokenizerConfig:
    # Path of a SentencePiece .model; empty means "train one from data.caption_corpus".
    model: str = ""
    # unigram (SentencePiece's default, as for the mC4 vocabulary) or bpe
    model_type: str = "unigram"
    vocab_size: int = 32000
    context_length: int = 64
    # big_vision SigLIP configs: eos="sticky" and pad_value=1 (the EOS id of its SentencePiece models).
    pad_id: int = 1
    canonicalize: bool = True


@dataclass
class DataConfig:
    # Folder with webdataset shards and manifest.json written by `sigscale curate`.
    shards: str = ""
    caption_corpus: str = ""
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0


@dataclass
class GradCheckpointConfig:
    vision: bool = False
    text: bool = False


@dataclass
class TowerMult:
    vision: float = 1.0
    text: float = 1.0


@dataclass
class TrainConfig:
    batch_size: int = 32768  # global contrastive batch
    accum_steps: int = 1  # embedding-cache accumulation: micro = batch / (world * accum)
    steps: int = 10000
    warmup_steps: int = 500
    lr: float = 1e-3
    # big_vision's weight decay 1e-4 is decoupled (applied as wd * param, not lr * wd * param).
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    strategy: str = "fsdp"  # fsdp | deepspeed | ddp | single
    zero_stage: int = 3  # deepspeed only
    deepspeed_config: str = ""  # optional user JSON, merged under ours
    precision: str = "bf16"  # bf16 | fp32
    grad_checkpointing: GradCheckpointConfig = field(default_factory=GradCheckpointConfig)
    loss: str = "sigmoid"  # sigmoid | softmax
    loss_chunk_size: Optional[int] = None
    # eager (reference) | compiled: the loss blocks' elementwise work fused by torch.compile (pretrain/loss.py)
    loss_kernel: str = "eager"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    max_nonfinite_steps: int = 5
    out_dir: str = ""  # the run dir; empty: a new runs/<name>-<UTC time> per launch (with_run_dir)
    peak_tflops: Optional[float] = None  # per device, for the logged MFU; None: known GPUs only
    # Fine-tuning and locked-image tuning (SigLIP paper §4, LiT: Zhai et al. 2022).
    init_from: str = ""  # sigscale run dir, HF SiglipModel dir or open_clip state dict
    init_towers: List[str] = field(default_factory=lambda: ["vision", "text"])  # taken from init_from
    freeze: List[str] = field(default_factory=list)  # towers kept fixed, e.g. ["vision"] for SigLiT
    lr_mult: TowerMult = field(default_factory=TowerMult)  # per-tower learning-rate multiplier
    # Paper §4: weight decay on pretrained weights hurts fine-tuning; off unless asked for.
    pretrained_weight_decay: bool = False
    # Keys whose change a resumed run accepts (e.g. [train.steps, train.lr]); others are refused.
    allow_changes: List[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Benchmarks run by ``sigscale eval`` and, every ``every_steps``, by the training loop."""
    benchmarks: List[str] = field(default_factory=list)  # names in sigscale.eval.registry, or clipbench:PATH
    every_steps: int = 0  # training only; 0: at the end of training only (when benchmarks are set)
    # ImageNet val: synset folders (n01440764/...) or webdataset shards with a class per sample.
    imagenet_dir: str = ""
    # Any classification folder (or shards) with classnames.txt, for the "zeroshot" benchmark.
    classification_dir: str = ""
    classnames: str = ""  # class-names file for classification_dir when it has no classnames.txt
    xm3600_dir: str = ""  # captions.jsonl + images/<key>.jpg, as distributed
    xm3600_languages: List[str] = field(default_factory=list)  # empty: every language in the file
    first_caption_only: bool = False  # CLIP_benchmark's XM3600 protocol instead of the SigLIP paper's
    retrieval_shards: str = ""  # a webdataset split (e.g. held-out curated shards)
    retrieval_max_samples: int = 0  # 0: all samples
    coco_dir: str = ""  # dataset_coco.json (Karpathy splits) + images (<filepath>/<filename> or images/)
    flickr30k_dir: str = ""  # dataset_flickr30k.json (Karpathy splits) + images
    karpathy_split: str = "test"  # COCO 5k / Flickr30k 1k test images
    xtd10_dir: str = ""  # the XTD10 release: test_image_names.txt + test_1kcaptions_<lang>.txt
    xtd10_images: str = ""  # the listed MSCOCO images; empty: <xtd10_dir>/images
    xtd10_languages: List[str] = field(default_factory=list)  # empty: every caption file present
    babel_imagenet_labels: str = ""  # babel_imagenet.json; images from imagenet_dir
    babel_imagenet_prompts: str = ""  # per-language templates (nllb_dist13b_prompts.json); empty: English
    babel_imagenet_languages: List[str] = field(default_factory=list)  # empty: every language in the labels
    batch_size: int = 256


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


STRATEGIES = ("fsdp", "deepspeed", "ddp", "single")
PRECISIONS = ("bf16", "fp32")
LOSSES = ("sigmoid", "softmax")
LOSS_KERNELS = ("eager", "compiled")  # how the loss runs its elementwise work (pretrain/loss.py)
ACTS = ("gelu", "gelu_tanh")
TOWERS = ("vision", "text")


def _so400m_vision(image_size: int, patch_size: int) -> VisionConfig:
    # "Getting ViT in Shape" (Alabdulmohsin et al. 2023): width 1152, depth 27, MLP 4304, 16 heads.
    return VisionConfig(image_size=image_size, patch_size=patch_size, width=1152, depth=27, heads=16, mlp_dim=4304)


def _so400m_text(vocab_size: int, context_length: int, projection: bool) -> TextConfig:
    return TextConfig(
        context_length=context_length, vocab_size=vocab_size, width=1152, depth=27, heads=16,
        mlp_dim=4304, projection=projection,
    )


# Shapes follow the published SigLIP checkpoints (big_vision SigLIP colab / open_clip model_configs).
PRESETS: Dict[str, ModelConfig] = {
    "so400m14_224": ModelConfig(vision=_so400m_vision(224, 14), text=_so400m_text(32000, 16, True)),
    "so400m14_384": ModelConfig(vision=_so400m_vision(384, 14), text=_so400m_text(32000, 64, True)),
    # mSigLIP So400M/16-i18n-256: the text tower is as large as the image tower, 250k mC4 vocabulary,
    # and no projection head on the text side.
    "so400m16_i18n_256": ModelConfig(vision=_so400m_vision(256, 16), text=_so400m_text(250000, 64, False)),
    "b16_224": ModelConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
        text=TextConfig(context_length=64, vocab_size=32000, width=768, depth=12, heads=12, mlp_dim=3072),
    ),
    "l16_256": ModelConfig(
        vision=VisionConfig(image_size=256, patch_size=16, width=1024, depth=24, heads=16, mlp_dim=4096),
        text=TextConfig(context_length=64, vocab_size=32000, width=1024, depth=24, heads=16, mlp_dim=4096),
    ),
    # CPU-sized towers for tests and the demo.
    "tiny": ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=256),
        text=TextConfig(context_length=16, vocab_size=1000, width=64, depth=2, heads=4, mlp_dim=256),
    ),
    "small": ModelConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=192, depth=4, heads=6, mlp_dim=768),
        text=TextConfig(context_length=32, vocab_size=4000, width=192, depth=4, heads=6, mlp_dim=768),
    ),
}


def _apply_preset(node: DictConfig, source: str) -> DictConfig:
    preset = OmegaConf.select(node, "model.preset")
    if preset is None:
        return node
    if preset not in PRESETS:
        raise ConfigError(f"unknown model.preset {preset!r} in {source}; choose one of {sorted(PRESETS)}")
    base = OmegaConf.create({"model": dataclasses.asdict(PRESETS[preset])})
    return OmegaConf.merge(base, node)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML (a path or a name in configs/) plus dot-list overrides, validated."""
    cfg = core_config.load(ExperimentConfig, path, overrides, prepare=_apply_preset)
    validate(cfg)
    return cfg


def validate_model(m: ModelConfig) -> None:
    """Tower shapes that cannot be built; also checked by create_model for configs built in code."""
    choice(m.vision.act, ACTS, "model.vision.act")
    choice(m.text.act, ACTS, "model.text.act")
    for tower in ("vision", "text"):
        tc = getattr(m, tower)
        if tc.width % tc.heads:
            raise ConfigError(
                f"model.{tower}.width={tc.width} is not divisible by model.{tower}.heads={tc.heads}; "
                "pick heads that divide the width"
            )
    # image_size need not be a multiple of patch_size: So400M/14 at 384 px uses 27x27 patches
    # (the patch convolution drops the remainder, as in big_vision and HF).
    if m.vision.patch_size > m.vision.image_size:
        raise ConfigError(
            f"model.vision.patch_size={m.vision.patch_size} exceeds model.vision.image_size={m.vision.image_size}"
        )
    if not m.text.projection and m.text.width != m.vision.width:
        raise ConfigError(
            f"model.text.projection=false needs model.text.width ({m.text.width}) == "
            f"model.vision.width ({m.vision.width}); enable the projection or match the widths"
        )


def validate(cfg: ExperimentConfig) -> None:
    """Reject impossible combinations before any work starts."""
    m, t = cfg.model, cfg.train
    choice(t.strategy, STRATEGIES, "train.strategy")
    choice(t.precision, PRECISIONS, "train.precision")
    choice(t.loss, LOSSES, "train.loss")
    choice(t.loss_kernel, LOSS_KERNELS, "train.loss_kernel")
    validate_model(m)
    choice(cfg.tokenizer.model_type, ("unigram", "bpe"), "tokenizer.model_type")
    if cfg.tokenizer.context_length != m.text.context_length:
        raise ConfigError(
            f"tokenizer.context_length={cfg.tokenizer.context_length} differs from "
            f"model.text.context_length={m.text.context_length}; set them equal"
        )
    if t.batch_size <= 0 or t.accum_steps <= 0:
        raise ConfigError("train.batch_size and train.accum_steps must be positive")
    if t.batch_size % t.accum_steps:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.accum_steps={t.accum_steps}"
        )
    if t.warmup_steps > t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
    if t.strategy == "deepspeed" and t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
    if t.loss_chunk_size is not None and t.loss_chunk_size <= 0:
        raise ConfigError(f"train.loss_chunk_size={t.loss_chunk_size} must be positive or null")
    for key in ("init_towers", "freeze"):
        for tower in getattr(t, key):
            choice(tower, TOWERS, f"train.{key}[]")
    for tower in t.freeze:
        if not t.init_from or tower not in t.init_towers:
            raise ConfigError(
                f"train.freeze lists {tower!r} but that tower is not loaded from train.init_from; freezing random "
                "weights trains nothing: set train.init_from (and train.init_towers) or drop it from train.freeze"
            )
    if set(t.freeze) >= set(TOWERS):
        raise ConfigError("train.freeze holds both towers: nothing would train; freeze at most one")
    for tower in TOWERS:
        if getattr(t.lr_mult, tower) < 0:
            raise ConfigError(f"train.lr_mult.{tower}={getattr(t.lr_mult, tower)} must be >= 0 (use train.freeze to fix a tower)")


# Keys a resumed run may change freely: how often it logs, checkpoints and evaluates, and where the run
# dir and its tokenizer copy live (a run dir moves between file systems and nodes), not what it learns.
FREE_ON_RESUME = ("train.log_every", "train.ckpt_every", "train.keep_last", "train.max_nonfinite_steps",
                  "train.peak_tflops", "train.allow_changes", "eval.", "train.out_dir", "tokenizer.model")


def _flat(node: object, prefix: str = "") -> dict:
    if dataclasses.is_dataclass(node):
        node = dataclasses.asdict(node)
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def resume_changes(saved: ExperimentConfig, new: ExperimentConfig) -> List[str]:
    """``key: old -> new`` for every setting a resume of ``saved`` as ``new`` would change without leave.

    Free keys (FREE_ON_RESUME) may change; ``train.allow_changes`` lets others through, except the
    model's shapes, which the checkpoint's tensors fix.
    """
    old, cur = _flat(saved), _flat(new)
    allowed = tuple(new.train.allow_changes)
    changed = []
    for key in sorted(set(old) | set(cur)):
        if old.get(key) == cur.get(key) or key.startswith(FREE_ON_RESUME):
            continue
        if key.startswith(allowed) and not key.startswith("model."):
            continue
        changed.append(f"{key}: {old.get(key)!r} -> {cur.get(key)!r}")
    return changed


def with_run_dir(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``train.out_dir`` set: a new run dir when it is empty (resolve once, before ranks start)."""
    if cfg.train.out_dir:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(RunDir.new(cfg.name).root)))


def check_world_size(cfg: ExperimentConfig, world_size: int) -> int:
    """Return the per-rank micro-batch, or fail if the global batch does not split evenly."""
    t = cfg.train
    if t.batch_size % (world_size * t.accum_steps):
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by world size {world_size} x "
            f"train.accum_steps={t.accum_steps}; choose a batch that is a multiple of "
            f"{world_size * t.accum_steps}"
        )
    return t.batch_size // (world_size * t.accum_steps)


def config_from_yaml(text: str, source: str = "<yaml>") -> ExperimentConfig:
    """Rebuild a validated config from ``to_yaml`` output (e.g. a run's config.yaml, weights metadata)."""
    cfg = core_config.from_yaml(ExperimentConfig, text, source)
    validate(cfg)
    return cfg
