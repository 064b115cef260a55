"""Eval over 2 gloo ranks (plain and FSDP2-sharded model) equals one process; sharded checkpoints load whole."""
import pytest
import torch
from torch.distributed.fsdp import fully_shard

from dist_helpers import run_distributed
from eval_fixtures import tokenizer_model, write_class_folder, write_eval_shards, write_xm3600
from sigscale.eval.config import BenchmarkConfig
from sigscale.eval.embed import embed_images, embed_texts
from sigscale.eval.run import evaluate, load_for_eval
from sigscale.eval.xm3600 import load_xm3600
from sigscale.pretrain.checkpoint import save_checkpoint
from sigscale.core.config import to_yaml
from sigscale.pretrain.config import load_config
from sigscale.pretrain.interop import load_model
from sigscale.pretrain.tokenizer import Tokenizer
from sigscale.pretrain.towers import create_model


def _model(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny", text_vocab_size=vocab).eval()


def _work(rank: int, world: int, cfg: BenchmarkConfig, tok_path: str, paths: list, texts: list, run_dir: str):
    tok = Tokenizer(tok_path, 16)
    model = _model(tok.vocab_size)
    plain = evaluate(model, tok, cfg, rank, world)
    # batch 3 over 7 images: rank 0 encodes 3 + 1, rank 1 encodes 3 and then a dummy batch
    img = embed_images(model, paths, 3, rank, world)
    txt = embed_texts(model, tok, texts, 5, rank, world)
    for block in model.blocks()["vision"] + model.blocks()["text"]:
        fully_shard(block)
    fully_shard(model)
    model.train()  # the training loop calls evaluate mid-run; the mode must come back
    sharded = evaluate(model, tok, cfg, rank, world)
    assert model.training
    sharded_img = embed_images(model, paths, 3, rank, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(f"{run_dir}/checkpoints", 5, model, opt, shared={"step": 5}, private={})
    return {"plain": plain, "sharded": sharded, "img": img, "txt": txt, "sharded_img": sharded_img}


@pytest.mark.multiproc
def test_two_ranks_equal_one_process_and_sharded_checkpoint_loads(tmp_path):
    tok_path = tokenizer_model(tmp_path / "tok.model")
    tok = Tokenizer(tok_path, 16)
    xm = write_xm3600(tmp_path / "xm", n_images=7, languages=("en", "de", "ar", "th"))
    cls = write_class_folder(tmp_path / "cls", per_class=3, templates=["a photo of a {}.", "{}"])
    shards = write_eval_shards(tmp_path / "shards", n=20, per_shard=8)
    cfg = BenchmarkConfig(benchmarks=["zeroshot", "xm3600", "retrieval"], classification_dir=str(cls),
                          xm3600_dir=str(xm), retrieval_shards=str(shards), batch_size=3)
    _, paths, rows = load_xm3600(xm)
    texts = [c for r in rows for c in r["de"]["caption"]]
    run = tmp_path / "run"
    run.mkdir()
    exp = load_config("tiny", [f"tokenizer.model={tok_path}", "tokenizer.context_length=16", f"train.out_dir={run}"])
    (run / "config.yaml").write_text(to_yaml(exp))

    ranks = run_distributed(_work, 2, cfg, str(tok_path), [str(p) for p in paths], texts, str(run))

    model = _model(tok.vocab_size)
    single = evaluate(model, tok, cfg)
    assert ranks[1]["plain"] == {} and ranks[1]["sharded"] == {}  # metrics live on rank 0
    # Ranks embed in other batch shapes, so embeddings agree to ~1e-6 (checked below, in order), and
    # this random tiny model has similarities that close: a near-tie may flip one pair. Metrics must
    # agree to within one pair of the smallest set; counts exactly.
    for key in ("plain", "sharded"):
        got = ranks[0][key]
        for bench in ("zeroshot", "xm3600", "retrieval"):
            a, b = _flat(got[bench]), _flat(single[bench])
            a.pop("seconds"), b.pop("seconds")
            assert a.keys() == b.keys(), (key, bench)
            sizes = [v for k, v in b.items() if k.rsplit(".", 1)[-1] in ("pairs", "captions", "images")]
            one_pair = 100.0 / min(sizes) + 1e-6
            for k in a:
                if k.rsplit(".", 1)[-1] in ("pairs", "captions", "images", "classes"):
                    assert a[k] == b[k], (key, bench, k)
                else:
                    assert a[k] == pytest.approx(b[k], abs=one_pair), (key, bench, k)
    want_img, want_txt = embed_images(model, paths, 3), embed_texts(model, tok, texts, 5)
    for r in ranks:  # every rank holds all embeddings, in input order
        torch.testing.assert_close(r["img"], want_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(r["txt"], want_txt, atol=1e-5, rtol=0)
        torch.testing.assert_close(r["sharded_img"], want_img, atol=1e-5, rtol=0)
    assert single["retrieval"]["images"] == 20 and set(single["retrieval"]["languages"]) == {"en", "de", "ru"}

    # The DCP checkpoint written by 2 FSDP ranks loads as a whole model on this one process.
    step_dir = run / "checkpoints" / "step_00000005"
    loaded = load_model(step_dir)
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    info = load_for_eval(str(step_dir))
    assert info.info["step"] == 5 and info.info["kind"] == "dcp" and info.tokenizer.path == tok_path


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)):
            out[prefix + k] = v
    return out
