"""Recall@k for image-text retrieval (several captions per image), and retrieval on webdataset splits."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

from sigscale.eval.embed import embed_images, embed_texts, eval_mode
from sigscale.eval.sources import EvalDataError, shard_samples
from sigscale.pretrain.tokenizer import Tokenizer


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, txt_image: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10), block: int = 1024) -> Dict[str, float]:
    """Image→text counts a hit when any caption of the image is in the top k; text→image per caption.

    ``img`` (I, d) and ``txt`` (T, d) are L2-normalised; ``txt_image[j]`` is the image of caption j.
    A rank counts the other candidates scoring at least as high: ties count against the model, so
    a collapsed model (all scores equal) scores zero, not 100. Similarities are computed in
    blocks of image rows, twice with identical shapes, so a pair's score is bitwise the same
    wherever it is compared (an elementwise dot product can differ from a matmul in the last bit).
    """
    if txt.shape[0] != txt_image.shape[0]:
        raise ValueError(f"{txt.shape[0]} captions but {txt_image.shape[0]} caption→image indices")
    n_img, n_txt = img.shape[0], txt.shape[0]
    cols = torch.arange(n_txt)
    own = torch.empty(n_txt, dtype=img.dtype)
    blocks = [(s, min(s + block, n_img)) for s in range(0, n_img, block)]
    for s, e in blocks:  # pass 1: each caption's score with its own image
        mask = (txt_image >= s) & (txt_image < e)
        own[mask] = (img[s:e] @ txt.T)[txt_image[mask] - s, cols[mask]]
    t2i_rank = torch.zeros(n_txt, dtype=torch.long)
    i2t_rank = torch.full((n_img,), n_txt, dtype=torch.long)
    for s, e in blocks:  # pass 2: count what beats it
        sim = img[s:e] @ txt.T
        t2i_rank += (sim >= own[None, :]).sum(0)
        mask = (txt_image >= s) & (txt_image < e)
        rows = txt_image[mask] - s
        cap_rank = (sim[rows] >= own[mask][:, None]).sum(1) - 1  # rank among all captions, for its image
        i2t_rank.scatter_reduce_(0, txt_image[mask], cap_rank, reduce="amin")
    t2i_rank -= 1  # the pair itself was counted
    out: Dict[str, float] = {}
    for k in ks:
        out[f"i2t_r@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        out[f"t2i_r@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return out


def mean_over(per_group: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Unweighted mean of each recall metric over groups (languages): every language counts once."""
    metrics = [m for m in next(iter(per_group.values())) if "@" in m]
    return {m: sum(v[m] for v in per_group.values()) / len(per_group) for m in metrics}


def grouped_recall(model: nn.Module, tokenizer: Tokenizer, images: Iterable, captions: Dict[str, Tuple[List[str], List[int]]],
                   batch_size: int = 256, rank: int = 0, world: int = 1) -> Dict[str, Dict[str, float]]:
    """Recall@1/5/10 per caption group (language) against one image gallery; {} on ranks other than 0.

    ``captions[group] = (texts, image index of each text)``. Images are embedded once and every
    group's captions go through the text tower in one pass, then split. ``images`` may be a
    generator that fills the caption lists as it reads (they are read only after the images).
    """
    with eval_mode(model):
        img = embed_images(model, images, batch_size, rank, world)
        texts = [t for caps, _ in captions.values() for t in caps]
        txt = embed_texts(model, tokenizer, texts, 4 * batch_size, rank, world)
    if rank != 0:
        return {}
    out, start = {}, 0
    for group, (caps, owners) in captions.items():
        out[group] = {**recall_at_k(img, txt[start:start + len(caps)], torch.tensor(owners)), "captions": len(caps)}
        start += len(caps)
    return out


def evaluate_shard_retrieval(model: nn.Module, tokenizer: Tokenizer, shards: Path, batch_size: int = 256,
                             rank: int = 0, world: int = 1, max_samples: int = 0) -> Dict:
    """Recall@k on a webdataset split (one image and one caption per sample): all samples, and per language.

    A language's recall is measured within that language's pairs (its images are the gallery), so
    its chance level is 1/n_language. ``max_samples`` > 0 keeps the first samples only (periodic
    eval during training). The metrics on rank 0, {} on the other ranks.
    """
    captions: List[str] = []
    langs: List[str] = []

    def images() -> Iterator[bytes]:
        for n, sample in enumerate(shard_samples(shards)):
            if max_samples and n >= max_samples:
                return
            if not sample["txt"]:
                raise EvalDataError(f"sample {sample['key']!r} in {sample['url']} has no caption (.txt); "
                                    "retrieval needs one per sample")
            captions.append(sample["txt"])
            langs.append(str(sample["json"].get("language", "und")))
            yield sample["image"]

    with eval_mode(model):
        img = embed_images(model, images(), batch_size, rank, world)  # fills captions/langs as it reads
        if not captions:
            raise EvalDataError(f"the shards at {shards} hold no samples")
        txt = embed_texts(model, tokenizer, captions, 4 * batch_size, rank, world)
    if rank != 0:
        return {}
    n = len(captions)
    out = {"protocol": "one caption per image; recall@k over all pairs and within each language's pairs",
           "protocol_id": "one_caption",
           "images": n, "all": recall_at_k(img, txt, torch.arange(n)), "chance_r@1": 100.0 / n, "languages": {}}
    for lang in sorted(set(langs)):
        idx = torch.tensor([i for i, l in enumerate(langs) if l == lang])
        res = recall_at_k(img[idx], txt[idx], torch.arange(len(idx)))
        out["languages"][lang] = {**res, "pairs": len(idx), "chance_r@1": 100.0 / len(idx)}
    return out
