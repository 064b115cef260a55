"""Reading evaluation data: webdataset shards (curated splits, ImageNet as shards) sample by sample."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List

import webdataset as wds

from sigscale.core.manifest import MANIFEST, shard_urls
from sigscale.core.errors import SigscaleError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class EvalDataError(SigscaleError, ValueError):
    """An evaluation set is missing, empty or malformed; the message names the file and the fix."""


def eval_shards(path: Path) -> List[str]:
    """Shard files of an eval split: a folder with manifest.json, a folder of *.tar, or one .tar."""
    path = Path(path)
    if path.is_file() and path.suffix == ".tar":
        return [str(path)]
    if (path / MANIFEST).is_file():
        return shard_urls(path)
    tars = sorted(path.glob("*.tar")) if path.is_dir() else []
    if not tars:
        raise EvalDataError(f"no webdataset shards at {path}; point it at a folder of *.tar (with or without "
                            f"{MANIFEST}) or at one .tar file")
    return [str(t) for t in tars]


def shard_samples(path: Path) -> Iterator[Dict]:
    """Samples of all shards in order: ``{"key", "image" (bytes), "txt", "json" (dict), "cls"}``."""
    return url_samples(eval_shards(path))


def url_samples(urls: List[str]) -> Iterator[Dict]:
    """Samples of the given shard files, in order (see :func:`shard_samples`)."""
    for url in urls:
        def fail(exn: Exception, url: str = url) -> bool:
            raise EvalDataError(f"cannot read shard {url}: {exn}; re-run the curation step that wrote it") from exn

        for raw in wds.tariterators.tarfile_samples([{"url": url}], handler=fail):
            key = raw["__key__"]
            image = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
            if image is None:
                raise EvalDataError(f"sample {key!r} in {url} has no image ({'/'.join(IMAGE_KEYS)}); "
                                    "drop it from the shard or restore the image")
            meta = json.loads(raw["json"]) if "json" in raw else {}
            yield {"key": key, "image": image, "txt": raw["txt"].decode("utf-8") if "txt" in raw else None,
                   "json": meta, "cls": int(raw["cls"]) if "cls" in raw else None, "url": url}
