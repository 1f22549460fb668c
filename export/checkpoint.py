"""What every exporter shares: reading a Hugging Face checkpoint folder, running optimum's
exporter into a staging folder, and putting the validated bundle in place.

A bundle is built in a temporary folder beside `out_dir` and moved there only when the exporter's
body finishes (after validation), so a failing export never leaves a half-written bundle.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx

from lmcor.runtime.errors import BundleError, ExportError, LmcorError

log = logging.getLogger("lmcor")

TOKENIZER_FILE = "tokenizer.json"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # correctors; classifiers: fp32, int8
CLASSIFIER_PRECISIONS = ("fp32", "int8")


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's and quantizer's tracer warnings and advice say nothing actionable to lmcor users
    (the quantizer logs through the root logger)."""
    loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "torch.onnx", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def stage(model_dir: Path, name: str) -> Iterator[None]:
    """One stage of an export that runs torch, transformers, optimum, onnx or ONNX Runtime: their
    exceptions become one `ExportError` line naming the checkpoint and the stage (the traceback goes
    to the debug log and stays chained). lmcor's own errors, and its bugs, pass unchanged."""
    try:
        yield
    except BundleError as e:  # the bundle being staged, refused by the runtime: named by its file, not its temporary path
        where, _, what = str(e).partition(": ")
        raise ExportError(f"{model_dir}: {name} failed: the exported {Path(where).name}: {what}") from e
    except LmcorError:
        raise
    except Exception as e:
        if _raised_by_lmcor(e):
            raise  # a bug of lmcor's own: its traceback is the report
        log.debug("%s: %s failed", model_dir, name, exc_info=True)
        lines = str(e).strip().splitlines()
        raise ExportError(f"{model_dir}: {name} failed: {type(e).__name__}" + (f": {lines[0]}" if lines else "")) from e


def _raised_by_lmcor(error: BaseException) -> bool:
    """Whether `error` comes from lmcor's own code rather than from a library it called."""
    trace = error.__traceback__
    while trace.tb_next is not None:
        trace = trace.tb_next
    return trace.tb_frame.f_globals.get("__name__", "").split(".")[0] == "lmcor"


# What a fast tokenizer is loaded or converted from: its own file, SentencePiece's model (T5, mT5),
# or BPE/WordPiece vocabularies (BART, GPT-2, BERT).
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.json",
                   "vocab.txt")


def load_checkpoint(model_dir: Path, out_dir: Path, auto_class: str, *, overwrite: bool):
    """(model in eval mode, fast tokenizer) of a checkpoint folder, after checking both folders.

    `auto_class` names the transformers auto class (e.g. "AutoModelForSeq2SeqLM")."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ExportError(f"exporting needs the export extra: pip install 'lmcor[export]' ({e})") from None
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: not a Hugging Face checkpoint folder (no config.json)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir}: exists and is not empty (pass overwrite=True / --force to replace it)")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(f"{model_dir}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                          "tokenizer with the model (tokenizer.save_pretrained)")
    with stage(model_dir, "loading the checkpoint"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, use_fast=True)
        if not getattr(tokenizer, "is_fast", False):
            raise ExportError(f"{model_dir}: no fast tokenizer (tokenizer.json) can be built for this checkpoint")
        model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


@contextlib.contextmanager
def staged_export(model_dir: Path, out_dir: Path, task: str, opset: int | None) -> Iterator[tuple[Path, Path]]:
    """Run optimum's exporter for `task` into `raw` and yield (raw, staged); when the body finishes,
    `staged` replaces `out_dir`."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise ExportError(f"exporting needs the export extra: pip install 'lmcor[export]' ({e})") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        raw, staged = Path(tmp) / "optimum", Path(tmp) / "bundle"
        with stage(model_dir, "ONNX export"), quiet_exporter():
            main_export(str(model_dir), output=raw, task=task, opset=opset, device="cpu", do_validation=False,
                        local_files_only=True)
        staged.mkdir()
        yield raw, staged
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.move(str(staged), out_dir)


def input_limit(config, tokenizer, asked: int | None) -> int:
    """The bundle's max input tokens: `asked`, which must fit the model's positions; else the
    tokenizer's declared limit, else the model's positions, else 512."""
    positions = model_positions(config)
    if asked is not None:
        if positions is not None and asked > positions:
            raise ExportError(f"--max-input-tokens {asked}: the model has {positions} positions")
        return asked
    declared = getattr(tokenizer, "model_max_length", None)
    if declared and declared < 1_000_000:
        return int(min(declared, positions or declared))
    return positions or 512


DEFAULT_OUTPUT_TOKENS = 256


def output_limit(config, asked: int | None, *, after_prompt: bool = False) -> int:
    """The bundle's max output tokens: `asked`, which must fit the model's positions (a causal LM's,
    `after_prompt`, also hold a prompt of at least one token); else `DEFAULT_OUTPUT_TOKENS`, or as
    many as the positions allow. A decoder fed past its last position fails (BART's learned ones)."""
    positions = model_positions(config)
    room = None if positions is None else positions - after_prompt
    if asked is not None:
        if room is not None and asked > room:
            shared = " shared with the prompt (at least 1 token)" if after_prompt else ""
            raise ExportError(f"--max-output-tokens {asked}: the model has {positions} positions{shared}; "
                              f"at most {room}")
        return asked
    return min(DEFAULT_OUTPUT_TOKENS, room if room is not None else DEFAULT_OUTPUT_TOKENS)


# Models whose position ids start after the padding id (RoBERTa's embeddings): pad_token_id + 1 of
# their max_position_embeddings are never a position.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet", "data2vec-text",
                     "roberta-prelayernorm", "ibert", "luke", "markuplm", "esm"}


def model_positions(config) -> int | None:
    """How many positions the model has (None: relative positions, as T5's, set no limit)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            offset = (config.pad_token_id or 0) + 1 if config.model_type in _OFFSET_POSITIONS else 0
            return int(value) - offset
    return None


def opset_of(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def versions() -> dict[str, str]:
    out = {}
    for dist in ("lmcor", "torch", "transformers", "optimum-onnx", "onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out
