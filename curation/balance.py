"""Language balance of the final shards: per-language caps or temperature sampling.

``cap``: the largest set in which no language exceeds ``max_fraction`` of the total; languages
over the cap keep the same number C of samples, the others keep all of theirs.
``temperature``: shares p_l proportional to n_l^(1/T) (T=1 keeps the mix, large T tends to
uniform); each language keeps at most p_l * N of its samples, N the total before balancing, so
over-represented languages are cut to their tempered share while a language that cannot fill its
share keeps all it has (without repeating samples no mix can give it more; requiring exact shares
would shrink every language to the scale of the rarest one).
Which samples of a language stay is a seeded random choice, so the merge is deterministic.
``metadata``: concept balancing after MetaCLIP (Xu et al. 2023, "Demystifying CLIP Data", Alg. 1)
and its per-language form in MetaCLIP 2 (2025): see :func:`metadata_balance`.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import ahocorasick
import numpy as np

from sigscale.curation.config import BalanceConfig, CurationError

# Drop reason of the metadata mode: a caption that contains no metadata entry of its language is
# not curated (MetaCLIP keeps only matched pairs); the caps' own drops count as "balance".
METADATA_UNMATCHED = "metadata_unmatched"
BALANCE_REASONS = (METADATA_UNMATCHED,)
HEAD_ENTRIES = 5  # most frequent entries per language listed in the stats


def _cap_level(counts: Dict[str, int], fraction: float) -> int:
    """Largest per-language count C with C <= fraction * sum(min(n, C))."""
    def fits(c: int) -> bool:
        return c <= fraction * sum(min(n, c) for n in counts.values()) + 1e-9

    lo, hi = 0, max(counts.values())
    while lo < hi:  # fits() holds on [0, C*] (concave minus linear), so bisect for its end
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def target_counts(counts: Dict[str, int], cfg: BalanceConfig) -> Dict[str, int]:
    """How many samples of each language the balanced set keeps."""
    counts = {k: int(v) for k, v in counts.items() if v > 0}
    if cfg.mode == "none" or not counts:
        return dict(counts)
    if cfg.mode == "cap":
        if cfg.max_fraction * len(counts) < 1:
            raise CurationError(
                f"balance.max_fraction={cfg.max_fraction} cannot hold with only {len(counts)} language(s) "
                f"({sorted(counts)}): their shares must add up to 1; raise it to at least {1 / len(counts):.3f} "
                "or use balance.mode=temperature"
            )
        level = _cap_level(counts, cfg.max_fraction)
        return {k: min(n, level) for k, n in counts.items()}
    weights = {k: n ** (1.0 / cfg.temperature) for k, n in counts.items()}
    total_w = sum(weights.values())
    total = sum(counts.values())
    return {k: min(counts[k], math.floor(total * weights[k] / total_w + 1e-6)) for k in counts}


def balance(languages: Sequence[str], cfg: BalanceConfig) -> np.ndarray:
    """Keep-mask over items (in their merge order) meeting the configured language mix."""
    languages = np.asarray(languages, dtype=object)
    keep = np.ones(len(languages), dtype=bool)
    if cfg.mode == "none" or len(languages) == 0:
        return keep
    names, counts = np.unique(languages.astype(str), return_counts=True)
    targets = target_counts(dict(zip(names.tolist(), counts.tolist())), cfg)
    rng = np.random.default_rng(cfg.seed)
    for name in sorted(targets):
        idx = np.flatnonzero(languages.astype(str) == name)
        drop = rng.permutation(idx)[targets[name]:]
        keep[drop] = False
    return keep


def load_metadata(cfg: BalanceConfig) -> Dict[str, List[str]]:
    """Entries per language from ``balance.metadata`` files (one entry a line, blank lines skipped, casefolded)."""
    entries: Dict[str, List[str]] = {}
    for lang, path in sorted(cfg.metadata.items()):
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CurationError(f"balance.metadata.{lang} file {path} cannot be read ({e}); give a UTF-8 text file "
                                "with one metadata entry a line") from None
        entries[lang] = list(dict.fromkeys(line.strip().casefold() for line in lines if line.strip()))
        if not entries[lang]:
            raise CurationError(f"balance.metadata.{lang} file {path} holds no entries; put one entry a line")
    return entries


def _automaton(entries: Sequence[str]) -> ahocorasick.Automaton:
    automaton = ahocorasick.Automaton()
    for idx, entry in enumerate(entries):
        automaton.add_word(entry, idx)
    automaton.make_automaton()
    return automaton


def match_entries(captions: Sequence[str], languages: Sequence[str],
                  entries: Dict[str, List[str]]) -> List[np.ndarray]:
    """Per caption: ids of its language's entries found in it as substrings (each once; casefolded text)."""
    automata = {lang: _automaton(words) for lang, words in entries.items()}
    empty = np.zeros(0, dtype=np.int64)
    out = []
    for caption, lang in zip(captions, languages):
        automaton = automata.get(lang)
        if automaton is None:
            out.append(empty)
            continue
        out.append(np.unique(np.fromiter((idx for _, idx in automaton.iter(str(caption).casefold())), np.int64)))
    return out


def row_uniforms(rows: Sequence[int], seed: int) -> np.ndarray:
    """A uniform [0, 1) number per row id from a hash of (seed, row): reruns and any row order agree.

    SplitMix64's finaliser (Steele, Lea & Flood 2014) over seed * 2^32 + row; its top 53 bits as a double.
    """
    x = (np.asarray(rows, dtype=np.uint64) + np.uint64(seed) * np.uint64(2 ** 32)) * np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def metadata_balance(rows: Sequence[int], captions: Sequence[str], languages: Sequence[str],
                     cfg: BalanceConfig) -> Tuple[np.ndarray, np.ndarray, Dict[str, dict]]:
    """MetaCLIP balancing: (keep mask, unmatched mask, per-language summary) over the items given.

    Entries of each language are counted over all items (a caption counts an entry once); an item
    whose caption matches entries is kept with probability min(1, t_lang / count) of its rarest
    matched entry (``balance.thresholds`` per language, else ``balance.threshold``), decided by
    :func:`row_uniforms`. Head entries are thus cut to about t_lang captions each while tail
    entries keep all theirs. Items matching nothing are not kept (``unmatched``). MetaCLIP's
    Algorithm 1 instead flips one coin per matched entry and keeps a caption if any succeeds; the
    two agree for captions with one entry and differ little for several (the rarest dominates).
    """
    languages = [str(lang) for lang in languages]
    entries = load_metadata(cfg)
    matched = match_entries(captions, languages, entries)
    counts = {lang: np.zeros(len(words), dtype=np.int64) for lang, words in entries.items()}
    for ids, lang in zip(matched, languages):
        if len(ids):
            counts[lang][ids] += 1
    prob = np.zeros(len(languages))
    for i, (ids, lang) in enumerate(zip(matched, languages)):
        if len(ids):
            t = cfg.thresholds.get(lang, cfg.threshold)
            prob[i] = min(1.0, t / counts[lang][ids].min())  # the rarest matched entry decides
    unmatched = np.array([len(ids) == 0 for ids in matched], dtype=bool)
    keep = ~unmatched & (row_uniforms(rows, cfg.seed) < prob)
    return keep, unmatched, _summary(entries, counts, matched, languages, keep, cfg)


def _summary(entries: Dict[str, List[str]], counts: Dict[str, np.ndarray], matched: List[np.ndarray],
             languages: List[str], keep: np.ndarray, cfg: BalanceConfig) -> Dict[str, dict]:
    """Per language: threshold, entries, matched and kept captions, and the head entries' counts before/after."""
    kept_counts = {lang: np.zeros_like(c) for lang, c in counts.items()}
    for ids, lang, k in zip(matched, languages, keep):
        if k and len(ids):
            kept_counts[lang][ids] += 1
    rows_by_lang = Counter(languages)
    out = {}
    for lang, words in entries.items():
        c = counts[lang]
        head = np.argsort(-c, kind="stable")[:HEAD_ENTRIES]
        mine = [k for k, la, ids in zip(keep, languages, matched) if la == lang and len(ids)]
        out[lang] = {"threshold": cfg.thresholds.get(lang, cfg.threshold), "entries": len(words),
                     "entries_matched": int((c > 0).sum()), "captions": rows_by_lang.get(lang, 0),
                     "captions_matched": len(mine), "kept": int(sum(mine)),
                     "head": [[words[i], int(c[i]), int(kept_counts[lang][i])] for i in head if c[i] > 0]}
    return out
