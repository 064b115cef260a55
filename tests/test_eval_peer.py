"""Our CLIP_benchmark-format numbers equal CLIP_benchmark's own (clip_benchmark 1.6.2, its builder and metrics)
on the same webdataset fixture and the same model, exported to open_clip."""
import io

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eval_fixtures import tokenizer_model, write_clipbench
from sigscale.eval.clipbench import TEMPLATES_FILE, clip_templates, evaluate_clipbench, shard_files
from sigscale.eval.embed import embed_images
from sigscale.eval.sources import url_samples
from sigscale.eval.zeroshot import class_embeddings
from sigscale.pretrain.data import preprocess_image
from sigscale.pretrain.interop import export_open_clip
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import create_model
from test_interop import ERF, open_clip_tiny

clip_benchmark = pytest.importorskip("clip_benchmark", reason="pip install clip_benchmark==1.6.2 (test extra)")
from clip_benchmark.datasets.builder import build_dataset  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer")
    tok = Tokenizer(tokenizer_model(root / "tok.model"), context_length=ERF.text.context_length)
    torch.manual_seed(0)
    ours = create_model(ERF).eval()
    oc = open_clip_tiny().eval()
    oc.load_state_dict(load_file(str(export_open_clip(ours, root / "oc.safetensors"))), strict=True)
    return {"ours": ours, "oc": oc, "tok": tok}


def _pixels(img: Image.Image) -> torch.Tensor:
    """CLIP_benchmark hands a decoded PIL image; PNG is lossless, so this is our preprocessing of the same pixels."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return preprocess_image(buf.getvalue(), ERF.vision.image_size)


def _loader(root, task):
    """The dataset and loader as CLIP_benchmark's CLI builds them for ``wds/`` tasks (webdataset batching)."""
    ds = build_dataset(f"wds/{root.name}", root=str(root), transform=_pixels, split="test", task=task)
    return ds, torch.utils.data.DataLoader(ds.batched(4), batch_size=None, shuffle=False)


def test_classification_equals_clip_benchmark(models, tmp_path):
    root = write_clipbench(tmp_path / "wds_colors", "classification", n=48)
    ds, loader = _loader(root, "zeroshot_classification")
    # Its classifier and logits; zeroshot_classification.evaluate itself stops in its accuracy() under
    # numpy 2 (float() of a 1-element array), so top-k is read off its logits the way accuracy() does.
    classifier = zeroshot_classification.zero_shot_classifier(models["oc"], models["tok"], ds.classes, ds.templates,
                                                              "cpu", amp=False)
    logits, target = zeroshot_classification.run_classification(models["oc"], classifier, loader, "cpu", amp=False)
    top = logits.topk(5, dim=1).indices
    theirs = {k: (top[:, :k] == target[:, None]).any(1).float().mean().item() for k in (1, 5)}
    ours = evaluate_clipbench(models["ours"], models["tok"], root, batch_size=5)
    assert ours["classes"] == len(ds.classes) == 5 and ours["images"] == len(target) == 48
    # Every score agrees, not only the accuracy (which a random tiny model leaves near chance): same
    # prompts (its {c} templates), same pixels, same class and image embeddings.
    img = embed_images(models["ours"], [s["image"] for s in url_samples(shard_files(root))])
    cls = class_embeddings(models["ours"], models["tok"], ds.classes, clip_templates(root / TEMPLATES_FILE))
    torch.testing.assert_close(100 * img @ cls.T, logits, atol=1e-3, rtol=0)
    assert ours["top1"] == pytest.approx(100 * theirs[1]) and ours["top5"] == pytest.approx(100 * theirs[5])


def test_retrieval_equals_clip_benchmark(models, tmp_path):
    root = write_clipbench(tmp_path / "wds_caps", "retrieval", n=12)
    _, loader = _loader(root, "zeroshot_retrieval")
    theirs = zeroshot_retrieval.evaluate(models["oc"], loader, models["tok"], device="cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    ours = evaluate_clipbench(models["ours"], models["tok"], root, batch_size=5)["all"]
    for k in (1, 5, 10):
        assert ours[f"i2t_r@{k}"] == pytest.approx(100 * theirs[f"text_retrieval_recall@{k}"])
        assert ours[f"t2i_r@{k}"] == pytest.approx(100 * theirs[f"image_retrieval_recall@{k}"])
