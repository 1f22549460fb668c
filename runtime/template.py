"""request -> text: render a request with the bundle's input template."""

from __future__ import annotations

from collections.abc import Sequence

from .bundle import Template


def render(template: Template, source: str, candidates: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Return the model's input text and the character span of each candidate in it.

    The spans let the tokenizer stage shorten candidates without ever touching the source.
    User text is substituted once, so braces inside it are never read as placeholders.
    """
    marker = "\x00{}\x00"
    pieces = [template.candidate.format(candidate=marker.format(i), i=i, n=i + 1) for i in range(len(candidates))]
    skeleton = template.text.format(source=source, candidates=template.separator.join(pieces))
    text, spans, pos = [], [], 0
    for i, candidate in enumerate(candidates):
        cut = skeleton.index(marker.format(i), pos)
        text.append(skeleton[pos:cut])
        start = sum(map(len, text))
        text.append(candidate)
        spans.append((start, start + len(candidate)))
        pos = cut + len(marker.format(i))
    text.append(skeleton[pos:])
    return "".join(text), spans
