"""Memory of the real engine against world size: FSDP2 halves per-rank weights and optimizer state."""
import json

import pytest

from sigscale.bench_memory import run_memory_bench
from sigscale.core.config import ConfigError


@pytest.mark.multiproc
def test_fsdp_per_rank_params_and_optimizer_halve_from_one_to_two_ranks(tmp_path):
    out = tmp_path / "memory.json"
    results = run_memory_bench(out, quick=True)
    assert json.loads(out.read_text()) == results
    one, two = results["points"]
    assert (one["world_size"], two["world_size"], one["status"], two["status"]) == (1, 2, "ok", "ok")
    [single], pair = one["ranks"], two["ranks"]
    # Exact: each rank holds its torch.chunk share (dim 0) of every parameter, as the planner computes.
    assert single["params"] == one["planned_param_bytes_per_rank"][0]
    assert [r["params"] for r in pair] == two["planned_param_bytes_per_rank"]
    assert sum(r["params"] for r in pair) == single["params"]
    for r in [single, *pair]:
        assert r["grads"] == r["params"]  # gradients are sharded like the parameters
        assert r["optimizer"] == 2 * r["params"] + 4 * r["param_tensors"]  # AdamW m, v + a 4-byte step per tensor
    ratio = max(r["params_plus_optimizer"] for r in pair) / single["params_plus_optimizer"]
    assert 0.5 <= ratio < 0.51  # half, up to the rows rank 0 gets when dim 0 is odd
    # The whole step's peak shrinks too, and the planner predicts it within its stated ±30%.
    for point in (one, two):
        peak = max(r["peak_live_bytes"] for r in point["ranks"])
        assert point["planned_peak_bytes"] == pytest.approx(peak, rel=0.30)
    assert max(r["peak_live_bytes"] for r in pair) < single["peak_live_bytes"]


def test_a_batch_that_does_not_split_over_the_ranks_fails_before_launching(tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size=30 is not divisible by world size 4"):
        run_memory_bench(tmp_path / "m.json", config="tiny", world_sizes=(1, 4), batch=30)
    assert not (tmp_path / "m.json").exists()


def test_an_unknown_benchmark_config_names_the_choices():
    from sigscale.bench_memory import resolve_config

    assert resolve_config("small") == ("tiny", ["model.preset=small", "tokenizer.context_length=32"])
    assert resolve_config("tiny") == ("tiny", [])
    with pytest.raises(ConfigError, match=r"benchmark config 'so800m' is neither an experiment YAML .* 'small'"):
        resolve_config("so800m")
