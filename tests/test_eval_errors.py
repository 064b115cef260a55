"""Every user error of the eval stage names the input, the problem and the fix (real files, no model needed)."""
import json
import shutil

import pytest
import webdataset as wds

from eval_fixtures import image_bytes, write_class_folder
from sigscale.core.errors import SigscaleError
from sigscale.eval.config import BenchmarkConfig, load_eval_config, validate_benchmarks, validate_job
from sigscale.eval.report import ReportError, compare_reports, read_report, write_report
from sigscale.eval.sources import EvalDataError, eval_shards, shard_samples
from sigscale.eval.xm3600 import XM3600Error, load_xm3600
from sigscale.eval.zeroshot import ZeroShotError, load_image_folder, read_templates, scan_shard_classes
from sigscale.pretrain.checkpoint import COMPLETE
from sigscale.core.config import ConfigError
from sigscale.pretrain.interop import CheckpointLoadError, resolve_checkpoint


def _tar(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def test_every_eval_error_is_a_sigscale_error():
    for cls in (EvalDataError, ZeroShotError, XM3600Error, ReportError, CheckpointLoadError):
        assert issubclass(cls, SigscaleError)


def test_shard_errors(tmp_path):
    with pytest.raises(EvalDataError, match=r"no webdataset shards at .*; point it at a folder of \*.tar"):
        eval_shards(tmp_path)
    _tar(tmp_path / "a.tar", [{"__key__": "k1", "txt": "a red square", "json": {"language": "en"}}])
    with pytest.raises(EvalDataError, match=r"sample 'k1' in .*a.tar has no image \(jpg/jpeg/png/webp\)"):
        list(shard_samples(tmp_path))
    (tmp_path / "a.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(EvalDataError, match=r"cannot read shard .*a.tar: .*re-run the curation step"):
        list(shard_samples(tmp_path))


def test_classification_shard_errors(tmp_path):
    _tar(tmp_path / "a.tar", [{"__key__": "k1", "jpg": image_bytes("red", 0), "json": {"language": "en"}}])
    with pytest.raises(ZeroShotError, match=r"sample 'k1' .* has no class: add a .cls member or a 'class' field"):
        scan_shard_classes(tmp_path)
    _tar(tmp_path / "a.tar", [{"__key__": "k1", "jpg": image_bytes("red", 0), "cls": 1200}])
    with pytest.raises(ZeroShotError, match=r"class index 1200 .* out of range for 1000 class names"):
        scan_shard_classes(tmp_path)
    _tar(tmp_path / "a.tar", [{"__key__": "k1", "jpg": image_bytes("red", 0), "json": {"class": "red square"}},
                              {"__key__": "k2", "jpg": image_bytes("blue", 1), "json": {"class": "blue square"}}])
    assert scan_shard_classes(tmp_path) == ([1, 0], ["blue square", "red square"])  # names from the samples
    (tmp_path / "names.txt").write_text("red square\n")
    with pytest.raises(ZeroShotError, match=r"sample 'k2' .* has class 'blue square', not in the class-names file"):
        scan_shard_classes(tmp_path, tmp_path / "names.txt")


def test_template_and_classnames_file_errors(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {}.\nno placeholder here\n")
    with pytest.raises(ZeroShotError, match=r"need exactly one '\{\}' each; fix \['no placeholder here'\]"):
        read_templates(tmp_path / "t.txt")
    (tmp_path / "t.txt").write_text("\n\n")
    with pytest.raises(ZeroShotError, match=r"templates file .* is empty"):
        read_templates(tmp_path / "t.txt")
    folder = write_class_folder(tmp_path / "cls", per_class=1)
    (folder / "classnames.txt").unlink()
    with pytest.raises(ZeroShotError, match=r"class-names file .*missing.txt does not exist"):
        load_image_folder(folder, tmp_path / "missing.txt")


def test_xm3600_without_images_listed(tmp_path):
    (tmp_path / "captions.jsonl").write_text("\n")
    with pytest.raises(XM3600Error, match=r"captions.jsonl lists no images"):
        load_xm3600(tmp_path)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"en": {"caption": ["x"]}}) + "\n")
    with pytest.raises(XM3600Error, match=r"captions.jsonl:1 has no 'image/key'"):
        load_xm3600(tmp_path)


def test_checkpoint_path_errors(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    with pytest.raises(CheckpointLoadError, match=r"not a complete checkpoint \(no COMPLETE marker.*older step_"):
        resolve_checkpoint(step)
    (step / COMPLETE).write_text("10")
    with pytest.raises(CheckpointLoadError, match=r"step_00000010 is not inside a run dir .*config.yaml.*: a training checkpoint is read with its run's config"):
        resolve_checkpoint(step)
    (step / "deepspeed").mkdir()
    with pytest.raises(CheckpointLoadError, match=r"holds DeepSpeed ZeRO shards; consolidate them with the zero_to_fp32.py"):
        resolve_checkpoint(step)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(CheckpointLoadError, match=r"neither a Hugging Face SiglipModel dir .* nor a sigscale run dir"):
        resolve_checkpoint(run)


def test_eval_config_and_report_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config nope does not exist; give a YAML path or a name from .*configs/eval"):
        load_eval_config("nope")
    with pytest.raises(ConfigError, match=r"wrong type for config key 'eval.batch_size'.*could not be converted to Integer"):
        load_eval_config(None, ["eval.batch_size=many"])
    job = load_eval_config(None, ["checkpoints=[x]", "eval.benchmarks=[xm3600]", f"eval.xm3600_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"no report folder; pass --out reports/NAME"):
        validate_job(job)
    with pytest.raises(ConfigError, match=r"eval.benchmarks is empty; choose from"):
        validate_benchmarks(BenchmarkConfig())
    with pytest.raises(ConfigError, match=r"eval.batch_size=0 must be positive"):
        validate_benchmarks(BenchmarkConfig(benchmarks=["xm3600"], xm3600_dir=str(tmp_path), batch_size=0))

    with pytest.raises(ReportError, match=r"no evaluation records to report"):
        write_report([], tmp_path / "r")
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(ReportError, match=r"is not valid JSON"):
        read_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ReportError, match=r"has format 'other', expected 'sigscale-eval-report/1'"):
        compare_reports([tmp_path], tmp_path / "cmp")


def test_model_side_errors(tmp_path):
    """A retrieval sample without caption, and a tokenizer larger than the checkpoint's vocabulary."""
    from eval_fixtures import tokenizer_model
    from sigscale.eval.retrieval import evaluate_shard_retrieval
    from sigscale.eval.run import load_tokenizer
    from sigscale.pretrain.interop import CheckpointSource
    from sigscale.pretrain.tokenizer import Tokenizer, TokenizerError
    from sigscale.pretrain.towers import create_model

    tok_path = tokenizer_model(tmp_path / "tok.model")
    model = create_model("tiny", text_vocab_size=50)
    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "a.tar", [{"__key__": "k1", "jpg": image_bytes("red", 0), "json": {"language": "en"}}])
    with pytest.raises(EvalDataError, match=r"sample 'k1' in .* has no caption \(.txt\); retrieval needs one"):
        evaluate_shard_retrieval(model, Tokenizer(tok_path, 16), tmp_path / "shards")
    src = CheckpointSource(tmp_path, "hf", tmp_path)
    with pytest.raises(TokenizerError, match=r"tok.model has \d+ pieces but .* embeds only 50; pass the tokenizer"):
        load_tokenizer(src, model, str(tok_path))


def _step_checkpoint(run, step, model):
    """A training checkpoint as the loop writes it (DCP files + COMPLETE) inside a run dir with its config."""
    import torch.distributed.checkpoint as dcp

    path = run / "checkpoints" / f"step_{step:08d}"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path), no_dist=True)
    (path / COMPLETE).write_text(str(step))
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_damaged_checkpoint_is_one_line_naming_it_and_the_older_step(tmp_path, capsys):
    from eval_fixtures import tokenizer_model, write_eval_shards
    from sigscale.cli import main
    from sigscale.core.config import to_yaml
    from sigscale.pretrain.config import load_config
    from sigscale.pretrain.interop import load_model
    from sigscale.pretrain.towers import create_model

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("tiny")
    (run / "config.yaml").write_text(to_yaml(cfg))
    model = create_model(cfg.model, text_vocab_size=600)
    older = _step_checkpoint(run, 2, model)
    newest = _step_checkpoint(run, 4, model)
    distcp = newest / "__0_0.distcp"
    distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])  # cut short, as a full disk leaves it
    fix = f"evaluate an older step ({older}) or the run's model.safetensors (written when its training ends)"
    with pytest.raises(CheckpointLoadError) as err:
        load_model(newest)
    assert str(err.value) == (
        f"checkpoint {newest} is damaged and cannot be read (RuntimeError: PytorchStreamReader failed reading zip "
        f"archive: failed finding central directory); {fix}")
    (newest / ".metadata").write_bytes((older / ".metadata").read_bytes()[:100])
    with pytest.raises(CheckpointLoadError) as err:
        load_model(newest)
    assert str(err.value) == (
        f"checkpoint {newest} is damaged and cannot be read (UnpicklingError: pickle data was truncated); {fix}")
    assert load_model(older).state_dict().keys() == model.state_dict().keys()  # the older step still loads

    # Through the CLI: one line, rc 2 (it was a CheckpointException traceback).
    shards = write_eval_shards(tmp_path / "shards")
    rc = main(["eval", "--checkpoint", str(newest), "--tokenizer", str(tokenizer_model(tmp_path / "tok.model")),
               "--benchmarks", "retrieval", "--retrieval-shards", str(shards), "--out", str(tmp_path / "report")])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [f"sigscale: error: {err.value}"]

    weights = run / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointLoadError, match=r"checkpoint .*model.safetensors is damaged and cannot be read "
                                                  r"\(SafetensorError: .*\); write it again"):
        load_model(run)


def test_a_missing_tokenizer_names_the_tokenizer_flag(tmp_path):
    """Weights whose config names a tokenizer path that does not exist here (relative to where an old run was
    started) point at --tokenizer, not at training a new tokenizer."""
    import torch
    from safetensors.torch import save_file

    from sigscale.core.config import to_yaml
    from sigscale.eval.run import load_for_eval
    from sigscale.pretrain.config import load_config
    from sigscale.pretrain.tokenizer import TokenizerError
    from sigscale.pretrain.towers import create_model

    cfg = load_config("tiny", ["tokenizer.model=demo_out/tokenizer.model"])
    torch.manual_seed(0)
    weights = tmp_path / "weights.safetensors"
    save_file(create_model(cfg.model).state_dict(), str(weights), metadata={"config": to_yaml(cfg)})
    with pytest.raises(TokenizerError, match=r"no tokenizer is known for .*weights.safetensors: .*tokenizer.model its "
                                             r"config names \(demo_out/tokenizer.model\) does not exist here; pass "
                                             r"--tokenizer PATH.model"):
        load_for_eval(str(weights))
    with pytest.raises(TokenizerError, match=r"^--tokenizer .*nope.model does not exist; pass the SentencePiece"):
        load_for_eval(str(weights), tokenizer=str(tmp_path / "nope.model"))
