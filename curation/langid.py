"""The language identifier (py3langid), loaded once per process; config validation and the text filter share it."""
from __future__ import annotations

import functools
from typing import Set

from py3langid.langid import MODEL_FILE, LanguageIdentifier


@functools.lru_cache(maxsize=1)
def identifier() -> LanguageIdentifier:
    """py3langid's model with normalised probabilities (loading it takes ~1 s, so once per process)."""
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> Set[str]:
    """Language codes the identifier can output."""
    return set(identifier().labels)
