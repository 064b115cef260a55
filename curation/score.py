"""Optional model-score filter: SigLIP image-text cosine similarity from any loadable checkpoint.

The checkpoint is anything :func:`sigscale.pretrain.interop.load_model` reads (a sigscale run dir
or ``model.safetensors``, or a Hugging Face SiglipModel dir); images are preprocessed exactly as
training reads them, captions encoded with the checkpoint's SentencePiece model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from sigscale.curation.config import CurationError, ScoreConfig


def score_pairs(images: Sequence[bytes], captions: Sequence[str], cfg: ScoreConfig) -> np.ndarray:
    """Cosine similarity of each (image, caption) pair under the configured model."""
    import torch

    from sigscale.pretrain.data import preprocess_image
    from sigscale.pretrain.interop import load_model
    from sigscale.pretrain.tokenizer import Tokenizer

    try:
        model = load_model(cfg.model).eval()
    except ValueError as e:
        raise CurationError(f"image.score.model {cfg.model} cannot be loaded: {e}") from None
    tok = Tokenizer(cfg.tokenizer, context_length=model.cfg.text.context_length)
    if tok.vocab_size > model.cfg.text.vocab_size:
        raise CurationError(
            f"image.score.tokenizer {cfg.tokenizer} has {tok.vocab_size} pieces but the model's text tower "
            f"only {model.cfg.text.vocab_size}; give the tokenizer the checkpoint was trained with"
        )
    size = model.cfg.vision.image_size
    out = np.zeros(len(images), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(images), cfg.batch_size):
            stop = start + cfg.batch_size
            pixels = torch.stack([preprocess_image(b, size) for b in images[start:stop]])
            x = model.encode_image(pixels)
            y = model.encode_text(tok(list(captions[start:stop])))
            out[start:stop] = (x * y).sum(-1).float().numpy()
    return out
