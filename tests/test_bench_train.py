"""`sigscale bench train`: sigscale and open_clip's own trainer side by side on the same shards."""
import json

import pytest

from sigscale.bench_train import PEERS, render_markdown, run_train_bench, write_open_clip_model
from sigscale.cli import main
from sigscale.core.config import ConfigError


@pytest.mark.multiproc
def test_quick_bench_reports_both_peers_and_their_ratios(tmp_path):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    [pair] = results["pairs"]
    assert pair["world_size"] == 2 and pair["global_batch"] == 32
    for peer in PEERS:
        r = pair[peer]
        assert r["status"] == "ok", r["log_tail"]
        assert r["images_per_s"] > 0 and len(r["images_per_s_per_step"]) == pair["steps"]
        assert len(r["rss_peak_bytes_per_rank"]) == 2 and min(r["rss_peak_bytes_per_rank"]) > 100 * 2**20
    s, o = pair["sigscale"], pair["open_clip"]
    assert pair["throughput_ratio"] == pytest.approx(s["images_per_s"] / o["images_per_s"])
    assert pair["memory_ratio"] == pytest.approx(s["rss_peak_bytes"] / o["rss_peak_bytes"])
    assert results["ratios"] == {"throughput": [pair["throughput_ratio"]], "memory": [pair["memory_ratio"]]}
    table = render_markdown(results)  # the command renders every pair and the summary over repeats itself
    assert f"| ddp | 1 | {pair['throughput_ratio']:.2f}× ({pair['throughput_ratio']:.2f}–" in table
    assert f"{s['images_per_s']:.1f} | {o['images_per_s']:.1f} |" in table


def test_open_clip_builds_the_same_towers_offline(tmp_path):
    import open_clip

    from sigscale.bench_memory import write_bench_data
    from sigscale.pretrain.towers import create_model
    from sigscale.pretrain.tokenizer import Tokenizer

    _, tok = write_bench_data(tmp_path / "data", samples=64)
    name = write_open_clip_model(tmp_path / "oc", "small", tok)
    theirs = open_clip.create_model(name)
    ours = create_model("small", text_vocab_size=Tokenizer(str(tok)).vocab_size)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(theirs) == count(ours)
    ids = open_clip.get_tokenizer(name)(["a red circle"])
    assert ids.shape == (1, 32) and int(ids.max()) < Tokenizer(str(tok)).vocab_size


def test_a_point_sigscale_cannot_run_fails_before_launching(tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size=100 is not divisible by world size 3"):
        run_train_bench(tmp_path / "t.json", config="tiny", world=3, batch=100)
    assert not (tmp_path / "t.json").exists()


def test_repeats_are_summarised_per_strategy_without_the_capped_point():
    from sigscale.bench_train import summarise_repeats

    def pair(strategy, tr, mr, cap=None):
        return {"strategy": strategy, "throughput_ratio": tr, "memory_ratio": mr, "cap_bytes": cap}

    pairs = [pair("ddp", 1.3, 0.96), pair("fsdp", 1.1, 0.94), pair("ddp", 0.9, 0.95), pair("ddp", 1.0, 0.97),
             pair("ddp", 0.5, 0.1, cap=2**30), {"strategy": "fsdp", "cap_bytes": None}]  # the last: a peer failed
    summary = summarise_repeats({"pairs": pairs})
    assert summary == {"ddp": {"pairs": 3, "throughput": (0.9, 1.0, 1.3), "memory": (0.95, 0.96, 0.97)},
                       "fsdp": {"pairs": 1, "throughput": (1.1, 1.1, 1.1), "memory": (0.94, 0.94, 0.94)}}
