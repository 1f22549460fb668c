"""`Corrector`: a loaded corrector bundle and the one path every request takes through it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from .batching import pad_batch, plan_batches
from .classifier import Classifier, passing_threshold, right_probabilities
from .bundle import Manifest, load_manifest, shipped_bundle
from .decode import Search, beam_search, greedy, open_decoder
from .drafts import Drafter
from .encode import PackedEncoder, encode
from .errors import BundleError, InputError
from .fallback import guard
from .options import (ERRORS, MAX_BATCH_SIZE, MAX_BEAMS, MAX_LENGTH_PENALTY, check_choice, check_flag, check_int,
                      check_items, check_max_new_tokens, check_number, check_optional, check_progress, shown)
from .request import Correction, DecodeStats, Request, as_request
from .sessions import Sessions, check_graphs, open_session
from .tokens import ModelInput, encode_requests, load_tokenizer

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


class Corrector:
    """A seq2seq corrector: reads a source and K candidates, writes one corrected output."""

    def __init__(self, root: Path, manifest: Manifest, tokenizer: Tokenizer, sessions: Sessions,
                 packed: PackedEncoder | None = None):
        self.root = root
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.sessions = sessions
        self.packed = packed

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        verify: bool = True,
        encoder: Literal["auto", "onnx", "packed"] = "auto",
    ) -> "Corrector":
        """Load a bundle written by `lmcor export` (the shipped default corrector when `path` is None).

        `providers` are ONNX Runtime execution providers (default: CUDA when usable, else CPU);
        `threads` the intra-op threads (default: ONNX Runtime's, one per physical core);
        `verify` checks every file against the manifest's sha256.
        `encoder`: "auto" runs the Triton packed encoder when the bundle holds its weights, the
        decoder runs on CUDA and PyTorch with Triton are installed, else the ONNX encoder; "onnx"
        and "packed" choose (on CPU, "packed" needs Triton's interpreter, TRITON_INTERPRET=1).
        """
        root = Path(path) if path is not None else shipped_bundle("default")
        manifest = load_manifest(root, verify=verify, kind="corrector")
        tokenizer = load_tokenizer(root / manifest.files["tokenizer"], manifest.special_tokens)
        sessions = Sessions(
            encoder=open_session(root / manifest.files["encoder"], providers=providers, threads=threads),
            decoder=open_session(root / manifest.files["decoder"], providers=providers, threads=threads),
            cross=(open_session(root / manifest.files["cross"], providers=providers, threads=threads)
                   if "cross" in manifest.files else None),
        )
        check_graphs(root, manifest, {"decoder": sessions.decoder, "cross": sessions.cross})
        if manifest.int8_per_tensor:
            log.warning("%s: an int8 bundle of format %d quantizes activations per tensor, so its outputs depend on "
                        "the rest of their batch and drafted decoding is off; re-export it with this lmcor "
                        "(`lmcor export --precision int8`)", root, manifest.format_version)
        return cls(root, manifest, tokenizer, sessions, _packed_encoder(root, manifest, sessions.device, encoder))

    @property
    def drafts_supported(self) -> bool:
        """Whether this bundle's decoder can verify drafts exactly: lmcor's ragged T5-family decoder,
        and for int8, activations quantized per row (bundles exported since format 3)."""
        return self.manifest.decoder_graph == "ragged" and not self.manifest.int8_per_tensor

    @property
    def providers(self) -> list[str]:
        return self.sessions.decoder.get_providers()

    def correct(self, source: str, candidates: Sequence[str], **options: Any) -> str:
        """Correct one request; options as for `correct_batch`, whose checks the request goes through
        (a bad one raises its `InputError`)."""
        [result] = self.correct_batch([(source, candidates)], **options)
        if isinstance(result, InputError):  # errors="return"
            raise result
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
        batch_size: int = 16,
        errors: Literal["raise", "return"] = "raise",
        progress: Callable[[int], None] | None = None,
    ) -> list[Correction | InputError]:
        """Correct many requests, in order.

        Items are `Request`s, dicts with `source`, `candidates` (and `id`), or (source, candidates)
        pairs. Requests are grouped into length-bucketed batches of at most `batch_size`. Outputs
        have at most `max_new_tokens` tokens and no EOS before `min_new_tokens` (benchmarks use it to
        force a length).
        `num_beams` > 1 runs beam search with `length_penalty`. `no_repeat_ngram_size` > 0 bans
        repeating any n-gram of the output, as in transformers (None: the bundle's default, from the
        checkpoint's generation config; 0: off). `drafts` verifies drafts copied from
        the request's input in greedy search (output identical, fewer decoder calls); it applies to
        bundles whose decoder supports it (`drafts_supported`) and never to beam search.
        `gate`, a `Classifier` with a "right" label (the shipped one:
        `Classifier.load(shipped_bundle("gate"))`), reads each request's first candidate (the LLM's
        greedy output) with the source and how many other candidates agree (`gate_input`); where it gives
        "right" a probability of at least `gate_threshold` (None: the threshold calibrated into the
        gate's bundle, else 0.5), that candidate is returned as it is (`gated=True`) and the
        corrector does not run for it.
        An output whose sentence chrF to its nearest candidate is below `fallback_below` (0-100; None:
        the bundle's calibrated value, else never; 0: never) lost its place while copying and is
        replaced by that candidate (`fallback=True`, see `runtime.fallback`). A request longer than the
        model reads has its candidates cut (`truncated=True`); its drafts and its fallback compare only
        what the model read, and a fallback returns the candidate whole.
        With `errors="return"`, a bad
        request yields its `InputError` in its place and every other request is still corrected;
        `progress` is called with the number of requests finished by each batch.
        Every option is checked before any request is read (`InputError` naming it): `max_new_tokens`
        is at most the bundle's `max_output_tokens`, `num_beams` at most `options.MAX_BEAMS` (16),
        `batch_size` at most `options.MAX_BATCH_SIZE` (1024), `length_penalty` within +-10.
        """
        search = self._search(max_new_tokens, min_new_tokens, num_beams, length_penalty, no_repeat_ngram_size, drafts,
                              batch_size)
        below = self.manifest.fallback_below if fallback_below is None else check_number(
            "fallback_below", fallback_below, 0, 100, what="a chrF")
        check_optional("gate", gate, Classifier, "a Classifier")
        if gate_threshold is not None:
            gate_threshold = check_number("gate_threshold", gate_threshold, 0, 1, what="a probability")
        check_choice("errors", errors, ERRORS)
        check_progress(progress)
        items = check_items("items", items, "requests")
        results: list[Correction | InputError | None] = [None] * len(items)
        valid: list[tuple[int, Request]] = []
        for n, item in enumerate(items):
            try:
                valid.append((n, as_request(item)))
            except InputError as e:
                if errors == "raise":
                    raise InputError(f"item {n}: {e}") from None
                results[n] = e
        if gate is not None and valid:
            valid = self._gate(gate, gate_threshold, valid, results, progress)
        inputs = encode_requests(self.tokenizer, self.manifest.template, [r for _, r in valid],
                                 self.manifest.max_input_tokens, references=search.drafts)
        ready: list[tuple[int, Any, ModelInput]] = []
        for (n, request), model_input in zip(valid, inputs):
            if isinstance(model_input, InputError):
                if errors == "raise":
                    raise InputError(f"item {n}: {model_input}")
                results[n] = model_input
            else:
                ready.append((n, request.id, model_input))
        self._decode_all(ready, search, batch_size, results, progress)
        if below:
            requests = dict(valid)
            for n, _, model_input in ready:
                results[n] = guard(results[n], requests[n].candidates, below, seen=model_input.candidates)
        return results  # type: ignore[return-value]

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
    ) -> list[Correction]:
        """Decode inputs that are already token ids (template rendered, special tokens included),
        exactly as given; options as for `correct_batch`."""
        search = self._search(max_new_tokens, min_new_tokens, num_beams, length_penalty, no_repeat_ngram_size, drafts,
                              batch_size)
        rows = check_items("input_ids", input_ids, "token id sequences")
        ready = [(n, None, ModelInput(self._token_ids(n, ids), False)) for n, ids in enumerate(rows)]
        results: list[Correction | None] = [None] * len(ready)
        self._decode_all(ready, search, batch_size, results, None)
        return results  # type: ignore[return-value]

    def _token_ids(self, n: int, ids: Any) -> np.ndarray:
        """Row `n` of `generate`'s input_ids: 1 to max_input_tokens ids of the model's vocabulary."""
        try:
            row = np.asarray(ids)
        except (TypeError, ValueError):  # ragged nesting
            row = np.asarray(None)
        if row.ndim != 1 or (row.size and row.dtype.kind not in "iu"):
            raise InputError(f"item {n}: input_ids must hold sequences of token ids (integers), got {shown(ids)}")
        if not 0 < len(row) <= self.manifest.max_input_tokens:
            raise InputError(f"item {n}: {len(row)} input tokens; the model takes 1 to "
                             f"{self.manifest.max_input_tokens}")
        vocab = self.manifest.decoder.vocab_size
        outside = row[(row < 0) | (row >= vocab)]
        if outside.size:
            raise InputError(f"item {n}: token id {outside[0]} is outside the model's vocabulary (0 to {vocab - 1})")
        return row.astype(np.int64)

    @staticmethod
    def _gate(gate: Classifier, threshold: float | None, valid: list[tuple[int, Request]], results: list,
              progress: Callable[[int], None] | None) -> list[tuple[int, Request]]:
        """Answer the requests whose first candidate the gate finds right; return the others. A blank
        first candidate is not asked about: it answers nothing, and a classifier reads no empty text."""
        threshold = passing_threshold(gate, threshold)
        asked = [(n, r) for n, r in valid if r.candidates[0].strip()]
        answers = right_probabilities(gate, [(r.source, r.candidates) for _, r in asked])
        probabilities = {n: p for (n, _), p in zip(asked, answers)}
        rest = []
        for n, request in valid:
            if n in probabilities and probabilities[n] >= threshold:
                results[n] = Correction(text=request.candidates[0], token_ids=[], id=request.id, gated=True)
            else:
                rest.append((n, request))
        if progress is not None and len(rest) < len(valid):
            progress(len(valid) - len(rest))
        return rest

    def _decode_all(self, ready: list[tuple[int, Any, ModelInput]], search: Search, batch_size: int,
                    results: list, progress: Callable[[int], None] | None) -> None:
        for batch in plan_batches([len(x.ids) for _, _, x in ready], batch_size):
            chosen = [ready[i] for i in batch]
            for (n, _, _), correction in zip(chosen, self._run_batch(chosen, search)):
                results[n] = correction
            if progress is not None:
                progress(len(chosen))

    def _search(self, max_new_tokens: int | None, min_new_tokens: int, num_beams: int, length_penalty: float,
                no_repeat_ngram_size: int | None, drafts: bool, batch_size: int) -> Search:
        """The decoding options, checked (`batch_size` too, though a `Search` does not hold it)."""
        limit = check_max_new_tokens(max_new_tokens, self.manifest.max_output_tokens)
        beams = check_int("num_beams", num_beams, 1, MAX_BEAMS)
        check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        ngram = (self.manifest.no_repeat_ngram_size if no_repeat_ngram_size is None
                 else check_int("no_repeat_ngram_size", no_repeat_ngram_size, 0))
        return Search(max_new_tokens=limit,
                      min_new_tokens=check_int("min_new_tokens", min_new_tokens, 0, limit, most_is=" (max_new_tokens)"),
                      num_beams=beams,
                      length_penalty=check_number("length_penalty", length_penalty, -MAX_LENGTH_PENALTY,
                                                  MAX_LENGTH_PENALTY),
                      no_repeat_ngram_size=ngram,
                      drafts=check_flag("drafts", drafts) and beams == 1 and self.drafts_supported)

    def _run_batch(self, batch: list[tuple[int, Any, ModelInput]], search: Search) -> list[Correction]:
        special = self.manifest.special_tokens
        idents = [ident for _, ident, _ in batch]
        inputs = [model_input for _, _, model_input in batch]
        ids, mask = pad_batch([x.ids for x in inputs], special.pad)
        started = time.perf_counter()
        if self.packed is not None:
            hidden = self.packed(ids, mask, repeat=search.num_beams)
        else:
            hidden = encode(self.sessions, ids, mask, repeat=search.num_beams)
        encoded = time.perf_counter()
        decoder = open_decoder(self.sessions, self.manifest)
        drafted = accepted = np.zeros(len(batch), dtype=np.int64)
        if search.num_beams == 1:
            drafter = Drafter([x.references or (x.ids,) for x in inputs], special.eos) if search.drafts else None
            tokens, drafted, accepted = greedy(decoder, hidden, mask, special, search, drafter)
        else:
            tokens = beam_search(decoder, hidden, np.repeat(mask, search.num_beams, axis=0), special, search)
        decoded = time.perf_counter()
        texts = self.tokenizer.decode_batch(tokens, skip_special_tokens=True)
        return [
            Correction(
                text=text,
                token_ids=row,
                truncated=model_input.truncated,
                id=ident,
                stats=DecodeStats(
                    batch_size=len(batch),
                    input_tokens=len(model_input.ids),
                    output_tokens=len(row),
                    encoder_s=encoded - started,
                    decoder_s=decoded - encoded,
                    decoder_calls=decoder.calls,
                    drafted_tokens=int(drafted_row),
                    accepted_tokens=int(accepted_row),
                ),
            )
            for ident, model_input, row, text, drafted_row, accepted_row in zip(idents, inputs, tokens, texts, drafted,
                                                                                accepted)
        ]
