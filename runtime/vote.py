"""The candidates' edits to the source, voted: the text a majority of the LLM's answers agree on.

Each candidate is aligned with the source word by word (`difflib`'s longest matching blocks); each
difference is an edit (replace source words i..j by some words). An edit made by at least `need`
candidates is applied, from left to right, skipping any that overlaps one already applied. Where
the candidates' errors are their own (each sample slips somewhere else), the edits they share are
the corrections; an edit only one candidate makes (a rewrite, a dropped clause) is left out.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence

from . import core

NEED = 2  # candidates that must make an edit: a pair agreeing is rarely chance; one is a guess


def edit_vote(source: str, candidates: Sequence[str], need: int = NEED) -> str:
    """The source with every edit that at least `need` of the candidates make to it (the compiled
    core's where built: the words numbered in their sorted order, so that ties break alike)."""
    if core.native is None:
        return _edit_vote_reference(source, candidates, need)
    words, theirs = source.split(), [candidate.split() for candidate in candidates]
    vocabulary = sorted({*words, *(word for t in theirs for word in t)})
    number = {word: n for n, word in enumerate(vocabulary)}
    voted = core.native.edit_vote([number[w] for w in words], [[number[w] for w in t] for t in theirs], need)
    return " ".join(vocabulary[n] for n in voted)


def minimal_edits(source: str, text: str, span: int, known: set[str] | None = None) -> str:
    """The source with those of `text`'s word-level edits to it that replace at most `span` words by
    at most `span` words (0: any), and, given `known` words, write only those; another edit (a
    rewrite, a dropped clause, a skip where copying lost its place, a word no input holds) is left
    out, its source words kept. With nothing left out, `text` itself."""
    words, theirs = source.split(), text.split()
    out: list[str] = []
    dropped = False
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, words, theirs, autojunk=False).get_opcodes():
        keep = tag == "equal" or ((not span or max(i2 - i1, j2 - j1) <= span)
                                  and (known is None or all(word in known for word in theirs[j1:j2])))
        out += theirs[j1:j2] if keep else words[i1:i2]
        dropped = dropped or not keep
    return " ".join(out) if dropped else text  # nothing left out: the text as it was, its spacing too


def _edit_vote_reference(source: str, candidates: Sequence[str], need: int = NEED) -> str:
    """`edit_vote` in Python, with difflib's alignment: the compiled core's reference."""
    words = source.split()
    edits: Counter[tuple[int, int, tuple[str, ...]]] = Counter()
    for candidate in candidates:
        theirs = candidate.split()
        matcher = difflib.SequenceMatcher(None, words, theirs, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag != "equal":
                edits[(i1, i2, tuple(theirs[j1:j2]))] += 1
    out: list[str] = []
    at = 0
    # Left to right; of two edits of the same words, the one more candidates make.
    chosen = sorted((e for e, n in edits.items() if n >= need), key=lambda e: (e[0], e[1], -edits[e], e[2]))
    for i1, i2, replacement in chosen:
        if i1 < at:
            continue  # overlaps an edit already applied
        out += words[at:i1] + list(replacement)
        at = i2
    return " ".join(out + words[at:])


def input_words(source: str, candidates: Sequence[str]) -> set[str]:
    """The words of a request's source and candidates: all a corrector that copies can write."""
    return set(source.split()).union(*(candidate.split() for candidate in candidates))
