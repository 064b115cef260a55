"""The training engine: strategies agree with one process, checkpoints resume exactly."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sigscale.core.config import ConfigError
from sigscale.core.manifest import write_shards
from sigscale.eval.run import BenchmarkEvaluator
from sigscale.curation.synthetic import shard_records
from sigscale.pretrain.checkpoint import latest_checkpoint, list_checkpoints
from sigscale.pretrain.config import load_config
from sigscale.pretrain.tokenizer import train_tokenizer
from sigscale.pretrain.train import train

SCRIPT = Path(__file__).parent / "scripts" / "engine_equivalence.py"


def run_ranks(nproc, *args, timeout=300):
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "single.json"
    run_ranks(1, str(out), "single", "0", "0")
    return json.loads(out.read_text())


@pytest.mark.multiproc
@pytest.mark.parametrize("strategy,accum,zero_stage", [
    ("fsdp", 1, 3), ("ddp", 1, 3),
    ("deepspeed", 1, 1), ("deepspeed", 1, 2), ("deepspeed", 1, 3),
    # embedding-cache accumulation: 24 = 2 ranks x 3 micro-batches x 4, same global contrastive batch
    ("fsdp", 3, 3), ("ddp", 3, 3), ("deepspeed", 3, 3),
])
def test_two_ranks_reproduce_one_process(tmp_path, reference, strategy, accum, zero_stage):
    """Sharded runs, with and without accumulation, follow the one-process full-batch curve: equal
    losses over several updates and equal gradient norms mean equal full-batch gradients."""
    out = tmp_path / f"{strategy}.json"
    run_ranks(2, str(out), strategy, "0", "0", "4", str(accum), str(zero_stage))
    got = json.loads(out.read_text())
    assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
    assert got["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)
    # it did learn something: not a constant curve
    assert len(set(round(x, 5) for x in got["losses"])) > 1


def test_one_process_accumulation_equals_full_batch(tmp_path, reference):
    out = tmp_path / "accum.json"
    run_ranks(1, str(out), "single", "0", "0", "4", "3")
    got = json.loads(out.read_text())
    assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
    assert got["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)


@pytest.mark.multiproc
def test_activation_checkpointing_keeps_gradients(tmp_path, reference):
    out = tmp_path / "ckpt.json"
    run_ranks(2, str(out), "fsdp", "1", "1")
    got = json.loads(out.read_text())
    assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
    assert got["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    write_shards(shard_records(512, seed=4), root / "shards", samples_per_shard=64)
    tok = train_tokenizer([r["txt"] for r in shard_records(600, seed=5)], root / "tok.model", vocab_size=600)
    return root / "shards", tok


def overrides(data, out_dir, steps, ckpt_every, extra=()):
    shards, tok = data
    return [f"data.shards={shards}", f"tokenizer.model={tok}", f"train.out_dir={out_dir}", f"train.steps={steps}",
            "train.warmup_steps=2", f"train.ckpt_every={ckpt_every}", "train.batch_size=32", "train.log_every=1",
            "train.keep_last=2", "data.num_workers=1", "data.shuffle_buffer=32", *extra]


def metric_losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(len(rows)))  # no repeated or skipped step
    return [r["loss"] for r in rows]


def test_single_process_run_learns_logs_and_keeps_last_checkpoints(tmp_path, data):
    cfg = load_config("tiny", overrides(data, tmp_path / "run", 24, 6, ["train.lr=3e-3"]))
    result = train(cfg)
    losses = metric_losses(tmp_path / "run")
    assert len(losses) == 24 and losses == pytest.approx(result.losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000018", "step_00000024"]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "t", "b", "lr", "pos_logit", "neg_logit", "grad_norm", "images_per_s", "tflops_per_s", "mfu"):
        assert key in row
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["t"] == pytest.approx(10.0) and first["b"] == pytest.approx(-10.0)  # SigLIP init, logged as t = exp(t')
    assert row["pos_logit"] > row["neg_logit"]  # it learned to tell pairs apart
    assert row["mfu"] is None  # no known peak on CPU
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tb_loss = [e.value for e in events.Scalars("train/loss")]
    assert tb_loss == pytest.approx(losses, rel=1e-6)


def test_logged_throughput_counts_the_steps_since_the_last_log_line(tmp_path, data):
    """The last step of a run is logged off the log_every grid: its images/s (and TFLOP/s) must divide
    the images of the 3 steps since the previous line by their time, not batch x log_every (3.3x too much)."""
    cfg = load_config("tiny", overrides(data, tmp_path / "run", 4, 100, ["train.log_every=10"]))
    train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 3]
    first, last = rows
    expected = cfg.train.batch_size * 3 / (last["time"] - first["time"])
    assert last["images_per_s"] == pytest.approx(expected, rel=0.15)
    assert last["tflops_per_s"] / last["images_per_s"] == pytest.approx(first["tflops_per_s"] / first["images_per_s"])


def cli_train(data, out_dir, steps, ckpt_every, nproc=1, extra=()):
    cmd = [sys.executable, "-m", "sigscale.cli", "train", "--config", "tiny", "--nproc", str(nproc),
           *overrides(data, out_dir, steps, ckpt_every, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)


@pytest.mark.multiproc
def test_fsdp_checkpoint_reshards_from_two_ranks_to_one(tmp_path, data):
    import torch
    from safetensors.torch import load_file

    from sigscale.pretrain.checkpoint import load_checkpoint
    from sigscale.pretrain.optim import build_optimizer
    from sigscale.pretrain.towers import create_model

    run = tmp_path / "run"
    two = cli_train(data, run, 6, 6, nproc=2)
    assert two.wait(timeout=300) == 0, two.stdout.read()[-3000:]
    cfg = load_config("tiny", overrides(data, run, 12, 6))
    full = load_file(str(run / "model.safetensors"))  # gathered by the 2-rank run at step 6
    model = create_model(cfg.model, text_vocab_size=full["text.token_embedding.weight"].shape[0])
    opt = build_optimizer(model, cfg.train)
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"), model, opt)
    assert state["saved_world_size"] == 2 and state["private"] is None and state["shared"]["step"] == 6
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, full[name], rtol=0, atol=0)
    # Adam moments were resharded too: every parameter has full-size state
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in model.parameters())
    # and the single-process run carries on from there
    one = cli_train(data, run, 12, 6, nproc=1, extra=["train.allow_changes=[train.steps]"])
    out = one.stdout.read()
    assert one.wait(timeout=300) == 0, out[-3000:]
    assert "resumed from" in out and "data order restarts" in out
    assert len(metric_losses(run)) == 12


def test_nonfinite_loss_skips_then_stops_with_clear_error(tmp_path, data):
    from sigscale.pretrain.train import NonFiniteLossError

    # t = exp(1000) overflows: every logit, hence every loss, is non-finite.
    cfg = load_config("tiny", overrides(data, tmp_path / "run", 20, 10, ["model.init_logit_scale=1000",
                                                                           "train.max_nonfinite_steps=3"]))
    with pytest.warns(UserWarning, match="non-finite loss") as record:
        with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses up to step 2; lower train.lr"):
            train(cfg)
    assert sum("step skipped" in str(w.message) for w in record) == 3
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []  # nothing corrupt was saved


def test_stop_request_checkpoints_and_resume_continues_the_same_run(tmp_path, data):
    """The preemption path: a stop request at a step boundary writes a checkpoint there, and the
    resumed run's metrics equal an uninterrupted run's, with no step repeated or skipped."""
    ref = train(load_config("tiny", overrides(data, tmp_path / "ref", 8, 100)))
    calls = iter(range(1000))
    cfg = load_config("tiny", overrides(data, tmp_path / "run", 8, 100))
    first = train(cfg, should_stop=lambda: next(calls) >= 5)
    assert first.stopped_early and first.final_weights is None
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000005"
    second = train(cfg)
    assert not second.stopped_early and second.final_weights.is_file()
    assert [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == list(range(8))
    assert metric_losses(tmp_path / "run") == pytest.approx(ref.losses, rel=1e-6, abs=1e-7)


@pytest.mark.multiproc
def test_deepspeed_zero3_run_resumes_exactly_and_refuses_another_strategy(tmp_path, data):
    """A ZeRO-3 run through the CLI writes its shards in the atomic layout; resuming from the middle
    checkpoint redoes the same steps with the same losses (optimizer state restored exactly)."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    ds = ["train.strategy=deepspeed", "train.zero_stage=3", "train.precision=fp32", "train.keep_last=3"]
    first = cli_train(data, run, 8, 4, nproc=2, extra=ds)
    out = first.stdout.read()
    assert first.wait(timeout=300) == 0, out[-3000:]
    losses = metric_losses(run)
    assert len(losses) == 8
    assert sorted((run / "checkpoints" / "step_00000004" / "deepspeed").iterdir())  # DeepSpeed's own files
    full = load_file(str(run / "model.safetensors"))
    assert full["text.token_embedding.weight"].shape[0] > 0 and not any(v.numel() == 0 for v in full.values())

    import shutil
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    again = cli_train(data, run, 8, 4, nproc=2, extra=ds)
    out = again.stdout.read()
    assert again.wait(timeout=300) == 0, out[-3000:]
    assert "resumed from" in out
    assert metric_losses(run) == pytest.approx(losses, rel=1e-5, abs=1e-6)

    # One process cannot run DeepSpeed: the checkpoint says who wrote it and what to do.
    single = cli_train(data, run, 12, 4, nproc=1, extra=[*ds, "train.allow_changes=[train.steps]"])
    out = single.stdout.read()
    assert single.wait(timeout=300) == 2, out[-3000:]
    assert "written by DeepSpeed" in out and "resume with the strategy that wrote it" in out


def test_locked_image_tuning_keeps_the_pretrained_tower_fixed(tmp_path, data):
    """SigLiT / fine-tuning (paper §4): towers from a checkpoint, the image tower frozen, a per-tower
    lr multiplier and no weight decay on pretrained weights."""
    from safetensors.torch import load_file

    from sigscale.pretrain.optim import param_groups
    from sigscale.pretrain.towers import create_model

    base = train(load_config("tiny", overrides(data, tmp_path / "base", 3, 100)))
    lit = load_config("tiny", overrides(data, tmp_path / "lit", 4, 100, [
        f"train.init_from={tmp_path / 'base'}", "train.freeze=[vision]", "train.lr_mult.text=0.5"]))
    train(lit)
    before, after = load_file(str(base.final_weights)), load_file(str(tmp_path / "lit" / "model.safetensors"))
    for name in before:
        same = bool((before[name] == after[name]).all())
        if name.startswith("visual."):
            assert same, f"{name} moved although the vision tower is frozen"
    assert not all(bool((before[n] == after[n]).all()) for n in before if n.startswith("text."))

    # the optimizer groups behind it: no vision params; text at half lr, no decay on loaded weights
    model = create_model(lit.model, text_vocab_size=before["text.token_embedding.weight"].shape[0])
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("visual."))
    pretrained = {n for n, _ in model.named_parameters() if n.startswith("text.")}
    groups = {g["name"]: g for g in param_groups(model, lit.train, pretrained)}
    assert set(groups) == {"text/no_decay", "head/no_decay"}
    assert groups["text/no_decay"]["lr"] == pytest.approx(0.5 * lit.train.lr)
    assert all(g["weight_decay"] == 0.0 for g in groups.values())
    # from scratch, decayed weights get wd/lr so that torch's lr*wd_torch equals big_vision's wd
    fresh = {g["name"]: g for g in param_groups(model, lit.train)}
    assert fresh["text/decay"]["weight_decay"] * fresh["text/decay"]["lr"] == pytest.approx(lit.train.weight_decay)


def test_init_from_a_checkpoint_with_another_vocabulary_names_the_parameter(tmp_path, data):
    from sigscale.core.config import ConfigError

    base = tmp_path / "base"
    train(load_config("tiny", overrides(data, base, 2, 100)))
    shards, _ = data
    other_tok = train_tokenizer([r["txt"] for r in shard_records(400, seed=9)], tmp_path / "t.model", vocab_size=450)
    cfg = load_config("tiny", overrides((shards, other_tok), tmp_path / "ft", 2, 100, [f"train.init_from={base}"]))
    with pytest.raises(ConfigError, match=r"text.token_embedding.weight .* use the same model preset"):
        train(cfg)


def test_periodic_eval_logs_each_eval_step_once_across_a_resume(tmp_path, data):
    shards, _ = data
    run = tmp_path / "run"
    ev = ["eval.benchmarks=[retrieval]", f"eval.retrieval_shards={shards}", "eval.retrieval_max_samples=64",
          "eval.every_steps=2", "eval.batch_size=32"]
    cfg = load_config("tiny", overrides(data, run, 4, 2, ev))
    train(cfg, evaluator=BenchmarkEvaluator(cfg.eval))
    rows = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        recall = r["eval"]["retrieval"]["all"]
        assert 0 <= recall["i2t_r@1"] <= recall["i2t_r@5"] <= 100
    # a resumed run that redoes steps 3-4 replaces the step-4 eval instead of repeating it
    import shutil
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    train(cfg, evaluator=BenchmarkEvaluator(cfg.eval))
    again = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [2, 4]
    assert again[1]["eval"]["retrieval"]["all"] == pytest.approx(rows[1]["eval"]["retrieval"]["all"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    # every periodic evaluation reaches TensorBoard, with the numbers eval.jsonl holds
    for metric in ("i2t_r@1", "t2i_r@1"):
        scalars = events.Scalars(f"eval/retrieval/{metric}")
        assert [(e.step, e.value) for e in scalars] == [
            (r["step"], pytest.approx(r["eval"]["retrieval"]["all"][metric])) for r in again]


def test_unknown_benchmark_fails_before_training(tmp_path, data):
    cfg = load_config("tiny", overrides(data, tmp_path / "run", 2, 2, ["eval.benchmarks=[xm360]"]))
    with pytest.raises(ConfigError, match="unknown benchmark 'xm360'.*did you mean 'xm3600'"):
        BenchmarkEvaluator(cfg.eval)
    # Through the API without an evaluator the benchmarks would silently never run: refused instead.
    with pytest.raises(ConfigError, match="eval.benchmarks is set but train.. was given no evaluator"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_refuses_a_changed_model_or_recipe_and_names_the_keys(tmp_path, data):
    run = tmp_path / "run"
    train(load_config("tiny", overrides(data, run, 2, 2)))
    recorded = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"resuming would change model.vision.width: 64 -> 128.*new train.out_dir"):
        train(load_config("tiny", overrides(data, run, 4, 2, ["model.vision.width=128"])))
    with pytest.raises(ConfigError, match=r"train.lr: 0.001 -> 0.002; train.steps: 2 -> 4"):
        train(load_config("tiny", overrides(data, run, 4, 2, ["train.lr=2e-3"])))
    assert len(list_checkpoints(run / "checkpoints")) == 1  # nothing was trained by the refused runs
    assert (run / "config.yaml").read_text() == recorded  # nor did they overwrite the run's config
    # Keys named in train.allow_changes may change (not model shapes); logging cadence always may.
    with pytest.raises(ConfigError, match=r"model.vision.width"):
        train(load_config("tiny", overrides(data, run, 4, 2, ["model.vision.width=128",
                                                               "train.allow_changes=[model.vision.width]"])))
    longer = train(load_config("tiny", overrides(data, run, 4, 2, ["train.allow_changes=[train.steps]",
                                                                    "train.log_every=2"])))
    assert len(longer.losses) == 2 and latest_checkpoint(run / "checkpoints").name == "step_00000004"


def test_resume_keeps_the_runs_tokenizer(tmp_path, data):
    shards, tok = data
    run = tmp_path / "run"
    train(load_config("tiny", overrides(data, run, 2, 2)))
    other = train_tokenizer([r["txt"] for r in shard_records(300, seed=9)], tmp_path / "other.model", vocab_size=500)
    with pytest.raises(ConfigError, match=r"tokenizer.model=.*other.model differs from the tokenizer .* was trained with"):
        train(load_config("tiny", overrides((shards, other), run, 2, 2)))
    assert (run / "tokenizer.model").read_bytes() == Path(tok).read_bytes()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_single_process_computes_in_the_precision_asked_for(tmp_path, data, precision):
    """precision=bf16 is bf16 on one process too (autocast), not a silent fp32; fp32 stays fp32."""
    seen = []

    def watch(event):  # after step 0, look at what a matmul of the first vision block computes in at step 1
        if event.step == 0:
            event.model.visual.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))

    cfg = load_config("tiny", overrides(data, tmp_path / precision, 2, 2, [f"train.precision={precision}",
                                                                          "train.strategy=single"]))
    result = train(cfg, hooks=[watch])
    assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32]
    assert all(math.isfinite(l) for l in result.losses)


@pytest.mark.multiproc
def test_two_ddp_ranks_compute_in_bf16_when_asked(tmp_path):
    """DDP does not cast by itself: precision=bf16 autocasts its towers (it was a silent fp32)."""
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT.parent / "precision_probe.py"), str(out), "ddp", "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["wrapper"] == "DistributedDataParallel" and got["dtypes"] == ["torch.bfloat16"]
    assert math.isfinite(got["loss"])


def test_a_run_says_what_it_is_and_how_long_it_has_left(tmp_path, data, capsys):
    result = train(load_config("tiny", overrides(data, tmp_path / "run", 2, 2, ["train.strategy=single"])))
    out = capsys.readouterr().out
    assert "train tiny: 0.3M params, batch 32 = 32 x 1 accum x 1 rank(s) (single process, fp32, sigmoid loss), " \
           "2 steps from step 0, data 512 samples" in out
    assert "step      1/2  loss" in out and " eta 0:00:00" in out
    assert oct(result.final_weights.stat().st_mode & 0o777) == "0o644"


def test_a_moved_run_dir_resumes_where_it_was_left(tmp_path, data):
    import shutil

    train(load_config("tiny", overrides(data, tmp_path / "a", 2, 2)))
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    moved = train(load_config("tiny", overrides(data, tmp_path / "b", 4, 2, ["train.allow_changes=[train.steps]"])))
    assert len(moved.losses) == 2 and latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_00000004"


def test_metrics_log_the_rate_each_step_trained_at_with_a_timestamp(tmp_path, data):
    """metrics.jsonl's lr is the rate the optimizer stepped with (warmup's first at step 0, not 0 at the
    last step), and every line says when it was written."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    stepped = []  # what each optimizer.step() really used, read by torch's own step hook
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: stepped.append(opt.param_groups[0]["lr"]))
    t0 = time.time()
    try:
        train(load_config("tiny", overrides(data, tmp_path / "run", 6, 6, ["train.lr=1e-3", "train.warmup_steps=2"])))
    finally:
        handle.remove()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx(stepped) and len(rows) == 6
    assert rows[0]["lr"] == pytest.approx(1e-3 / 2)  # linear warmup over 2 steps starts at half the peak
    assert rows[-1]["lr"] > 0  # the cosine reaches 0 only after the last step
    times = [r["time"] for r in rows]
    assert t0 <= times[0] and times == sorted(times) and times[-1] <= time.time()


def test_an_unset_tokenizer_says_which_keys_to_set(tmp_path, data):
    shards, _ = data
    cfg = load_config("tiny", overrides((shards, "''"), tmp_path / "run", 2, 2))
    with pytest.raises(ConfigError, match=r"^tokenizer.model is empty and so is data.caption_corpus; set "
                                          r"tokenizer.model=PATH.model \(`sigscale tokenizer` trains one\)"):
        train(cfg)
