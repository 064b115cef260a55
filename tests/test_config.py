"""Typed configs: composition, overrides, and errors that name the key and the fix."""
import math

import pytest

from sigscale import CONFIG_DIR
from sigscale.core.config import ConfigError
from sigscale.core.config import config_hash
from sigscale.pretrain.config import check_world_size, load_config


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_experiments_load():
    headline = load_config(CONFIG_DIR / "so400m14_msiglip_32k.yaml")
    assert (headline.model.vision.width, headline.model.vision.depth, headline.model.vision.patch_size) == (1152, 27, 14)
    assert headline.model.text.vocab_size == 250000 and headline.model.text.projection is False
    assert headline.train.batch_size == 32768 and headline.train.strategy == "fsdp"
    assert headline.train.grad_checkpointing.vision and headline.train.grad_checkpointing.text
    assert math.isclose(headline.model.init_logit_scale, math.log(10)) and headline.model.init_logit_bias == -10
    b16 = load_config("b16_siglip")
    assert b16.model.vision.width == 768 and b16.train.grad_checkpointing.vision is False
    tiny = load_config("tiny")
    assert tiny.train.precision == "fp32" and tiny.model.vision.image_size == 32


def test_dot_overrides_and_preset_overrides(tmp_path):
    cfg = load_config("tiny", ["train.batch_size=256", "model.text.vocab_size=4000", "train.loss=softmax"])
    assert cfg.train.batch_size == 256 and cfg.model.text.vocab_size == 4000 and cfg.train.loss == "softmax"
    assert cfg.model.text.width == 64  # the rest of the preset stays


def test_compose_order_file_wins(tmp_path):
    write(tmp_path, "train:\n  lr: 0.5\n  steps: 7\n  warmup_steps: 1\n", "part.yaml")
    p = write(tmp_path, "compose: [models/tiny.yaml, part.yaml]\ntrain:\n  lr: 0.25\n")
    cfg = load_config(p)
    assert cfg.train.lr == 0.25 and cfg.train.steps == 7 and cfg.model.preset == "tiny"


def test_unknown_key_names_key_and_suggests(tmp_path):
    p = write(tmp_path, "train:\n  bach_size: 12\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.bach_size'.*did you mean 'train.batch_size'"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown config key 'model.vision.widht'"):
        load_config("tiny", ["model.vision.widht=3"])


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="wrong type for config key 'train.batch_size'"):
        load_config("tiny", ["train.batch_size=lots"])


@pytest.mark.parametrize("overrides, message", [
    (["train.strategy=zero"], "train.strategy='zero' is not one of"),
    (["model.vision.heads=5"], "not divisible by model.vision.heads=5"),
    (["model.vision.patch_size=64"], "model.vision.patch_size=64 exceeds"),
    (["model.vision.act=relu"], "model.vision.act='relu' is not one of"),
    (["tokenizer.model_type=wordpiece"], "tokenizer.model_type='wordpiece' is not one of"),
    (["model.text.projection=false", "model.text.width=128", "model.text.heads=4"], "projection=false needs"),
    (["tokenizer.context_length=64"], "differs from model.text.context_length"),
    (["train.batch_size=100", "train.accum_steps=3"], "not divisible by train.accum_steps"),
    (["train.warmup_steps=10000"], "exceeds train.steps"),
    (["model.preset=vit_giant"], "unknown model.preset 'vit_giant'"),
])
def test_impossible_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_batch_must_split_over_world():
    cfg = load_config("tiny", ["train.batch_size=96", "train.accum_steps=2"])
    assert check_world_size(cfg, 3) == 16
    with pytest.raises(ConfigError, match="not divisible by world size 5"):
        check_world_size(cfg, 5)


def test_missing_file_and_bad_compose(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="config part 'missing.yaml' not found"):
        load_config(write(tmp_path, "compose: [missing.yaml]\n"))
    with pytest.raises(ConfigError, match="composes itself"):
        load_config(write(tmp_path, "compose: [loop.yaml]\n", "loop.yaml"))


def test_config_hash_changes_with_content():
    a, b = load_config("tiny"), load_config("tiny", ["train.lr=0.002"])
    assert config_hash(a) == config_hash(load_config("tiny")) and config_hash(a) != config_hash(b)


@pytest.mark.parametrize("overrides,message", [
    (["train.freeze=[vision]"], "freezing random weights trains nothing"),
    (["train.init_from=x", "train.freeze=[vision,text]"], "nothing would train"),
    (["train.init_from=x", "train.freeze=[image]"], "train.freeze\\[\\]='image' is not one of"),
    (["train.lr_mult.text=-1"], "must be >= 0"),
])
def test_fine_tuning_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) +
                         sorted(f"train/{p.name}" for p in (CONFIG_DIR / "train").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    """A config in configs/ that no longer matches the schema must fail here, not on a cluster."""
    extra = ["train.init_from=/checkpoints/so400m"] if name.startswith("siglit") else []
    cfg = load_config(CONFIG_DIR / name, extra)
    assert cfg.train.batch_size > 0


def test_every_stage_finds_a_shipped_config_by_name_with_or_without_its_folder():
    """`--config eval/heldout` works as `--config curation/default` does, and so do the bare names."""
    from sigscale.curation.config import load_curation_config
    from sigscale.eval.config import load_eval_config

    assert load_eval_config("eval/heldout") == load_eval_config("heldout")
    assert load_eval_config("heldout").eval.benchmarks  # the shipped job, not the empty defaults
    where = ["input.path=urls.parquet", "output.dir=curated"]
    assert load_curation_config("curation/default", where) == load_curation_config("default", where)
    assert load_config("tiny") == load_config("tiny.yaml")
