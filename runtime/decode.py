"""encoder states -> output token ids: greedy and beam search over the exported decoder.

The decoder is optimum's merged decoder: one graph whose `use_cache_branch` input selects the
first step (computes the cross-attention keys/values from the encoder states) or a cached step
(takes any number of new tokens together with the past keys/values). The past stays in ONNX
Runtime as OrtValues bound through IOBinding: cross-attention keys/values are bound once,
self-attention keys/values are re-bound from the previous step's outputs, and the logits land in a
reused buffer. Python sees only the logits it must choose from.

Both searches reproduce Hugging Face `generate` token for token (greedy, and beam search with
length penalty and its early-stopping heuristic), including forced BOS/EOS tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .bundle import DecoderShape, SpecialTokens

_NEG = np.float32(-1.0e9)  # Hugging Face's "never pick this" score, kept for identical arithmetic


class Decoder:
    """One decoding job over the merged decoder session, with its KV cache on the device."""

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


@dataclass(frozen=True)
class Search:
    """Decoding options shared by greedy and beam search."""

    max_new_tokens: int
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False


def _constrain(scores: np.ndarray, special: SpecialTokens, search: Search, cur_len: int) -> np.ndarray:
    """`generate`'s logits processors: no EOS before `min_new_tokens`, forced BOS after the start
    token, forced EOS at the last position. `cur_len` counts the start token."""
    max_length = 1 + search.max_new_tokens
    if cur_len - 1 < search.min_new_tokens:
        scores = scores.copy()
        scores[:, special.eos] = -np.inf
    forced = None
    if special.forced_bos is not None and cur_len == 1:
        forced = special.forced_bos
    if special.forced_eos is not None and cur_len == max_length - 1:
        forced = special.forced_eos
    if forced is not None:
        scores = np.full_like(scores, -np.inf)
        scores[:, forced] = 0.0
    return scores


def _cut(tokens: np.ndarray, eos: int) -> list[int]:
    hits = np.flatnonzero(tokens == eos)
    return tokens[: hits[0]].tolist() if hits.size else tokens.tolist()


def greedy(decoder: Decoder, hidden: ort.OrtValue, mask: np.ndarray, special: SpecialTokens, search: Search) -> list[list[int]]:
    batch = mask.shape[0]
    out = np.full((batch, search.max_new_tokens), special.pad, dtype=np.int64)
    running = np.ones(batch, dtype=bool)
    ids = np.full((batch, 1), special.decoder_start, dtype=np.int64)
    logits = decoder.start(hidden, mask, ids)
    for t in range(search.max_new_tokens):
        scores = _constrain(logits[:, -1, :], special, search, t + 1)
        tokens = np.where(running, scores.argmax(axis=-1), special.pad)
        out[:, t] = tokens
        running &= tokens != special.eos
        if not running.any() or t + 1 == search.max_new_tokens:
            break
        logits = decoder.step(tokens[:, None])
    return [_cut(row, special.eos) for row in out]


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
        log_probs = _constrain(_log_softmax(logits[:, -1, :]), special, search, cur_len)
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
    return [_cut(sequences[b, 0, 1:], special.eos) for b in range(batch)]
