"""What goes in (`Request`) and what comes out (`Correction`) of a corrector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .options import check_text


@dataclass(frozen=True)
class Request:
    """One request, checked when it is made (an `InputError` naming the bad field), so that it is
    checked once however many stages it passes."""

    source: str
    candidates: tuple[str, ...]
    id: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise InputError(f"field 'source' must be a string, got {type(self.source).__name__}")
        if not self.source.strip():
            raise InputError("field 'source' is empty")
        check_text("field 'source'", self.source)
        if isinstance(self.candidates, str) or not isinstance(self.candidates, (list, tuple)):
            raise InputError(f"field 'candidates' must be a list of strings, got {type(self.candidates).__name__}")
        if not self.candidates:
            raise InputError("field 'candidates' is an empty list")
        for i, candidate in enumerate(self.candidates):
            if not isinstance(candidate, str):
                raise InputError(f"candidates[{i}] must be a string, got {type(candidate).__name__}")
            check_text(f"candidates[{i}]", candidate)
        if isinstance(self.id, str):
            check_text("field 'id'", self.id)
        object.__setattr__(self, "candidates", tuple(self.candidates))


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
        return item
    if isinstance(item, Mapping):
        for key in ("source", "candidates"):
            if key not in item:
                raise InputError(f"missing field {key!r}")
        return Request(item["source"], item["candidates"], item.get("id"))
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Request(*item)
    raise InputError(f"expected an object with 'source' and 'candidates', got {type(item).__name__}")
