"""`lmcor export`: a Hugging Face checkpoint -> a validated, self-describing bundle."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from lmcor.runtime.bundle import MANIFEST_NAME, Template
from lmcor.runtime.errors import InputError

from . import options, say
from .lines import EXIT_SIGNAL
from .signals import sigterm_as_interrupt

# The exporters need opset 14's operators: Trilu (T5's, BART's and Llama's causal masks) and the
# attention of scaled_dot_product_attention; older opsets cannot hold them.
MIN_OPSET = 14


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="Hugging Face checkpoint folder (correctors: T5, T5 v1.1/Flan-T5, mT5, BART, "
                        "mBART; classifiers: BERT, RoBERTa, MiniLM, ...)")
    parser.add_argument("out_dir", help="bundle folder to write")
    parser.add_argument("--kind", choices=("corrector", "classifier", "causal-lm"), default="corrector",
                        help="what the checkpoint is (default: %(default)s)")
    defaults = Template()
    # Defaults None: a flag another kind does not read is refused only when given (`_refuse_unused`).
    parser.add_argument("--template", help=f"correctors: input text with {{source}} and {{candidates}} (default: "
                        f"{defaults.text!r})")
    parser.add_argument("--candidate", help=f"correctors: one candidate: {{candidate}}, {{i}} from 0, {{n}} from 1 "
                        f"(default: {defaults.candidate!r})")
    parser.add_argument("--separator", help=f"correctors: text between rendered candidates (default: "
                        f"{defaults.separator!r})")
    parser.add_argument("--max-input-tokens", type=options.positive_int, help="default: the tokenizer's or model's limit")
    parser.add_argument("--max-output-tokens", type=options.positive_int,
                        help="correctors, causal LMs: default 256, or as many as the model's positions allow")
    parser.add_argument("--opset", type=options.positive_int,
                        help=f"ONNX opset, {MIN_OPSET} or newer (default: the exporter's)")
    parser.add_argument("--atol", type=options.non_negative_float,
                        help="absolute tolerance of the validation: correctors' logits (default 1e-3; int8: of the fp32 "
                        "graphs before quantization; fp16/bf16: replaces the precision's default, 5e-2/1e-1, plus a "
                        "relative part), classifiers' log-probabilities (default 1e-3), causal LMs' next-token logits "
                        "in fp16/bf16 only (fp32 ones are held to identical greedy tokens)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default="fp32",
                        help="int8 (correctors, classifiers): int8 weights (correctors: activations quantized per row); fp16/bf16 "
                        "(correctors, causal LMs): "
                        "half-precision weights and matrix products for GPUs, the rest fp32 (bf16 runs on CUDA only); "
                        "fp16 validated within tolerances, int8's agreement recorded, bf16 validated on a GPU only: none exact "
                        "(default: %(default)s)")
    parser.add_argument("--packed-encoder", action="store_true",
                        help="correctors: also write the encoder's weights for the Triton packed encoder (T5 family; "
                        "used on CUDA)")
    parser.add_argument("--force", action="store_true", help="replace the bundle at OUT_DIR (a folder holding an "
                        "lmcor.json; never MODEL_DIR or a folder holding it)")


# Flags only some kinds read (flag -> (argument, kinds)): given to another kind, they are refused
# rather than silently ignored.
_ONLY_FOR = {"--template": ("template", ("corrector",)), "--candidate": ("candidate", ("corrector",)),
             "--separator": ("separator", ("corrector",)), "--packed-encoder": ("packed_encoder", ("corrector",)),
             "--max-output-tokens": ("max_output_tokens", ("corrector", "causal-lm"))}


def run(args: argparse.Namespace) -> int:
    newest = _newest_opset()
    if args.opset is not None and not MIN_OPSET <= args.opset <= (newest or args.opset):
        raise InputError(f"--opset must be from {MIN_OPSET} to {newest} (the newest PyTorch's exporter writes), "
                         f"got {args.opset}")
    _refuse_unused(args)
    started = time.time()
    with sigterm_as_interrupt() as terminated:  # its staging folder is removed as on Ctrl-C
        try:
            return _export(args)
        except KeyboardInterrupt:
            # The bundle is staged beside OUT_DIR and put in place last: unless that finished, OUT_DIR is as it was.
            manifest = Path(args.out_dir) / MANIFEST_NAME
            done = manifest.is_file() and manifest.stat().st_mtime >= started
            say(f"lmcor: export interrupted; {args.out_dir} " + ("holds the finished bundle" if done else
                "was not written (left as it was)"))
            if terminated:
                return EXIT_SIGNAL[signal.SIGTERM]
            raise


def _refuse_unused(args: argparse.Namespace) -> None:
    for flag, (name, kinds) in _ONLY_FOR.items():
        if getattr(args, name) not in (None, False) and args.kind not in kinds:
            raise InputError(f"{flag} does not apply to --kind {args.kind} (only to {' and '.join(kinds)})")


def _export(args: argparse.Namespace) -> int:
    if args.kind == "causal-lm":
        from lmcor.export.causal_lm import export_causal_lm

        manifest = export_causal_lm(args.model_dir, args.out_dir, max_input_tokens=args.max_input_tokens,
                                    max_output_tokens=args.max_output_tokens, opset=args.opset,
                                    precision=args.precision, atol=args.atol, overwrite=args.force)
        v = manifest.validation
        if manifest.precision == "fp32":
            checked = f"greedy tokens identical to transformers on {v['samples']} prompts, alone and batched"
        elif v["validated_on"].startswith("not run"):
            checked = f"graph checked structurally only ({v['validated_on']}: validate on a GPU machine by exporting there)"
        else:
            checked = (f"max |next-token logit diff| {v['max_abs_logit_diff']:.2g} from PyTorch fp32 (tolerance "
                       f"{v['tolerance']:.2g}) and greedy tokens identical on {v['greedy_token_agreement']:.0%} of "
                       f"{v['samples']} prompts, on {v['validated_on']}")
        say(f"wrote {args.out_dir}: {manifest.architecture} causal LM {manifest.precision}, opset {manifest.opset}; "
            f"{checked}")
        return 0
    if args.kind == "classifier":
        from lmcor.export.classifier import export_classifier

        tolerance = {} if args.atol is None else {"atol": args.atol}
        manifest = export_classifier(args.model_dir, args.out_dir, max_input_tokens=args.max_input_tokens, opset=args.opset,
                                     precision=args.precision, overwrite=args.force, **tolerance)
        v = manifest.validation
        fp32 = (f"fp32 graph (fused {v['fused']}) validated on {v['samples']} samples: max |log-prob diff| "
                f"{v['max_abs_logprob_diff']:.2g}")
        checked = (f"int8 graph (quantized unfused): labels agree with the {fp32}, on {v['int8_label_agreement']:.0%}, "
                   f"probabilities within {v['int8_max_abs_prob_diff']:.2g}" if "int8_label_agreement" in v else fp32)
        say(f"wrote {args.out_dir}: {manifest.architecture} classifier ({', '.join(manifest.labels)}) "
            f"{manifest.precision}; {checked}")
        return 0
    from lmcor.export import export_corrector

    given = {"text": args.template, "candidate": args.candidate, "separator": args.separator}
    manifest = export_corrector(
        args.model_dir,
        args.out_dir,
        template=Template(**{name: value for name, value in given.items() if value is not None}),
        max_input_tokens=args.max_input_tokens,
        max_output_tokens=args.max_output_tokens,
        opset=args.opset,
        atol=args.atol,
        precision=args.precision,
        packed_encoder=args.packed_encoder,
        overwrite=args.force,
    )
    v = manifest.validation
    if v.get("validated_on", "").startswith("not run"):
        say(f"wrote {args.out_dir}: {manifest.architecture} {manifest.precision}, opset {manifest.opset}; fp32 graphs "
            f"validated on {v['samples']} samples, {manifest.precision} graphs checked structurally only "
            f"({v['validated_on']}: validate on a GPU machine by exporting there)")
        return 0
    if manifest.precision in ("fp16", "bf16"):
        agreement = (f"tolerance {v['tolerance']:.2g}; greedy tokens identical to PyTorch fp32 on "
                     f"{v['greedy_token_agreement']:.0%} of them, on {v['validated_on']}")
    elif v["tolerance"] is None:
        agreement = f"greedy tokens identical on {v['greedy_token_agreement']:.0%} of them"
    else:
        agreement = f"tolerance {v['tolerance']:.2g}; greedy tokens identical"
    say(
        f"wrote {args.out_dir}: {manifest.architecture} {manifest.precision}, opset {manifest.opset}; validated on "
        f"{v['samples']} samples: max |logit diff| {v['max_abs_logit_diff']:.2g} ({agreement})"
    )
    return 0


def _newest_opset() -> int | None:
    """The newest opset PyTorch's exporter writes (None without PyTorch: the export says what to install)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    return getattr(_constants, "ONNX_MAX_OPSET", None)
