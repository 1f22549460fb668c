"""text -> token ids, with even truncation of the candidates when the input is too long."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from .bundle import Template
from .errors import BundleError, InputError
from .request import Request
from .template import render


# Below this many texts, encoding them one by one beats `encode_batch`, whose thread pool costs
# ~0.2 ms to start (2-core measurement: 1 request with its references 0.33 vs 0.50 ms).
_PARALLEL_FROM = 64


def _encode(tokenizer: Tokenizer, texts: list[str], *, add_special_tokens: bool = True) -> list[Encoding]:
    if len(texts) < _PARALLEL_FROM:
        return [tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in texts]
    return tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise BundleError(f"{path}: cannot read the tokenizer ({e})") from None
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


def encode_requests(
    tokenizer: Tokenizer, template: Template, requests: Sequence[Request], max_tokens: int, *, references: bool = False
) -> list[ModelInput | InputError]:
    """Tokenize requests exactly as the checkpoint's own tokenizer would tokenize the rendered text.

    An input longer than `max_tokens` has its candidates shortened evenly (each keeps its head);
    the source is never cut: a source that leaves no room for the candidates is an `InputError`,
    returned in that request's place so that the other requests are still served. With
    `references`, each input also carries what drafted decoding copies from.
    """
    rendered = [render(template, r.source, r.candidates) for r in requests]
    encodings = _encode(tokenizer, [text for text, _ in rendered])
    drafts_from = _references(tokenizer, requests) if references else [()] * len(requests)
    out: list[ModelInput | InputError] = []
    for request, (_, spans), encoding, refs in zip(requests, rendered, encodings, drafts_from):
        if len(encoding.ids) <= max_tokens:
            out.append(ModelInput(np.asarray(encoding.ids, dtype=np.int64), False, refs))
            continue
        try:
            out.append(_truncate(tokenizer, template, request, spans, encoding, max_tokens, refs))
        except InputError as e:
            out.append(e)
    return out


def _references(tokenizer: Tokenizer, requests: Sequence[Request]) -> list[tuple[np.ndarray, ...]]:
    texts = [text for r in requests for text in (*r.candidates, r.source)]
    encoded = _encode(tokenizer, texts, add_special_tokens=False)
    out, at = [], 0
    for r in requests:
        n = len(r.candidates) + 1
        out.append(tuple(np.asarray(e.ids, dtype=np.int64) for e in encoded[at : at + n]))
        at += n
    return out


def _candidate_token_ends(encoding: Encoding, spans: list[tuple[int, int]]) -> list[list[int]]:
    """For each candidate, the end character offset (within the candidate) of each of its tokens."""
    ends: list[list[int]] = [[] for _ in spans]
    for (start, end), special in zip(encoding.offsets, encoding.special_tokens_mask):
        if special or end <= start:
            continue
        for c, (c_start, c_end) in enumerate(spans):
            if start < c_end and end > c_start:
                ends[c].append(min(end, c_end) - c_start)
                break
    return ends


def _even_cap(lengths: list[int], budget: int) -> int:
    """The largest per-candidate length L with sum(min(n, L)) <= budget."""
    cap = max(lengths)
    while cap > 0 and sum(min(n, cap) for n in lengths) > budget:
        cap -= 1
    return cap


def _truncate(
    tokenizer: Tokenizer,
    template: Template,
    request: Request,
    spans: list[tuple[int, int]],
    encoding: Encoding,
    max_tokens: int,
    references: tuple[np.ndarray, ...],
) -> ModelInput:
    candidates = list(request.candidates)
    total = len(encoding.ids)
    # Re-tokenizing a shortened text can merge pieces differently and overshoot by a token or two;
    # every round measures again and strictly lowers the cap, so a few rounds always suffice.
    for _ in range(8):
        ends = _candidate_token_ends(encoding, spans)
        lengths = [len(e) for e in ends]
        fixed = total - sum(lengths)
        budget = max_tokens - fixed
        if budget < len(candidates):
            raise InputError(
                f"the source and template take {fixed} of the model's {max_tokens} input tokens, "
                f"leaving no room for {len(candidates)} candidates (the source is never cut; shorten it)"
            )
        cap = _even_cap(lengths, budget)
        candidates = [c[: e[cap - 1]] if len(e) > cap else c for c, e in zip(candidates, ends)]
        text, spans = render(template, request.source, candidates)
        encoding = tokenizer.encode(text)
        total = len(encoding.ids)
        if total <= max_tokens:
            return ModelInput(np.asarray(encoding.ids, dtype=np.int64), True, references)
    raise InputError(f"could not shorten the candidates to fit {max_tokens} input tokens")
