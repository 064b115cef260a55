"""report.md of a curation run: where every row went, languages before and after, image sizes, with plots."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List


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
    if len(series) > 1:
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(stats: dict, out_dir: Path, plots: bool = True, name: str = "curation") -> Path:
    """Write report.md (and PNG plots beside it) from a stats.json dict; returns its path."""
    out_dir = Path(out_dir)
    n = stats["input_rows"]
    t = stats["timing"]
    before, after = stats["languages_before"], stats["languages_after"]
    sections = [
        f"# Curation report: {name}",
        f"{n} input rows -> **{stats['kept']} kept** ({100 * stats['kept'] / max(n, 1):.1f}%) in "
        f"{stats['shards']} shard(s); {stats['dropped_total']} dropped; kept + dropped = "
        f"{stats['kept'] + stats['dropped_total']} (input {n}). Config hash `{stats['config_hash']}`.",
        "## Drop reasons",
        _table(["reason", "rows", "% of input"],
               [[r, c, f"{100 * c / max(n, 1):.2f}"] for r, c in stats["dropped"].items()]),
        "## Languages",
        _table(["language", "after text stage", "final"],
               [[lang, before.get(lang, 0), after.get(lang, 0)] for lang in sorted(set(before) | set(after))]),
        "## Language ID: declared vs detected (text stage)",
        _table(["language", "rows", "kept", "dropped (language ID)", "dropped (other text)", "kept as another language",
                "examples (detected, confidence)"],
               [[lang, e["rows"], e["kept"], e["dropped_language"], e["dropped_other"], e["mismatched"],
                 "; ".join(f"{x['caption']!r} -> {x['detected']} {x['confidence']}" for x in e["examples"])]
                for lang, e in stats.get("language_id", {}).items()]),
        "## Downloaded images by shorter original side (px)",
        _table(["short side", "images"], [[k, v] for k, v in stats["short_side_histogram"].items()]),
        "## Throughput",
        _table(["stage", "seconds", "rate"], [
            ["plan (read, normalise, exact dedup)", t["plan_seconds"], ""],
            ["text filters", t["text_seconds"], f"{t['captions_per_second']} captions/s"],
            ["download (img2dataset)", t["download_seconds"], f"{t['images_per_second']} images/s"],
            ["image checks and hashes", t["image_seconds"], ""],
            ["finalize", t["finalize_seconds"], ""],
        ]),
    ]
    if plots:
        _bar(out_dir / "languages.png", {"after text stage": before, "final": after}, "Languages")
        _bar(out_dir / "drops.png", {"rows": stats["dropped"]}, "Drop reasons", horizontal=True)
        _bar(out_dir / "sizes.png", {"images": stats["short_side_histogram"]}, "Shorter side of downloaded images (px)")
        sections.insert(2, "![languages](languages.png) ![drop reasons](drops.png) ![image sizes](sizes.png)")
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
