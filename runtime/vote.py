"""The candidates' edits to the source, voted: the text a majority of the LLM's answers agree on.

Each candidate is aligned with the source word by word (`difflib`'s longest matching blocks); each
difference is an edit (replace source words i..j by some words). An edit made by at least `need`
candidates is applied, from left to right (of the edits that start at a word, an insertion before
it or a change of words from it, only the one more candidates make), skipping any that overlaps one
already applied. Where the candidates' errors are their own (each sample slips somewhere else), the
edits they share are the corrections; an edit only one candidate makes (a rewrite, a dropped clause)
is left out.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence

from . import core
from .inflection import slip

NEED = 2  # candidates that must make an edit: a pair agreeing is rarely chance; one is a guess


def edit_vote(source: str, candidates: Sequence[str], need: int = NEED) -> str:
    """The source with every edit that at least `need` of the candidates make to it, its words joined
    by single spaces; with none, the source as it is (its own spacing, a no-break space too). The
    compiled core's where built: the words numbered in their sorted order, so that ties break alike."""
    if core.native is None:
        return _edit_vote_reference(source, candidates, need)
    words, theirs = source.split(), [candidate.split() for candidate in candidates]
    vocabulary = sorted({*words, *(word for t in theirs for word in t)})
    number = {word: n for n, word in enumerate(vocabulary)}
    numbered = [number[w] for w in words]
    voted = core.native.edit_vote(numbered, [[number[w] for w in t] for t in theirs], need)
    return source if voted == numbered else " ".join(vocabulary[n] for n in voted)


def minimal_edits(source: str, text: str, span: int, known: set[str] | None = None,
                  candidates: Sequence[str] = ()) -> str:
    """The source with those of `text`'s word-level edits to it that replace at most `span` words by
    at most `span` words and fix what a writer gets wrong (`_plausible`, or a short word that most of
    the `candidates` drop too; span 0: edits of any size and kind, for tasks that rewrite), and, given
    `known` words, write only those; another edit (a rewrite, a dropped clause, a skip where copying
    lost its place, a word no input holds) is left out, its source words kept. With nothing left out,
    `text` itself; with a span, a text longer than `longest_edit` is no edit of the source: the source."""
    if span and len(text) > longest_edit(source):
        return source  # and its cost stays bound by the source, whatever the text's length
    while True:
        kept = _kept_edits(source, text, span, known, candidates)
        if kept == text:  # an edit left out can make a move of words into a drop: until none is
            return text
        text = kept


def longest_edit(source: str) -> int:
    """The most characters an edit of `source` has: twice its length and some words."""
    return 2 * len(source) + 64


# A writer's error, fixed, is small: a short word dropped (an article, a preposition), a short one
# written, short words swapped, a word respelled or inflected. A weak LLM's rewrites, which a
# corrector may follow, drop and swap content words. Chosen on the dev splits (synthetic and SmolLM2
# candidates); on text outside them, they keep every fix the corrector made and leave rewrites out.
DROP_LETTERS = 3
WRITE_LETTERS = 5
RESPELLED = 0.5  # difflib's similarity ratio of the old and new letters, where an edit changes the number of words
AGREED_DROP_LETTERS = 4  # an auxiliary ("have", "will") is dropped where most candidates drop it
AGREED_RESPELLED = 0.7  # a word the vote adds to an output's edits is a respelling of the source's at this ratio


def adds_fixes(source: str, text: str, voted: str) -> bool:
    """Whether `voted` makes every edit `text` makes to the source, and more, each of those one word
    respelled (`AGREED_RESPELLED`) or dropped: slips the candidates agree on that the text missed,
    writing no word of their own. Where candidates slip independently, two of them making the same
    such fix is rarely chance; the words a weak LLM's samples write, replace or drop alike (a clause)
    are more often a shared rewrite (chosen on the dev splits, synthetic and SmolLM2's)."""
    words = source.split()

    def edits(other: str) -> set[tuple[int, int, tuple[str, ...]]]:
        theirs = other.split()
        return {(i1, i2, tuple(theirs[j1:j2])) for tag, i1, i2, j1, j2 in _opcodes(words, theirs) if tag != "equal"}

    own, agreed = edits(text), edits(voted)
    return own < agreed and all(i2 - i1 == 1 and (not new or (len(new) == 1 and _respelled(words[i1], new[0])))
                                for i1, i2, new in agreed - own)


def _respelled(old: str, new: str) -> bool:
    old, new = _letters(old), _letters(new)
    return old != new and _ratio(old, new) >= AGREED_RESPELLED


def _kept_edits(source: str, text: str, span: int, known: set[str] | None, candidates: Sequence[str]) -> str:
    words, theirs = source.split(), text.split()
    ops = [op for op in _opcodes(words, theirs) if op[0] != "equal"]
    edits = _split_light(ops, words, theirs) if span else [(op, False) for op in ops]
    # Words an edit drops and another writes were moved (word order), not lost (read with a span only).
    heavy = [op for op, light in edits if not light] if span else []
    moved = _moved(heavy, words, theirs, _letters)
    carried = _moved(heavy, words, theirs, str)  # moved with their marks
    keep = [((not span or light
              or (max(i2 - i1, j2 - j1) <= span and (_plausible(words, i1, i2, theirs[j1:j2], moved)
                                                     or _agreed_drop(words, i1, i2, j1 == j2, candidates))))
             and (not span or _keeps_marks(words, i1, i2, theirs[j1:j2], carried))
             and (known is None or all(word in known for word in theirs[j1:j2])))
            for (_, i1, i2, j1, j2), light in edits]
    # A move is kept whole or not at all: its drop alone loses words, its write alone doubles them.
    drops = [[] if light else [w for w in map(_letters, words[i1:i2]) if w in moved]
             for (_, i1, i2, _, _), light in edits]
    writes = [[] if light else [w for w in map(_letters, theirs[j1:j2]) if w in moved]
              for (_, _, _, j1, j2), light in edits]
    while moved:
        dropped = Counter(w for kept, own in zip(keep, drops) if kept for w in own)
        written = Counter(w for kept, own in zip(keep, writes) if kept for w in own)
        whole = [kept and all(written[w] for w in drop) and all(dropped[w] for w in write)
                 for kept, drop, write in zip(keep, drops, writes)]
        if whole == keep:
            break
        keep = whole
    out: list[str] = []
    at = 0
    for ((_, i1, i2, j1, j2), _), kept in zip(edits, keep):
        out += words[at:i1] + (theirs[j1:j2] if kept else words[i1:i2])
        at = i2
    return text if all(keep) else " ".join(out + words[at:])  # nothing left out: the text, its spacing too


def _moved(heavy: list, words: list[str], theirs: list[str], key) -> Counter:
    """The words (as `key` reads them) that the `heavy` edits both drop and write: moved, not lost."""
    return (Counter(key(w) for _, i1, i2, _, _ in heavy for w in words[i1:i2])
            & Counter(key(w) for _, _, _, j1, j2 in heavy for w in theirs[j1:j2]))


# A writer's slips leave brackets, double quotes, colons, dashes and digits alone; a weak LLM drops
# them with what they hold ("(K)", "tup :") and changes numbers. Commas, semicolons, end marks and
# apostrophes ("childrens'" -> "children's", "it’s" -> "its") are a writer's to fix.
_FREE_MARKS = frozenset(",;.!?'’")


def _marks(words: list[str]) -> Counter:
    return Counter(c for w in words for c in w if not c.isalpha() and c not in _FREE_MARKS)


def _keeps_marks(words: list[str], i1: int, i2: int, new: list[str], carried: Counter) -> bool:
    """Whether replacing words[i1:i2] by `new` keeps every mark and digit they hold (but `_FREE_MARKS`),
    apart from words moved as they are (`carried`) and a doubled word dropped, whose marks stay in
    the text."""
    doubled = _doubled(words, i1, i2)
    old = [words[i] for i in range(i1, i2) if i not in doubled and words[i] not in carried]
    return not _marks(old) - _marks([w for w in new if w not in carried])


def _split_light(edits: list, words: list[str], theirs: list[str]) -> list[tuple[tuple, bool]]:
    """The edits, with the first word's capital and the last word's end punctuation ("she" -> "She",
    "home" -> "home.") apart and light: a sentence's frame, a writer's fix whatever the words next to
    it, and in no edit's span. (A case changed inside the sentence, the last word's too, stays part of
    its edit, which `_recased` then refuses: a weak LLM respells names.) (edit, light) pairs, in order."""
    out: list[tuple[tuple, bool]] = []
    for op in edits:
        tag, i1, i2, j1, j2 = op
        if tag != "replace" or i2 - i1 != j2 - j1:
            out.append((op, False))
            continue
        run = None  # the open run of other changed words: (i, j) where it starts
        for k in range(i2 - i1):
            at = i1 + k
            if (_letters(words[at]) == _letters(theirs[j1 + k]) if at == 0  # its capital
                    else at == len(words) - 1 and _bare(words[at]) == _bare(theirs[j1 + k])):  # its end mark
                if run is not None:
                    out.append((("replace", run[0], i1 + k, run[1], j1 + k), False))
                    run = None
                out.append((("replace", i1 + k, i1 + k + 1, j1 + k, j1 + k + 1), True))
            elif run is None:
                run = (i1 + k, j1 + k)
        if run is not None:
            out.append((("replace", run[0], i2, run[1], j2), False))
    return out


def _letters(word: str) -> str:
    return _bare(word).lower()


def _bare(word: str) -> str:
    return _PUNCTUATION.sub("", word)


_PUNCTUATION = re.compile(r"^\W+|\W+$")


def _plausible(words: list[str], i1: int, i2: int, new: list[str], moved: Counter) -> bool:
    """Whether replacing words[i1:i2] by `new` fixes a writer's error rather than rewrites: apart from
    moved words and a doubled word dropped, it drops only short words, writes only short words,
    swaps short words or respells."""
    if _recased(words, i1, i2, new):
        return False
    doubled = _doubled(words, i1, i2)
    old = [_letters(words[i]) for i in range(i1, i2) if i not in doubled and _letters(words[i]) not in moved]
    written = [_letters(w) for w in new if _letters(w) not in moved]
    if not written:
        return all(len(w) <= DROP_LETTERS for w in old)
    if not old:  # a word written where it is already next to itself is a stutter, not a fix
        neighbours = {_letters(words[j]) for j in (i1 - 1, i2) if 0 <= j < len(words)}
        return all(len(w) <= WRITE_LETTERS and w not in neighbours for w in written)
    if all(len(w) <= WRITE_LETTERS for w in old + written):
        return True
    if len(old) == len(written):  # words respelled, each by a writer's slip, not into another word
        return all(slip(a, b) or max(len(a), len(b)) <= WRITE_LETTERS for a, b in zip(old, written))
    return _ratio(" ".join(old), " ".join(written)) >= RESPELLED


def _doubled(words: list[str], i1: int, i2: int) -> set[int]:
    """The indices in i1..i2 of words that stand next to the same word outside that span."""
    return {i for i in range(i1, i2) if any(0 <= j < len(words) and not i1 <= j < i2
                                            and _letters(words[j]) == _letters(words[i]) for j in (i - 1, i + 1))}


def _recased(words: list[str], i1: int, i2: int, new: list[str]) -> bool:
    """Whether replacing words[i1:i2] by `new` changes only the case of words inside a sentence: not a
    writer's fix but a weak LLM's respelling ("SocketIO" -> "socketio", "instance" -> "Instance"); a
    sentence's first word (after an end mark) and the pronoun "I" are fixes a writer needs."""
    if i2 - i1 != len(new) or i1 == 0:
        return False
    for at, written in zip(range(i1, i2), new):
        old = words[at]
        if old == written:
            continue
        if old.lower() != written.lower() or old.lower() in ("i", "i'm", "i'll", "i've", "i'd") \
                or words[at - 1].endswith((".", "!", "?")):
            return False
    return True


def _agreed_drop(words: list[str], i1: int, i2: int, drop: bool, candidates: Sequence[str]) -> bool:
    """Whether words[i1:i2] are short words that more than half the candidates drop too."""
    if not drop or not candidates or any(len(_letters(w)) > AGREED_DROP_LETTERS for w in words[i1:i2]):
        return False
    dropping = sum(("delete", i1, i2) in {op[:3] for op in _opcodes(words, candidate.split())}
                   for candidate in candidates)
    return 2 * dropping > len(candidates)


def _opcodes(a: list[str], b: list[str]) -> list[tuple[str, int, int, int, int]]:
    """difflib's opcodes turning the words `a` into `b` (autojunk off): the compiled core's where built."""
    if core.native is None:
        return difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    number: dict[str, int] = {}
    return core.native.opcodes([number.setdefault(w, len(number)) for w in a],
                               [number.setdefault(w, len(number)) for w in b])


def _ratio(a: str, b: str) -> float:
    """difflib's similarity ratio of two texts (autojunk off): the compiled core's where built."""
    if core.native is None:
        return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    total = len(a) + len(b)
    return 2.0 * core.native.matched(list(map(ord, a)), list(map(ord, b))) / total if total else 1.0


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
    at, started = 0, -1
    # Left to right: at each word, of the edits that start there, the one more candidates make (on a
    # tie, an insertion before the word first). Two edits from one word are different candidates'
    # answers to the same place ("an" or "the" before it; an insertion or a change of the word):
    # applied together they would write both ("an the apple").
    chosen = sorted((e for e, n in edits.items() if n >= need),
                    key=lambda e: (e[0], -edits[e], e[1] > e[0], e[1], e[2]))
    for i1, i2, replacement in chosen:
        if i1 < at or i1 == started:
            continue  # overlaps an edit already applied, or another answer where one was applied
        out += words[at:i1] + list(replacement)
        at, started = i2, i1
    voted = out + words[at:]
    return source if voted == words else " ".join(voted)


def input_words(source: str, candidates: Sequence[str]) -> set[str]:
    """The words of a request's source and candidates: all a corrector that copies can write."""
    return set(source.split()).union(*(candidate.split() for candidate in candidates))
