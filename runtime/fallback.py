"""The corrector's output, or the candidate nearest to it when it strays from all of them.

A small corrector copies spans of its candidates; when its copying loses its place (it jumps to
a later occurrence of the same words, dropping those in between, or loops back), the output
shares little with any candidate and costs far more than any candidate would. A corrector edits,
it does not rewrite: an output whose similarity to its nearest candidate is below a threshold
is replaced by that candidate. Similarity is sentence chrF, computed as sacrebleu's default
`CHRF()` computes it (character 1- to 6-grams, whitespace removed, recall weighted by beta 2).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

from .request import Correction

CHAR_ORDER = 6
BETA = 2.0


def char_ngrams(text: str) -> list[Counter]:
    """The text's character n-gram counts for n = 1..CHAR_ORDER, whitespace removed."""
    line = "".join(text.split())
    return [Counter(line[i : i + n] for i in range(len(line) - n + 1)) for n in range(1, CHAR_ORDER + 1)]


def chrf(hypothesis: list[Counter], reference: list[Counter]) -> float:
    """Sentence chrF (0-100) of two `char_ngrams`, averaged over the orders both texts have."""
    precision = recall = 0.0
    orders = 0
    for hyp, ref in zip(hypothesis, reference):
        n_hyp, n_ref = hyp.total(), ref.total()
        if n_hyp and n_ref:
            matches = sum((hyp & ref).values())
            precision += matches / n_hyp
            recall += matches / n_ref
            orders += 1
    if not orders or not precision + recall:
        return 0.0
    precision, recall = precision / orders, recall / orders
    factor = BETA**2
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


def nearest(text: str, candidates: Sequence[str]) -> tuple[int, float]:
    """The index of the candidate most similar to `text`, and its similarity (chrF, 0-100)."""
    if text in candidates and text.strip():
        return candidates.index(text), 100.0
    grams = char_ngrams(text)
    scores = [chrf(grams, char_ngrams(candidate)) for candidate in candidates]
    best = max(range(len(scores)), key=scores.__getitem__)
    return best, scores[best]


def guard(correction: Correction, candidates: Sequence[str], below: float, *,
          seen: Sequence[str] | None = None) -> Correction:
    """`correction`, or its nearest candidate (`fallback=True`) when the two are less similar than
    `below` (chrF, 0-100; 0 never falls back).

    `seen`: the candidates as the model saw them, cut where its input was truncated. The output is
    compared with those: the model wrote from them, and text it never read would only lower every
    similarity and cost time in proportion to its length. The candidate returned is whole: it is the
    LLM's own answer to the request, which a cut would only shorten.
    """
    index, similarity = nearest(correction.text, candidates if seen is None else seen)
    if similarity >= below:
        return correction
    return dataclasses.replace(correction, text=candidates[index], token_ids=[], fallback=True)
