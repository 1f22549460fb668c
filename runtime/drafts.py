"""Draft proposals for drafted decoding: the next tokens, copied from the request's own input.

A corrector's output mostly copies spans of its candidates and source. Each row drafts from its
reference sequences (the candidates' and the source's token ids, each ending with EOS): the last
tokens written so far are looked up in them (longest n-gram first, then shorter; before the
first token, the sequences' starts), and the tokens that follow the matches are proposed. Where
matches disagree (the candidates differ), each drafted token is the one most matches continue
with, and the draft follows the matches that agree with it. The decoder verifies the draft in one
call (see `decode.verify`), so a draft only ever costs compute, never correctness.

`Drafts` runs the compiled core's index and vote (`core.native.Drafts`) where it is built; the Python
below is its reference, and the two propose the same tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from . import core

MAX_NGRAM = 4
# A first draft of 24 runs to the end of most candidates: on the default corrector's test split,
# 1.6 decoder calls per request instead of 2.2 with 8 growing to 16, batch-1 latency 9% lower,
# batch-8 throughput the same.
MAX_DRAFT, FIRST_DRAFT = 32, 24

Position = tuple[int, int]  # (reference sequence, index of the token that follows the match)


class Drafts:
    """One row's draft proposals: its reference sequences, indexed, and its draft size (adapted to how
    much of its drafts the decoder accepts)."""

    def __init__(self, references: Sequence[np.ndarray], end: int, *, max_ngram: int = MAX_NGRAM,
                 compiled: bool | None = None):
        """`compiled`: the core's implementation (True), the reference (False), or whichever runs now (None)."""
        self.max_ngram = max_ngram
        native = core.native if compiled is None else core.built() if compiled else None
        self._native = None if native is None else native.Drafts(references, end, max_ngram)
        if self._native is not None:
            return
        # Sampled candidates often repeat one another: each distinct sequence is indexed once and
        # votes with the number of times it occurs.
        counted = Counter(tuple([*np.asarray(seq).tolist(), end]) for seq in references)
        self._refs = [list(seq) for seq in counted]
        self._weights = list(counted.values())
        self._table = self._index(self._refs)
        self._size = FIRST_DRAFT

    @property
    def compiled(self) -> bool:
        return self._native is not None

    @property
    def size(self) -> int:
        """The next draft's size, at most."""
        return self._size if self._native is None else self._native.size

    @size.setter
    def size(self, value: int) -> None:
        if self._native is None:
            self._size = value
        else:
            self._native.size = value

    @staticmethod
    def _index(refs: list[list[int]]) -> dict[int, list[Position]]:
        """token -> the positions right after each of its occurrences, in sequence order. Longer
        matches are found by checking the tokens before these positions: cheaper than indexing every
        n-gram of every request, since a request proposes only a few times."""
        table: dict[int, list[Position]] = {}
        for s, seq in enumerate(refs):
            for end in range(1, len(seq)):
                table.setdefault(seq[end - 1], []).append((s, end))
        return table

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        """Up to min(limit, the draft size) tokens likely to follow `history`."""
        if self._native is not None:  # only the last max_ngram tokens matter, and whether there are any
            return self._native.propose(history[max(0, len(history) - max(1, self.max_ngram)):], limit)
        size = min(limit, self._size)
        if size <= 0:
            return []
        refs, weights = self._refs, self._weights
        if not history:
            return _vote(refs, weights, [(s, 0) for s in range(len(refs))], size)
        after_last = self._table.get(history[-1], [])
        for n in range(min(self.max_ngram, len(history)), 0, -1):
            tail = list(history[len(history) - n :])
            starts = [(s, p) for s, p in after_last if p >= n and refs[s][p - n : p] == tail]
            if starts:
                return _vote(refs, weights, starts, size)
        return []

    def update(self, drafted: int, accepted: int) -> None:
        """Grow the drafts while they are accepted whole, shrink them to a little more than was
        accepted, and halve them while nothing is (down to one token, which costs next to nothing)."""
        if self._native is not None:
            self._native.update(drafted, accepted)
            return
        if drafted == 0:
            return
        if accepted == drafted:
            self._size = min(MAX_DRAFT, self._size + 4)
        elif accepted:
            self._size = accepted + 2
        else:
            self._size = max(1, self._size // 2)


class Drafter:
    """Draft proposals for a batch of rows, each row drafting from its own reference sequences."""

    def __init__(self, references: Sequence[Sequence[np.ndarray]], end: int, *, max_ngram: int = MAX_NGRAM,
                 compiled: bool | None = None):
        self.rows = [Drafts(row, end, max_ngram=max_ngram, compiled=compiled) for row in references]

    @property
    def sizes(self) -> list[int]:
        return [row.size for row in self.rows]

    def propose(self, row: int, history: Sequence[int], limit: int) -> list[int]:
        return self.rows[row].propose(history, limit)

    def update(self, row: int, drafted: int, accepted: int) -> None:
        self.rows[row].update(drafted, accepted)


def _vote(refs: list[list[int]], weights: list[int], starts: list[Position], size: int) -> list[int]:
    """Follow the majority continuation of `starts` for up to `size` tokens (earliest match on ties)."""
    draft: list[int] = []
    alive = starts
    for k in range(size):
        if len(alive) == 1:  # one match left: its continuation is the draft
            s, p = alive[0]
            return draft + refs[s][p + k : p + size]
        votes: dict[int, int] = {}
        for s, p in alive:
            if p + k < len(refs[s]):
                token = refs[s][p + k]
                votes[token] = votes.get(token, 0) + weights[s]
        if not votes:
            break
        token = max(votes, key=votes.__getitem__)  # the first of equals: the earliest match's
        draft.append(token)
        alive = [(s, p) for s, p in alive if p + k < len(refs[s]) and refs[s][p + k] == token]
    return draft
