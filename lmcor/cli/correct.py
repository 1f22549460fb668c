"""`lmcor correct`: JSONL requests in, one corrected record per line out, in input order."""

from __future__ import annotations

import argparse
from typing import Any

from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import InputError
from lmcor.runtime.request import Correction, as_request
from lmcor.runtime.scheduler import EngineStats

from . import options, say
from .lines import RecordFields, answer_lines


def line_request(value: dict, _number: int) -> Any:
    """A line's request. Its fields other than the request's are left alone (an eval line's target,
    `lmcor candidates`' line number), but an option in a line is refused (`options.refuse_options`)."""
    options.refuse_options(value, options.CORRECTION_FLAGS, served=options.CORRECTION_FLAGS)
    return as_request(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_lines(parser, '{"id"?, "source", "candidates"}')
    options.add_correction(parser)
    parser.add_argument("--stats", action="store_true", help="print decoder calls and drafted/accepted tokens at the end")
    options.add_ray(parser, "correct a file on Ray Data workers, each with its own bundle and --threads (default "
                    "there: the cluster's CPUs shared among the workers)")
    parser.add_argument("--workers", type=options.positive_int, help="with --ray: how many (default: 1)")


FIELDS = RecordFields(frozenset({"output", "truncated", "input_tokens", "output_tokens"}), frozenset({"gated", "fallback"}))


def record(number: int, ident: Any, result: Correction) -> dict:
    return {
        "id": ident,
        "line": number,
        "output": result.text,
        "truncated": result.truncated,
        "input_tokens": result.stats.input_tokens,
        "output_tokens": result.stats.output_tokens,
        **({"gated": True} if result.gated else {}),
        **({"fallback": True} if result.fallback else {}),
    }


class _Totals:
    """A run's requests, summed from their own stats; the models' calls and time come from the engine's."""

    def __init__(self) -> None:
        self.requests = self.gated = self.fallbacks = self.generated = self.drafted = self.accepted = 0

    def add(self, results: list) -> None:
        for r in results:
            if isinstance(r, Correction) and r.gated:
                self.gated += 1
            elif isinstance(r, Correction):
                s = r.stats
                self.requests += 1
                self.fallbacks += r.fallback
                self.generated += s.output_tokens + 1  # + the EOS step
                self.drafted += s.drafted_tokens
                self.accepted += s.accepted_tokens

    def summary(self, engine: EngineStats) -> str:
        share = f" ({100 * self.accepted / self.drafted:.0f}%)" if self.drafted else ""
        gated = f" ({self.gated} more passed by the gate)" if self.gated else ""
        fallbacks = f", {self.fallbacks} replaced by the fallback" if self.fallbacks else ""
        calls = engine.decoder_calls
        return (f"lmcor: {self.requests} requests corrected{gated}{fallbacks}, {self.generated} generated tokens (EOS included), "
                f"{calls} decoder calls ({calls / max(1, self.generated):.3f} per token), "
                f"{self.drafted} drafted tokens, {self.accepted} accepted{share}, "
                f"{engine.encoder_s + engine.decoder_s:.2f} s in the model")


def run(args: argparse.Namespace) -> int:
    options.ray_only(args, "workers")
    if args.ray:
        return _run_on_ray(args)
    gate = options.load_gate(args, args.input)
    corrector = Corrector.load(args.model, providers=options.providers(args), threads=args.threads)
    decode = options.correction_options(args, gate)
    totals, before = _Totals(), corrector.engine.stats

    def answer(requests: list) -> list:
        results = corrector.correct_batch(requests, errors="return", **decode)
        totals.add(results)
        return results

    def recount() -> None:  # --resume answered a line again to check the file: not this run's
        nonlocal totals, before
        totals, before = _Totals(), corrector.engine.stats

    code = answer_lines(args, line_request, answer, record, "correcting", FIELDS, recount=recount)
    if args.stats:
        say(totals.summary(corrector.engine.stats - before))
    return code


def _run_on_ray(args: argparse.Namespace) -> int:
    """The same records, from Ray Data workers (`lmcor.integrations.ray`)."""
    if args.stats:
        raise InputError("--stats counts one engine's calls; with --ray each worker has its own: drop --stats")
    options.load_gate(args, args.input)  # a bad gate or a missing input fails here, in one line
    try:
        from lmcor.integrations import ray
    except ImportError as e:
        raise InputError(f"lmcor correct --ray needs the ray extra: pip install 'lmcor[ray]' ({e})") from None
    decode = options.correction_options(args, None)
    return ray.correct_lines(args, decode["options"], workers=args.workers or 1, providers=options.providers(args),
                             address=args.ray_address)
