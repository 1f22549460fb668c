"""`lmcor eval`: a corrector scored against its candidates on labelled data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from tqdm import tqdm

from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import InputError, LmcorError

from . import STDERR, options, say
from .lines import open_input, read_lines, refuse_folder_path, same_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", help='JSONL file of {"source", "candidates", "target"} lines; - for stdin')
    parser.add_argument("--json", default="lmcor-eval.json", help="where to write the scores (default: %(default)s)")
    parser.add_argument("--max-line-bytes", type=options.positive_int, default=options.DEFAULT_MAX_LINE_BYTES,
                        help="a longer line is reported and skipped (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    options.add_correction(parser)


def run(args: argparse.Namespace) -> int:
    from lmcor.bench import quality

    report_path = _report_path(args.json, args.data)
    gate = options.load_gate(args, args.data)
    corrector = Corrector.load(args.model, providers=options.providers(args), threads=args.threads)
    items, errors = [], []
    fd, owned = open_input(args.data)
    with open(fd, "rb", closefd=owned) as stream:
        for line in read_lines(stream.read, args.max_line_bytes):
            try:
                if isinstance(line.value, InputError):
                    raise line.value
                if isinstance(line.value, dict):
                    options.refuse_options(line.value, options.CORRECTION_FLAGS, served=options.CORRECTION_FLAGS)
                items.append(quality.item(line.value, line.number))
            except InputError as e:
                errors.append({"line": line.number, "error": str(e)})
                say(f"lmcor: {args.data}: line {line.number}: {e}")
    if not items:
        raise InputError(f"{args.data}: no usable lines")
    with tqdm(total=len(items), unit=" requests", file=STDERR, disable=args.quiet, desc="evaluating") as bar:
        chosen = options.correction_options(args, gate)
        report = quality.evaluate(corrector, items, progress=bar.update, **chosen)
    for skipped in report["skipped"]:
        say(f"lmcor: {args.data}: line {skipped['line']}: {skipped['error']} (left out of the scores)")
    if not report["items"]:
        raise InputError(f"{args.data}: the corrector could take none of its {len(items)} usable lines (above: why)")
    errors = sorted(errors + report.pop("skipped"), key=lambda e: e["line"])
    # what ran: a "model alone" run (--fallback-below 0) is told apart by more than its fallback count
    report.update(data=str(args.data), model=str(corrector.root), errors=errors,
                  options={**dataclasses.asdict(chosen["options"]), "batch_size": chosen["batch_size"]})
    if gate is not None:
        report["gate"] = str(gate.root)
    try:  # the scores first: a reader of the table that leaves (or a full disk) does not lose them
        report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise InputError(f"--json {args.json}: cannot write the scores ({e.strerror or e})") from None
    try:
        print(quality.table(report), flush=True)
    except BrokenPipeError:
        raise  # a reader that left: the exit status says so
    except OSError as e:
        raise LmcorError(f"standard output: cannot write the table ({e.strerror or e}); the scores are in "
                         f"{report_path}") from None
    return 1 if errors else 0


def _report_path(name: str, data: str | None) -> Path:
    """`--json`, checked before the evaluation runs: a file that can be written (its folder exists,
    and takes it), and not the data itself."""
    path = Path(name)
    if not name:
        raise InputError("--json is empty; give a file's path")
    if name == "-":
        raise InputError("--json -: standard output gets the table; give a file's path for the scores")
    refuse_folder_path("--json", name)
    if path.is_dir():
        raise InputError(f"--json {name} is a directory; give a file's path")
    if not path.parent.is_dir():
        raise InputError(f"--json {name}: its folder does not exist")
    if data is not None and path.exists() and same_file(data, os.stat(path)):
        what = "the data file" if data != "-" else "what standard input reads (the data)"
        raise InputError(f"--json {name} is {what}; write the scores to another file")
    if path.exists() and not path.is_file():  # a pipe, a FIFO, a device: written in place at the end, not probed
        return path  # (a probe would end a FIFO's reader, or wait for one before any work)
    existed = path.exists()
    probe = Path(os.path.realpath(path))  # a link to a file not written yet: the file it names
    try:
        with open(probe, "a", encoding="utf-8"):  # opened to append: an earlier report stays until the new one
            pass
    except OSError as e:
        raise InputError(f"--json {name}: cannot write there ({e.strerror or e})") from None
    if not existed:
        probe.unlink()
    return path
