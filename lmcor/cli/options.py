"""Option groups that several commands share, each defined once."""

from __future__ import annotations

import argparse
import math
from collections.abc import Collection
from typing import Any

from lmcor.runtime.options import MAX_BATCH_SIZE

# A JSONL line longer than this is an error record, not a request (a corrector reads a few
# hundred tokens; a line this long is a mistake, and would cost time and memory to tokenize).
DEFAULT_MAX_LINE_BYTES = 4 << 20
DEFAULT_MAX_WAIT_MS = 20.0
MAX_WAIT_MS = 3_600_000.0  # an hour: a batch waiting longer for its lines is a mistake (and past ~1e13 ms, the OS's timeouts overflow)


def int_range(least: int, what: str, most: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = int_range(1, "a positive integer")
batch_size = int_range(1, f"an integer from 1 to {MAX_BATCH_SIZE}", MAX_BATCH_SIZE)
non_negative_int = int_range(0, "an integer >= 0")
# Candidates per source: LMCor samples 5; a corrector reads them all in one input of a few hundred tokens.
MAX_K = 64
candidate_count = int_range(1, f"an integer from 1 to {MAX_K}", MAX_K)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def probability(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability from 0 to 1, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def wait_ms(text: str) -> float:
    value = non_negative_float(text)
    if value > MAX_WAIT_MS:
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds from 0 to {MAX_WAIT_MS:.0f} (an hour), got {text}")
    return value


def add_lines(parser: argparse.ArgumentParser, fields: str) -> None:
    """Input, output and the line pipeline's limits (`lines.answer_lines`)."""
    parser.add_argument("input", nargs="?", help=f"JSONL file of {fields} lines; - for stdin (a pipe or FIFO works too)")
    parser.add_argument("-o", "--output", help="JSONL file to write (default: stdout); written beside it and put in "
                        "its place when the run ends, or is interrupted after some records (which --resume continues)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted -o file: keep its complete records, answer only the lines after them")
    parser.add_argument("--max-line-bytes", type=positive_int, default=DEFAULT_MAX_LINE_BYTES,
                        help="a longer line gets an error record (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=wait_ms, default=DEFAULT_MAX_WAIT_MS,
                        help="a batch starts at most this long after its first line arrived, so lines fed one at a "
                        "time are answered at once (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, help="intra-op threads (default: one per core)")
    parser.add_argument("--providers", help="comma-separated ONNX Runtime providers (default: CUDA if usable, else CPU)")


def add_ray(parser: argparse.ArgumentParser, what: str) -> None:
    """Scale out on Ray (`lmcor.integrations.ray`; `pip install 'lmcor[ray]'`)."""
    parser.add_argument("--ray", action="store_true", help=f"{what} (needs the ray extra; see docs/ray.md)")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local one started "
                        "for this run)")


def ray_only(args: argparse.Namespace, *names: str) -> None:
    """Refuse `names` (flags left at None unless given) without --ray."""
    from lmcor.runtime.errors import InputError

    given = [name for name in ("ray_address", *names) if getattr(args, name) is not None]
    if given and not args.ray:
        raise InputError(f"--{given[0].replace('_', '-')} needs --ray")


def providers(args: argparse.Namespace) -> list[str] | None:
    """--providers as a list; None (the default) when not given. Given, it must name some."""
    from lmcor.runtime.errors import InputError

    if args.providers is None:
        return None
    names = [p.strip() for p in args.providers.split(",")]
    if not all(names):
        raise InputError(f"--providers must be comma-separated ONNX Runtime provider names such as "
                         f"CPUExecutionProvider, got {args.providers!r}")
    return names


def refuse_options(value: dict, flags: dict[str, str], served: Collection[str] = ()) -> None:
    """Refuse a line that holds one of a command's options (field -> its flag): on the command line
    options are the run's, and one that a line asks for would otherwise be silently ignored. (`served`:
    those `lmcor serve` takes per request.)"""
    from lmcor.runtime.errors import InputError

    asked = sorted(flags.keys() & value.keys())
    if asked:
        field = asked[0]
        raise InputError(f"field {field!r} is an option of the whole run here ({flags[field]}), not of one line"
                         + (" (lmcor serve takes options per request)" if field in served else ""))


def _flags(*names: str, **special: str) -> dict[str, str]:
    return {**{name: "--" + name.replace("_", "-") for name in names}, **special}


# Request fields that are the commands' flags here (`lmcor serve` takes the correction ones, and the
# sampling ones but `drafts`, per request).
CORRECTION_FLAGS = _flags("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "no_repeat_ngram_size",
                          "gate_threshold", "fallback_below", "fallback_span", drafts="--no-drafts")
SAMPLING_FLAGS = _flags("max_new_tokens", "temperature", "top_p", "seed", "stop", drafts="--no-drafts")


def add_correction(parser: argparse.ArgumentParser) -> None:
    """How a corrector decodes, with its gate and fallback (`lmcor correct`, `lmcor eval`)."""
    parser.add_argument("--model", help="corrector bundle folder (default: the corrector shipped with lmcor)")
    parser.add_argument("--batch-size", type=batch_size, default=16, help="requests per decoder batch (default: %(default)s)")
    parser.add_argument("--num-beams", type=positive_int, default=1, help="beam search with this many beams (default: greedy)")
    parser.add_argument("--length-penalty", type=finite_float, default=1.0, help="beam search's (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, help="default and maximum: the bundle's max output tokens")
    parser.add_argument("--min-new-tokens", type=non_negative_int, default=0, help="no EOS before this many tokens "
                        "(default: %(default)s)")
    parser.add_argument("--no-repeat-ngram-size", type=non_negative_int, help="ban repeated n-grams of this size "
                        "(default: the bundle's, from the checkpoint's generation config; 0: off)")
    parser.add_argument("--no-drafts", action="store_true", help="plain greedy: no drafts copied from the input "
                        "(outputs are identical either way; drafts need fewer decoder calls)")
    parser.add_argument("--gate", nargs="?", const="", help="skip the corrector where this classifier bundle (with a "
                        "'right' label; alone: the gate shipped with lmcor) finds the first candidate right, and return "
                        "that candidate; put it after the input file")
    parser.add_argument("--gate-threshold", type=finite_float, help="probability of 'right' needed to skip (default: "
                        "the threshold calibrated into the gate's bundle, else 0.5)")
    parser.add_argument("--fallback-below", type=finite_float, help="an output less similar than this to every "
                        "candidate is replaced by the best guess among source and candidates, and any output by the "
                        "candidates' edit vote where they support it more (chrF 0-100; default: the bundle's calibrated "
                        "value; 0: the model's output as it is)")
    parser.add_argument("--fallback-span", type=non_negative_int, help="the text returned keeps only its edits to the "
                        "source of at most this many words that fix a writer's error (default: the bundle's calibrated "
                        "value; 0: any edit)")
    add_runtime(parser)


def correction_options(args: argparse.Namespace, gate: Any) -> dict[str, Any]:
    """`Corrector.correct_batch`'s keywords from the `add_correction` options: one `CorrectionOptions`,
    the gate and the batch size."""
    from lmcor.runtime.request import CorrectionOptions

    options = CorrectionOptions(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                num_beams=args.num_beams,
                                length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                                drafts=not args.no_drafts, gate_threshold=args.gate_threshold,
                                fallback_below=args.fallback_below, fallback_span=args.fallback_span)
    return dict(options=options, gate=gate, batch_size=args.batch_size)


def require_input(given: str | None, hint: str = "") -> None:
    """The command's input argument must be given (optional to argparse, so that a missing one gets this
    message, and --gate's hint where a bare --gate took it)."""
    from lmcor.runtime.errors import InputError

    if given is None:
        raise InputError(f"no input file given (a JSONL file's path, or - for standard input{hint})")
    if not given:  # (" " is a file's name)
        raise InputError(f"the input file's path is empty (a JSONL file's path, or - for standard input{hint})")


def load_gate(args: argparse.Namespace, given: str | None):
    """The --gate classifier, if asked for. `given` is the command's input argument: a bare --gate
    written before it takes the input file as its bundle, which deserves a clear error."""
    from lmcor.runtime.errors import InputError

    hint = f"; --gate took {args.gate!r} as its bundle: put --gate after the input file" if given is None and args.gate else ""
    require_input(given, hint)
    if args.gate is None:
        if args.gate_threshold is not None:
            raise InputError("--gate-threshold needs --gate: without a gate nothing reads the threshold")
        return None
    from lmcor.runtime.bundle import shipped_bundle
    from lmcor.runtime.classifier import Classifier

    return Classifier.load(args.gate or shipped_bundle("gate"), providers=providers(args), threads=args.threads)


def add_sampling(parser: argparse.ArgumentParser, *, temperature: float, temperature_help: str) -> None:
    """A causal LM's decoding (`lmcor generate`, `lmcor candidates`)."""
    parser.add_argument("--model", required=True, help="causal-LM bundle folder")
    parser.add_argument("--max-new-tokens", type=positive_int,
                        help="at most the bundle's max output tokens (default: that, or as many as fit after a prompt)")
    parser.add_argument("--temperature", type=finite_float, default=temperature, help=f"{temperature_help} (default: %(default)s)")
    parser.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus sampling's mass (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="of the sampler (default: %(default)s)")
    parser.add_argument("--batch-size", type=batch_size, default=8, help="prompts per batch (default: %(default)s)")
    parser.add_argument("--no-drafts", action="store_true", help="greedy answers without drafts copied from the prompt "
                        "(the answers are identical either way; drafts need fewer decoder calls)")
    add_runtime(parser)
