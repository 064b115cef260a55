"""Recall@k for image-text retrieval, with several captions per image."""
from __future__ import annotations

from typing import Dict, Sequence

import torch


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
