"""What every exporter shares: reading a Hugging Face checkpoint folder, running optimum's
exporter into a staging folder, and putting the validated bundle in place.

A bundle is built in a temporary folder beside `out_dir` and moved there only when the exporter's
body finishes (after validation), so a failing export never leaves a half-written bundle.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx

from lmcor.runtime.bundle import MANIFEST_NAME, MAX_INPUT_TOKENS, MAX_OUTPUT_TOKENS, not_utf8
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
        with warnings.catch_warnings(), _held_output():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def redirected_output(fds: tuple[int, ...], target: int) -> Iterator[None]:
    """Point the process's file descriptors `fds` (1: stdout, 2: stderr) at `target` while the body
    runs: C++ and Rust code (torch's exporter, the tokenizers trainer) write to them past Python's
    streams. Only in the main thread, as the descriptors are the whole process's (a thread's export
    would take another's output), and only those open (a closed stdout stays closed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _flush()
    saved = {}
    for fd in fds:
        try:
            copy = os.dup(fd)
        except OSError:
            continue  # closed
        try:
            os.dup2(target, fd)
        except OSError:  # the target is closed (stderr, for stdout's output): leave it be
            os.close(copy)
            continue
        saved[fd] = copy
    try:
        yield
    finally:
        _flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed, or its reader gone
            pass


@contextlib.contextmanager
def _held_output() -> Iterator[None]:
    """Hold stdout and stderr in a file: torch.onnx's TorchScript exporter writes its whole IR graph
    there when a conversion fails. The exception still carries the error; what was held goes to the
    debug log (`lmcor -v`)."""
    with tempfile.TemporaryFile() as held:
        with redirected_output((1, 2), held.fileno()):
            yield
        if log.isEnabledFor(logging.DEBUG):
            held.seek(0)
            text = held.read().decode(errors="replace").strip()
            if text:
                log.debug("the exporter's own output:\n%s", text)


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
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        said = lines[0] if lines else ""
        if said.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for Linear:" and why
            said += " " + lines[1]
        if len(said) > _SAID_MOST:  # a library's line can list hundreds of names
            said = said[:_SAID_MOST] + " ..."
        raise ExportError(f"{model_dir}: {name} failed: {type(e).__name__}" + (f": {said}" if said else "")) from e


_SAID_MOST = 400  # characters of a library's error line an ExportError quotes


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


# The bundle kind (`--kind`) each transformers auto class exports.
_KINDS = {"AutoModelForSeq2SeqLM": "corrector", "AutoModelForCausalLM": "causal-lm",
          "AutoModelForSequenceClassification": "classifier"}
# A checkpoint's own class name (config.json's `architectures`) -> the kind it suggests.
_ARCHITECTURE_KINDS = (("ForSequenceClassification", "classifier"), ("ForCausalLM", "causal-lm"),
                       ("LMHeadModel", "causal-lm"), ("ForConditionalGeneration", "corrector"))
SEQ2SEQ_TYPES = ("t5", "mt5", "bart", "mbart")  # the correctors lmcor decodes


def load_checkpoint(model_dir: Path, out_dir: Path, auto_class: str, *, overwrite: bool):
    """(model in eval mode, fast tokenizer) of a checkpoint folder, after checking both folders.

    `auto_class` names the transformers auto class (e.g. "AutoModelForSeq2SeqLM")."""
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: not a Hugging Face checkpoint folder (no config.json)")
    refuse_overlap(model_dir, out_dir)
    check_replaceable(out_dir, overwrite)
    model, tokenizer = load_model(model_dir, auto_class)
    if getattr(tokenizer, "split_special_tokens", False):
        # tokenizer.json cannot keep it: the bundle would read "[SEP]" written in a text as the token.
        raise ExportError(f"{model_dir}: its tokenizer splits special tokens' text into ordinary pieces "
                          "(split_special_tokens), which a bundle's tokenizer.json cannot record; set it to false in "
                          "tokenizer_config.json where the model allows")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        log.warning("%s: the tokenizer has %d tokens, the model's embeddings %d: a text holding one of the others "
                    "is refused (resize them: model.resize_token_embeddings(len(tokenizer)))", model_dir,
                    len(tokenizer), vocab)
    return model, tokenizer


def load_model(model_dir: Path, auto_class: str):
    """(model in eval mode, fast tokenizer) of a checkpoint folder, each of its files checked first and
    every weight of the model present (exporting and fine-tuning both need the whole model)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ExportError(f"exporting needs the export extra: pip install 'lmcor[export]' ({e})") from None
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: not a Hugging Face checkpoint folder (no config.json)")
    if (why := not_utf8(model_dir)) is not None:
        raise ExportError(f"{model_dir}: {why}")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(f"{model_dir}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                          "tokenizer with the model (tokenizer.save_pretrained)")
    _check_files(model_dir)
    with stage(model_dir, "loading the checkpoint"):
        config = transformers.AutoConfig.from_pretrained(model_dir)
        _check_kind(model_dir, config, auto_class)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, use_fast=True)
        if not getattr(tokenizer, "is_fast", False):
            raise ExportError(f"{model_dir}: no fast tokenizer (tokenizer.json) can be built for this checkpoint")
        model, loading = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=torch.float32,
                                                                          output_loading_info=True)
    # Weights the checkpoint lacks would start at random (transformers only warns), and the bundle, traced
    # from that same model, would pass its own validation: wrong outputs that look checked.
    missing = sorted(loading.get("missing_keys") or [])
    if missing and auto_class == "AutoModelForSequenceClassification":
        raise ExportError(f"{model_dir}: no classification head in this checkpoint ({', '.join(missing[:3])} "
                          "would start at random): export a model fine-tuned for sequence classification")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ExportError(f"{model_dir}: the checkpoint lacks weights of this model ({', '.join(missing[:3])}{more} "
                          "would start at random): save the whole model (model.save_pretrained), or export one with "
                          "its language-model head")
    return model.eval(), tokenizer


def refuse_overlap(model_dir: Path, out_dir: Path, what: str = "checkpoint") -> None:
    """Replacing `out_dir` must never delete what it is made from (the checkpoint, or a bundle): refuse
    it as that folder or one holding it (symbolic links resolved); nor the working directory, which
    the caller's shell would be left in, removed."""
    model, out, here = model_dir.resolve(), out_dir.resolve(), Path.cwd().resolve()
    if out == model or out in model.parents:
        relation = "is" if out == model else "contains"
        raise ExportError(f"{out_dir}: the output folder {relation} the {what} {model_dir}; choose another folder")
    if out_dir.exists() and (out == here or out in here.parents):
        relation = "is" if out == here else "contains"
        raise ExportError(f"{out_dir}: the output folder {relation} the working directory, which replacing it would "
                          "remove (the shell would stay in a deleted folder); run from another folder")


# The JSON files transformers reads from a checkpoint, where present.
_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "model.safetensors.index.json")


def _check_files(model_dir: Path) -> None:
    """Name a checkpoint's unreadable file before transformers fails on it with an error that does not."""
    from safetensors import SafetensorError, safe_open
    from tokenizers import Tokenizer

    for name in _JSON_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ExportError(f"{path}: not a JSON object")
        # transformers would guess the type from the folder's name (a folder renamed, another model)
        # or fail listing every type it knows
        kind = value.get("model_type") if name == "config.json" else "-"
        if not (isinstance(kind, str) and kind):
            raise ExportError(f'{path}: no "model_type" (save_pretrained writes one): add the model\'s type '
                              f"(a corrector's is one of {', '.join(SEQ2SEQ_TYPES)}; a classifier's or causal "
                              "LM's as transformers names it, e.g. bert, gpt2)")
    if (model_dir / TOKENIZER_FILE).is_file():
        try:
            Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
            raise ExportError(f"{model_dir / TOKENIZER_FILE}: cannot be read ({_first_line(e)})") from None
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):  # checks the header against the file's size (a truncated copy)
                pass
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{path}: cannot be read ({_first_line(e)})") from None


def _check_kind(model_dir: Path, config, auto_class: str) -> None:
    """Refuse a checkpoint the auto class cannot load, with the `--kind` its architecture suggests."""
    import transformers

    kind = _KINDS[auto_class]
    names = " ".join(config.architectures or ())
    kinds = [k for part, k in _ARCHITECTURE_KINDS if part in names]
    if config.model_type in SEQ2SEQ_TYPES:  # a corrector unless it classifies, whatever its head's name
        kinds = [k for k in kinds if k == "classifier"] + ["corrector"]  # (the original T5's: T5WithLMHeadModel)
    suggested = kinds[0] if kinds else None
    hint = f"; export it with --kind {suggested}" if suggested and suggested != kind else ""
    if kind == "corrector" and config.model_type not in SEQ2SEQ_TYPES:
        raise ExportError(f"{model_dir}: model type {config.model_type!r} is not supported as a corrector (supported: "
                          f"{', '.join(SEQ2SEQ_TYPES)}){hint}")
    # A seq2seq model that classifies loads as one for generation too: its LM head left untrained.
    if kind == "corrector" and suggested == "classifier":
        raise ExportError(f"{model_dir}: a {config.model_type} checkpoint that classifies ({names}) is no corrector{hint}")
    # An encoder with an LM head loads as a causal LM (BERT's), and a T5 as a classifier, which
    # the ONNX exporter does not take: neither is one of those.
    if kind == "causal-lm" and names and not any(part in names for part in ("ForCausalLM", "LMHeadModel")):
        raise ExportError(f"{model_dir}: a {config.model_type} checkpoint ({names}) is not a causal LM{hint}")
    if kind == "classifier" and config.model_type in ("t5", "mt5", "umt5", "longt5"):
        raise ExportError(f"{model_dir}: a {config.model_type} checkpoint cannot be exported as a classifier (encoder "
                          f"models such as BERT or RoBERTa, and BART, can){hint}")
    if type(config) in getattr(transformers, auto_class)._model_mapping:
        return
    raise ExportError(f"{model_dir}: a {config.model_type} checkpoint ({names or 'no architectures listed'}) "
                      f"cannot be exported as a {kind}{hint}")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# Generation settings every bundle applies (its special tokens) or that change no greedy token
# (lengths, outputs, caching; sampling's while do_sample is off).
_GENERATION_KEPT = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "max_length", "max_new_tokens", "max_time", "use_cache",
    "cache_implementation", "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
    "output_hidden_states", "transformers_version"})
_SAMPLING_ONLY = frozenset({"temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff"})


def warn_unapplied_generation(generation, applied: frozenset[str], decoding: str) -> None:
    """A warning naming each setting of a checkpoint's generation config that changes `generate`'s
    tokens and that the bundle does not apply (`applied`: those its kind does; a repetition penalty,
    min_length, a sequence bias, do_sample...). The checkpoint is still exported, validated on plain
    search; `decoding` says what the bundle does instead."""
    for name, value in generation.to_diff_dict().items():
        if not (name.startswith("_") or name in _GENERATION_KEPT or name in applied
                or name in _SAMPLING_ONLY and not generation.do_sample):
            log.warning("generation_config.%s=%r is not applied by lmcor: %s", name, value, decoding)


_SAMPLE_TOKENS = 16  # optimum's sample inputs' length (`DEFAULT_DUMMY_SHAPES`)


@contextlib.contextmanager
def staged_export(model_dir: Path, out_dir: Path, task: str, opset: int | None, config, *,
                  overwrite: bool) -> Iterator[tuple[Path, Path]]:
    """Run optimum's exporter for `task` into `raw` and yield (raw, staged); when the body finishes,
    `staged` replaces `out_dir`. A model (of `config`) of few positions is traced on sample inputs
    that fit them: optimum's are 16 tokens (a causal LM's after a sample cache of as many),
    and a model of fewer learned positions failed there (an IndexError from its embeddings, a shape
    mismatch from MPT's ALiBi or GPT-Neo's mask)."""
    positions = model_positions(config)
    shapes = {}
    if positions is not None and task.endswith("-with-past") and positions < 2 * _SAMPLE_TOKENS + 2:
        shapes = {"sequence_length": max(1, (positions - 2) // 2)}  # a sample past and a prompt after it
    elif positions is not None and positions < _SAMPLE_TOKENS + 2:
        shapes = {"sequence_length": max(1, positions - 2)}
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise ExportError(f"exporting needs the export extra: pip install 'lmcor[export]' ({e})") from None
    out_dir = Path(os.path.realpath(out_dir))  # a link's target is replaced, not the link; the staging goes beside it
    with parents_made(out_dir.parent), tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        raw, staged = Path(tmp) / "optimum", Path(tmp) / "bundle"
        with stage(model_dir, "ONNX export"), quiet_exporter():
            main_export(str(model_dir), output=raw, task=task, opset=opset, device="cpu", do_validation=False,
                        local_files_only=True, **shapes)
        staged.mkdir()
        yield raw, staged
        replace_folder(out_dir, staged, Path(tmp) / "replaced", overwrite=overwrite)


@contextlib.contextmanager
def parents_made(folder: Path) -> Iterator[None]:
    """`folder` made with its missing parents; those it made are removed again if the body fails: an
    export that failed leaves no empty folders behind."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # the deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for made in missing:
            try:
                made.rmdir()
            except OSError:  # something else was put there meanwhile
                break
        raise


def check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """`out_dir` may become the bundle: absent or empty, or with `overwrite` a bundle (its lmcor.json
    there): --force replaces an earlier export, never a folder of other files, nor a file."""
    if (why := not_utf8(out_dir)) is not None:  # found once the bundle is written and read back
        raise ExportError(f"{out_dir}: {why}")
    if out_dir.exists() and not out_dir.is_dir():  # a rename would put it in the staging folder, then delete it
        raise ExportError(f"{out_dir}: a file, not a folder (give a folder's path for the bundle)")
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        return
    if not overwrite:
        raise ExportError(f"{out_dir}: exists and is not empty (pass overwrite=True / --force to replace it)")
    if not (out_dir / MANIFEST_NAME).is_file():
        raise ExportError(f"{out_dir}: holds files but no {MANIFEST_NAME}: not a bundle, which alone overwrite=True / "
                          "--force replaces (remove the folder yourself, or export elsewhere)")


def replace_folder(out_dir: Path, staged: Path, old: Path, *, overwrite: bool) -> None:
    """Put `staged` at `out_dir` by two renames within one folder; an interruption between them puts
    the old `out_dir` back (`old` lies in the staging folder, deleted after). Checked again here: the
    folder may have filled while the export ran."""
    check_replaceable(out_dir, overwrite)
    if out_dir.exists():
        out_dir.rename(old)
    try:
        staged.rename(out_dir)
    except BaseException:
        if old.exists():
            old.rename(out_dir)
        raise


def input_limit(config, tokenizer, asked: int | None) -> int:
    """The bundle's max input tokens: `asked`, which must fit the model's positions; else the
    tokenizer's declared limit, else the model's positions, else 512."""
    positions = model_positions(config)
    if asked is not None:
        if positions is not None and asked > positions:
            raise ExportError(f"--max-input-tokens {asked}: {_positions_said(config, positions)}")
        if asked > MAX_INPUT_TOKENS:
            raise ExportError(f"--max-input-tokens {asked}: at most {MAX_INPUT_TOKENS}")
        return asked
    declared = getattr(tokenizer, "model_max_length", None)
    if declared and declared < 1_000_000:
        return int(min(declared, positions or declared))
    return min(positions or 512, MAX_INPUT_TOKENS)


def input_limit_named(asked: int | None, inputs: int) -> str:
    """`input_limit`'s value as a message names it: the flag where it was given, else where it came from."""
    if asked is not None:
        return f"--max-input-tokens {inputs}"
    return (f"the bundle's {inputs} input tokens (the tokenizer's model_max_length, or the model's positions; "
            "set --max-input-tokens)")


# A model without a position limit (T5) would take any number of output tokens; an answer is never
# MAX_OUTPUT_TOKENS long, and the bundle's limit is every request's default.
DEFAULT_OUTPUT_TOKENS = 256


def output_limit(config, asked: int | None, *, after_prompt: bool = False) -> int:
    """The bundle's max output tokens: `asked`, which must fit the model's positions (a causal LM's,
    `after_prompt`, also hold a prompt of at least one token); else `DEFAULT_OUTPUT_TOKENS`, or as
    many as the positions allow. A decoder fed past its last position fails (BART's learned ones)."""
    positions = model_positions(config)
    room = None if positions is None else positions - after_prompt
    if asked is not None and asked > MAX_OUTPUT_TOKENS:
        raise ExportError(f"--max-output-tokens {asked}: at most {MAX_OUTPUT_TOKENS} (one request's tokens)")
    if asked is not None:
        if room is not None and asked > room:
            shared = " shared with the prompt (at least 1 token)" if after_prompt else ""
            raise ExportError(f"--max-output-tokens {asked}: {_positions_said(config, positions)}{shared}; "
                              f"at most {room}")
        return asked
    return min(DEFAULT_OUTPUT_TOKENS, room if room is not None else DEFAULT_OUTPUT_TOKENS)


# Models whose position ids start after the padding id (RoBERTa's embeddings): pad_token_id + 1 of
# their max_position_embeddings are never a position.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet", "data2vec-text",
                     "roberta-prelayernorm", "ibert", "luke", "markuplm", "esm"}


def _longrope_switch(config) -> int | None:
    """Where a LongRoPE model (Phi-3's long-context ones) changes its rotary factors, as transformers
    reads it (`original_max_position_embeddings`); None for other models."""
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) != "longrope":
        return None
    original = getattr(config, "original_max_position_embeddings", None)
    return int(original) if original else None


def _positions_said(config, positions: int) -> str:
    if _longrope_switch(config) is not None:
        return (f"the bundle keeps to the model's first {positions} positions (past original_max_position_embeddings, "
                "LongRoPE changes its rotary factors, which an exported graph cannot follow)")
    return f"the model has {positions} positions"


_RELATIVE_POSITIONS = {"t5", "mt5", "umt5"}  # a bucketed relative bias: no position past which it fails


def model_positions(config) -> int | None:
    """How many positions the bundle can give the model (None: relative positions, as T5's, set no
    limit). A LongRoPE model changes its rotary factors past `_longrope_switch`, which a traced graph
    cannot follow: its bundle keeps to the positions before the change."""
    if config.model_type in _RELATIVE_POSITIONS:  # t5-small's config still says "n_positions": 512
        return None
    switch = _longrope_switch(config)
    if switch is not None:
        return switch
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):  # max_seq_len: MPT's
        value = getattr(config, name, None)
        if value:
            padding = 1 if config.model_type == "mpnet" else config.pad_token_id or 0  # MPNet's is fixed at 1
            offset = padding + 1 if config.model_type in _OFFSET_POSITIONS else 0
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
