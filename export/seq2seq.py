"""Hugging Face seq2seq checkpoint -> validated lmcor corrector bundle.

optimum's ONNX exporter writes the encoder and the merged decoder (first step + cached steps in
one graph, cached steps taking any number of new tokens). For T5-family models the decoder is
lmcor's ragged step graph instead (`decoder.py`: per-row lengths, which drafted decoding needs).
This module adds what a bundle needs on top: the manifest, the tokenizer, and validation against
PyTorch before anything is written to the destination.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from lmcor.runtime.bundle import (
    DecoderShape,
    Manifest,
    SpecialTokens,
    Template,
    template_problem,
    write_manifest,
)
from lmcor.runtime.errors import ExportError

from . import decoder as ragged
from .checkpoint import (
    PRECISIONS,
    SEQ2SEQ_TYPES,
    TOKENIZER_FILE,
    input_limit,
    load_checkpoint,
    opset_of,
    output_limit,
    quiet_exporter,
    stage,
    staged_export,
    versions,
    warn_unapplied_generation,
)
from .fusion import fuse_t5_encoder
from .half import T5_FP32_MATMULS, to_half
from .quantize import quantize
from .reshapes import rewrite_file
from .shared_weights import WEIGHTS_FILE, share_weights
from .validate import check_half_graphs, validate_corrector, validate_half

log = logging.getLogger("lmcor")
# int8 cannot match PyTorch token for token, and is not refused for it; below this share of samples
# with identical greedy tokens, the export says so (a near-tie-ridden model, or one int8 hurts).
INT8_WARN_BELOW = 0.5

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
PACKED_ENCODER_FILE = "encoder_packed.safetensors"
FIRST_STEP_FILE = "decoder_model.onnx"  # optimum's two decoders, merged into DECODER_FILE
CACHED_STEP_FILE = "decoder_with_past_model.onnx"
DEFAULT_TEMPLATE = Template()
# The generation settings a corrector applies besides every bundle's (`warn_unapplied_generation`):
# its start, forced BOS/EOS, the n-gram ban, and beam search's, said apart.
_APPLIED_GENERATION = frozenset({"decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
                                 "no_repeat_ngram_size", "num_beams", "length_penalty", "early_stopping"})
FP32_ATOL = 1e-3  # fp32 graphs' absolute logit tolerance, unless asked for another


def _decoder_shape(config) -> DecoderShape:
    if config.model_type in ("t5", "mt5"):
        layers = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
        return DecoderShape(layers, config.num_heads, config.d_kv, config.vocab_size)
    if config.model_type in ("bart", "mbart"):
        heads = config.decoder_attention_heads
        return DecoderShape(config.decoder_layers, heads, config.d_model // heads, config.vocab_size)
    raise ExportError(f"model type {config.model_type!r} is not supported (supported: {', '.join(SEQ2SEQ_TYPES)})")


def eos_token(model) -> int | None:
    """The token a seq2seq checkpoint's outputs end with (its generation config's, else its config's):
    one, which a corrector stops at."""
    eos = model.generation_config.eos_token_id
    eos = model.config.eos_token_id if eos is None else eos
    if isinstance(eos, list):
        if len(eos) != 1:
            raise ExportError(f"the checkpoint's generation config lists several EOS tokens {eos}; a corrector stops at "
                              "one: set eos_token_id in its generation_config.json to the token its outputs end with")
        eos = eos[0]
    return eos


def _special_tokens(model) -> SpecialTokens:
    config, generation = model.config, model.generation_config
    eos = eos_token(model)
    # As `generate` starts: its generation config's start token, else its BOS (not config.json's start,
    # which a generation_config.json that leaves it out overrides).
    start = generation.decoder_start_token_id if generation.decoder_start_token_id is not None else generation.bos_token_id
    if config.decoder_start_token_id not in (None, start):
        log.warning("config.json's decoder_start_token_id=%d is not the one generate starts from (%r, its generation "
                    "config's): lmcor starts as generate does", config.decoder_start_token_id, start)
    for name, value in (("eos_token_id", eos), ("pad_token_id", config.pad_token_id), ("decoder_start_token_id", start)):
        if value is None:
            raise ExportError(f"the checkpoint's config has no {name}")
    warn_unapplied_generation(generation, _APPLIED_GENERATION, "decoding is plain greedy/beam search")
    if (generation.num_beams or 1) > 1:
        log.warning("generation_config.num_beams=%d is not lmcor's default: it decodes greedily unless a request "
                    "asks for num_beams (--num-beams)", generation.num_beams)
    # A request's beam search takes its own length_penalty (default 1.0), and ends as `generate` does
    # with early_stopping=False.
    if generation.length_penalty not in (None, 1.0):
        log.warning("generation_config.length_penalty=%r is not applied by lmcor: beam search takes a request's "
                    "length_penalty (--length-penalty; default 1.0)", generation.length_penalty)
    if generation.early_stopping not in (None, False):
        log.warning("generation_config.early_stopping=%r is not applied by lmcor: its beam search ends as generate's "
                    "does with early_stopping=False", generation.early_stopping)
    return SpecialTokens(
        pad=int(config.pad_token_id),
        eos=int(eos),
        decoder_start=int(start),
        forced_bos=_one_token("forced_bos_token_id", generation.forced_bos_token_id),
        forced_eos=_one_token("forced_eos_token_id", generation.forced_eos_token_id),
    )


def _one_token(name: str, value):
    """A forced token of the generation config: transformers also takes a list, which must name one."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ExportError(f"the checkpoint's generation_config.json gives {name} {list(value)}; lmcor forces one "
                              "token: set it to the one its outputs end or start with")
        value = value[0]
    return None if value is None else int(value)


def export_corrector(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    template: Template = DEFAULT_TEMPLATE,
    max_input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    opset: int | None = None,
    atol: float | None = None,
    precision: str = "fp32",
    packed_encoder: bool = False,
    overwrite: bool = False,
) -> Manifest:
    """Export a Hugging Face seq2seq checkpoint folder (T5, T5 v1.1/Flan-T5, mT5, BART, mBART) to a
    validated bundle in `out_dir`. Nothing is written to `out_dir` unless validation passes.

    `precision="int8"` quantizes the weights of every MatMul to int8 and their inputs row by row at
    run time (`quantize.py`: each token's result independent of the rest of its call, so batched
    and drafted decoding still reproduce plain greedy decoding), after the fp32 graphs have passed
    validation. An int8 bundle cannot match PyTorch token for token; its validation records how
    far it is (logit difference, share of samples with identical greedy tokens), and its quality
    is measured with `lmcor eval`.

    `precision="fp16"` or `"bf16"` stores the weights and runs the matrix products in half precision,
    everything else (layer norms, residual stream, softmax) and the graphs' inputs and outputs in fp32
    (`half.py`); T5's feed-forward output projection stays fp32, as its activations overflow fp16.
    The half graphs are validated against PyTorch fp32 with the precision's tolerances
    (`validate.HALF_TOLERANCES`, `HALF_MIN_AGREEMENT`; `atol`, if given, replaces the absolute
    tolerance, the fp32 graphs before conversion keep 1e-3): fp16 on CPU, bf16 on CUDA when this machine has
    it; elsewhere a bf16 bundle is checked structurally and its manifest says
    `"validated_on": "not run: no CUDA"`.

    `packed_encoder=True` (T5 family) also writes the encoder's weights for the Triton packed
    encoder (`kernels/encoder.py`), which a CUDA machine with PyTorch and Triton runs instead of
    the ONNX encoder.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _check_template(template)
    if packed_encoder and precision != "fp32":  # its weights are fp32, and run instead of the validated encoder
        raise ExportError(f"the packed encoder's weights are fp32: export it with --precision fp32, not {precision}")
    half = precision in ("fp16", "bf16")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, tokenizer = load_checkpoint(model_dir, out_dir, "AutoModelForSeq2SeqLM", overwrite=overwrite)
    if packed_encoder:  # said before the export and its validation, not after
        if model.config.model_type not in ragged.ARCHITECTURES:
            raise ExportError(f"the packed encoder needs a T5-family model, not {model.config.model_type!r}")
        from lmcor.kernels.encoder import ACTIVATIONS

        if model.config.dense_act_fn not in ACTIVATIONS:
            raise ExportError(f"the packed encoder has no {model.config.dense_act_fn!r} activation (it has "
                              f"{', '.join(ACTIVATIONS)}): export without --packed-encoder")
    shape = _decoder_shape(model.config)
    config = model.config
    if config.model_type in ("bart", "mbart") and config.decoder_attention_heads != config.encoder_attention_heads:
        raise ExportError(f"{model_dir}: its decoder has {config.decoder_attention_heads} attention heads and its "
                          f"encoder {config.encoder_attention_heads}; optimum's exporter shapes the cross-attention "
                          "cache by the encoder's and cannot trace it (models with as many in both export)")
    special = _special_tokens(model)

    with staged_export(model_dir, out_dir, "text2text-generation-with-past", opset, model.config,
                       overwrite=overwrite) as (raw, staged):
        opset = opset_of(raw / ENCODER_FILE)
        if model.config.model_type in ragged.ARCHITECTURES:
            with stage(model_dir, "building the step graph"), quiet_exporter():
                ragged.export_step_decoder(model, raw, opset)
                if precision == "int8":
                    (raw / "folded").mkdir()
                    ragged.export_step_decoder(model, raw / "folded", opset, fold=True)
            graph, files = "ragged", {"decoder": ragged.STEP_FILE, "cross": ragged.CROSS_FILE}
        else:
            graph, files = "merged", {"decoder": DECODER_FILE}
        fused = False
        if precision == "fp32" and graph == "ragged":  # int8 and half convert the plain graph
            with stage(model_dir, "fused encoder operators"):
                fused = fuse_t5_encoder(raw / ENCODER_FILE, staged / ENCODER_FILE, model.config)
        # the fusion matches the plain graph's Shape->Reshape chains, so only an encoder left plain gets
        # constant targets (the fused graph's one Reshape, in the position bias, has a constant target)
        if not fused:
            with stage(model_dir, "constant reshape targets"):  # the step graphs' were made as they were written
                rewrite_file(raw / ENCODER_FILE)
        for name in ([] if fused else [ENCODER_FILE]) + list(files.values()):
            for file in raw.glob(f"{name}*"):  # the graph and any external-data file beside it
                shutil.copy(file, staged / file.name)
        tokenizer.backend_tokenizer.save(str(staged / TOKENIZER_FILE))
        if packed_encoder:
            from lmcor.kernels.encoder import EncoderWeights

            EncoderWeights.from_t5(model).save(staged / PACKED_ENCODER_FILE)
            files["packed_encoder"] = PACKED_ENCODER_FILE
        manifest = Manifest(
            kind="corrector",
            architecture=model.config.model_type,
            template=template,
            special_tokens=special,
            decoder=shape,
            max_input_tokens=input_limit(model.config, tokenizer, max_input_tokens),
            max_output_tokens=output_limit(model.config, max_output_tokens),
            precision="fp32",
            opset=opset,
            files={"encoder": ENCODER_FILE, **files, "tokenizer": TOKENIZER_FILE},
            decoder_graph=graph,
            no_repeat_ngram_size=int(getattr(model.generation_config, "no_repeat_ngram_size", 0) or 0),
            exporter=versions(),
            clean_up_spaces=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        )
        graphs = [ENCODER_FILE, *(files[role] for role in ("decoder", "cross") if role in files)]
        if precision == "fp32":  # an int8 or half bundle shares its converted graphs, below
            share_weights(staged, graphs)
        write_manifest(staged, manifest)
        with stage(model_dir, "validation"):
            # a half bundle's atol is its half graphs' (below); its fp32 graphs keep FP32_ATOL
            report = validate_corrector(model, staged, atol=FP32_ATOL if atol is None or half else atol,
                                        own_rounding=atol is None or half)  # a tolerance given is kept to
        if precision == "int8":
            with stage(model_dir, "quantization"):
                _quantize(raw, staged, graph)
            share_weights(staged, graphs)
            manifest = dataclasses.replace(manifest, precision="int8")
            write_manifest(staged, manifest)
            with stage(model_dir, "validation of the int8 graphs"):
                report = validate_corrector(model, staged, exact=False)
            if report.greedy_token_agreement < INT8_WARN_BELOW:  # recorded either way; said where it is low
                log.warning("%s: the int8 graphs' greedy tokens equal PyTorch's on %.0f%% of the samples: measure its "
                            "quality (lmcor eval) before using it, or keep fp32", out_dir,
                            100 * report.greedy_token_agreement)
        validation = report.as_dict()
        if half:
            (staged / WEIGHTS_FILE).unlink(missing_ok=True)  # the fp32 graphs' shared weights
            with stage(model_dir, f"conversion to {precision}"):
                converted = _to_half(raw, staged, graph, precision, t5=model.config.model_type in ragged.ARCHITECTURES,
                                     layers=(_encoder_layers(model.config), shape.num_layers))
            share_weights(staged, graphs)
            manifest = dataclasses.replace(manifest, precision=precision)
            write_manifest(staged, manifest)
            validation = _validate_half(model, model_dir, staged, graphs, precision, report, atol)
            validation["half_matmuls"], validation["fp32_matmuls"] = converted
        manifest = dataclasses.replace(manifest, validation=validation)
        write_manifest(staged, manifest)
    return manifest


def _quantize(raw: Path, staged: Path, graph: str) -> None:
    """int8 weights for the encoder and decoder graphs (`quantize.py`: per-row activations). optimum's
    two decoders are merged after quantization so that the two branches share one copy of each
    quantized weight."""
    from optimum.onnx import merge_decoders

    with quiet_exporter():
        quantize(raw / ENCODER_FILE, staged / ENCODER_FILE)
        if graph == "ragged":
            for name in (ragged.STEP_FILE, ragged.CROSS_FILE):
                quantize(raw / "folded" / name, staged / name)
            return
        for name in (FIRST_STEP_FILE, CACHED_STEP_FILE):
            quantize(raw / name, raw / f"int8_{name}")
        merge_decoders(decoder=raw / f"int8_{FIRST_STEP_FILE}", decoder_with_past=raw / f"int8_{CACHED_STEP_FILE}",
                       save_path=staged / DECODER_FILE, strict=False)


def _encoder_layers(config) -> int:
    return getattr(config, "num_layers", None) or getattr(config, "encoder_layers", 0)


def _to_half(raw: Path, staged: Path, graph: str, precision: str, *, t5: bool, layers: tuple[int, int]) -> tuple[int, int]:
    """Half-precision copies of the raw fp32 graphs in `staged` (`half.py`); optimum's two decoders are
    converted before they are merged (the merged graph's branches are subgraphs). For T5, each
    feed-forward output projection must be found and kept fp32. Returns (half, fp32) MatMul counts."""
    keep = T5_FP32_MATMULS if t5 else None
    half = kept = 0
    names = [ENCODER_FILE, ragged.STEP_FILE, ragged.CROSS_FILE] if graph == "ragged" else [ENCODER_FILE]
    for name in names:
        report = to_half(raw / name, staged / name, precision, keep=keep)
        half, kept = half + report.half_nodes, kept + report.kept_fp32
        expected = {ENCODER_FILE: layers[0], ragged.STEP_FILE: layers[1]}.get(name, 0) if t5 else 0
        if report.kept_fp32 != expected:
            raise ExportError(f"{name}: found {report.kept_fp32} T5 feed-forward output projections to keep in fp32, "
                              f"expected {expected} (the exporter's node names changed; export fp32 instead)")
    if graph != "ragged":
        from optimum.onnx import merge_decoders

        for name in (FIRST_STEP_FILE, CACHED_STEP_FILE):
            report = to_half(raw / name, raw / f"{precision}_{name}", precision, keep=keep)
            half += report.half_nodes
        with quiet_exporter():
            merge_decoders(decoder=raw / f"{precision}_{FIRST_STEP_FILE}",
                           decoder_with_past=raw / f"{precision}_{CACHED_STEP_FILE}",
                           save_path=staged / DECODER_FILE, strict=False)
    return half, kept


def _validate_half(model, model_dir: Path, staged: Path, graphs: list[str], precision: str, fp32,
                   atol: float | None) -> dict:
    """fp16: against PyTorch on the CPU; bf16: on CUDA when this machine has it, else structurally. The
    fp32 graphs' own validation, which came first, is kept beside it (`fp32_graphs`)."""
    from lmcor.runtime.sessions import default_providers

    cuda = "CUDAExecutionProvider" in default_providers()
    if precision == "bf16" and not cuda:
        with stage(model_dir, "structural validation of the bf16 graphs"):
            checks = check_half_graphs(staged, graphs, precision, atol)
        return {"samples": fp32.samples, "validated_on": "not run: no CUDA", "fp32_graphs": fp32.as_dict(), **checks}
    providers = ["CUDAExecutionProvider"] if precision == "bf16" else ["CPUExecutionProvider"]
    with stage(model_dir, f"validation of the {precision} graphs"):
        report = validate_half(model, staged, precision, providers=providers, atol=atol)
    return {**report.as_dict(), "fp32_graphs": fp32.as_dict()}


def _check_template(template: Template) -> None:
    problem = template_problem(template)
    if problem is not None:
        part, what = problem
        raise ExportError(f"the input template's {part}: {what}")