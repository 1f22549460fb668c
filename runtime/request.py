"""What goes in (`Request`, `CorrectionOptions`) and what comes out (`Correction`) of a corrector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import InputError
from .jsonl import json_kind
from .options import MAX_BEAMS, MAX_LENGTH_PENALTY, MAX_NO_REPEAT_NGRAM, check_flag, check_int, check_number, check_text


@dataclass(frozen=True)
class Request:
    """One request, checked when it is made (an `InputError` naming the bad field), so that it is
    checked once however many stages it passes."""

    source: str
    candidates: tuple[str, ...]
    id: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise InputError(f"field 'source' must be a string, got {json_kind(self.source)}")
        if not self.source.strip():
            raise InputError("field 'source' is empty" if self.source == "" else
                             "field 'source' is only white space: nothing to correct")
        check_text("field 'source'", self.source)
        if isinstance(self.candidates, str) or not isinstance(self.candidates, (list, tuple)):
            raise InputError(f"field 'candidates' must be a list of strings, got {json_kind(self.candidates)}")
        if not self.candidates:
            raise InputError("field 'candidates' is an empty list")
        for i, candidate in enumerate(self.candidates):
            if not isinstance(candidate, str):
                raise InputError(f"candidates[{i}] must be a string, got {json_kind(candidate)}")
            check_text(f"candidates[{i}]", candidate)
        if isinstance(self.id, str):
            check_text("field 'id'", self.id)
        object.__setattr__(self, "candidates", tuple(self.candidates))


@dataclass(frozen=True)
class CorrectionOptions:
    """How requests are corrected: one object for the API, the CLI and the server, checked when it is
    made (an `InputError` naming the bad field).

    Outputs have at most `max_new_tokens` tokens (None: the bundle's `max_output_tokens`, which also
    caps it) and no EOS before `min_new_tokens`. `num_beams` > 1 runs beam search with
    `length_penalty`. `no_repeat_ngram_size` > 0 bans repeating any n-gram of the output (None: the
    bundle's default; 0: off). `drafts` verifies drafts copied from the request's input in greedy search
    (same output, fewer decoder calls) where the bundle's decoder supports it. A gate passes a first
    candidate whose P(right) is at least `gate_threshold` (None: the gate's calibrated threshold, else
    0.5). An output whose chrF to its nearest candidate is below `fallback_below` (None: the bundle's
    calibrated value; 0: never) is replaced by the best guess among source and candidates, and any
    output by the candidates' edit vote where they support it more (`runtime.fallback.guard`); the
    text returned then keeps only its edits to the source of at most `fallback_span` words that fix a
    writer's error (`runtime.vote.minimal_edits`; None: the bundle's calibrated value; 0: any edit).
    """

    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int | None = None
    drafts: bool = True
    gate_threshold: float | None = None
    fallback_below: float | None = None
    fallback_span: int | None = None

    def __post_init__(self) -> None:
        most = None if self.max_new_tokens is None else check_int("max_new_tokens", self.max_new_tokens, 1)
        checked = {
            "max_new_tokens": most,
            "min_new_tokens": check_int("min_new_tokens", self.min_new_tokens, 0, most,
                                        most_is=" (max_new_tokens)" if most is not None else ""),
            "num_beams": check_int("num_beams", self.num_beams, 1, MAX_BEAMS),
            "length_penalty": check_number("length_penalty", self.length_penalty, -MAX_LENGTH_PENALTY,
                                           MAX_LENGTH_PENALTY),
            "no_repeat_ngram_size": (None if self.no_repeat_ngram_size is None
                                     else check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0,
                                                    MAX_NO_REPEAT_NGRAM)),
            "drafts": check_flag("drafts", self.drafts),
            "gate_threshold": (None if self.gate_threshold is None
                               else check_number("gate_threshold", self.gate_threshold, 0, 1, what="a probability")),
            "fallback_below": (None if self.fallback_below is None
                               else check_number("fallback_below", self.fallback_below, 0, 100, what="a chrF")),
            "fallback_span": None if self.fallback_span is None else check_int("fallback_span", self.fallback_span, 0),
        }
        for name, value in checked.items():  # in the types the runtime uses (an np.int64 becomes an int)
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class RequestStats:
    """One request's own numbers: its tokens, the decoder calls it took part in, its drafts, and
    where its time went (seconds, from when it was submitted)."""

    input_tokens: int = 0
    output_tokens: int = 0
    decoder_calls: int = 0  # calls of the decoder that advanced this request (a beam search: its static batch's)
    drafted_tokens: int = 0  # draft tokens sent to the decoder for verification
    accepted_tokens: int = 0  # of which the decoder accepted
    queued_s: float = 0.0  # waiting for a place in the decoder's batch
    encoder_s: float = 0.0  # its encoder pass (with the rows encoded with it)
    decoder_s: float = 0.0  # from its encoder pass to its last token
    first_token_s: float = 0.0  # from submission to its first output token
    latency_s: float = 0.0  # from submission to its last token


@dataclass(frozen=True)
class Correction:
    text: str
    token_ids: list[int]  # the decoded tokens of `text`; empty when `text` is a candidate (gated, fallback)
    truncated: bool = False
    id: Any = None
    stats: RequestStats = field(default_factory=RequestStats)
    gated: bool = False  # the gate found the first candidate right: returned as it is, not decoded
    fallback: bool = False  # the fallback changed the model's output (a best guess, the edit vote, edits kept small)
    withdrawn: bool = False  # cancelled while it decoded: the text written until then, as it is (no fallback)


OPTION_FIELDS = frozenset(option.name for option in fields(CorrectionOptions))


def as_request(item: Any) -> Request:
    """Accept a `Request`, a mapping with `source`/`candidates` (and `id`), or a (source, candidates) pair.

    Raises `InputError` naming the bad field; callers add where the item came from.
    """
    if isinstance(item, Request):
        return item
    try:
        return _read_request(item)
    except (InputError, MemoryError):
        raise
    except Exception as e:  # an object of the caller's own type (a mapping, a list, a string) may fail to be
        # read: that request fails, not the batch it came with
        raise InputError(f"the request could not be read ({type(item).__name__}: {type(e).__name__}: {e})") from None


def _read_request(item: Any) -> Request:
    if isinstance(item, Mapping):
        missing = [key for key in ("source", "candidates") if key not in item]
        if missing:
            raise InputError(f"missing field {missing[0]!r}")
        asked = sorted(OPTION_FIELDS & item.keys())
        if asked:  # it would be ignored: options are the call's
            raise InputError(f"field {asked[0]!r} is an option of the call (correct_batch({asked[0]}=...)), not of "
                             "one request")
        return Request(item["source"], item["candidates"], item.get("id"))
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Request(*item)
    raise InputError(f"expected an object with 'source' and 'candidates', got {json_kind(item)}")
