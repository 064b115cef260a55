"""report.md and report.html of a curation run: where every row went, languages, images, settings, speed."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image


def _table(header: List[str], rows: List[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _bar(path: Path, series: Dict[str, Dict[str, int]], title: str, horizontal: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(dict.fromkeys(k for s in series.values() for k in s))
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(labels)) if horizontal else 3.5))
    pos = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for k, (name, counts) in enumerate(series.items()):
        values = [counts.get(label, 0) for label in labels]
        (ax.barh if horizontal else ax.bar)(pos + k * width, values, width, label=name)
    (ax.set_yticks if horizontal else ax.set_xticks)(pos + width * (len(series) - 1) / 2, labels)
    if not horizontal:  # long labels ("1024-2047") would run into each other level
        ax.tick_params(axis="x", labelrotation=45)
    if len(series) > 1:  # outside the axes, so it covers no bar
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _throughput_rows(stats: dict) -> List[list]:
    """[stage, seconds, rate] per pipeline stage."""
    t, n = stats["timing"], stats["input_rows"]
    return [["plan (read, normalise, partition the pair keys)", t["plan_seconds"], f"{n / max(t['plan_seconds'], 1e-9):.0f} rows/s"],
            ["text filters", t["text_seconds"], f"{t['captions_per_second']} captions/s"],
            ["download (img2dataset)", t["download_seconds"], f"{t['images_per_second']} images/s"],
            ["image checks and hashes", t["image_seconds"], ""],
            ["finalize (merge filters, balance, shards, reports)", t["finalize_seconds"], ""]]


def _language_id_rows(stats: dict, example: Callable[[dict], str]) -> List[list]:
    """The declared-vs-detected table's rows (one per language), examples written by ``example``."""
    return [[lang, e["rows"], e["kept"], e["undetermined"], e["dropped_language"], e["dropped_other"], e["mismatched"],
             "; ".join(example(x) for x in e["examples"])] for lang, e in stats.get("language_id", {}).items()]


def write_report(stats: dict, out_dir: Path, plots: bool = True, name: str = "curation",
                 samples: Optional[dict] = None) -> Path:
    """Write report.md (PNG plots beside it) and report.html from a stats.json dict; returns report.md's path.

    ``samples`` ({"kept": [(caption, language, jpg)], "dropped": {reason: [...]}}) fills the HTML's image grids.
    """
    out_dir = Path(out_dir)
    n = stats["input_rows"]
    before, after = stats["languages_before"], stats["languages_after"]
    sections = [
        f"# Curation report: {name}",
        f"{n} input rows -> **{stats['kept']} kept** ({100 * stats['kept'] / max(n, 1):.1f}%) in "
        f"{stats['shards']} shard(s); {stats['dropped_total']} dropped; kept + dropped = "
        f"{stats['kept'] + stats['dropped_total']} (input {n}). Config hash `{stats['config_hash']}`.",
        "## Funnel",
        _table(["step", "rows left"], stats.get("funnel", [])),
        "## Drop reasons",
        _table(["reason", "rows", "% of input"],
               [[r, c, f"{100 * c / max(n, 1):.2f}"] for r, c in stats["dropped"].items()]),
        "## Languages",
        _table(["language", "after text stage", "final"],
               [[lang, before.get(lang, 0), after.get(lang, 0)] for lang in sorted(set(before) | set(after))]),
        "## Language ID: declared vs detected (text stage)",
        _table(["language", "rows", "kept", "kept undetermined", "dropped (language ID)", "dropped (other text)",
                "kept as another language", "examples (detected, confidence)"],
               _language_id_rows(stats, lambda x: f"{x['caption']!r} -> {x['detected']} {x['confidence']}")),
        "## Downloaded images by shorter original side (px)",
        _table(["short side", "images"], [[k, v] for k, v in stats["short_side_histogram"].items()]),
        "## Throughput",
        _table(["stage", "seconds", "rate"], _throughput_rows(stats)),
    ]
    if plots:
        _bar(out_dir / "languages.png", {"after text stage": before, "final": after}, "Languages")
        _bar(out_dir / "drops.png", {"rows": stats["dropped"]}, "Drop reasons", horizontal=True)
        _bar(out_dir / "sizes.png", {"images": stats["short_side_histogram"]}, "Shorter side of downloaded images (px)")
        sections.insert(2, "![languages](languages.png) ![drop reasons](drops.png) ![image sizes](sizes.png)")
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    write_html(stats, out_dir, samples, name)
    return path


# report.html: one self-contained page. Bars are CSS widths with their label and value beside
# them (no legend to cover anything), images are base64 data: URIs, no script, font or request.
_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1a1a1a;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{background:#4c78a8;height:14px;display:inline-block;vertical-align:middle}.bar.drop{background:#e45756}
.grid{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:140px}figure img{width:128px;height:128px;
object-fit:contain;background:#eee;border:1px solid #ccc}figcaption{font-size:11px;word-wrap:break-word}
.muted{color:#666}"""
THUMB = 128  # px: the longer side of every embedded image


def _data_uri(jpg: bytes) -> str:
    """An image as a base64 JPEG data: URI, shrunk to THUMB px so the page stays small."""
    with Image.open(io.BytesIO(jpg)) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _html_table(header: Sequence[str], rows: Sequence[Sequence[object]], bar_col: Optional[int] = None,
                drop: bool = False) -> str:
    """An HTML table; with ``bar_col`` each row also gets a bar proportional to that column's number."""
    top = max([float(r[bar_col]) for r in rows] + [1.0]) if bar_col is not None else 1.0
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + ("<th></th>" if bar_col is not None else "")
    body = []
    for r in rows:
        cells = "".join(f'<td class="n">{c}</td>' if isinstance(c, (int, float)) else f"<td>{html.escape(str(c))}</td>"
                        for c in r)
        if bar_col is not None:
            width = int(round(300 * float(r[bar_col]) / top))
            cells += f'<td><span class="bar{" drop" if drop else ""}" style="width:{width}px"></span></td>'
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _grid(items: Sequence[Tuple[str, Optional[str], bytes]]) -> str:
    """Figures of (caption, language, jpg) with the caption under each image."""
    figs = []
    for caption, lang, jpg in items:
        label = html.escape(caption) + (f' <span class="muted">[{html.escape(lang)}]</span>' if lang else "")
        figs.append(f'<figure><img src="{_data_uri(jpg)}" alt="{html.escape(caption)}"><figcaption>{label}'
                    "</figcaption></figure>")
    return f'<div class="grid">{"".join(figs)}</div>'


def _language_sections(stats: dict) -> List[str]:
    """Languages before/after, drops by reason and language, declared vs detected."""
    before, after = stats["languages_before"], stats["languages_after"]
    by_lang = stats.get("dropped_by_language", {})
    langs = sorted({lang for counts in by_lang.values() for lang in counts})
    out = ["<h2>Languages</h2>", _html_table(["language", "after text stage", "final"],
                                             [[lang, before.get(lang, 0), after.get(lang, 0)]
                                              for lang in sorted(set(before) | set(after))], bar_col=2),
           "<h2>Drops by reason and language</h2>",
           _html_table(["reason", *langs], [[r, *[c.get(lang, 0) for lang in langs]] for r, c in by_lang.items()]),
           "<h2>Language ID: declared vs detected</h2>",
           '<p class="muted">Per declared language (detected where none is declared). "Undetermined" is a caption '
           'kept without a language (under the confidence threshold, no allow-list); "kept as another" is a caption '
           "the identifier read as another language than the list declares.</p>",
           _html_table(["language", "rows", "kept", "kept undetermined", "dropped by language ID",
                        "dropped by other text checks", "kept as another", "examples (caption → detected, confidence)"],
                       _language_id_rows(stats, lambda x: f"{x['caption']} → {x['detected']} {x['confidence']}"))]
    if stats.get("metadata_balance"):
        out += ["<h2>Concept balance (metadata entries)</h2>",
                _html_table(["language", "t", "entries", "entries matched", "captions", "matched", "kept",
                             "head entries: count → kept"],
                            [[lang, m["threshold"], m["entries"], m["entries_matched"], m["captions"],
                              m["captions_matched"], m["kept"], ", ".join(f"{e} {c} → {k}" for e, c, k in m["head"])]
                             for lang, m in stats["metadata_balance"].items()])]
    return out


def write_html(stats: dict, out_dir: Path, samples: Optional[dict] = None, name: str = "curation") -> Path:
    """Write report.html: funnel, drops, languages, sample images (embedded), thresholds, throughput."""
    n = stats["input_rows"]
    funnel = stats.get("funnel", [])
    parts = [f"<h1>Curation report: {html.escape(name)}</h1>",
             f"<p>{n} input rows → <b>{stats['kept']} kept</b> ({100 * stats['kept'] / max(n, 1):.1f}%) in "
             f"{stats['shards']} shard(s); {stats['dropped_total']} dropped. Config hash "
             f"<code>{html.escape(str(stats['config_hash']))}</code>.</p>",
             "<h2>Funnel</h2>",
             _html_table(["step", "rows left", "dropped here"],
                         [[step, left, (funnel[i - 1][1] - left) if i else 0] for i, (step, left) in enumerate(funnel)],
                         bar_col=1),
             "<h2>Drops by reason</h2>",
             _html_table(["reason", "rows", "% of input"],
                         [[r, c, round(100 * c / max(n, 1), 2)] for r, c in stats["dropped"].items()], bar_col=1, drop=True),
             *_language_sections(stats),
             "<h2>Downloaded images by shorter original side (px)</h2>",
             _html_table(["short side", "images"], [[k, v] for k, v in stats["short_side_histogram"].items()], bar_col=1)]
    samples = samples or {"kept": [], "dropped": {}}
    parts += ["<h2>Kept samples</h2>", _grid(samples["kept"]) if samples["kept"] else "<p>none</p>",
              "<h2>Dropped samples by reason</h2>",
              '<p class="muted">Reasons met before an image arrived (text checks, HTTP errors) have no image.</p>']
    for reason, items in samples["dropped"].items():
        parts += [f"<h3>{html.escape(reason)}: {stats['dropped'].get(reason, 0)} row(s)</h3>", _grid(items)]
    parts += ["<h2>Throughput</h2>", _html_table(["stage", "seconds", "rate"], _throughput_rows(stats)),
              "<h2>Thresholds and settings</h2>",
              _html_table(["setting", "value"], [[k, json.dumps(v, ensure_ascii=False)]
                                                 for k, v in stats.get("config", {}).items()])]
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Curation report: {html.escape(name)}'
            f"</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    path = Path(out_dir) / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
