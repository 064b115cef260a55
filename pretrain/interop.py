"""Move SigLIP weights between our towers, Hugging Face ``transformers`` and ``open_clip``.

Hugging Face: ``export_hf`` writes a ``SiglipModel`` directory (config.json + model.safetensors)
and ``import_hf`` reads one back. The layouts differ only in naming and in how attention
projections are packed: timm fuses q/k/v into ``attn.qkv`` and splits the MAP head into ``q``
and ``kv``, while HF splits q/k/v in the encoders and fuses q/k/v (``nn.MultiheadAttention``)
in the head. Both compute LayerNorm -> attention -> residual, LayerNorm -> MLP -> residual, the
MAP head as ``x = attn(probe, tokens); x + mlp(norm(x))`` without q/k norm, and the text
embedding as final LayerNorm at the last position followed by the head.

open_clip: SigLIP there is a ``CustomTextCLIP`` whose image tower wraps the same timm ViT as
``visual.trunk`` and whose text tower is the same ``TextTransformer``; only the prefix and
the 0-dim ``logit_scale``/``logit_bias`` differ. Its SigLIP configs use exact (erf) GELU, so
import with ``act='gelu'`` in both towers for exact parity.

Checkpoints are read with safetensors, or ``torch.load(weights_only=True)`` for .pt/.bin.
Imported tensors are cast to the dtype of our freshly built model (float32).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sigscale.core.config import config_hash, from_yaml, to_yaml
from sigscale.core.errors import SigscaleError
from sigscale.core.rundir import RunDir
from sigscale.pretrain.checkpoint import COMPLETE, DEEPSPEED_TAG, checkpoint_step, latest_checkpoint, list_checkpoints
from sigscale.pretrain.config import ExperimentConfig, ModelConfig, TextConfig, VisionConfig, config_from_yaml
from sigscale.pretrain.data import RESAMPLE
from sigscale.pretrain.towers import SiglipModel, create_model, resolve_model_config

StateDict = Dict[str, torch.Tensor]


class CheckpointLoadError(SigscaleError, ValueError):
    """A checkpoint path cannot be loaded as given; the message says what it holds and what to pass."""


PathLike = Union[str, Path]

_TO_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# gelu_new is the same tanh formula as PyTorch's approximate='tanh'.
_FROM_HF_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_WEIGHTS = "model.safetensors"
_WEIGHTS_FIX = ("write it again (`sigscale export`, or the run's training), or evaluate one of its run's step "
                "checkpoints")


# ----------------------------------------------------------------------------- key maps

def _hf_pairs(cfg: ModelConfig) -> List[Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """(our keys, HF keys): the row-wise concatenation of ours equals that of theirs (up to reshape)."""
    pairs: List[Tuple[Tuple[str, ...], Tuple[str, ...]]] = []

    def add(ours: Iterable[str], theirs: Iterable[str]) -> None:
        pairs.append((tuple(ours), tuple(theirs)))

    def linear(ours: str, theirs: str) -> None:
        for p in ("weight", "bias"):
            add([f"{ours}.{p}"], [f"{theirs}.{p}"])

    add(["logit_scale"], ["logit_scale"])
    add(["logit_bias"], ["logit_bias"])

    v, hv = "visual", "vision_model"
    linear(f"{v}.patch_embed.proj", f"{hv}.embeddings.patch_embedding")
    add([f"{v}.pos_embed"], [f"{hv}.embeddings.position_embedding.weight"])
    for i in range(cfg.vision.depth):
        o, t = f"{v}.blocks.{i}", f"{hv}.encoder.layers.{i}"
        linear(f"{o}.norm1", f"{t}.layer_norm1")
        for p in ("weight", "bias"):  # timm packs q, k, v row-wise in that order
            add([f"{o}.attn.qkv.{p}"], [f"{t}.self_attn.{n}_proj.{p}" for n in "qkv"])
        linear(f"{o}.attn.proj", f"{t}.self_attn.out_proj")
        linear(f"{o}.norm2", f"{t}.layer_norm2")
        linear(f"{o}.mlp.fc1", f"{t}.mlp.fc1")
        linear(f"{o}.mlp.fc2", f"{t}.mlp.fc2")
    linear(f"{v}.norm", f"{hv}.post_layernorm")
    a, h = f"{v}.attn_pool", f"{hv}.head"
    add([f"{a}.latent"], [f"{h}.probe"])
    # MultiheadAttention's in_proj is [q; k; v]; timm's kv Linear is [k; v].
    add([f"{a}.q.weight", f"{a}.kv.weight"], [f"{h}.attention.in_proj_weight"])
    add([f"{a}.q.bias", f"{a}.kv.bias"], [f"{h}.attention.in_proj_bias"])
    linear(f"{a}.proj", f"{h}.attention.out_proj")
    linear(f"{a}.norm", f"{h}.layernorm")
    linear(f"{a}.mlp.fc1", f"{h}.mlp.fc1")
    linear(f"{a}.mlp.fc2", f"{h}.mlp.fc2")

    tx, ht = "text", "text_model"
    add([f"{tx}.token_embedding.weight"], [f"{ht}.embeddings.token_embedding.weight"])
    add([f"{tx}.positional_embedding"], [f"{ht}.embeddings.position_embedding.weight"])
    for i in range(cfg.text.depth):
        o, t = f"{tx}.transformer.resblocks.{i}", f"{ht}.encoder.layers.{i}"
        linear(f"{o}.ln_1", f"{t}.layer_norm1")
        add([f"{o}.attn.in_proj_weight"], [f"{t}.self_attn.{n}_proj.weight" for n in "qkv"])
        add([f"{o}.attn.in_proj_bias"], [f"{t}.self_attn.{n}_proj.bias" for n in "qkv"])
        linear(f"{o}.attn.out_proj", f"{t}.self_attn.out_proj")
        linear(f"{o}.ln_2", f"{t}.layer_norm2")
        linear(f"{o}.mlp.c_fc", f"{t}.mlp.fc1")
        linear(f"{o}.mlp.c_proj", f"{t}.mlp.fc2")
    linear(f"{tx}.ln_final", f"{ht}.final_layer_norm")
    if cfg.text.projection:
        linear(f"{tx}.text_projection", f"{ht}.head")
    return pairs


def _to_open_clip_key(key: str) -> str:
    return "visual.trunk." + key[len("visual."):] if key.startswith("visual.") else key


# ----------------------------------------------------------------------------- shared helpers

def _first(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_keys(have: Iterable[str], need: Iterable[str], source: str, fix: str) -> None:
    """Raise a ValueError naming the file, the first missing/unexpected keys and the fix."""
    have, need = set(have), set(need)
    missing, unexpected = need - have, have - need
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise ValueError(f"{source}: {'; '.join(parts)}; {fix}")


def _build(cfg: ModelConfig, state: StateDict, source: str, fix: str) -> SiglipModel:
    """Build our model on the meta device and assign ``state`` (shape-checked, cast) to it."""
    model = create_model(cfg, device="meta")
    target = model.state_dict()
    _check_keys(state, target, source, fix)
    loaded = {}
    for key, want in target.items():
        got = state[key]
        if got.numel() != want.numel():
            raise ValueError(
                f"{source}: {key} has shape {tuple(got.shape)} but the config needs {tuple(want.shape)}; {fix}"
            )
        loaded[key] = got.detach().to(dtype=want.dtype).reshape(want.shape).contiguous()
    model.load_state_dict(loaded, strict=True, assign=True)
    return model


def _cpu_state(model: SiglipModel) -> StateDict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _save(state: StateDict, path: Path) -> None:
    # Clone: split views share storage, which safetensors refuses to write.
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- Hugging Face

def _hf_config(cfg: ModelConfig):
    """A transformers.SiglipConfig with our tower shapes."""
    from transformers import SiglipConfig

    v, t = cfg.vision, cfg.text
    return SiglipConfig(
        vision_config=dict(
            hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
            num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size, num_channels=3,
            hidden_act=_TO_HF_ACT[v.act], layer_norm_eps=v.ln_eps, vision_use_head=True,
        ),
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
            num_hidden_layers=t.depth, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
            hidden_act=_TO_HF_ACT[t.act], layer_norm_eps=t.ln_eps, projection_size=v.width,
            # Our SentencePiece convention (tokenizer.py): EOS = pad = 1, no BOS. Metadata only.
            pad_token_id=1, eos_token_id=1, bos_token_id=None,
        ),
    )


def _write_hf_processor(out: Path, cfg: ModelConfig, tokenizer_model: PathLike | None) -> None:
    """The preprocessing beside the weights, so AutoProcessor and pipelines load the export as they are.

    Images: transformers' SiglipImageProcessor at the tower size, bicubic (pretrain.data.RESAMPLE, the
    eval protocol). Text: the SentencePiece model as SiglipTokenizer's spiece.model, truncating at the
    tower's context length. Without a tokenizer only the image side is written.
    """
    from transformers import SiglipImageProcessor, SiglipProcessor, SiglipTokenizer
    from transformers.image_utils import PILImageResampling

    image = SiglipImageProcessor(size={"height": cfg.vision.image_size, "width": cfg.vision.image_size},
                                 resample=PILImageResampling(int(RESAMPLE)))
    if tokenizer_model is None:
        image.save_pretrained(out)
        return
    src = Path(tokenizer_model)
    if not src.is_file():
        raise CheckpointLoadError(f"tokenizer model {src} does not exist; pass the SentencePiece .model the "
                                  "checkpoint was trained with (--tokenizer)")
    shutil.copyfile(src, out / "spiece.model")  # the file name SiglipTokenizer reads
    # input_ids only: SigLIP's text tower reads padded sequences without an attention mask (big_vision),
    # and so do our towers; a mask from the tokenizer would make transformers' model score differently.
    tokenizer = SiglipTokenizer(vocab_file=str(out / "spiece.model"), model_max_length=cfg.text.context_length,
                                model_input_names=["input_ids"])
    SiglipProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(out)


def export_hf(model: SiglipModel, out_dir: PathLike, tokenizer_model: PathLike | None = None) -> Path:
    """Write ``out_dir`` as a transformers ``SiglipModel`` checkpoint: config.json, model.safetensors and
    the processor (image preprocessing; with ``tokenizer_model``, spiece.model and the tokenizer config).

    Without a text projection the HF head is written as identity so it is a no-op. The model must
    be unwrapped (plain tensors, not FSDP shards).
    """
    cfg = model.cfg
    if not cfg.text.projection and cfg.text.width != cfg.vision.width:
        raise ValueError(f"text width {cfg.text.width} != image width {cfg.vision.width} without a projection")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = _cpu_state(model)
    hf: StateDict = {}
    for our_keys, hf_keys in _hf_pairs(cfg):
        t = torch.cat([ours[k] for k in our_keys]) if len(our_keys) > 1 else ours[our_keys[0]]
        if our_keys == ("visual.pos_embed",):
            t = t[0]  # timm keeps a batch axis: (1, N, d) -> HF embedding table (N, d)
        hf.update(zip(hf_keys, t.chunk(len(hf_keys))))
    if not cfg.text.projection:
        w = cfg.text.width
        dtype = ours["text.ln_final.weight"].dtype
        hf["text_model.head.weight"] = torch.eye(w, dtype=dtype)
        hf["text_model.head.bias"] = torch.zeros(w, dtype=dtype)
    # save_pretrained diffs against a default SiglipTextConfig, whose own CLIP-era bos/eos ids (49406/49407)
    # fail transformers' validation and print two warnings on every export: write the full dict instead.
    _hf_config(cfg).to_json_file(out / "config.json", use_diff=False)
    _save(hf, out / _HF_WEIGHTS)
    _write_hf_processor(out, cfg, tokenizer_model)
    return out


def _read_hf_weights(d: Path) -> Tuple[StateDict, str]:
    """The state dict of an HF directory (single or sharded safetensors, else pytorch_model.bin)."""
    single, index, pt = d / _HF_WEIGHTS, d / f"{_HF_WEIGHTS}.index.json", d / "pytorch_model.bin"
    if single.is_file():
        return load_file(str(single)), str(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: StateDict = {}
        for shard in shards:
            state.update(load_file(str(d / shard)))
        return state, str(index)
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True), str(pt)
    raise ValueError(
        f"{d} has no {_HF_WEIGHTS}, {index.name} or {pt.name}; point import_hf at a directory "
        "written by export_hf or transformers' save_pretrained"
    )


def _act_from_hf(act: str, source: str, tower: str) -> str:
    if act not in _FROM_HF_ACT:
        raise ValueError(f"{source}: {tower} hidden_act={act!r} is not supported; use one of {sorted(_FROM_HF_ACT)}")
    return _FROM_HF_ACT[act]


def _is_identity(weight: torch.Tensor, bias: torch.Tensor) -> bool:
    return (weight.shape[0] == weight.shape[1] and torch.equal(weight, torch.eye(len(weight), dtype=weight.dtype))
            and not bias.any())


def import_hf(hf_dir: PathLike) -> SiglipModel:
    """Build our SiglipModel from a transformers SigLIP directory, inferring the ModelConfig.

    The text projection is dropped (``projection=False``) only when HF's head is exactly the
    identity, as ``export_hf`` writes for projection-free models; any other head is kept.
    """
    d = Path(hf_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{cfg_path} not found; point import_hf at a directory written by export_hf or save_pretrained")
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") != "siglip":
        raise ValueError(
            f"{cfg_path}: model_type={raw.get('model_type')!r}, expected 'siglip'; only SigLIP (v1) "
            "SiglipModel checkpoints can be imported"
        )
    from transformers import SiglipConfig
    from transformers.utils import logging as hf_logging

    # from_dict builds a default SiglipTextConfig on the way, whose own CLIP-era bos/eos ids (49406/49407)
    # fail transformers' validation: two warnings about a config that is not the one being loaded.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_cfg = SiglipConfig.from_dict(raw)  # fills the defaults that hub configs leave out
    finally:
        hf_logging.set_verbosity(level)
    hv, ht = hf_cfg.vision_config, hf_cfg.text_config
    if not hv.vision_use_head or hv.num_channels != 3:
        raise ValueError(f"{cfg_path}: needs vision_use_head=true and num_channels=3 (our image tower pools with a MAP head on RGB)")
    if ht.projection_size != hv.hidden_size:
        raise ValueError(
            f"{cfg_path}: text projection_size={ht.projection_size} must equal the image hidden_size={hv.hidden_size}"
        )
    state, source = _read_hf_weights(d)
    # position_ids are buffers that older transformers saved; they are not weights.
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    head_w, head_b = state.get("text_model.head.weight"), state.get("text_model.head.bias")
    projection = not (head_w is not None and head_b is not None and _is_identity(head_w, head_b))
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=hv.image_size, patch_size=hv.patch_size, width=hv.hidden_size, depth=hv.num_hidden_layers,
            heads=hv.num_attention_heads, mlp_dim=hv.intermediate_size,
            act=_act_from_hf(hv.hidden_act, str(cfg_path), "vision"), ln_eps=hv.layer_norm_eps,
        ),
        text=TextConfig(
            context_length=ht.max_position_embeddings, vocab_size=ht.vocab_size, width=ht.hidden_size,
            depth=ht.num_hidden_layers, heads=ht.num_attention_heads, mlp_dim=ht.intermediate_size,
            projection=projection, act=_act_from_hf(ht.hidden_act, str(cfg_path), "text"), ln_eps=ht.layer_norm_eps,
        ),
    )
    fix = f"the weights do not match {cfg_path}; re-export with export_hf or fix config.json"
    pairs = _hf_pairs(cfg)
    need = {k for _, theirs in pairs for k in theirs}
    if not projection:
        need |= {"text_model.head.weight", "text_model.head.bias"}
    _check_keys(state, need, source, fix)

    target = create_model(cfg, device="meta").state_dict()
    ours: StateDict = {}
    for our_keys, hf_keys in pairs:
        t = torch.cat([state[k] for k in hf_keys]) if len(hf_keys) > 1 else state[hf_keys[0]]
        if len(our_keys) == 1:
            ours[our_keys[0]] = t
            continue
        rows = [target[k].shape[0] for k in our_keys]
        if sum(rows) != t.shape[0]:
            raise ValueError(f"{source}: {hf_keys[0]} has {t.shape[0]} rows, the config needs {sum(rows)}; {fix}")
        ours.update(zip(our_keys, t.split(rows)))
    return _build(cfg, ours, source, fix)


# ----------------------------------------------------------------------------- open_clip

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the file name open_clip looks for in a model folder
_MODEL_KEY = "sigscale_model"  # our ModelConfig as YAML, beside the weights, so loading needs no --model


def export_open_clip(model: SiglipModel, path: PathLike) -> Path:
    """Write an open_clip ``CustomTextCLIP`` state dict (timm trunk, 0-dim logit scale/bias) with our model config.

    ``path``: a ``.safetensors`` file (config in its metadata), a ``.pt``/``.bin`` file (torch.save of
    ``{"state_dict": ..., "sigscale_model": ...}``, the layout open_clip's loader unwraps), or a folder
    (``open_clip_model.safetensors`` inside it).
    """
    state = {}
    for k, v in _cpu_state(model).items():
        state[_to_open_clip_key(k)] = v.reshape(()) if k in ("logit_scale", "logit_bias") else v
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt", ".bin"):
        path = path / OPEN_CLIP_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    config = to_yaml(model.cfg)
    if path.suffix == ".safetensors":
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path),
                  metadata={"format": "pt", _MODEL_KEY: config})
    else:
        torch.save({"state_dict": state, _MODEL_KEY: config}, path)
    return path


def _open_clip_config(path: Path) -> Optional[ModelConfig]:
    """The model config an export stored beside open_clip weights, or None (foreign weights)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(_MODEL_KEY)
    else:
        text = _read_state_dict(path).get(_MODEL_KEY)
    return from_yaml(ModelConfig, text, source=str(path)) if isinstance(text, str) else None


def _read_state_dict(path: Path) -> StateDict:
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of every kind: a file that is not a torch checkpoint
        raise ValueError(f"{path} is not a torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "give .pt/.bin files written by torch.save, or .safetensors files") from e


def import_open_clip(path_or_state_dict: Union[PathLike, Mapping[str, torch.Tensor]],
                     model_config: Union[str, ModelConfig]) -> SiglipModel:
    """Build our SiglipModel from an open_clip SigLIP (CustomTextCLIP + timm ViT trunk) checkpoint.

    Accepts a .safetensors/.pt/.bin path or a state dict, optionally under 'state_dict' and
    prefixed 'module.' (DDP). ``model_config`` (preset name or ModelConfig) gives the shapes.
    """
    cfg = resolve_model_config(model_config)
    if isinstance(path_or_state_dict, Mapping):
        state, source = dict(path_or_state_dict), "<state dict>"
    else:
        source = str(path_or_state_dict)
        state = _read_state_dict(Path(path_or_state_dict))
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):  # open_clip training checkpoints
        state = dict(state["state_dict"])
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: not a state dict of tensors; save model.state_dict(), not the module or optimizer")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    fix = ("expected an open_clip CustomTextCLIP with a timm ViT trunk (timm_pool='map', timm_proj='none') "
           "and a 'last'-pooled text tower; pass the ModelConfig it was trained with")
    names = {_to_open_clip_key(k): k for k in create_model(cfg, device="meta").state_dict()}
    _check_keys(state, names, source, fix)
    return _build(cfg, {ours: state[theirs] for theirs, ours in names.items()}, source, fix)


@dataclass
class CheckpointSource:
    """What a checkpoint path holds, as far as loading and reporting need to know."""

    path: Path
    kind: str  # "hf" | "safetensors" (sigscale final weights) | "dcp" (a training checkpoint) | "open_clip"
    weights: Path
    experiment: Optional[ExperimentConfig] = None  # the run's config, when the checkpoint carries or sits beside it
    step: Optional[int] = None
    config_hash: str = ""


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dcp_source(step_dir: Path) -> CheckpointSource:
    """A ``run/checkpoints/step_XXXXXXXX`` directory: its run's config.yaml gives the model."""
    if not (step_dir / COMPLETE).is_file():
        raise CheckpointLoadError(f"{step_dir} is not a complete checkpoint (no {COMPLETE} marker; a kill cut it "
                                  "short); evaluate an older step_* directory")
    if (step_dir / DEEPSPEED_TAG).is_dir():
        raise CheckpointLoadError(
            f"{step_dir} holds DeepSpeed ZeRO shards; consolidate them with the zero_to_fp32.py script DeepSpeed "
            f"wrote next to them (python {step_dir / DEEPSPEED_TAG}/../zero_to_fp32.py ...) or evaluate the run's "
            "model.safetensors")
    run = RunDir.of(step_dir)
    if run is None:
        raise CheckpointLoadError(f"{step_dir} is not inside a run dir (<run>/{RunDir.CHECKPOINTS}/ beside "
                                  f"<run>/{RunDir.CONFIG}): a training checkpoint is read with its run's config; "
                                  "keep the step directory inside <run>/checkpoints/")
    cfg = config_from_yaml(run.config.read_text(), source=str(run.config))
    return CheckpointSource(step_dir, "dcp", step_dir, cfg, checkpoint_step(step_dir), config_hash(cfg))


def resolve_checkpoint(path: PathLike) -> CheckpointSource:
    """Classify a checkpoint path: HF dir, sigscale run dir / weights, DCP step dir, or open_clip weights."""
    p = Path(path)
    if not p.exists():
        raise CheckpointLoadError(f"checkpoint {p} does not exist")
    if p.is_dir() and (p / "config.json").is_file():
        return CheckpointSource(p, "hf", p, step=None, config_hash=_hash_text((p / "config.json").read_text()))
    if p.is_dir() and p.name.startswith("step_"):
        return _dcp_source(p)
    if p.is_dir() and (p / OPEN_CLIP_WEIGHTS).is_file() and not (p / _HF_WEIGHTS).is_file():
        return CheckpointSource(p, "open_clip", p / OPEN_CLIP_WEIGHTS)
    if p.is_dir() and p.name == RunDir.CHECKPOINTS and latest_checkpoint(p) is not None:
        return _dcp_source(latest_checkpoint(p))
    if p.is_dir() and not (p / _HF_WEIGHTS).is_file():
        latest = latest_checkpoint(RunDir(p).checkpoints)
        if latest is None:
            raise CheckpointLoadError(
                f"{p} is neither a Hugging Face SiglipModel dir (config.json) nor a sigscale run dir "
                "(model.safetensors or checkpoints/step_*); point at one of those or at a weights file")
        return _dcp_source(latest)
    weights = p / _HF_WEIGHTS if p.is_dir() else p
    if weights.suffix == ".safetensors":
        try:
            with safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
        except SafetensorError as e:
            raise _damaged(weights, e, _WEIGHTS_FIX) from e
        if "config" in meta:
            cfg = config_from_yaml(meta["config"], source=str(weights))
            return CheckpointSource(p, "safetensors", weights, cfg, cfg.train.steps,
                                    meta.get("config_hash") or config_hash(cfg))
    return CheckpointSource(p, "open_clip", weights)


def _damaged(path: Path, error: BaseException, fix: str) -> CheckpointLoadError:
    """One line for checkpoint files that do not read back (cut short, overwritten, a bad disk)."""
    if isinstance(error, CheckpointException):  # DCP wraps each rank's failure: show the first
        error = next(iter(error.failures.values()))[0]
    cause = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
    return CheckpointLoadError(f"checkpoint {path} is damaged and cannot be read ({type(error).__name__}: {cause}); "
                               f"{fix}")


def _older_step_fix(step_dir: Path) -> str:
    """What to evaluate instead of a damaged step checkpoint: the step before it, or the run's final weights."""
    older = [p for p in list_checkpoints(step_dir.parent) if p.name < step_dir.name]
    run = RunDir.of(step_dir)
    weights = f"the run's {run.weights}" if run is not None and run.weights.is_file() else \
        "the run's model.safetensors (written when its training ends)"
    step = f"an older step ({older[-1]})" if older else "an older step_* directory"
    return f"evaluate {step} or {weights}"


def _load_dcp(src: CheckpointSource) -> SiglipModel:
    """Gather a sharded DCP checkpoint into a full model on this process alone (any saving world size)."""
    reader = dcp.FileSystemReader(str(src.weights))
    key = "model.text.token_embedding.weight"
    try:
        meta = reader.read_metadata().state_dict_metadata
        if key not in meta:
            raise CheckpointLoadError(f"{src.weights} has no {key}: not a sigscale training checkpoint")
        # The text vocabulary followed the tokenizer at training time, not necessarily model.text.vocab_size.
        model = create_model(src.experiment.model, text_vocab_size=meta[key].size[0])
        state = {"model": model.state_dict()}
        with warnings.catch_warnings():  # loading on one process is the intent here, not an accident
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)  # fills the tensors in place
    except CheckpointLoadError:
        raise
    except (Exception, CheckpointException) as e:  # pickle, zip, short reads: the files are damaged
        raise _damaged(src.weights, e, _older_step_fix(src.weights)) from e
    return model


def load_model(path: PathLike, model_config: Union[str, ModelConfig, None] = None) -> SiglipModel:
    """Load any checkpoint the CLI accepts, as a plain full model on the CPU.

    A Hugging Face SiglipModel dir; a sigscale run dir (model.safetensors, else its latest training
    checkpoint); a training checkpoint ``run/checkpoints/step_XXXXXXXX`` (sharded DCP, read with the
    run's config.yaml); or an open_clip state dict (.safetensors/.pt/.bin), which needs ``model_config``.
    """
    src = path if isinstance(path, CheckpointSource) else resolve_checkpoint(path)
    try:
        if src.kind == "hf":
            return import_hf(src.weights)
        if src.kind == "dcp":
            return _load_dcp(src)
        if src.kind == "open_clip":
            return _load_open_clip(src, model_config)
    except CheckpointLoadError:
        raise
    except ValueError as e:  # the importers' messages already name the file, the keys and the fix
        raise CheckpointLoadError(str(e)) from e
    try:
        state = load_file(str(src.weights))
    except SafetensorError as e:
        raise _damaged(src.weights, e, _WEIGHTS_FIX) from e
    model = create_model(src.experiment.model, device="meta",
                         text_vocab_size=state["text.token_embedding.weight"].shape[0])
    model.load_state_dict(state, assign=True)
    return model


def _load_open_clip(src: CheckpointSource, model_config: Union[str, ModelConfig, None]) -> SiglipModel:
    """open_clip weights with the given (or stored) tower shapes; the text vocabulary is read from the weights."""
    model_config = model_config or _open_clip_config(src.weights)
    if model_config is None:
        raise CheckpointLoadError(
            f"{src.weights} carries no sigscale config: for open_clip weights pass the model config "
            "(--model PRESET or an experiment YAML), e.g. --model b16_224")
    state = _read_state_dict(src.weights)
    if isinstance(state.get("state_dict"), Mapping):
        state = dict(state["state_dict"])
    emb = next((v for k, v in state.items() if k.endswith("text.token_embedding.weight")), None)
    cfg = resolve_model_config(model_config)
    if emb is not None:
        cfg = resolve_model_config(cfg, text_vocab_size=emb.shape[0])
    return import_open_clip(state, cfg)
