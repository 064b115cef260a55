"""The language identifier (py3langid), loaded once per process, and how its output becomes a decision.

py3langid's normalised probabilities are a posterior under a uniform prior over its 97 languages
(naive Bayes over byte n-grams, Lui & Baldwin 2012). On short captions that posterior is flat
among close languages (Russian "три квадрата синего цвета": bg 0.38, mk 0.35, ru 0.07), so a
declared language in the URL list is used as a prior, not a verdict: it holds probability
``declared_prior`` and the other languages share the rest evenly, so a caption the model clearly
reads as another language still goes to that language (the report lists such mismatches).

Below its confidence threshold a caption's language is *undetermined* (:data:`UNDETERMINED`):
with an allow-list that drops it (it may not be in an allowed language); without one it is kept
under "und", because three words that py3langid cannot place ("a red triangle": en 0.07, da 0.04,
sl 0.04 among 97 languages) are still a good caption, and a wrong label would mislead the
language balance.
"""
from __future__ import annotations

import functools
from typing import Collection, List, Optional, Sequence, Set, Tuple

from py3langid.langid import MODEL_FILE, LanguageIdentifier

UNDETERMINED = "und"  # ISO 639-2 "undetermined"


@functools.lru_cache(maxsize=1)
def identifier() -> LanguageIdentifier:
    """py3langid's model with normalised probabilities (loading it takes ~1 s, so once per process)."""
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> Set[str]:
    """Language codes the identifier can output."""
    return set(identifier().labels)


def declared_code(value: object) -> Optional[str]:
    """A declared language as the identifier spells it ("EN-us" -> "en"), None for no text."""
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().lower().replace("_", "-").split("-")[0]


def decide(ranked: Sequence[Tuple[str, float]], allowed: Collection[str] = (), declared: Optional[str] = None,
           declared_prior: float = 0.0) -> Tuple[str, float, float]:
    """Best language (among ``allowed`` if given), its confidence among them, and the allowed languages' mass.

    ``ranked`` is py3langid's (language, probability) list over all its languages. With a
    ``declared`` language the model's probabilities are reweighted by the prior above; the mass
    is the posterior probability of all allowed languages together (1.0 without an allow-list).
    """
    probs: List[Tuple[str, float]] = list(ranked)
    if declared is not None and 0 < declared_prior < 1 and any(lang == declared for lang, _ in probs):
        other = (1 - declared_prior) / max(len(probs) - 1, 1)
        probs = [(lang, p * (declared_prior if lang == declared else other)) for lang, p in probs]
        total = sum(p for _, p in probs) or 1.0
        probs = sorted(((lang, p / total) for lang, p in probs), key=lambda lp: -lp[1])
    if not allowed:
        return probs[0][0], probs[0][1], 1.0
    inside = [(lang, p) for lang, p in probs if lang in allowed]
    mass = sum(p for _, p in inside)
    lang, p = inside[0]
    return lang, (p / mass if mass > 0 else 0.0), mass
