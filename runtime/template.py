"""request -> text: render a request with the bundle's input template."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from .bundle import Template

_MARKER = "\x00{}\x00"
_MARKERS = re.compile("\x00(s|[0-9]+)\x00")


class Rendered(NamedTuple):
    text: str
    spans: list[tuple[int, int]]  # each candidate's characters in `text`
    source: tuple[int, int]  # the source's (its first place, should the template hold it twice)


def render(template: Template, source: str, candidates: Sequence[str]) -> Rendered:
    """Return the model's input text and where the candidates and the source are in it.

    The spans let the tokenizer stage shorten candidates without ever touching the source, and
    find the tokens drafted decoding copies from. User text is substituted once, after the
    template is filled with markers, so braces inside it are never read as placeholders.
    """
    pieces = [template.candidate.format(candidate=_MARKER.format(i), i=i, n=i + 1) for i in range(len(candidates))]
    skeleton = template.text.format(source=_MARKER.format("s"), candidates=template.separator.join(pieces))
    text: list[str] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(candidates)
    source_span: tuple[int, int] | None = None
    length = pos = 0
    for marker in _MARKERS.finditer(skeleton):
        text.append(skeleton[pos : marker.start()])
        length += marker.start() - pos
        key = marker.group(1)
        value = source if key == "s" else candidates[int(key)]
        if key != "s":
            spans[int(key)] = (length, length + len(value))
        elif source_span is None:
            source_span = (length, length + len(value))
        text.append(value)
        length += len(value)
        pos = marker.end()
    text.append(skeleton[pos:])
    return Rendered("".join(text), spans, source_span or (0, 0))
