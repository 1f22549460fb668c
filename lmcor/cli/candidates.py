"""`lmcor candidates`: K candidates per source from a causal LM (1 greedy + K-1 samples, LMCor's
recipe), written in the corrector's input format so they pipe into `lmcor correct -`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lmcor.runtime.errors import InputError
from lmcor.runtime.generator import Generator

from . import options
from .generate import sampling_options, text_field
from .lines import answer_lines

# LMCor's setting: an LLM few-shot prompted to correct a sentence. The part before {source} is shared.
DEFAULT_PROMPT = (
    "Correct the grammar and spelling of each sentence.\n"
    "Sentence: she go to school every days\nCorrected: She goes to school every day.\n"
    "Sentence: The results was suprising.\nCorrected: The results were surprising.\n"
    "Sentence: {source}\nCorrected:"
)


@dataclass(frozen=True)
class Candidates:
    source: str
    candidates: list[str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_lines(parser, '{"id"?, "source"}')
    parser.add_argument("-k", type=options.positive_int, default=5, help="candidates per source: 1 greedy + K-1 "
                        "samples (default: %(default)s)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt with {source}; the part before it is run "
                        "once and shared by every request (default: a few-shot correction prompt)")
    options.add_sampling(parser, temperature=0.6, temperature_help="of the K-1 samples")


def record(number: int, ident: Any, result: Candidates) -> dict:
    return {"id": ident, "line": number, "source": result.source, "candidates": result.candidates}


def run(args: argparse.Namespace) -> int:
    if "{source}" not in args.prompt:
        raise InputError("--prompt must contain {source}")
    generator = Generator.load(args.model, providers=options.providers(args), threads=args.threads)
    head, tail = args.prompt.split("{source}", 1)
    prefix = generator.prefix(head) if head else None

    def answer(sources: list) -> list:
        prompts = [source + tail for source in sources]
        decode = dict(prefix=prefix, **sampling_options(args))
        rounds = [generator.generate_batch(prompts, **decode)]  # LMCor: one greedy output ...
        for k in range(1, args.k):  # ... and K-1 samples
            rounds.append(generator.generate_batch(prompts, temperature=args.temperature, seed=args.seed + k, **decode))
        return [Candidates(source, [r[i].text.strip().split("\n")[0] for r in rounds]) for i, source in enumerate(sources)]

    return answer_lines(args, lambda value: text_field(value, "source"), answer, record, "generating")
