"""Language balance of the final shards: per-language caps or temperature sampling.

``cap``: the largest set in which no language exceeds ``max_fraction`` of the total; languages
over the cap keep the same number C of samples, the others keep all of theirs.
``temperature``: shares p_l proportional to n_l^(1/T) (T=1 keeps the mix, large T tends to
uniform); each language keeps at most p_l * N of its samples, N the total before balancing, so
over-represented languages are cut to their tempered share while a language that cannot fill its
share keeps all it has (without repeating samples no mix can give it more; requiring exact shares
would shrink every language to the scale of the rarest one).
Which samples of a language stay is a seeded random choice, so the merge is deterministic.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np

from sigscale.curation.config import BalanceConfig, CurationError


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
