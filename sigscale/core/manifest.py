"""The contract between stages: webdataset shards plus manifest.json.

A shard is a tar of samples ``<key>.jpg``, ``<key>.txt`` (the caption) and ``<key>.json``
(language, source URL, extra columns). ``manifest.json`` lists every shard with its sample count
and language counts, so training can check its input before it starts.
"""
from __future__ import annotations

from sigscale.core.errors import SigscaleError
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import webdataset as wds

MANIFEST = "manifest.json"
FORMAT = "sigscale-shards/1"


class ManifestError(SigscaleError, ValueError):
    """Shards or their manifest are missing or inconsistent; the message says which and how to fix it."""


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    samples: int
    languages: Dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    shards: List[ShardInfo]
    config_hash: str = ""
    format: str = FORMAT
    created: str = ""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def languages(self) -> Dict[str, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.languages)
        return dict(sorted(total.items()))


def write_shards(samples: Iterable[dict], out_dir: Path, samples_per_shard: int = 1000,
                 config_hash: str = "", prefix: str = "shard") -> Manifest:
    """Write samples ({"key", "jpg", "txt", "json"}) to uniform shards and a manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: List[ShardInfo] = []
    writer: Optional[wds.TarWriter] = None
    langs: Counter = Counter()
    count = 0

    def close() -> None:
        if writer is not None:
            writer.close()
            shards.append(ShardInfo(path=f"{prefix}-{len(shards):05d}.tar", samples=count, languages=dict(langs)))

    for sample in samples:
        if writer is None or count == samples_per_shard:
            close()
            langs, count = Counter(), 0
            writer = wds.TarWriter(str(out_dir / f"{prefix}-{len(shards):05d}.tar"))
        writer.write({"__key__": sample["key"], "jpg": sample["jpg"], "txt": sample["txt"], "json": sample["json"]})
        langs[sample["json"].get("language", "und")] += 1
        count += 1
    close()
    manifest = Manifest(shards=shards, config_hash=config_hash, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    save_manifest(manifest, out_dir)
    return manifest


def save_manifest(manifest: Manifest, out_dir: Path) -> Path:
    data = asdict(manifest)
    data["num_samples"] = manifest.num_samples
    data["languages"] = manifest.languages
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    tmp.replace(path)
    return path


def load_manifest(path: Path) -> Manifest:
    """Read a manifest (or the folder holding one) and check every listed shard exists."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST} at {path}; run `sigscale curate` first or point data.shards at its output folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); re-run the curation merge step") from e
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
    shards = [ShardInfo(**s) for s in data["shards"]]
    missing = [s.path for s in shards if not (path.parent / s.path).is_file()]
    if missing:
        raise ManifestError(
            f"{len(missing)} shard(s) listed in {path} are missing, e.g. {missing[:3]}; "
            "re-run curation or restore the files"
        )
    if not shards:
        raise ManifestError(f"{path} lists no shards; the curated set is empty")
    return Manifest(shards=shards, config_hash=data.get("config_hash", ""), created=data.get("created", ""))


def shard_urls(manifest_path: Path) -> List[str]:
    """Absolute shard paths of a manifest, in manifest order."""
    folder = Path(manifest_path)
    folder = folder if folder.is_dir() else folder.parent
    return [str(folder / s.path) for s in load_manifest(folder).shards]
