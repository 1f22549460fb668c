"""`lmcor candidates`: K candidates per source from a causal LM (1 greedy + K-1 samples, LMCor's
recipe), written in the corrector's input format so they pipe into `lmcor correct -`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmcor.runtime.candidates import Candidates, CandidateStats, CandidateWriter, FewShot, default_few_shot
from lmcor.runtime.errors import InputError
from lmcor.runtime.generator import Generator
from lmcor.runtime.options import check_stops

from . import options, say
from .generate import text_field
from .lines import RecordFields, answer_lines, refuse_folder_path, resumed_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_lines(parser, '{"id"?, "source"}')
    parser.add_argument("-k", type=options.candidate_count, default=5, help="candidates per source: 1 greedy + K-1 "
                        "samples (default: %(default)s)")
    parser.add_argument("--prompt", help="prompt with {source}; the part before it is run once and shared (default: "
                        "a few-shot correction prompt whose examples rotate between sources)")
    parser.add_argument("--stop", action="append", help="end an answer where its text contains this (repeatable; "
                        "default: a newline)")
    options.add_sampling(parser, temperature=0.6, temperature_help="of the K-1 samples")


FIELDS = RecordFields(frozenset({"source", "candidates"}))


def record(number: int, ident: Any, result: Candidates) -> dict:
    return {"id": ident, "line": number, "source": result.source, "candidates": result.texts}


def _check_resumed(output: Path, k: int, stops: tuple[str, ...]) -> dict | None:
    """An `-o` to resume must hold K candidates a source, none holding a stop string (this run cuts
    each answer before its first): one written with another -k or --stop is another run's. Returns
    the record to generate again (`_check_same_run`): its last with candidates that differ, else its
    last (None: none). Samples all alike would come out alike under another seed or temperature."""
    last = telling = None
    with open(output, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                continue  # a torn last line, answered again (`Output` refuses anything else)
            if not (isinstance(record, dict) and "line" in record and FIELDS.match(record)
                    and isinstance(record.get("candidates"), list)):
                continue  # an error record; or another command's, which `Output` refuses
            written = record["candidates"]
            if len(written) != k:
                raise InputError(f"--resume: -o {output} holds {len(written)} candidates a source, and -k is {k}: "
                                 "it was written by another run (remove it, or run without --resume)")
            stop = next((s for s in stops for c in written if isinstance(c, str) and s in c), None)
            if stop is not None:
                raise InputError(f"--resume: {output}: the answer to input line {record['line']} holds a candidate "
                                 f"with {stop!r} in it, where this run's --stop ends an answer: it was written with "
                                 "another --stop (give the same, or remove it)")
            if isinstance(record.get("source"), str):
                last = record
                if len({c for c in written if isinstance(c, str)}) > 1:
                    telling = record
    return telling or last


def _check_same_run(output: Path, last: dict, writer: CandidateWriter) -> None:
    """The kept records must be this run's, else the file would mix two runs' candidates: its
    candidates for their last source are generated again (a source's depend on it, the model and the
    options alone) and most must be theirs. (Not all: another batch shape may round a near tie the
    other way on some devices; another prompt, temperature or seed changes nearly every sample.)"""
    [again] = writer([last["source"]])
    if isinstance(again, InputError):  # the file answers it: this run's options are not the ones it was written with
        raise InputError(f"--resume: {output}: this run cannot answer the source of input line {last.get('line')} "
                         f"({again}), which the file answers: it was written with another --stop, --prompt or "
                         "--max-new-tokens (give the same, or remove it)")
    same = sum(a == b for a, b in zip(again.texts, last["candidates"]))
    if 2 * same <= len(last["candidates"]):
        raise InputError(f"--resume: {output}: the answer to input line {last.get('line')} holds other candidates "
                         "than this run writes for its source: it was written with another model, --prompt, "
                         "--temperature, --top-p, --seed, --stop or --max-new-tokens (give the same, or remove it)")


# A line's options are the run's: these fields are flags here. (Not `prompt`: a data set's line may
# well hold the prompt it was made with.)
LINE_OPTIONS = {**options.SAMPLING_FLAGS, "k": "-k"}


def _source(value: dict, _number: int) -> str:
    options.refuse_options(value, LINE_OPTIONS)
    return text_field(value, "source")


def run(args: argparse.Namespace) -> int:
    options.require_input(args.input)
    if args.output:  # said first: the checks of --resume below read it as a file
        refuse_folder_path("-o", args.output)
    resumed = resumed_from(args.output) if args.resume and args.output else None
    # checked before the file is read: of an empty one, every candidate "holds" it
    stops = check_stops(args.stop) if args.stop else ("\n",)
    last = _check_resumed(resumed, args.k, stops) if resumed is not None and resumed.is_file() else None
    few_shot = FewShot.from_template(args.prompt) if args.prompt is not None else default_few_shot()
    generator = Generator.load(args.model, providers=options.providers(args), threads=args.threads)
    writer = CandidateWriter(generator, few_shot, k=args.k, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             stop=stops, drafts=not args.no_drafts)
    if last is not None:
        _check_same_run(resumed, last, writer)
        writer.stats = CandidateStats()  # the summary counts this run's lines, not the check's source
    code = answer_lines(args, _source, writer, record, "generating", FIELDS, echo="source", batches_per_chunk=1,
                        check_again=False)  # `_check_same_run` above: on the record that tells runs apart
    if not args.quiet:
        say(f"lmcor: {writer.stats.summary()}")
    return code
