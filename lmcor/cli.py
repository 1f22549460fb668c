"""The `lmcor` command line: `lmcor export`, `lmcor correct` and `lmcor eval`.

Errors of lmcor's own (bad bundle, failed export) print one line and exit with code 2. Bad input
lines of `lmcor correct` become error records in the output, every other line is still
corrected, and the command exits with code 1 at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from lmcor import __version__
from lmcor.runtime.bundle import Template, shipped_bundle
from lmcor.runtime.classifier import Classification
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import InputError, LmcorError
from lmcor.runtime.generator import Generation
from lmcor.runtime.request import Correction, as_request

EXIT_BAD_LINES = 1
EXIT_ERROR = 2


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcor", description="Serve small models that improve big ones.")
    parser.add_argument("--version", action="version", version=f"lmcor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what lmcor does")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export a Hugging Face checkpoint to a validated bundle")
    export.add_argument("model_dir", help="Hugging Face checkpoint folder (correctors: T5, T5 v1.1/Flan-T5, mT5, BART, "
                        "mBART; classifiers: BERT, RoBERTa, MiniLM, ...)")
    export.add_argument("out_dir", help="bundle folder to write")
    export.add_argument("--kind", choices=("corrector", "classifier", "causal-lm"), default="corrector")
    defaults = Template()
    export.add_argument("--template", default=defaults.text, help="input text with {source} and {candidates}")
    export.add_argument("--candidate", default=defaults.candidate, help="one candidate: {candidate}, {i} from 0, {n} from 1")
    export.add_argument("--separator", default=defaults.separator, help="text between rendered candidates")
    export.add_argument("--max-input-tokens", type=_positive_int, help="default: the tokenizer's or model's limit")
    export.add_argument("--max-output-tokens", type=_positive_int, default=256)
    export.add_argument("--opset", type=_positive_int, help="ONNX opset (default: the exporter's)")
    export.add_argument("--atol", type=float, default=1e-3, help="absolute logit tolerance of the validation")
    export.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="int8: int8 weights (correctors: activations quantized per row), validated and reported rather than exact")
    export.add_argument("--packed-encoder", action="store_true",
                        help="also write the encoder's weights for the Triton packed encoder (T5 family; used on CUDA)")
    export.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    correct = commands.add_parser("correct", help="correct JSONL requests with a corrector bundle")
    correct.add_argument("input", nargs="?", help='JSONL file of {"id"?, "source", "candidates"} lines; - for stdin')
    correct.add_argument("-o", "--output", help="JSONL file to write (default: stdout)")
    correct.add_argument("--model", help="bundle folder (default: the corrector shipped with lmcor)")
    correct.add_argument("--batch-size", type=_positive_int, default=16)
    correct.add_argument("--num-beams", type=_positive_int, default=1)
    correct.add_argument("--length-penalty", type=float, default=1.0)
    correct.add_argument("--max-new-tokens", type=_positive_int, help="default: the bundle's max output tokens")
    correct.add_argument("--threads", type=_positive_int, help="intra-op threads (default: one per core)")
    correct.add_argument("--providers", help="comma-separated ONNX Runtime providers (default: CUDA if usable, else CPU)")
    correct.add_argument("--no-repeat-ngram-size", type=int, help="ban repeated n-grams of this size (default: "
                         "the bundle's, from the checkpoint's generation config; 0: off)")
    correct.add_argument("--no-drafts", action="store_true", help="plain greedy: no drafts copied from the input "
                         "(outputs are identical either way; drafts need fewer decoder calls)")
    correct.add_argument("--gate", nargs="?", const="", help="skip the corrector where this classifier bundle (with "
                         "a 'right' label; alone: the gate shipped with lmcor) finds the first candidate right, and "
                         "return that candidate (see lmcor.recipes.gate)")
    correct.add_argument("--gate-threshold", type=float, help="probability of 'right' needed to skip (default: the "
                         "threshold calibrated into the gate's bundle, else 0.5)")
    correct.add_argument("--fallback-below", type=float, help="return the nearest candidate instead of an output less "
                         "similar than this to every candidate (chrF 0-100; default: the bundle's calibrated value; 0: off)")
    correct.add_argument("--stats", action="store_true", help="print decoder calls and drafted/accepted tokens at the end")
    correct.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    classify = commands.add_parser("classify", help="classify JSONL texts or text pairs with a classifier bundle")
    classify.add_argument("input", help='JSONL file of {"id"?, "text", "pair"?} lines; - for stdin')
    classify.add_argument("-o", "--output", help="JSONL file to write (default: stdout)")
    classify.add_argument("--model", required=True, help="classifier bundle folder")
    classify.add_argument("--batch-size", type=_positive_int, default=32)
    classify.add_argument("--threads", type=_positive_int, help="intra-op threads (default: one per core)")
    classify.add_argument("--providers", help="comma-separated ONNX Runtime providers (default: CUDA if usable, else CPU)")
    classify.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    generate = commands.add_parser("generate", help="continue JSONL prompts with a causal-LM bundle")
    generate.add_argument("input", help='JSONL file of {"id"?, "prompt"} lines; - for stdin')
    candidates = commands.add_parser("candidates", help="write K candidates per source with a causal-LM bundle, "
                                     "in the corrector's input format (pipe into `lmcor correct -`)")
    candidates.add_argument("input", help='JSONL file of {"id"?, "source"} lines; - for stdin')
    candidates.add_argument("-k", type=_positive_int, default=5, help="candidates per source: 1 greedy + K-1 samples")
    candidates.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt with {source}; the part before it is "
                            "run once and shared by every request (default: a few-shot correction prompt)")
    for command in (generate, candidates):
        command.add_argument("-o", "--output", help="JSONL file to write (default: stdout)")
        command.add_argument("--model", required=True, help="causal-LM bundle folder")
        command.add_argument("--max-new-tokens", type=_positive_int, help="default: the bundle's max output tokens")
        command.add_argument("--temperature", type=float, default=0.0 if command is generate else 0.6,
                             help="0: greedy" if command is generate else "of the K-1 samples")
        command.add_argument("--top-p", type=float, default=1.0)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--batch-size", type=_positive_int, default=8)
        command.add_argument("--threads", type=_positive_int, help="intra-op threads (default: one per core)")
        command.add_argument("--providers", help="comma-separated ONNX Runtime providers")
        command.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    generate.add_argument("--prefix", help="text put before every prompt, run once and shared")

    evaluate = commands.add_parser("eval", help="score a corrector against its candidates on labelled data")
    evaluate.add_argument("data", nargs="?", help='JSONL file of {"source", "candidates", "target"} lines')
    evaluate.add_argument("--model", help="bundle folder (default: the corrector shipped with lmcor)")
    evaluate.add_argument("--json", default="lmcor-eval.json", help="where to write the scores (default: %(default)s)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=16)
    evaluate.add_argument("--num-beams", type=_positive_int, default=1)
    evaluate.add_argument("--max-new-tokens", type=_positive_int, help="default: the bundle's max output tokens")
    evaluate.add_argument("--threads", type=_positive_int, help="intra-op threads (default: one per core)")
    evaluate.add_argument("--no-repeat-ngram-size", type=int, help="default: the bundle's; 0: off")
    evaluate.add_argument("--no-drafts", action="store_true", help="plain greedy (identical outputs, more decoder calls)")
    evaluate.add_argument("--gate", nargs="?", const="", help="score the corrector behind this gate (as for correct)")
    evaluate.add_argument("--gate-threshold", type=float, help="as for correct")
    evaluate.add_argument("--fallback-below", type=float, help="as for correct (0: score the corrector's own outputs)")

    from lmcor.bench.backends import BACKENDS
    from lmcor.bench.harness import BenchConfig
    from lmcor.bench.workloads import SHAPES

    d = BenchConfig()
    bench = commands.add_parser("bench", help="latency and throughput of lmcor and its peers, side by side")
    bench.add_argument("--shape", choices=sorted(SHAPES), default=d.shape, help="random-init T5 of this shape")
    bench.add_argument("--model", help="Hugging Face checkpoint folder to benchmark instead of --shape")
    bench.add_argument("--data", help="JSONL correction requests (default: random ids shaped by --source/--k/--candidate)")
    bench.add_argument("--backends", default=",".join(d.backends), help="comma-separated, from: " + ", ".join(BACKENDS))
    bench.add_argument("--threads", type=_positive_int, default=d.threads, help="for every backend (default: cores)")
    bench.add_argument("--requests", type=_positive_int, default=d.requests)
    bench.add_argument("--rounds", type=_positive_int, default=d.rounds)
    bench.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="for the throughput run")
    bench.add_argument("--source", type=_positive_int, default=d.source, help="source tokens S")
    bench.add_argument("--k", type=_positive_int, default=d.k, help="candidates K")
    bench.add_argument("--candidate", type=_positive_int, default=d.candidate, help="tokens per candidate C")
    bench.add_argument("--new-tokens", type=_positive_int, default=d.new_tokens, help="output tokens N")
    bench.add_argument("--natural", action="store_true", help="stop at EOS instead of forcing N tokens")
    bench.add_argument("--ragged", action="store_true", help="draw every length from [0.5x, 1.5x]")
    bench.add_argument("--no-sweeps", action="store_true", help="skip latency-vs-K and throughput-vs-batch")
    bench.add_argument("--out", default=str(d.out), help="folder for bench.json and the plots")
    bench.add_argument("--cache", default=str(d.cache), help="converted models are kept here")
    bench.add_argument("--drafts", action="store_true",
                       help="instead: drafts on vs off on --bundle over --data (--requests, --rounds, --batch-size)")
    bench.add_argument("--shared-prefix", action="store_true",
                       help="instead: a causal-LM --bundle with a rules prefix run once vs in every prompt")
    bench.add_argument("--gate", nargs="?", const="",
                       help="instead: the corrector (--bundle) alone vs behind this gate (alone: the gate shipped with "
                       "lmcor) over --data lines with targets (--requests, --rounds, --batch-size, --gate-threshold)")
    bench.add_argument("--gate-threshold", type=float, help="with --gate (default: the gate's calibrated threshold)")
    bench.add_argument("--prefix-tokens", type=_positive_int, default=500, help="with --shared-prefix")
    bench.add_argument("--bundle", help="with --drafts and --gate: corrector bundle folder (default: the corrector "
                       "shipped with lmcor); with --shared-prefix: a causal-LM bundle")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="lmcor: %(message)s")
    try:
        commands = {"export": _export, "correct": _correct, "classify": _classify, "generate": _generate,
                    "candidates": _candidates, "eval": _eval, "bench": _bench}
        return commands[args.command](args)
    except LmcorError as e:
        print(f"lmcor: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"lmcor: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _export(args: argparse.Namespace) -> int:
    if args.kind == "causal-lm":
        from lmcor.export.causal_lm import export_causal_lm

        manifest = export_causal_lm(args.model_dir, args.out_dir, max_input_tokens=args.max_input_tokens,
                                    max_output_tokens=args.max_output_tokens, opset=args.opset, overwrite=args.force)
        print(f"wrote {args.out_dir}: {manifest.architecture} causal LM, opset {manifest.opset}; greedy tokens identical "
              f"to transformers on {manifest.validation['samples']} prompts, alone and batched", file=sys.stderr)
        return 0
    if args.kind == "classifier":
        from lmcor.export.classifier import export_classifier

        manifest = export_classifier(args.model_dir, args.out_dir, max_input_tokens=args.max_input_tokens, opset=args.opset,
                                     atol=args.atol, precision=args.precision, overwrite=args.force)
        v = manifest.validation
        int8 = (f"; int8 labels agree with fp32 on {v['int8_label_agreement']:.0%}, probabilities within "
                f"{v['int8_max_abs_prob_diff']:.2g}" if "int8_label_agreement" in v else "")
        print(f"wrote {args.out_dir}: {manifest.architecture} classifier ({', '.join(manifest.labels)}) "
              f"{manifest.precision}, fused {v['fused']}; validated on {v['samples']} samples: max |log-prob diff| "
              f"{v['max_abs_logprob_diff']:.2g}{int8}", file=sys.stderr)
        return 0
    from lmcor.export import export_corrector

    manifest = export_corrector(
        args.model_dir,
        args.out_dir,
        template=Template(text=args.template, candidate=args.candidate, separator=args.separator),
        max_input_tokens=args.max_input_tokens,
        max_output_tokens=args.max_output_tokens,
        opset=args.opset,
        atol=args.atol,
        precision=args.precision,
        packed_encoder=args.packed_encoder,
        overwrite=args.force,
    )
    v = manifest.validation
    if v["tolerance"] is None:
        agreement = f"greedy tokens identical on {v['greedy_token_agreement']:.0%} of them"
    else:
        agreement = f"tolerance {v['tolerance']:.2g}; greedy tokens identical"
    print(
        f"wrote {args.out_dir}: {manifest.architecture} {manifest.precision}, opset {manifest.opset}; validated on "
        f"{v['samples']} samples: max |logit diff| {v['max_abs_logit_diff']:.2g} ({agreement})",
        file=sys.stderr,
    )
    return 0


def _lines(stream: IO[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(stream, start=1):
        if line.strip():
            yield number, line


def _parse(line: str, convert: Callable[[Any], Any]) -> tuple[Any, Any]:
    """(id, item) of one input line, or (id, the InputError that says what is wrong with it)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, InputError(f"not valid JSON ({e.msg} at column {e.colno})")
    ident = obj.get("id") if isinstance(obj, dict) else None
    try:
        return ident, convert(obj)
    except InputError as e:
        return ident, e


def _record(number: int, ident: Any, result: Any) -> dict:
    if isinstance(result, InputError):
        return {"id": ident, "line": number, "error": str(result)}
    if isinstance(result, Candidates):
        return {"id": ident, "source": result.source, "candidates": result.candidates}
    if isinstance(result, Generation):
        return {"id": ident, "line": number, "output": result.text, "output_tokens": len(result.token_ids)}
    if isinstance(result, Classification):
        return {"id": ident, "line": number, "label": result.label, "probabilities": result.probabilities.tolist(),
                "truncated": result.truncated}
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


def _serve(args: argparse.Namespace, convert: Callable[[Any], Any], run: Callable[..., list], verb: str, done: str) -> int:
    """JSONL in, one record per line out in input order; a bad line gets an error record, the rest
    are still served, and the exit code is 1 at the end."""
    failed = 0
    with ExitStack() as stack:
        source = sys.stdin if args.input == "-" else stack.enter_context(open(args.input, encoding="utf-8"))
        sink = sys.stdout if not args.output else stack.enter_context(open(args.output, "w", encoding="utf-8"))
        total = None if args.input == "-" else sum(1 for _ in _lines(open(args.input, encoding="utf-8")))
        bar = stack.enter_context(tqdm(total=total, unit="line", file=sys.stderr, disable=args.quiet, desc=verb))
        lines = _lines(source)
        # Chunks keep memory flat on long files while giving the batcher enough items to sort.
        while chunk := list(itertools.islice(lines, args.batch_size * 8)):
            parsed = [(number, *_parse(line, convert)) for number, line in chunk]
            good = [(number, item) for number, _, item in parsed if not isinstance(item, InputError)]
            results = run([item for _, item in good], progress=bar.update)
            by_line = {number: result for (number, _), result in zip(good, results)}
            for number, ident, item in parsed:
                record = _record(number, ident, by_line.get(number, item))
                if "error" in record:
                    failed += 1
                    if isinstance(item, InputError):
                        bar.update(1)
                    tqdm.write(f"lmcor: line {number}: {record['error']}", file=sys.stderr)
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
    if failed:
        print(f"lmcor: {failed} line(s) could not be {done}; see their error records", file=sys.stderr)
        return EXIT_BAD_LINES
    return 0


def _providers(args: argparse.Namespace) -> list[str] | None:
    providers = getattr(args, "providers", None)  # not every command takes --providers
    return [p.strip() for p in providers.split(",")] if providers else None


class _Totals:
    """Decoder use summed over a run; batch-level numbers count once per batch."""

    def __init__(self) -> None:
        self.requests = self.gated = self.fallbacks = self.generated = self.calls = self.drafted = self.accepted = 0
        self.seconds = 0.0

    def add(self, results: list) -> None:
        for r in results:
            if isinstance(r, Correction) and r.gated:
                self.gated += 1
            elif isinstance(r, Correction):
                s = r.stats
                self.requests += 1
                self.fallbacks += r.fallback
                self.generated += s.output_tokens + 1  # + the EOS step
                self.calls += s.decoder_calls / s.batch_size
                self.seconds += (s.encoder_s + s.decoder_s) / s.batch_size
                self.drafted += s.drafted_tokens
                self.accepted += s.accepted_tokens

    def summary(self) -> str:
        share = f" ({100 * self.accepted / self.drafted:.0f}%)" if self.drafted else ""
        gated = f" ({self.gated} more passed by the gate)" if self.gated else ""
        fallbacks = f", {self.fallbacks} fell back to their nearest candidate" if self.fallbacks else ""
        return (f"lmcor: {self.requests} requests corrected{gated}{fallbacks}, {self.generated} generated tokens (EOS included), "
                f"{round(self.calls)} decoder calls ({self.calls / max(1, self.generated):.3f} per token), "
                f"{self.drafted} drafted tokens, {self.accepted} accepted{share}, {self.seconds:.2f} s in the model")


def _gate(args: argparse.Namespace, given: str | None):
    """The --gate classifier, if asked for. `given` is the command's input file argument: a bare
    --gate written before it takes the file as its bundle, which deserves a clear error."""
    if given is None:
        hint = f" (--gate took {args.gate!r} as its bundle: put --gate after the input file)" if args.gate else ""
        raise InputError(f"no input file given{hint}")
    if args.gate is None:
        return None
    from lmcor.runtime.classifier import Classifier

    return Classifier.load(args.gate or shipped_bundle("gate"), providers=_providers(args), threads=args.threads)


def _correct(args: argparse.Namespace) -> int:
    gate = _gate(args, args.input)
    corrector = Corrector.load(args.model, providers=_providers(args), threads=args.threads)
    totals = _Totals()

    def run(requests: list, progress: Callable[[int], None]) -> list:
        results = corrector.correct_batch(
            requests, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, length_penalty=args.length_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size, drafts=not args.no_drafts, gate=gate,
            gate_threshold=args.gate_threshold, fallback_below=args.fallback_below, batch_size=args.batch_size,
            errors="return", progress=progress)
        totals.add(results)
        return results

    code = _serve(args, as_request, run, "correcting", "corrected")
    if args.stats:
        print(totals.summary(), file=sys.stderr)
    return code


def _classify(args: argparse.Namespace) -> int:
    from lmcor.runtime.classifier import Classifier, as_texts

    classifier = Classifier.load(args.model, providers=_providers(args), threads=args.threads)

    def run(items: list, progress: Callable[[int], None]) -> list:
        return classifier.classify_batch(items, batch_size=args.batch_size, errors="return", progress=progress)

    def checked(obj: Any) -> Any:
        as_texts(obj)
        return obj

    return _serve(args, checked, run, "classifying", "classified")


def _field(obj: Any, name: str) -> str:
    if not isinstance(obj, dict) or name not in obj:
        raise InputError(f"missing field {name!r}")
    if not isinstance(obj[name], str) or not obj[name].strip():
        raise InputError(f"field {name!r} must be a non-empty string")
    return obj[name]


def _generate(args: argparse.Namespace) -> int:
    from lmcor.runtime.generator import Generator

    generator = Generator.load(args.model, providers=_providers(args), threads=args.threads)
    prefix = generator.prefix(args.prefix) if args.prefix else None

    def run(prompts: list, progress: Callable[[int], None]) -> list:
        return generator.generate_batch(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        top_p=args.top_p, seed=args.seed, prefix=prefix, batch_size=args.batch_size,
                                        progress=progress)

    return _serve(args, lambda obj: _field(obj, "prompt"), run, "generating", "generated")


def _candidates(args: argparse.Namespace) -> int:
    from lmcor.runtime.generator import Generator

    if "{source}" not in args.prompt:
        raise InputError("--prompt must contain {source}")
    generator = Generator.load(args.model, providers=_providers(args), threads=args.threads)
    head, tail = args.prompt.split("{source}", 1)
    prefix = generator.prefix(head) if head else None

    def run(sources: list, progress: Callable[[int], None]) -> list:
        prompts = [source + tail for source in sources]
        options = dict(max_new_tokens=args.max_new_tokens, prefix=prefix, batch_size=args.batch_size, top_p=args.top_p)
        rounds = [generator.generate_batch(prompts, **options)]  # LMCor: one greedy output ...
        for k in range(1, args.k):  # ... and K-1 samples
            rounds.append(generator.generate_batch(prompts, temperature=args.temperature, seed=args.seed + k, **options))
        progress(len(sources))
        return [Candidates(source, [r[i].text.strip().split("\n")[0] for r in rounds]) for i, source in enumerate(sources)]

    return _serve(args, lambda obj: _field(obj, "source"), run, "generating", "given candidates")


def _eval(args: argparse.Namespace) -> int:
    from lmcor.bench import quality

    gate = _gate(args, args.data)
    corrector = Corrector.load(args.model, threads=args.threads)
    items, errors = quality.read_items(Path(args.data))
    for error in errors:
        print(f"lmcor: {args.data}: line {error['line']}: {error['error']}", file=sys.stderr)
    if not items:
        raise InputError(f"{args.data}: no usable lines")
    report = quality.evaluate(corrector, items, batch_size=args.batch_size, num_beams=args.num_beams,
                              max_new_tokens=args.max_new_tokens, drafts=not args.no_drafts,
                              no_repeat_ngram_size=args.no_repeat_ngram_size, gate=gate,
                              gate_threshold=args.gate_threshold, fallback_below=args.fallback_below)
    report.update(data=str(args.data), model=str(corrector.root), errors=errors)
    if gate is not None:
        report["gate"] = str(gate.root)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(quality.table(report))
    return EXIT_BAD_LINES if errors else 0


def _bench(args: argparse.Namespace) -> int:
    if args.drafts:
        return _bench_drafts(args)
    if args.gate is not None:
        return _bench_gate(args)
    if args.shared_prefix:
        return _bench_prefix(args)
    from lmcor.bench import harness

    config = harness.BenchConfig(
        shape=args.shape, model=Path(args.model) if args.model else None, data=Path(args.data) if args.data else None,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()), threads=args.threads,
        requests=args.requests, rounds=args.rounds, batch_size=args.batch_size, source=args.source, k=args.k,
        candidate=args.candidate, new_tokens=args.new_tokens, natural=args.natural, ragged=args.ragged,
        sweeps=not args.no_sweeps, out=Path(args.out), cache=Path(args.cache),
    )
    report = harness.run(config)
    path = harness.write(report, config.out)
    images = harness.plots(report, config.out)
    print(harness.table(report))
    print(f"wrote {path} and {', '.join(str(p) for p in images)}", file=sys.stderr)
    return 0


def _write_report(path: Path, report: dict, table: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table)
    print(f"wrote {path}", file=sys.stderr)


def _bench_prefix(args: argparse.Namespace) -> int:
    from lmcor.bench import prefix

    if not args.bundle:
        raise InputError("--shared-prefix needs --bundle: a causal-LM bundle")
    config = prefix.PrefixConfig(bundle=Path(args.bundle), prefix_tokens=args.prefix_tokens, requests=args.requests,
                                 rounds=args.rounds, batch_size=args.batch_size, threads=args.threads)
    report = prefix.run(config)
    _write_report(Path(args.out) / "prefix.json", report, prefix.table(report))
    return 0 if report["identical_outputs"] == report["requests"] else 1


def _bench_gate(args: argparse.Namespace) -> int:
    from lmcor.bench import gate

    if not args.data:
        raise InputError("--gate needs --data: a JSONL file of correction requests with targets")
    config = gate.GateConfig(data=Path(args.data), gate=Path(args.gate) if args.gate else None,
                             bundle=Path(args.bundle) if args.bundle else None, threshold=args.gate_threshold,
                             requests=args.requests, rounds=args.rounds, batch_size=args.batch_size, threads=args.threads)
    report = gate.run(config)
    _write_report(Path(args.out) / "gate.json", report, gate.table(report))
    return 0


def _bench_drafts(args: argparse.Namespace) -> int:
    from lmcor.bench import drafts

    if not args.data:
        raise InputError("--drafts needs --data: a JSONL file of correction requests")
    config = drafts.DraftsConfig(data=Path(args.data), bundle=Path(args.bundle) if args.bundle else None,
                                 requests=args.requests, rounds=args.rounds, batch_size=args.batch_size,
                                 threads=args.threads)
    report = drafts.run(config)
    _write_report(Path(args.out) / "drafts.json", report, drafts.table(report))
    return 0 if report["identical_outputs"] == report["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
