"""The contract between stages: webdataset shards plus manifest.json.

A shard is a tar of samples ``<key>.jpg``, ``<key>.txt`` (the caption) and ``<key>.json``
(language, source URL, extra columns). ``manifest.json`` lists every shard with its sample count
and language counts, so training can check its input before it starts.
"""
from __future__ import annotations

from sigscale.core.errors import SigscaleError
import itertools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterable, List

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
    samples = iter(samples)
    while True:
        chunk = list(itertools.islice(samples, samples_per_shard))
        if not chunk:
            break
        shards.append(write_shard(chunk, out_dir, f"{prefix}-{len(shards):05d}.tar"))
    manifest = Manifest(shards=shards, config_hash=config_hash, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    save_manifest(manifest, out_dir)
    return manifest


def write_shard(samples: Iterable[dict], out_dir: Path, name: str) -> ShardInfo:
    """One shard tar of samples ({"key", "jpg", "txt", "json"}), written atomically; returns its manifest entry."""
    path = Path(out_dir) / name
    tmp = path.with_name(path.name + ".tmp")
    langs: Counter = Counter()
    count = 0
    with wds.TarWriter(str(tmp)) as writer:
        for sample in samples:
            writer.write({"__key__": sample["key"], "jpg": sample["jpg"], "txt": sample["txt"], "json": sample["json"]})
            langs[sample["json"].get("language", "und")] += 1
            count += 1
    tmp.replace(path)
    return ShardInfo(path=name, samples=count, languages=dict(langs))


def save_manifest(manifest: Manifest, out_dir: Path) -> Path:
    data = asdict(manifest)
    data["num_samples"] = manifest.num_samples
    data["languages"] = manifest.languages
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    tmp.replace(path)
    return path


def _shard_entry(manifest: Path, index: int, entry: object) -> ShardInfo:
    """One ``shards`` entry, checked: a path inside the manifest's folder and a sample count."""
    where = f"{manifest} shards[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ManifestError(f"{where} is {entry!r}, not an entry with a 'path'; re-run the curation merge step "
                            "or fix the entry by hand")
    rel = entry["path"]
    folder = manifest.parent.resolve()
    # Shards live beside their manifest: an absolute path or one that climbs out (../, a symlink) would let
    # a manifest make training open any file on the node.
    if Path(rel).is_absolute() or not (folder / rel).resolve().is_relative_to(folder):
        raise ManifestError(f"{where} path {rel!r} points outside the data folder {folder}; list shards by their "
                            "path relative to the manifest's folder and keep the files inside it")
    samples = entry.get("samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ManifestError(f"{where} ({rel}) has samples={samples!r}, not a count of samples; re-run the curation "
                            "merge step, or set it to the number of samples in that tar")
    unknown = sorted(set(entry) - {f.name for f in fields(ShardInfo)})
    if unknown:
        raise ManifestError(f"{where} ({rel}) has unknown field(s) {unknown}; a {FORMAT} entry has path, samples "
                            "and languages")
    return ShardInfo(**entry)


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
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != FORMAT:
        raise ManifestError(f"{path} has format {fmt!r}, expected {FORMAT!r}; point data.shards at a folder "
                            "that `sigscale curate` wrote")
    if not isinstance(data.get("shards"), list):
        raise ManifestError(f"{path} has no 'shards' list; re-run the curation merge step "
                            "(`sigscale curate --finalize`)")
    shards = [_shard_entry(path, i, entry) for i, entry in enumerate(data["shards"])]
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
