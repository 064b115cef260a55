"""Published results of other models, kept as data (``eval/references.json``), and which may stand beside a run.

Each entry names a benchmark, the protocol id its numbers were measured under (one the registry
declares for that benchmark), a metric, a language (null: the benchmark's headline number, the
mean over languages or all pairs), the value in %, the model and its resolution, the number of
images of the evaluated set, and a source: an id into the file's ``sources`` (repository, path,
commit, URL, and the column the number was read from). Nothing here was typed from memory.

A published number stands beside a run's number only when benchmark, protocol id, metric,
language and image count all agree: XM3600 first-caption numbers (CLIP_benchmark) never sit beside
all-caption ones (SigLIP paper), and a 120-image synthetic set in XM3600 format never sits beside
the 3600-image original.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sigscale.eval.registry import BENCHMARKS, lookup
from sigscale.eval.sources import EvalDataError

FORMAT = "sigscale-references/1"
REFERENCES_FILE = Path(__file__).with_name("references.json")
SOURCE_KEYS = ("title", "url")


class ReferenceError(EvalDataError):
    """The published-results file is missing or malformed."""


@dataclass(frozen=True)
class Reference:
    """One published number of another model."""

    benchmark: str
    protocol: str
    metric: str
    language: Optional[str]
    value: float
    model: str
    resolution: int
    images: int
    source: str
    column: str = ""  # where in the source the number stands (a CSV column, a table cell)


@dataclass(frozen=True)
class References:
    results: Tuple[Reference, ...]
    sources: Dict[str, Dict[str, str]]

    def url(self, ref: Reference) -> str:
        return self.sources[ref.source]["url"]


_TYPES = {"benchmark": str, "protocol": str, "metric": str, "value": (int, float), "model": str,
          "resolution": int, "images": int, "source": str, "column": str}


def _entry(raw: Any, i: int, path: Path, sources: Dict[str, Dict[str, str]]) -> Reference:
    where = f"{path} results[{i}]"
    if not isinstance(raw, dict):
        raise ReferenceError(f"{where} is {type(raw).__name__}, not an object; restore the file from git")
    names = {f.name for f in fields(Reference)}
    unknown, missing = set(raw) - names, names - set(raw) - {"column"}
    if unknown or missing:
        what = ", ".join(f"{k} keys {sorted(v)}" for k, v in (("missing", missing), ("unknown", unknown)) if v)
        raise ReferenceError(f"{where}: {what}; each entry has the keys {sorted(names)}")
    for key, kind in _TYPES.items():
        if key in raw and not isinstance(raw[key], kind):
            raise ReferenceError(f"{where}: {key}={raw[key]!r} must be {getattr(kind, '__name__', 'a number')}")
    if raw["language"] is not None and not isinstance(raw["language"], str):
        raise ReferenceError(f"{where}: language must be a code or null (the headline number)")
    bench = BENCHMARKS.get(raw["benchmark"])
    if bench is None:
        raise ReferenceError(f"{where}: benchmark {raw['benchmark']!r} is not in the registry ({sorted(BENCHMARKS)})")
    if raw["protocol"] not in bench.protocol_ids or raw["metric"] not in bench.metrics:
        raise ReferenceError(f"{where}: {raw['benchmark']} runs protocols {list(bench.protocol_ids)} and reports "
                             f"{list(bench.metrics)}; {raw['protocol']!r}/{raw['metric']!r} is not among them")
    if raw["source"] not in sources:
        raise ReferenceError(f"{where}: source {raw['source']!r} is not in the file's sources {sorted(sources)}")
    if not 0 <= raw["value"] <= 100 or raw["images"] <= 0:
        raise ReferenceError(f"{where}: value {raw['value']} must be a % in [0, 100] and images > 0")
    return Reference(**raw)


def load_references(path: Optional[Path] = None) -> References:
    """The published results in ``path`` (default: the checked-in eval/references.json), every entry checked."""
    p = Path(path) if path else REFERENCES_FILE
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ReferenceError(f"published-results file {p} does not exist; restore eval/references.json") from e
    except json.JSONDecodeError as e:
        raise ReferenceError(f"{p} is not valid JSON ({e}); restore it from git") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ReferenceError(f"{p} is not a {FORMAT} file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    sources = doc.get("sources", {})
    bad = [k for k, v in sources.items() if not isinstance(v, dict) or any(not v.get(f) for f in SOURCE_KEYS)]
    if bad:
        raise ReferenceError(f"{p}: sources {bad} need {list(SOURCE_KEYS)}: say where each number was read")
    return References(tuple(_entry(r, i, p, sources) for i, r in enumerate(doc.get("results", []))), sources)


def base_name(name: str) -> str:
    """The registry entry of a benchmark name (``clipbench:PATH`` -> ``clipbench``)."""
    return lookup(name)[0].name if ":" in name else name


def beside(refs: References, name: str, result: Dict[str, Any], metric: str,
           language: Optional[str] = None) -> List[Reference]:
    """The published numbers comparable with ``result[metric]`` (or its ``language`` entry)."""
    bench = base_name(name)
    return [r for r in refs.results
            if r.benchmark == bench and r.protocol == result.get("protocol_id") and r.metric == metric
            and r.language == language and r.images == result.get("images")]


def hidden(refs: References, name: str, result: Dict[str, Any]) -> str:
    """Why published results of this benchmark, if there are any, are not set beside this run ('' if none hide)."""
    bench = base_name(name)
    others = [r for r in refs.results if r.benchmark == bench
              and (r.protocol != result.get("protocol_id") or r.images != result.get("images"))]
    if not others:
        return ""
    kinds = sorted({(r.protocol, r.images) for r in others})
    where = ", ".join(f"protocol {p} on {n} images" for p, n in kinds)
    return (f"{len(others)} published results for {bench} ({where}) are not shown: this run used protocol "
            f"{result.get('protocol_id')} on {result.get('images')} images")
