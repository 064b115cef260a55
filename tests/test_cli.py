"""The CLI is a thin shell: stages listed, configs resolved, user errors as one clear line."""
import subprocess
import sys

import torch
from safetensors.torch import save_file
from transformers import SiglipModel as HFSiglipModel

from eval_fixtures import tokenizer_model
from sigscale.cli import main
from sigscale.core.config import to_yaml
from sigscale.pretrain.config import load_config
from sigscale.pretrain.interop import load_model
from sigscale.pretrain.towers import create_model


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sigscale.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_stages():
    out = run_cli("--help")
    assert out.returncode == 0
    for stage in ("train", "tokenizer", "export", "bench", "demo", "config"):
        assert stage in out.stdout


def test_config_prints_resolved_yaml_and_rejects_bad_keys(capsys):
    assert main(["config", "--config", "tiny", "train.batch_size=64"]) == 0
    assert "batch_size: 64" in capsys.readouterr().out
    assert main(["config", "--config", "tiny", "train.batchsize=64"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.batchsize'" in err and "train.batch_size" in err


def test_export_run_weights_to_hf(tmp_path, capsys):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = create_model(cfg.model)
    weights = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(weights), metadata={"config": to_yaml(cfg)})
    reloaded = load_model(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k])
    # An HF export without a tokenizer would not load in AutoProcessor or a pipeline: refused, naming the fix.
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "pass --tokenizer PATH.model" in capsys.readouterr().err
    tok = tokenizer_model(tmp_path / "tok.model")
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf"), "--tokenizer", str(tok)]) == 0
    assert (tmp_path / "hf" / "spiece.model").read_bytes() == tok.read_bytes()
    hf = HFSiglipModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 1000, (2, 16))
    with torch.no_grad():
        ours = model.encode_text(ids, normalize=False)
        theirs = hf.get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_each_train_gets_a_new_run_dir_and_resume_names_one(tmp_path, monkeypatch, capsys):
    from sigscale.core.manifest import write_shards
    from sigscale.curation.synthetic import shard_records
    from sigscale.pretrain.tokenizer import train_tokenizer

    write_shards(shard_records(128, seed=4), tmp_path / "shards", samples_per_shard=32)
    tok = train_tokenizer([r["txt"] for r in shard_records(600, seed=5)], tmp_path / "tok.model", vocab_size=600)
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", "tiny", f"data.shards={tmp_path / 'shards'}", f"tokenizer.model={tok}",
            "train.steps=2", "train.warmup_steps=1", "train.batch_size=16", "train.ckpt_every=2", "data.num_workers=0"]
    assert main(args) == 0
    first = sorted((tmp_path / "runs").iterdir())
    assert len(first) == 1 and first[0].name.startswith("tiny-") and (first[0] / "checkpoints" / "step_00000002").is_dir()
    assert f"run dir: {first[0]}" in capsys.readouterr().out
    # --resume continues that run (here: two more steps), nothing new is created.
    assert main([*args[:-2], "train.steps=4", "train.allow_changes=[train.steps]", "data.num_workers=0",
                 "--resume", str(first[0])]) == 0
    assert sorted((tmp_path / "runs").iterdir()) == first and (first[0] / "checkpoints" / "step_00000004").is_dir()
    capsys.readouterr()
    assert main([*args, "--resume", str(tmp_path / "nowhere")]) == 2
    assert "--resume" in capsys.readouterr().err.split("nowhere")[0]


def test_version_help_texts_and_a_smaller_vocabulary_is_said(tmp_path, capsys):
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("sigscale ")
    assert "text.min_confidence=0.3" in run_cli("curate", "--help").stdout  # a curation key, not a training one
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["a red square", "a blue circle", "ein rotes Quadrat"] * 30) + "\n")
    assert main(["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "t.model"), "--vocab-size", "32000"]) == 0
    captured = capsys.readouterr()
    assert "not the 32000 asked for" in captured.err and "wrote" in captured.out


HEAVY = ("torch", "torchvision", "open_clip", "timm", "transformers", "wandb", "deepspeed", "submitit")
# --help prints what argparse holds: not even the config stack or the data libraries.
HELP_HEAVY = HEAVY + ("numpy", "pandas", "omegaconf", "py3langid")


def test_help_and_config_import_no_heavy_library():
    """`sigscale --help` and `sigscale config` print text: they must not pay for torch, open_clip and the rest."""
    probe = ("import contextlib, io, sys\n"
             "from sigscale.cli import main\n"
             "def loaded(names):\n"
             "    return sorted({m.split('.')[0] for m in sys.modules} & set(names))\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try:\n"
             "        main(['--help'])\n"
             "    except SystemExit:\n"
             "        pass\n"
             f"    after_help = loaded({HELP_HEAVY!r})\n"
             "    rc = main(['config', '--config', 'tiny'])\n"
             f"print(after_help, rc, loaded({HEAVY!r}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "0", "[]"]


def test_a_run_with_relative_paths_evaluates_and_exports_from_another_directory(tmp_path, monkeypatch, capsys):
    """The run dir holds what evaluation and export need (its tokenizer, absolute paths), whatever the
    working directory the run was started from."""
    from sigscale.core.manifest import write_shards
    from sigscale.curation.synthetic import shard_records
    from sigscale.pretrain.tokenizer import train_tokenizer

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_shards(shard_records(64, seed=4), work / "shards", samples_per_shard=32)
    train_tokenizer([r["txt"] for r in shard_records(600, seed=5)], work / "tok.model", vocab_size=600)
    monkeypatch.chdir(work)
    assert main(["train", "--config", "tiny", "data.shards=shards", "tokenizer.model=tok.model", "train.out_dir=run",
                 "train.steps=2", "train.warmup_steps=1", "train.batch_size=16", "train.ckpt_every=2",
                 "data.num_workers=0"]) == 0
    monkeypatch.chdir(elsewhere)
    ckpt = work / "run" / "checkpoints" / "step_00000002"
    assert main(["eval", "--checkpoint", str(ckpt), "--benchmarks", "retrieval", "--retrieval-shards",
                 str(work / "shards"), "--max-samples", "16", "--batch-size", "16", "--out", "report"]) == 0
    assert (elsewhere / "report" / "report.json").is_file()
    said = capsys.readouterr().out  # evaluation says what it starts and when it is done, not only the numbers
    assert said.index(f"eval [1/1] {ckpt}: retrieval") < said.index("eval [1/1] done in ") < said.index("report:")
    assert main(["export", "--checkpoint", str(ckpt), "--out", "hf"]) == 0  # no --tokenizer: the run's own
    assert (elsewhere / "hf" / "spiece.model").read_bytes() == (work / "tok.model").read_bytes()


def _options(parser, path=("sigscale",)):
    """(command, option, action) for every argument of every subcommand."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield " ".join(path), "/".join(action.option_strings) or action.dest, action


def test_every_flag_has_help_that_states_its_default():
    from sigscale.cli import build_parser

    options = list(_options(build_parser()))
    assert len(options) > 100  # every stage's subcommands were walked
    no_help = [f"{cmd} {name}" for cmd, name, a in options if not (a.help or "").strip()]
    assert no_help == []
    # a default the user would otherwise have to guess is written in the help
    silent = [f"{cmd} {name}" for cmd, name, a in options
              if a.default not in (None, False) and a.choices is None and str(a.default) not in a.help]
    assert silent == []


def test_export_of_foreign_open_clip_weights_takes_the_model_flag_its_error_names(tmp_path, capsys):
    """open_clip weights without sigscale's config (anyone's open_clip checkpoint) need the model config:
    the error says --model, and export takes --model."""
    from safetensors.torch import load_file

    from sigscale.pretrain.interop import export_open_clip

    torch.manual_seed(0)
    model = create_model(load_config("tiny").model)
    ours = export_open_clip(model, tmp_path / "ours.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(str(ours)), str(foreign))  # the same tensors, no config in the metadata
    out = tmp_path / "again.safetensors"
    assert main(["export", "--checkpoint", str(foreign), "--format", "open_clip", "--out", str(out)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(foreign), "--format", "open_clip", "--out", str(out),
                 "--model", "tiny"]) == 0
    back = load_model(out)  # the export carries the config now
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
