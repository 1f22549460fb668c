"""The corrector's output, checked against the LLM's candidates (`guard`).

A small corrector copies spans of its candidates; when its copying loses its place (it jumps to
a later occurrence of the same words, dropping those in between, or loops back), the output
shares little with any candidate and costs far more than any candidate would. A corrector edits,
it does not rewrite: an output whose similarity to its nearest candidate is below a threshold
is replaced by the text among the source and the candidates that agrees most with the
candidates and the output (`best_guess`). And where the candidates agree on edits to the source
that the output lacks, their vote (`vote.edit_vote`) is returned if they support it more. Last, the
text keeps only its edits to the source of at most a calibrated number of words that fix a writer's
error (short words dropped, written or swapped, words respelled or moved) and write only words of
the source and the candidates (`vote.minimal_edits`): a weak LLM's rewrites, which the model may
follow, stay out, and so do words its tokenizer could not spell. Similarity
is sentence chrF, computed as sacrebleu's default `CHRF()` computes it (character 1- to 6-grams,
whitespace removed, recall weighted by beta 2).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

from . import core
from .request import Correction
from .vote import adds_fixes, edit_vote, input_words, longest_edit, minimal_edits

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
    if core.native is not None:
        return core.native.nearest(text, candidates)
    return _nearest_reference(text, candidates)


def _nearest_reference(text: str, candidates: Sequence[str]) -> tuple[int, float]:
    """`nearest` in Python, without its exact-match shortcut: the compiled core's reference."""
    grams = char_ngrams(text)
    scores = [chrf(grams, char_ngrams(candidate)) for candidate in candidates]
    best = max(range(len(scores)), key=scores.__getitem__)
    return best, scores[best]


def best_guess(text: str, source: str | None, candidates: Sequence[str]) -> int:
    """The index in (source, *candidates) (or in candidates, without a source) of the text that
    agrees most with the candidates and the output `text` (the highest sum of chrF to them).

    The nearest candidate to an output that strayed is often a wrong one; the text the others
    agree with is the LLM's consensus, and where the candidates disagree among themselves (a weak
    LLM rewrites, drops clauses) it is often the source, which every candidate stays close to.
    """
    pool = ([source] if source is not None else []) + list(candidates)
    totals = _support(pool, [*candidates, text])
    return max(range(len(totals)), key=totals.__getitem__)


def agreement(text: str, candidates: Sequence[str]) -> float:
    """The summed chrF of `text` to the candidates: how well the LLM's answers support it."""
    return _support([text], candidates)[0]


def _support(texts: Sequence[str], voters: Sequence[str]) -> list[float]:
    """Each text's summed chrF to the voters (the compiled core's where built; in Python each
    text's n-grams are counted once)."""
    if core.native is not None:
        return [sum(core.native.chrf(text, voter) for voter in voters) for text in texts]
    grams = {t: char_ngrams(t) for t in (*texts, *voters)}
    return [sum(chrf(grams[text], grams[voter]) for voter in voters) for text in texts]


def voters(source: str, candidates: Sequence[str], read: Sequence[str]) -> Sequence[str]:
    """The candidates whose edits are voted: all of them; where the model read them cut (its input
    was truncated: a long source, or many candidates), those of them at most `vote.longest_edit` of the
    source's length, whole. The vote reads what the model could not, and its cost stays bound by the
    source, which the model read whole."""
    if tuple(read) == tuple(candidates):
        return candidates
    most = longest_edit(source)
    return [candidate for candidate in candidates if len(candidate) <= most]


def outvotes(source: str, text: str, voted: str, support: Callable[[str], float]) -> bool:
    """Whether the candidates' vote (`voted`, kept to small edits where the text will be) replaces
    `text`: it makes every edit the text makes and adds only words respelled or dropped (`vote.adds_fixes`),
    or the candidates support it more (`support`: a text's `agreement` with them). A vote of no edit
    is the source, not the candidates' answer (one candidate's never holds an edit): it would undo
    the text's corrections where the candidates resemble the source more."""
    if voted == text or voted.split() == source.split():
        return False
    return adds_fixes(source, text, voted) or support(voted) > support(text)


def guard(correction: Correction, candidates: Sequence[str], below: float, *, source: str | None = None,
          seen: Sequence[str] | None = None, span: int = 0) -> Correction:
    """`correction`, checked against the candidates when `below` > 0 (chrF, 0-100; 0: the model's
    output as it is), and replaced (`fallback=True`) by:

    - the best guess among `source` and the candidates (`best_guess`), when the output is less
      similar than `below` to its nearest candidate: it strayed;
    - the candidates' voted edits to the source (`vote.edit_vote`), when there is one and the
      candidates support them more than the text chosen so far (`agreement`), or it makes every
      edit the text makes and adds only words respelled or dropped (`vote.adds_fixes`): where the LLM's
      answers agree on an edit, a small model that missed it is outvoted;
    - the text chosen so far kept to its edits of at most `span` words (`vote.minimal_edits`; 0: any
      size), the vote too before it is weighed: a weak LLM's candidates rewrite and drop clauses,
      and a corrector that follows them, or loses its place, moves away from a source it should
      only edit;
    - and to edits that write only words the source or a candidate holds: a corrector copies, and
      a word none of its inputs holds is one its tokenizer could not spell (accented or non-Latin
      letters outside its vocabulary come out as other words) or a slip.

    `seen`: the candidates as the model saw them, cut where its input was truncated. The output is
    compared with those: the model wrote from them, and text it never read would only lower every
    similarity and cost time in proportion to its length. The vote reads whole candidates not much
    longer than the source (`voters`): on a long request, the fixes the model could not see. A
    candidate chosen is whole: it is the LLM's own answer to the request, which a cut would only
    shorten; one far longer than the source is no edit of it (`vote.longest_edit`): the source.
    """
    if below <= 0:
        return correction
    read = candidates if seen is None else seen
    text = correction.text
    _, similarity = nearest(text, read)
    if similarity < below:
        index = best_guess(text, source, read)
        text = (source if index == 0 else candidates[index - 1]) if source is not None else candidates[index]
    if source is not None:
        vote_by = voters(source, candidates, read)
        # Kept to small edits before it is weighed: where most candidates are no answer ("N/A", a
        # refusal), their vote replaces the whole sentence, which would win here and be undone below.
        voted = edit_vote(source, vote_by)
        voted = minimal_edits(source, voted, span, candidates=vote_by) if span else voted
        if outvotes(source, text, voted, lambda t: agreement(t, vote_by)):
            text = voted
    if source is not None:
        # Words its inputs hold bound the model's own output, as it read them; a guess or a vote is
        # made of the candidates' words already (and a huge candidate is not read again).
        known = input_words(source, read) if text == correction.text else None
        if span or known is not None:
            text = minimal_edits(source, text, span, known, vote_by)
        if text != correction.text and text.split() == source.split():  # the fallback's answer edits no word:
            text = source  # the source, with its own spacing (no-break spaces), as a guess of it would be
    if text == correction.text:
        return correction
    return dataclasses.replace(correction, text=text, token_ids=[], fallback=True)
