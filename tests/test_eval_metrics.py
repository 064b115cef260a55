"""Eval metrics against brute-force references, protocol constants against their published sources, readers' errors."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from eval_fixtures import brute_force_recall, tokenizer_model, write_class_folder, write_imagenet_val, write_xm3600
from sigscale.eval.config import BenchmarkConfig, load_eval_config, validate_benchmarks, validate_job
from sigscale.eval.imagenet import CLIP_TEMPLATES, IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES, IMAGENET_WNIDS
from sigscale.eval.retrieval import recall_at_k
from sigscale.eval.xm3600 import XM3600Error, captions_by_language, evaluate_xm3600, languages_in, load_xm3600, record
from sigscale.eval.zeroshot import ZeroShotError, canonicalize_prompt, load_image_folder, prompts, topk_accuracy
from sigscale.core.config import ConfigError
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import create_model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_img, d = 30, 8
    owner = torch.randint(0, n_img, (70,), generator=g)
    img = F.normalize(torch.randn(n_img, d, generator=g), dim=-1)
    txt = F.normalize(img[owner] + 0.8 * torch.randn(70, d, generator=g), dim=-1)
    got = recall_at_k(img, txt, owner, ks=(1, 5, 10), block=7)
    for k in (1, 5, 10):
        i2t, t2i = brute_force_recall(img, txt, owner.tolist(), k)
        # images with no caption can never be hit: the brute force counts them as misses too
        assert got[f"i2t_r@{k}"] == pytest.approx(i2t) and got[f"t2i_r@{k}"] == pytest.approx(t2i)


def test_ties_count_against_the_model():
    """A collapsed model (every embedding equal) must not look perfect."""
    img = F.normalize(torch.ones(10, 4), dim=-1)
    txt = F.normalize(torch.ones(20, 4), dim=-1)
    got = recall_at_k(img, txt, torch.arange(20) % 10, ks=(1, 5))
    assert got["i2t_r@1"] == 0 and got["t2i_r@1"] == 0 and got["t2i_r@5"] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_accuracy_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(57, 6, generator=g), dim=-1)
    cls = F.normalize(torch.randn(9, 6, generator=g), dim=-1)
    labels = torch.randint(0, 9, (57,), generator=g)
    got = topk_accuracy(img, cls, labels, ks=(1, 5), block=10)
    for k in (1, 5):
        hits = 0
        for i in range(57):
            scores = [(img[i] @ cls[c]).item() for c in range(9)]
            ranked = sorted(range(9), key=lambda c: -scores[c])
            hits += labels[i].item() in ranked[:k]
        assert got[f"top{k}"] == pytest.approx(100 * hits / 57)


def test_imagenet_metadata_equals_published_lists():
    """Class names and templates as open_clip ships them (CLIP notebook); wnids as timm's ILSVRC-2012 list."""
    import timm
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as OC_NAMES, OPENAI_IMAGENET_TEMPLATES

    assert IMAGENET_CLASSNAMES == tuple(OC_NAMES) and len(IMAGENET_CLASSNAMES) == 1000
    assert CLIP_TEMPLATES == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES) and len(CLIP_TEMPLATES) == 80
    assert IMAGENET_TEMPLATES[-1] == "{}" and len(IMAGENET_TEMPLATES) == 81  # big_vision's CLIP_PAPER list
    synsets = open(os.path.join(os.path.dirname(timm.__file__), "data", "_info", "imagenet_synsets.txt")).read().split()
    assert list(IMAGENET_WNIDS) == synsets == sorted(synsets)
    assert IMAGENET_CLASSNAMES[IMAGENET_WNIDS.index("n01440764")] == "tench"


def test_prompt_canonicalisation_follows_big_vision():
    # big_vision prompt_engineering._canonicalize: '_' -> ' ', punctuation dropped except the kept string.
    assert canonicalize_prompt("Jack-o'-lantern", ",") == "jackolantern"
    assert canonicalize_prompt("great_white  shark, Carcharodon", ",") == "great white shark, carcharodon"
    assert canonicalize_prompt("a photo of the {}.", "{}") == "a photo of the {}"
    assert prompts(["Chihuahua", "Jack-o'-lantern"], ["a {} in a video game.", "{}"]) == [
        "a chihuahua in a video game", "chihuahua", "a jackolantern in a video game", "jackolantern"]


def test_xm3600_reader_errors(tmp_path):
    with pytest.raises(XM3600Error, match="captions.jsonl not found"):
        load_xm3600(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image/key": "abc", "en": {"caption": ["x"]}}) + "\n")
    with pytest.raises(XM3600Error, match="abc.jpg listed at .*:1 is missing"):
        load_xm3600(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"image/key": "abc", "en": \n')
    with pytest.raises(XM3600Error, match=r"captions.jsonl:1 is not valid JSON"):
        load_xm3600(tmp_path)


def test_xm3600_languages_and_caption_protocols(tmp_path):
    root = write_xm3600(tmp_path / "xm", n_images=6, languages=("en", "zh", "ar"))
    _, paths, rows = load_xm3600(root)
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    every = captions_by_language(rows, ["en", "zh", "ar"], False, root)
    first = captions_by_language(rows, ["en", "zh", "ar"], True, root)
    for lang in ("en", "zh", "ar"):
        assert len(every[lang][0]) == sum(len(r[lang]["caption"]) for r in rows) > 6
        assert first[lang] == ([r[lang]["caption"][0] for r in rows], list(range(6)))
    with pytest.raises(XM3600Error, match=r"language 'fil' has no captions .*languages present: \['ar', 'en', 'zh'\]"):
        captions_by_language(rows, ["en", "fil"], False, root)


# One line as the official captions.jsonl has it (google.github.io/crossmodal-3600): the key, the
# locale where the photo was taken, and per language the captions in three spellings.
OFFICIAL_LINE = {
    "image/key": "000411001ff7dd4f", "image/locale": "bn",
    "en": {"caption": ["A Bengali woman in a red sari.", "A woman standing in front of a house."],
           "caption/tokenized": ["A Bengali woman in a red sari .", "A woman standing in front of a house ."],
           "caption/tokenized/lowercase": ["a bengali woman in a red sari .", "a woman standing in front of a house ."]},
    "de": {"caption": ["Eine Frau in einem roten Sari."], "caption/tokenized": ["Eine Frau in einem roten Sari ."],
           "caption/tokenized/lowercase": ["eine frau in einem roten sari ."]},
}


def test_xm3600_official_line_locale_is_not_a_language(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "000411001ff7dd4f.jpg").write_bytes(b"")
    (tmp_path / "captions.jsonl").write_text(json.dumps(OFFICIAL_LINE) + "\n", encoding="utf-8")
    _, _, rows = load_xm3600(tmp_path)
    assert languages_in(rows) == ["de", "en"]
    caps = captions_by_language(rows, languages_in(rows), False, tmp_path)
    assert caps["en"] == (OFFICIAL_LINE["en"]["caption"], [0, 0])
    # The fixtures write every field of the official file.
    assert record("000411001ff7dd4f", "bn", {k: OFFICIAL_LINE[k]["caption"] for k in ("en", "de")}) == OFFICIAL_LINE


def test_xm3600_evaluates_every_caption_language_of_a_full_format_file(tmp_path):
    root = write_xm3600(tmp_path / "xm", n_images=5, languages=("en", "ru", "th"))
    assert all("image/locale" in json.loads(l) for l in (root / "captions.jsonl").read_text().splitlines())
    tok = Tokenizer(tokenizer_model(tmp_path / "tok.model"), context_length=16)
    model = create_model("tiny", text_vocab_size=tok.vocab_size)
    res = evaluate_xm3600(model, tok, root)
    assert sorted(res["languages"]) == ["en", "ru", "th"] and res["missing_official_languages"][:1] == ["ar"]


def test_image_folder_layouts_and_errors(tmp_path):
    paths, labels, names = load_image_folder(write_imagenet_val(tmp_path / "in", per_class=2))
    # Synset folders without a class-names file: 1000-way, labels are ImageNet indices.
    assert len(names) == 1000 and IMAGENET_WNIDS.index("n02085620") == 151 and labels == [0, 0, 1, 1, 151, 151]
    paths, labels, names = load_image_folder(write_class_folder(tmp_path / "cls", per_class=2))
    assert names == ["red square", "green square", "blue square", "yellow square"] and labels == [0, 0, 1, 1, 2, 2, 3, 3]

    with pytest.raises(ZeroShotError, match=r"does not exist; point it at an ImageFolder"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "cls" / "c9").mkdir()
    with pytest.raises(ZeroShotError, match=r"classnames.txt has 4 names but .* has 5 class folders"):
        load_image_folder(tmp_path / "cls")
    (tmp_path / "cls" / "classnames.txt").write_text("a\nb\nc\nd\ne\n")
    with pytest.raises(ZeroShotError, match=r"class folders \['c9'\] .* hold no images"):
        load_image_folder(tmp_path / "cls")
    (tmp_path / "cls" / "classnames.txt").unlink()
    with pytest.raises(ZeroShotError, match=r"no classnames.txt and folders \['c0', 'c1', 'c2'\] are not ImageNet synset"):
        load_image_folder(tmp_path / "cls")


def test_benchmark_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown benchmark 'xm360' \(did you mean 'xm3600'\?\)"):
        validate_benchmarks(BenchmarkConfig(benchmarks=["xm360"]))
    with pytest.raises(ConfigError, match=r"benchmark 'imagenet' needs eval.imagenet_dir \(--imagenet-root\)"):
        validate_benchmarks(BenchmarkConfig(benchmarks=["imagenet"]))
    with pytest.raises(ConfigError, match=r"eval.xm3600_dir=.*missing does not exist"):
        validate_benchmarks(BenchmarkConfig(benchmarks=["xm3600"], xm3600_dir=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.xm3600_root'.*did you mean 'eval.xm3600_dir'"):
        load_eval_config("siglip_paper", ["eval.xm3600_root=/x"])
    job = load_eval_config("siglip_paper", [f"eval.imagenet_dir={tmp_path}", f"eval.xm3600_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="no checkpoints to evaluate"):
        validate_job(job)


def test_training_eval_section_is_the_eval_schema():
    """The experiment's eval: section and `sigscale eval` share one schema, so keys mean the same."""
    from sigscale.pretrain.config import EvalConfig, load_config

    assert BenchmarkConfig is EvalConfig
    cfg = load_config("tiny", ["eval.benchmarks=[xm3600]", "eval.xm3600_dir=/data/xm3600", "eval.every_steps=100"])
    assert cfg.eval.xm3600_dir == "/data/xm3600" and cfg.eval.every_steps == 100
