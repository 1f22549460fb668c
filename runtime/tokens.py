"""text -> token ids, with even truncation of the candidates when the input is too long."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from . import core
from .bundle import SpecialTokens, Template
from .errors import BundleError, InputError
from .request import Request
from .template import Rendered, render


# Below this many texts, encoding them one by one beats `encode_batch`, whose thread pool costs
# ~0.2 ms to start (2-core measurement).
_PARALLEL_FROM = 64


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list[Encoding]:
    if len(texts) < _PARALLEL_FROM:
        return [tokenizer.encode(text) for text in texts]
    return tokenizer.encode_batch(texts)


def load_tokenizer(path: Path, special: SpecialTokens | None = None, vocab_size: int | None = None) -> Tokenizer:
    """Read a bundle's tokenizer; with `special`, check that each special token id is one of its
    tokens, and with `vocab_size` (the model's) that its vocabulary fits the model's embeddings (a
    manifest and tokenizer that disagree would fail only on the first request)."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise BundleError(f"{path}: cannot read the tokenizer ({e})") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size == 0:
        raise BundleError(f"{path}: the tokenizer's vocabulary is empty (re-export the bundle)")
    base = tokenizer.get_vocab_size(with_added_tokens=False)
    if vocab_size is not None and base > vocab_size:
        raise BundleError(f"{path}: the tokenizer has {base} tokens, but the model's vocabulary has {vocab_size} "
                          "(decoder.vocab_size): this tokenizer is not the model's")
    for name, token in vars(special).items() if special is not None else ():
        if token is not None and token >= size:
            raise BundleError(f"{path}: special_tokens.{name}: {token} is not a token of this tokenizer "
                              f"(its vocabulary has {size})")
    return reading_whole(tokenizer)


def reading_whole(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer`, never truncating or padding (in place; give it a copy to keep the original's)."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@dataclass(frozen=True)
class ModelInput:
    ids: np.ndarray  # int64, special tokens included
    truncated: bool
    # What drafted decoding copies from: each candidate's and the source's own token ids, as an
    # output would hold them (no template, no special tokens). Empty: draft from `ids`.
    references: tuple[np.ndarray, ...] = ()
    # The candidates as the model saw them: cut where truncation cut them (the fallback compares the
    # output with these). Empty: the input came as token ids.
    candidates: tuple[str, ...] = ()


# A token spans far fewer characters than this (SentencePiece pieces 16 at most, BPE merges of
# ordinary text fewer): a candidate cut to `max_tokens` times this many characters still holds more
# tokens than the model can take, so the even cut below is the one its whole text would get.
MAX_CHARS_PER_TOKEN = 64
_WORD = re.compile(r"\S+")


def cut_to_read(text: str, most: int) -> str:
    """`text` cut after `most` characters that are not white space (each token holds at most
    `MAX_CHARS_PER_TOKEN` of them): tokenizers fold runs of white space into few tokens or none, so
    they do not count; what follows a long run is still read."""
    if len(text) <= most:
        return text
    seen = 0
    for word in _WORD.finditer(text):
        length = word.end() - word.start()
        if seen + length >= most:
            return text[: word.start() + most - seen]
        seen += length
    return text


def check_vocabulary(tokenizer: Tokenizer, ids: Sequence[int], vocab_size: int | None) -> None:
    """Refuse token ids past the model's embeddings: a tokenizer given tokens the model was not resized
    for writes them, and the model cannot read them (the text fails alone, not its batch)."""
    if vocab_size is not None and len(ids) and max(ids) >= vocab_size:
        token = next(int(t) for t in ids if t >= vocab_size)
        raise InputError(f"the text holds the token {tokenizer.id_to_token(token)!r} (id {token}), which the model's "
                         f"vocabulary of {vocab_size} lacks (its tokenizer has tokens the model was not resized for)")


def encode_requests(
    tokenizer: Tokenizer, template: Template, requests: Sequence[Request], max_tokens: int, *, references: bool = False,
    vocab_size: int | None = None,
) -> list[ModelInput | InputError]:
    """Tokenize requests exactly as the checkpoint's own tokenizer would tokenize the rendered text.

    An input longer than `max_tokens` has its candidates shortened evenly (each keeps its head, but
    for one whose first character alone takes more tokens than its share, a byte-level tokenizer's CJK
    character or emoji: that one keeps nothing);
    the source is never cut: a source that leaves no room for the candidates (or whose head alone
    takes more than the input, refused before it is tokenized whole) is an `InputError`,
    returned in that request's place so that the other requests are still served. A candidate is
    first cut to `max_tokens * MAX_CHARS_PER_TOKEN` characters, so that the cost of a request is bounded
    by what the model can read, whatever its length. With `references`, each input also carries
    what drafted decoding copies from: the tokens of each candidate and of the source, as the
    encoding of the text the model reads holds them (no second tokenization: a word at a span's edge
    may rarely split differently from the text alone, which changes a draft, never an output). With
    `vocab_size`, a request holding a token id past it is an `InputError` (`check_vocabulary`).
    """
    most = max_tokens * MAX_CHARS_PER_TOKEN
    out: list[ModelInput | InputError | None] = [unreadable(tokenizer, r, max_tokens) for r in requests]
    served = [n for n, answer in enumerate(out) if answer is None]
    shown = [tuple(cut_to_read(c, most) for c in requests[n].candidates) for n in served]
    rendered = [render(template, requests[n].source, candidates) for n, candidates in zip(served, shown)]
    encodings = _encode(tokenizer, [r.text for r in rendered])
    for n, candidates, rendering, encoding in zip(served, shown, rendered, encodings):
        request = requests[n]
        truncated = any(len(c) != len(whole) for c, whole in zip(candidates, request.candidates))
        if len(encoding.ids) > max_tokens:
            try:
                candidates, rendering, encoding = _truncate(tokenizer, template, request.source, candidates,
                                                            rendering, encoding, max_tokens)
            except InputError as e:
                out[n] = e
                continue
            truncated = True
        try:
            check_vocabulary(tokenizer, encoding.ids, vocab_size)
        except InputError as e:
            out[n] = e
            continue
        refs = _references(encoding, rendering.text, [*rendering.spans, rendering.source]) if references else ()
        out[n] = ModelInput(np.asarray(encoding.ids, dtype=np.int64), truncated, refs, candidates)
    return out  # type: ignore[return-value]


def unreadable(tokenizer: Tokenizer, request: Request, max_tokens: int) -> InputError | None:
    """Why a model of `max_tokens` input tokens cannot read `request`, found before it is tokenized,
    whose cost grows with its candidates' number and its source's length: more candidates than
    tokens (each keeps one at least, besides the source's), or a source too long (`_long`)."""
    if len(request.candidates) >= max_tokens:
        return _crowded(len(request.candidates), max_tokens)
    return _long(tokenizer, request.source, max_tokens * MAX_CHARS_PER_TOKEN, max_tokens)


def _long(tokenizer: Tokenizer, source: str, most: int, max_tokens: int) -> InputError | None:
    """A source of more characters that are not white space than `most` whose head of `most` alone
    takes more than `max_tokens` tokens, refused before it is tokenized whole, whose cost grows with
    its length (the source is never cut). (A head that fits is no proof: SentencePiece folds a run of
    unknown characters into one token.)"""
    if len(source) <= most or len(written := "".join(source.split())) <= most:
        return None
    if len(tokenizer.encode(cut_to_read(source, most), add_special_tokens=False).ids) <= max_tokens:
        return None
    return InputError(f"the source has {len(written)} characters besides white space, and its first {most} alone take "
                      f"more than the model's {max_tokens} input tokens (the source is never cut): shorten it")


def _crowded(count: int, max_tokens: int) -> InputError:
    return InputError(f"{count} candidates cannot fit the model's {max_tokens} input tokens (each keeps a token at "
                      "least, and the source is never cut); send fewer candidates")


def _tokens_in(encoding: Encoding, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """For each character span, the indices of the tokens that overlap it (special tokens left out; a
    token over two spans counts for the first). A token of white space alone that a byte-level
    post-processor trimmed to an empty offset (RoBERTa's and BART's `trim_offsets`) sits where the
    white space ends: inside a span that holds that white space, not in the span it precedes."""
    if core.native is not None:  # about a tenth of the reference's time (six spans, ~100 tokens)
        return core.native.tokens_in(encoding.offsets, encoding.special_tokens_mask, spans)
    return _tokens_in_reference(encoding.offsets, encoding.special_tokens_mask, spans)


def _tokens_in_reference(offsets: list[tuple[int, int]], special: list[int], spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """`core.native.tokens_in`'s reference: `_tokens_in` of an encoding's offsets and special-token flags."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    tokens = np.flatnonzero(np.asarray(special) == 0)
    start, end = offsets[tokens, 0], offsets[tokens, 1]
    empty = end == start
    # Tokens in text order (as tokenizers write them): a span's tokens are found by bisection, so the
    # cost stays linear in the text however many spans it holds.
    ordered = bool(np.all(np.diff(start) >= 0) and np.all(np.diff(end) >= 0))
    taken = np.zeros(len(tokens), dtype=bool)
    inside = []
    for s_start, s_end in spans:
        lo, hi = (int(np.searchsorted(end, s_start, "right")), int(np.searchsorted(start, s_end, "right"))) \
            if ordered else (0, len(tokens))
        a, b = start[lo:hi], end[lo:hi]
        hit = ~taken[lo:hi] & np.where(empty[lo:hi], (a > s_start) & (a <= s_end), (a < s_end) & (b > s_start))
        found = lo + np.flatnonzero(hit)
        taken[found] = True
        inside.append(tokens[found])
    return inside


def _references(encoding: Encoding, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, ...]:
    # A space before a span belongs to its first word ("▁word", or a lone "▁" piece before it), as it
    # does when the text is tokenized alone, which is how outputs are tokenized.
    spans = [(start - 1 if start and text[start - 1].isspace() else start, end) for start, end in spans]
    ids = np.asarray(encoding.ids, dtype=np.int64)
    return tuple(ids[tokens] for tokens in _tokens_in(encoding, spans))


def _candidate_token_ends(encoding: Encoding, spans: list[tuple[int, int]]) -> list[list[int]]:
    """For each candidate, the end character offset (within the candidate) of each of its tokens."""
    ends = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
    return [(np.minimum(ends[tokens], c_end) - c_start).tolist()
            for (c_start, c_end), tokens in zip(spans, _tokens_in(encoding, spans))]


def _even_cap(lengths: list[int], budget: int) -> int:
    """The largest per-candidate length L with sum(min(n, L)) <= budget."""
    cap = min(max(lengths), budget)  # a larger L overshoots: one candidate alone, or all whole, exceed it
    while cap > 0 and sum(min(n, cap) for n in lengths) > budget:
        cap -= 1
    return cap


def _cut(text: str, ends: list[int], cap: int) -> str:
    """`text` cut to at most its first `cap` tokens (`ends`: where each ends in it). A character that
    became several tokens (NFKC's "…" -> "...", a byte-level tokenizer's emoji) ends them all at one
    place: it is kept whole or not at all, never cut through (which would keep all of its tokens)."""
    if len(ends) <= cap:
        return text
    kept = [end for end in ends[:cap] if end < ends[cap]]
    return text[: kept[-1]] if kept else ""


def _truncate(
    tokenizer: Tokenizer,
    template: Template,
    source: str,
    candidates: tuple[str, ...],
    rendered: Rendered,
    encoding: Encoding,
    max_tokens: int,
) -> tuple[tuple[str, ...], Rendered, Encoding]:
    """The candidates shortened evenly until the input fits, with their rendering and its encoding."""
    # Re-tokenizing a shortened text can merge pieces differently and overshoot by a token or two;
    # every round measures again and strictly lowers the cap, so a few rounds always suffice.
    for _ in range(8):
        ends = _candidate_token_ends(encoding, rendered.spans)
        lengths = [len(e) for e in ends]
        fixed = len(encoding.ids) - sum(lengths)
        budget = max_tokens - fixed
        if budget < len(candidates):
            one = len(candidates) == 1
            raise InputError(
                f"the source and template (with the separators of {len(candidates)} candidate{'' if one else 's'}) "
                f"take {fixed} of the model's {max_tokens} input tokens, leaving less than a token for "
                f"{'the' if one else 'each'} candidate; shorten the source or send fewer candidates (the source "
                "is never cut)"
            )
        cap = _even_cap(lengths, budget)
        candidates = tuple(_cut(c, e, cap) for c, e in zip(candidates, ends))
        rendered = render(template, source, candidates)
        encoding = tokenizer.encode(rendered.text)
        if len(encoding.ids) <= max_tokens:
            return candidates, rendered, encoding
    raise InputError(f"could not shorten the candidates to fit {max_tokens} input tokens")
