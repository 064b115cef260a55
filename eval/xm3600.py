"""Crossmodal-3600 retrieval, per language, in the official file layout.

``captions.jsonl`` has one line per image (Thapliyal et al. 2022, google.github.io/crossmodal-3600)::

    {"image/key": KEY, "image/locale": "bn",
     "<lang>": {"caption": [...], "caption/tokenized": [...], "caption/tokenized/lowercase": [...]}, ...}

and images live in ``images/<KEY>.jpg``. ``image/locale`` is where the photo was taken, not a
language: a language is an entry that holds captions (:func:`languages_in`).

Protocol (SigLIP paper, Zhai et al. 2023, whose mSigLIP B/16 reaches 54.1 I→T / 42.6 T→I R@1 mean):
all captions of a language; image→text is a hit when any of the image's captions is in the top k,
text→image is scored per caption against all 3600 images; recall@1/5/10 per language and their
unweighted mean over languages. ``first_caption_only`` keeps one caption per image and language,
as CLIP_benchmark's ``crossmodal3600`` loader does; its numbers are not comparable to the paper's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch.nn as nn

from sigscale.eval.retrieval import grouped_recall, mean_over
from sigscale.eval.sources import EvalDataError
from sigscale.pretrain.tokenizer import Tokenizer

XM3600_LANGUAGES = (
    "ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt quz ro ru sv sw te th tr uk vi zh"
).split()
PROTOCOLS = {
    False: "all captions per image and language (SigLIP paper): I→T hit if any caption of the image is in the "
           "top k, T→I per caption; unweighted mean over languages",
    True: "first caption per image and language (CLIP_benchmark); unweighted mean over languages",
}
# The same two protocols as ids that published results carry (eval/references.json): numbers compare only within one.
PROTOCOL_IDS = {False: "all_captions", True: "first_caption"}


class XM3600Error(EvalDataError):
    """The XM3600 folder is incomplete or malformed."""


def _tokenized(caption: str) -> str:
    # The official file's "caption/tokenized" splits punctuation off the words.
    return " ".join(re.findall(r"\w+|[^\w\s]", caption))


def record(key: str, locale: str, captions: Dict[str, List[str]]) -> dict:
    """One ``captions.jsonl`` line with every field of the official file."""
    row: dict = {"image/key": key, "image/locale": locale}
    for lang, caps in captions.items():
        tok = [_tokenized(c) for c in caps]
        row[lang] = {"caption": list(caps), "caption/tokenized": tok, "caption/tokenized/lowercase": [t.lower() for t in tok]}
    return row


def write_xm3600(root: Path, items: Iterable[Tuple[str, str, bytes, Dict[str, List[str]]]]) -> Path:
    """Write (key, locale, JPEG bytes, captions per language) items in the official XM3600 layout."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w", encoding="utf-8") as f:
        for key, locale, jpeg, captions in items:
            (root / "images" / f"{key}.jpg").write_bytes(jpeg)
            f.write(json.dumps(record(key, locale, captions), ensure_ascii=False) + "\n")
    return root


def languages_in(rows: List[dict]) -> List[str]:
    """The languages of a caption file, sorted: entries holding a ``caption`` list (not ``image/*`` metadata)."""
    return sorted({k for r in rows for k, v in r.items() if isinstance(v, dict) and "caption" in v})


def load_xm3600(root: Path) -> Tuple[List[str], List[Path], List[dict]]:
    """Image keys, image paths and caption rows of an official-format XM3600 folder (all images checked)."""
    root = Path(root)
    index = root / "captions.jsonl"
    if not index.is_file():
        raise XM3600Error(f"{index} not found; point eval.xm3600_dir at a folder with captions.jsonl and images/")
    keys, paths, rows = [], [], []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise XM3600Error(f"{index}:{n} is not valid JSON ({e}); restore the official file") from e
        key = row.get("image/key")
        if key is None:
            raise XM3600Error(f"{index}:{n} has no 'image/key'; each line needs the image key and per-language captions")
        path = root / "images" / f"{key}.jpg"
        if not path.is_file():
            raise XM3600Error(f"image {path} listed at {index}:{n} is missing; restore it or drop the line")
        keys.append(key)
        paths.append(path)
        rows.append(row)
    if not rows:
        raise XM3600Error(f"{index} lists no images")
    return keys, paths, rows


def captions_by_language(rows: List[dict], languages: Sequence[str], first_caption_only: bool,
                         source: Path) -> Dict[str, Tuple[List[str], List[int]]]:
    """Per language: the captions and, for each, the index of its image."""
    present = languages_in(rows)
    out = {}
    for lang in languages:
        texts, owners = [], []
        for i, row in enumerate(rows):
            entry = row.get(lang, {})
            caps = entry.get("caption", []) if isinstance(entry, dict) else []
            for c in caps[:1] if first_caption_only else caps:
                texts.append(c)
                owners.append(i)
        if not texts:
            raise XM3600Error(f"language {lang!r} has no captions in {source}; languages present: {present}; "
                              "drop it from eval.xm3600_languages or restore its captions")
        out[lang] = (texts, owners)
    return out


def evaluate_xm3600(model: nn.Module, tokenizer: Tokenizer, root: Path, languages: Optional[Sequence[str]] = None,
                    first_caption_only: bool = False, batch_size: int = 256, rank: int = 0, world: int = 1) -> Dict:
    """Recall@1/5/10 per language and the unweighted mean; the metrics on rank 0, {} on the other ranks.

    ``languages``: None evaluates every language in the file, sorted (the 36 of the official release).
    """
    _, paths, rows = load_xm3600(root)
    languages = list(languages) if languages else languages_in(rows)
    caps = captions_by_language(rows, languages, first_caption_only, Path(root) / "captions.jsonl")
    per_lang = grouped_recall(model, tokenizer, paths, caps, batch_size, rank, world)
    if rank != 0:
        return {}
    texts = sum(len(c[0]) for c in caps.values())
    n_img = len(paths)
    return {"protocol": PROTOCOLS[first_caption_only], "protocol_id": PROTOCOL_IDS[first_caption_only],
            "first_caption_only": first_caption_only,
            "images": n_img, "captions": texts, "languages": per_lang, "mean": mean_over(per_lang),
            "missing_official_languages": [l for l in XM3600_LANGUAGES if l not in languages],
            # A random scorer: T→I R@k = k/N; I→T R@1 = mean over images of (own captions / all) = 1/N.
            "chance_r@1": 100.0 / n_img, "chance_t2i_r@10": min(100.0, 1000.0 / n_img)}
