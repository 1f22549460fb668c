"""What goes in (`Request`) and what comes out (`Correction`) of a corrector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError


@dataclass(frozen=True)
class Request:
    source: str
    candidates: tuple[str, ...]
    id: Any = None


@dataclass(frozen=True)
class DecodeStats:
    """Where the time of the batch this item ran in went, and how the decoder was used."""

    batch_size: int = 1
    input_tokens: int = 0
    output_tokens: int = 0
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    decoder_calls: int = 0  # calls of the decoder for the whole batch
    drafted_tokens: int = 0  # this item's draft tokens sent to the decoder for verification
    accepted_tokens: int = 0  # of which the decoder accepted


@dataclass(frozen=True)
class Correction:
    text: str
    token_ids: list[int]  # the decoded tokens of `text`; empty when `text` is a candidate (gated, fallback)
    truncated: bool = False
    id: Any = None
    stats: DecodeStats = field(default_factory=DecodeStats)
    gated: bool = False  # the gate found the first candidate right: returned as it is, not decoded
    fallback: bool = False  # the output strayed from every candidate: the nearest candidate instead


def as_request(item: Any) -> Request:
    """Accept a `Request`, a mapping with `source`/`candidates` (and `id`), or a (source, candidates) pair.

    Raises `InputError` naming the bad field; callers add where the item came from.
    """
    if isinstance(item, Request):
        source, candidates, ident = item.source, item.candidates, item.id
    elif isinstance(item, Mapping):
        for key in ("source", "candidates"):
            if key not in item:
                raise InputError(f"missing field {key!r}")
        source, candidates, ident = item["source"], item["candidates"], item.get("id")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        (source, candidates), ident = item, None
    else:
        raise InputError(f"expected an object with 'source' and 'candidates', got {type(item).__name__}")
    if not isinstance(source, str):
        raise InputError(f"field 'source' must be a string, got {type(source).__name__}")
    if not source.strip():
        raise InputError("field 'source' is empty")
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)):
        raise InputError(f"field 'candidates' must be a list of strings, got {type(candidates).__name__}")
    if not candidates:
        raise InputError("field 'candidates' is an empty list")
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, str):
            raise InputError(f"candidates[{i}] must be a string, got {type(candidate).__name__}")
    return Request(source=source, candidates=tuple(candidates), id=ident)
