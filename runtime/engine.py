"""`Engine`: a corrector's models serving many requests at once, offline or online.

Every request takes the same stages: parsed (`request.as_request`), gated (a classifier may find
its first candidate right, which is then its answer), tokenized (`tokens.encode_requests`), decoded
by a `scheduler.Scheduler` (encode, propose, verify, accept, retire: rows join and leave the
decoder's batch between calls), turned into text, and guarded (`fallback.guard`). Offline calls
(`correct`, `generate`) admit all their requests at once, longest first, and run the scheduler in
the calling thread. Online requests (`submit`) go to background threads, a worker for each batch
decoded side by side, which run while requests wait or run and answer each through its future. A
request's new tokens become known in `Sequence.take`, one decoder call at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from .bundle import Manifest
from .classifier import Classifier, check_gate_labels, passing_threshold, right_probabilities
from .decode import Search
from .drafts import Drafts
from .encode import PackedEncoder
from .errors import BundleError, InputError, LmcorError
from .fallback import guard
from .options import (ERRORS, MAX_BATCH_SIZE, MAX_BATCHES, check_choice, check_int, check_items, check_max_new_tokens,
                      check_optional, check_progress, shown)
from .request import Correction, CorrectionOptions, Request, as_request
from .scheduler import EngineStats, Scheduler, Tally
from .sequence import Sequence
from .sessions import Sessions
from .spacing import cleaned_up, folds_white_space, with_source_spacing
from .tokens import ModelInput, encode_requests, unreadable

log = logging.getLogger("lmcor")

DEFAULTS = CorrectionOptions()


@dataclass(frozen=True)
class _Submission:
    item: Any
    options: CorrectionOptions
    gate: Classifier | None
    future: Future
    queued: float
    listener: Callable[[list[int]], None] | None = None


class Submitted(Future):
    """An engine request's future. Cancelling it before it is admitted skips it; cancelling it while it
    decodes withdraws it: a greedy row leaves the batch before the next decoder call (a beam search's
    static batch once all of its requests are withdrawn), and the future then holds what it had written
    (`cancel()` returns False, as for any running future): a `Correction` with `withdrawn` set."""

    withdrawn = False
    notified = False  # cancelled, and `wait` and `as_completed` told so

    def cancel(self) -> bool:
        if self.done():  # answered: nothing to withdraw
            return False
        self.withdrawn = True
        return super().cancel()

    def set_running_or_notify_cancel(self) -> bool:
        running = super().set_running_or_notify_cancel()
        self.notified = not running
        return running


class Engine:
    """A corrector bundle's sessions and the schedulers that drive them.

    `batch_size` bounds the rows decoding at once for online requests, in all of the engine's
    `batches` (offline calls give their own). Each batch is decoded by its own worker thread; while
    more than one has work, each runs on `narrow` (the same graphs with fewer threads, so that
    together they keep the cores busy: one worker's Python runs while another's models do), and
    on `sessions` while it works alone; without `narrow` (a GPU's), every batch runs on `sessions`.
    `Corrector.load(batches=)` opens both.
    """

    def __init__(self, sessions: Sessions, manifest: Manifest, tokenizer: Tokenizer,
                 packed: PackedEncoder | None = None, *, batch_size: int = 16, batches: int = 1,
                 narrow: Sessions | None = None):
        self.sessions, self.manifest, self.tokenizer, self.packed = sessions, manifest, tokenizer, packed
        self.batch_size = check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        self.batches = check_int("batches", batches, 1, MAX_BATCHES)
        self.narrow = narrow
        self._tally = Tally()
        self._cond = threading.Condition()
        self._inbox: list[_Submission] = []
        self._threads: list[threading.Thread] = []  # the running workers
        self._load: dict[threading.Thread, int] = {}  # per worker: the sequences it holds
        self._crowded = -CROWDED_S  # when more than one worker last had work
        self._closed = self._cancel = False
        self.failure: BaseException | None = None  # what stopped the background thread, if anything did
        self._respaced = folds_white_space(tokenizer)  # the model's own outputs get the source's line breaks

    @property
    def drafts_supported(self) -> bool:
        """Whether this bundle's decoder can verify drafts exactly: lmcor's ragged T5-family decoder,
        and for int8, activations quantized per row (bundles exported since format 3)."""
        return self.manifest.decoder_graph == "ragged" and not self.manifest.int8_per_tensor

    @property
    def stats(self) -> EngineStats:
        """What this engine has done so far, offline and online."""
        return self._tally.read()

    def search(self, options: CorrectionOptions) -> Search:
        """The decoding `options` ask for, checked against this bundle (`search_for`)."""
        return search_for(self.manifest, options, drafts_supported=self.drafts_supported)

    # Offline: all requests admitted at once, the scheduler run in the calling thread.

    def correct(self, items: Iterable[Request | dict | tuple], options: CorrectionOptions | None = None, *,
                gate: Classifier | None = None, batch_size: int = 16, errors: Literal["raise", "return"] = "raise",
                progress: Callable[[int], None] | None = None) -> list[Correction | InputError]:
        """`Corrector.correct_batch`: see there."""
        queued = time.perf_counter()  # every request's times run from the call, as an online one's from its submission
        options = _options(options)
        search = self.search(options)
        check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        _check_gate(gate, options)
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
            for n, request in valid:
                if (refused := self._unreadable(request)) is not None:
                    if errors == "raise":
                        raise InputError(f"item {n}: {refused}")
                    results[n] = refused
            valid = [(n, request) for n, request in valid if results[n] is None]
            passed = _gate(gate, options.gate_threshold, [r for _, r in valid])
            now = time.perf_counter()
            for (n, request), answer in zip(valid, passed):
                results[n] = None if answer is None else _waited(answer, now - queued)
            if progress is not None and any(passed):
                progress(sum(answer is not None for answer in passed))
            valid = [(n, request) for (n, request), answer in zip(valid, passed) if answer is None]
        inputs = self._inputs([r for _, r in valid], drafts=search.drafts)
        sequences = []
        for (n, request), model_input in zip(valid, inputs):
            if isinstance(model_input, InputError):
                if errors == "raise":
                    raise InputError(f"item {n}: {model_input}")
                results[n] = model_input
            else:
                sequences.append(self._sequence(search, model_input, options, request=request, index=n, queued=queued))
        failed = sum(isinstance(r, InputError) for r in results)
        if progress is not None and failed:  # answered too, by their errors: a bar reaches its end
            progress(failed)
        for finished in self._run(sequences, batch_size):
            for s, correction in zip(finished, self._finish(finished)):
                results[s.index] = correction
            if progress is not None:
                progress(len(finished))
        return results  # type: ignore[return-value]

    def generate(self, input_ids: Iterable[Iterable[int]], options: CorrectionOptions | None = None, *,
                 batch_size: int = 16) -> list[Correction]:
        """`Corrector.generate`: see there."""
        options = _options(options)
        unread = [name for name in ("gate_threshold", "fallback_below", "fallback_span") if getattr(options, name) is not None]
        if unread:
            raise InputError(f"{', '.join(unread)}: generate runs no gate and no fallback (correct_batch does); "
                             "leave them unset")
        search = self.search(options)
        check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        rows = check_items("input_ids", input_ids, "token id sequences")
        sequences = [self._sequence(search, ModelInput(self._token_ids(n, ids), False), None, index=n)
                     for n, ids in enumerate(rows)]
        results: list[Correction | None] = [None] * len(sequences)
        for finished in self._run(sequences, batch_size):
            for s, correction in zip(finished, self._finish(finished)):
                results[s.index] = correction
        return results  # type: ignore[return-value]

    def _run(self, sequences: list[Sequence], batch_size: int) -> Iterator[list[Sequence]]:
        """Decode `sequences`, longest input first, `batch_size` rows at most at once; yields them as
        they finish."""
        scheduler = Scheduler(self.sessions, self.manifest, self.packed, batch_size, self._tally, patient=True)
        scheduler.add(sorted(sequences, key=lambda s: -len(s.input.ids)))
        while scheduler.busy:
            finished = scheduler.step()
            if finished:
                yield finished

    # Online: one background thread answers submissions through futures.

    def _check_open(self) -> None:
        """Refuse a submission to an engine closed, or stopped on an internal error (with `_cond` held)."""
        if self.failure is not None:
            raise LmcorError(f"this engine stopped on an internal error and takes no more requests: "
                             f"{type(self.failure).__name__}: {self.failure}")
        if self._closed:
            raise InputError("this engine is closed (Engine.close): it takes no more requests")

    def submit(self, request: Request | dict | tuple, options: CorrectionOptions | None = None, *,
               gate: Classifier | None = None,
               on_tokens: Callable[[list[int]], None] | None = None) -> Future[Correction]:
        """Correct one request in the engine's background threads (its workers), which the first
        submission starts. Thread-safe. Requests join a running batch between decoder calls (at most
        `batch_size` rows in all of its batches),
        so a short one never waits for a long one to finish (in greedy search: a beam search at the head
        of the queue runs as a static batch once the batch drains, and those behind it wait with it);
        beside a row that needs many calls, at most every few calls (`scheduler.HOLD_CALLS`).

        The future holds the `Correction`, or the `InputError` of a bad request or options, as
        `correct_batch` would raise it; where the models fail on a batch, the error of each request in
        it (but those it had finished in that step, which are answered). Cancelling the future before
        its request is admitted skips the request; while it decodes, withdraws it (`Submitted`): it
        leaves the batch at the next step, holding what it wrote. A
        submission to a closed engine raises `InputError` in the calling thread (one that stopped on
        an internal error: `LmcorError`), and gets no future.

        `on_tokens`, if given, is called in a worker's thread with each decoder call's new token ids
        (greedy decoding; EOS left out) as they are written; it must be quick and must not raise. The
        future's done-callbacks run in that thread too: keep them quick.
        The result's text may still differ from those tokens: the fallback can replace it.
        """
        future: Future[Correction] = Submitted()
        queued = time.perf_counter()
        with self._cond:  # refused before its options are read: a closed engine gives no future
            self._check_open()
        try:
            options = _options(options)
            _check_gate(gate, options)
            if on_tokens is not None and not callable(on_tokens):
                raise InputError("on_tokens must be callable (it receives each step's new token ids)")
        except (InputError, BundleError) as e:
            future.set_exception(e)
            return future
        with self._cond:
            self._check_open()  # again: it may have closed meanwhile
            self._inbox.append(_Submission(request, options, gate, future, queued, on_tokens))
            while len(self._threads) < self.batches:  # the first submission, or after workers went idle
                # Registered first: a thread that a signal interrupting start() leaves running is not the
                # engine's, and leaves at once (`_serve`) instead of serving beside the next one.
                thread = threading.Thread(target=self._serve, name="lmcor-engine", daemon=True)
                self._threads.append(thread)
                try:
                    thread.start()
                except BaseException:  # no thread (out of memory, a signal): nothing of this call stays behind
                    self._inbox.pop()  # (the workers started wait for this lock: none has taken it)
                    self._threads.remove(thread)
                    raise
            self._cond.notify()
        return future

    def close(self, *, cancel: bool = False) -> None:
        """Take no more submissions, and return once every one taken is answered: corrected, or with
        `cancel`, cancelled unless it is already decoding."""
        with self._cond:
            self._closed = True
            self._cancel = self._cancel or cancel
            threads = list(self._threads)
            self._cond.notify_all()
        if threading.current_thread() in threads:  # from a callback in a worker: it cannot wait for itself,
            return  # nor for another worker, which may be waiting for it the same way
        for thread in threads:
            thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(cancel=kind is not None)  # leaving on an error (Ctrl-C) does not wait for the queue

    def _serve(self) -> None:
        """A worker's loop: runs while submissions wait or decode, sleeps otherwise."""
        me = threading.current_thread()
        with self._cond:
            if me not in self._threads:
                return  # started by a submission that a signal interrupted: it takes nothing
        scheduler: Scheduler | None = None
        try:
            scheduler = Scheduler(self.sessions, self.manifest, self.packed, self.batch_size, self._tally)
            while True:
                with self._cond:
                    self._load[me] = scheduler.load
                    while not ((self._inbox and self._room(scheduler.load)) or scheduler.busy or self._closed):
                        if not self._cond.wait(timeout=IDLE_S) and not self._inbox:
                            self._threads.remove(me)  # idle: the next submission starts another; till then
                            del self._load[me]  # nothing holds this engine (a Corrector dropped is freed)
                            return
                    cancel = self._cancel
                    taken = len(self._inbox) if cancel else self._room(scheduler.load) if scheduler.taking else 0
                    arrivals, self._inbox = self._inbox[:taken], self._inbox[taken:]
                    self._load[me] = scheduler.load + len(arrivals)
                    if self._inbox:
                        self._cond.notify()
                    now = time.perf_counter()
                    if sum(load > 0 for load in self._load.values()) > 1:
                        self._crowded = now
                    narrow = now - self._crowded < CROWDED_S
                if self.narrow is not None:
                    scheduler.use(self.narrow if narrow else self.sessions)
                if cancel:
                    for future in [*(s.future for s in scheduler.waiting), *(a.future for a in arrivals)]:
                        _withdraw(future)
                    scheduler.waiting.clear()
                    arrivals = []
                if not arrivals and not scheduler.busy:
                    # Closed, and every submission answered, or those left wait for room that only the
                    # other workers' batches can free.
                    return
                if arrivals:
                    try:
                        scheduler.add(self._prepare(arrivals))
                    except Exception as e:  # the tokenizer or a gate failed: these requests fail, not the engine
                        for submission in arrivals:
                            _settle(submission.future, error=e)
                try:
                    finished = scheduler.step()
                except Exception as e:  # the models failed on this batch: its requests fail, the waiting ones run
                    finished, failed = scheduler.abandon()  # those it had finished are answered
                    for s in failed:
                        _settle(s.future, error=e)
                try:
                    for s, correction in zip(finished, self._finish(finished)):
                        _settle(s.future, correction)
                except Exception as e:
                    for s in finished:
                        _settle(s.future, error=e)
        except BaseException as e:  # a bug of the loop itself: no future may wait forever
            with self._cond:
                self._closed = True
                self.failure = e
                arrivals, self._inbox = self._inbox, []
                self._load.pop(me, None)
                self._cond.notify_all()  # the other workers finish their batches and leave
            said = LmcorError(f"the engine stopped on an internal error: {type(e).__name__}: {e}")
            said.__cause__ = e
            held = [] if scheduler is None else [*scheduler.held(), *scheduler.waiting]  # (no new batch: it may fail)
            for s in held:
                _settle(s.future, error=said)
            for submission in arrivals:
                _settle(submission.future, error=said)
            log.error("the engine stopped on an internal error; it takes no more requests", exc_info=e)

    def _room(self, held: int) -> int:
        """Submissions a worker holding `held` sequences may take now (with `_cond` held): what the
        batches have room for, and at most its share of it, so that the workers split a queue; the
        rest wait for whichever worker is free first."""
        share = -(-self.batch_size // self.batches)
        return max(min(self.batch_size - sum(self._load.values()), share - held), 0)

    def _prepare(self, arrivals: list[_Submission]) -> list[Sequence]:
        """Submissions -> sequences to decode, in arrival order; a bad request or options, or a gate
        that passes the first candidate, answers its future here."""
        ready: list[tuple[_Submission, Request, Search]] = []
        for submission in arrivals:
            try:
                ready.append((submission, as_request(submission.item), self.search(submission.options)))
            except InputError as e:
                _settle(submission.future, error=e)
        gated: dict[tuple[Classifier, float | None], list[tuple[_Submission, Request, Search]]] = {}
        passed: set[int] = set()  # answered here: by their gate, or with its failure or their refusal
        for entry in ready:
            if entry[0].gate is None:
                continue
            if (refused := self._unreadable(entry[1])) is not None:
                _settle(entry[0].future, error=refused)
                passed.add(id(entry[0]))
            else:
                gated.setdefault((entry[0].gate, entry[0].options.gate_threshold), []).append(entry)
        for (gate, threshold), group in gated.items():
            try:
                answers = _gate(gate, threshold, [r for _, r, _ in group])
            except Exception as e:  # this gate failed: its own requests fail, not the others in the batch
                for submission, _, _ in group:
                    _settle(submission.future, error=e)
                    passed.add(id(submission))
                continue
            now = time.perf_counter()
            for (submission, _, _), answer in zip(group, answers):
                if answer is not None:
                    _settle(submission.future, _waited(answer, now - submission.queued))
                    passed.add(id(submission))
        ready = [entry for entry in ready if id(entry[0]) not in passed]
        sequences = []
        for drafts in (False, True):
            subset = [entry for entry in ready if entry[2].drafts == drafts]
            inputs = self._inputs([r for _, r, _ in subset], drafts=drafts)
            for (submission, request, search), model_input in zip(subset, inputs):
                if isinstance(model_input, InputError):
                    _settle(submission.future, error=model_input)
                else:
                    sequences.append(self._sequence(search, model_input, submission.options,
                                                    request=request, future=submission.future,
                                                    listener=submission.listener, queued=submission.queued))
        return sorted(sequences, key=lambda s: s.queued)

    # Stages shared by both modes.

    def _unreadable(self, request: Request) -> InputError | None:
        """Why the corrector could not read a request (`tokens.unreadable`): checked before a gate,
        which would answer it, so that whether a request is refused is not the gate's verdict."""
        return unreadable(self.tokenizer, request, self.manifest.max_input_tokens)

    def _inputs(self, requests: list[Request], *, drafts: bool) -> list[ModelInput | InputError]:
        """Requests -> model inputs (`tokens.encode_requests`), the time counted (`EngineStats.tokenize_s`)."""
        started = time.perf_counter()
        inputs = encode_requests(self.tokenizer, self.manifest.template, requests, self.manifest.max_input_tokens,
                                 references=drafts, vocab_size=self.manifest.decoder.vocab_size)
        self._tally.add(tokenize_s=time.perf_counter() - started)
        return inputs

    def _sequence(self, search: Search, model_input: ModelInput, options: CorrectionOptions | None,
                  **where: Any) -> Sequence:
        special = self.manifest.special_tokens
        drafts = Drafts(model_input.references or (model_input.ids,), special.eos) if search.drafts else None
        below, span = fallback_of(self.manifest, options) if options is not None else (0.0, 0)
        return Sequence(search, special.decoder_start, model_input=model_input, drafts=drafts, below=below, span=span,
                        **where)

    def _finish(self, finished: list[Sequence]) -> list[Correction]:
        """Retired sequences -> their corrections: text, own stats, and the fallback where it applies (the
        time counted: `EngineStats.finish_s`)."""
        if not finished:
            return []
        started = time.perf_counter()
        eos = self.manifest.special_tokens.eos
        tokens = [s.output(eos) for s in finished]
        out = []
        for s, row, text in zip(finished, tokens, self.tokenizer.decode_batch(tokens, skip_special_tokens=True)):
            correction = s.correction(cleaned_up(text) if self.manifest.clean_up_spaces else text, row)
            if s.below and s.request is not None and not correction.withdrawn:  # a partial text is not the model's
                correction = guard(correction, s.request.candidates, s.below, source=s.request.source,
                                   seen=s.input.candidates, span=s.span)
            # A candidate or the source returned keeps its own spacing; a tokenizer that writes line breaks,
            # its model's.
            if s.request is not None and (correction.fallback or self._respaced) and not (
                    correction.fallback and correction.text in (s.request.source, *s.request.candidates)):
                spaced = with_source_spacing(s.request.source, correction.text)
                if spaced != correction.text:
                    correction = dataclasses.replace(correction, text=spaced)
            out.append(correction)
        self._tally.add(finish_s=time.perf_counter() - started)
        return out

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


# Workers run on the narrow sessions for this long after more than one had work: a batch often
# empties for a moment under load, and its worker's next step on every thread would contend with the
# others'.
CROWDED_S = 0.1
# How long a worker waits for work before it ends (the next submission starts it again).
IDLE_S = 30.0


def search_for(manifest: Manifest, options: CorrectionOptions, *, drafts_supported: bool = False) -> Search:
    """The decoding `options` ask for, checked against a bundle's manifest (max_new_tokens at most its
    max_output_tokens; None options: its defaults; a fallback span needs a fallback); drafts where its
    decoder supports them."""
    limit = check_max_new_tokens(options.max_new_tokens, manifest.max_output_tokens)
    if options.fallback_span and not fallback_of(manifest, options)[0]:
        raise InputError("fallback_span must come with the fallback it is part of, which is off (its threshold 0, "
                         "or a bundle with no calibrated fallback): give a fallback threshold above 0 too")
    return Search(max_new_tokens=limit,
                  min_new_tokens=check_int("min_new_tokens", options.min_new_tokens, 0, limit,
                                           most_is=" (max_new_tokens)" if options.max_new_tokens is not None
                                           else " (the bundle's max_output_tokens)"),
                  num_beams=options.num_beams,
                  length_penalty=options.length_penalty,
                  no_repeat_ngram_size=(manifest.no_repeat_ngram_size if options.no_repeat_ngram_size is None
                                        else options.no_repeat_ngram_size),
                  drafts=options.drafts and options.num_beams == 1 and drafts_supported)


def fallback_of(manifest: Manifest, options: CorrectionOptions) -> tuple[float, int]:
    """The fallback threshold and largest kept edit: the options', else the bundle's calibrated ones,
    else none (0)."""
    below = manifest.fallback_below if options.fallback_below is None else options.fallback_below
    span = manifest.fallback_span if options.fallback_span is None else options.fallback_span
    return below or 0.0, span or 0


def _options(options: CorrectionOptions | None) -> CorrectionOptions:
    return DEFAULTS if options is None else check_optional("options", options, CorrectionOptions, "a CorrectionOptions")


def _check_gate(gate: Classifier | None, options: CorrectionOptions) -> None:
    check_optional("gate", gate, Classifier, "a Classifier")
    if gate is not None:
        check_gate_labels(gate.root, gate.labels)
    check_gate_threshold(gate is not None, options)


def check_gate_threshold(gated: bool, options: CorrectionOptions) -> None:
    """A gate threshold is read only behind a gate."""
    if not gated and options.gate_threshold is not None:
        raise InputError("gate_threshold needs a gate: without one nothing reads it")


def _gate(gate: Classifier, threshold: float | None, requests: list[Request]) -> list[Correction | None]:
    """The answer of each request whose first candidate the gate finds right (that candidate, as it
    is), else None; the requests the gate is not asked about (`classifier.right_probabilities`) too."""
    threshold = passing_threshold(gate, threshold)
    probabilities = right_probabilities(gate, [(r.source, r.candidates) for r in requests])
    return [Correction(text=r.candidates[0], token_ids=[], id=r.id, gated=True) if p is not None and p >= threshold
            else None for r, p in zip(requests, probabilities)]


def _withdraw(future: Submitted) -> None:
    """Cancel a future not yet admitted (`close(cancel=True)`), marked so that `wait` and `as_completed`
    count it done. Its done-callbacks run here: one that raises (even SystemExit) is logged, as in
    `_settle`, and the engine goes on."""
    try:
        future.cancel()
    except BaseException as e:  # Future logs a callback's Exception itself; the rest comes out here
        log.error("a done-callback of a correction's future raised %s; the engine goes on", type(e).__name__)
    if future.cancelled() and not future.notified:
        future.set_running_or_notify_cancel()


def _waited(answer: Correction, seconds: float) -> Correction:
    """A gate's answer with its time: as a decoded answer's, it runs from the request's submission."""
    return dataclasses.replace(answer, stats=dataclasses.replace(answer.stats, queued_s=seconds, latency_s=seconds))


def _settle(future: Submitted, result: Correction | None = None, error: BaseException | None = None) -> None:
    """Give a future its outcome, unless its caller has cancelled it. One answered before the scheduler
    took it (a bad request, the gate, a failure) is taken here: cancelled meanwhile, it is marked so
    that `wait` and `as_completed` count it done. Its done-callbacks run here, in the engine's thread:
    one that raises (even SystemExit) is logged, and the engine goes on."""
    if future.cancelled():  # marked once (a second time raises), so that wait() and as_completed() count it
        if not future.notified:
            future.set_running_or_notify_cancel()
        return
    if future.done():  # answered already (a batch that failed after some were)
        return
    try:
        if not (future.running() or future.set_running_or_notify_cancel()):  # cancelled just now
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # cancelled while it waited
    except BaseException as e:  # Future logs a callback's Exception itself; the rest comes out here
        log.error("a done-callback of a correction's future raised %s; the engine goes on", type(e).__name__)
