"""Language-ID benchmark: how many correct captions the text stage drops or mislabels, per language.

Generated captions in 20 languages (:func:`sigscale.curation.synthetic.language_id_set`: half full
captions, half the bare noun phrase) go through :func:`sigscale.curation.text_filters.filter_text`,
the pipeline's own code path, under several settings; a caption is "dropped" when it ends with a
language reason and "mislabelled" when it is kept under another language.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from sigscale.curation import synthetic
from sigscale.curation.config import TextConfig
from sigscale.curation.text_filters import LANGUAGE_REASONS, filter_text

_BASE = TextConfig(min_chars=1, min_words=1, resolve_hosts=False)
# name -> (text config, whether the list declares each caption's language, declared = true or a wrong one)
SETTINGS = {
    "declared": (_BASE, "true"),
    "allow_list": (replace(_BASE, languages=list(synthetic.ALL_LANGUAGES)), None),
    "any": (_BASE, None),
    "before": (replace(_BASE, declared_prior=0.0, confidence_chars=0), None),  # py3langid >= 0.5 alone
    "wrong_declared": (_BASE, "wrong"),
}


def _frame(data: List[tuple], declared: Optional[str]) -> pd.DataFrame:
    langs = [lang for lang, _, _ in data]
    order = list(synthetic.ALL_LANGUAGES)
    wrong = [order[(order.index(lang) + 1) % len(order)] for lang in langs]  # a deliberately wrong declaration
    return pd.DataFrame({"row": np.arange(len(data), dtype=np.int64),
                         "url": [f"http://h{i}.example/x.jpg" for i in range(len(data))],
                         "caption": [c for _, _, c in data],
                         "declared_language": {"true": langs, "wrong": wrong}.get(declared, [None] * len(data)),
                         "extras": "{}"})


def _rates(data: List[tuple], cfg: TextConfig, declared: Optional[str]) -> Dict[str, Dict[str, float]]:
    kept, drops = filter_text(_frame(data, declared), cfg)
    truth = pd.Series([lang for lang, _, _ in data])
    got = pd.Series(None, index=truth.index, dtype=object)
    got[kept["row"].to_numpy()] = kept["language"].to_numpy()
    dropped = pd.Series(False, index=truth.index)
    dropped[drops.loc[drops["reason"].isin(LANGUAGE_REASONS), "row"].to_numpy()] = True
    out = {}
    for lang in synthetic.ALL_LANGUAGES:
        mask = truth == lang
        out[lang] = {"dropped": round(float(dropped[mask].mean()), 4),
                     "mislabelled": round(float((got[mask].notna() & (got[mask] != lang)).mean()), 4),
                     "correct": round(float((got[mask] == lang).mean()), 4)}
    return out


def run_langid_bench(out_json: Optional[str | Path] = None, per_language: int = 200, seed: int = 0) -> dict:
    """Per language and setting: shares of captions dropped, mislabelled and correct; written as JSON."""
    data = list(synthetic.language_id_set(per_language, seed))
    result = {"per_language": per_language, "seed": seed, "languages": list(synthetic.ALL_LANGUAGES),
              "short_share": 0.5, "min_confidence": _BASE.min_confidence,
              "declared_prior": _BASE.declared_prior, "confidence_chars": _BASE.confidence_chars,
              "settings": {name: _rates(data, cfg, declared) for name, (cfg, declared) in SETTINGS.items()}}
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render_langid_markdown(result: dict) -> str:
    """The BENCHMARKS.md table: per language, % dropped / % mislabelled in each setting."""
    s = result["settings"]
    header = ["language", "declared column: dropped / mislabelled %", "allow-list of the 20: dropped / mislabelled %",
              "any language: dropped / mislabelled %", "before (py3langid >= 0.5): dropped / mislabelled %",
              "wrong declaration: detected correctly %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for lang in result["languages"]:
        cells = [f"{_pct(s[k][lang]['dropped'])} / {_pct(s[k][lang]['mislabelled'])}"
                 for k in ("declared", "allow_list", "any", "before")]
        lines.append("| " + " | ".join([lang, *cells, _pct(s["wrong_declared"][lang]["correct"])]) + " |")
    worst = {k: max(v["dropped"] for v in s[k].values()) for k in s}
    lines.append("")
    lines.append(f"{result['per_language']} captions per language (half the bare noun phrase), seed {result['seed']}; "
                 f"text.min_confidence {result['min_confidence']}, text.declared_prior {result['declared_prior']}, "
                 f"text.confidence_chars {result['confidence_chars']}. Worst language dropped: "
                 + ", ".join(f"{k} {_pct(v)}%" for k, v in worst.items()) + ".")
    return "\n".join(lines)
