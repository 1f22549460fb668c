"""The noise model: a learner's errors (the source) and a few-shot LLM's imperfect fixes (candidates).

A sentence is split on white space; punctuation stays attached to its word. An *edit* replaces
the words [start, end) with new words; edits of one example never overlap, so any subset of
them can be applied to the clean sentence.

- **source** = the clean sentence with 1-4 learner errors (more for longer sentences), drawn
  from: subject-verb agreement, articles, prepositions, verb forms, spelling, word order,
  missing words, doubled words, and capitalization/final punctuation.
- **candidates** (K=5) = outputs of a simulated few-shot LLM: one "greedy" output and four
  "samples" at temperature 0.6. The greedy output misses each source error with probability
  `miss` and adds a new error of its own with probability `new`. A sample misses the errors the
  greedy output missed with probability `shared_miss` (errors are partly shared, as an LLM's
  blind spots are) and the others with probability `miss / 2`; it repeats the greedy output's
  new error with probability `shared_new` and adds an independent one with probability `new`.
- **target** = the clean sentence.

Everything is drawn from one `random.Random(seed)`, so a dataset is a function of its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

AGREEMENT = {"is": "are", "are": "is", "was": "were", "were": "was", "has": "have", "have": "has",
             "does": "do", "do": "does", "doesn't": "don't", "don't": "doesn't", "this": "these",
             "these": "this", "that": "those", "those": "that", "isn't": "aren't", "aren't": "isn't",
             "wasn't": "weren't", "weren't": "wasn't", "much": "many", "many": "much"}
ARTICLES = ("a", "an", "the")
PREPOSITIONS = ("in", "on", "at", "to", "for", "of", "with", "from", "by", "about", "into", "over")
IRREGULAR = [("go", "goes", "went", "gone", "going"), ("be", "is", "was", "been", "being"),
             ("have", "has", "had", "had", "having"), ("do", "does", "did", "done", "doing"),
             ("see", "sees", "saw", "seen", "seeing"), ("take", "takes", "took", "taken", "taking"),
             ("make", "makes", "made", "made", "making"), ("come", "comes", "came", "come", "coming"),
             ("give", "gives", "gave", "given", "giving"), ("write", "writes", "wrote", "written", "writing"),
             ("eat", "eats", "ate", "eaten", "eating"), ("run", "runs", "ran", "run", "running"),
             ("know", "knows", "knew", "known", "knowing"), ("get", "gets", "got", "gotten", "getting"),
             ("find", "finds", "found", "found", "finding"), ("think", "thinks", "thought", "thought", "thinking"),
             ("buy", "buys", "bought", "bought", "buying"), ("bring", "brings", "brought", "brought", "bringing"),
             ("begin", "begins", "began", "begun", "beginning"), ("speak", "speaks", "spoke", "spoken", "speaking")]
_FORMS = {form: forms for forms in IRREGULAR for form in forms}
FUNCTION_WORDS = {"the", "a", "an", "to", "of", "in", "on", "at", "for", "and", "is", "are", "was", "it",
                  "that", "with", "be", "as", "by", "has", "have", "not", "but", "or", "from"}
VOWELS = "aeiou"


@dataclass(frozen=True)
class Edit:
    start: int
    end: int
    words: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    source: str
    candidates: list[str]
    target: str


def _split(word: str) -> tuple[str, str, str]:
    """(leading punctuation, core, trailing punctuation)."""
    i, j = 0, len(word)
    while i < j and not word[i].isalnum():
        i += 1
    while j > i and not word[j - 1].isalnum():
        j -= 1
    return word[:i], word[i:j], word[j:]


def _with_case(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _replace_core(words: list[str], i: int, change) -> Edit | None:
    pre, core, post = _split(words[i])
    new = change(core.lower())
    if not new or new == core.lower():
        return None
    return Edit(i, i + 1, (pre + _with_case(new, core) + post,))


def _agreement(words, i, rng):
    return _replace_core(words, i, AGREEMENT.get)


def _article(words, i, rng):
    pre, core, post = _split(words[i])
    if core.lower() in ARTICLES:
        if rng.random() < 0.4 and not pre and not post:
            return Edit(i, i + 1, ())  # missing article
        return _replace_core(words, i, lambda w: rng.choice([a for a in ARTICLES if a != w]))
    if core.isalpha() and core.islower() and not pre and i > 0 and _split(words[i - 1])[1].lower() not in ARTICLES:
        return Edit(i, i + 1, (rng.choice(ARTICLES), words[i]))  # needless article
    return None


def _preposition(words, i, rng):
    return _replace_core(words, i, lambda w: rng.choice([p for p in PREPOSITIONS if p != w]) if w in PREPOSITIONS else None)


def _verb_form(words, i, rng):
    def change(w):
        if w in _FORMS:
            return rng.choice([f for f in _FORMS[w] if f != w])
        if len(w) > 4 and w.endswith("ed"):
            return w[:-2] if rng.random() < 0.5 else w[:-2] + "ing"
        if len(w) > 5 and w.endswith("ing"):
            return w[:-3] + rng.choice(["", "ed", "s"])
        return None

    return _replace_core(words, i, change)


def _spelling(words, i, rng):
    def change(w):
        if len(w) < 4 or not w.isalpha():
            return None
        k = rng.randrange(1, len(w) - 1)
        kind = rng.randrange(5)
        if kind == 0:
            return w[:k] + w[k + 1] + w[k] + w[k + 2:]  # transposition
        if kind == 1:
            return w[:k] + w[k + 1:]  # omission
        if kind == 2:
            return w[:k] + w[k] + w[k:]  # doubling
        if kind == 3 and w[k] in VOWELS:
            return w[:k] + rng.choice([v for v in VOWELS if v != w[k]]) + w[k + 1:]  # wrong vowel
        if "ie" in w or "ei" in w:
            return w.replace("ie", "ei", 1) if "ie" in w else w.replace("ei", "ie", 1)
        return w[:k] + w[k + 1:]

    return _replace_core(words, i, change)


def _word_order(words, i, rng):
    if i + 1 >= len(words):
        return None
    a, b = words[i], words[i + 1]
    if _split(a)[2] or _split(b)[0] or not _split(a)[1] or not _split(b)[1] or i == 0:
        return None  # keep punctuation and the capitalized first word in place
    return Edit(i, i + 2, (b, a))


def _missing(words, i, rng):
    pre, core, post = _split(words[i])
    if pre or post or i == 0 or core.lower() not in FUNCTION_WORDS:
        return None
    return Edit(i, i + 1, ())


def _doubled(words, i, rng):
    pre, core, post = _split(words[i])
    if pre or post or not core:
        return None
    return Edit(i, i + 1, (words[i], words[i]))


def _case_or_punctuation(words, i, rng):
    if i == 0 and words[0][:1].isupper():
        return Edit(0, 1, (words[0][0].lower() + words[0][1:],))
    if i == len(words) - 1 and words[i][-1:] in ".!?" and len(words[i]) > 1:
        return Edit(i, i + 1, (words[i][:-1],))
    if words[i].endswith(",") and len(words[i]) > 1:
        return Edit(i, i + 1, (words[i][:-1],))
    return None


ERRORS = {
    "agreement": (_agreement, 2.0),
    "article": (_article, 2.0),
    "preposition": (_preposition, 1.5),
    "verb_form": (_verb_form, 1.5),
    "spelling": (_spelling, 2.0),
    "word_order": (_word_order, 0.7),
    "missing": (_missing, 1.0),
    "doubled": (_doubled, 0.6),
    "case_punctuation": (_case_or_punctuation, 1.0),
}


def draw_edits(words: list[str], count: int, rng: random.Random, taken: set[int] | None = None) -> list[Edit]:
    """Up to `count` non-overlapping edits, each of a kind drawn by weight at a random word."""
    taken = set() if taken is None else set(taken)
    kinds, weights = list(ERRORS), [w for _, w in ERRORS.values()]
    edits: list[Edit] = []
    for _ in range(count * 20):
        if len(edits) == count:
            break
        make = ERRORS[rng.choices(kinds, weights)[0]][0]
        i = rng.choice([0, len(words) - 1, *range(len(words))]) if words else 0
        edit = make(words, i, rng) if words else None
        if edit is None or any(k in taken for k in range(edit.start, max(edit.end, edit.start + 1))):
            continue
        taken.update(range(edit.start, max(edit.end, edit.start + 1)))
        edits.append(edit)
    return edits


def apply(words: list[str], edits: list[Edit]) -> str:
    out = list(words)
    for edit in sorted(edits, key=lambda e: -e.start):
        out[edit.start : edit.end] = edit.words
    return " ".join(out)


def _span(edit: Edit) -> set[int]:
    return set(range(edit.start, max(edit.end, edit.start + 1)))


def make_example(
    sentence: str,
    rng: random.Random,
    *,
    k: int = 5,
    miss: float = 0.3,
    new: float = 0.15,
    shared_miss: float = 0.6,
    shared_new: float = 0.3,
) -> Example:
    words = sentence.split()
    errors = draw_edits(words, min(4, 1 + rng.randrange(1 + len(words) // 6)), rng)
    taken = set().union(*map(_span, errors)) if errors else set()

    def own_error(extra_taken: set[int]) -> list[Edit]:
        return draw_edits(words, 1, rng, taken | extra_taken) if rng.random() < new else []

    greedy_missed = [e for e in errors if rng.random() < miss]
    greedy_new = own_error(set())
    candidates = [apply(words, greedy_missed + greedy_new)]
    for _ in range(k - 1):
        missed = [e for e in errors if rng.random() < (shared_miss if e in greedy_missed else miss / 2)]
        added = list(greedy_new) if greedy_new and rng.random() < shared_new else []
        used = set().union(*map(_span, added)) if added else set()
        candidates.append(apply(words, missed + added + own_error(used)))
    return Example(source=apply(words, errors), candidates=candidates, target=sentence)
