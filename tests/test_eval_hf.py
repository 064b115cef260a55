"""An imported tiny Hugging Face SiglipModel scores exactly what transformers computes on the same data."""
import io
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from eval_fixtures import brute_force_recall, tokenizer_model, write_class_folder, write_xm3600
from sigscale.eval.config import BenchmarkConfig
from sigscale.eval.embed import embed_images, embed_texts
from sigscale.eval.imagenet import IMAGENET_TEMPLATES
from sigscale.eval.run import evaluate, load_for_eval
from sigscale.eval.xm3600 import load_xm3600
from sigscale.eval.zeroshot import class_embeddings
from sigscale.pretrain.data import preprocess_image

SIZE, CTX = 32, 16


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A randomly initialised transformers SiglipModel, saved with save_pretrained, plus its spiece.model."""
    root = tmp_path_factory.mktemp("hf")
    spm = tokenizer_model(root / "tok.model")
    vocab = SiglipTokenizer(vocab_file=str(spm)).vocab_size
    torch.manual_seed(0)
    cfg = SiglipConfig(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=SIZE, patch_size=8),
        text_config=dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CTX),
    )
    model = SiglipModel(cfg).eval()
    with torch.no_grad():  # HF's init leaves biases at zero and LayerNorms at one; make every weight matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = root / "model"
    model.save_pretrained(out)
    shutil.copyfile(spm, out / "spiece.model")
    return out


def hf_embed(model, tok, proc, images=(), texts=()):
    """Normalised embeddings computed with transformers only (its tokenizer and image processor)."""
    with torch.no_grad():
        if images:
            pixels = proc(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
            out = model.get_image_features(pixel_values=pixels)
        else:
            ids = tok(list(texts), padding="max_length", max_length=CTX, truncation=True, return_tensors="pt")
            out = model.get_text_features(input_ids=ids["input_ids"])
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(out, dim=-1)


def test_imported_hf_model_evaluates_like_transformers(hf_dir, tmp_path):
    xm = write_xm3600(tmp_path / "xm", n_images=10, languages=("en", "ru", "zh", "hi"))
    cls = write_class_folder(tmp_path / "cls", per_class=3)
    loaded = load_for_eval(str(hf_dir))
    assert loaded.info["kind"] == "hf" and loaded.tokenizer.path.name == "spiece.model"
    cfg = BenchmarkConfig(benchmarks=["zeroshot", "xm3600"], classification_dir=str(cls), xm3600_dir=str(xm),
                          batch_size=4)
    ours = evaluate(loaded.model, loaded.tokenizer, cfg)

    hf = SiglipModel.from_pretrained(hf_dir).eval()
    tok = SiglipTokenizer.from_pretrained(hf_dir)
    # Images are stored at the tower's resolution, so resizing is the identity in both pipelines.
    proc = SiglipImageProcessor(size={"height": SIZE, "width": SIZE})

    # Zero-shot: 81 templates per class (class names here need no canonicalisation beyond the templates'
    # final '.', which both tokenizers drop), mean of normalised prompt embeddings, re-normalised, argmax.
    names = (cls / "classnames.txt").read_text().split("\n")[:4]
    files = sorted(p for p in cls.glob("c*/*.jpg"))
    labels = torch.tensor([int(p.parent.name[1:]) for p in files])
    img = hf_embed(hf, tok, proc, images=files)
    classes = torch.stack([F.normalize(hf_embed(hf, tok, proc, texts=[t.format(n) for t in IMAGENET_TEMPLATES]).mean(0), dim=0)
                           for n in names])
    # The pieces agree, not just the final numbers (a 12-image top-1 alone would be a weak check).
    ours_classes = class_embeddings(loaded.model, loaded.tokenizer, names, IMAGENET_TEMPLATES)
    ours_img = embed_images(loaded.model, files)
    torch.testing.assert_close(ours_classes, classes, atol=2e-5, rtol=0)
    torch.testing.assert_close(ours_img, img, atol=2e-5, rtol=0)
    pred = (ours_img @ ours_classes.T).argsort(dim=1, descending=True)
    assert ours["zeroshot"]["top1"] == pytest.approx(100 * (pred[:, 0] == labels).float().mean().item())
    assert ours["zeroshot"]["top5"] == 100.0 and ours["zeroshot"]["classes"] == 4 and ours["zeroshot"]["templates"] == 81

    # XM3600: our embeddings equal transformers' (to float noise), and our recalls equal brute-force
    # ranks of those same embeddings. (Brute force on transformers' own embeddings is not compared:
    # its 1e-7 differences can flip near-ties of this random model's similarities.)
    _, paths, rows = load_xm3600(xm)
    img = embed_images(loaded.model, paths)
    torch.testing.assert_close(img, hf_embed(hf, tok, proc, images=paths), atol=2e-5, rtol=0)
    for lang in ("en", "ru", "zh", "hi"):
        texts = [c for r in rows for c in r[lang]["caption"]]
        owner = [i for i, r in enumerate(rows) for _ in r[lang]["caption"]]
        txt = embed_texts(loaded.model, loaded.tokenizer, texts)
        torch.testing.assert_close(txt, hf_embed(hf, tok, proc, texts=texts), atol=2e-5, rtol=0)
        got = ours["xm3600"]["languages"][lang]
        assert got["captions"] == len(texts)
        for k in (1, 5, 10):
            i2t, t2i = brute_force_recall(img, txt, owner, k)
            assert got[f"i2t_r@{k}"] == pytest.approx(i2t) and got[f"t2i_r@{k}"] == pytest.approx(t2i), (lang, k)
    mean = ours["xm3600"]["mean"]["t2i_r@1"]
    assert mean == pytest.approx(sum(ours["xm3600"]["languages"][l]["t2i_r@1"] for l in ("en", "ru", "zh", "hi")) / 4)


@pytest.mark.parametrize("shape", [(480, 640), (768, 1024), (333, 500)])
def test_eval_pixels_equal_transformers_siglip_processor_on_real_size_jpegs(shape):
    """Eval decodes the full JPEG and resizes as transformers does, not at PIL's reduced draft scale."""
    rng = np.random.default_rng(shape[0])
    arr = rng.normal(128, 60, (*shape, 3)).clip(0, 255).astype(np.uint8)
    arr[shape[0] // 4: shape[0] // 2, shape[1] // 3: shape[1] // 2] = (200, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    ours = preprocess_image(data, 224)
    pil = SiglipImageProcessorPil()(images=[Image.open(io.BytesIO(data))], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(ours, pil, atol=1e-6, rtol=0)
    # transformers' default (torchvision) backend rounds its bicubic uint8 resize differently: one level at most.
    tv = SiglipImageProcessor()(images=[Image.open(io.BytesIO(data))], return_tensors="pt")["pixel_values"][0]
    diff = (ours - tv).abs()
    assert diff.max() <= 2 / 255 + 1e-6 and diff.mean() < 1e-3
    # The training fast path (reduced-scale JPEG decode from twice the tower size) is what eval must not use.
    if min(shape) >= 2 * 224:
        assert (preprocess_image(data, 224, fast=True) - pil).abs().max() > 0.1


def test_hf_export_loads_with_automodel_autoprocessor_and_the_zero_shot_pipeline(tmp_path):
    """An export is complete: transformers' own loaders and pipeline use it as it is, and agree with us."""
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, pipeline

    from sigscale.pretrain.interop import export_hf
    from sigscale.pretrain.tokenizer import Tokenizer
    from sigscale.pretrain.towers import create_model

    tok_path = tokenizer_model(tmp_path / "tok.model")
    # The pipeline pads SigLIP prompts to 64 tokens, so the text tower reads 64 here.
    torch.manual_seed(0)
    model = create_model("tiny", text_vocab_size=Tokenizer(tok_path).vocab_size, text_context_length=64).eval()
    out = export_hf(model, tmp_path / "hf", tokenizer_model=tok_path)
    assert type(AutoModel.from_pretrained(out)).__name__ == "SiglipModel"
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "SiglipProcessor"
    image_proc = AutoImageProcessor.from_pretrained(out)
    assert image_proc.size == {"height": 32, "width": 32} and int(image_proc.resample) == int(Image.BICUBIC)

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    labels = ["a red square", "a blue circle", "ein grünes Quadrat"]
    got = pipeline("zero-shot-image-classification", model=str(out))(img, candidate_labels=labels,
                                                                       hypothesis_template="{}")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    tok = Tokenizer(tok_path, context_length=64)
    with torch.no_grad():
        x = model.encode_image(preprocess_image(buf.getvalue(), 32)[None])
        y = model.encode_text(tok(labels))
        probs = torch.sigmoid(x @ y.T * model.logit_scale.exp() + model.logit_bias)[0]
    theirs = {r["label"]: r["score"] for r in got}
    # transformers' default image processor rounds its bicubic resize differently by one 8-bit level at most.
    torch.testing.assert_close(torch.tensor([theirs[l] for l in labels]), probs.float(), rtol=2e-2, atol=0)


def test_export_and_load_of_an_hf_dir_print_no_transformers_warnings(tmp_path, capfd):
    import logging

    from sigscale.pretrain.interop import export_hf, import_hf
    from sigscale.pretrain.towers import create_model

    logging.Logger.warning_once.cache_clear()  # transformers warns once per process: let earlier tests not hide it
    out = export_hf(create_model("tiny"), tmp_path / "hf", tokenizer_model=tokenizer_model(tmp_path / "tok.model"))
    import_hf(out)
    assert "bos_token_id" not in capfd.readouterr().err
