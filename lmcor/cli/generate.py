"""`lmcor generate`: JSONL prompts in, one continuation per line out."""

from __future__ import annotations

import argparse
from typing import Any

from lmcor.runtime.errors import InputError
from lmcor.runtime.generator import Generation, Generator, row_seed
from lmcor.runtime.options import check_words

from . import options
from .lines import RecordFields, answer_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_lines(parser, '{"id"?, "prompt"}')
    options.add_sampling(parser, temperature=0.0, temperature_help="0: greedy")
    parser.add_argument("--stop", action="append", help="end an answer where its text contains this (repeatable)")
    parser.add_argument("--prefix", help="text put before every prompt, run once and shared")


# A line's options are the run's: these fields of lmcor serve's bodies are flags here. (Not `model`:
# a line may well name the model its prompt is about, and --model is required anyway.)
LINE_OPTIONS = {**options.SAMPLING_FLAGS, "prefix": "--prefix"}
SERVED = ("max_new_tokens", "temperature", "top_p", "seed", "stop")  # what /v1/generate takes per request


def text_field(value: dict, name: str) -> str:
    if name not in value:
        raise InputError(f"missing field {name!r}")
    return check_words(f"field {name!r}", value[name])


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, top_p=args.top_p, batch_size=args.batch_size,
                drafts=not args.no_drafts)


def line_seed(seed: int, number: int) -> int:
    """A line's sampling seed: `--seed` and its line number alone, whichever lines share its batch
    (a pipe's lines come in ones and twos; --resume starts mid-file). A whole file with no blank
    line, in one batch, samples as `Generator.generate_batch(seed=seed)` does."""
    return row_seed(seed, number - 1)


FIELDS = RecordFields(frozenset({"output", "output_tokens"}))


def record(number: int, ident: Any, result: Generation) -> dict:
    return {"id": ident, "line": number, "output": result.text, "output_tokens": len(result.token_ids)}


def run(args: argparse.Namespace) -> int:
    options.require_input(args.input)
    generator = Generator.load(args.model, providers=options.providers(args), threads=args.threads)
    try:
        prefix = generator.prefix(args.prefix) if args.prefix is not None else None
    except InputError as e:
        raise InputError(f"--prefix: {e}") from None

    run_options = dict(temperature=args.temperature, prefix=prefix, stop=tuple(args.stop or ()), errors="return",
                       **sampling_options(args))
    generator.generate_batch([], seed=[], **run_options)  # the options checked now, not when a first line comes

    def prompt(value: dict, number: int) -> tuple[str, int]:
        options.refuse_options(value, LINE_OPTIONS, served=SERVED)
        return text_field(value, "prompt"), line_seed(args.seed, number)

    def answer(prompts: list[tuple[str, int]]) -> list:
        return generator.generate_batch([text for text, _ in prompts], seed=[seed for _, seed in prompts], **run_options)

    return answer_lines(args, prompt, answer, record, "generating", FIELDS, batches_per_chunk=1)
