"""`lmcor train-corrector`: pairs and an LLM -> a corrector trained on that LLM's candidates (see
`lmcor.recipes.corrector`)."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from . import options
from .lines import EXIT_SIGNAL
from .signals import sigterm_as_interrupt

MOST_MINUTES = 525_600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help='JSONL file of {"source", "target"} lines (with "candidates" when there is no --llm)')
    parser.add_argument("--out", required=True, help="folder for every stage's work, resumed when run again")
    parser.add_argument("--llm", help="causal-LM bundle whose candidates the corrector learns to correct "
                        "(default: the candidates in the pairs file)")
    parser.add_argument("-k", type=options.candidate_count, help="with --llm: candidates per source, 1 greedy + K-1 "
                        "samples (default: 5)")
    parser.add_argument("--temperature", type=options.finite_float, help="with --llm: of the samples (default: 0.6)")
    parser.add_argument("--prompt", help="with --llm: its prompt, with {source} (default: lmcor candidates' few-shot "
                        "prompt)")
    parser.add_argument("--llm-batch-size", type=options.batch_size, help="with --llm: prompts per batch, at most "
                        f"{options.MAX_BATCH_SIZE} (default: 16)")
    parser.add_argument("--max-new-tokens", type=options.positive_int, help="with --llm: of each candidate, at most the LLM "
                        "bundle's max output tokens (default: that, or as many as fit after the prompt); a source "
                        "whose prompt leaves less room is reported and left out")
    parser.add_argument("--size", help="from-scratch model: tiny, small or base (default: small)")
    parser.add_argument("--init", help="fine-tune this T5/BART checkpoint folder instead of training from scratch")
    parser.add_argument("--synthetic", type=options.finite_float, default=0.0, help="share of training examples with "
                        "synthetic candidates over the pairs' targets (default: %(default)s)")
    parser.add_argument("--held-out", type=options.finite_float, default=0.1, help="share of pairs kept for dev and "
                        "test; a resumed run needs the same (default: %(default)s)")
    parser.add_argument("--minutes", type=options.finite_float, default=60.0, help="training time (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="for training (default: %(default)s)")
    parser.add_argument("--max-line-bytes", type=options.positive_int, default=options.DEFAULT_MAX_LINE_BYTES,
                        help="a longer line of the pairs file is reported and skipped (default: %(default)s)")
    parser.add_argument("--restart", action="store_true", help="train from the start instead of resuming OUT's "
                        "checkpoint: clears what train-corrector wrote there, except the candidates")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from lmcor.recipes import corrector
    from lmcor.runtime.bundle import not_utf8
    from lmcor.runtime.errors import InputError

    if not 0 <= args.synthetic <= 1:
        raise InputError(f"--synthetic must be a share from 0 to 1, got {args.synthetic}")
    if not corrector.LEAST_HELD_OUT <= args.held_out < 1:
        raise InputError(f"--held-out must be a share from {corrector.LEAST_HELD_OUT:g} to below 1, got {args.held_out:g}")
    if not 0 < args.minutes <= MOST_MINUTES:
        raise InputError(f"--minutes must be above 0 and at most {MOST_MINUTES} (a year), got {args.minutes:g}")
    for flag, value in (("--out", args.out), ("--llm", args.llm), ("--init", args.init)):
        if value is not None and not value.strip():
            raise InputError(f"{flag} is empty: give a folder")
    if (why := not_utf8(args.out)) is not None:  # (--llm and --init: refused where bundles and checkpoints are read)
        raise InputError(f"--out {args.out}: {why}")  # before it is written, not when its tokenizer is saved
    if args.init is not None and args.size is not None:
        raise InputError("--size is for a model trained from scratch: --init's checkpoint has its own shape")
    given = [flag for flag, value in (("-k", args.k), ("--temperature", args.temperature), ("--prompt", args.prompt),
                                      ("--llm-batch-size", args.llm_batch_size), ("--max-new-tokens", args.max_new_tokens))
             if value is not None]
    if given and not args.llm:
        raise InputError(f"{given[0]} needs --llm: without it the pairs file's own candidates are read")
    if not args.quiet:
        logging.getLogger("lmcor").setLevel(min(logging.INFO, logging.getLogger("lmcor").level))
    given_llm = {"k": args.k, "temperature": args.temperature, "batch_size": args.llm_batch_size}  # else `Job`'s
    job = corrector.Job(pairs=Path(args.pairs), out=Path(args.out), llm=Path(args.llm) if args.llm else None,
                        prompt=args.prompt, size=args.size if args.size is not None else "small",
                        init=Path(args.init) if args.init else None, synthetic=args.synthetic, held_out=args.held_out,
                        minutes=args.minutes, device=args.device, resume=not args.restart,
                        max_new_tokens=args.max_new_tokens, quiet=args.quiet, max_line_bytes=args.max_line_bytes,
                        **{name: value for name, value in given_llm.items() if value is not None})
    with sigterm_as_interrupt() as terminated:  # as Ctrl-C: training keeps the step it reached
        try:
            result = corrector.run(job)
        except KeyboardInterrupt:
            if terminated:
                return EXIT_SIGNAL[signal.SIGTERM]
            raise  # Ctrl-C: 130, as every command
    print(corrector.table(result))
    return 0
