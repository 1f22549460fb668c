"""Hugging Face sequence classifier (BERT, RoBERTa, MiniLM, ...) -> validated lmcor classifier bundle.

optimum's exporter writes the graph; for BERT-family encoders, ONNX Runtime's transformer
optimizer then fuses attention, layer norms and GELU for the CPU (the fused graph is what gets
validated and shipped). Validation compares logits with PyTorch on single texts and text pairs.
`precision="int8"` quantizes the unfused graph's MatMul weights to int8 and their inputs row by
row at run time (`quantize.py`), and records how often its labels agree with fp32 and by how much
its probabilities move, on the same samples.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import shutil
from pathlib import Path

import numpy as np
from lmcor.runtime.bundle import Manifest, write_manifest
from lmcor.runtime.errors import ExportError

from .checkpoint import (
    CLASSIFIER_PRECISIONS,
    TOKENIZER_FILE,
    input_limit,
    input_limit_named,
    load_checkpoint,
    opset_of,
    quiet_exporter,
    stage,
    staged_export,
    versions,
)
from .quantize import quantize

log = logging.getLogger("lmcor")

MODEL_FILE = "model.onnx"
# ONNX Runtime's fusion patterns per model type (its optimizer's names).
_FUSIONS = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert"}
SAMPLES = (
    ("def add(a, b):\n    return a - b", None),
    ("She goes to school every day.", None),
    ("The results was suprising.", "The results were surprising."),
    ("for i in range(10): print(i)", "for (int i = 0; i < 10; i++) printf(\"%d\", i);"),
    ("a", None),
)


def export_classifier(model_dir: str | Path, out_dir: str | Path, *, max_input_tokens: int | None = None,
                      opset: int | None = None, atol: float = 1e-3, precision: str = "fp32", fuse: bool = True,
                      overwrite: bool = False) -> Manifest:
    """Export a Hugging Face `AutoModelForSequenceClassification` checkpoint folder to `out_dir`."""
    if precision not in CLASSIFIER_PRECISIONS:
        raise ExportError(f"a classifier's precision must be one of {CLASSIFIER_PRECISIONS}, got {precision!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, tokenizer = load_checkpoint(model_dir, out_dir, "AutoModelForSequenceClassification", overwrite=overwrite)
    config = model.config
    if config.num_labels < 2:
        raise ExportError(f"{model_dir}: one output ({config.problem_type or 'a regression or score head'}); a classifier "
                          "bundle gives probabilities over two or more labels")
    if config.problem_type == "regression":
        raise ExportError(f"{model_dir}: a regression head ({config.num_labels} scores, problem_type 'regression'); a "
                          "classifier bundle gives probabilities over labels")
    if config.problem_type == "multi_label_classification":
        raise ExportError(f"{model_dir}: a multi-label head (each label's own sigmoid); a classifier bundle gives one "
                          "softmax over its labels")
    unlabelled = [i for i in range(config.num_labels) if i not in config.id2label]
    if unlabelled:
        raise ExportError(f"{model_dir}: config.json's id2label names no label for output {unlabelled[0]} of its "
                          f"{config.num_labels} (it has {sorted(config.id2label)}): give every output a label")
    labels = tuple(config.id2label[i] for i in range(config.num_labels))
    odd = [label for label in labels if not isinstance(label, str) or not label.strip()]
    if odd or len(set(labels)) < len(labels):
        what = f"the label {odd[0]!r}, not a name" if odd else "a label twice: " + ", ".join(map(repr, labels))
        raise ExportError(f"{model_dir}: config.json's id2label has {what}; a bundle answers with its labels' "
                          "names, which must be distinct non-empty strings")
    inputs = input_limit(config, tokenizer, max_input_tokens)
    least = tokenizer.num_special_tokens_to_add(pair=True) + 2  # a pair's special tokens and a token of each text
    if inputs < least:
        raise ExportError(f"{input_limit_named(max_input_tokens, inputs)}: a text pair needs {least} tokens (its "
                          "special tokens and one of each text); below that its tokenizer cuts nothing, and the model "
                          "would read past its positions")
    if getattr(tokenizer, "truncation_side", "right") != "right":
        raise ExportError(f"{model_dir}: its tokenizer cuts a long text's start (truncation_side "
                          f"{tokenizer.truncation_side!r}), and a classifier bundle reads a long text's start: set "
                          "truncation_side to 'right' in tokenizer_config.json where that suits the model")
    # A decoder-only classifier reads its last token before the padding: where its config names no pad,
    # optimum takes the tokenizer's into the graph; batches, and the PyTorch reference, pad with that one.
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.pad_token_id is None and hasattr(model, "score"):  # transformers' decoder-only classifier heads
        eos = f", {config.eos_token_id}" if isinstance(config.eos_token_id, int) else ""
        raise ExportError(f"{model_dir}: no pad token in its config or tokenizer, and a decoder-only classifier finds "
                          "each text's last token by it: set pad_token_id in config.json (such models often pad "
                          f"with their EOS{eos})")

    if getattr(config, "type_vocab_size", None) == 1 and _traced_with_token_types(config):
        raise ExportError(f"{model_dir}: its embeddings hold one token type (type_vocab_size 1), and optimum's "
                          "exporter traces it with sample token type ids past that one: it cannot export this model")
    with staged_export(model_dir, out_dir, "text-classification", opset, model.config,
                       overwrite=overwrite) as (raw, staged):
        dropped = _graph_inputs(model_dir, raw / MODEL_FILE, model, tokenizer)
        fused = fuse and config.model_type in _FUSIONS
        if fused:
            with stage(model_dir, "graph optimization"):
                _fuse(raw / MODEL_FILE, staged / MODEL_FILE, config)
        else:
            shutil.copy(raw / MODEL_FILE, staged / MODEL_FILE)
        tokenizer.backend_tokenizer.save(str(staged / TOKENIZER_FILE))
        manifest = Manifest(
            kind="classifier", architecture=config.model_type,
            max_input_tokens=inputs, precision="fp32",
            opset=opset_of(raw / MODEL_FILE), files={"model": MODEL_FILE, "tokenizer": TOKENIZER_FILE}, labels=labels,
            exporter=versions(), pad_token=config.pad_token_id,
            vocab_size=config.vocab_size if isinstance(getattr(config, "vocab_size", None), int) else None,
            token_types="token_type_ids" in tokenizer.model_input_names,
        )
        write_manifest(staged, manifest)
        with stage(model_dir, "validation"):
            reference = _torch_probabilities(model, tokenizer, manifest.max_input_tokens)
            fp32 = _bundle_probabilities(staged)
        diff = float(np.abs(_log(fp32) - _log(reference)).max())
        if not diff <= atol:  # NaN too: a probability that is no number fails
            raise ExportError(f"validation failed: max |log-probability diff| {diff:.3g} exceeds {atol:.3g}" + (
                f" (its tokenizer gives token_type_ids, which {config.model_type}'s model adds in, and its exported "
                'graph takes none: where the model is used without them, set model_input_names to ["input_ids", '
                '"attention_mask"] in tokenizer_config.json)' if dropped else ""))
        validation = {"samples": len(SAMPLES), "max_abs_logprob_diff": diff, "tolerance": atol, "fused": fused}
        if precision == "int8":
            # From the unfused graph: the fused attention op takes one activation scale for the whole
            # batch, where `quantize` gives each token its own, so that a text's probabilities do not
            # depend on the other texts of its batch.
            with stage(model_dir, "quantization"), quiet_exporter():
                quantize(raw / MODEL_FILE, raw / f"int8_{MODEL_FILE}")
            shutil.move(str(raw / f"int8_{MODEL_FILE}"), staged / MODEL_FILE)
            manifest = dataclasses.replace(manifest, precision="int8")
            write_manifest(staged, manifest)
            with stage(model_dir, "validation of the int8 graph"):
                int8 = _bundle_probabilities(staged)
            if not np.isfinite(int8).all():
                raise ExportError("validation of the int8 graph failed: it gives probabilities that are no numbers")
            # `fused` and the log-probability difference stay the fp32 graph's, which was validated; the
            # int8 graph (quantized from the unfused one) is measured against it.
            validation.update(int8_label_agreement=float((int8.argmax(1) == fp32.argmax(1)).mean()),
                              int8_max_abs_prob_diff=float(np.abs(int8 - fp32).max()))
        manifest = dataclasses.replace(manifest, validation=validation)
        write_manifest(staged, manifest)
    return manifest


# What a classifier bundle feeds its graph (`runtime.classifier`).
FED = ("input_ids", "attention_mask", "token_type_ids")


def _traced_with_token_types(config) -> bool:
    """Whether optimum's exporter traces this model type with sample token type ids (BERT's, ELECTRA's;
    not RoBERTa's, whose configs hold one token type too)."""
    from optimum.exporters.tasks import TasksManager

    try:
        make = TasksManager.get_exporter_config_constructor("onnx", model_type=config.model_type,
                                                            task="text-classification", library_name="transformers")
        return "token_type_ids" in make(config).inputs
    except Exception:  # a model type optimum does not know: its export says why
        return False


def _graph_inputs(model_dir: Path, graph: Path, model, tokenizer) -> bool:
    """Refuse a graph that needs an input the bundle does not feed; returns whether it leaves out the
    token types the tokenizer gives and the model takes (harmless where the graph adds the same type-0
    embedding the zeros give, RoBERTa's; not GPT-2's, whose types index its token embeddings: validation
    says)."""
    import onnx

    inputs = {i.name for i in onnx.load(str(graph), load_external_data=False).graph.input}
    unfed = sorted(inputs - set(FED))
    if unfed:
        raise ExportError(f"{model_dir}: a {model.config.model_type} classifier's graph needs {unfed[0]!r}, which a "
                          f"classifier bundle does not give (it feeds {', '.join(FED)})")
    takes = inspect.signature(model.forward).parameters
    return "token_type_ids" in tokenizer.model_input_names and "token_type_ids" in takes and "token_type_ids" not in inputs


def _fuse(source: Path, target: Path, config) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    with quiet_exporter():
        optimized = optimize_model(str(source), model_type=_FUSIONS[config.model_type], num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size, opt_level=1, use_gpu=False)
        optimized.save_model_to_file(str(target))


def _torch_probabilities(model, tokenizer, max_input_tokens: int) -> np.ndarray:
    """PyTorch's probabilities of the samples, cut as the bundle cuts them (longest first, to its
    max input tokens, which a tokenizer may not know)."""
    import torch

    takes = inspect.signature(model.forward).parameters  # a tokenizer may give token types BART does not take
    rows = []
    for text, pair in SAMPLES:
        encoded = tokenizer(text, pair, return_tensors="pt", truncation=True, max_length=max_input_tokens)
        with torch.no_grad():
            rows.append(torch.softmax(model(**{k: v for k, v in encoded.items() if k in takes}).logits[0], -1).numpy())
    return np.stack(rows)


def _log(probabilities: np.ndarray) -> np.ndarray:
    """Log-probabilities, those below float32's normal range read as its smallest normal one: a label
    both sides give (nearly) no chance differs by nothing, where log(0) - log(0) would be NaN."""
    return np.log(np.maximum(probabilities, np.finfo(np.float32).tiny))


def _bundle_probabilities(path: Path) -> np.ndarray:
    from lmcor.runtime.classifier import Classifier

    classifier = Classifier.load(path, providers=["CPUExecutionProvider"])
    alone = np.stack([r.probabilities for r in classifier.classify_batch(list(SAMPLES), batch_size=1)])
    batched = np.stack([r.probabilities for r in classifier.classify_batch(list(SAMPLES), batch_size=len(SAMPLES))])
    if not np.allclose(alone, batched, atol=1e-4):  # a row's probabilities must not depend on its batch
        raise ExportError(f"validation failed: probabilities differ batched and alone (max diff "
                          f"{float(np.abs(alone - batched).max()):.3g})")
    return alone
