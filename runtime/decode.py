"""encoder states -> output token ids: greedy (with drafts) and beam search over the exported decoder.

Two decoder graphs are driven through one interface (`start`, `step`, `accept`, `reorder`):

- `MergedDecoder`: optimum's merged decoder, one graph whose `use_cache_branch` input selects the
  first step or a cached step. The past stays in ONNX Runtime as OrtValues bound through
  IOBinding. Every row advances by the same number of tokens.
- `RaggedDecoder`: lmcor's step graph for T5-family decoders (`export/decoder.py`), which takes a
  length per row. Its self-attention cache lives in host arrays with spare room; each call
  writes the new tokens' keys/values at each row's length, and `accept` forgets a row's rejected
  draft tokens by not counting them. This is what lets a batch verify drafts of different lengths.

Greedy decoding verifies drafts (`drafts.Drafter`) when the decoder is ragged: it feeds each row's
last token plus its draft, keeps the longest drafted prefix the model itself would have chosen,
and appends the model's next token, so the output is token-identical to plain greedy. Both
searches reproduce Hugging Face `generate` token for token (greedy, and beam search with length
penalty and its early-stopping heuristic), including forced BOS/EOS tokens. Beam search runs
without drafts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .bundle import DecoderShape, Manifest, SpecialTokens
from .drafts import Drafter
from .sessions import Sessions

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
        """First step: the encoder states in, the logits of `ids` (batch, n) out."""
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
        self.session.run_with_iobinding(io)
        self.calls += 1
        outputs = io.get_outputs()
        presents = dict(zip(self._outputs[1:], outputs[1:]))
        return (host if host is not None else buffer.numpy()), presents


class RaggedDecoder:
    """One decoding job over lmcor's ragged step graph; the self-attention cache is host memory."""

    ragged = True
    _ROOM = 32  # cache slots are added in blocks, so the cache is re-allocated rarely

    def __init__(self, step: ort.InferenceSession, cross: ort.InferenceSession, shape: DecoderShape):
        self.session, self.cross_session, self.shape = step, cross, shape
        self.calls = 0
        inputs = [i.name for i in step.get_inputs()]
        self._own = [n for n in inputs if n.startswith("past.")]
        self._cross = [n for n in inputs if n.startswith("cross.")]
        self._feed: dict[str, np.ndarray] = {}
        self._cache: list[np.ndarray] = []
        self.lengths = np.zeros(0, dtype=np.int64)
        self._last = 0

    def start(self, hidden: ort.OrtValue, mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
        states = hidden.numpy()
        cross = self.cross_session.run(self._cross, {"encoder_hidden_states": states})
        self._feed = {"encoder_attention_mask": mask, **dict(zip(self._cross, cross))}
        batch = ids.shape[0]
        self._cache = [np.zeros((batch, self.shape.num_heads, 0, self.shape.head_dim), dtype=np.float32)
                       for _ in self._own]
        self.lengths = np.zeros(batch, dtype=np.int64)
        return self.step(ids)

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Append `ids` (batch, n) after each row's cached tokens; logits (batch, n, vocab)."""
        batch, new = ids.shape
        needed = int(self.lengths.max()) + new
        if needed > self._cache[0].shape[2]:
            room = -(-needed // self._ROOM) * self._ROOM
            grown = []
            for cache in self._cache:
                bigger = np.zeros((*cache.shape[:2], room, cache.shape[3]), dtype=np.float32)
                bigger[:, :, : cache.shape[2]] = cache
                grown.append(bigger)
            self._cache = grown
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64), "lengths": self.lengths, **self._feed,
                **dict(zip(self._own, self._cache))}
        logits, *presents = self.session.run(None, feed)
        self.calls += 1
        # Each row's new tokens go after its own cached ones. Slices per row: much cheaper than one
        # fancy-indexed write at the batch sizes decoding uses.
        for row, start in enumerate(self.lengths.tolist()):
            for cache, present in zip(self._cache, presents):
                cache[row, :, start : start + new] = present[row]
        self.lengths = self.lengths + new
        self._last = new
        return logits

    def accept(self, counts: np.ndarray) -> None:
        """Keep the first `counts[r]` of the last step's tokens of row r; the rest are forgotten."""
        self.lengths = self.lengths - self._last + counts

    def reorder(self, rows: np.ndarray) -> None:
        """Keep self-attention caches of `rows` (beam search: beams stay within their item, whose
        cross-attention keys/values and mask they share)."""
        self._cache = [cache[rows] for cache in self._cache]
        self.lengths = self.lengths[rows]

    def select(self, rows: np.ndarray) -> None:
        """Continue with `rows` of the batch only (finished rows leave it)."""
        self.reorder(rows)
        self._feed = {name: value[rows] for name, value in self._feed.items()}


Decoder = MergedDecoder | RaggedDecoder


def open_decoder(sessions: Sessions, manifest: Manifest) -> Decoder:
    """A fresh decoding job over the bundle's decoder graph."""
    if manifest.decoder_graph == "ragged":
        return RaggedDecoder(sessions.decoder, sessions.cross, manifest.decoder)
    return MergedDecoder(sessions.decoder, manifest.decoder, sessions.device)


@dataclass(frozen=True)
class Search:
    """Decoding options shared by greedy and beam search."""

    max_new_tokens: int
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    drafts: bool = False
    no_repeat_ngram_size: int = 0


class RepeatBan:
    """`no_repeat_ngram_size`: the tokens that would repeat an n-gram of one sequence (transformers'
    NoRepeatNGramLogitsProcessor; the sequence starts with the decoder start token). The n-grams
    written so far are kept in a table, so that checking a draft position costs a lookup."""

    def __init__(self, size: int, start: int):
        self.size = size
        self.seq: list[int] = [start]
        self._next: dict[tuple[int, ...], list[int]] = {}

    def banned(self, extra: Sequence[int] = ()) -> list[int]:
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

    def extend(self, tokens: Sequence[int]) -> None:
        n = self.size
        for token in tokens:
            self.seq.append(token)
            if len(self.seq) >= n:
                self._next.setdefault(tuple(self.seq[len(self.seq) - n : -1]), []).append(token)


def _constrain(scores: np.ndarray, special: SpecialTokens, search: Search, cur_len) -> np.ndarray:
    """`generate`'s logits processors: no EOS before `min_new_tokens`, forced BOS after the start
    token, forced EOS at the last position. `cur_len` counts the start token: one number, or one per
    score vector (`scores.shape[:-1]`) where rows or draft positions are at different lengths."""
    cur_len = np.asarray(cur_len)
    lo, hi = int(cur_len.min()), int(cur_len.max())
    # Most steps constrain nothing; this check costs a few microseconds instead of the masks' tens.
    if (lo - 1 >= search.min_new_tokens and (special.forced_bos is None or lo > 1)
            and (special.forced_eos is None or not lo <= search.max_new_tokens <= hi)):
        return scores
    cur_len = np.broadcast_to(cur_len, scores.shape[:-1])
    no_eos = cur_len - 1 < search.min_new_tokens
    forced = np.full(scores.shape[:-1], -1, dtype=np.int64)
    if special.forced_bos is not None:
        forced = np.where(cur_len == 1, special.forced_bos, forced)
    if special.forced_eos is not None:
        forced = np.where(cur_len == search.max_new_tokens, special.forced_eos, forced)
    hit = forced >= 0
    if not no_eos.any() and not hit.any():
        return scores
    scores = scores.copy()
    scores[..., special.eos] = np.where(no_eos, -np.inf, scores[..., special.eos])
    if hit.any():
        scores[hit] = -np.inf
        scores[hit, forced[hit]] = 0.0
    return scores


def greedy(decoder: Decoder, hidden: ort.OrtValue, mask: np.ndarray, special: SpecialTokens, search: Search,
           drafter: Drafter | None = None) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Greedy search, verifying `drafter`'s drafts when given (a ragged decoder is needed).

    Returns the tokens of each row (EOS cut off) and, per row, the drafted and accepted tokens.
    A ragged decoder drops finished rows from the batch; the merged one feeds them padding.
    """
    if drafter is not None and not decoder.ragged:
        raise ValueError("drafted decoding needs a ragged decoder graph")
    batch = mask.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    drafts: list[list[int]] = [[] for _ in range(batch)]
    running = np.ones(batch, dtype=bool)
    drafted = np.zeros(batch, dtype=np.int64)
    accepted = np.zeros(batch, dtype=np.int64)
    last = [special.decoder_start] * batch
    active = np.arange(batch)  # the rows in the decoder's batch, in its order
    bans = [RepeatBan(search.no_repeat_ngram_size, special.decoder_start) for _ in range(batch)]
    while True:
        for r in active[running[active]]:
            limit = search.max_new_tokens - len(out[r]) - 1  # the model adds one token after a draft
            drafts[r] = drafter.propose(r, out[r], limit) if drafter is not None else []
        ids = np.full((len(active), 1 + max(len(drafts[r]) for r in active)), special.pad, dtype=np.int64)
        for i, r in enumerate(active):
            if running[r]:
                ids[i, 0] = last[r]
                ids[i, 1 : 1 + len(drafts[r])] = drafts[r]
        logits = decoder.start(hidden, mask, ids) if decoder.calls == 0 else decoder.step(ids)
        written = np.array([len(out[r]) for r in active])
        cur_len = written[:, None] + 1 + np.arange(logits.shape[1])
        scores = logits
        if search.no_repeat_ngram_size:  # before the other processors, as in `generate`
            scores = logits.copy()
            for i, r in enumerate(active):
                for k in range(len(drafts[r]) + 1 if running[r] else 0):
                    scores[i, k, bans[r].banned(drafts[r][:k])] = -np.inf
        choice = _constrain(scores, special, search, cur_len).argmax(axis=-1).tolist()
        kept = np.zeros(len(active), dtype=np.int64)  # fed tokens whose keys/values stay cached
        for i, r in enumerate(active):
            if not running[r]:
                continue
            draft = drafts[r]
            k = 0
            while k < len(draft) and choice[i][k] == draft[k]:
                k += 1
            # The model's choice after each accepted draft token is that token; after the last
            # accepted one it is the model's own next token.
            new = choice[i][: k + 1][: search.max_new_tokens - len(out[r])]
            if special.eos in new:
                new = new[: new.index(special.eos) + 1]
                running[r] = False
            out[r] += new
            bans[r].extend(new)
            last[r] = new[-1]
            kept[i] = k + 1
            drafted[r] += len(draft)
            accepted[r] += k
            if drafter is not None:
                drafter.update(r, len(draft), k)
            if len(out[r]) >= search.max_new_tokens:
                running[r] = False
        if not running.any():
            break
        if decoder.ragged:
            decoder.accept(kept)
            if not running[active].all():
                decoder.select(np.flatnonzero(running[active]))
                active = active[running[active]]
    tokens = [row[: row.index(special.eos)] if special.eos in row else row for row in out]
    return tokens, drafted, accepted


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
    decoder: Decoder, hidden: ort.OrtValue, mask: np.ndarray, special: SpecialTokens, search: Search
) -> list[list[int]]:
    """Hugging Face's vectorized beam search; `hidden` and `mask` hold num_beams rows per item."""
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
                ban = RepeatBan(search.no_repeat_ngram_size, seq[0])
                ban.extend(seq[1:])
                log_probs[row, ban.banned()] = -np.inf
        log_probs = _constrain(log_probs, special, search, cur_len)
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
        full = finished.all(axis=1, keepdims=True) & (search.early_stopping is True)
        done_scores = done_scores + full.astype(np.float32) * _NEG
        done_scores = done_scores + (~improvable).astype(np.float32) * _NEG
        done_scores = done_scores + (~just_done).astype(np.float32) * _NEG
        merged = _topk(np.concatenate([beam_scores, done_scores], axis=1), beams)
        sequences = _gather(np.concatenate([sequences, top_seq], axis=1), merged)
        beam_scores = _gather(np.concatenate([beam_scores, done_scores], axis=1), merged)
        finished = _gather(np.concatenate([finished, just_done], axis=1), merged)

        cur_len += 1
        if search.early_stopping == "never" and search.length_penalty > 0.0:
            best_length = max_length - 1
        else:
            best_length = cur_len - 1
        best_possible = running_scores[:, :1] / np.float32(best_length**search.length_penalty)
        worst_done = np.where(finished, beam_scores.min(axis=1, keepdims=True), _NEG)
        improvable = improvable & (best_possible > worst_done).any(axis=-1, keepdims=True)
        still_open = not (finished.all() and search.early_stopping is True)
        if not (improvable.any() and still_open and not hits.all()):
            break
        decoder.reorder(rows)
        logits = decoder.step(running_seq[:, :, cur_len - 1].reshape(-1, 1))
    best = [sequences[b, 0, 1:].tolist() for b in range(batch)]
    return [row[: row.index(special.eos)] if special.eos in row else row for row in best]
