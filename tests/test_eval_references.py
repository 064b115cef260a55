"""Published results beside a run (only under the same benchmark, protocol, metric and set size), the
languages view across benchmarks, and per-language tables: read back from the rendered HTML and
Markdown and held against the JSON records."""
import json
import statistics
from collections import defaultdict

import pytest
import torch

from eval_fixtures import (html_tables, markdown_tables, tokenizer_model, write_babel, write_imagenet_val,
                           write_xm3600, write_xtd10)
from sigscale.eval.config import BenchmarkConfig
from sigscale.eval.references import ReferenceError, References, load_references
from sigscale.eval.registry import BENCHMARKS
from sigscale.eval.report import write_report
from sigscale.eval.run import evaluate
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import create_model

XM_LANGS = ("en", "de", "ru", "zh", "ar")  # no Japanese: XTD10's "jp" row must show "—" under xm3600
N_XM = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny model evaluated on XM3600 (both protocols), XTD10 and Babel-ImageNet fixtures."""
    root = tmp_path_factory.mktemp("refs")
    tok = Tokenizer(tokenizer_model(root / "tok.model"), context_length=16)
    torch.manual_seed(0)
    model = create_model("tiny", text_vocab_size=tok.vocab_size).eval()
    imagenet = write_imagenet_val(root / "in", per_class=2)
    (imagenet / "templates.txt").write_text("a photo of a {}.\n")
    babel = write_babel(root / "babel")
    cfg = BenchmarkConfig(benchmarks=["xm3600", "xtd10", "babel_imagenet"], imagenet_dir=str(imagenet),
                          xm3600_dir=str(write_xm3600(root / "xm", n_images=N_XM, languages=XM_LANGS)),
                          xtd10_dir=str(write_xtd10(root / "xtd", n=5)), babel_imagenet_labels=str(babel["labels"]),
                          babel_imagenet_prompts=str(babel["prompts"]), batch_size=4)
    record = {"checkpoint": str(root / "ckpt"), "name": "tiny", "step": 3, "model": "tiny towers",
              "benchmarks": evaluate(model, tok, cfg)}
    cfg.benchmarks, cfg.first_caption_only = ["xm3600"], True
    first = {"checkpoint": str(root / "ckpt"), "name": "tiny", "step": 3, "benchmarks": evaluate(model, tok, cfg)}
    return {"root": root, "record": record, "first": first}


def _ref(protocol, metric, value, model, language=None, images=N_XM):
    return {"benchmark": "xm3600", "protocol": protocol, "metric": metric, "language": language, "value": value,
            "model": model, "resolution": 256, "images": images, "source": "src"}


def _table(entries, path):
    path.write_text(json.dumps({"format": "sigscale-references/1", "results": entries,
                                "sources": {"src": {"title": "a test table", "url": "https://example.org/t"}}}))
    return load_references(path)


def _published(page):
    return {t: page.tables[t] for t in page.published}


def test_checked_in_references_load_and_their_means_agree_with_their_languages():
    refs = load_references()
    assert refs.results and all(s.get("commit") and s.get("path") for s in refs.sources.values())
    by = defaultdict(dict)
    for r in refs.results:
        assert r.protocol in BENCHMARKS[r.benchmark].protocol_ids
        by[(r.benchmark, r.model, r.metric)][r.language] = r.value
    checked = 0
    for (bench, model, metric), values in by.items():
        langs = [v for lang, v in values.items() if lang is not None]
        if langs and None in values:  # the source's "avg" column is the unweighted mean of its languages
            assert statistics.mean(langs) == pytest.approx(values[None], abs=0.02), (bench, model, metric)
            checked += 1
    assert checked >= 8  # XM3600 and XTD10, both directions, two models
    xm = [r for r in refs.results if r.benchmark == "xm3600"]
    assert {r.protocol for r in xm} == {"first_caption"} and {r.images for r in xm} == {3600}
    assert len({r.language for r in xm if r.language}) == 36


def test_reference_file_errors_name_the_entry_and_fix(tmp_path):
    good = _ref("all_captions", "i2t_r@1", 50.0, "m")
    for bad, msg in [({**good, "protocol": "some_captions"}, r"xm3600 runs protocols \['all_captions', 'first_caption'\]"),
                     ({**good, "source": "nowhere"}, r"source 'nowhere' is not in the file's sources"),
                     ({k: v for k, v in good.items() if k != "images"}, r"missing keys \['images'\]"),
                     ({**good, "value": 0.5e3}, r"value 500.0 must be a % in \[0, 100\]"),
                     ({**good, "benchmark": "xm360"}, r"benchmark 'xm360' is not in the registry")]:
        with pytest.raises(ReferenceError, match=r"results\[0\]: " + msg):
            _table([bad], tmp_path / "r.json")
    (tmp_path / "r.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ReferenceError, match="is not a sigscale-references/1 file"):
        load_references(tmp_path / "r.json")


def _write(run, record, refs, name):
    out = run["root"] / name
    write_report([record], out, references=refs)
    return html_tables(out / "report.html"), markdown_tables(out / "report.md"), (out / "report.md").read_text()


@pytest.mark.parametrize("first_caption", [False, True])
def test_published_results_show_only_under_the_runs_protocol(run, tmp_path, first_caption):
    record = run["first"] if first_caption else run["record"]
    res = record["benchmarks"]["xm3600"]
    assert res["protocol_id"] == ("first_caption" if first_caption else "all_captions")
    refs = _table([_ref("all_captions", "i2t_r@1", 11.25, "ALLCAP-net"),
                   _ref("all_captions", "t2i_r@1", 12.5, "ALLCAP-net"),
                   _ref("all_captions", "i2t_r@1", 13.75, "ALLCAP-net", language="de"),
                   _ref("first_caption", "i2t_r@1", 21.25, "FIRSTCAP-net"),
                   _ref("first_caption", "t2i_r@1", 22.5, "FIRSTCAP-net", language="ru"),
                   _ref(res["protocol_id"], "i2t_r@1", 31.25, "FULLSET-net", images=3600)], tmp_path / "r.json")
    page, md, md_text = _write(run, record, refs, f"report_{first_caption}")
    shown, hidden_model = ("FIRSTCAP-net", "ALLCAP-net") if first_caption else ("ALLCAP-net", "FIRSTCAP-net")
    published = _published(page)
    text = json.dumps(published)
    assert shown in text and hidden_model not in text and "FULLSET-net" not in text
    assert hidden_model not in md_text and "FULLSET-net" not in md_text
    for title, (note, rows) in published.items():
        assert note.startswith("PUBLISHED RESULTS OF OTHER MODELS") and "not this run" in note
        assert title in md and md[title] == rows  # the same numbers in both pages
    head = next(rows for t, (_, rows) in published.items() if "(mean over languages)" in t)
    ours, theirs = head[1], head[2]
    for col, metric in enumerate(head[0]):
        if metric in ("i2t_r@1", "t2i_r@1"):
            assert ours[col] == f"{res['mean'][metric]:.2f}"
    # a metric nobody published under this protocol gets no column
    expected = {"i2t_r@1": "21.25"} if first_caption else {"i2t_r@1": "11.25", "t2i_r@1": "12.50"}
    assert {m: theirs[c] for c, m in enumerate(head[0]) if m.startswith(("i2t", "t2i"))} == expected
    assert theirs[1] == shown
    per_lang = next(rows for t, (_, rows) in published.items() if "per language" in t)
    lang, value = ("ru", "22.50") if first_caption else ("de", "13.75")
    row = next(r for r in per_lang if r[0] == lang)
    assert value in row and row[per_lang[0].index("this run i2t_r@1")] == f"{res['languages'][lang]['i2t_r@1']:.2f}"
    note = page.tables[next(t for t in page.tables if t.startswith("xm3600 per language ("))][0]
    other = "all_captions" if first_caption else "first_caption"
    assert f"{4 if first_caption else 3} published results for xm3600" in note
    assert f"protocol {other} on {N_XM} images" in note and f"protocol {res['protocol_id']} on 3600 images" in note


def test_no_published_table_without_a_match(run, tmp_path):
    refs = _table([_ref("all_captions", "i2t_r@1", 11.25, "BIG-net", images=3600)], tmp_path / "r.json")
    page, md, text = _write(run, run["record"], refs, "report_none")
    assert not page.published and "BIG-net" not in text and "PUBLISHED" not in text
    assert "1 published results for xm3600 (protocol all_captions on 3600 images) are not shown" in text
    page, _, text = _write(run, run["record"], References((), {}), "report_empty")
    assert not page.published and "are not shown" not in text


def test_languages_view_and_per_language_tables_match_the_records(run):
    record = run["record"]
    out = run["root"] / "report_langs"
    paths = write_report([record], out, references=References((), {}))
    doc = json.loads(paths["json"].read_text())["records"][0]["benchmarks"]  # numbers as the JSON holds them
    page, md = html_tables(paths["html"]), markdown_tables(paths["md"])
    title = next(t for t in page.tables if t.startswith("Languages view"))
    note, rows = page.tables[title]
    assert md[title] == rows and "— where a benchmark lacks the language" in note
    header = rows[0]
    assert header == ["language", "xm3600 I→T R@1", "xm3600 T→I R@1", "xtd10 I→T R@1", "xtd10 T→I R@1",
                      "babel_imagenet zero-shot top-1"]
    source = {"xm3600": {l: l for l in XM_LANGS}, "xtd10": {"en": "en", "ru": "ru", "zh": "zh", "de": "de", "ja": "jp"},
              "babel_imagenet": {"en": "EN", "de": "DE", "ru": "RU"}}
    metric = {"I→T R@1": "i2t_r@1", "T→I R@1": "t2i_r@1", "zero-shot top-1": "top1"}
    assert [r[0] for r in rows[1:]] == sorted(set(XM_LANGS) | {"ja"})
    dashes = 0
    for row in rows[1:]:
        for col, cell in zip(header[1:], row[1:]):
            bench, what = col.split(" ", 1)
            code = source[bench].get(row[0])
            want = "—" if code is None else f"{doc[bench]['languages'][code][metric[what]]:.2f}"
            assert cell == want, (row[0], col)
            dashes += cell == "—"
    assert dashes == 3 + 3 + 1  # ar: xtd10 (2) + babel, ja: xm3600 (2) + babel, zh: babel
    # every multilingual benchmark has its per-language table; Babel-ImageNet's shows the classes per language
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    for bench in ("xm3600", "xtd10", "babel_imagenet"):
        t = next(t for t in page.tables if t.startswith(f"{bench} per language ("))
        table = page.tables[t][1]
        assert md[t] == table
        stats = {**doc[bench]["languages"], "mean": doc[bench]["mean"]}
        assert {r[0] for r in table[1:]} == set(stats)
        for row in table[1:]:
            assert row[1:] == [fmt(stats[row[0]].get(k)) if k in stats[row[0]] else "—" for k in table[0][1:]], t
    babel = page.tables[next(t for t in page.tables if t.startswith("babel_imagenet per language ("))][1]
    col = babel[0].index("classes")
    assert {r[0]: r[col] for r in babel[1:] if r[0] != "mean"} == {l: str(v["classes"]) for l, v in doc["babel_imagenet"]["languages"].items()}
    assert {"languages", "xm3600_languages", "xtd10_languages", "babel_imagenet_languages"} <= \
        {p.stem for p in (out / "plots").glob("*.png")}
    assert "](plots/languages.png)" in paths["md"].read_text()
