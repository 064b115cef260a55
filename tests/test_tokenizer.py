"""SentencePiece training and SigLIP-style encoding."""
import json

import pytest
import sentencepiece as spm
import torch

from sigscale.pretrain.tokenizer import (
    EOS_ID, Tokenizer, TokenizerError, canonicalize, train_tokenizer,
)

COLORS = {
    "en": ["red", "blue", "green", "yellow"], "de": ["rot", "blau", "grün", "gelb"],
    "fr": ["rouge", "bleu", "vert", "jaune"], "zh": ["红色", "蓝色", "绿色", "黄色"],
    "ja": ["赤い", "青い", "緑の", "黄色い"], "ru": ["красный", "синий", "зелёный", "жёлтый"],
    "ar": ["أحمر", "أزرق", "أخضر", "أصفر"], "hi": ["लाल", "नीला", "हरा", "पीला"],
}
SHAPES = {
    "en": "a {} circle on a white background", "de": "ein {} Kreis auf weißem Hintergrund",
    "fr": "un cercle {} sur fond blanc", "zh": "白色背景上的{}圆圈", "ja": "白い背景の{}円",
    "ru": "{} круг на белом фоне", "ar": "دائرة {} على خلفية بيضاء", "hi": "सफ़ेद पृष्ठभूमि पर {} वृत्त",
}


def corpus(n_repeat: int = 20):
    return [SHAPES[l].format(c) + f" {i}" for i in range(n_repeat) for l in SHAPES for c in COLORS[l]]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "captions.model"
    return train_tokenizer(corpus(), out, vocab_size=400)


def test_trained_model_has_siglip_special_ids(spm_model):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert 256 < sp.get_piece_size() <= 400  # byte fallback pieces plus learned ones


def test_multilingual_round_trip_and_byte_fallback(spm_model):
    tok = Tokenizer(spm_model, context_length=32)
    for text in ["a red circle on a white background", "白色背景上的红色圆圈", "красный круг на белом фоне",
                 "दायरा 🙂 ☃"]:  # the last has characters never seen in training: bytes, not <unk>
        ids = tok(text)[0]
        assert tok.sp.unk_id() not in ids.tolist()
        assert tok.decode(ids) == canonicalize(text)


def test_sticky_eos_and_padding(spm_model):
    tok = Tokenizer(spm_model, context_length=8, pad_id=1)
    long = " ".join(["red blue green yellow"] * 10)
    short = "red"
    ids = tok([long, short])
    assert ids.shape == (2, 8) and ids.dtype == torch.int64
    raw_long = tok.encode_ids([long])[0]
    # truncated: first 7 pieces kept, EOS kept in the last slot
    assert ids[0, :7].tolist() == raw_long[:7] and ids[0, 7].item() == EOS_ID
    raw_short = tok.encode_ids([short])[0]
    n = len(raw_short)
    assert ids[1, :n].tolist() == raw_short and ids[1, n].item() == EOS_ID
    assert (ids[1, n + 1:] == 1).all()


def test_pad_id_zero_and_canonicalisation(spm_model):
    tok = Tokenizer(spm_model, context_length=16, pad_id=0)
    a, b = tok(["A RED, circle!!", "a red circle"])
    assert torch.equal(a, b)  # canonicalised to the same string
    assert a[-1].item() == 0
    raw = Tokenizer(spm_model, context_length=16, canonicalize_text=False)
    assert not torch.equal(raw("A RED, circle!!")[0], raw("a red circle")[0])


def test_canonicalize_matches_big_vision_rule():
    assert canonicalize("  Hello,   World! It's 3:00 ") == "hello world its 300"
    assert canonicalize("Ein GRÜNER Kreis.") == "ein grüner kreis"


def test_errors_name_the_cause(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    # an unset path is said to be unset (Path("") would read "SentencePiece model . does not exist")
    with pytest.raises(TokenizerError, match=r"^no SentencePiece model given \(the path is empty\); set "
                                             r"tokenizer.model=PATH.model"):
        Tokenizer("")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer(["", "   "], tmp_path / "x.model", vocab_size=300)
    with pytest.raises(TokenizerError, match="does not exist"):
        train_tokenizer(tmp_path / "nope.txt", tmp_path / "x.model")
    with pytest.raises(TokenizerError, match="raise tokenizer.vocab_size"):
        train_tokenizer(corpus(2), tmp_path / "x.model", vocab_size=100)


def test_loads_existing_model_with_other_ids(tmp_path):
    """A user's own .model (e.g. mC4's) keeps its ids; pad defaults to the big_vision value."""
    import io
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(5)), model_writer=buf, vocab_size=600,
                                   hard_vocab_limit=False, byte_fallback=True, minloglevel=2,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3)
    path = tmp_path / "user.model"
    path.write_bytes(buf.getvalue())
    tok = Tokenizer(path, context_length=6, pad_id=None)
    ids = tok("red")[0].tolist()
    assert tok.eos_id == 2 and tok.pad_id == 2 and 2 in ids


def test_tokenizer_benchmark_renders_the_captions_per_second_it_measured(tmp_path):
    from sigscale.bench_tokenizer import render_markdown, run_tokenizer_bench

    result = run_tokenizer_bench(tmp_path / "tok.json", n_captions=3000, vocab_size=800, batch_size=500)
    assert json.loads((tmp_path / "tok.json").read_text()) == result
    assert result["captions"] == 3000 and 0 < result["vocab"] <= 800 and result["captions_per_s"] > 0
    row = render_markdown(result).splitlines()[2]
    assert row.startswith("| 3,000 | en de fr") and f"| {result['captions_per_s']:,} |" in row
