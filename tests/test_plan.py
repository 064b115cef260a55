"""The memory planner: exact weight/gradient/optimizer bytes, activations and loss within ±30% of
peak live tensor bytes measured on CPU, batch splitting, and its errors."""
import functools

import pytest
import torch

from sigscale.bench_loss import peak_tensor_bytes
from sigscale.bench_memory import owned_bytes
from sigscale.cli import main
from sigscale.core.config import ConfigError
from sigscale.pretrain.config import load_config
from sigscale.pretrain.loss import chunked_sigmoid_loss, default_chunk_size
from sigscale.pretrain.optim import build_optimizer
from sigscale.pretrain.plan import (PlanError, check_fits, default_chunk, loss_bytes, parameter_shapes, parse_bytes,
                                    plan, tower_activation_bytes)
from sigscale.pretrain.sharding import apply_activation_checkpointing
from sigscale.pretrain.config import PRESETS
from sigscale.pretrain.towers import create_model

# Activations and the loss are a model of what autograd keeps: held to this relative tolerance.
TOLERANCE = 0.30


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_shapes_match_the_built_model(preset):
    model = create_model(preset, device="meta")
    built = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {p.name: p.shape for p in parameter_shapes(model.cfg)} == built


def _step(model, opt, batch, cfg):
    v, t = cfg.model.vision, cfg.model.text
    g = torch.Generator().manual_seed(batch)
    pixels = torch.rand(batch, 3, v.image_size, v.image_size, generator=g) * 2 - 1
    tokens = torch.randint(3, t.vocab_size, (batch, t.context_length), generator=g)

    def run():
        img, txt, scale, bias = model(pixels, tokens)
        chunked_sigmoid_loss(img, txt, scale, bias).backward()

    return run


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_weights_gradients_and_optimizer_bytes_are_exact(preset):
    cfg = load_config("tiny", [f"model.preset={preset}", f"model.text.vocab_size={PRESETS[preset].text.vocab_size}",
                               f"tokenizer.vocab_size={PRESETS[preset].text.vocab_size}",
                               f"model.text.context_length={PRESETS[preset].text.context_length}",
                               f"tokenizer.context_length={PRESETS[preset].text.context_length}",
                               "train.batch_size=4"])
    model = create_model(cfg.model)
    opt = build_optimizer(model, cfg.train)
    _step(model, opt, 4, cfg)()
    opt.step()
    got = owned_bytes(opt, model)
    row = plan(cfg, 1, 2**40).strategies["ddp"]
    assert (got["params"], got["grads"], got["optimizer"]) == (row.params, row.grads, row.optimizer)


@functools.lru_cache(maxsize=None)
def _per_sample(preset: str, tower: str, ckpt: bool) -> float:
    """Measured activation bytes per sample of one tower: slope of fwd+bwd peak between two batches."""
    torch.manual_seed(0)
    model = create_model(preset)
    apply_activation_checkpointing(model, ckpt, ckpt)
    v, t = model.cfg.vision, model.cfg.text
    peaks = []
    for b in (8, 24):
        x = (torch.rand(b, 3, v.image_size, v.image_size) if tower == "vision"
             else torch.randint(3, t.vocab_size, (b, t.context_length)))
        encode = model.encode_image if tower == "vision" else model.encode_text
        peaks.append(peak_tensor_bytes(lambda: encode(x).sum().backward())[1])
        model.zero_grad(set_to_none=True)
    return (peaks[1] - peaks[0]) / 16


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("tower", ["vision", "text"])
def test_activation_bytes_per_sample_within_tolerance(preset, ckpt, tower):
    measured = _per_sample(preset, tower, ckpt)
    predicted = tower_activation_bytes(PRESETS[preset], tower, 4, ckpt)
    assert predicted == pytest.approx(measured, rel=TOLERANCE), (measured, predicted)


def test_checkpointing_saves_what_the_planner_says():
    for tower in ("vision", "text"):
        saved = _per_sample("small", tower, False) / _per_sample("small", tower, True)
        planned = tower_activation_bytes(PRESETS["small"], tower, 4, False) / \
            tower_activation_bytes(PRESETS["small"], tower, 4, True)
        assert saved > 2.5 and planned == pytest.approx(saved, rel=TOLERANCE)


def test_whole_step_peak_within_tolerance():
    """Towers + chunked loss + backward of the small preset at batch 64, against act·b + loss."""
    cfg = load_config("tiny", ["model.preset=small", "model.text.vocab_size=4000", "tokenizer.vocab_size=4000",
                               "model.text.context_length=32", "tokenizer.context_length=32", "train.batch_size=64"])
    torch.manual_seed(0)
    model = create_model(cfg.model)
    opt = build_optimizer(model, cfg.train)
    run = _step(model, opt, 64, cfg)
    _, measured = peak_tensor_bytes(run)
    row = plan(cfg, 1, 2**40).strategies["ddp"]
    predicted = row.act_per_sample * 64 + row.loss
    assert predicted == pytest.approx(measured, rel=TOLERANCE), (measured, predicted)


@pytest.mark.parametrize("b", [256, 4096])
def test_loss_working_set_within_tolerance(b):
    d = 256
    img = torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    scale, bias = torch.tensor([2.3], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    _, measured = peak_tensor_bytes(lambda: chunked_sigmoid_loss(img, txt, scale, bias).backward())
    assert default_chunk(b) == default_chunk_size(b)
    # the inputs exist before the measurement: the model's 4·b·d counts them and their gradients
    predicted = loss_bytes(b, b, d, 1, None) - 4 * 2 * b * d
    assert predicted == pytest.approx(measured, rel=TOLERANCE), (measured, predicted)


def test_sharding_shrinks_static_memory_as_zero_predicts():
    cfg = load_config("so400m14_msiglip_32k")
    p8, p64 = plan(cfg, 8, parse_bytes("80GB")), plan(cfg, 8, parse_bytes("80GB"), nodes=8)
    n = p8.param_counts["total"]
    # ZeRO paper §3 with bf16 and K = 12: stage 1 holds 4Ψ + 12Ψ/N, stage 3 16Ψ/N (to rounding).
    assert p8.strategies["zero1"].static == pytest.approx(4 * n + 12 * n / 8, rel=1e-6)
    assert p8.strategies["zero3"].static == pytest.approx(16 * n / 8, rel=1e-6)
    # 8x the GPUs, ~1/8 the bytes: FSDP2 shards dim 0, so (1, n, w) position embeddings stay whole on rank 0.
    assert p8.strategies["fsdp"].static / 8 < p64.strategies["fsdp"].static < p8.strategies["fsdp"].static / 7.5
    assert p8.strategies["ddp"].static == 16 * n + 4 * len(parameter_shapes(cfg.model))


def test_accumulation_reaches_the_global_batch_when_the_batch_does_not_fit():
    cfg = load_config("so400m14_msiglip_32k")
    roomy = plan(cfg, 8, parse_bytes("80GB"), nodes=32).best
    assert roomy.accum_steps == 1 and roomy.micro == 32768 // 256
    tight = plan(cfg, 8, parse_bytes("80GB"))
    row = check_fits(tight)
    assert row.accum_steps > 1 and row.micro * row.accum_steps * 8 == 32768
    assert row.micro <= row.max_micro and row.peak <= tight.usable_bytes
    without_ckpt = plan(load_config("so400m14_msiglip_32k", ["train.grad_checkpointing.vision=false",
                                                             "train.grad_checkpointing.text=false"]), 8,
                        parse_bytes("80GB")).best
    assert without_ckpt.micro < row.micro and without_ckpt.accum_steps > row.accum_steps


def test_impossible_requests_fail_with_the_fix():
    cfg = load_config("so400m14_msiglip_32k")
    with pytest.raises(PlanError, match=r"train.batch_size=32768 does not split over 3 GPUs .* multiple of 3"):
        plan(cfg, 3, parse_bytes("80GB"))
    with pytest.raises(PlanError, match=r"strategy fsdp on 1 GPU\(s\) of 8.0 GiB .* does not fit.*add GPUs"):
        check_fits(plan(cfg, 1, parse_bytes("8GB")))
    with pytest.raises(PlanError, match=r"switch train.strategy to one of \['fsdp', 'zero1', 'zero2', 'zero3'\]"):
        check_fits(plan(load_config("so400m14_msiglip_32k", ["train.strategy=ddp"]), 8, parse_bytes("16GB")))
    with pytest.raises(PlanError, match="'80XB' is not a size; write it like 80GB"):
        parse_bytes("80XB")
    with pytest.raises(PlanError, match=r"--gpu-mem '80' has no unit; write 80GB"):
        parse_bytes("80")
    with pytest.raises(PlanError, match="unknown strategy 'zero4'"):
        plan(cfg, 8, parse_bytes("80GB"), strategies=("zero4",))
    with pytest.raises(ConfigError, match="unknown model.preset 'so800m'"):
        load_config("so400m14_msiglip_32k", ["model.preset=so800m"])


def test_plan_command_prints_the_table_and_exits_2_when_it_cannot_fit(capsys):
    assert main(["plan", "--config", "so400m14_msiglip_32k", "--gpus", "8", "--nodes", "32", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "| fsdp (config) |" in out and "| zero3 |" in out and "256 GPU(s) x 80.0 GiB" in out
    assert main(["plan", "--config", "so400m14_msiglip_32k", "--gpus", "1", "--gpu-mem", "8GB"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["plan", "--config", "tiny", "--gpus", "1", "--gpu-mem", "1GB", "model.preset=nope"]) == 2
    assert "unknown model.preset 'nope'" in capsys.readouterr().err


def test_planner_says_when_activation_checkpointing_can_be_switched_off():
    cfg = load_config("so400m14_msiglip_32k")  # checkpointing on in both towers
    roomy = plan(cfg, 8, parse_bytes("80GB"), nodes=32)  # 128 per GPU: fits without checkpointing
    off = roomy.checkpointing_off
    assert off is not None and off.towers == ["vision", "text"]
    # The advice holds: the same config without checkpointing plans the same split at the advised peak.
    without = plan(load_config("so400m14_msiglip_32k", ["train.grad_checkpointing.vision=false",
                                                        "train.grad_checkpointing.text=false"]),
                   8, parse_bytes("80GB"), nodes=32)
    row = check_fits(without)
    assert (row.micro, row.accum_steps) == (off.micro, off.accum_steps) == (roomy.best.micro, roomy.best.accum_steps)
    assert row.peak == pytest.approx(off.peak) and off.peak > roomy.best.peak
    assert without.checkpointing_off is None  # nothing left to switch off
    # 4 nodes: without checkpointing the 1024 per GPU would need more accumulation, so it stays on.
    assert plan(cfg, 8, parse_bytes("80GB"), nodes=4).checkpointing_off is None


def test_plan_command_advises_switching_checkpointing_off_only_when_it_fits(capsys):
    assert main(["plan", "--config", "so400m14_msiglip_32k", "--gpus-per-node", "8", "--nodes", "32",
                 "--gpu-mem", "80GB"]) == 0
    assert "Activation checkpointing can be switched off (train.grad_checkpointing.vision=false " \
           "train.grad_checkpointing.text=false)" in capsys.readouterr().out
    assert main(["plan", "--config", "so400m14_msiglip_32k", "--gpus-per-node", "8", "--nodes", "4",
                 "--gpu-mem", "80GB"]) == 0
    assert "can be switched off" not in capsys.readouterr().out


def test_plan_command_reads_gpus_per_node_and_refuses_a_memory_without_unit(capsys):
    assert main(["plan", "--config", "so400m14_msiglip_32k", "--gpus-per-node", "8", "--nodes", "4",
                 "--gpu-mem", "80GB"]) == 0
    assert "32 GPU(s) x 80.0 GiB" in capsys.readouterr().out  # per node, times the nodes
    assert main(["plan", "--config", "so400m14_msiglip_32k", "--gpus-per-node", "8", "--gpu-mem", "80"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-mem '80' has no unit; write 80GB" in err and len(err.strip().splitlines()) == 1


# `sigscale bench memory --check` (BENCHMARKS.md, "The planner against shapes it was not fitted to"):
# the planner's step peak was off by 2.7-11.4% on the four held-out points (worst: ZeRO-3, 12 + 8
# blocks), and by -8.4% on this test's point. 15% holds that with room for the profiler's event timing.
HELD_OUT_TOLERANCE = 0.15


@pytest.mark.multiproc
def test_planner_predicts_the_engine_peak_on_a_shape_outside_its_calibration(tmp_path):
    from sigscale.bench_plan import QUICK, run_plan_check

    [point] = QUICK
    assert not point.calibration and point.world not in (1, 2, 4) and point.batch != 64  # off the fitted set
    results = run_plan_check(tmp_path / "check.json", quick=True)
    [row] = results["points"]
    assert row["vision"][0] not in (64, 192) and row["text"][2] not in (16, 32)  # other widths and lengths
    assert row["planned_peak_bytes"] == pytest.approx(row["measured_peak_bytes"], rel=HELD_OUT_TOLERANCE), row
