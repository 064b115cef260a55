"""The text stage, before any download: normalise captions, check URLs, identify languages.

Each check that fails names the row's drop reason; a row gets the first reason in the order of
:data:`TEXT_REASONS`, so every dropped row is counted exactly once.

Language identification is py3langid (offline, a 4.5 MB model inside the package). On the
generated 9-language captions it picks the right language for 94.6% with all 97 languages
and 100% restricted to the 9 (3000 captions, measured here); so with an allow-list the
decision is made among the allowed languages, whose probabilities are renormalised as
py3langid's ``set_languages`` does, and a caption counts as foreign only when the allowed
languages together hold less than ``FOREIGN_MASS`` of the full model's probability (at 0.05:
0.1% of allowed captions flagged, 100% of those from excluded languages caught, measured here).
A declared language column weighs in as a prior (``langid.decide``) and short captions face a
lower threshold (:func:`confidence_thresholds`); under it a caption is dropped when
``text.languages`` is set and kept as undetermined ("und") when it is not. ``sigscale bench
langid`` measures all of it on 20 languages.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import pandas as pd

from sigscale.curation.config import TextConfig
from sigscale.curation.langid import UNDETERMINED, declared_code, decide, identifier
from sigscale.curation.url_policy import (
    URL_INVALID, URL_PRIVATE, URL_UNRESOLVABLE, UrlPolicy, host_verdict, normalize_host, resolve, split_url,
)

FOREIGN_MASS = 0.05
# Drop reasons of the text stage (stats.json counts each row under exactly one); the URL ones are
# url_policy's, which the fetch gateway applies to every download hop as well.
CAPTION_EMPTY = "caption_empty"
DUPLICATE_URL_CAPTION = "duplicate_url_caption"
BLOCKED_DOMAIN = "blocked_domain"
BLOCKED_PATTERN = "blocked_pattern"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
LANGUAGE_NOT_ALLOWED = "language_not_allowed"
LANGUAGE_LOW_CONFIDENCE = "language_low_confidence"
TEXT_REASONS = (URL_INVALID, CAPTION_EMPTY, DUPLICATE_URL_CAPTION, BLOCKED_DOMAIN, BLOCKED_PATTERN, CAPTION_TOO_SHORT, CAPTION_TOO_LONG, LANGUAGE_NOT_ALLOWED, LANGUAGE_LOW_CONFIDENCE, URL_UNRESOLVABLE, URL_PRIVATE)
# Scripts written without spaces between words: Han, kana, Thai, Lao, Myanmar, Khmer.
_NO_SPACE = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
_TOKENS = re.compile(f"[{_NO_SPACE}]+|[^\\s{_NO_SPACE}]+")
_NO_SPACE_RUN = re.compile(f"[{_NO_SPACE}]+")
_SPACES = re.compile(r"[\s\u200b\u2028\u2029\ufeff]+")
# C0 controls but tab/newline/CR (whitespace, collapsed below), DEL and C1 controls; NUL included.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f]")
# Bidirectional formatting (embeddings, overrides, isolates, marks): they reorder what a reader
# sees without being text ("Trojan Source", CVE-2021-42574), so training captions never carry them.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
CLEANED = ("control_characters", "bidi_controls")
LANGUAGE_REASONS = (LANGUAGE_NOT_ALLOWED, LANGUAGE_LOW_CONFIDENCE)
MISMATCH_EXAMPLES = 3  # detected != declared examples kept per language in the stats


def normalize_caption(text: object) -> Optional[str]:
    """Unicode NFC, control and bidi formatting characters removed, whitespace runs collapsed; None for no text."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    text = _BIDI.sub("", _CONTROL.sub("", unicodedata.normalize("NFC", str(text))))
    text = _SPACES.sub(" ", text).strip()
    return text or None


def cleaned_counts(captions: Iterable[object]) -> Dict[str, int]:
    """How many captions :func:`normalize_caption` removes control or bidi formatting characters from."""
    counts = dict.fromkeys(CLEANED, 0)
    for text in captions:
        if isinstance(text, str):
            counts["control_characters"] += bool(_CONTROL.search(text))
            counts["bidi_controls"] += bool(_BIDI.search(text))
    return counts


def count_words(text: str) -> int:
    """Words of a caption; a run of n characters of a script without spaces counts ceil(n/2)."""
    n = 0
    for token in _TOKENS.findall(text):
        if _NO_SPACE_RUN.fullmatch(token):
            n += (len(token) + 1) // 2  # Chinese words average under two characters
        elif any(ch.isalnum() for ch in token):
            n += 1
    return n


def identify_languages(captions: Iterable[str], allowed: Iterable[str] = (), declared: Iterable[Optional[str]] = (),
                       declared_prior: float = 0.0) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """Per caption: best language (among ``allowed`` if given), its confidence, and the allowed mass.

    ``declared`` (one code or None per caption) weighs in with ``declared_prior`` as
    :func:`sigscale.curation.langid.decide` says; the confidence is the probability renormalised
    over the allowed languages, the mass that of all allowed languages together.
    """
    ident = identifier()
    allowed = set(allowed)
    captions = list(captions)
    declared = list(declared) or [None] * len(captions)
    langs: List[str] = []
    confs, masses = [], []
    for text, decl in zip(captions, declared):
        lang, conf, mass = decide(ident.rank(text), allowed, declared_code(decl), declared_prior)
        langs.append(lang)
        confs.append(conf)
        masses.append(mass)
    return langs, np.asarray(confs, dtype=np.float64), np.asarray(masses, dtype=np.float64)


def confidence_thresholds(languages: pd.Series, captions: pd.Series, cfg: TextConfig) -> pd.Series:
    """Per row: the language's threshold, scaled down for captions under ``text.confidence_chars`` characters.

    A caption of n characters offers few n-grams, so even a correct identification is spread
    over close languages: the threshold falls linearly with length (measured by ``sigscale bench
    langid``), while a caption without evidence for any one language still falls under it.
    """
    base = languages.map(lambda lang: cfg.language_thresholds.get(lang, cfg.min_confidence)).astype(np.float64)
    if cfg.confidence_chars <= 0:
        return base
    return base * np.minimum(1.0, captions.str.len().astype(np.float64) / cfg.confidence_chars)


def _host(url: object) -> Optional[str]:
    """Normalised host of a URL the policy lets us fetch (http(s), well formed), else None."""
    target = split_url(url)
    return target.host if target else None


def host_verdicts(hosts: Iterable[str], cfg: TextConfig) -> Dict[str, Optional[str]]:
    """Drop reason per host (URL_PRIVATE, URL_UNRESOLVABLE, URL_INVALID) or None when it may be fetched.

    The decision is ``url_policy.host_verdict``'s, the same the fetch gateway applies to every hop
    at download time; resolving names here (in threads, when ``text.resolve_hosts``) only saves
    fetch attempts. Numeric spellings (``2130706433``, ``127.1``) are addresses either way.
    """
    hosts = sorted(set(hosts))
    policy = UrlPolicy.from_config(cfg)
    # Nothing a name resolves to can be refused when private ranges are allowed and none is refused.
    resolver = resolve if cfg.resolve_hosts and (policy.refused or not policy.allow_private) else None

    def verdict(host: str) -> Optional[str]:
        normal = normalize_host(host)
        return URL_INVALID if normal is None else host_verdict(normal, policy, resolver)[0]

    with ThreadPoolExecutor(32) as pool:
        return dict(zip(hosts, pool.map(verdict, hosts)))


def normalize_rows(df: pd.DataFrame) -> pd.Series:
    """Normalise captions in place (original kept as caption_original); return the row-local drop
    reasons: invalid URLs and captions empty after normalisation."""
    df["caption_original"] = df["caption"]
    df["caption"] = [normalize_caption(c) for c in df["caption"]]
    reason = pd.Series(None, index=df.index, dtype=object)
    reason[[_host(u) is None for u in df["url"]]] = URL_INVALID
    reason[df["caption"].isna() & reason.isna()] = CAPTION_EMPTY
    return reason


# Two keys of pandas' SipHash: 128 bits per (url, caption), so that among 10^10 rows the chance of one
# false duplicate stays below 10^-18 (one 64-bit hash would collide with probability ~0.93 there).
_PAIR_KEYS = ("sigscale-pair-k1", "sigscale-pair-k2")


def pair_keys(df: pd.DataFrame) -> Tuple[np.ndarray, np.ndarray]:
    """Two uint64 hashes of each row's (stripped url, normalised caption): equal pairs, equal keys."""
    pairs = pd.DataFrame({"u": df["url"].astype(str).str.strip(), "c": df["caption"]}, index=df.index)
    return tuple(pd.util.hash_pandas_object(pairs, index=False, hash_key=k).to_numpy(np.uint64) for k in _PAIR_KEYS)


def later_copies(rows: np.ndarray, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
    """Boolean mask over ``rows``: True where an equal key has a smaller row (the later copies)."""
    order = np.lexsort((rows, k2, k1))  # by key, then row: the first of each run is its smallest row
    s1, s2 = k1[order], k2[order]
    later = np.zeros(len(rows), bool)
    later[order[1:]] = (s1[1:] == s1[:-1]) & (s2[1:] == s2[:-1])
    return later


def filter_text(df: pd.DataFrame, cfg: TextConfig) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Apply the per-row text checks; return (kept rows with language columns, drops as row/reason)."""
    reason = pd.Series(None, index=df.index, dtype=object)
    hosts = pd.Series([_host(u) for u in df["url"]], index=df.index, dtype=object)
    if cfg.blocked_domains:
        blocked = [d.lower().strip(".") for d in cfg.blocked_domains]
        hit = hosts.map(lambda h: any(h == d or h.endswith("." + d) for d in blocked))
        reason[hit & reason.isna()] = BLOCKED_DOMAIN
    if cfg.blocked_patterns:
        rx = re.compile("|".join(f"(?:{p})" for p in cfg.blocked_patterns))
        hit = [bool(rx.search(u) or rx.search(c)) for u, c in zip(df["url"], df["caption"])]
        reason[pd.Series(hit, index=df.index) & reason.isna()] = BLOCKED_PATTERN
    chars = df["caption"].str.len()
    words = df["caption"].map(count_words)
    reason[((chars < cfg.min_chars) | (words < cfg.min_words)) & reason.isna()] = CAPTION_TOO_SHORT
    reason[((chars > cfg.max_chars) | (words > cfg.max_words)) & reason.isna()] = CAPTION_TOO_LONG

    todo = reason.isna()
    language = pd.Series(None, index=df.index, dtype=object)
    confidence = pd.Series(np.nan, index=df.index, dtype=np.float64)
    if cfg.trust_language_col:
        language[todo] = df.loc[todo, "declared_language"].fillna(UNDETERMINED)
        confidence[todo] = 1.0
        if cfg.languages:
            reason[todo & ~language.isin(cfg.languages)] = LANGUAGE_NOT_ALLOWED
    else:
        langs, confs, masses = identify_languages(df.loc[todo, "caption"], cfg.languages,
                                                  df.loc[todo, "declared_language"], cfg.declared_prior)
        language[todo] = langs
        confidence[todo] = confs
        foreign = pd.Series(False, index=df.index)
        foreign[todo] = masses < FOREIGN_MASS
        reason[foreign & reason.isna()] = LANGUAGE_NOT_ALLOWED
    unsure = (confidence < confidence_thresholds(language, df["caption"].fillna(""), cfg)) & reason.isna()
    if cfg.languages:
        reason[unsure] = LANGUAGE_LOW_CONFIDENCE
    else:
        language[unsure] = UNDETERMINED  # any language goes: kept, but no language is claimed for it

    todo = reason.isna()
    verdicts = host_verdicts(hosts[todo], cfg)
    reason[todo] = hosts[todo].map(verdicts)

    kept = df.assign(language=language, language_confidence=confidence)[reason.isna()]
    drops = pd.DataFrame({"row": df.loc[reason.notna(), "row"].to_numpy(dtype=np.int64),
                          "reason": reason[reason.notna()].to_numpy(dtype=object)})
    return kept.reset_index(drop=True), drops


def language_outcomes(rows: pd.DataFrame, kept: pd.DataFrame, drops: pd.DataFrame) -> Dict[str, dict]:
    """Per declared language (detected where none is declared, "und" for a drop without one): rows,
    kept, kept as undetermined, dropped by language ID, dropped for other text reasons, kept as
    another language (an undetermined caption does not contradict its declaration), examples."""
    reasons = drops.set_index("row")["reason"]
    detected = kept.set_index("row")[["language", "language_confidence"]]
    out: Dict[str, dict] = {}
    for row, caption, decl in zip(rows["row"], rows["caption"], rows["declared_language"]):
        code = declared_code(decl)
        found = row in detected.index
        lang = detected.at[row, "language"] if found else None
        entry = out.setdefault(code or lang or UNDETERMINED, {
            "rows": 0, "kept": 0, "undetermined": 0, "dropped_language": 0, "dropped_other": 0, "mismatched": 0,
            "examples": []})
        entry["rows"] += 1
        if not found:
            entry["dropped_language" if reasons.get(row) in LANGUAGE_REASONS else "dropped_other"] += 1
            continue
        entry["kept"] += 1
        entry["undetermined"] += int(lang == UNDETERMINED)
        if code is not None and lang not in (code, UNDETERMINED):
            entry["mismatched"] += 1
            if len(entry["examples"]) < MISMATCH_EXAMPLES:
                entry["examples"].append({"caption": caption, "declared": code, "detected": lang,
                                          "confidence": round(float(detected.at[row, "language_confidence"]), 3)})
    return dict(sorted(out.items()))


def merge_language_outcomes(tables: Iterable[Dict[str, dict]]) -> Dict[str, dict]:
    """Sum per-part :func:`language_outcomes` tables (examples: the first few over all parts)."""
    out: Dict[str, dict] = {}
    for table in tables:
        for lang, entry in table.items():
            total = out.setdefault(lang, {k: ([] if k == "examples" else 0) for k in entry})
            for key, value in entry.items():
                total[key] = (total[key] + value)[:MISMATCH_EXAMPLES] if key == "examples" else total[key] + value
    return dict(sorted(out.items()))


def reasons_by_language(drops: pd.DataFrame, language: pd.Series) -> Dict[str, Dict[str, int]]:
    """{reason: {language: rows}} of a drops frame (row, reason); rows without a language count as "und"."""
    langs = language.reindex(drops["row"].to_numpy()).fillna(UNDETERMINED).to_numpy(object)
    out: Dict[str, Counter] = {}
    for reason, lang in zip(drops["reason"], langs):
        out.setdefault(reason, Counter())[lang] += 1
    return {reason: dict(sorted(c.items())) for reason, c in sorted(out.items())}


def sum_counts(tables: Iterable[Dict[str, Dict[str, int]]]) -> Dict[str, Dict[str, int]]:
    """Sum {reason: {language: rows}} tables (:func:`reasons_by_language`'s) over tasks."""
    out: Dict[str, Counter] = {}
    for table in tables:
        for key, counts in table.items():
            out.setdefault(key, Counter()).update(counts)
    return {key: dict(sorted(c.items())) for key, c in sorted(out.items())}
