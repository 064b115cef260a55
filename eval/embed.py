"""Batched embedding of images and captions, on one process or collectively over ranks.

How a (sharded) model is called for inference is sharding.py's business (``inference_module``).

Ranks take every ``world``-th item (rank r embeds items r, r + W, ...) and the embeddings are
reassembled in the original order on every rank, so any metric computed from them is the one a
single process gets. The functions are collective: every rank calls them with the same inputs.
A sharded (FSDP2) model runs collectives inside each forward, so a rank that has run out of items
keeps encoding a one-item dummy batch until every rank is done.
"""
from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Sequence, Union

import torch
import torch.nn as nn

from sigscale.core.distributed import any_rank, gather_strided
from sigscale.pretrain.data import preprocess_image
from sigscale.pretrain.sharding import inference_module, reshard_after_inference
from sigscale.pretrain.tokenizer import Tokenizer

ImageLike = Union[Path, str, bytes]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (local shard of its) parameters live: inputs go there."""
    param = next(model.parameters())
    return param.device if param.device.type != "meta" else torch.device("cpu")


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, size)):
        yield batch


@torch.no_grad()
def _encode_all(encode: Callable[[list], torch.Tensor], items: Iterator, dummy: list,
                batch_size: int, world: int) -> torch.Tensor:
    """Encode this rank's items batch by batch, in step with the other ranks; float32 on CPU."""
    out: List[torch.Tensor] = []
    batches = _batches(items, batch_size)
    while True:
        batch = next(batches, None)
        if not any_rank(batch is not None, world):
            break
        emb = encode(batch if batch is not None else dummy)
        if batch is not None:
            out.append(emb.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def _own(items: Iterable, rank: int, world: int) -> Iterator:
    return itertools.islice(items, rank, None, world)


def _fix_width(local: torch.Tensor, dim: int) -> torch.Tensor:
    return local if local.numel() else torch.empty(0, dim)


def embed_images(model: nn.Module, images: Iterable[ImageLike], batch_size: int = 256,
                 rank: int = 0, world: int = 1) -> torch.Tensor:
    """L2-normalised embeddings (N, d) of image files or encoded bytes, in input order, on every rank.

    Preprocessing is the evaluation protocol of pretrain/data.py: full decode, bicubic resize to the
    tower's square resolution as transformers' SiglipImageProcessor does (no crop), values in [-1, 1].
    """
    enc = inference_module(model)
    size, device = enc.cfg.vision.image_size, model_device(model)

    def encode(batch: list) -> torch.Tensor:
        pixels = torch.stack([x if isinstance(x, torch.Tensor) else
                              preprocess_image(x if isinstance(x, bytes) else Path(x).read_bytes(), size)
                              for x in batch])
        return enc.encode_image(pixels.to(device))

    dummy = [torch.zeros(3, size, size)]
    local = _encode_all(encode, _own(images, rank, world), dummy, batch_size, world)
    reshard_after_inference(model)
    return gather_strided(_fix_width(local, enc.embed_dim), world)


def embed_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 1024,
                rank: int = 0, world: int = 1) -> torch.Tensor:
    """L2-normalised embeddings (N, d) of captions (the tokenizer canonicalises), in input order, on every rank."""
    enc = inference_module(model)
    device = model_device(model)

    def encode(batch: list) -> torch.Tensor:
        return enc.encode_text(tokenizer(batch).to(device))

    local = _encode_all(encode, _own(texts, rank, world), [""], batch_size, world)
    reshard_after_inference(model)
    return gather_strided(_fix_width(local, enc.embed_dim), world)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside, the previous train/eval mode after (the training loop evaluates mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

