"""Evaluation fixtures written in the official layouts, and brute-force metric references.

- ImageNet val: synset folders ``n01440764/ILSVRC2012_val_00000001.JPEG`` (no class-names file).
- A classification folder with ``classnames.txt`` (+ optional ``templates.txt``).
- XM3600: ``captions.jsonl`` lines with ``image/key``, ``image/locale`` and per language ``caption``,
  ``caption/tokenized``, ``caption/tokenized/lowercase`` (eval/xm3600.py ``record``), and ``images/<KEY>.jpg``;
  several scripts, 1-3 captions per image and language.
- webdataset shards (``.jpg``, ``.txt``, ``.json`` with language and class, ``.cls``) + manifest.json.
"""
from __future__ import annotations

import io
import json
import random
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

from sigscale.core.manifest import write_shards
from sigscale.eval import xm3600
from sigscale.pretrain.tokenizer import train_tokenizer

# Captions per colour in several scripts (Latin, Cyrillic, Han, Arabic, Devanagari, Thai, Japanese).
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
CAPTIONS = {
    "en": {"red": "a red square", "green": "a green square", "blue": "a blue square", "yellow": "a yellow square"},
    "de": {"red": "ein rotes Quadrat", "green": "ein grünes Quadrat", "blue": "ein blaues Quadrat",
           "yellow": "ein gelbes Quadrat"},
    "ru": {"red": "красный квадрат", "green": "зелёный квадрат", "blue": "синий квадрат", "yellow": "жёлтый квадрат"},
    "zh": {"red": "红色的正方形", "green": "绿色的正方形", "blue": "蓝色的正方形", "yellow": "黄色的正方形"},
    "ar": {"red": "مربع أحمر", "green": "مربع أخضر", "blue": "مربع أزرق", "yellow": "مربع أصفر"},
    "hi": {"red": "लाल वर्ग", "green": "हरा वर्ग", "blue": "नीला वर्ग", "yellow": "पीला वर्ग"},
    "th": {"red": "สี่เหลี่ยมสีแดง", "green": "สี่เหลี่ยมสีเขียว", "blue": "สี่เหลี่ยมสีน้ำเงิน", "yellow": "สี่เหลี่ยมสีเหลือง"},
    "ja": {"red": "赤い四角", "green": "緑の四角", "blue": "青い四角", "yellow": "黄色い四角"},
}
VARIANTS = ("{}", "a photo of {}.", "{}, seen from above")
SYNSETS = ("n01440764", "n01443537", "n02085620")  # tench, goldfish, Chihuahua


def image_bytes(color: str, seed: int, size: int = 32) -> bytes:
    """A noisy square of one colour on a grey background, JPEG-encoded at the model's resolution."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(128, 20, (size, size, 3))
    a, b = sorted(rng.integers(2, size - 2, 2))
    arr[a:b + 4, a:b + 4] = np.array(COLORS[color]) + rng.normal(0, 10, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_xm3600(root: Path, n_images: int = 12, languages: Sequence[str] = tuple(CAPTIONS), seed: int = 0,
                 size: int = 32) -> Path:
    """Official XM3600 layout (every field of the real file); each image gets 1-3 captions per language."""
    rng = random.Random(seed)

    def items():
        for i in range(n_images):
            color = rng.choice(list(COLORS))
            key = f"{rng.getrandbits(64):016x}"
            captions = {lang: [v.format(CAPTIONS[lang][color]) for v in VARIANTS[: rng.randint(1, 3)]]
                        for lang in languages}
            yield key, languages[i % len(languages)], image_bytes(color, seed * 1000 + i, size), captions

    return xm3600.write_xm3600(root, items())


def write_imagenet_val(root: Path, per_class: int = 3, size: int = 32) -> Path:
    """A few synset folders of the standard val layout, no class-names file."""
    colors = list(COLORS)
    n = 1
    for c, wnid in enumerate(SYNSETS):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            (root / wnid / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(image_bytes(colors[c], 100 + n, size))
            n += 1
    return root


def write_class_folder(root: Path, per_class: int = 3, size: int = 32, templates: Sequence[str] = ()) -> Path:
    """ImageFolder + classnames.txt (one name per sorted folder), optional templates.txt."""
    for c, color in enumerate(COLORS):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            (root / f"c{c}" / f"{j}.jpg").write_bytes(image_bytes(color, 500 + 10 * c + j, size))
    (root / "classnames.txt").write_text("\n".join(f"{c} square" for c in COLORS) + "\n", encoding="utf-8")
    if templates:
        (root / "templates.txt").write_text("\n".join(templates) + "\n", encoding="utf-8")
    return root


def write_eval_shards(root: Path, n: int = 20, per_shard: int = 8, size: int = 32) -> Path:
    """Curated-style shards: caption in the sample's language, class name in the json, label in .cls."""
    rng = random.Random(7)
    records = []
    langs, colors = list(CAPTIONS)[:3], list(COLORS)
    for i in range(n):
        color, lang = rng.choice(colors), langs[i % 3]
        records.append({"key": f"{i:06d}", "jpg": image_bytes(color, 900 + i, size), "txt": CAPTIONS[lang][color],
                        "json": {"language": lang, "class": f"{color} square"}})
    write_shards(records, root, samples_per_shard=per_shard)
    return root


def tokenizer_model(path: Path) -> Path:
    """A small SentencePiece model covering every fixture script and the CLIP templates' words."""
    lines = [v.format(c) for caps in CAPTIONS.values() for c in caps.values() for v in VARIANTS]
    lines += ["a photo of a tench", "a bad photo of the goldfish", "itap of my chihuahua"]
    return train_tokenizer(lines * 5, path, vocab_size=600)


def brute_force_recall(img, txt, owner: List[int], k: int):
    """I→T and T→I recall@k (%) by sorting every row; ties rank the true match last (pessimistic)."""
    sim = img @ txt.T
    i2t = []
    for i in range(img.shape[0]):
        order = sorted(range(txt.shape[0]), key=lambda j: (-sim[i, j].item(), owner[j] == i))
        i2t.append(any(owner[j] == i for j in order[:k]))
    t2i = []
    for j in range(txt.shape[0]):
        order = sorted(range(img.shape[0]), key=lambda i: (-sim[i, j].item(), i == owner[j]))
        t2i.append(owner[j] in order[:k])
    return 100 * sum(i2t) / len(i2t), 100 * sum(t2i) / len(t2i)


class ReportPage(HTMLParser):
    """The <img> sources and the number of tables of a report page."""

    def __init__(self):
        super().__init__()
        self.srcs, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))
        self.tables += tag == "table"


def parse_html(path: Path) -> ReportPage:
    page = ReportPage()
    page.feed(Path(path).read_text(encoding="utf-8"))
    return page
