"""The self-describing model bundle: `lmcor.json` manifest + ONNX files + `tokenizer.json`.

`load_manifest(path)` is the one entry point for reading a bundle; `write_manifest` is used by
the exporter. Every file of the bundle is listed with its sha256 in the manifest, and loading
checks them, so a truncated copy or a swapped file is caught before any session opens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

MANIFEST_NAME = "lmcor.json"
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
    # an output less similar than this (chrF, 0-100) to every candidate is replaced by the nearest
    # one (`runtime.fallback`; calibrated by `lmcor.recipes.fallback`); None: never
    fallback_below: float | None = None
    # classifiers: the label of each output, in order; for a gate, the probability of "right" at or
    # above which a candidate is passed (calibrated by `lmcor.recipes.gate`; None: 0.5)
    labels: tuple[str, ...] = ()
    gate_threshold: float | None = None
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
    def from_json(cls, data: dict[str, Any], where: str) -> "Manifest":
        try:
            corrector = data["kind"] == "corrector"
            decodes = data["kind"] in ("corrector", "causal-lm")
            return cls(
                kind=data["kind"],
                architecture=data["architecture"],
                template=Template(**data["template"]) if corrector else None,
                special_tokens=SpecialTokens(**data["special_tokens"]) if decodes else None,
                decoder=DecoderShape(**data["decoder"]) if decodes else None,
                max_input_tokens=int(data["max_input_tokens"]),
                max_output_tokens=int(data["max_output_tokens"]) if decodes else 0,
                labels=tuple(data["labels"]) if data["kind"] == "classifier" else (),
                gate_threshold=None if data.get("gate_threshold") is None else float(data["gate_threshold"]),
                precision=data["precision"],
                opset=int(data["opset"]),
                files=dict(data["files"]),
                decoder_graph=data.get("decoder_graph", "merged"),
                no_repeat_ngram_size=int(data.get("no_repeat_ngram_size", 0)),
                fallback_below=None if data.get("fallback_below") is None else float(data["fallback_below"]),
                sha256=dict(data.get("sha256", {})),
                validation=dict(data.get("validation", {})),
                exporter=dict(data.get("exporter", {})),
                format_version=int(data["format_version"]),
            )
        except KeyError as e:
            raise BundleError(f"{where}: manifest lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"{where}: malformed manifest ({e})") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: str | Path, *, verify: bool = True, kind: str | None = None) -> Manifest:
    """Read and check a bundle's manifest; with `verify`, check every file's sha256; with `kind`,
    check that the bundle is of that kind."""
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    if not manifest_path.is_file():
        raise BundleError(f"{root}: not an lmcor bundle ({MANIFEST_NAME} is missing; run `lmcor export` first)")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path}: corrupt manifest ({e})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_path}: corrupt manifest (not a JSON object)")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"{manifest_path}: unknown bundle format version {version!r} "
            f"(this lmcor reads versions {READABLE_VERSIONS}; re-export the model or upgrade lmcor)"
        )
    manifest = Manifest.from_json(data, str(manifest_path))
    if manifest.kind not in KINDS:
        raise BundleError(f"{manifest_path}: unknown bundle kind {manifest.kind!r} (expected one of {KINDS})")
    if kind is not None and manifest.kind != kind:
        raise BundleError(f"{root}: a {manifest.kind!r} bundle, not a {kind}")
    if manifest.decoder_graph not in DECODER_GRAPHS:
        raise BundleError(f"{manifest_path}: unknown decoder_graph {manifest.decoder_graph!r} (expected one of {DECODER_GRAPHS})")
    if manifest.decoder_graph == "ragged" and "cross" not in manifest.files:
        raise BundleError(f"{manifest_path}: a ragged decoder needs a 'cross' file")
    for role, name in manifest.files.items():
        if not (root / name).is_file():
            raise BundleError(f"{root}: the {role} file {name!r} is missing")
    if verify:
        for name, expected in manifest.sha256.items():
            file = root / name
            if not file.is_file():
                raise BundleError(f"{root}: {name!r} is listed in the manifest but missing")
            if sha256_of(file) != expected:
                raise BundleError(f"{file}: checksum mismatch (the file is corrupt or was changed after export)")
    return manifest


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Write `lmcor.json`, recording the sha256 of every other file in `root`."""
    sums = {p.name: sha256_of(p) for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    manifest = dataclasses.replace(manifest, sha256=sums)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")


def shipped_bundle(name: str) -> Path:
    """A bundle shipped inside the package: "default" (the corrector used when no path is given),
    "default-int8", or "gate" (the gate of `lmcor correct --gate`)."""
    path = Path(str(importlib.resources.files("lmcor") / "models" / name))
    if not (path / MANIFEST_NAME).is_file():
        raise BundleError(f"no bundle {name!r} is installed with this lmcor; pass the path of an exported bundle")
    return path
