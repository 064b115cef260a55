"""Report views across benchmarks: the languages view, and published results of other models beside a run.

A view is ``(title, rows with header first, note, kind)``; ``kind`` "published" marks tables that
hold other models' numbers, which the Markdown and HTML pages label as such; "view" a table across benchmarks.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sigscale.eval.references import References, base_name, beside

PUBLISHED = "published"
VIEW = "view"  # a table across benchmarks: its note is no protocol
# XTD10 names its Japanese file "jp" (STAIR captions); everywhere else Japanese is ISO 639-1 "ja".
LANGUAGE_ALIASES = {"jp": "ja"}
RETRIEVAL_PAIR = (("i2t_r@1", "I→T R@1"), ("t2i_r@1", "T→I R@1"))

View = Tuple[str, List[List[Any]], str, str]


def language_key(code: str) -> str:
    """One code per language across benchmarks: Babel-ImageNet's "EN" and XTD10's "jp" meet XM3600's "en", "ja"."""
    code = code.lower()
    return LANGUAGE_ALIASES.get(code, code)


def _columns(benchmarks: Dict[str, Dict]) -> List[Tuple[str, str, str]]:
    """(benchmark, metric, column title) for every multilingual benchmark of a record."""
    cols = []
    for name, res in benchmarks.items():
        per_lang = res.get("languages") or {}
        if not per_lang:
            continue
        first = next(iter(per_lang.values()))
        pairs = RETRIEVAL_PAIR if "i2t_r@1" in first else (("top1", "zero-shot top-1"),)
        cols += [(name, metric, f"{name} {title}") for metric, title in pairs]
    return cols


def languages_view(record: Dict[str, Any]) -> Optional[Tuple[List[str], List[List[Any]]]]:
    """Per language (rows) the zero-shot top-1 and I→T / T→I R@1 of every multilingual benchmark; None if none."""
    benchmarks = record.get("benchmarks", {})
    cols = _columns(benchmarks)
    if not cols:
        return None
    table: Dict[str, Dict[str, float]] = {}
    for name, metric, title in cols:
        for code, stats in benchmarks[name]["languages"].items():
            table.setdefault(language_key(code), {})[title] = stats[metric]
    header = ["language"] + [title for _, _, title in cols]
    return header, [[lang] + [table[lang].get(t) for t in header[1:]] for lang in sorted(table)]


def _source_note(refs: References, used: Sequence[Any]) -> str:
    ids = sorted({r.source for r in used})
    return " Sources: " + "; ".join(f"[{i}] {refs.sources[i]['title']}, {refs.sources[i]['url']}" for i in ids)


def _note(name: str, result: Dict[str, Any], refs: References, used: Sequence[Any]) -> str:
    return (f"PUBLISHED RESULTS OF OTHER MODELS, trained at far larger scale on other data; not this run. Shown because "
            f"benchmark ({base_name(name)}), protocol ({result.get('protocol_id')}), metric and the number of "
            f"evaluated images ({result.get('images')}) match." + _source_note(refs, used))


def _headline_view(name: str, result: Dict[str, Any], refs: References, run: Tuple[str, str]) -> Optional[View]:
    stats = result.get("mean") or result.get("all") or result
    metrics = [m for m in stats if isinstance(stats.get(m), float) and beside(refs, name, result, m)]
    if not metrics:
        return None
    models: Dict[Tuple[str, int, str], Dict[str, float]] = {}
    for m in metrics:
        for r in beside(refs, name, result, m):
            models.setdefault((r.model, r.resolution, r.source), {})[m] = r.value
    rows = [[f"this run: {run[0]}", run[1], ""] + [stats[m] for m in metrics] + [""]]
    rows += [["published", model, res] + [vals.get(m) for m in metrics] + [f"[{src}]"]
             for (model, res, src), vals in models.items()]
    used = [r for m in metrics for r in beside(refs, name, result, m)]
    what = "mean over languages" if "mean" in result else "all pairs" if "all" in result else "top-k"
    return (f"{name}: this run beside published results of other models ({what})",
            [["", "model", "resolution"] + metrics + ["source"]] + rows, _note(name, result, refs, used), PUBLISHED)


def _language_view(name: str, result: Dict[str, Any], refs: References) -> Optional[View]:
    per_lang = result.get("languages") or {}
    metrics = [m for m, _ in RETRIEVAL_PAIR] if "i2t_r@1" in next(iter(per_lang.values()), {}) else ["top1"]
    found = {(lang, m): beside(refs, name, result, m, lang) for lang in per_lang for m in metrics}
    models = sorted({(r.model, r.source) for rs in found.values() for r in rs})
    if not models:
        return None
    header = ["language"] + [f"this run {m}" for m in metrics] + [f"{model} {m}" for model, _ in models for m in metrics]
    rows = []
    for lang in sorted(per_lang):
        published = [next((r.value for r in found[(lang, m)] if r.model == model), None)
                     for model, _ in models for m in metrics]
        rows.append([lang] + [per_lang[lang][m] for m in metrics] + published)
    used = [r for rs in found.values() for r in rs]
    return (f"{name} per language: this run beside published results of other models", [header] + rows,
            _note(name, result, refs, used), PUBLISHED)


def published_views(name: str, result: Dict[str, Any], refs: References, run: Tuple[str, str]) -> List[View]:
    """The published-results tables for one benchmark result (none when nothing comparable is published).

    ``run``: the run's label and model description, for the row that holds this run's numbers.
    """
    views = [_headline_view(name, result, refs, run), _language_view(name, result, refs)]
    return [v for v in views if v is not None]


def languages_heatmap(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str, figure, png) -> bytes:
    """The languages view as a heatmap with the numbers written in; a language a benchmark lacks stays blank."""
    import numpy as np

    values = np.array([[math.nan if v is None else v for v in r[1:]] for r in rows], dtype=float)
    fig, ax = figure(max(6.0, 1.5 * len(header) + 1.5), max(2.5, 0.32 * len(rows) + 1.6))
    masked = np.ma.masked_invalid(values)
    im = ax.imshow(masked, cmap="viridis", aspect="auto", vmin=0, vmax=max(1.0, np.nanmax(values) if values.size else 1))
    ax.set_xticks(range(len(header) - 1), [h.replace(" ", "\n", 1) for h in header[1:]], fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.xaxis.tick_top()
    for i, r in enumerate(values):
        for j, v in enumerate(r):
            text = "—" if math.isnan(v) else f"{v:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="black" if math.isnan(v) or v > 0.6 * masked.max() else "white")
    fig.colorbar(im, ax=ax, label="%", fraction=0.04)
    ax.set_title(title, fontsize=9, pad=28)
    return png(fig)
