"""Towers: preset sizes against published counts and an independent implementation (transformers)."""
import math

import pytest
import torch
from transformers import SiglipConfig, SiglipModel as HFSiglipModel

from sigscale.pretrain.config import PRESETS
from sigscale.pretrain.towers import count_params, create_model, param_summary, tower_flops_per_sample


def vit_params(width, depth, mlp, patch, image, channels=3):
    """Closed-form count of a SigLIP ViT with a MAP head, written from the architecture, not the code."""
    block = 4 * width * width + 4 * width + 2 * width * mlp + mlp + width + 4 * width
    n = (image // patch) ** 2
    head = width + 4 * width * width + 4 * width + 2 * width + 2 * width * mlp + mlp + width
    return depth * block + channels * patch * patch * width + width + n * width + 2 * width + head


def hf_count(preset):
    cfg = PRESETS[preset]
    v, t = cfg.vision, cfg.text
    hf = SiglipConfig(
        vision_config=dict(hidden_size=v.width, num_hidden_layers=v.depth, num_attention_heads=v.heads,
                           intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch_size),
        text_config=dict(hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.heads,
                         intermediate_size=t.mlp_dim, vocab_size=t.vocab_size,
                         max_position_embeddings=t.context_length, projection_size=v.width),
    )
    with torch.device("meta"):
        m = HFSiglipModel(hf)
    return count_params(m.vision_model), count_params(m.text_model)


def test_so400m_image_tower_matches_published_size():
    # So400M/14: width 1152, depth 27, MLP 4304 -> ~428M image parameters ("Getting ViT in Shape").
    m = create_model("so400m14_224", device="meta")
    n = count_params(m.visual)
    assert n == vit_params(1152, 27, 4304, 14, 224)
    assert abs(n - 428e6) / 428e6 < 0.005
    assert param_summary(m)["total"] == n + count_params(m.text) + 2


@pytest.mark.parametrize("preset", ["so400m14_384", "so400m16_i18n_256", "b16_224", "l16_256"])
def test_presets_match_transformers_siglip(preset):
    """Same shapes built by transformers' independent SigLIP implementation have the same sizes."""
    ours = create_model(preset, device="meta")
    hf_vision, hf_text = hf_count(preset)
    assert count_params(ours.visual) == hf_vision
    if PRESETS[preset].text.projection:
        assert count_params(ours.text) == hf_text
    else:  # mSigLIP: HF always has a text head (width x width + bias); ours has none
        w = PRESETS[preset].text.width
        assert count_params(ours.text) == hf_text - w * w - w


def test_published_totals():
    # HF model cards: siglip-so400m-patch14-384 878M, siglip-so400m-patch16-256-i18n 1.13B, siglip-base-patch16-224 203M.
    for preset, total in [("so400m14_384", 878e6), ("so400m16_i18n_256", 1.13e9), ("b16_224", 203e6)]:
        n = count_params(create_model(preset, device="meta"))
        assert abs(n - total) / total < 0.005, (preset, n)


def test_siglip_init_and_interface():
    torch.manual_seed(0)
    m = create_model("tiny")
    assert m.logit_scale.shape == (1,) and math.isclose(m.logit_scale.item(), math.log(10), rel_tol=1e-6)
    assert m.logit_bias.item() == -10
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = torch.randint(0, 1000, (3, 16))
    img, txt, t, b = m(pixels, ids)
    assert img.shape == txt.shape == (3, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    raw = m.encode_text(ids, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), txt)


def test_text_vocab_follows_tokenizer_and_meta_init():
    m = create_model("tiny", device="meta", text_vocab_size=321)
    assert m.text.token_embedding.weight.shape == (321, 64) and m.logit_scale.is_meta
    m.to_empty(device="cpu")
    m.init_weights()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert math.isclose(m.logit_scale.item(), math.log(10), rel_tol=1e-6)
    # LayerNorms reset to identity, projections random: a real init, not garbage from to_empty.
    assert torch.equal(m.visual.norm.weight, torch.ones(64))
    assert 0.001 < m.visual.blocks[0].attn.qkv.weight.std() < 0.5


def test_max_logit_scale_clamps_only_when_configured():
    m = create_model("tiny")
    with torch.no_grad():
        m.logit_scale.fill_(6.0)
    assert m.temperature_and_bias()[0].item() == 6.0
    import dataclasses
    capped = create_model(dataclasses.replace(PRESETS["tiny"], max_logit_scale=math.log(100)))
    with torch.no_grad():
        capped.logit_scale.fill_(6.0)
    assert math.isclose(capped.temperature_and_bias()[0].item(), math.log(100), rel_tol=1e-6)


def test_flops_estimate_is_dominated_by_matmuls():
    f = tower_flops_per_sample(PRESETS["so400m14_224"])
    # ~2 x params x tokens for the encoder: 2 * 411M * 256 ~ 2.1e11 forward FLOPs per image.
    assert 2.0e11 < f["vision"] < 2.5e11
    assert f["text"] < f["vision"]
