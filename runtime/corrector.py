"""`Corrector`: a loaded corrector bundle, corrected through its `Engine`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .bundle import Manifest, bundle_path, load_manifest, shipped_bundle
from .classifier import Classifier
from .encode import PackedEncoder
from .decode import cache_layout
from .engine import DEFAULTS, Engine
from .errors import BundleError, InputError
from .options import MAX_BATCHES, check_int, check_optional
from .request import Correction, CorrectionOptions, Request
from .sessions import Sessions, check_graphs, default_threads, open_session, usable_providers
from .tokens import load_tokenizer

log = logging.getLogger("lmcor")


def _packed_encoder(root: Path, manifest: Manifest, device: str, choice: str) -> PackedEncoder | None:
    if choice not in ("auto", "onnx", "packed"):
        raise InputError(f"encoder must be 'auto', 'onnx' or 'packed', got {choice!r}")
    name = manifest.files.get("packed_encoder")
    if choice == "onnx" or (choice == "auto" and (name is None or device != "cuda")):
        return None
    if name is None:
        raise BundleError(f"{root}: no packed encoder weights (export with --packed-encoder)")
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BundleError("the packed encoder runs on CUDA (on CPU only through Triton's interpreter, TRITON_INTERPRET=1)")
    try:
        return PackedEncoder(root / name, device)
    except BundleError:
        if choice == "auto":
            return None  # no PyTorch/Triton here: the ONNX encoder gives the same states
        raise


def _open_sessions(root: Path, manifest: Manifest, providers: list[str] | None, threads: int | None) -> Sessions:
    def opened(role: str) -> ort.InferenceSession:
        return open_session(root / manifest.files[role], providers=providers, threads=threads)

    return Sessions(encoder=opened("encoder"), decoder=opened("decoder"),
                    cross=opened("cross") if "cross" in manifest.files else None)


class Corrector:
    """A seq2seq corrector: reads a source and K candidates, writes one corrected output.

    `engine` runs its models: offline through `correct_batch`, online through `engine.submit`.
    """

    def __init__(self, root: Path, manifest: Manifest, tokenizer: Tokenizer, sessions: Sessions,
                 packed: PackedEncoder | None = None, *, batches: int = 1, narrow: Sessions | None = None):
        self.root = root
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.sessions = sessions
        self.packed = packed
        self.engine = Engine(sessions, manifest, tokenizer, packed, batches=batches, narrow=narrow)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        verify: bool = True,
        encoder: Literal["auto", "onnx", "packed"] = "auto",
        batches: int = 1,
    ) -> "Corrector":
        """Load a bundle written by `lmcor export` (the shipped default corrector when `path` is None).

        `providers` are ONNX Runtime execution providers (default: CUDA when usable, else CPU);
        `threads` the intra-op threads (default: ONNX Runtime's, one per physical core);
        `verify` checks every file against the manifest's sha256.
        `encoder`: "auto" runs the Triton packed encoder when the bundle holds its weights, the
        decoder runs on CUDA and PyTorch with Triton are installed, else the ONNX encoder; "onnx"
        and "packed" choose (on CPU, "packed" needs Triton's interpreter, TRITON_INTERPRET=1).
        `batches`: the online engine's (`engine.submit`) batches decoded side by side, each by its own
        thread. On the CPU, while several have work each runs on its share of the threads, through a
        second set of sessions (the weights held twice); never more batches than threads. On a GPU,
        one (more were not measured there).
        """
        root = bundle_path(path) if path is not None else shipped_bundle("default")
        manifest = load_manifest(root, verify=verify, kind="corrector")
        tokenizer = load_tokenizer(root / manifest.files["tokenizer"], manifest.special_tokens,
                                   manifest.decoder.vocab_size)
        check_int("batches", batches, 1, MAX_BATCHES)
        providers = usable_providers(providers) if providers is not None else None
        sessions = _open_sessions(root, manifest, providers, threads)
        check_graphs(root, manifest, {"encoder": sessions.encoder, "decoder": sessions.decoder, "cross": sessions.cross})
        narrow = None
        if sessions.device == "cpu":
            total = threads or default_threads()
            batches = min(batches, total)
            if batches > 1:
                narrow = _open_sessions(root, manifest, providers, total // batches)
        else:
            batches = 1
        if manifest.decoder_graph == "ragged":
            cache_layout(sessions.device)  # LMCOR_CACHES, checked now rather than at the first request
        if manifest.int8_per_tensor:
            log.warning("%s: an int8 bundle of format %d quantizes activations per tensor, so its outputs depend on "
                        "the rest of their batch and drafted decoding is off; re-export it with this lmcor "
                        "(`lmcor export --precision int8`)", root, manifest.format_version)
        return cls(root, manifest, tokenizer, sessions, _packed_encoder(root, manifest, sessions.device, encoder),
                   batches=batches, narrow=narrow)

    @property
    def drafts_supported(self) -> bool:
        """Whether this bundle's decoder can verify drafts exactly (`Engine.drafts_supported`)."""
        return self.engine.drafts_supported

    @property
    def providers(self) -> list[str]:
        return self.sessions.decoder.get_providers()

    def close(self, *, cancel: bool = False) -> None:
        """Stop the online engine (`Engine.close`): no more submissions; returns once those taken are
        answered. Offline calls need no closing. (An engine left idle for `engine.IDLE_S` seconds
        lets its thread go anyway, so a Corrector dropped without closing is freed.)"""
        self.engine.close(cancel=cancel)

    def __enter__(self) -> "Corrector":
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(cancel=kind is not None)  # leaving on an error (Ctrl-C) does not wait for the queue

    def correct(self, source: str, candidates: Sequence[str], **options: Any) -> str:
        """Correct one request; options as for `correct_batch`, whose checks the request goes through
        (a bad one raises its `InputError`)."""
        [result] = self.correct_batch([(source, candidates)], **options)
        if isinstance(result, InputError):  # errors="return": raised as errors="raise" would
            raise InputError(f"item 0: {result}")
        return result.text

    def correct_batch(
        self,
        items: Iterable[Request | dict | tuple],
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int | None = None,
        drafts: bool = True,
        gate: Classifier | None = None,
        gate_threshold: float | None = None,
        fallback_below: float | None = None,
        fallback_span: int | None = None,
        batch_size: int = 16,
        errors: Literal["raise", "return"] = "raise",
        progress: Callable[[int], None] | None = None,
        options: CorrectionOptions | None = None,
    ) -> list[Correction | InputError]:
        """Correct many requests, in order.

        Items are `Request`s, dicts with `source`, `candidates` (and `id`), or (source, candidates)
        pairs. The decoding, gate and fallback options are those of `CorrectionOptions`, given as
        keywords or as `options=` (not both). All requests are admitted at once, longest first, and
        decode with at most `batch_size` rows running; between decoder calls, finished rows leave and
        waiting requests take their places (`Engine`).
        `drafts` verifies drafts copied from the request's input in greedy search (output identical,
        fewer decoder calls); it applies to bundles whose decoder supports it (`drafts_supported`) and
        never to beam search.
        `gate`, a `Classifier` with a "right" label (the shipped one:
        `Classifier.load(shipped_bundle("gate"))`), reads each request's first candidate (the LLM's
        greedy output) with the source and how many other candidates agree (`gate_input`); where it gives
        "right" a probability of at least `gate_threshold`, that candidate is returned as it is
        (`gated=True`) and the corrector does not run for it.
        An output whose sentence chrF to its nearest candidate is below `fallback_below` lost its place
        while copying and is replaced by the best guess among the source and the candidates; and where
        the candidates agree on edits to the source that the output lacks, their vote is returned if
        they support it more (`fallback=True` for either; see `runtime.fallback`); the text returned
        keeps only its edits to the source of at most `fallback_span` words that fix a writer's error
        (`runtime.vote.minimal_edits`). A request longer than the model reads has its candidates cut
        (`truncated=True`); its drafts and its fallback compare only what the model read, and a fallback
        chooses among the candidates whole.
        With `errors="return"`, a bad request yields its `InputError` in its place and every other
        request is still corrected; `progress` is called with the number of requests finished each time
        some are.
        Every option is checked before any request is read (`InputError` naming it): `max_new_tokens`
        is at most the bundle's `max_output_tokens`, `num_beams` at most `options.MAX_BEAMS` (16),
        `batch_size` at most `options.MAX_BATCH_SIZE` (1024), `length_penalty` within +-10.
        """
        options = _merged(options, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                          length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, drafts=drafts,
                          gate_threshold=gate_threshold, fallback_below=fallback_below, fallback_span=fallback_span)
        return self.engine.correct(items, options, gate=gate, batch_size=batch_size, errors=errors, progress=progress)

    def generate(
        self,
        input_ids: Iterable[Sequence[int]],
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int | None = None,
        drafts: bool = True,
        batch_size: int = 16,
        options: CorrectionOptions | None = None,
    ) -> list[Correction]:
        """Decode inputs that are already token ids (template rendered, special tokens included),
        exactly as given; options as for `correct_batch` (no gate, no fallback)."""
        options = _merged(options, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                          length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, drafts=drafts)
        return self.engine.generate(input_ids, options, batch_size=batch_size)


def _unchanged(value: Any, default: Any) -> bool:
    """Whether a keyword equals its default (1 or NumPy's 1.0 as 1.0); an array, or a value whose
    comparison raises or gives no truth value (a tensor, pandas' NA), is no default."""
    if isinstance(value, np.ndarray):
        return False
    try:
        return bool(value == default)
    except Exception:
        return False


def _merged(options: CorrectionOptions | None, **keywords: Any) -> CorrectionOptions:
    """`options=`, or the options given as keywords; giving both is ambiguous, unless the keywords
    are left at their defaults."""
    if options is None:
        return CorrectionOptions(**keywords)
    check_optional("options", options, CorrectionOptions, "a CorrectionOptions")
    given = [name for name, value in keywords.items() if not _unchanged(value, getattr(DEFAULTS, name))]
    if given:
        raise InputError(f"{', '.join(given)}: give the options either as keywords or as options=, not both")
    return options
