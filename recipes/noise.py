"""The noise model: a learner's errors (the source) and LLMs' imperfect fixes (candidates).

A sentence is split on white space; punctuation stays attached to its word. An *edit* replaces
the words [start, end) with new words; edits of one example never overlap, so any subset of
them can be applied to the clean sentence.

- **source** = the clean sentence with 1-4 learner errors (more for longer sentences), drawn
  from: subject-verb agreement, articles, prepositions, verb forms, spelling, word order,
  missing words, doubled words, and capitalization/final punctuation.
- **candidates** (K=5, the greedy output first, then samples at temperature 0.6) = the outputs
  of one simulated few-shot LLM, drawn by a *candidate model* from `CANDIDATE_MODELS`:
  - `shared`: misses some errors and adds its own; the samples share the greedy output's blind spots.
  - `independent`: each candidate misses each error and adds new ones independently of the others.
  - `weak`: fixes little: misses most errors and often returns the source unchanged, sometimes all K.
  - `rewriting`: fixes errors but often paraphrases: truncates, drops a clause, swaps synonyms, moves a phrase.
  - `echo`: some candidates echo an unrelated sentence (a few-shot example or one of `pool`).
  A corrector trained on one model learns that model's quirks; `mixture` draws the model per
  example (`DEFAULT_WEIGHTS`), so that it learns to vote among candidates and to fall back on
  the source when they are bad.
- **target** = the clean sentence (equal to the source when no error could be placed).

Everything is drawn from one `random.Random(seed)`, so a dataset is a function of its seed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from lmcor.runtime.candidates import default_few_shot
from lmcor.runtime.errors import InputError

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


def _fix(words: list[str], errors: list[Edit], rng: random.Random, miss: float, new: float) -> str:
    """One candidate that misses each error with probability `miss` and adds one of its own with
    probability `new`, independently of any other candidate."""
    missed = [e for e in errors if rng.random() < miss]
    taken = set().union(*map(_span, errors)) if errors else set()
    added = draw_edits(words, 1, rng, taken) if rng.random() < new else []
    return apply(words, missed + added)


class CandidateModel(Protocol):
    def __call__(self, words: list[str], errors: list[Edit], rng: random.Random, *, k: int,
                 pool: Sequence[str]) -> list[str]: ...


def shared(words: list[str], errors: list[Edit], rng: random.Random, *, k: int, pool: Sequence[str],
           miss: float = 0.3, new: float = 0.15, shared_miss: float = 0.6, shared_new: float = 0.3) -> list[str]:
    """The greedy output misses each error with probability `miss` and adds one with probability
    `new`; a sample misses the greedy output's misses with probability `shared_miss` (an LLM's blind
    spots) and the others with `miss / 2`, and repeats its new error with probability `shared_new`."""
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
    return candidates


def independent(words: list[str], errors: list[Edit], rng: random.Random, *, k: int, pool: Sequence[str],
                miss: float = 0.3, new: float = 0.2) -> list[str]:
    """Every candidate misses and adds errors on its own: agreement between them is evidence."""
    return [_fix(words, errors, rng, miss, new) for _ in range(k)]


def weak(words: list[str], errors: list[Edit], rng: random.Random, *, k: int, pool: Sequence[str],
         miss: float = 0.65, new: float = 0.1, unchanged: float = 0.4, all_unchanged: float = 0.25) -> list[str]:
    """A small LLM that mostly copies: with probability `all_unchanged` every candidate is the
    source, otherwise each one is with probability `unchanged` and the rest fix little."""
    source = apply(words, errors)
    if rng.random() < all_unchanged:
        return [source] * k
    return [source if rng.random() < unchanged else _fix(words, errors, rng, miss, new) for _ in range(k)]


# Near-synonyms a paraphrasing LLM swaps in; both directions are used.
SYNONYMS = (("big", "large"), ("small", "little"), ("begin", "start"), ("buy", "purchase"), ("quick", "fast"),
            ("quickly", "rapidly"), ("happy", "glad"), ("help", "assist"), ("show", "display"),
            ("answer", "reply"), ("often", "frequently"), ("maybe", "perhaps"), ("very", "really"),
            ("film", "movie"), ("shop", "store"), ("end", "finish"), ("close", "shut"), ("choose", "pick"),
            ("house", "home"), ("child", "kid"), ("children", "kids"), ("difficult", "hard"),
            ("easy", "simple"), ("wrong", "incorrect"), ("get", "obtain"), ("want", "wish"),
            ("almost", "nearly"), ("although", "though"), ("road", "street"), ("job", "work"),
            ("idea", "notion"), ("tired", "exhausted"), ("angry", "furious"), ("rich", "wealthy"),
            ("strange", "odd"), ("smart", "clever"), ("talk", "speak"), ("said", "stated"),
            ("went", "travelled"), ("many", "numerous"), ("also", "too"), ("important", "significant"))
_SYNONYM = {a: b for pair in SYNONYMS for a, b in (pair, pair[::-1])}
# Words that open a clause a truncating LLM stops before.
CLAUSE_OPENERS = {"and", "but", "because", "which", "when", "while", "so", "or", "who", "if", "although",
                  "since", "until", "where", "whereas", "though"}
# Sentence-initial words that stay lower case when a fronted phrase comes before them.
_LOWERABLE = FUNCTION_WORDS | {"my", "your", "his", "her", "our", "their", "its", "this", "these", "those",
                               "he", "she", "we", "they", "you", "there", "some", "many", "most", "every"}
_NOT_LAST = _LOWERABLE | set(PREPOSITIONS) | set(AGREEMENT)  # words a truncated sentence rarely ends on
# Prepositions whose phrase reads well in front ("In the rain, ..."); "of" and "to" phrases do not.
FRONTABLE = ("in", "on", "at", "for", "with", "from", "by", "after", "before", "during")
_END = ".!?"


def _truncate(words: list[str], rng: random.Random) -> list[str] | None:
    """Stop at a clause boundary in the second half, or mid-sentence, sometimes with a full stop."""
    if len(words) < 4:
        return None
    later = range(max(2, len(words) // 2), len(words) - 1)
    cuts = [i for i in later if words[i][-1:] in ",;:" or _split(words[i + 1])[1].lower() in CLAUSE_OPENERS]
    # Mid-sentence, an LLM stops after a content word ("... at the cinema"), rarely after "the".
    cuts = cuts or [i for i in later if _split(words[i])[1].lower() not in _NOT_LAST]
    if not cuts:
        return None
    cut = rng.choice(cuts)
    kept = words[: cut + 1]
    kept[-1] = kept[-1].rstrip(",;:") + ("." if rng.random() < 0.6 else "")
    return kept


def _drop_clause(words: list[str], rng: random.Random) -> list[str] | None:
    """Drop a clause between two commas: "The man, who was tired, left." -> "The man left."."""
    commas = [i for i, w in enumerate(words[:-1]) if w.endswith(",")]
    spans = [(i, j) for i in commas for j in commas if i < j]
    if not spans:
        return None
    i, j = rng.choice(spans)
    return words[:i] + [words[i][:-1]] + words[j + 1 :]


def _synonyms(words: list[str], rng: random.Random) -> list[str] | None:
    spots = [i for i, w in enumerate(words) if _split(w)[1].lower() in _SYNONYM]
    if not spots:
        return None
    out = list(words)
    for i in rng.sample(spots, min(len(spots), rng.choice((1, 1, 2)))):
        out[i:i + 1] = _replace_core(words, i, _SYNONYM.get).words
    return out


def _front_phrase(words: list[str], rng: random.Random) -> list[str] | None:
    """Move the final prepositional phrase to the front: "He waited in the rain." -> "In the rain, he waited."."""
    if len(words) < 4:
        return None
    end = words[-1][-1:] if words[-1][-1:] in _END else ""
    body = words[:-1] + [words[-1][: len(words[-1]) - len(end)]]
    starts = [p for p in range(2, len(body) - 1) if _split(body[p])[1] in FRONTABLE
              and not any(_split(w)[0] or _split(w)[2] for w in body[p - 1 :])]
    if not starts:
        return None
    p = rng.choice(starts)
    first = body[0].lower() if body[0].lower() in _LOWERABLE else body[0]
    phrase = [body[p][:1].upper() + body[p][1:], *body[p + 1 : -1], body[-1] + ","]
    return phrase + [first, *body[1 : p - 1], body[p - 1] + end]


REWRITES = (_truncate, _drop_clause, _synonyms, _front_phrase)


def _paraphrase(text: str, rng: random.Random) -> str:
    """`text` changed by one, sometimes two, different `REWRITES`; unchanged where none fits (about one
    training sentence in twelve, short ones and some of up to ten words)."""
    out, left = text.split(), list(REWRITES)
    for _ in range(1 + (rng.random() < 0.3)):  # each rewrite at most once: no truncated truncations
        for change in rng.sample(left, len(left)):
            changed = change(out, rng)
            if changed:
                out = changed
                left.remove(change)
                break
    return " ".join(out)


def rewriting(words: list[str], errors: list[Edit], rng: random.Random, *, k: int, pool: Sequence[str],
              miss: float = 0.2, new: float = 0.1, rewrite: float = 0.6) -> list[str]:
    """Each candidate fixes most errors, then with probability `rewrite` is paraphrased (at least
    one sample is, where a rewrite fits the sentence: `_paraphrase`)."""
    candidates, rewritten = [], False
    for _ in range(k):
        text = _fix(words, errors, rng, miss, new)
        if rng.random() < rewrite:
            text, rewritten = _paraphrase(text, rng), True
        candidates.append(text)
    if k > 1 and not rewritten:  # drawn last, so that the greedy output does not depend on K
        n = rng.randrange(1, k)
        candidates[n] = _paraphrase(candidates[n], rng)
    return candidates


FEW_SHOT_TEXTS = default_few_shot().examples  # what a small LLM echoes from lmcor's own prompt


def _echo(clean: str, pool: Sequence[str], rng: random.Random) -> str:
    """A few-shot example text, or with `pool`, half the time one of its sentences (never `clean`:
    the sentence itself, in a pool of corpus sentences, is no echo)."""
    text = rng.choice(pool if pool and rng.random() < 0.5 else FEW_SHOT_TEXTS)
    return rng.choice(FEW_SHOT_TEXTS) if text == clean else text


def echo(words: list[str], errors: list[Edit], rng: random.Random, *, k: int, pool: Sequence[str],
         miss: float = 0.3, new: float = 0.15, rate: float = 0.3) -> list[str]:
    """Each candidate echoes another sentence with probability `rate` (at least one sample does);
    the others are `independent` ones."""
    clean = " ".join(words)
    candidates, echoed = [], False
    for _ in range(k):
        if rng.random() < rate:
            candidates.append(_echo(clean, pool, rng))
            echoed = True
        else:
            candidates.append(_fix(words, errors, rng, miss, new))
    if k > 1 and not echoed:  # drawn last, so that the greedy output does not depend on K
        candidates[rng.randrange(1, k)] = _echo(clean, pool, rng)
    return candidates


CANDIDATE_MODELS: dict[str, CandidateModel] = {
    "shared": shared, "independent": independent, "weak": weak, "rewriting": rewriting, "echo": echo,
}
# A small few-shot LLM mostly fixes little, rewrites, or echoes; clean voting cases keep the rest.
DEFAULT_WEIGHTS: dict[str, float] = {"shared": 0.2, "independent": 0.2, "weak": 0.25, "rewriting": 0.25, "echo": 0.1}


def _checked(weights: Mapping[str, float]) -> tuple[list[str], list[float]]:
    unknown = sorted(set(weights) - set(CANDIDATE_MODELS))
    if unknown:
        raise InputError(f"unknown candidate model(s) {unknown}; choose from {sorted(CANDIDATE_MODELS)}")
    if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise InputError(f"candidate model weights must be >= 0 with a positive sum, not {dict(weights)}")
    return list(weights), list(weights.values())


def draw_model(rng: random.Random, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> str:
    """The name of a candidate model drawn by `weights` (relative, need not sum to 1)."""
    names, values = _checked(weights)
    return rng.choices(names, values)[0]


def mixture(weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> CandidateModel:
    """A candidate model that draws one of `CANDIDATE_MODELS` per example by `weights`."""
    _checked(weights)  # fail when the mixture is built, not at its first example

    def drawn(words: list[str], errors: list[Edit], rng: random.Random, *, k: int, pool: Sequence[str]) -> list[str]:
        return CANDIDATE_MODELS[draw_model(rng, weights)](words, errors, rng, k=k, pool=pool)

    return drawn


def make_example(sentence: str, rng: random.Random, model: str | CandidateModel = "shared",
                 pool: Sequence[str] | None = None, *, k: int = 5) -> Example:
    """A source with learner errors, K candidates from `model` (a name in `CANDIDATE_MODELS`, or a
    candidate model such as `mixture()`), and the clean sentence as target. `pool`: sentences
    the `echo` model may echo."""
    if isinstance(model, str) and model not in CANDIDATE_MODELS:
        raise InputError(f"unknown candidate model {model!r}; choose from {sorted(CANDIDATE_MODELS)}")
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}")
    candidates_of = CANDIDATE_MODELS[model] if isinstance(model, str) else model
    words = sentence.split()
    errors = draw_edits(words, min(4, 1 + rng.randrange(1 + len(words) // 6)), rng)
    candidates = candidates_of(words, errors, rng, k=k, pool=pool or ())
    return Example(source=apply(words, errors), candidates=candidates, target=" ".join(words))
