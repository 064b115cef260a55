"""Typed experiment configs: dataclass schemas, YAML composition, dot-list overrides, loud errors.

An experiment YAML may start with ``compose: [models/x.yaml, train/y.yaml]``: those parts
(paths relative to the YAML's folder, then to the repo's ``configs/``) are merged first, in
order, then the file itself, then command-line overrides such as ``train.batch_size=32768``.
``model.preset`` names a tower preset from :mod:`sigscale.pretrain.towers`; keys given next to
it override the preset.
"""
from __future__ import annotations

from sigscale.errors import SigscaleError
import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sigscale import CONFIG_DIR


class ConfigError(SigscaleError, ValueError):
    """A config is wrong: the message names the key and the fix."""


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
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    max_nonfinite_steps: int = 5
    out_dir: str = "runs/default"
    peak_tflops: Optional[float] = None  # per device, for the logged MFU; None: known GPUs only
    # Fine-tuning and locked-image tuning (SigLIP paper §4, LiT: Zhai et al. 2022).
    init_from: str = ""  # sigscale run dir, HF SiglipModel dir or open_clip state dict
    init_towers: List[str] = field(default_factory=lambda: ["vision", "text"])  # taken from init_from
    freeze: List[str] = field(default_factory=list)  # towers kept fixed, e.g. ["vision"] for SigLiT
    lr_mult: TowerMult = field(default_factory=TowerMult)  # per-tower learning-rate multiplier
    # Paper §4: weight decay on pretrained weights hurts fine-tuning; off unless asked for.
    pretrained_weight_decay: bool = False


@dataclass
class EvalConfig:
    """Benchmarks run by ``sigscale eval`` and, every ``every_steps``, by the training loop."""
    benchmarks: List[str] = field(default_factory=list)  # imagenet | zeroshot | xm3600 | retrieval
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
ACTS = ("gelu", "gelu_tanh")
TOWERS = ("vision", "text")


def _resolve_part(name: str, base_dir: Path) -> Path:
    for candidate in (base_dir / name, CONFIG_DIR / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config part {name!r} not found next to {base_dir} nor in {CONFIG_DIR}; "
        "fix the path in 'compose:' or pass an existing YAML file"
    )


def _load_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    """Load one YAML and everything it composes, parts first."""
    if path.resolve() in seen:
        raise ConfigError(f"config {path} composes itself (cycle: {' -> '.join(map(str, seen))})")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry the line number
        raise ConfigError(f"cannot parse config {path}: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    parts = node.pop("compose", [])
    merged = OmegaConf.create()
    for part in parts:
        merged = OmegaConf.merge(merged, _load_yaml(_resolve_part(part, path.parent), seen + (path.resolve(),)))
    return OmegaConf.merge(merged, node)


def _known_keys(schema: Any, prefix: str = "") -> List[str]:
    keys = []
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += _known_keys(f.default_factory, prefix + f.name + ".")
    return keys


def _explain(e: OmegaConfBaseException, source: str, schema: Any = None) -> ConfigError:
    """A ConfigError naming the key, the problem and the fix, for any stage's config ``schema``."""
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        schema = schema or ExperimentConfig
        close = difflib.get_close_matches(key, _known_keys(schema), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"see {schema.__name__} in {schema.__module__} for the schema"
        return ConfigError(f"unknown config key '{key}' in {source}; {hint}")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"wrong type for config key '{key}' in {source}: {msg}; fix the value's type")
    return ConfigError(f"invalid config in {source} at '{key}': {str(e).splitlines()[0]}")


def _apply_preset(node: DictConfig, source: str) -> DictConfig:
    from sigscale.pretrain.towers import PRESETS  # presets live next to the towers

    preset = OmegaConf.select(node, "model.preset")
    if preset is None:
        return node
    if preset not in PRESETS:
        raise ConfigError(
            f"unknown model.preset {preset!r} in {source}; choose one of {sorted(PRESETS)}"
        )
    base = OmegaConf.create({"model": dataclasses.asdict(PRESETS[preset])})
    return OmegaConf.merge(base, node)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML (with its composed parts) plus dot-list overrides, validated."""
    schema = OmegaConf.structured(ExperimentConfig)
    source = str(path) if path else "<defaults>"
    node = OmegaConf.create()
    if path:
        p = Path(path)
        if not p.is_file() and (CONFIG_DIR / p).is_file():
            p = CONFIG_DIR / p
        elif not p.is_file() and (CONFIG_DIR / f"{p}.yaml").is_file():
            p = CONFIG_DIR / f"{p}.yaml"
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist; give a YAML path or a name from {CONFIG_DIR}")
        node = _load_yaml(p)
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}; use key.sub=value") from e
    node = OmegaConf.merge(node, cli)
    node = _apply_preset(node, source)
    try:
        merged = OmegaConf.merge(schema, node)
        cfg: ExperimentConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, source if not overrides else f"{source} + overrides") from None
    validate(cfg)
    return cfg


def _choice(value: str, options: Sequence[str], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}; set {key} to one of them")


def validate_model(m: ModelConfig) -> None:
    """Tower shapes that cannot be built; also checked by create_model for configs built in code."""
    _choice(m.vision.act, ACTS, "model.vision.act")
    _choice(m.text.act, ACTS, "model.text.act")
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
    _choice(t.strategy, STRATEGIES, "train.strategy")
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.loss, LOSSES, "train.loss")
    validate_model(m)
    _choice(cfg.tokenizer.model_type, ("unigram", "bpe"), "tokenizer.model_type")
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
            _choice(tower, TOWERS, f"train.{key}[]")
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
    """Rebuild a validated config from ``to_yaml`` output (e.g. stored next to weights)."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(text)))
    except OmegaConfBaseException as e:
        raise _explain(e, source) from None
    validate(cfg)
    return cfg


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config (dataclass or plain dict), for manifests and reports."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
