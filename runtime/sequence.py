"""`Sequence`: one request on its way through the engine, holding its own state from stage to stage.

It carries what it decodes from (token ids, drafts, n-gram bans), how (its `Search`), what it has
written, when each stage reached it, and its own counts; the decoder batch it runs in keeps only
the row order and each row's cache (see `decode.Batch`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import core
from .drafts import Drafts
from .request import Correction, Request, RequestStats
from .tokens import ModelInput

if TYPE_CHECKING:
    from .decode import Search


def repeat_ban(size: int, start: int, *, compiled: bool | None = None) -> RepeatBan:
    """A `RepeatBan`: the compiled core's (`compiled` True), the reference (False), or whichever runs
    now (None). The core's has the same `size`, `seq`, `banned` and `extend`, and `decode.accept`
    reads it without Python."""
    native = core.native if compiled is None else core.built() if compiled else None
    return RepeatBan(size, start) if native is None else native.RepeatBan(size, start)


class RepeatBan:
    """`no_repeat_ngram_size`: the tokens that would repeat an n-gram of one sequence (transformers'
    NoRepeatNGramLogitsProcessor; the sequence starts with the decoder start token). The n-grams
    written so far are kept in a table, so that checking a draft position costs a lookup. The
    reference of the compiled core's `RepeatBan` (see `repeat_ban`)."""

    def __init__(self, size: int, start: int):
        self.size = size
        self.seq: list[int] = [start]
        self._next: dict[tuple[int, ...], list[int]] = {}
        if size == 1:  # the start token is a 1-gram of the sequence too (longer n-grams reach it as they come)
            self._next[()] = [start]

    def banned(self, extra: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Banned next tokens after the sequence followed by `extra` (not yet written)."""
        n = self.size
        seq = self.seq + list(extra) if extra else self.seq
        if len(seq) + 1 < n:
            return []
        tail = tuple(seq[len(seq) - n + 1 :])
        out = list(self._next.get(tail, ()))
        for i in range(max(0, len(self.seq) - n + 1), len(seq) - n + 1):  # n-grams that reach into `extra`
            if tuple(seq[i : i + n - 1]) == tail:
                out.append(seq[i + n - 1])
        return out

    def extend(self, tokens: Iterable[int]) -> None:
        n = self.size
        for token in tokens:
            self.seq.append(token)
            if len(self.seq) >= n:
                self._next.setdefault(tuple(self.seq[len(self.seq) - n : -1]), []).append(token)


class Sequence:
    """One request's decoding: its options, state and counts, and where its result goes.

    `index` is its place in an offline call's results, `future` an online caller's, `listener` (if any)
    is called with each decoder call's new tokens (EOS left out) as they are written; `request` is None
    for inputs given as token ids; `below` is its fallback threshold and `span` the largest edit the
    fallback keeps (`fallback.guard`; 0: none).
    Times are `time.perf_counter()` readings.
    """

    __slots__ = ("search", "below", "span", "input", "request", "index", "future", "listener", "drafts", "ban", "tokens", "last",
                 "draft", "done", "cut", "drafted", "accepted", "calls", "queued", "admitted", "encoded",
                 "first_token", "finished")

    def __init__(self, search: Search, start: int, *, model_input: ModelInput | None = None,
                 request: Request | None = None, index: int = 0, future: Future | None = None,
                 listener: Callable[[list[int]], None] | None = None, drafts: Drafts | None = None,
                 below: float = 0.0, span: int = 0, queued: float | None = None):
        self.search = search
        self.below, self.span = below, span
        self.input = model_input
        self.request = request
        self.index = index
        self.future = future
        self.listener = listener
        self.drafts = drafts
        self.ban = repeat_ban(search.no_repeat_ngram_size, start) if search.no_repeat_ngram_size else None
        self.tokens: list[int] = []  # written so far, EOS included once reached
        self.last = start  # the token the next decoder call feeds first
        self.draft: list[int] = []  # this step's draft, fed after `last`
        self.done = False
        self.cut = False  # ended early by its caller's cancel (`withdrawn`), not at its own end
        self.drafted = self.accepted = self.calls = 0
        self.queued = time.perf_counter() if queued is None else queued
        self.admitted = self.encoded = self.first_token = self.finished = 0.0

    def claim(self) -> bool:
        """Whether to decode it: False once its caller has cancelled its future."""
        return self.future is None or self.future.set_running_or_notify_cancel()

    @property
    def withdrawn(self) -> bool:
        """Whether its caller cancelled it while it was decoding (`engine.Submitted.cancel`)."""
        return getattr(self.future, "withdrawn", False)

    def take(self, choice: list[int], drafted: int, accepted: int, eos: int, now: float) -> None:
        """Write the tokens one decoder call chose for it (`accepted` of its `drafted` draft tokens, then
        the model's own next token), up to EOS or max_new_tokens. This is where its new tokens are known."""
        limit = self.search.max_new_tokens
        new = choice[: limit - len(self.tokens)]
        if eos in new:
            new = new[: new.index(eos) + 1]
            self.done = True
        if not self.tokens:
            self.first_token = now
        self.tokens += new
        if self.ban is not None:
            self.ban.extend(new)
        self.last = new[-1]
        self.drafted += drafted
        self.accepted += accepted
        self.calls += 1
        if self.drafts is not None:
            self.drafts.update(drafted, accepted)
        if len(self.tokens) >= limit:
            self.done = True
        if self.listener is not None:
            written = new[:-1] if self.done and new and new[-1] == eos else new
            if written:
                try:
                    self.listener(written)
                except Exception:  # a listener gone wrong (its client left) stops listening, not the batch
                    self.listener = None
                except BaseException:  # SystemExit, KeyboardInterrupt: in the engine's own thread the same;
                    if threading.current_thread() is threading.main_thread():  # in the caller's, its own to raise
                        raise
                    self.listener = None

    def output(self, eos: int) -> list[int]:
        """Its tokens, EOS cut off (only ever the last one)."""
        tokens = self.tokens
        return tokens[:-1] if tokens and tokens[-1] == eos else tokens

    def correction(self, text: str, token_ids: list[int]) -> Correction:
        """Its result: `text` decoded from `token_ids` (its output, EOS cut off), with its own stats."""
        model_input = self.input
        queued, finished = self.queued, self.finished
        stats = RequestStats(
            input_tokens=0 if model_input is None else len(model_input.ids),
            output_tokens=len(token_ids),
            decoder_calls=self.calls,
            drafted_tokens=self.drafted,
            accepted_tokens=self.accepted,
            queued_s=self.admitted - queued,
            encoder_s=self.encoded - self.admitted,
            decoder_s=finished - self.encoded,
            first_token_s=(self.first_token or finished) - queued,
            latency_s=finished - queued,
        )
        ident: Any = None if self.request is None else self.request.id
        truncated = model_input is not None and model_input.truncated
        return Correction(text=text, token_ids=token_ids, truncated=truncated, id=ident, stats=stats,
                          withdrawn=self.cut)
