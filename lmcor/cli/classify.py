"""`lmcor classify`: JSONL texts (or text pairs) in, one label record per line out."""

from __future__ import annotations

import argparse
from typing import Any

from lmcor.runtime.classifier import Classification, Classifier, as_texts

from . import options
from .lines import RecordFields, answer_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_lines(parser, '{"id"?, "text", "pair"?}')
    parser.add_argument("--model", required=True, help="classifier bundle folder")
    parser.add_argument("--batch-size", type=options.batch_size, default=32, help="texts per batch (default: %(default)s)")
    options.add_runtime(parser)


FIELDS = RecordFields(frozenset({"label", "probabilities", "truncated"}))


def record(number: int, ident: Any, result: Classification) -> dict:
    return {"id": ident, "line": number, "label": result.label, "probabilities": result.probabilities.tolist(),
            "truncated": result.truncated}


def _checked(value: dict, _number: int) -> dict:
    as_texts(value)
    return value


def run(args: argparse.Namespace) -> int:
    options.require_input(args.input)
    classifier = Classifier.load(args.model, providers=options.providers(args), threads=args.threads)

    def answer(items: list) -> list:
        return classifier.classify_batch(items, batch_size=args.batch_size, errors="return")

    return answer_lines(args, _checked, answer, record, "classifying", FIELDS)
