"""Calibrate a corrector bundle's fallback on the dev split and write it into the bundle.

    python -m lmcor.recipes.fallback BUNDLE [--dev recipes/splits/dev.jsonl --dev ...]

The corrector runs once over the dev requests without a fallback; then each threshold and span is
scored as `Corrector.correct_batch(fallback_below=..., fallback_span=...)` would apply them
(`runtime.fallback.guard`: an output whose chrF to its nearest candidate is below the threshold is
replaced by the best guess among the source and the candidates, the candidates' voted edits (kept to
`span` words) replace a text they support more or whose edits they make and add words respelled or
dropped to (`fallback.outvotes`), and the text keeps only its edits to the source of
at most `span` words that fix a writer's error and write words of the source or the candidates).
The pair kept scores within `--tolerance` of the best on exact match + chrF, with the lowest
threshold and then the largest span: as good as any, and changing the fewest outputs. The bundle's
`fallback_below` and `fallback_span` are then the defaults of `lmcor correct` and `eval`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tqdm import tqdm

from lmcor.cli import STDERR
from lmcor.runtime.errors import InputError

from . import command_line

log = logging.getLogger("lmcor.recipes")

SPLITS = Path(__file__).parent / "splits"
THRESHOLDS = (0, *range(50, 100))  # chrF; 0: never fall back
SPANS = (0, 1, 2, 3, 4, 6)  # words; 0: any edit kept


def calibrate(corrector, items, tolerance: float = 0.05, quiet: bool = False) -> tuple[float, int, list[dict]]:
    """The fallback threshold and largest kept edit (0: any) for `corrector` on `items`, with the scores
    of every pair tried. Both are chosen on exact match + chrF: chrF alone would trade exact
    corrections for character overlap. `quiet`: no progress bars."""
    from lmcor.bench.quality import score
    from lmcor.runtime.fallback import agreement, best_guess, nearest, outvotes, voters
    from lmcor.runtime.request import Request
    from lmcor.runtime.tokens import encode_requests
    from lmcor.runtime.vote import edit_vote, input_words, minimal_edits

    with tqdm(total=len(items), desc="decoding dev for the fallback", unit=" outputs", file=STDERR, disable=quiet,
              leave=False) as bar:
        items, answers = readable(corrector, items, "dev", "the calibration", progress=bar.update, fallback_below=0)
    requests = [Request(i.source, tuple(i.candidates)) for i in items]
    outputs = [a.text for a in answers]
    # What `fallback.guard` weighs, computed once: each threshold then only picks among them. As there,
    # an output is compared with the candidates as the model read them (cut where its input was), a
    # guess returns its candidate whole, and the vote reads the candidates `voters` gives.
    m = corrector.manifest
    seen = [x.candidates for x in encode_requests(corrector.tokenizer, m.template, requests, m.max_input_tokens)]
    similarity = [nearest(text, read)[1] for text, read in zip(outputs, seen)]
    guesses = [(item.source, *item.candidates)[best_guess(text, item.source, read)]
               for text, item, read in zip(outputs, items, seen)]
    vote_by = [voters(item.source, item.candidates, read) for item, read in zip(items, seen)]
    votes = [edit_vote(item.source, by) for item, by in zip(items, vote_by)]
    support = {}

    def supported(text: str, n: int) -> float:
        if (text, n) not in support:
            support[text, n] = agreement(text, vote_by[n])
        return support[text, n]

    decided, small = {}, {}

    def outvoted(text: str, vote: str, n: int) -> bool:
        if (text, vote, n) not in decided:  # each item's few texts and votes recur at every threshold
            decided[text, vote, n] = outvotes(items[n].source, text, vote, lambda t: supported(t, n))
        return decided[text, vote, n]

    known = [input_words(item.source, read) for item, read in zip(items, seen)]
    small_votes = {span: [minimal_edits(item.source, v, span, candidates=by) if span else v
                          for v, item, by in zip(votes, items, vote_by)]
                   for span in SPANS}
    targets = [i.target for i in items]
    tried = [{"threshold": 0, "span": 0, "fell_back": 0, **score(outputs, targets)}]  # threshold 0: no guard at all
    for threshold in tqdm(THRESHOLDS[1:], desc="calibrating the fallback", unit=" thresholds", file=STDERR,
                          disable=quiet, leave=False):
        for span in SPANS:
            kept = []
            for n, (output, s, guess, vote, item, words) in enumerate(
                    zip(outputs, similarity, guesses, small_votes[span], items, known)):
                text = output if s >= threshold else guess
                if outvoted(text, vote, n):
                    text = vote
                if (text, span, n) not in small:  # as the texts and votes recur, so do their small edits
                    small[text, span, n] = minimal_edits(item.source, text, span, words if text == output else None,
                                                         vote_by[n])
                kept.append(small[text, span, n])
            replaced = sum(k != o for k, o in zip(kept, outputs))
            tried.append({"threshold": threshold, "span": span, "fell_back": replaced, **score(kept, targets)})
    best = max(_objective(t) for t in tried)
    # As good as the best, and changing the fewest outputs: the lowest threshold, the largest span.
    good = [t for t in tried if _objective(t) >= best - tolerance]
    chosen = min(good, key=lambda t: (t["threshold"], -(t["span"] or float("inf"))))
    return chosen["threshold"], chosen["span"], tried


def _objective(scores: dict) -> float:
    return scores["exact_match"] + scores["chrf"]


def calibrate_bundle(bundle: Path, dev: Path | list[Path], tolerance: float = 0.05, quiet: bool = False) -> list[dict]:
    """Calibrate `bundle` on the dev file(s) `dev`, write the threshold and span into its manifest, and
    return the scores of every pair tried (the chosen one first). `quiet`: no progress bars."""
    from lmcor.runtime.bundle import update_manifest
    from lmcor.runtime.corrector import Corrector

    corrector = Corrector.load(bundle)
    items = []
    for path in dev if isinstance(dev, list) else [dev]:
        items += usable(corrector, path)
    if not items:
        raise InputError(f"{', '.join(map(str, dev if isinstance(dev, list) else [dev]))}: no usable dev line "
                         '({"source", "candidates", "target"}, within the corrector\'s input)')
    threshold, span, tried = calibrate(corrector, items, tolerance, quiet)
    update_manifest(bundle, fallback_below=float(threshold), fallback_span=span or None)
    chosen = next(t for t in tried if (t["threshold"], t["span"]) == (threshold, span))
    log.info("%s: fallback below chrF %d, %s (dev: %.2f chrF, %.2f exact match, %d outputs replaced; without: "
             "%.2f / %.2f)", bundle, threshold, f"edits of at most {span} words kept" if span else "edits of any size kept",
             chosen["chrf"], chosen["exact_match"],
             chosen["fell_back"], tried[0]["chrf"], tried[0]["exact_match"])
    return [chosen] + [t for t in tried if t is not chosen]


def usable(corrector, path: Path) -> list:
    """The lines of a data file that are good items the corrector can read; the others are said (how
    many, and the first) and left out."""
    from lmcor.bench.quality import fit, read_items

    items, bad = read_items(path)
    items, unfit = fit(corrector, items)
    bad = sorted(bad + unfit, key=lambda e: e["line"])
    if bad:
        log.warning("%s: %d lines left out (line %d: %s)", path, len(bad), bad[0]["line"], bad[0]["error"])
    return items


def readable(corrector, items: list, where: str, use: str, **options) -> tuple[list, list]:
    """The labelled `items` the corrector can read, and its corrections of them (`options` as for
    `correct_batch`, `progress` included); those too long for it are left out of `use`, and said."""
    answers = corrector.correct_batch([(i.source, i.candidates) for i in items], errors="return", **options)
    taken = [n for n, a in enumerate(answers) if not isinstance(a, InputError)]
    left = [n for n, a in enumerate(answers) if isinstance(a, InputError)]
    if left:
        log.warning("%s: %d of %d items are too long for the corrector: left out of %s (line %d: %s)", where,
                    len(left), len(items), use, items[left[0]].line, answers[left[0]])
    if not taken:
        raise InputError(f"{where}: no item fits the corrector's input: nothing for {use}")
    return [items[n] for n in taken], [answers[n] for n in taken]


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcor.recipes.fallback", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="corrector bundle folder (its manifest is rewritten)")
    parser.add_argument("--dev", type=Path, action="append", help="dev data (repeatable; default: "
                        "recipes/splits/dev.jsonl, dev-independent.jsonl and llm-dev.jsonl: synthetic candidates "
                        "with shared and with independent errors, and SmolLM2's)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="dev points (exact match + chrF) below the best "
                        "that still count as the best (default: %(default)s)")
    parser.add_argument("--report", type=Path, help="write every threshold's and span's dev scores to this JSON file")
    args = parser.parse_args(argv)
    if not 0 <= args.tolerance < 100:
        raise InputError(f"--tolerance must be dev points from 0 to 100, got {args.tolerance}")
    if args.report and (args.report.is_dir() or not args.report.parent.is_dir()):
        raise InputError(f"--report {args.report}: not a file that can be written (a folder, or its folder is missing)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tried = calibrate_bundle(args.bundle, args.dev or [SPLITS / f"{name}.jsonl" for name in ("dev", "dev-independent", "llm-dev")], args.tolerance)
    if args.report:
        args.report.write_text(json.dumps(tried, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
