"""The self-describing model bundle: `lmcor.json` manifest + ONNX files + `tokenizer.json`.

`load_manifest(path)` is the one entry point for reading a bundle; `write_manifest` is used by
the exporter, `update_manifest` by the recipes that change a setting of a bundle. Every file of the bundle is listed with its sha256 in the manifest, and loading
checks them, so a truncated copy or a swapped file is caught before any session opens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import math
import os
import posixpath
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import BundleError, InputError
from .jsonl import unique_keys
from .options import MAX_NO_REPEAT_NGRAM, check_flag, check_text, shown

MANIFEST_NAME = "lmcor.json"
# Bounds of a bundle's token limits, beyond any model's: a larger value is a damaged manifest, which
# would fail later (an output limit past int64 in a batch's arrays).
MAX_INPUT_TOKENS = 1 << 22
MAX_OUTPUT_TOKENS = 32768
FORMAT_VERSION = 3
# Version 1 bundles predate `decoder_graph` and always hold "merged". Before version 3, int8
# bundles quantized each MatMul's input with one scale per tensor, so a row's output depended on
# the rest of its batch (and drafted decoding was not exact); since, each row on its own.
READABLE_VERSIONS = (1, 2, 3)
PER_ROW_INT8_SINCE = 3
KINDS = ("corrector", "classifier", "causal-lm")
# "merged": optimum's merged decoder (every row advances by the same number of tokens);
# "ragged": lmcor's step graph + cross-attention graph (per-row lengths; drafted decoding).
DECODER_GRAPHS = ("merged", "ragged")
# The graphs' arithmetic: "fp16"/"bf16" hold half-precision weights and matrix products (inputs and
# outputs stay fp32); a "bf16" bundle runs on CUDA only (ONNX Runtime's CPU has no bf16 kernels).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class Template:
    """How a request becomes the model's input text.

    `text` holds `{source}` and `{candidates}`; each candidate is rendered with `candidate`
    (which may use `{candidate}`, `{i}` from 0 and `{n}` from 1) and the rendered candidates are
    joined with `separator`. LMCor's format is the default; GenFuser-style numbered markers are
    `candidate="<extra_id_{i}> {candidate}"` with `separator=" "`.
    """

    text: str = "source: {source}\ncandidates: {candidates}"
    candidate: str = "{candidate}"
    separator: str = " <extra_id_0> "


@dataclass(frozen=True)
class SpecialTokens:
    pad: int
    eos: int
    decoder_start: int
    forced_bos: int | None = None
    forced_eos: int | None = None


@dataclass(frozen=True)
class DecoderShape:
    """What the runtime needs to build the decoder's past key values."""

    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int


@dataclass(frozen=True)
class Manifest:
    kind: str
    architecture: str
    max_input_tokens: int
    precision: str
    opset: int
    files: dict[str, str]  # role -> file name: encoder, decoder, (cross,) tokenizer; model, tokenizer
    # correctors (and, for the decoder fields, causal LMs)
    template: Template | None = None
    special_tokens: SpecialTokens | None = None
    decoder: DecoderShape | None = None
    max_output_tokens: int = 0
    decoder_graph: str = "merged"
    no_repeat_ngram_size: int = 0  # the checkpoint's generation default; 0: off
    # an output less similar than this (chrF, 0-100) to every candidate is replaced by the best guess
    # among source and candidates, any by the candidates' edit vote where they support it more
    # (`runtime.fallback.guard`; calibrated by `lmcor.recipes.fallback`); None: never
    fallback_below: float | None = None
    # and the text it returns keeps only its edits to the source of at most this many words
    # (`runtime.vote.minimal_edits`, calibrated with `fallback_below`); None: any edit
    fallback_span: int | None = None
    # classifiers: the label of each output, in order; for a gate, the probability of "right" at or
    # above which a candidate is passed (calibrated by `lmcor.recipes.gate`; None: 0.5)
    labels: tuple[str, ...] = ()
    gate_threshold: float | None = None
    # causal LMs: token ids that end an answer besides special_tokens.eos (a chat model's end of turn),
    # and the window of recent positions its attention spans, if it has one (drafts are off then:
    # the rejected drafts a row keeps in its cache would take slots of the window)
    end_tokens: tuple[int, ...] = ()
    sliding_window: int | None = None
    # classifiers: the id a batch's shorter texts are padded with (masked; but a decoder-only
    # classifier reads each row's last token that is not this id); None: 0
    pad_token: int | None = None
    # classifiers: the rows of the model's token embeddings, for texts holding a token past them (a
    # tokenizer with tokens the model was not resized for); None: not recorded, not checked
    vocab_size: int | None = None
    # correctors and causal LMs: whether outputs are decoded as transformers decodes with the checkpoint
    # tokenizer's `clean_up_tokenization_spaces` ("do n't ." -> "don't.")
    clean_up_spaces: bool = False
    # classifiers: whether the tokenizer's token type ids are fed where the graph takes them; False:
    # zeros, as transformers feeds where the tokenizer does not return them (its model_input_names)
    token_types: bool = True
    sha256: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def int8_per_tensor(self) -> bool:
        """An int8 bundle whose activations are quantized per tensor (exported before format 3): a
        row's result depends on the rest of its batch."""
        return self.precision == "int8" and self.format_version < PER_ROW_INT8_SINCE

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Manifest":
        """Read a manifest's JSON object, checking every field's type and range, so that a bundle
        that loads does not fail later on a wrong value. Errors read `<where>: <field>: <what>`."""
        top = _Fields(where, data)
        version = top.get("format_version")
        if type(version) is not int or version not in READABLE_VERSIONS:  # not bool: True == 1
            top.fail("format_version", f"unknown bundle format version {_show(version)} (this lmcor reads "
                     f"versions {READABLE_VERSIONS}; re-export the model or upgrade lmcor)")
        kind = top.get("kind")
        if kind not in KINDS:
            top.fail("kind", f"unknown bundle kind {_show(kind)} (expected one of {', '.join(KINDS)})")
        for key, value in data.items():
            if key not in _DEFAULTS:
                top.fail(key, "unknown field (misspelled, or written by a newer lmcor: upgrade it)")
            if key in _READ_BY and kind not in _READ_BY[key] and value != _DEFAULTS[key]:
                top.fail(key, f"a {kind} bundle has none (only {' and '.join(_READ_BY[key])} bundles do), "
                         f"got {_show(value)}")
        decodes = kind in ("corrector", "causal-lm")
        decoder = _decoder_shape(top.section("decoder")) if decodes else None
        graph = top.string("decoder_graph", "merged")
        if graph not in DECODER_GRAPHS:
            top.fail("decoder_graph", f"unknown decoder graph {_show(graph)} (expected one of {', '.join(DECODER_GRAPHS)})")
        pad_token = top.optional_integer("pad_token", 0) if kind == "classifier" else None
        vocab_size = top.optional_integer("vocab_size", 1) if kind == "classifier" else None
        if pad_token is not None and vocab_size is not None and pad_token >= vocab_size:
            top.fail("pad_token", f"{pad_token} is not a token id (vocab_size is {vocab_size})")
        return cls(
            kind=kind,
            architecture=top.string("architecture", nonempty=True),
            template=_template(top.section("template")) if kind == "corrector" else None,
            special_tokens=_special_tokens(top.section("special_tokens"), decoder.vocab_size) if decoder else None,
            decoder=decoder,
            max_input_tokens=top.integer("max_input_tokens", 1, maximum=MAX_INPUT_TOKENS),
            max_output_tokens=top.integer("max_output_tokens", 1, maximum=MAX_OUTPUT_TOKENS) if decodes else 0,
            labels=_labels(top) if kind == "classifier" else (),
            gate_threshold=top.number("gate_threshold", 0, 1),
            precision=_precision(top),
            opset=top.integer("opset", 1),
            files=_files(top, kind, graph),
            decoder_graph=graph,
            no_repeat_ngram_size=top.integer("no_repeat_ngram_size", 0, maximum=MAX_NO_REPEAT_NGRAM, default=0),
            fallback_below=top.number("fallback_below", 0, 100),
            end_tokens=_end_tokens(top, decoder.vocab_size) if kind == "causal-lm" else (),
            pad_token=pad_token,
            vocab_size=vocab_size,
            token_types=top.boolean("token_types", True) if kind == "classifier" else True,
            clean_up_spaces=top.boolean("clean_up_spaces", False) if decodes else False,
            sliding_window=top.optional_integer("sliding_window", 1) if kind == "causal-lm" else None,
            fallback_span=top.optional_integer("fallback_span", 0) or None,  # 0 or absent: any edit
            sha256=_sha256(top),
            validation=top.section("validation", default={}).data,
            exporter=top.section("exporter", default={}).data,
            format_version=version,
        )


_REQUIRED: Any = object()  # a field without a default
# Every field a manifest may hold, with its value as written when unset (JSON: a tuple is a list).
_DEFAULTS = {f.name: None if f.default is dataclasses.MISSING else json.loads(json.dumps(f.default))
             for f in dataclasses.fields(Manifest)}
# The fields some kinds of bundle alone read: written by every export, at their defaults elsewhere,
# where any other value would be read by nothing.
_DECODING = ("corrector", "causal-lm")
_READ_BY = {"template": ("corrector",), "special_tokens": _DECODING, "decoder": _DECODING,
            "max_output_tokens": _DECODING, "clean_up_spaces": _DECODING, "labels": ("classifier",),
            "pad_token": ("classifier",), "vocab_size": ("classifier",), "token_types": ("classifier",),
            "end_tokens": ("causal-lm",), "sliding_window": ("causal-lm",), "gate_threshold": ("classifier",),
            "no_repeat_ngram_size": ("corrector",), "fallback_below": ("corrector",), "fallback_span": ("corrector",)}
# What each kind of bundle opens (`files` roles); a ragged corrector also its "cross" graph.
ROLES = {"corrector": ("encoder", "decoder", "tokenizer"), "classifier": ("model", "tokenizer"),
         "causal-lm": ("model", "tokenizer")}
# ... and what it may hold besides: a ragged decoder's cross graph, the Triton encoder's weights.
_OPTIONAL_ROLES = {"corrector": ("cross", "packed_encoder"), "classifier": (), "causal-lm": ()}
# The placeholders of each template string, and those it must hold; `runtime.template.render` fills them.
_PLACEHOLDERS = {"text": ("source", "candidates"), "candidate": ("candidate", "i", "n")}
_NEEDED = {"text": ("source", "candidates"), "candidate": ("candidate",)}
_SHA256 = re.compile("[0-9a-f]{64}")


def _show(value: Any) -> str:
    """A value as the manifest spells it (true, "3", NaN), shortened."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """One JSON object of a manifest, read field by field: a wrong field is a BundleError naming it."""

    def __init__(self, where: str, data: Any, name: str = ""):
        if not isinstance(data, dict):
            raise BundleError(f"{where}: {name or 'manifest'}: expected a JSON object, got {_show(data)}")
        self.where, self.name, self.data = where, name, data

    def fail(self, field: str, what: str) -> NoReturn:
        raise BundleError(f"{self.where}: {self.name}{'.' if self.name else ''}{field}: {what}")

    def get(self, field: str, default: Any = _REQUIRED) -> Any:
        if field in self.data:
            return self.data[field]
        if default is _REQUIRED:
            self.fail(field, "missing (re-export the bundle with this lmcor)")
        return default

    def only(self, *fields: str) -> None:
        for key in self.data:
            if key not in fields:
                self.fail(key, f"unknown field (expected {', '.join(fields)})")

    def section(self, field: str, default: Any = _REQUIRED) -> "_Fields":
        name = f"{self.name}.{field}" if self.name else field
        return _Fields(self.where, self.get(field, default), name)

    def string(self, field: str, default: Any = _REQUIRED, *, nonempty: bool = False) -> str:
        value = self.get(field, default)
        if not isinstance(value, str) or (nonempty and not value):
            self.fail(field, f"expected a {'non-empty ' if nonempty else ''}string, got {_show(value)}")
        return value

    def integer(self, field: str, minimum: int, *, maximum: int | None = None, default: Any = _REQUIRED) -> int:
        value = self.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"expected an integer, got {_show(value)}")
        if value < minimum:
            self.fail(field, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(field, f"must be at most {maximum}, got {value}")
        return value

    def optional_integer(self, field: str, minimum: int) -> int | None:
        """An optional integer of at least `minimum`; absent or null: None."""
        return None if self.get(field, None) is None else self.integer(field, minimum)

    def boolean(self, field: str, default: bool) -> bool:
        value = self.get(field, default)
        if not isinstance(value, bool):
            self.fail(field, f"expected true or false, got {_show(value)}")
        return value

    def number(self, field: str, low: float, high: float) -> float | None:
        """An optional number in [low, high]; absent or null: None."""
        value = self.get(field, None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:  # an int
            # of any size is finite (math.isfinite would overflow converting it)
            self.fail(field, f"expected null or a number from {low} to {high}, got {_show(value)}")
        return float(value)


def _precision(top: _Fields) -> str:
    precision = top.string("precision", nonempty=True)
    if precision not in PRECISIONS:
        top.fail("precision", f"unknown precision {_show(precision)} (expected one of {', '.join(PRECISIONS)}; "
                 "re-export the model or upgrade lmcor)")
    return precision


def _end_tokens(top: _Fields, vocab_size: int) -> tuple[int, ...]:
    tokens = top.get("end_tokens", [])
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab_size for t in tokens):
        top.fail("end_tokens", f"expected a list of token ids below decoder.vocab_size ({vocab_size}), got {_show(tokens)}")
    return tuple(tokens)


def _decoder_shape(fields: _Fields) -> DecoderShape:
    names = [f.name for f in dataclasses.fields(DecoderShape)]
    fields.only(*names)
    return DecoderShape(**{name: fields.integer(name, 1) for name in names})


def _special_tokens(fields: _Fields, vocab_size: int) -> SpecialTokens:
    names = [f.name for f in dataclasses.fields(SpecialTokens)]
    fields.only(*names)
    ids: dict[str, int | None] = {}
    for name in names:
        if name.startswith("forced_") and fields.get(name, None) is None:
            ids[name] = None
            continue
        ids[name] = token = fields.integer(name, 0)
        if token >= vocab_size:
            fields.fail(name, f"{token} is not a token id (decoder.vocab_size is {vocab_size})")
    return SpecialTokens(**ids)


_TEXTS = ("source", "candidates", "candidate")  # placeholders `render` fills with text


def template_problem(template: Template) -> tuple[str, str] | None:
    """(field, what is wrong) for a template `render` cannot fill, else None: the one rule for the
    exporter and the loader."""
    for part in ("text", "candidate", "separator"):
        value = getattr(template, part)
        if "\x00" in value:  # render's own markers are NUL-delimited: the text would be taken for one
            return part, "holds a NUL character (\\x00), which lmcor keeps for its own use"
        try:
            check_text("it", value)
        except InputError as e:
            return part, str(e).removeprefix("it ")
    for part, allowed in _PLACEHOLDERS.items():
        value = getattr(template, part)
        use = f"use only {', '.join(f'{{{name}}}' for name in allowed)}"
        try:
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(value)
                      if name is not None]
        except ValueError as e:
            return part, f"{e} ({use}; write a literal brace twice)"
        names = [name for name, _, _ in fields]
        for name, spec, conversion in fields:
            if name not in allowed:
                return part, f"unknown placeholder {{{name}}} ({use})"
            # The texts go in as they are: a conversion or format spec would apply to render's markers.
            if name in _TEXTS and (spec or conversion):
                written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                return part, f"{written}: a text placeholder takes no conversion or format spec (write {{{name}}})"
        for name in _NEEDED[part]:
            if name not in names:
                return part, f"must contain {{{name}}}"
        try:  # a format spec can hold placeholders of its own, or not fit its value
            value.format(**{name: 0 if name in ("i", "n") else "" for name in allowed})
        except (KeyError, IndexError, ValueError, TypeError) as e:
            return part, f"cannot be filled ({e!r}; {use})"
    return None


def _template(fields: _Fields) -> Template:
    defaults = Template()
    names = [f.name for f in dataclasses.fields(Template)]
    fields.only(*names)
    template = Template(**{name: fields.string(name, getattr(defaults, name)) for name in names})
    problem = template_problem(template)
    if problem is not None:
        fields.fail(*problem)
    return template


def _labels(top: _Fields) -> tuple[str, ...]:
    labels = top.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        top.fail("labels", f"expected a non-empty list of non-empty strings, got {_show(labels)}")
    if len(labels) < 2:
        top.fail("labels", f"a classifier has at least 2 labels, got {_show(labels)} (a one-output head is a "
                 "regression, which lmcor does not run)")
    if len(set(labels)) != len(labels):
        top.fail("labels", f"the labels must be distinct, got {', '.join(map(repr, labels))}")
    return tuple(labels)


def _path_problem(name: Any) -> str | None:
    """What keeps a manifest's file name from being a plain relative path inside the bundle, or None.
    (Symbolic links are followed by `load_manifest`, which has the bundle's folder.)"""
    if not isinstance(name, str) or not name:
        return f"expected a file name, got {_show(name)}"
    try:
        check_text("it", name)
    except InputError as e:
        return f"{_show(name)} {str(e).removeprefix('it ')}"
    if name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in name.split("/")):
        return f"{_show(name)} is not a path inside the bundle (write it relative, without '..', '.', '\\' or '//')"
    return None


def _files(top: _Fields, kind: str, graph: str) -> dict[str, str]:
    fields = top.section("files")
    known = (*ROLES[kind], *_OPTIONAL_ROLES[kind])
    for role, name in fields.data.items():
        if role not in known:  # a misspelt role ("crosss") would be read by nothing
            fields.fail(role, f"not a file role of a {kind} (those are {', '.join(known)})")
        problem = _path_problem(name)
        if problem is not None:
            fields.fail(role, problem)
    for role in (*ROLES[kind], *(("cross",) if graph == "ragged" else ())):
        if role not in fields.data:
            what = "a ragged decoder" if role == "cross" else f"a {kind}"
            fields.fail(role, f"missing: {what} needs its {role} file")
    return dict(fields.data)


def _sha256(top: _Fields) -> dict[str, str]:
    fields = top.section("sha256", default={})
    for name, digest in fields.data.items():
        problem = _path_problem(name)
        if problem is not None:
            top.fail("sha256", f"key {problem}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            fields.fail(name, f"expected 64 lowercase hex digits, got {_show(digest)}")
    return dict(fields.data)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_path(path: Any) -> Path:
    """`path`, a bundle folder's path given as str or Path (anything else: one `InputError`)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"a bundle is a folder's path (str or Path), got {type(path).__name__}")
    if not os.fspath(path).strip():
        raise InputError("a bundle's path is empty; give its folder")
    if (why := not_utf8(path)) is not None:
        raise InputError(f"{os.fspath(path)}: {why}")
    return Path(path)


def not_utf8(path: str | os.PathLike) -> str | None:
    """Why ONNX Runtime and tokenizers, which take paths as UTF-8 text, cannot open `path`: a name
    holding bytes that are not UTF-8 (which Python keeps as lone surrogates); else None."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        return f"the path is not UTF-8 ({byte}), which ONNX Runtime and tokenizers cannot open: rename it"
    return None


def load_manifest(path: str | Path, *, verify: bool = True, kind: str | None = None) -> Manifest:
    """Read and check a bundle's manifest; with `verify`, check every file's sha256; with `kind`,
    check that the bundle is of that kind. Every file the manifest names must lie inside the bundle's
    folder, symbolic links followed: a manifest cannot make lmcor open any other file. (The external
    data files a graph names are ONNX Runtime's to confine: it refuses '..', absolute paths and links
    that lead out of the graph's folder.)"""
    root = bundle_path(path)
    check_flag("verify", verify)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root}: a file, not a bundle folder" if root.exists() else f"{root}: no such bundle directory")
    if manifest_path.exists() and not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: not a file")
    if not manifest_path.is_file():
        raise BundleError(f"{root}: not an lmcor bundle ({MANIFEST_NAME} is missing; run `lmcor export` first)")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError, InputError) as e:  # not JSON, not UTF-8; an integer of over 4,300
        # digits, deep nesting; a field given twice (Python would keep the last without a word)
        raise BundleError(f"{manifest_path}: corrupt manifest ({e})") from None
    manifest = Manifest.from_json(data, str(manifest_path))
    if kind is not None and manifest.kind != kind:
        raise BundleError(f"{root}: a {manifest.kind!r} bundle, not a {kind}")
    inside = root.resolve()
    named = [(f"files.{role}", name) for role, name in manifest.files.items()]
    named += [(f"sha256[{_show(name)}]", name) for name in manifest.sha256]
    for where, name in named:
        if not _resolved(root / name, f"{manifest_path}: {where}").is_relative_to(inside):
            raise BundleError(f"{manifest_path}: {where}: {name!r} leads outside the bundle through a symbolic "
                              "link (copy the file into the bundle)")
    for role, name in manifest.files.items():
        if not (root / name).is_file():
            raise BundleError(f"{manifest_path}: files.{role}: the {role} file {name!r} is missing")
    if verify:
        _verify(root, manifest_path, manifest, has_table="sha256" in data)
    return manifest


def _resolved(file: Path, where: str) -> Path:
    try:
        return file.resolve()
    except (RuntimeError, OSError) as e:  # a loop of symbolic links (a RuntimeError before Python 3.13)
        raise BundleError(f"{where}: {file.name!r} cannot be followed ({e})") from None


def _verify(root: Path, manifest_path: Path, manifest: Manifest, *, has_table: bool) -> None:
    # Without a checksum, a swapped file would load unnoticed: every file the runtime opens needs one.
    if not has_table:
        raise BundleError(f"{manifest_path}: sha256: missing, so the files cannot be verified "
                          "(re-export the bundle, or load it with verify=False)")
    for role, name in manifest.files.items():
        if name not in manifest.sha256:
            raise BundleError(f"{manifest_path}: sha256: no checksum for the {role} file {name!r} "
                              "(re-export the bundle, or load it with verify=False)")
        for location in _external_files(root / name) if name.endswith(".onnx") else ():
            weights = posixpath.normpath(posixpath.join(posixpath.dirname(name), location))  # beside its graph
            if not _resolved(root / weights, f"{root / name}: its weights file").is_relative_to(root.resolve()):
                raise BundleError(f"{root / name}: its weights file {location!r} leads outside the bundle (copy the "
                                  "file into the bundle)")
            if weights not in manifest.sha256 and (root / weights).is_file():
                raise BundleError(f"{manifest_path}: sha256: no checksum for {weights!r}, which the {role} graph "
                                  "reads its weights from (re-export the bundle, or load it with verify=False)")
    for name, expected in manifest.sha256.items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"{manifest_path}: sha256: {name!r} is listed in the manifest but missing")
        if sha256_of(file) != expected:
            raise BundleError(f"{file}: checksum mismatch (the file is corrupt or was changed after export)")


# Each tensor of an ONNX graph stored outside it names its file in an entry of `external_data`
# (TensorProto field 13: tag 0x6a, then the entry's length, a varint): a StringStringEntryProto of
# field 1 (key) "location" and field 2 (value) the path. (The model's `metadata_props`, another field,
# may hold a "location" of its own.) Read from the graph's bytes, a block at a time: onnx is no
# dependency of the runtime, and a graph may hold GBs.
_LOCATION = re.compile(rb"\x6a[\x80-\xff]{0,2}[\x00-\x7f]\x0a\x08location\x12")
_OVERLAP = 4096  # bytes a block keeps of the one before it: an entry across the seam is read whole


def _external_files(graph: Path) -> set[str]:
    """The files a graph's tensors are read from besides the graph itself (by their paths as written)."""
    names: set[str] = set()
    with open(graph, "rb") as f:
        data = b""
        while block := f.read(1 << 20):
            data = data[-_OVERLAP:] + block
            for match in _LOCATION.finditer(data):
                at, length, shift = match.end(), 0, 0
                while at < len(data) and shift < 35:  # the value's length, a varint
                    length |= (data[at] & 0x7F) << shift
                    at, shift = at + 1, shift + 7
                    if not data[at - 1] & 0x80:
                        break
                if at + length > len(data):
                    continue  # past this block's end: read whole in the next one
                try:
                    name = data[at : at + length].decode("utf-8")
                except UnicodeDecodeError:
                    continue  # weights' bytes that look like the key, not an entry
                if name and "\x00" not in name:
                    names.add(name)
    return names


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Write `lmcor.json`, recording the sha256 of every other file in `root` (an export's staged folder)."""
    sums = {p.name: sha256_of(p) for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    _write(root, dataclasses.replace(manifest, sha256=sums))


def update_manifest(root: Path, **changes: Any) -> Manifest:
    """Change settings in an exported bundle's manifest (its files checked first). The checksums stay
    those of the files it lists: a file written beside them since (a recipe's report) is no part of
    the bundle, and would fail its loading once changed."""
    manifest = dataclasses.replace(load_manifest(root), **changes)
    _write(root, manifest)
    return manifest


def _write(root: Path, manifest: Manifest) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")


def shipped_bundle(name: str) -> Path:
    """A bundle shipped inside the package: "default" (the corrector used when no path is given),
    "default-int8", or "gate" (the gate of `lmcor correct --gate`)."""
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise InputError(f"a shipped bundle's name is one of 'default', 'default-int8', 'gate', got {shown(name)}")
    path = Path(str(importlib.resources.files("lmcor") / "models" / name))
    if not (path / MANIFEST_NAME).is_file():
        raise BundleError(f"no bundle {name!r} is installed with this lmcor; pass the path of an exported bundle")
    return path
