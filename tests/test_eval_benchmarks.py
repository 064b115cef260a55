"""Benchmarks in the formats they ship in (Karpathy JSON, XTD10, Babel-ImageNet, CLIP_benchmark webdataset),
their numbers against brute-force references, the registry's errors, and all of them through `sigscale eval`."""
import json

import pytest
import torch

from dist_helpers import run_distributed
from eval_fixtures import (BABEL_LABELS, brute_force_recall, tokenizer_model, write_babel,
                           write_clipbench, write_imagenet_val, write_karpathy, write_xm3600, write_xtd10)
from sigscale.cli import main
from sigscale.core.config import ConfigError
from sigscale.eval.babel import BabelImageNetError, evaluate_babel_imagenet, load_babel_labels
from sigscale.eval.clipbench import ClipBenchError, evaluate_clipbench, shard_files
from sigscale.eval.config import BenchmarkConfig, validate_benchmarks
from sigscale.eval.embed import embed_images, embed_texts
from sigscale.eval.karpathy import KarpathyError, evaluate_karpathy, load_karpathy
from sigscale.eval.registry import BENCHMARKS, lookup
from sigscale.eval.report import read_report
from sigscale.eval.run import evaluate
from sigscale.eval.sources import url_samples
from sigscale.eval.xtd10 import XTD10Error, evaluate_xtd10, load_xtd10
from sigscale.eval.zeroshot import class_embeddings
from sigscale.pretrain.interop import export_hf
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import create_model

KS = (1, 5, 10)
IMAGENET_TEMPLATES_FILE = "a photo of a {}.\n{}\na bad photo of the {}.\n"  # 3 English templates, cheap at 1000 classes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tok_path = tokenizer_model(root / "tok.model")
    tok = Tokenizer(tok_path, context_length=16)
    torch.manual_seed(0)
    model = create_model("tiny", text_vocab_size=tok.vocab_size).eval()
    return {"root": root, "tok": tok, "tok_path": tok_path, "model": model}


def _check_recall(got, img, txt, owners):
    for k in KS:
        i2t, t2i = brute_force_recall(img, txt, owners, k)
        assert got[f"i2t_r@{k}"] == pytest.approx(i2t) and got[f"t2i_r@{k}"] == pytest.approx(t2i)


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_karpathy_test_split_recall_matches_brute_force(tiny, tmp_path, dataset):
    root = write_karpathy(tmp_path / dataset, dataset, n_test=6)
    paths, texts, owners = load_karpathy(root, dataset)
    # The test split only (3 other splits in the file), every one of the 5 captions per image.
    assert len(paths) == 6 and len(texts) == 30 and owners == [i for i in range(6) for _ in range(5)]
    assert paths[0].parent.name == ("val2014" if dataset == "coco" else "images")
    res = evaluate_karpathy(tiny["model"], tiny["tok"], root, dataset, batch_size=4)
    assert res["images"] == 6 and res["captions"] == 30 and res["chance_r@1"] == pytest.approx(100 / 6)
    _check_recall(res["all"], embed_images(tiny["model"], paths), embed_texts(tiny["model"], tiny["tok"], texts), owners)
    assert len(load_karpathy(root, dataset, "restval")[0]) == 1


def test_karpathy_errors_name_the_file_and_fix(tmp_path):
    root = write_karpathy(tmp_path / "coco", "coco", n_test=2)
    with pytest.raises(KarpathyError, match=r"no images in split 'tst'; its splits are \['restval', 'test', 'train', 'val'\]"):
        load_karpathy(root, "coco", "tst")
    with pytest.raises(KarpathyError, match=r"dataset_flickr30k.json not found"):
        load_karpathy(root, "flickr30k")
    doc = json.loads((root / "dataset_coco.json").read_text())
    del doc["images"][-1]["sentences"][0]["raw"]
    (root / "bad").mkdir()
    (root / "bad" / "dataset_coco.json").write_text(json.dumps(doc))
    with pytest.raises(KarpathyError, match=r"dataset_coco.json is not a Karpathy-split file \(missing or malformed 'raw'\)"):
        load_karpathy(root / "bad", "coco")
    (root / "val2014" / "COCO_val2014_000000000100.jpg").unlink()
    with pytest.raises(KarpathyError, match=r"image COCO_val2014_000000000100.jpg \(imgid 0\).* is missing"):
        load_karpathy(root, "coco", "train")


def test_xtd10_per_language_recall_and_mean_match_brute_force(tiny, tmp_path):
    root = write_xtd10(tmp_path / "xtd", n=7)
    paths, captions = load_xtd10(root)
    assert sorted(captions) == ["de", "en", "jp", "ru", "zh"]  # from XTD10/, MIC/ and STAIR/
    res = evaluate_xtd10(tiny["model"], tiny["tok"], root, batch_size=3)
    img = embed_images(tiny["model"], paths)
    for lang, caps in captions.items():
        _check_recall(res["languages"][lang], img, embed_texts(tiny["model"], tiny["tok"], caps), list(range(7)))
    for m in ("i2t_r@1", "t2i_r@10"):
        assert res["mean"][m] == pytest.approx(sum(v[m] for v in res["languages"].values()) / 5)
    assert res["images"] == 7 and res["chance_r@1"] == pytest.approx(100 / 7)
    assert sorted(evaluate_xtd10(tiny["model"], tiny["tok"], root, languages=["zh", "de"])["languages"]) == ["de", "zh"]


def test_xtd10_errors(tmp_path):
    root = write_xtd10(tmp_path / "xtd", n=4)
    with pytest.raises(XTD10Error, match=r"no caption file .* for \['fr'\].*languages present: \['de', 'en', 'jp'"):
        load_xtd10(root, languages=["fr"])
    ru = root / "XTD10" / "test_1kcaptions_ru.txt"
    ru.write_text("\n".join(ru.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    with pytest.raises(XTD10Error, match=r"test_1kcaptions_ru.txt has 3 lines .* lists 4 images; caption files must align"):
        load_xtd10(root)
    with pytest.raises(XTD10Error, match=r"4 images listed in .* are missing.*set eval.xtd10_images"):
        load_xtd10(root, images=tmp_path / "elsewhere")


def test_babel_imagenet_per_language_against_argmax_reference(tiny, tmp_path):
    imagenet = write_imagenet_val(tmp_path / "in", per_class=2)
    (imagenet / "templates.txt").write_text(IMAGENET_TEMPLATES_FILE)
    files = write_babel(tmp_path / "babel")
    res = evaluate_babel_imagenet(tiny["model"], tiny["tok"], imagenet, files["labels"], files["prompts"], batch_size=4)
    langs = res["languages"]
    # A class missing in a language is not a candidate there; a class without images still is.
    assert {l: (v["classes"], v["images"], v["templates"]) for l, v in langs.items()} == \
        {"DE": (2, 4, 2), "EN": (3, 6, 3), "RU": (4, 6, 3)}
    assert langs["RU"]["chance_top1"] == 25.0
    paths = sorted(p for d in sorted(imagenet.iterdir()) if d.is_dir() for p in d.iterdir())
    labels = [0, 0, 1, 1, 151, 151]
    img = embed_images(tiny["model"], paths)
    templates = {"DE": ["ein Foto von {}.", "{}"]}
    for lang, (idxs, names) in BABEL_LABELS.items():
        cls = class_embeddings(tiny["model"], tiny["tok"], names, templates.get(lang, IMAGENET_TEMPLATES_FILE.split("\n")[:3]))
        hits = {1: 0, 5: 0}
        rows = [i for i, y in enumerate(labels) if y in idxs]
        for i in rows:
            scores = [(img[i] @ cls[c]).item() for c in range(len(idxs))]
            ranked = sorted(range(len(idxs)), key=lambda c: -scores[c])
            for k in hits:
                hits[k] += idxs.index(labels[i]) in ranked[:k]
        assert langs[lang]["top1"] == pytest.approx(100 * hits[1] / len(rows))
        assert langs[lang]["top5"] == pytest.approx(100 * hits[5] / len(rows))
    assert res["mean"]["top1"] == pytest.approx(sum(v["top1"] for v in langs.values()) / 3)
    with pytest.raises(BabelImageNetError, match=r"languages \['XX'\] are not in"):
        load_babel_labels(files["labels"], ["XX"])
    files["labels"].write_text(json.dumps({"EN": [[0, 1000], ["a", "b"]]}))
    with pytest.raises(BabelImageNetError, match=r"\['EN'\] must be \[distinct ImageNet class indices 0-999"):
        load_babel_labels(files["labels"])


def test_clipbench_classification_reads_shards_in_numeric_order(tiny, tmp_path):
    root = write_clipbench(tmp_path / "wds_colors", "classification", n=12)
    urls = shard_files(root)
    assert [u.rsplit("/", 1)[1] for u in urls[:3]] == ["0.tar", "1.tar", "2.tar"] and len(urls) == 11
    samples = list(url_samples(urls))
    assert [s["key"] for s in samples] == [f"s{i:05d}" for i in range(12)]
    res = evaluate_clipbench(tiny["model"], tiny["tok"], root, batch_size=5)
    assert res["task"] == "classification" and res["images"] == 12 and res["classes"] == 5 and res["templates"] == 2
    img = embed_images(tiny["model"], [s["image"] for s in samples])
    names = [l.strip() for l in (root / "classnames.txt").read_text().splitlines()]
    cls = class_embeddings(tiny["model"], tiny["tok"], names, ["a photo of a {}.", "itap of the {}."])
    top1 = sum(int((img[i] @ cls.T).argmax()) == s["cls"] for i, s in enumerate(samples))
    assert res["top1"] == pytest.approx(100 * top1 / 12)


def test_clipbench_retrieval_splits_captions_per_line(tiny, tmp_path):
    root = write_clipbench(tmp_path / "wds_caps", "retrieval", n=9)
    samples = list(url_samples(shard_files(root)))
    texts = [c for s in samples for c in s["txt"].splitlines()]
    owners = [i for i, s in enumerate(samples) for _ in s["txt"].splitlines()]
    res = evaluate_clipbench(tiny["model"], tiny["tok"], root, batch_size=4)
    assert res["task"] == "retrieval" and res["images"] == 9 and res["captions"] == len(texts) == 18
    img = embed_images(tiny["model"], [s["image"] for s in samples])
    _check_recall(res["all"], img, embed_texts(tiny["model"], tiny["tok"], texts), owners)
    (root / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ClipBenchError, match=r"dataset_type.txt says multilabel"):
        evaluate_clipbench(tiny["model"], tiny["tok"], root)
    (root / "test" / "nshards.txt").unlink()
    with pytest.raises(ClipBenchError, match=r"nshards.txt not found; a CLIP_benchmark webdataset task needs"):
        shard_files(root)


def test_registry_entries_and_name_errors(tmp_path):
    for bench in BENCHMARKS.values():  # every entry declares what a report needs to cite it
        assert bench.metrics and bench.chance and bench.protocol
    assert lookup(f"clipbench:{tmp_path}")[1] == tmp_path
    for name, msg in [("imagenett", "unknown benchmark 'imagenett' (did you mean 'imagenet'?)"),
                      ("clipbench", "unknown benchmark 'clipbench' (did you mean 'clipbench:PATH'?)"),
                      ("babel", "did you mean 'babel_imagenet'?")]:
        with pytest.raises(ConfigError) as e:
            lookup(name)
        assert msg in str(e.value)
    cfg = BenchmarkConfig(benchmarks=["babel_imagenet"], imagenet_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"needs eval.babel_imagenet_labels \(--babel-imagenet-labels\)"):
        validate_benchmarks(cfg)
    with pytest.raises(ConfigError, match=r"benchmark 'clipbench:/no/such': /no/such does not exist; fix the path after 'clipbench:'"):
        validate_benchmarks(BenchmarkConfig(benchmarks=["clipbench:/no/such"]))


def test_cli_runs_every_benchmark_on_its_shipped_format(tiny, tmp_path, capsys):
    hf = export_hf(tiny["model"], tmp_path / "hf", tiny["tok_path"])
    imagenet = write_imagenet_val(tmp_path / "in", per_class=2)
    (imagenet / "templates.txt").write_text("a photo of a {}.\n")  # one template: 1000 prompts, not 3000
    babel = write_babel(tmp_path / "babel")
    cls_task = write_clipbench(tmp_path / "wds_cls", "classification", n=6)
    ret_task = write_clipbench(tmp_path / "wds_ret", "retrieval", n=5)
    names = ["imagenet", "babel_imagenet", "xm3600", "xtd10", "coco", "flickr30k", f"clipbench:{cls_task}",
             f"clipbench:{ret_task}"]
    out = tmp_path / "report"
    rc = main(["eval", "--checkpoint", str(hf), "--benchmarks", ",".join(names), "--imagenet-root", str(imagenet),
               "--babel-imagenet-labels", str(babel["labels"]), "--babel-imagenet-prompts", str(babel["prompts"]),
               "--xm3600-root", str(write_xm3600(tmp_path / "xm", n_images=5, languages=("en", "de"))),
               "--xtd10-root", str(write_xtd10(tmp_path / "xtd", n=5)),
               "--coco-root", str(write_karpathy(tmp_path / "coco", "coco", n_test=3)),
               "--flickr30k-root", str(write_karpathy(tmp_path / "f30k", "flickr30k", n_test=4)),
               "--batch-size", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    got = read_report(out)["records"][0]["benchmarks"]
    assert list(got) == names
    assert got["imagenet"]["classes"] == 1000 and got["babel_imagenet"]["languages"]["DE"]["classes"] == 2
    assert got["coco"]["images"] == 3 and got["flickr30k"]["images"] == 4 and got["xtd10"]["images"] == 5
    assert got[names[6]]["task"] == "classification" and got[names[7]]["task"] == "retrieval"
    assert got[names[6]]["data"] == str(cls_task) and got["coco"]["data"] == str(tmp_path / "coco")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "babel_imagenet per language" in md and "| language | top1 | top5 | classes |" in md
    assert "coco (" in md and "babel_imagenet top1" in md and "xtd10 i2t_r@10" in md

    (cls_task / "test" / "nshards.txt").unlink()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(hf), "--benchmarks", f"clipbench:{cls_task}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nshards.txt not found" in err[0]


def _eval_rank(rank: int, world: int, cfg: BenchmarkConfig, tok_path: str):
    tok = Tokenizer(tok_path, context_length=16)
    torch.manual_seed(0)
    return evaluate(create_model("tiny", text_vocab_size=tok.vocab_size).eval(), tok, cfg, rank, world)


def _numbers(res: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in res.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and k != "seconds":
            out[prefix + k] = v
    return out


@pytest.mark.multiproc
def test_new_benchmarks_over_two_ranks_equal_one_process(tiny, tmp_path):
    imagenet = write_imagenet_val(tmp_path / "in", per_class=2)
    (imagenet / "templates.txt").write_text("a photo of a {}.\n")
    babel = write_babel(tmp_path / "babel")
    cls_task = write_clipbench(tmp_path / "wds_cls", "classification", n=7)
    ret_task = write_clipbench(tmp_path / "wds_ret", "retrieval", n=7)
    cfg = BenchmarkConfig(benchmarks=["babel_imagenet", "xtd10", "coco", f"clipbench:{cls_task}",
                                      f"clipbench:{ret_task}"], imagenet_dir=str(imagenet),
                          babel_imagenet_labels=str(babel["labels"]), babel_imagenet_prompts=str(babel["prompts"]),
                          xtd10_dir=str(write_xtd10(tmp_path / "xtd", n=5)),
                          coco_dir=str(write_karpathy(tmp_path / "coco", "coco", n_test=3)), batch_size=3)
    ranks = run_distributed(_eval_rank, 2, cfg, str(tiny["tok_path"]))
    single = _eval_rank(0, 1, cfg, str(tiny["tok_path"]))
    assert ranks[1] == {} and list(ranks[0]) == list(single)
    # Ranks embed in other batch shapes (embeddings agree to ~1e-6): counts exactly, metrics to one image.
    for name in single:
        a, b = _numbers(ranks[0][name]), _numbers(single[name])
        assert a.keys() == b.keys(), name
        for k in a:
            if k.rsplit(".", 1)[-1] in ("images", "captions", "classes", "templates"):
                assert a[k] == b[k], (name, k)
            else:
                assert a[k] == pytest.approx(b[k], abs=100 / 3 + 1e-6), (name, k)


def test_writers_produce_what_the_loaders_read(tmp_path):
    """The demo's sets in the released layouts (eval/babel.py, eval/karpathy.py write them) read back exactly."""
    from sigscale.curation import synthetic
    from sigscale.eval.babel import write_babel_imagenet
    from sigscale.eval.imagenet import IMAGENET_CLASSNAMES
    from sigscale.eval.karpathy import write_karpathy
    from sigscale.eval.zeroshot import load_image_folder

    n = len(synthetic.classes())
    labels = {"EN": (list(range(n)), synthetic.class_names("en")), "DE": (list(range(n - 1)), synthetic.class_names("de")[:-1])}
    files = write_babel_imagenet(tmp_path / "babel", synthetic.class_images(2, seed=3, size=32), labels,
                                 {"DE": synthetic.class_prompts("de")})
    assert load_babel_labels(files["labels"]) == labels
    assert json.loads(files["prompts"].read_text(encoding="utf-8"))["DE"][0] == "{} links"
    paths, y, names = load_image_folder(files["imagenet"])
    assert len(paths) == 2 * n and y == [i for i in range(n) for _ in range(2)] and names == list(IMAGENET_CLASSNAMES)
    items = list(synthetic.karpathy_items(4, size=32)) + list(synthetic.karpathy_items(2, seed=5, size=32, split="val"))
    root = write_karpathy(tmp_path / "coco", "coco", items)
    paths, texts, owners = load_karpathy(root, "coco", "test")
    assert [p.name for p in paths] == [i[1] for i in items[:4]] and all(p.parent.name == "val2014" for p in paths)
    assert texts == [c for i in items[:4] for c in i[3]] and owners == [k for k in range(4) for _ in range(4)]
    doc = json.loads((root / "dataset_coco.json").read_text())
    assert {"filepath", "filename", "imgid", "split", "sentids", "sentences", "cocoid"} <= set(doc["images"][0])
    assert doc["images"][4]["split"] == "val" and doc["images"][4]["sentids"] == list(range(16, 20))
