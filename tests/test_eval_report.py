"""`sigscale eval` on a real tiny training run (DCP step checkpoints + final weights) and the reports it writes."""
import base64
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from eval_fixtures import parse_html, tokenizer_model, write_eval_shards, write_imagenet_val, write_xm3600
from sigscale.cli import main
from sigscale.eval.report import ReportError, read_report
from sigscale.pretrain.config import load_config
from sigscale.pretrain.interop import export_open_clip, load_model
from sigscale.pretrain.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    tok = tokenizer_model(root / "tok.model")
    shards = write_eval_shards(root / "shards", n=24, per_shard=8)
    cfg = load_config("tiny", [f"data.shards={shards}", f"tokenizer.model={tok}", "tokenizer.context_length=16",
                               f"train.out_dir={root / 'run'}", "train.strategy=single", "train.precision=fp32",
                               "train.steps=4", "train.warmup_steps=1", "train.ckpt_every=2", "train.batch_size=8",
                               "train.log_every=1", "data.num_workers=0", "data.shuffle_buffer=8", "name=tinyrun"])
    train(cfg)
    imagenet = write_imagenet_val(root / "imagenet", per_class=2)
    # Two templates keep the 1000-class text side cheap; the 81-template default is tested in test_eval_hf.
    (imagenet / "templates.txt").write_text("a photo of a {}.\n{}\n")
    return {"root": root, "run": root / "run", "tok": tok, "shards": shards, "imagenet": imagenet,
            "xm": write_xm3600(root / "xm", n_images=8, languages=("en", "de", "ru", "zh", "ar"))}


def test_cli_eval_over_training_steps_writes_json_markdown_html(data, capsys):
    out = data["root"] / "report"
    rc = main(["eval", "--checkpoint", str(data["run"] / "checkpoints"), str(data["run"]),
               "--benchmarks", "imagenet,xm3600,retrieval", "--imagenet-root", str(data["imagenet"]),
               "--xm3600-root", str(data["xm"]), "--retrieval-shards", str(data["shards"]),
               "--batch-size", "5", "--out", str(out)])
    assert rc == 0
    assert "report:" in capsys.readouterr().out
    doc = read_report(out)
    steps = [(r["kind"], r["step"]) for r in doc["records"]]
    assert steps == [("dcp", 2), ("dcp", 4), ("safetensors", 4)]
    dcp4, final = doc["records"][1], doc["records"][2]
    assert dcp4["config_hash"] == final["config_hash"] != "" and dcp4["name"] == "tinyrun"
    # The sharded step-4 checkpoint and the final weights are the same model: identical numbers.
    for bench in ("imagenet", "xm3600", "retrieval"):
        a, b = dict(dcp4["benchmarks"][bench]), dict(final["benchmarks"][bench])
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    inet = final["benchmarks"]["imagenet"]
    assert inet["classes"] == 1000 and inet["classes_present"] == 3 and inet["images"] == 6
    assert inet["chance_top1"] == pytest.approx(0.1) and inet["templates"] == 2
    xm = final["benchmarks"]["xm3600"]
    assert set(xm["languages"]) == {"ar", "de", "en", "ru", "zh"} and "SigLIP paper" in xm["protocol"]
    assert xm["chance_r@1"] == pytest.approx(100 / 8) and "fil" in xm["missing_official_languages"]
    assert set(final["benchmarks"]["retrieval"]["languages"]) == {"en", "de", "ru"}
    assert [s for s, _ in doc["loss_curves"][str(data["run"])]] == [0, 1, 2, 3]
    assert doc["job"]["eval"]["benchmarks"] == ["imagenet", "xm3600", "retrieval"]

    html = parse_html(out / "report.html")
    assert html.tables >= 4
    plots = {"xm3600_languages", "xm3600_i2t_vs_t2i", "retrieval_languages", "training_curves", "checkpoints"}
    assert len(html.srcs) >= len(plots)
    for src in html.srcs:  # self-contained: every image is an inline PNG
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots <= {p.stem for p in (out / "plots").glob("*.png")}
    md = (out / "report.md").read_text(encoding="utf-8")
    # What was evaluated on what: data paths, model, recipe, R@10, and a dash (not a blank) where a value is absent.
    assert f"data: {data['xm']}" in md and f"data: {data['imagenet']}" in md
    assert "ViT 64x2/8 @32px" in md and "sigmoid loss, batch 8, 4 steps, lr 0.001" in md
    assert "xm3600 i2t_r@10" in md
    assert "overflow-x:auto" in (out / "report.html").read_text()
    assert "| language |" in md and "Protocol: all captions per image" in md and "](plots/xm3600_languages.png)" in md

    second = data["root"] / "report_b"
    assert main(["eval", "--checkpoint", str(data["run"]), "--benchmarks", "xm3600", "--first-caption-only",
                 "--xm3600-root", str(data["xm"]), "--out", str(second)]) == 0
    first_only = read_report(second)["records"][0]["benchmarks"]["xm3600"]
    assert first_only["first_caption_only"] and "CLIP_benchmark" in first_only["protocol"]
    assert first_only["captions"] == 8 * 5 < xm["captions"]

    cmp = data["root"] / "cmp"
    assert main(["report", "compare", str(out), str(second / "report.json"), "--out", str(cmp)]) == 0
    table = json.loads((cmp / "compare.json").read_text())
    # Records that share a label are told apart by their report, then by their checkpoint folder.
    assert [r["checkpoint"] for r in table["rows"]] == ["tinyrun@2", "tinyrun@4 (report) (step_00000004)",
                                                        "tinyrun@4 (report) (run)", "tinyrun@4 (report_b)"]
    assert table["rows"][3]["xm3600 i2t_r@1"] == first_only["mean"]["i2t_r@1"]
    # One run, evaluated under two XM3600 protocols: four groups of one, never pooled as seed replicates.
    assert [(g["label"], g["n"]) for g in table["groups"]] == [
        ("tinyrun", 1), ("tinyrun (dcp)", 1), ("tinyrun (safetensors) (report)", 1),
        ("tinyrun (safetensors) (report_b)", 1)]
    page = parse_html(cmp / "compare.html")
    assert page.tables == 3 and len(page.srcs) == 1  # seed groups, the (untestable) pair, every checkpoint
    assert "| tinyrun@2 |" in (cmp / "compare.md").read_text()


def test_cli_errors_name_input_and_fix(data, tmp_path, capsys):
    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    base = ["eval", "--checkpoint", str(data["run"]), "--xm3600-root", str(data["xm"]), "--out", str(tmp_path / "r")]
    assert "unknown benchmark 'imagenett' (did you mean 'imagenet'?)" in err(base + ["--benchmarks", "imagenett"])
    assert "benchmark 'retrieval' needs eval.retrieval_shards (--retrieval-shards)" in err(base + ["--benchmarks", "retrieval"])
    msg = err(base + ["--benchmarks", "xm3600", "--xm3600-languages", "en,sw"])
    assert "language 'sw' has no captions" in msg and "languages present: ['ar', 'de', 'en', 'ru', 'zh']" in msg
    missing = err(["eval", "--checkpoint", str(tmp_path / "nope"), "--benchmarks", "xm3600",
                   "--xm3600-root", str(data["xm"]), "--out", str(tmp_path / "r")])
    assert "checkpoint" in missing and "nope does not exist" in missing

    # Foreign open_clip weights (no sigscale config beside them) need the model config.
    oc = tmp_path / "oc.safetensors"
    save_file(load_file(str(export_open_clip(load_model(data["run"]), tmp_path / "ours.safetensors"))), str(oc))
    base_oc = ["eval", "--checkpoint", str(oc), "--benchmarks", "xm3600", "--xm3600-root", str(data["xm"]),
               "--out", str(tmp_path / "r")]
    assert "for open_clip weights pass the model config (--model PRESET" in err(base_oc)
    assert "no tokenizer is known for" in err(base_oc + ["--model", "tiny"])

    broken = tmp_path / "xm_broken"
    write_xm3600(broken, n_images=3, languages=("en",))
    next((broken / "images").glob("*.jpg")).unlink()
    assert "is missing; restore it or drop the line" in err(base[:4] + [str(broken), "--benchmarks", "xm3600", "--out", str(tmp_path / "r")])
    with pytest.raises(ReportError, match=r"not found; pass a folder written by `sigscale eval --out`"):
        read_report(tmp_path)


def test_open_clip_weights_evaluate_like_the_run(data, tmp_path):
    """open_clip state dicts load with --model and score exactly as the weights they came from."""
    from sigscale.eval.config import BenchmarkConfig
    from sigscale.eval.run import evaluate, load_for_eval

    oc = export_open_clip(load_model(data["run"]), tmp_path / "oc.safetensors")
    cfg = BenchmarkConfig(benchmarks=["retrieval"], retrieval_shards=str(data["shards"]))
    a = load_for_eval(str(oc), tokenizer=str(data["tok"]), model="tiny")
    b = load_for_eval(str(data["run"]))
    assert a.info["kind"] == "open_clip" and b.info["kind"] == "safetensors"
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    ra, rb = evaluate(a.model, a.tokenizer, cfg)["retrieval"], evaluate(b.model, b.tokenizer, cfg)["retrieval"]
    assert ra["all"] == rb["all"]
