"""Evaluation fixtures written in the official layouts, and brute-force metric references.

- ImageNet val: synset folders ``n01440764/ILSVRC2012_val_00000001.JPEG`` (no class-names file).
- A classification folder with ``classnames.txt`` (+ optional ``templates.txt``).
- XM3600: ``captions.jsonl`` lines with ``image/key``, ``image/locale`` and per language ``caption``,
  ``caption/tokenized``, ``caption/tokenized/lowercase`` (eval/xm3600.py ``record``), and ``images/<KEY>.jpg``;
  several scripts, 1-3 captions per image and language.
- webdataset shards (``.jpg``, ``.txt``, ``.json`` with language and class, ``.cls``) + manifest.json.
- COCO / Flickr30k Karpathy splits: ``dataset_coco.json`` / ``dataset_flickr30k.json`` with every field of
  the released files (``filepath`` and ``cocoid`` in COCO only), train/val/restval/test images.
- XTD10 as in adobe-research/Cross-lingual-Test-Dataset-XTD10: ``XTD10/test_image_names.txt``,
  ``XTD10/test_1kcaptions_<lang>.txt``, ``MIC/test_1kcaptions_de.txt``, ``STAIR/test_1kcaptions_jp.txt``.
- Babel-ImageNet ``babel_imagenet.json`` ({LANG: [ImageNet indices, names]}) and ``nllb_dist13b_prompts.json``.
- CLIP_benchmark webdataset tasks: classnames.txt, zeroshot_classification_templates.txt ({c}),
  dataset_type.txt, test/nshards.txt, test/0.tar.. with webp/png/jpg images and cls or txt.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
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


def write_karpathy(root: Path, dataset: str, n_test: int = 6, size: int = 32, seed: int = 3) -> Path:
    """A Karpathy-split file (every field of the release) + images; 5 captions per image, 4 splits."""
    rng = random.Random(seed)
    colors, images, sentid = list(COLORS), [], 0
    for imgid, split in enumerate(["train", "val", "restval"] + ["test"] * n_test):
        color = rng.choice(colors)
        filename = f"COCO_val2014_{100 + imgid:012d}.jpg" if dataset == "coco" else f"{1000092795 + imgid}.jpg"
        folder = root / "val2014" if dataset == "coco" else root / "images"  # flickr30k has no filepath
        folder.mkdir(parents=True, exist_ok=True)
        (folder / filename).write_bytes(image_bytes(color, seed * 100 + imgid, size))
        # Distinct captions, as in the release: equal texts would tie, and a tie is decided by float noise.
        raws = [f"{v.format(CAPTIONS['en'][color])} {imgid}" for v in VARIANTS] + [f"the {color} one {imgid}", f"{color} {imgid}"]
        sentences = [{"tokens": r.lower().replace(".", "").replace(",", "").split(), "raw": r, "imgid": imgid,
                      "sentid": sentid + j} for j, r in enumerate(raws)]
        entry = {"filepath": "val2014", "filename": filename} if dataset == "coco" else {"filename": filename}
        entry.update({"imgid": imgid, "split": split, "sentids": [s["sentid"] for s in sentences],
                      "sentences": sentences})
        if dataset == "coco":
            entry["cocoid"] = 100 + imgid
        images.append(entry)
        sentid += len(raws)
    (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": images, "dataset": dataset}))
    return root


XTD10_FILES = {"en": "XTD10", "ru": "XTD10", "zh": "XTD10", "de": "MIC", "jp": "STAIR"}


def write_xtd10(root: Path, n: int = 7, size: int = 32, seed: int = 5) -> Path:
    """The XTD10 repository layout: the image list, one caption file per language aligned to it, images/."""
    rng = random.Random(seed)
    combos = [(c, v) for v in VARIANTS for c in COLORS]  # (colour, variant) distinct: no two equal captions
    rng.shuffle(combos)
    colors, variants = zip(*combos[:n])
    names = [f"COCO_train2014_{200 + i:012d}.jpg" for i in range(n)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / "images" / name).write_bytes(image_bytes(colors[i], seed * 100 + i, size))
    for folder in set(XTD10_FILES.values()):
        (root / folder).mkdir(exist_ok=True)
    (root / "XTD10" / "test_image_names.txt").write_text("\n".join(names) + "\n")
    for lang, folder in XTD10_FILES.items():
        caps = CAPTIONS["ja" if lang == "jp" else lang]
        lines = [v.format(caps[c]) for c, v in zip(colors, variants)]
        (root / folder / f"test_1kcaptions_{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# Babel-ImageNet labels: EN names all three fixture classes, DE lacks goldfish, RU adds a class with no images.
BABEL_LABELS = {"EN": [[0, 1, 151], ["tench", "goldfish", "Chihuahua"]],
                "DE": [[0, 151], ["Schleie", "Chihuahua"]],
                "RU": [[0, 1, 151, 500], ["линь", "золотая рыбка", "чихуахуа", "ветряная мельница"]]}
BABEL_PROMPTS = {"DE": ["ein Foto von {}.", "{}"], "FR": ["une photo de {}."]}


def write_babel(root: Path) -> Dict[str, Path]:
    """``babel_imagenet.json`` and ``nllb_dist13b_prompts.json`` as released (upper-case language codes)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "babel_imagenet.json").write_text(json.dumps(BABEL_LABELS, ensure_ascii=False), encoding="utf-8")
    (root / "nllb_dist13b_prompts.json").write_text(json.dumps(BABEL_PROMPTS, ensure_ascii=False), encoding="utf-8")
    return {"labels": root / "babel_imagenet.json", "prompts": root / "nllb_dist13b_prompts.json"}


def _encode(color: str, seed: int, fmt: str, size: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(color, seed, size))).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: Dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_clipbench(root: Path, task: str, n: int = 12, size: int = 32, seed: int = 9) -> Path:
    """A CLIP_benchmark webdataset task: one or two samples per shard, so 10.tar sorts before 2.tar."""
    rng = random.Random(seed)
    colors, fmts = list(COLORS), [("webp", "WEBP"), ("png", "PNG"), ("jpg", "JPEG")]
    (root / "test").mkdir(parents=True, exist_ok=True)
    if task == "classification":
        # A fifth class without images: candidates >= 5, so CLIP_benchmark reports top-5 too.
        (root / "classnames.txt").write_text("\n".join(f"{c} square" for c in colors + ["grey"]) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nitap of the {c}.\n")
    else:
        (root / "dataset_type.txt").write_text("retrieval\n")
    shards = [[0, 1]] + [[i] for i in range(2, n)]  # n - 1 shards
    for s, idx in enumerate(shards):
        members: Dict[str, bytes] = {}
        for i in idx:
            c = rng.randrange(len(colors))
            ext, fmt = fmts[i % 3]
            members[f"s{i:05d}.{ext}"] = _encode(colors[c], seed * 100 + i, fmt, size)
            if task == "classification":
                members[f"s{i:05d}.cls"] = str(c).encode()
            else:
                caps = [f"{v.format(CAPTIONS['en'][colors[c]])} {i}" for v in VARIANTS[: 1 + i % 3]]
                members[f"s{i:05d}.txt"] = "\n".join(caps).encode()
        _tar(root / "test" / f"{s}.tar", members)
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
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


class ReportTables(HTMLParser):
    """Every table of a report page: {h2 title: (note, rows)}, each row a list of cell texts, header first."""

    def __init__(self):
        super().__init__()
        self.tables, self.published = {}, set()
        self._title, self._note, self._rows, self._cell, self._in, self._block = "", "", None, None, "", []

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            self._block.append(dict(attrs).get("class", ""))
        elif tag in ("h2", "p"):
            self._in, self._note = tag, self._note if tag == "p" else ""
            if tag == "h2":
                self._title = ""
        elif tag == "table":
            self._rows = []
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "div" and self._block:
            self._block.pop()
        elif tag in ("h2", "p"):
            self._in = ""
        elif tag in ("td", "th"):
            self._rows[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self.tables[self._title] = (self._note, self._rows)
            if "published" in self._block:
                self.published.add(self._title)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._in == "h2":
            self._title += data
        elif self._in == "p":
            self._note += data


def html_tables(path: Path) -> ReportTables:
    page = ReportTables()
    page.feed(Path(path).read_text(encoding="utf-8"))
    return page


def markdown_tables(path: Path) -> Dict[str, List[List[str]]]:
    """{## title: rows (header first, cells stripped)} of a report's Markdown."""
    out, title = {}, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("|") and title is not None and not line.startswith("|---"):
            out.setdefault(title, []).append([c.strip().strip("*") for c in line.strip("|").split(" | ")])
    return out
