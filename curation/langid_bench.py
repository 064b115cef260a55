"""Language-ID benchmark: how many correct captions the text stage drops or mislabels, per language.

Generated captions in 20 languages (:func:`sigscale.curation.synthetic.language_id_set`: half full
captions, half the bare noun phrase) go through :func:`sigscale.curation.text_filters.filter_text`,
the pipeline's own code path, under several settings; a caption is "dropped" when it ends with a
language reason, "mislabelled" when it is kept under another language and "undetermined" when it
is kept without one (under the threshold with no allow-list).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from sigscale.curation import synthetic
from sigscale.core.procstat import peak_rss_mib
from sigscale.curation.config import TextConfig
from sigscale.curation.langid import UNDETERMINED, identifier
from sigscale.curation.text_filters import LANGUAGE_REASONS, filter_text

_BASE = TextConfig(min_chars=1, min_words=1, resolve_hosts=False)
# name -> (text config, whether the list declares each caption's language, declared = true or a wrong one)
SETTINGS = {
    "declared": (_BASE, "true"),
    "allow_list": (replace(_BASE, languages=list(synthetic.ALL_LANGUAGES)), None),
    "any": (_BASE, None),
    "any_flat": (replace(_BASE, confidence_chars=0), None),
    # main before issue #18: py3langid >= 0.5 alone, and every caption under it dropped; here
    # those are the undetermined ones, as nothing drops them without an allow-list now
    "before": (replace(_BASE, declared_prior=0.0, confidence_chars=0), None),
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
        labelled = got[mask].notna() & (got[mask] != UNDETERMINED)
        out[lang] = {"dropped": round(float(dropped[mask].mean()), 4),
                     "mislabelled": round(float((labelled & (got[mask] != lang)).mean()), 4),
                     "undetermined": round(float((got[mask] == UNDETERMINED).mean()), 4),
                     "correct": round(float((got[mask] == lang).mean()), 4)}
    return out


def _top1(data: List[tuple], identify) -> dict:
    """Per language: the share of captions whose most likely language (among all the identifier knows,
    no threshold, no prior) is right; and the identifier's seconds per caption."""
    t0 = time.perf_counter()
    labels = [identify(caption) for _, _, caption in data]
    seconds = time.perf_counter() - t0
    right = pd.Series([lang == label for (lang, _, _), label in zip(data, labels)])
    truth = pd.Series([lang for lang, _, _ in data])
    return {"correct": {lang: round(float(right[truth == lang].mean()), 4) for lang in synthetic.ALL_LANGUAGES},
            "ms_per_caption": round(1000 * seconds / len(data), 3)}


def _lingua_identifier():
    """lingua-language-detector (Rust; all its languages, high-accuracy mode): the issue's "stronger
    identifier from PyPI" candidate. An optional dependency: only this comparison needs it."""
    try:
        from lingua import LanguageDetectorBuilder
    except ImportError as e:
        raise SystemExit("bench langid --peer lingua needs `.venv/bin/pip install lingua-language-detector` "
                         f"(a 96 MB wheel, not a sigscale dependency): {e}")
    t0, rss0 = time.perf_counter(), peak_rss_mib()
    detector = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()
    load = {"load_seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib_added": peak_rss_mib() - rss0}

    def identify(caption: str) -> str:
        values = detector.compute_language_confidence_values(caption)
        return values[0].language.iso_code_639_1.name.lower() if values and values[0].value > 0 else UNDETERMINED
    return identify, load


def run_langid_bench(out_json: Optional[str | Path] = None, per_language: int = 200, seed: int = 0,
                     peer: Optional[str] = None) -> dict:
    """Per language and setting: shares of captions dropped, mislabelled and correct; written as JSON.
    With ``peer="lingua"`` also both identifiers' top-1 accuracy and speed on the same captions."""
    data = list(synthetic.language_id_set(per_language, seed))
    result = {"per_language": per_language, "seed": seed, "languages": list(synthetic.ALL_LANGUAGES),
              "short_share": 0.5, "min_confidence": _BASE.min_confidence,
              "declared_prior": _BASE.declared_prior, "confidence_chars": _BASE.confidence_chars,
              "settings": {name: _rates(data, cfg, declared) for name, (cfg, declared) in SETTINGS.items()}}
    if peer is not None:
        if peer != "lingua":
            raise SystemExit(f"bench langid --peer {peer}: unknown identifier; the one compared is lingua")
        ident = identifier()
        result["top1"] = {"py3langid": _top1(data, lambda c: ident.rank(c)[0][0])}
        identify, load = _lingua_identifier()
        result["top1"]["lingua"] = {**_top1(data, identify), **load}
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render_langid_markdown(result: dict) -> str:
    """The BENCHMARKS.md table: per language, % dropped / mislabelled (/ undetermined) in each setting."""
    s = result["settings"]
    was_dropped = {lang: v["undetermined"] + v["dropped"] for lang, v in s["before"].items()}
    header = ["language", "declared column: dropped / mislabelled %", "allow-list of the 20: dropped / mislabelled %",
              "any language: dropped / mislabelled / undetermined %",
              "any language, one threshold for every length: dropped / mislabelled / undetermined %",
              "before (py3langid >= 0.5 alone): dropped %", "wrong declaration: detected correctly %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for lang in result["languages"]:
        cells = [f"{_pct(s[k][lang]['dropped'])} / {_pct(s[k][lang]['mislabelled'])}" for k in ("declared", "allow_list")]
        cells += [f"{_pct(s[k][lang]['dropped'])} / {_pct(s[k][lang]['mislabelled'])} / {_pct(s[k][lang]['undetermined'])}"
                  for k in ("any", "any_flat")]
        cells += [_pct(was_dropped[lang]), _pct(s["wrong_declared"][lang]["correct"])]
        lines.append("| " + " | ".join([lang, *cells]) + " |")
    worst = {k: max(v["dropped"] for v in s[k].values()) for k in s if k != "before"}
    worst["before"] = max(was_dropped.values())
    lines.append("")
    lines.append(f"{result['per_language']} captions per language (half the bare noun phrase), seed {result['seed']}; "
                 f"text.min_confidence {result['min_confidence']}, text.declared_prior {result['declared_prior']}, "
                 f"text.confidence_chars {result['confidence_chars']}. Worst language dropped: "
                 + ", ".join(f"{k} {_pct(v)}%" for k, v in worst.items()) + ".")
    if "top1" in result:
        lines += ["", _render_top1(result)]
    return "\n".join(lines)


def _render_top1(result: dict) -> str:
    """The identifiers side by side: top-1 right % per language, then the worst language and the speed."""
    names = list(result["top1"])
    lines = ["| language | " + " | ".join(f"{n}: top-1 right %" for n in names) + " |", "|" + "---|" * (len(names) + 1)]
    for lang in result["languages"]:
        lines.append(f"| {lang} | " + " | ".join(_pct(result["top1"][n]["correct"][lang]) for n in names) + " |")
    worst = {n: min(result["top1"][n]["correct"].items(), key=lambda kv: kv[1]) for n in names}
    lines += ["", "Worst language: " + ", ".join(f"{n} {lang} {_pct(v)}%" for n, (lang, v) in worst.items())
              + ". Per caption: " + ", ".join(f"{n} {result['top1'][n]['ms_per_caption']} ms" for n in names)
              + f"; lingua's models load in {result['top1']['lingua']['load_seconds']} s and add "
              f"{result['top1']['lingua']['peak_rss_mib_added']:,.0f} MiB to the process's peak RSS (py3langid's model: 4.5 MB)."]
    return "\n".join(lines)
