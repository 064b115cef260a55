"""Interop: transformers and open_clip load our exports with the same embeddings, and imports round-trip."""
import dataclasses
import json
from functools import partial

import open_clip
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from transformers import SiglipModel as HFSiglipModel, SiglipTokenizer

from sigscale.pretrain.interop import export_hf, export_open_clip, import_hf, import_open_clip
from sigscale.pretrain.tokenizer import train_tokenizer
from sigscale.pretrain.config import PRESETS
from sigscale.pretrain.towers import create_model

TINY = PRESETS["tiny"]
NO_PROJ = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, projection=False))
# open_clip's SigLIP towers use exact (erf) GELU in both towers.
ERF = dataclasses.replace(
    TINY, vision=dataclasses.replace(TINY.vision, act="gelu"), text=dataclasses.replace(TINY.text, act="gelu"),
)
TIMM_TINY = "vit_sigscale_tiny_siglip_test"


if not timm.is_model(TIMM_TINY):
    # open_clip's TimmModel passes no shape kwargs to timm, so a tiny SigLIP trunk must be a named
    # timm model: the same VisionTransformer as vit_base_patch16_siglip_224, at our 'tiny' shapes.
    @register_model
    def vit_sigscale_tiny_siglip_test(pretrained: bool = False, **kwargs) -> VisionTransformer:
        v = ERF.vision
        args = dict(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
                    num_heads=v.heads, mlp_ratio=v.mlp_dim / v.width, class_token=False, global_pool="map",
                    norm_layer=partial(nn.LayerNorm, eps=v.ln_eps))
        return build_model_with_cfg(VisionTransformer, TIMM_TINY, pretrained, **dict(args, **kwargs))


def open_clip_tiny() -> open_clip.model.CustomTextCLIP:
    """An open_clip SigLIP model shaped like ERF, built the way open_clip's SigLIP configs are."""
    t = ERF.text
    return open_clip.model.CustomTextCLIP(
        embed_dim=ERF.vision.width,
        vision_cfg=dict(image_size=ERF.vision.image_size, timm_model_name=TIMM_TINY, timm_model_pretrained=False,
                        timm_pool="map", timm_proj="none"),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                      layers=t.depth, mlp_ratio=t.mlp_dim / t.width, no_causal_mask=True, proj_bias=True,
                      pool_type="last", norm_kwargs={"eps": t.ln_eps}),
        init_logit_bias=-10,
    )


def perturb(module: nn.Module, seed: int) -> nn.Module:
    """Add noise to every parameter so zero biases and unit LayerNorms cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def inputs(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.vision, cfg.text
    pixels = torch.rand(3, 3, v.image_size, v.image_size, generator=g) * 2 - 1
    ids = torch.randint(0, t.vocab_size, (3, t.context_length), generator=g)
    return pixels, ids


def pooled(out) -> torch.Tensor:
    # transformers 5 returns BaseModelOutputWithPooling from get_*_features; older versions a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cfg", [TINY, NO_PROJ, ERF], ids=["tiny", "no_projection", "gelu"])
def test_hf_export_matches_transformers_and_round_trips(cfg, tmp_path):
    model = perturb(create_model(cfg), seed=1)
    out = export_hf(model, tmp_path / "hf")
    hf, info = HFSiglipModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    pixels, ids = inputs(cfg)
    with torch.no_grad():
        img, txt = model.encode_image(pixels, normalize=False), model.encode_text(ids, normalize=False)
        torch.testing.assert_close(pooled(hf.get_image_features(pixel_values=pixels)), img, atol=1e-4, rtol=0)
        torch.testing.assert_close(pooled(hf.get_text_features(input_ids=ids)), txt, atol=1e-4, rtol=0)
        # Same sigmoid logits: HF also uses exp(logit_scale) and an additive bias.
        logits = hf(input_ids=ids, pixel_values=pixels).logits_per_image
        scale, bias = model.temperature_and_bias()
        ours = model.encode_image(pixels) @ model.encode_text(ids).T * scale.exp() + bias
        torch.testing.assert_close(logits, ours, atol=1e-4, rtol=0)

    back = import_hf(out)
    assert back.cfg.vision == cfg.vision and back.cfg.text == cfg.text
    assert_same_state(back, model)


def test_hf_export_copies_tokenizer_for_siglip_tokenizer(tmp_path):
    spm = train_tokenizer([f"a photo of {n} red circles" for n in range(200)], tmp_path / "t.model", vocab_size=400)
    out = export_hf(create_model(TINY), tmp_path / "hf", tokenizer_model=spm)
    assert (out / "spiece.model").read_bytes() == spm.read_bytes()
    tok = SiglipTokenizer.from_pretrained(out)
    assert tok("a photo of red circles")["input_ids"][-1] == tok.eos_token_id


def test_open_clip_import_matches_open_clip(tmp_path):
    oc = perturb(open_clip_tiny(), seed=2)
    path = tmp_path / "oc.pt"
    torch.save(oc.state_dict(), path)
    model = import_open_clip(path, ERF).eval()
    # A DDP training checkpoint ({'state_dict': {'module.*'}}) imports to the same tensors.
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}}
    assert_same_state(import_open_clip(wrapped, ERF), model)

    pixels, ids = inputs(ERF, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), oc.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids, normalize=False), oc.encode_text(ids), atol=1e-5, rtol=0)
    assert model.logit_scale.item() == oc.logit_scale.item() and model.logit_bias.item() == oc.logit_bias.item()


def test_open_clip_export_loads_strictly_with_same_embeddings(tmp_path):
    model = perturb(create_model(ERF), seed=3)
    path = export_open_clip(model, tmp_path / "oc.safetensors")
    oc = open_clip_tiny().eval()
    oc.load_state_dict(load_file(str(path)), strict=True)
    pixels, ids = inputs(ERF, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(pixels), model.encode_image(pixels, normalize=False), atol=1e-5, rtol=0)
        torch.testing.assert_close(oc.encode_text(ids), model.encode_text(ids, normalize=False), atol=1e-5, rtol=0)
    assert_same_state(import_open_clip(path, ERF), model)


def test_import_hf_errors_name_file_keys_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json not found; point import_hf"):
        import_hf(tmp_path)

    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match=r"clip.config\.json: model_type='clip', expected 'siglip'"):
        import_hf(clip_dir)

    out = export_hf(create_model(TINY), tmp_path / "hf")
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    state.pop("vision_model.head.probe")
    state["vision_model.extra.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(ValueError) as e:
        import_hf(out)
    msg = str(e.value)
    assert str(weights) in msg and "missing keys: vision_model.head.probe" in msg
    assert "unexpected keys: vision_model.extra.weight" in msg and "re-export with export_hf" in msg

    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no model\.safetensors"):
        import_hf(out)


def test_import_open_clip_errors_name_keys_and_fix(tmp_path):
    state = open_clip_tiny().state_dict()
    extra = dict(state, **{"visual.head.proj.weight": torch.zeros(64, 64)})
    with pytest.raises(ValueError, match=r"<state dict>: unexpected keys: visual\.head\.proj\.weight; .*timm_proj='none'"):
        import_open_clip(extra, ERF)

    deeper = dataclasses.replace(ERF, text=dataclasses.replace(ERF.text, depth=3))
    with pytest.raises(ValueError, match=r"missing keys: text\.transformer\.resblocks\.2\..*pass the ModelConfig"):
        import_open_clip(state, deeper)

    wider_vocab = dataclasses.replace(ERF, text=dataclasses.replace(ERF.text, vocab_size=2000))
    with pytest.raises(ValueError, match=r"text\.token_embedding\.weight has shape \(1000, 64\) but the config needs \(2000, 64\)"):
        import_open_clip(state, wider_vocab)

    with pytest.raises(ValueError, match=r"missing\.pt does not exist"):
        import_open_clip(tmp_path / "missing.pt", ERF)
    with pytest.raises(ValueError, match=r"tokenizer model .* does not exist"):
        export_hf(create_model(TINY), tmp_path / "hf", tokenizer_model=tmp_path / "none.model")


@pytest.mark.parametrize("target", ["oc.pt", "oc.safetensors", "ocdir"])
def test_open_clip_export_round_trips_through_open_clip_and_back_without_a_model_flag(tmp_path, target):
    """Every output form loads with open_clip's own load_checkpoint, and back into sigscale with no --model."""
    import open_clip

    from sigscale.pretrain.interop import OPEN_CLIP_WEIGHTS, load_model

    model = perturb(create_model(ERF), seed=4)
    path = export_open_clip(model, tmp_path / target)
    assert path == (tmp_path / target / OPEN_CLIP_WEIGHTS if target == "ocdir" else tmp_path / target)
    oc = open_clip_tiny().eval()
    open_clip.load_checkpoint(oc, str(path), strict=True)  # the library's loader, not a hand-made state dict
    pixels, ids = inputs(ERF, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(pixels), model.encode_image(pixels, normalize=False), atol=1e-5, rtol=0)
    back = load_model(tmp_path / target)  # the stored config replaces --model
    assert_same_state(back, model)


def test_a_pt_file_that_is_not_a_torch_checkpoint_is_one_clear_error(tmp_path):
    from sigscale.pretrain.interop import CheckpointLoadError, load_model

    bogus = tmp_path / "oc.pt"
    bogus.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointLoadError, match=r"oc.pt is not a torch checkpoint .*written by torch.save"):
        load_model(bogus, "tiny")
