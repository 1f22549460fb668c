"""Output quality of a corrector against the baselines it must beat (`lmcor eval`).

For each line `{"source", "candidates", "target"}` of a data file, six systems are scored with
exact match and chrF (sacrebleu, corpus level): (a) the source left as it is, (b) the first
candidate (the LLM's greedy output), (c) the consensus candidate (highest mean sentence chrF to
the other candidates), (d) the candidates' edits to the source that at least two of them make
(`runtime.vote.edit_vote`), (e) the oracle best candidate (highest sentence chrF to the target: an
upper bound for any selector), and (f) the corrector. Sentence chrF is `runtime.fallback.chrf`, sacrebleu's own
sentence score computed once per text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import InputError, LmcorError
from lmcor.runtime.fallback import char_ngrams, chrf
from lmcor.runtime.jsonl import blank, json_kind, parse_line
from lmcor.runtime.request import as_request
from lmcor.runtime.spacing import with_source_spacing
from lmcor.runtime.vote import edit_vote

SYSTEMS = ("source", "first candidate", "consensus candidate", "edit vote", "oracle candidate", "corrector")


@dataclass(frozen=True)
class Item:
    line: int
    source: str
    candidates: tuple[str, ...]
    target: str


def _chrf():
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        raise LmcorError("`lmcor eval` needs sacrebleu: pip install 'lmcor[eval]'") from None
    return CHRF()


def item(value: Any, line: int) -> Item:
    """The Item of one data line's JSON value; `InputError` names what is wrong with it."""
    if not isinstance(value, dict):
        raise InputError(f"expected a JSON object with 'source', 'candidates' and 'target', got {json_kind(value)}")
    request = as_request(value)
    target = value.get("target")
    if not isinstance(target, str):
        raise InputError("field 'target' must be a string" if "target" in value else "missing field 'target'")
    if not target.strip():
        raise InputError("field 'target' is empty (a correction is never empty)")
    return Item(line, request.source, request.candidates, target)


def read_items(path: Path) -> tuple[list[Item], list[dict]]:
    """Good items and error records ({"line", "error"}) of a JSONL data file."""
    items, errors = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if blank(raw, first=number == 1):
                continue
            try:
                items.append(item(parse_line(raw, first=number == 1), number))
            except InputError as e:
                errors.append({"line": number, "error": str(e)})
    return items, errors


def fit(corrector: Corrector, items: Sequence[Item]) -> tuple[list[Item], list[dict]]:
    """The items `corrector` can read (whole, or cut as its template allows), and error records
    ({"line", "error"}) of the others, as `read_items` gives them for bad lines. Tokenizes only."""
    from lmcor.runtime.request import Request
    from lmcor.runtime.tokens import encode_requests

    m = corrector.manifest
    encoded = encode_requests(corrector.tokenizer, m.template, [Request(i.source, i.candidates) for i in items],
                              m.max_input_tokens)
    good = [i for i, e in zip(items, encoded) if not isinstance(e, InputError)]
    return good, [{"line": i.line, "error": str(e)} for i, e in zip(items, encoded) if isinstance(e, InputError)]


def consensus(candidates: Sequence[str]) -> str:
    """The candidate with the highest mean sentence chrF to the others (the first on ties)."""
    grams = [char_ngrams(c) for c in candidates]
    scores = [sum(chrf(g, o) for j, o in enumerate(grams) if j != i) for i, g in enumerate(grams)]
    return candidates[scores.index(max(scores))]


def oracle(candidates: Sequence[str], target: str) -> str:
    """The candidate with the highest sentence chrF to the target; on ties, one that matches it exactly
    (chrF reads no spaces: "home ." scores as "home."), else the first."""
    reference = char_ngrams(target)
    scores = [(chrf(char_ngrams(c), reference), same_words(c, target)) for c in candidates]
    return candidates[scores.index(max(scores))]


def same_words(output: str, target: str) -> bool:
    """Exact match: the same words and punctuation, whatever white space separates them ("home ." is
    still not "home."). A decoded output and the edit vote are spaced anew, while a candidate or the
    source returned keeps a trailing space or line break of its own: raw equality would score the
    same sentence differently by its system."""
    return output.split() == target.split()


def score(outputs: Sequence[str], targets: Sequence[str], corpus_chrf=None) -> dict[str, float]:
    """Exact match (`same_words`) and corpus chrF (sacrebleu) of `outputs`, in percent."""
    corpus_chrf = corpus_chrf or _chrf()
    return {
        "exact_match": 100.0 * sum(map(same_words, outputs, targets)) / max(1, len(targets)),
        "chrf": corpus_chrf.corpus_score(list(outputs), [list(targets)]).score,
    }


def evaluate(corrector: Corrector, items: Sequence[Item], **options) -> dict:
    """Scores of the six systems on `items`; `options` go to `Corrector.correct_batch`. An item the
    corrector cannot take (its source longer than the model reads) is left out of every system's
    scores, and listed under "skipped" ({"line", "error"}); with none left, the report has no "systems"."""
    corpus_chrf = _chrf()
    answers = corrector.correct_batch([(i.source, i.candidates) for i in items], errors="return", **options)
    skipped = [{"line": i.line, "error": str(a)} for i, a in zip(items, answers) if isinstance(a, InputError)]
    items = [i for i, a in zip(items, answers) if not isinstance(a, InputError)]
    corrected = [a for a in answers if not isinstance(a, InputError)]
    if not items:
        return {"items": 0, "skipped": skipped}
    targets = [i.target for i in items]
    outputs = {
        "source": [i.source for i in items],
        "first candidate": [i.candidates[0] for i in items],
        "consensus candidate": [consensus(i.candidates) for i in items],
        # its words with the source's line breaks and tabs put back, as the corrector's fallback writes them
        "edit vote": [with_source_spacing(i.source, edit_vote(i.source, i.candidates)) for i in items],
        "oracle candidate": [oracle(i.candidates, i.target) for i in items],
        "corrector": [c.text for c in corrected],
    }
    report = {"items": len(items), "systems": {name: score(outputs[name], targets, corpus_chrf) for name in SYSTEMS}}
    if options.get("gate") is not None:
        report["gated"] = sum(c.gated for c in corrected)
    report["fallbacks"] = sum(c.fallback for c in corrected)
    report["skipped"] = skipped
    return report


def table(report: dict) -> str:
    rows = [f"{'system':<22} {'exact match':>11} {'chrF':>7}"]
    for name in SYSTEMS:
        s = report["systems"][name]
        rows.append(f"{name:<22} {s['exact_match']:>11.2f} {s['chrf']:>7.2f}")
    if "gated" in report:
        rows.append(f"(the gate passed {report['gated']} of {report['items']} first candidates without correction)")
    if report.get("fallbacks"):
        rows.append(f"({report['fallbacks']} of {report['items']} outputs changed by the fallback: a best guess, the "
                    "edit vote, or edits kept small)")
    return "\n".join(rows)
