"""encoder states -> output token ids: greedy (with drafts) and beam search over the exported decoder.

Two decoder graphs are driven through one interface (`start`, `step`, `accept`, `reorder`):

- `MergedDecoder`: optimum's merged decoder, one graph whose `use_cache_branch` input selects the
  first step or a cached step. The past stays in ONNX Runtime as OrtValues bound through
  IOBinding. Every row advances by the same number of tokens, and rows stay from start to end.
- `RaggedDecoder`: lmcor's step graph for T5-family decoders (`export/decoder.py`), which takes a
  length per row. Its self-attention cache lives in host arrays with spare room; each call
  writes the new tokens' keys/values at each row's length, and `accept` forgets a row's rejected
  draft tokens by not counting them. This is what lets a batch verify drafts of different lengths,
  and take new rows (`join`) and let finished ones go (`drop`) between calls.

Greedy search runs a `Batch` of `sequence.Sequence`s through named stages, one decoder call per
`decode_step`: `propose` (each row's draft, copied from its input by `drafts.Drafts`), `verify` (one
call on each row's last token and draft), `accept` (the longest drafted prefix the model itself
would have chosen, then the model's own next token) and `retire` (finished rows leave). Rows that
have just joined make their first call on their own (`prefill`). The output is token-identical to
plain greedy, whatever else is in the batch. Both searches reproduce Hugging Face `generate` token for token
(greedy, and beam search with length penalty and its early-stopping heuristic), including forced
BOS/EOS tokens and n-gram bans. Beam search runs without drafts, on one static batch.

The host work of each step runs in the compiled core where it is built (`core.native`): acceptance
with the logits processors fused into the argmax (only the positions a row's acceptance reaches are
scanned), and the ragged decoder's per-row cache writes. The Python beside each is its reference.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from . import core
from .bundle import DecoderShape, Manifest, SpecialTokens
from .drafts import Drafter
from .errors import InputError
from .sequence import Sequence, repeat_ban
from .sessions import Sessions, run, run_bound

log = logging.getLogger("lmcor")

_NEG = np.float32(-1.0e9)  # Hugging Face's "never pick this" score, kept for identical arithmetic


class MergedDecoder:
    """One decoding job over optimum's merged decoder, with its KV cache on the device."""

    ragged = False

    def __init__(self, session: ort.InferenceSession, shape: DecoderShape, device: str):
        self.session = session
        self.shape = shape
        self.device = device
        self.calls = 0
        layers = range(shape.num_layers)
        self._self_past = [f"past_key_values.{i}.decoder.{kv}" for i in layers for kv in ("key", "value")]
        self._cross_past = [f"past_key_values.{i}.encoder.{kv}" for i in layers for kv in ("key", "value")]
        self._outputs = [o.name for o in session.get_outputs()]
        self._io = session.io_binding()
        self._logits: tuple[tuple[int, ...], ort.OrtValue, np.ndarray | None] | None = None
        self._self_kv: dict[str, ort.OrtValue] = {}
        self._keep_alive: list[np.ndarray] = []

    def start(self, hidden: ort.OrtValue, mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """First step: the encoder states in, the logits of `ids` (batch, n) out. (Logits are a
        buffer the next call of the same shape writes over: read them before it, or copy them.)"""
        io = self._io
        io.bind_ortvalue_input("encoder_hidden_states", hidden)
        io.bind_cpu_input("encoder_attention_mask", mask)
        empty = np.zeros((ids.shape[0], self.shape.num_heads, 0, self.shape.head_dim), dtype=np.float32)
        for name in self._self_past + self._cross_past:
            io.bind_cpu_input(name, empty)
        io.bind_cpu_input("use_cache_branch", np.array([False]))
        self._keep_alive = [mask, empty]
        logits, presents = self._run(ids)
        for name in self._cross_past:
            io.bind_ortvalue_input(name, presents[name.replace("past_key_values", "present")])
        self._keep_alive.append(np.array([True]))
        io.bind_cpu_input("use_cache_branch", self._keep_alive[-1])
        self._bind_self(presents)
        return logits

    def step(self, ids: np.ndarray) -> np.ndarray:
        """A cached step on `ids` (batch, n): n >= 1 new tokens per row, logits (batch, n, vocab)."""
        logits, presents = self._run(ids)
        self._bind_self(presents)
        return logits

    def reorder(self, rows: np.ndarray) -> None:
        """Keep self-attention caches of `rows` (beam search). Cross-attention caches are equal for
        all beams of an item and beams never move between items, so those stay as they are."""
        for name, value in self._self_kv.items():
            moved = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[rows]), self.device, 0)
            self._self_kv[name] = moved
            self._io.bind_ortvalue_input(name, moved)

    def _bind_self(self, presents: dict[str, ort.OrtValue]) -> None:
        for name in self._self_past:
            value = presents[name.replace("past_key_values", "present")]
            self._self_kv[name] = value
            self._io.bind_ortvalue_input(name, value)

    def _logits_buffer(self, shape: tuple[int, ...]) -> tuple[ort.OrtValue, np.ndarray | None]:
        if self._logits is None or self._logits[0] != shape:
            if self.device == "cpu":
                host = np.empty(shape, dtype=np.float32)
                self._logits = (shape, ort.OrtValue.ortvalue_from_numpy(host), host)
            else:
                self._logits = (shape, ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0), None)
        return self._logits[1], self._logits[2]

    def _run(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, ort.OrtValue]]:
        io = self._io
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        io.bind_cpu_input("input_ids", ids)
        buffer, host = self._logits_buffer((*ids.shape, self.shape.vocab_size))
        # Outputs are re-bound every call so that ONNX Runtime never writes into a cache tensor we
        # still hold as the next call's input.
        io.clear_binding_outputs()
        io.bind_ortvalue_output("logits", buffer)
        for name in self._outputs[1:]:
            io.bind_output(name, self.device)
        run_bound(self.session, io)
        self.calls += 1
        outputs = io.get_outputs()
        presents = dict(zip(self._outputs[1:], outputs[1:]))
        return (host if host is not None else buffer.numpy()), presents


class RaggedDecoder:
    """lmcor's ragged step graph over a batch whose rows come and go; the caches are host memory.

    Each row has a slot in buffers with room for more rows: its cross-attention keys/values and
    encoder mask (padded to the longest source of the batch, the padding masked), and its
    self-attention cache (padded to the longest output, slots past its length masked). Rows join
    after the last one and leave by moving the last row into their slot, so that both cost a copy
    of the rows that move, not of the batch. Masked slots hold zeros or a former row's finite
    values, which the graph's masks give exactly zero weight.
    """

    ragged = True
    _ROOM = 32  # cache slots are added in blocks, so the cache is re-allocated rarely

    def __init__(self, step: ort.InferenceSession, cross: ort.InferenceSession, shape: DecoderShape):
        self.session, self.cross_session, self.shape = step, cross, shape
        self.calls = 0
        inputs = [i.name for i in step.get_inputs()]
        self._own = [n for n in inputs if n.startswith("past.")]
        self._cross = [n for n in inputs if n.startswith("cross.")]
        self.rows = 0
        self.lengths = np.zeros(0, dtype=np.int64)  # per row: its cached tokens
        self._mask = np.zeros((0, 0), dtype=np.int64)  # (slots, source)
        self._keys_values: list[np.ndarray] = []  # cross-attention, (slots, heads, source, head_dim)
        self._cache: list[np.ndarray] = []  # self-attention, (slots, heads, room, head_dim)
        self._last = 0

    @property
    def width(self) -> int:
        """The source length every row's cross-attention spans (the batch's longest)."""
        return self._mask.shape[1]

    def use(self, sessions: Sessions) -> None:
        """Run the next calls on `sessions`: the same graphs with another thread count (the rows'
        buffers are the decoder's own, not the session's)."""
        self.session, self.cross_session = sessions.decoder, sessions.cross

    def cross_states(self, hidden: ort.OrtValue) -> list[np.ndarray]:
        """Every layer's cross-attention keys and values of encoder states."""
        return run(self.cross_session, self._cross, {"encoder_hidden_states": hidden.numpy()})

    def join(self, cross: list[np.ndarray], mask: np.ndarray) -> None:
        """Add rows after the running ones: their cross-attention keys/values and encoder mask, and
        an empty cache each."""
        n, (added, source) = self.rows, mask.shape
        if not n:  # the rows' own arrays become the buffers: an empty batch keeps no former rows' padding
            self._mask, self._keys_values = mask.copy(), list(cross)
            self._cache = [self._zeros((added, self.shape.num_heads, 0, self.shape.head_dim)) for _ in self._own]
            self.lengths = np.zeros(added, dtype=np.int64)
            self.rows = added
            return
        if n + added > self._mask.shape[0] or source > self._mask.shape[1]:
            slots = self._mask.shape[0]  # kept where only the source width grows
            slots = max(n + added, 2 * slots) if n + added > slots else slots
            width = max(source, self._mask.shape[1])
            self._mask = _regrown(self._mask[:n], (slots, width))
            self._keys_values = [_regrown(kv[:n], (slots, kv.shape[1], width, kv.shape[3])) for kv in self._keys_values]
            self._cache = [_regrown(cache[:n], (slots, *cache.shape[1:])) for cache in self._cache]
        rows = slice(n, n + added)
        self._mask[rows] = 0
        self._mask[rows, :source] = mask
        for buffer, kv in zip(self._keys_values, cross):  # past `source`: masked, zeros or a former row's
            buffer[rows, :, :source] = kv
        self.lengths = np.concatenate([self.lengths[:n], np.zeros(added, dtype=np.int64)])
        self.rows = n + added

    def drop(self, finished: list[int]) -> list[int]:
        """Let the `finished` rows (ascending) go; returns the rows that remain, in their new order
        (each finished row's slot is taken by the last remaining row)."""
        order = list(range(self.rows))
        buffers = [self._mask, *self._keys_values, *self._cache, self.lengths]
        for row in reversed(finished):  # the rows after `row` are all remaining ones by now
            last = len(order) - 1
            if row != last:
                for buffer in buffers:
                    buffer[row] = buffer[last]
                order[row] = order[last]
            order.pop()
        self.rows = n = len(order)
        self.lengths = self.lengths[:n]
        # Every row attends over the whole source width: once the longest sources have left and a
        # quarter of it is padding for every row, it shrinks to what the remaining rows need.
        width = int(np.flatnonzero(self._mask[:n].any(axis=0))[-1]) + 1 if n else 0
        if n and width <= 3 * self._mask.shape[1] // 4:
            slots = self._mask.shape[0]
            self._mask = _regrown(self._mask[:n, :width], (slots, width))
            self._keys_values = [_regrown(kv[:n, :, :width], (slots, kv.shape[1], width, kv.shape[3]))
                                 for kv in self._keys_values]
        return order

    def start(self, hidden: ort.OrtValue, mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """First step of a fresh batch: the encoder states in, the logits of `ids` (batch, n) out."""
        self.join(self.cross_states(hidden), mask)
        return self.step(ids)

    def step(self, ids: np.ndarray, first: int = 0) -> np.ndarray:
        """Append `ids` (rows, n) after the cached tokens of rows `first`, `first + 1`... (all rows, or
        the last ones); logits (rows, n, vocab)."""
        n, new = ids.shape
        rows = slice(first, first + n)
        lengths = self.lengths[rows]
        room = self._cache[0].shape[2]
        needed = -(-(int(lengths.max()) + new) // self._ROOM) * self._ROOM
        # Grown for the longest row, and shrunk once it has left: every row attends over the whole room.
        if needed > room or (n == self.rows and needed + self._ROOM < room):
            self._cache = [_regrown(cache[: self.rows, :, :needed], (*cache.shape[:2], needed, cache.shape[3]))
                           for cache in self._cache]
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64), "lengths": lengths,
                "encoder_attention_mask": self._mask[rows]}
        for name, value in zip(self._cross, self._keys_values):
            feed[name] = value[rows]
        for name, cache in zip(self._own, self._cache):
            # Rows that have cached nothing yet (they just joined) attend over no cache at all.
            feed[name] = cache[rows] if lengths.any() else cache[rows, :, :0]
        logits, presents = self._run(feed, (n, self.shape.num_heads, new, self.shape.head_dim))
        self.calls += 1
        self._write(presents, lengths, first)  # each row's new tokens go after its own cached ones
        self.lengths[rows] += new
        self._last = new
        return logits

    def accept(self, counts: np.ndarray, first: int = 0) -> None:
        """Keep the first `counts[r]` of the last step's tokens of its row r (counted from `first`);
        the rest are forgotten."""
        self.lengths[first : first + len(counts)] += counts - self._last

    # Where the caches live: host arrays here, device tensors in `resident.ResidentDecoder`.

    def _zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    def _run(self, feed: dict, present_shape: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The step graph on `feed`: logits, and the new tokens' keys/values of each layer."""
        logits, *presents = run(self.session, None, feed)
        return logits, presents

    def _write(self, presents: list[np.ndarray], lengths: np.ndarray, first: int) -> None:
        if core.native is not None:
            core.native.write_rows(self._cache, presents, lengths, first)
        else:
            _write_rows(self._cache, presents, lengths, first)

    def reorder(self, rows: np.ndarray) -> None:
        """Keep self-attention caches of `rows` (beam search: beams stay within their item, whose
        cross-attention keys/values and mask they share)."""
        self._cache = [cache[: self.rows][rows] for cache in self._cache]
        self.lengths = self.lengths[rows]


def _write_rows(caches: list[np.ndarray], presents: list[np.ndarray], lengths: np.ndarray, first: int) -> None:
    """Each row's new keys/values after its `lengths` cached tokens (rows counted from `first`); the
    reference of `core.native.write_rows`. Slices per row: much cheaper than one fancy-indexed write
    at the batch sizes decoding uses."""
    new = presents[0].shape[2] if presents else 0
    for row, start in enumerate(lengths.tolist(), start=first):
        for cache, present in zip(caches, presents):
            cache[row, :, start : start + new] = present[row - first]


def _regrown(values, shape: tuple[int, ...]):
    """Zeros of `shape` with `values` (an array or a device tensor) in their leading corner."""
    out = np.zeros(shape, dtype=values.dtype) if isinstance(values, np.ndarray) else values.new_zeros(shape)
    out[tuple(slice(0, d) for d in values.shape)] = values
    return out


Decoder = MergedDecoder | RaggedDecoder


def open_decoder(sessions: Sessions, manifest: Manifest) -> Decoder:
    """A fresh decoding job over the bundle's decoder graph. The ragged decoder keeps its caches on
    the device on CUDA (`resident.ResidentDecoder`) and in host arrays on the CPU, where that layout
    measured faster; `LMCOR_CACHES=host` or `device` chooses either anywhere."""
    if manifest.decoder_graph != "ragged":
        return MergedDecoder(sessions.decoder, manifest.decoder, sessions.device)
    if cache_layout(sessions.device) == "device":
        from .resident import ResidentDecoder

        return ResidentDecoder(sessions.decoder, sessions.cross, manifest.decoder, sessions.device)
    return RaggedDecoder(sessions.decoder, sessions.cross, manifest.decoder)


def cache_layout(device: str) -> str:
    """Where the ragged decoder's caches live: `LMCOR_CACHES` (host or device), else the device's own
    memory on CUDA (where PyTorch with CUDA is installed: it allocates them) and host arrays on the CPU."""
    global _warned_no_torch
    chosen = os.environ.get("LMCOR_CACHES", "").strip().lower()
    if chosen in ("host", "device"):
        return chosen
    if chosen:
        raise InputError(f"LMCOR_CACHES must be host or device, got {chosen!r}")
    if device != "cuda":
        return "host"
    try:
        import torch

        usable = torch.cuda.is_available()
    except ImportError:
        usable = False
    if not usable:
        if not _warned_no_torch:
            _warned_no_torch = True
            log.warning("the decoder's caches go through host memory at every step on CUDA: keeping them on the "
                        "device needs PyTorch built with CUDA (pip install 'lmcor[kernels]')")
        return "host"
    return "device"


_warned_no_torch = False


@dataclass(frozen=True)
class Search:
    """Decoding options shared by greedy and beam search."""

    max_new_tokens: int
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    drafts: bool = False
    no_repeat_ngram_size: int = 0


def _constrain(scores: np.ndarray, special: SpecialTokens, cur_len, least: int | np.ndarray,
               most: int | np.ndarray) -> np.ndarray:
    """`generate`'s logits processors: no EOS before `least` (min_new_tokens) new tokens, forced BOS
    after the start token, forced EOS at position `most` (max_new_tokens). `cur_len` counts the start
    token: one number, or one per score vector (`scores.shape[:-1]`) where rows or draft positions are
    at different lengths; `least` and `most` are numbers, or one per row (a column) where rows differ."""
    cur_len = np.asarray(cur_len)
    lo, hi = int(cur_len.min()), int(cur_len.max())
    least_top = least if isinstance(least, int) else int(least.max())
    most_lo, most_hi = (most, most) if isinstance(most, int) else (int(most.min()), int(most.max()))
    # Most steps constrain nothing; this check costs a few microseconds instead of the masks' tens.
    if (lo - 1 >= least_top and (special.forced_bos is None or lo > 1)
            and (special.forced_eos is None or most_hi < lo or most_lo > hi)):
        return scores
    cur_len = np.broadcast_to(cur_len, scores.shape[:-1])
    no_eos = cur_len - 1 < least
    forced = np.full(scores.shape[:-1], -1, dtype=np.int64)
    if special.forced_bos is not None:
        forced = np.where(cur_len == 1, special.forced_bos, forced)
    if special.forced_eos is not None:
        forced = np.where(cur_len == most, special.forced_eos, forced)
    hit = forced >= 0
    if not no_eos.any() and not hit.any():
        return scores
    scores = scores.copy()
    scores[..., special.eos] = np.where(no_eos, -np.inf, scores[..., special.eos])
    if hit.any():
        scores[hit] = -np.inf
        scores[hit, forced[hit]] = 0.0
    return scores


class Batch:
    """The sequences one decoder runs in greedy search, in its row order.

    A ragged decoder takes sequences between calls (`join`) and lets each go once it is done
    (`retire`); the merged decoder runs the sequences it started with until all are done, feeding
    the finished ones padding.
    """

    def __init__(self, decoder: Decoder, special: SpecialTokens):
        self.decoder = decoder
        self.special = special
        self.rows: list[Sequence] = []
        self._start: tuple[ort.OrtValue, np.ndarray] | None = None  # the merged decoder's, until its first call
        self.banning = False  # whether any row bans repeated n-grams
        self.least: int | np.ndarray = 0  # min_new_tokens: one number, or a column of one per row
        self.most: int | np.ndarray = 0  # max_new_tokens, alike
        self.fed: np.ndarray | None = None  # the last call's token ids (rows, 1 + longest draft)
        self._scratch = np.zeros((4, 0), dtype=np.int64)  # per row: min_new_tokens, max_new_tokens; the core's outputs

    def join(self, rows: list[Sequence], hidden: ort.OrtValue, mask: np.ndarray) -> None:
        """Add `rows`, whose encoder states and mask are `hidden` and `mask`."""
        if self.decoder.ragged:
            self.decoder.join(self.decoder.cross_states(hidden), mask)
        elif self.rows or self.decoder.calls:
            raise ValueError("the merged decoder takes its rows once, before its first call")
        else:
            self._start = (hidden, mask)
        self.rows += rows
        self._limits()

    def _limits(self) -> None:
        rows = self.rows
        self.banning = any(s.ban is not None for s in rows)
        self.least = _per_row([s.search.min_new_tokens for s in rows])
        self.most = _per_row([s.search.max_new_tokens for s in rows])
        self._scratch = np.zeros((4, len(rows)), dtype=np.int64)
        self._scratch[0] = [s.search.min_new_tokens for s in rows]
        self._scratch[1] = [s.search.max_new_tokens for s in rows]


def _per_row(values: list[int]) -> int | np.ndarray:
    """One number where all rows agree (the common case, and the cheap one), else a column."""
    if not values or values.count(values[0]) == len(values):
        return values[0] if values else 0
    return np.array(values, dtype=np.int64)[:, None]


def propose(rows: list[Sequence]) -> None:
    """Each drafting row's draft: up to what its max_new_tokens leaves after the model's next token."""
    for s in rows:
        if s.drafts is not None:
            s.draft = s.drafts.propose(s.tokens, s.search.max_new_tokens - len(s.tokens) - 1)


def verify(batch: Batch, first: int = 0) -> np.ndarray:
    """One decoder call on the last token and draft of rows `first`... (padded to the longest draft);
    logits (rows, 1 + longest draft, vocab). Finished rows of the merged decoder are fed padding."""
    rows = batch.rows[first:]
    ids = np.full((len(rows), 1 + max(len(s.draft) for s in rows)), batch.special.pad, dtype=np.int64)
    for i, s in enumerate(rows):
        if not s.done:
            ids[i, 0] = s.last
            if s.draft:
                ids[i, 1 : 1 + len(s.draft)] = s.draft
    batch.fed = ids
    if batch._start is not None:
        hidden, mask = batch._start
        batch._start = None
        return batch.decoder.start(hidden, mask, ids)
    return batch.decoder.step(ids, first) if first else batch.decoder.step(ids)


def accept(batch: Batch, logits: np.ndarray, first: int = 0) -> None:
    """Rows `first`... take the longest drafted prefix equal to the model's own choices, then the
    model's next token, its logits processors applied (n-gram bans, min length, forced BOS/EOS).
    `logits` are the call's own (`verify`'s), and may be changed in place."""
    rows, eos = batch.rows[first:], batch.special.eos
    chosen = None if core.native is None else _choose_native(core.native, batch, logits, first)
    if chosen is None:
        chosen = _choose_reference(batch, logits, first)
    kept = np.zeros(len(rows), dtype=np.int64)  # fed tokens whose keys/values stay cached
    now = time.perf_counter()
    for i, (s, k, token) in enumerate(zip(rows, *chosen)):
        if s.done:
            continue
        # The model's choice after each accepted draft token is that token; after the last
        # accepted one it is the model's own next token.
        s.take([*s.draft[:k], token], len(s.draft), k, eos, now)
        kept[i] = k + 1
    if batch.decoder.ragged:
        batch.decoder.accept(kept, first)


def _choose_native(native, batch: Batch, logits: np.ndarray, first: int) -> tuple[list[int], list[int]] | None:
    """`_choose_reference`, by the compiled core: the processors fused with the argmax, which scans only
    the positions a row's acceptance reaches. None where it cannot run (a row's n-gram ban is the
    reference's: the sequence started while the core was off)."""
    rows, special, ids = batch.rows[first:], batch.special, batch.fed
    if ids is None or ids.shape != logits.shape[:2]:
        return None
    n = len(rows)
    per_row = batch._scratch
    per_row[2:, first:] = 0
    accepted, token = per_row[2, first:], per_row[3, first:]
    drafted = np.fromiter((len(s.draft) for s in rows), dtype=np.int64, count=n)
    written = np.fromiter((len(s.tokens) for s in rows), dtype=np.int64, count=n)
    done = np.fromiter((s.done for s in rows), dtype=bool, count=n)
    none = -1
    if not native.accept(np.ascontiguousarray(logits, dtype=np.float32), ids, drafted, written, per_row[0, first:],
                         per_row[1, first:], done, [s.ban for s in rows], special.eos,
                         none if special.forced_bos is None else special.forced_bos,
                         none if special.forced_eos is None else special.forced_eos, accepted, token):
        return None
    return accepted.tolist(), token.tolist()


def _choose_reference(batch: Batch, logits: np.ndarray, first: int) -> tuple[list[int], list[int]]:
    """Per row from `first`: how many of its draft tokens equal the model's own choices, and the model's
    next token after them (done rows: 0 and -1). The reference of the core's `accept`."""
    rows, special = batch.rows[first:], batch.special
    written = np.array([len(s.tokens) for s in rows])
    cur_len = written[:, None] + np.arange(1, logits.shape[1] + 1)
    if batch.banning:  # before the other processors, as in `generate`
        for i, s in enumerate(rows):
            if s.ban is not None and not s.done:
                for k in range(len(s.draft) + 1):
                    logits[i, k, s.ban.banned(s.draft[:k])] = -np.inf
    least, most = batch.least, batch.most
    if first:
        least, most = (x if isinstance(x, int) else x[first:] for x in (least, most))
    choice = _constrain(logits, special, cur_len, least, most).argmax(axis=-1).tolist()
    accepted, token = [0] * len(rows), [-1] * len(rows)
    for i, s in enumerate(rows):
        if s.done:
            continue
        draft, chosen = s.draft, choice[i]
        k = 0
        while k < len(draft) and chosen[k] == draft[k]:
            k += 1
        accepted[i], token[i] = k, chosen[k]
    return accepted, token


def retire(batch: Batch) -> list[Sequence]:
    """The rows that are done, out of the batch (the merged decoder's only once all of them are)."""
    rows = batch.rows
    if batch.decoder.ragged:
        finished = [i for i, s in enumerate(rows) if s.done]
        if not finished:
            return []
        out = [rows[i] for i in finished]
        batch.rows = [rows[i] for i in batch.decoder.drop(finished)]
    elif all(s.done for s in rows):
        out, batch.rows = rows, []
    else:
        return []
    now = time.perf_counter()
    for s in out:
        s.finished = now
    batch._limits()
    return out


def prefill(batch: Batch, count: int) -> list[Sequence]:
    """The first decoder call of the `count` rows that joined last (a ragged decoder's), on their own:
    first drafts are long (they copy whole candidates), and rows further along would pay for their
    width. Returns the sequences it finished."""
    first = len(batch.rows) - count
    propose(batch.rows[first:])
    accept(batch, verify(batch, first), first)
    return retire(batch)


def decode_step(batch: Batch) -> list[Sequence]:
    """One decoder call for every row: propose, verify, accept, retire. Returns the sequences it
    finished."""
    propose(batch.rows)
    accept(batch, verify(batch))
    return retire(batch)


def greedy(decoder: Decoder, hidden: ort.OrtValue, mask: np.ndarray, special: SpecialTokens, search: Search,
           drafter: Drafter | None = None) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Greedy search over one batch from start to end, verifying `drafter`'s drafts when given (a
    ragged decoder is needed). Returns the tokens of each row (EOS cut off) and, per row, the drafted
    and accepted tokens."""
    if drafter is not None and not decoder.ragged:
        raise ValueError("drafted decoding needs a ragged decoder graph")
    rows = [Sequence(search, special.decoder_start, drafts=None if drafter is None else drafter.rows[r])
            for r in range(mask.shape[0])]
    batch = Batch(decoder, special)
    batch.join(rows, hidden, mask)
    while batch.rows:
        decode_step(batch)
    drafted = np.array([s.drafted for s in rows], dtype=np.int64)
    accepted = np.array([s.accepted for s in rows], dtype=np.int64)
    return [s.output(special.eos) for s in rows], drafted, accepted


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values along the last axis, largest first."""
    part = np.argpartition(-x, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(x, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def _gather(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    while index.ndim < x.ndim:
        index = index[..., None]
    return np.take_along_axis(x, index, axis=1)


def beam_search(
    decoder: Decoder, hidden: ort.OrtValue, mask: np.ndarray, special: SpecialTokens, search: Search,
    stop: Callable[[], bool] | None = None,
) -> list[list[int]]:
    """Hugging Face's vectorized beam search; `hidden` and `mask` hold num_beams rows per item. It ends
    early, with what it has, once `stop()` says so (checked between decoder calls)."""
    beams = search.num_beams
    batch = mask.shape[0] // beams
    max_length = 1 + search.max_new_tokens
    keep = 2 * beams  # one EOS id: max(2, 1 + n_eos) * num_beams candidates per step
    fill = special.pad
    running_seq = np.full((batch, beams, max_length), fill, dtype=np.int64)
    running_seq[:, :, 0] = special.decoder_start
    sequences = running_seq.copy()
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = _NEG
    beam_scores = np.full((batch, beams), _NEG, dtype=np.float32)
    finished = np.zeros((batch, beams), dtype=bool)
    improvable = np.ones((batch, 1), dtype=bool)
    top_beam = np.arange(keep) < beams
    offsets = np.arange(batch)[:, None] * beams
    cur_len = 1
    logits = decoder.start(hidden, mask, running_seq[:, :, :1].reshape(-1, 1))
    while True:
        vocab = logits.shape[-1]
        log_probs = _log_softmax(logits[:, -1, :])
        if search.no_repeat_ngram_size:
            for row, seq in enumerate(running_seq.reshape(batch * beams, max_length)[:, :cur_len].tolist()):
                ban = repeat_ban(search.no_repeat_ngram_size, seq[0])
                ban.extend(seq[1:])
                log_probs[row, ban.banned()] = -np.inf
        log_probs = _constrain(log_probs, special, cur_len, search.min_new_tokens, search.max_new_tokens)
        log_probs = (log_probs.reshape(batch, beams, vocab) + running_scores[:, :, None]).reshape(batch, -1)
        top = _topk(log_probs, keep)
        top_scores = np.take_along_axis(log_probs, top, axis=1)
        source_beam, token = top // vocab, top % vocab
        top_seq = _gather(running_seq, source_beam)
        top_seq[:, :, cur_len] = token
        hits = (token == special.eos) | (cur_len + 1 >= max_length)

        live_scores = top_scores + hits.astype(np.float32) * _NEG
        nxt = _topk(live_scores, beams)
        running_seq = _gather(top_seq, nxt)
        running_scores = _gather(live_scores, nxt)
        rows = (_gather(source_beam, nxt) + offsets).reshape(-1)

        just_done = hits & top_beam[None, :]
        # cur_len tokens after the start token, counting the one just chosen
        done_scores = top_scores / np.float32(cur_len**search.length_penalty)
        done_scores = done_scores + (~improvable).astype(np.float32) * _NEG
        done_scores = done_scores + (~just_done).astype(np.float32) * _NEG
        merged = _topk(np.concatenate([beam_scores, done_scores], axis=1), beams)
        sequences = _gather(np.concatenate([sequences, top_seq], axis=1), merged)
        beam_scores = _gather(np.concatenate([beam_scores, done_scores], axis=1), merged)
        finished = _gather(np.concatenate([finished, just_done], axis=1), merged)

        cur_len += 1
        # generate's early_stopping=False (lmcor's only): the best a running beam can still reach is its
        # score at the current length
        best_possible = running_scores[:, :1] / np.float32((cur_len - 1)**search.length_penalty)
        worst_done = np.where(finished, beam_scores.min(axis=1, keepdims=True), _NEG)
        improvable = improvable & (best_possible > worst_done).any(axis=-1, keepdims=True)
        if not (improvable.any() and not hits.all()):
            break
        if stop is not None and stop():  # its callers gave up: the best beam so far
            sequences = running_seq[:, :, :cur_len]
            break
        decoder.reorder(rows)
        logits = decoder.step(running_seq[:, :, cur_len - 1].reshape(-1, 1))
    best = [sequences[b, 0, 1:].tolist() for b in range(batch)]
    return [row[: row.index(special.eos)] if special.eos in row else row for row in best]
