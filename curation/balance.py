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
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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


def balance(languages: Sequence[str], cfg: BalanceConfig, rows: Optional[Sequence[int]] = None) -> np.ndarray:
    """Keep-mask over items meeting the configured language mix (rows: their ids, default 0..n-1).

    Each language keeps its target number of items with the smallest :func:`balance_keys` (ties: the
    smaller row): a choice by row id, so any order or partitioning of the items makes the same one.
    """
    languages = np.asarray(languages, dtype=object).astype(str)
    rows = np.arange(len(languages), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    keep = np.ones(len(languages), dtype=bool)
    if cfg.mode == "none" or len(languages) == 0:
        return keep
    names, counts = np.unique(languages, return_counts=True)
    targets = target_counts(dict(zip(names.tolist(), counts.tolist())), cfg)
    keys = balance_keys(rows, cfg.seed)
    for name in sorted(targets):
        idx = np.flatnonzero(languages == name)
        keep[idx[np.lexsort((rows[idx], keys[idx]))[targets[name]:]]] = False
    return keep


def balance_keys(rows: Sequence[int], seed: int) -> np.ndarray:
    """The uint64 sort key of each row for the language balance: its seeded uniform's 53 bits."""
    return (row_uniforms(rows, seed) * float(2 ** 53)).astype(np.uint64)


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


def entry_counts(matched: List[np.ndarray], languages: Sequence[str], entries: Dict[str, List[str]],
                 mask: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Per language: how many captions (where ``mask``) contain each entry; counts of parts add up."""
    counts = {lang: np.zeros(len(words), dtype=np.int64) for lang, words in entries.items()}
    for i, (ids, lang) in enumerate(zip(matched, languages)):
        if len(ids) and (mask is None or mask[i]):
            counts[lang][ids] += 1
    return counts


def metadata_keep(rows: Sequence[int], matched: List[np.ndarray], languages: Sequence[str],
                  counts: Dict[str, np.ndarray], cfg: BalanceConfig) -> Tuple[np.ndarray, np.ndarray]:
    """(keep, unmatched) masks: kept with probability min(1, t_lang / count of the rarest matched entry).

    ``counts`` are over the whole list (summed over parts), so a row's decision needs only its own
    matches and :func:`row_uniforms`: the same in any partitioning.
    """
    prob = np.zeros(len(matched))
    for i, (ids, lang) in enumerate(zip(matched, languages)):
        if len(ids):
            prob[i] = min(1.0, cfg.thresholds.get(lang, cfg.threshold) / counts[lang][ids].min())
    unmatched = np.array([len(ids) == 0 for ids in matched], dtype=bool)
    return ~unmatched & (row_uniforms(rows, cfg.seed) < prob), unmatched


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
    counts = entry_counts(matched, languages, entries)
    keep, unmatched = metadata_keep(rows, matched, languages, counts, cfg)
    return keep, unmatched, metadata_summary(entries, counts, entry_counts(matched, languages, entries, keep),
                                             caption_counts(matched, languages, keep), cfg)


def caption_counts(matched: List[np.ndarray], languages: Sequence[str], keep: np.ndarray) -> Dict[str, List[int]]:
    """Per language: [captions, captions matching an entry, kept]; counts of parts add up."""
    out: Dict[str, List[int]] = {}
    for ids, lang, k in zip(matched, languages, keep):
        c = out.setdefault(lang, [0, 0, 0])
        c[0] += 1
        c[1] += bool(len(ids))
        c[2] += bool(k and len(ids))
    return out


def metadata_summary(entries: Dict[str, List[str]], counts: Dict[str, np.ndarray], kept_counts: Dict[str, np.ndarray],
                     captions: Dict[str, List[int]], cfg: BalanceConfig) -> Dict[str, dict]:
    """Per language: threshold, entries, matched and kept captions, and the head entries' counts before/after."""
    out = {}
    for lang, words in entries.items():
        c = counts[lang]
        head = np.argsort(-c, kind="stable")[:HEAD_ENTRIES]
        total, matched, kept = captions.get(lang, [0, 0, 0])
        out[lang] = {"threshold": cfg.thresholds.get(lang, cfg.threshold), "entries": len(words),
                     "entries_matched": int((c > 0).sum()), "captions": total,
                     "captions_matched": matched, "kept": kept,
                     "head": [[words[i], int(c[i]), int(kept_counts[lang][i])] for i in head if c[i] > 0]}
    return out
