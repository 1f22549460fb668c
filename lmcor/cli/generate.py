"""`lmcor generate`: JSONL prompts in, one continuation per line out."""

from __future__ import annotations

import argparse
from typing import Any

from lmcor.runtime.errors import InputError
from lmcor.runtime.generator import Generation, Generator

from . import options
from .lines import answer_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_lines(parser, '{"id"?, "prompt"}')
    options.add_sampling(parser, temperature=0.0, temperature_help="0: greedy")
    parser.add_argument("--prefix", help="text put before every prompt, run once and shared")


def text_field(value: dict, name: str) -> str:
    if name not in value:
        raise InputError(f"missing field {name!r}")
    if not isinstance(value[name], str) or not value[name].strip():
        raise InputError(f"field {name!r} must be a non-empty string")
    return value[name]


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, top_p=args.top_p, batch_size=args.batch_size,
                drafts=not args.no_drafts)


def record(number: int, ident: Any, result: Generation) -> dict:
    return {"id": ident, "line": number, "output": result.text, "output_tokens": len(result.token_ids)}


def run(args: argparse.Namespace) -> int:
    options.require_input(args.input)
    generator = Generator.load(args.model, providers=options.providers(args), threads=args.threads)
    prefix = generator.prefix(args.prefix) if args.prefix else None

    def answer(prompts: list) -> list:
        return generator.generate_batch(prompts, temperature=args.temperature, seed=args.seed, prefix=prefix,
                                        errors="return", **sampling_options(args))

    return answer_lines(args, lambda value: text_field(value, "prompt"), answer, record, "generating")
