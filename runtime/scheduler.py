"""Waiting sequences -> the decoder batch: admission between decoder calls, and the engine's counts.

A `Scheduler` holds the sequences waiting for the decoder and the batch running them. Before each
decoder call, waiting sequences join the batch while it has room for them (at most `batch_size`
rows), their encoder pass batched in groups of similar input length; after it, finished rows
leave. A short request never waits for a long one to finish. Where rows cannot join mid-flight
(the merged decoder, beam search), a group runs as a static batch to its end before the next.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .batching import MAX_PADDING, pick_group
from .bundle import Manifest
from .decode import Batch, beam_search, decode_step, open_decoder, prefill, retire
from .encode import PackedEncoder, encode_batch
from .sequence import Sequence
from .sessions import Sessions

# Online, every admission stalls the running rows for the newcomers' encoder pass and prefill, so a row
# that needs many decoder calls would wait through one admission per call: once a row has run
# LONG_ROW_CALLS calls without finishing, arrivals join at most every HOLD_CALLS calls (each a few ms)
# until it leaves. On the default corrector at 16 closed-loop clients this took p99 latency from ~3.6x to
# ~2x p50 at the same throughput (docs/serving.md).
LONG_ROW_CALLS = 3
HOLD_CALLS = 8


@dataclass(frozen=True)
class EngineStats:
    """How an engine used its models, summed over its batches (each counted once). Subtract two
    readings to get what happened between them."""

    requests: int = 0  # sequences retired: decoded to their end, or withdrawn by their callers
    output_tokens: int = 0  # their tokens, EOS not counted
    encoder_calls: int = 0  # encoder passes (a ragged group's sub-batches each count)
    encoder_s: float = 0.0  # encoder passes, cross-attention keys/values included
    decoder_calls: int = 0
    decoder_s: float = 0.0  # decode steps, the Python around each call included
    rows: int = 0  # rows advanced, summed over decoder calls: rows / decoder_calls is the mean batch
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    tokenize_s: float = 0.0  # requests -> model inputs: the template, the tokenizer, truncation, draft spans
    finish_s: float = 0.0  # tokens -> corrections: detokenizing, the fallback

    def __sub__(self, other: EngineStats) -> EngineStats:
        return EngineStats(*(getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self)))


class Tally:
    """`EngineStats` being counted, by the threads that run schedulers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dataclasses.asdict(EngineStats())

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                self._counts[name] += value

    def read(self) -> EngineStats:
        with self._lock:
            return EngineStats(**self._counts)


class Scheduler:
    """The sequences waiting for one decoder, in the order they are to be admitted, and its batch."""

    def __init__(self, sessions: Sessions, manifest: Manifest, packed: PackedEncoder | None, batch_size: int,
                 tally: Tally, *, patient: bool = False):
        self.sessions, self.manifest, self.packed = sessions, manifest, packed
        self.batch_size = batch_size
        self.patient = patient
        self.tally = tally
        self.waiting: deque[Sequence] = deque()
        self.continuous = manifest.decoder_graph == "ragged"  # rows join and leave between calls
        self.batch = Batch(open_decoder(sessions, manifest), manifest.special_tokens)
        self._admitting: list[Sequence] = []  # out of the queue, not yet in the batch
        self._finished: list[Sequence] = []  # out of the batch, not yet returned
        self._since_admission = HOLD_CALLS  # decoder calls (prefills aside) since a group last joined

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.batch.rows)

    @property
    def load(self) -> int:
        """The sequences this scheduler holds: decoding, and waiting to."""
        return len(self.waiting) + len(self.batch.rows)

    @property
    def taking(self) -> bool:
        """Whether sequences added now can join at the next step: not while a merged decoder's static
        batch runs (they would wait for its end here while another `Engine` worker may be free)."""
        return self.continuous or not self.batch.rows

    def use(self, sessions: Sessions) -> None:
        """Run the next steps on `sessions`: the same graphs with another thread count (`Engine`'s
        batches). A ragged batch's rows go on with them; a merged decoder's running batch keeps the
        sessions its bound buffers belong to (an empty one opens anew), and so does a beam search."""
        if sessions is self.sessions:
            return
        self.sessions = sessions
        if self.continuous:
            self.batch.decoder.use(sessions)
        elif not self.batch.rows:
            self.batch = Batch(open_decoder(sessions, self.manifest), self.manifest.special_tokens)

    def add(self, sequences: Iterable[Sequence]) -> None:
        self.waiting.extend(sequences)

    def step(self) -> list[Sequence]:
        """Admit what the batch can take, then one decoder call for every row (a static batch of beam
        search: its whole search). Returns the sequences finished, their `finished` time set."""
        batch = self.batch
        if any(s.withdrawn and not s.done for s in batch.rows):  # their callers stopped waiting
            for s in batch.rows:  # a ragged batch lets them go; the merged decoder feeds them padding
                if s.withdrawn and not s.done:
                    s.done = s.cut = True
            self._retire(retire(batch))
        if not batch.rows:
            if not self.waiting:
                finished, self._finished = self._finished, []  # the withdrawn ones
                return finished
            if self.waiting[0].search.num_beams > 1:
                return self._beams()
            if not self.continuous and batch.decoder.calls:  # the merged decoder serves one batch
                batch = self.batch = Batch(open_decoder(self.sessions, self.manifest), self.manifest.special_tokens)
        if self.continuous or not batch.rows:
            self._admit(batch)
        if batch.rows:
            live = len(batch.rows) if self.continuous else sum(not s.done for s in batch.rows)
            started = time.perf_counter()
            done = decode_step(batch)
            self._since_admission += 1
            self.tally.add(decoder_calls=1, decoder_s=time.perf_counter() - started, rows=live)
            self._retire(done)
        finished, self._finished = self._finished, []
        return finished

    def held(self) -> list[Sequence]:
        """Every sequence the current step holds: running, being admitted, or finished but not yet
        returned."""
        return [*self._finished, *self.batch.rows, *(s for s in self._admitting if s not in self.batch.rows)]

    def abandon(self) -> tuple[list[Sequence], list[Sequence]]:
        """After a failure of the models: the sequences the current step had finished (their tokens
        whole) and the others it holds (`held`), both out of the scheduler, with a new batch to run the
        waiting ones, which stay."""
        batch = Batch(open_decoder(self.sessions, self.manifest), self.manifest.special_tokens)  # first: should it
        finished = self._finished  # fail, the step's sequences are still held
        failed = [s for s in self.held() if s not in finished]
        self._finished, self._admitting, self.batch = [], [], batch
        return finished, failed

    def _admit(self, batch: Batch) -> None:
        """Encode and join groups of waiting greedy sequences while the batch has room; a beam search
        at the head of the queue lets the batch drain first. A drafting group's first decoder call is
        its own (`prefill`).

        A `patient` scheduler (offline calls: throughput) lets a group join a running batch once half
        of the batch is free (fewer, larger encoder passes and prefills) and only where its inputs are
        within `MAX_PADDING` of the batch's longest source, which every row's cross-attention spans
        (the queue is longest first: later rows wait for the longest to leave). An impatient one
        (online requests: latency) lets every request join as soon as there is room, except while a row
        has run `LONG_ROW_CALLS` calls: then at most every `HOLD_CALLS` calls.
        """
        if (not self.patient and batch.rows and self._since_admission < HOLD_CALLS
                and any(s.calls >= LONG_ROW_CALLS for s in batch.rows)):
            return
        while self.waiting and self.waiting[0].search.num_beams == 1:
            room = self.batch_size - len(batch.rows)
            if room <= 0 or (self.patient and batch.rows and (
                    room < min(self.batch_size // 2, len(self.waiting))
                    or len(self.waiting[0].input.ids) < (1 - MAX_PADDING) * batch.decoder.width)):
                break
            group = self._admitting = [s for s in self._take(room) if s.claim()]
            if group:
                self._since_admission = 0
                started = time.perf_counter()
                hidden, mask, passes = encode_batch(self.sessions, self.packed, [s.input.ids for s in group],
                                                    self.manifest.special_tokens.pad)
                batch.join(group, hidden, mask)
                self._encoded(group, started, passes)
                if self.continuous and any(s.drafts is not None for s in group):
                    started = time.perf_counter()
                    done = prefill(batch, len(group))
                    self.tally.add(decoder_calls=1, decoder_s=time.perf_counter() - started, rows=len(group))
                    self._retire(done)
            self._admitting = []
            if not self.continuous:
                break

    def _take(self, limit: int) -> list[Sequence]:
        """The oldest waiting sequence and, in their order, up to `limit` in all of those after it that
        search alike (greedy ones share a batch whatever their options; beam searches need the same
        options; the first that does not ends the run) and keep the encoder batch's padding bounded.
        Online, one of another length waits for a group of its own without holding back those behind
        it; offline, the queue is longest first, and the first that does not fit ends the group."""
        kind = _kind(self.waiting[0])
        alike = itertools.takewhile(lambda s: _kind(s) == kind, self.waiting)
        picked = pick_group((len(s.input.ids) for s in alike), limit, passing=not self.patient)
        if picked[-1] == len(picked) - 1:  # the head of the queue: taken from it
            return [self.waiting.popleft() for _ in picked]
        chosen = [self.waiting[n] for n in picked]
        taken = set(picked)
        self.waiting = deque(s for n, s in enumerate(self.waiting) if n not in taken)
        return chosen

    def _beams(self) -> list[Sequence]:
        """A static batch of beam search, from its encoder pass to its end."""
        group = self._admitting = [s for s in self._take(self.batch_size) if s.claim()]
        if not group:  # all cancelled while they waited; the rows withdrawn from the batch are still to answer
            finished, self._finished = self._finished, []
            return finished
        search = group[0].search
        started = time.perf_counter()
        hidden, mask, passes = encode_batch(self.sessions, self.packed, [s.input.ids for s in group],
                                            self.manifest.special_tokens.pad, repeat=search.num_beams)
        self._encoded(group, started, passes)
        decoder = open_decoder(self.sessions, self.manifest)
        cut = False  # the search stopped for its callers (one cancelled alone runs to its end)

        def stop() -> bool:
            nonlocal cut
            cut = all(s.withdrawn for s in group)
            return cut

        tokens = beam_search(decoder, hidden, np.repeat(mask, search.num_beams, axis=0), self.manifest.special_tokens,
                             search, stop=stop)
        ended = time.perf_counter()
        for s, row in zip(group, tokens):
            s.tokens, s.calls, s.cut = row, decoder.calls, cut
            s.first_token = s.finished = ended
        self.tally.add(decoder_calls=decoder.calls, decoder_s=ended - group[0].encoded, rows=decoder.calls * len(group))
        self._admitting = []
        self._retire(group)
        finished, self._finished = self._finished, []
        return finished

    def _encoded(self, group: list[Sequence], started: float, passes: int) -> None:
        encoded = time.perf_counter()
        for s in group:
            s.admitted, s.encoded = started, encoded
        self.tally.add(encoder_calls=passes, encoder_s=encoded - started)

    def _retire(self, finished: list[Sequence]) -> None:
        """Count finished sequences, and keep them until the step returns them."""
        self._finished += finished
        if finished:
            eos = self.manifest.special_tokens.eos
            self.tally.add(requests=len(finished), output_tokens=sum(len(s.output(eos)) for s in finished),
                           drafted_tokens=sum(s.drafted for s in finished),
                           accepted_tokens=sum(s.accepted for s in finished))


def _kind(s: Sequence) -> object:
    """What a sequence's batch must share with it: nothing in greedy search, the options in beam search."""
    return s.search if s.search.num_beams > 1 else None
