"""Retrieval metrics against a brute-force double loop, and the XM3600 reader on official-format files."""
import json

import pytest
import torch
import torch.nn.functional as F

from sigscale.eval.retrieval import recall_at_k
from sigscale.eval.xm3600 import XM3600Error, load_xm3600


def brute_force(img, txt, owner, k):
    sim = img @ txt.T
    i2t = []
    for i in range(img.shape[0]):
        order = sorted(range(txt.shape[0]), key=lambda j: -sim[i, j].item())
        i2t.append(any(owner[j] == i for j in order[:k]))
    t2i = []
    for j in range(txt.shape[0]):
        order = sorted(range(img.shape[0]), key=lambda i: -sim[i, j].item())
        t2i.append(owner[j] in order[:k])
    return 100 * sum(i2t) / len(i2t), 100 * sum(t2i) / len(t2i)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_img, d = 30, 8
    owner = torch.randint(0, n_img, (70,), generator=g)
    img = F.normalize(torch.randn(n_img, d, generator=g), dim=-1)
    txt = F.normalize(img[owner] + 0.8 * torch.randn(70, d, generator=g), dim=-1)
    got = recall_at_k(img, txt, owner, ks=(1, 5, 10), block=7)
    for k in (1, 5, 10):
        i2t, t2i = brute_force(img, txt, owner.tolist(), k)
        # images with no caption can never be hit: the brute force counts them as misses too
        assert got[f"i2t_r@{k}"] == pytest.approx(i2t) and got[f"t2i_r@{k}"] == pytest.approx(t2i)


def test_ties_count_against_the_model():
    """A collapsed model (every embedding equal) must not look perfect."""
    img = F.normalize(torch.ones(10, 4), dim=-1)
    txt = F.normalize(torch.ones(20, 4), dim=-1)
    got = recall_at_k(img, txt, torch.arange(20) % 10, ks=(1, 5))
    assert got["i2t_r@1"] == 0 and got["t2i_r@1"] == 0 and got["t2i_r@5"] == 0


def test_xm3600_reader_errors(tmp_path):
    with pytest.raises(XM3600Error, match="captions.jsonl not found"):
        load_xm3600(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image/key": "abc", "en": {"caption": ["x"]}}) + "\n")
    with pytest.raises(XM3600Error, match="abc.jpg listed at .*:1 is missing"):
        load_xm3600(tmp_path)
