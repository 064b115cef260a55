"""SentencePiece tokenizers for the text tower: train one from captions, or load an existing .model.

Encoding follows big_vision's SigLIP ``tokenize`` op: optional canonicalisation, EOS appended
and kept when the caption is truncated ("sticky" EOS), padding to a fixed length with
``pad_value=1`` (big_vision configs/proj/image_text/siglip_*.py), 64 tokens by default.
"""
from __future__ import annotations

from sigscale.core.errors import SigscaleError
import io
import re
import string
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm
import torch

# Ids fixed at training time, matching the c4_en / mC4 SentencePiece models SigLIP ships:
# pad 0, eos 1, unk 2, no bos.
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

_PUNCT = str.maketrans("", "", string.punctuation)
_WS = re.compile(r"\s+")


def canonicalize(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace (big_vision / open_clip 'canonicalize')."""
    return _WS.sub(" ", text.lower().translate(_PUNCT)).strip()


class TokenizerError(SigscaleError, ValueError):
    """Tokenizer training or loading failed; the message says why and what to change."""


def _lines(corpus: Union[str, Path, Iterable[str]]) -> Iterator[str]:
    if isinstance(corpus, (str, Path)):
        path = Path(corpus)
        if not path.is_file():
            raise TokenizerError(f"caption corpus {path} does not exist; run `sigscale curate` or pass a text file")
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line
    else:
        for line in corpus:
            line = line.strip()
            if line:
                yield line


def train_tokenizer(
    corpus: Union[str, Path, Iterable[str]],
    out_path: Union[str, Path],
    vocab_size: int = 32000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    canonicalize_text: bool = True,
    max_sentences: int = 2_000_000,
    num_threads: int = 2,
) -> Path:
    """Train a multilingual SentencePiece model on a caption corpus and write it to ``out_path``.

    Unigram with byte fallback: characters outside the learned pieces (rare CJK, emoji) become
    bytes instead of <unk>; character_coverage < 1 keeps CJK alphabets from bloating the vocab.
    The vocabulary may come out smaller than asked when the corpus is small (never larger).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sentences = (canonicalize(s) if canonicalize_text else s for s in _lines(corpus))
    sentences = [s for s in sentences if s]
    if not sentences:
        raise TokenizerError("caption corpus is empty; nothing to train a tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences[:max_sentences]),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            # Small corpora cannot fill a large vocabulary: shrink instead of failing.
            hard_vocab_limit=False,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        fix = ("raise tokenizer.vocab_size or lower character_coverage" if "required_chars" in str(e)
               else "lower tokenizer.vocab_size or give a larger corpus")
        raise TokenizerError(f"SentencePiece training failed: {e}; {fix}") from e
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)
    return out_path


class Tokenizer:
    """Batch encoder to fixed-length id tensors for the text tower."""

    def __init__(
        self,
        model_path: Union[str, Path],
        context_length: int = 64,
        pad_id: Optional[int] = 1,
        canonicalize_text: bool = True,
    ):
        if not str(model_path).strip():  # Path("") is ".", which would read "SentencePiece model . does not exist"
            raise TokenizerError("no SentencePiece model given (the path is empty); set tokenizer.model=PATH.model "
                                 "(or --tokenizer PATH.model), or train one with `sigscale tokenizer`")
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(
                f"SentencePiece model {path} does not exist; train one with `sigscale tokenizer` "
                "or set tokenizer.model to an existing .model file"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is not a SentencePiece model: {e}") from e
        self.path = path
        self.context_length = context_length
        self.canonicalize = canonicalize_text
        eos = self.sp.eos_id()
        if eos < 0:
            raise TokenizerError(f"{path} has no EOS piece; SigLIP encoding needs one (train with eos_id=1)")
        self.eos_id = eos
        self.pad_id = eos if pad_id is None else pad_id
        if not 0 <= self.pad_id < self.vocab_size:
            raise TokenizerError(f"tokenizer.pad_id={self.pad_id} is outside the vocabulary of {path} ({self.vocab_size})")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode_ids(self, texts: Sequence[str]) -> List[List[int]]:
        """Variable-length ids, after canonicalisation, without EOS."""
        if self.canonicalize:
            texts = [canonicalize(t) for t in texts]
        return self.sp.encode(list(texts), out_type=int)

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Encode to a (n, context_length) int64 tensor: ids, sticky EOS, padding."""
        if isinstance(texts, str):
            texts = [texts]
        ids = self.encode_ids(texts)
        out = np.full((len(ids), self.context_length), self.pad_id, dtype=np.int64)
        keep = self.context_length - 1
        for row, seq in zip(out, ids):
            seq = seq[:keep]  # the EOS survives truncation: it takes the last slot
            row[: len(seq)] = seq
            row[len(seq)] = self.eos_id
        return torch.from_numpy(out)

    def decode(self, ids: Union[torch.Tensor, Sequence[int]]) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.sp.decode([i for i in ids if i != self.pad_id])
