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
    spans: list[tuple[int, int]]  # each candidate's characters in `text` (its first place)
    source: tuple[int, int]  # the source's


def render(template: Template, source: str, candidates: Sequence[str]) -> Rendered:
    """Return the model's input text and where the candidates and the source are in it.

    The spans let the tokenizer stage shorten candidates without ever touching the source, and
    find the tokens drafted decoding copies from. User text is substituted once, after the
    template is filled with markers, so braces inside it are never read as placeholders.
    """
    pieces = [template.candidate.format(candidate=_MARKER.format(i), i=i, n=i + 1) for i in range(len(candidates))]
    skeleton = template.text.format(source=_MARKER.format("s"), candidates=template.separator.join(pieces))
    text: list[str] = []
    first: dict[str, tuple[int, int]] = {}  # marker -> the span of its first place in the text
    length = pos = 0
    for marker in _MARKERS.finditer(skeleton):
        key = marker.group(1)
        value = source if key == "s" else candidates[int(key)]
        text.append(skeleton[pos : marker.start()])
        length += marker.start() - pos
        first.setdefault(key, (length, length + len(value)))
        text.append(value)
        length += len(value)
        pos = marker.end()
    text.append(skeleton[pos:])
    return Rendered("".join(text), [first.get(str(i), (0, 0)) for i in range(len(candidates))], first.get("s", (0, 0)))
