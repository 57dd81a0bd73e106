"""When a generated turn loops: one definition for the data job (services.data generate drops
such teacher replies) and the evaluation (services.evaluate counts such student answers)."""
from __future__ import annotations

from collections.abc import Sequence

# A turn loops when it has at least LOOP_MIN_TOKENS tokens and fewer distinct 4-grams than
# LOOP_MIN_DISTINCT of its 4-grams.
LOOP_MIN_TOKENS, LOOP_MIN_DISTINCT, LOOP_N = 24, 0.5, 4


def distinct_ngrams(ids: Sequence[int], n: int = LOOP_N) -> float:
    """The share of distinct n-grams among ``ids``' n-grams (1.0 when there are none)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def loops(ids: Sequence[int]) -> bool:
    """Whether ``ids`` repeats itself (see the constants above)."""
    return len(ids) >= LOOP_MIN_TOKENS and distinct_ngrams(ids) < LOOP_MIN_DISTINCT
