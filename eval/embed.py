"""Batched embedding of images and captions, on one process or collectively over ranks.

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
import torch.distributed as dist
import torch.nn as nn

from sigscale.pretrain.data import preprocess_image
from sigscale.pretrain.tokenizer import Tokenizer

ImageLike = Union[Path, str, bytes]


def eval_model(model: nn.Module) -> nn.Module:
    """The module whose ``encode_image``/``encode_text`` to call: DDP and DeepSpeed unwrapped, FSDP2 hooked.

    FSDP2 only gathers a module's parameters around ``forward``; registering the encode methods makes
    them gather the root's parameters too (``register_fsdp_forward_method``), once per model.
    """
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        if not getattr(model, "_sigscale_eval_hooks", False):
            register_fsdp_forward_method(model, "encode_image")
            register_fsdp_forward_method(model, "encode_text")
            model._sigscale_eval_hooks = True
        return model
    inner = getattr(model, "module", None)  # DistributedDataParallel, DeepSpeedEngine
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "encode_image") else model


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (local shard of its) parameters live: inputs go there."""
    param = next(model.parameters())
    return param.device if param.device.type != "meta" else torch.device("cpu")


def _collective_device() -> torch.device:
    backend = str(dist.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend and torch.cuda.is_available() \
        else torch.device("cpu")


def any_rank(flag: bool, world: int) -> bool:
    """True when ``flag`` holds on at least one rank (collective when world > 1)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_strided(local: torch.Tensor, world: int) -> torch.Tensor:
    """Reassemble rows that rank r holds for global items r, r + W, ... into the global order, on every rank."""
    if world == 1:
        return local
    dev = _collective_device()
    count = torch.tensor([local.shape[0]], device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    most = max(counts)
    padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((sum(counts), *local.shape[1:]), dtype=local.dtype)
    for r, (part, n) in enumerate(zip(parts, counts)):
        out[r::world] = part[:n].cpu()
    return out


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

    Preprocessing is SigLIP's (pretrain/data.py): resize to the tower's square resolution, values in
    [-1, 1]; big_vision's zero-shot and retrieval evaluators resize the same way (no crop).
    """
    enc = eval_model(model)
    size, device = enc.cfg.vision.image_size, model_device(model)

    def encode(batch: list) -> torch.Tensor:
        pixels = torch.stack([x if isinstance(x, torch.Tensor) else
                              preprocess_image(x if isinstance(x, bytes) else Path(x).read_bytes(), size)
                              for x in batch])
        return enc.encode_image(pixels.to(device))

    dummy = [torch.zeros(3, size, size)]
    local = _encode_all(encode, _own(images, rank, world), dummy, batch_size, world)
    _reshard(model)
    return gather_strided(_fix_width(local, enc.embed_dim), world)


def embed_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 1024,
                rank: int = 0, world: int = 1) -> torch.Tensor:
    """L2-normalised embeddings (N, d) of captions (the tokenizer canonicalises), in input order, on every rank."""
    enc = eval_model(model)
    device = model_device(model)

    def encode(batch: list) -> torch.Tensor:
        return enc.encode_text(tokenizer(batch).to(device))

    local = _encode_all(encode, _own(texts, rank, world), [""], batch_size, world)
    _reshard(model)
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


def _reshard(model: nn.Module) -> None:
    """Shard FSDP2 parameters again after encoding.

    FSDP2 keeps the root's parameters gathered after a forward (expecting a backward): mid-training
    that would leave full copies in memory and unsharded tensors where the optimizer and
    checkpointing expect shards.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
