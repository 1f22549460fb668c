"""Correction examples from the corpus and the noise model: fixed dev/test files, endless training."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from . import corpus
from .noise import Example, make_example


def split_sentences() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for sentence in corpus.sentences():
        out[corpus.split_of(sentence)].append(sentence)
    return out


def examples(sentences: list[str], seed: int, model="shared") -> list[Example]:
    rng = random.Random(seed)
    return [make_example(s, rng, model) for s in sentences]


def endless(sentences: list[str], seed: int, model="shared", pool: list[str] | None = None) -> Iterator[Example]:
    """Training examples: the sentences in a new order each epoch, with fresh noise every time
    (`model`: a candidate model of `noise`, or a mixture of them)."""
    rng = random.Random(seed)
    order = list(sentences)
    while True:
        rng.shuffle(order)
        for sentence in order:
            yield make_example(sentence, rng, model, pool=pool)


def write_jsonl(path: Path, items: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for n, e in enumerate(items):
            f.write(json.dumps({"id": n, "source": e.source, "candidates": e.candidates, "target": e.target},
                               ensure_ascii=False) + "\n")


def build_outside(out_dir: Path, count: int = 500, seed: int = 3, model: str = "shared") -> Path:
    """`outside.jsonl` (`outside-{model}.jsonl` for another candidate model): correction examples
    from sentences the model never saw in any form."""
    import sysconfig

    known = set(corpus.sentences())
    found: dict[str, None] = {}
    for sentence in corpus.docstring_sentences(Path(sysconfig.get_paths()["stdlib"])):
        if corpus.usable(sentence) and sentence not in known:
            found.setdefault(sentence, None)
    chosen = random.Random(seed).sample(sorted(found), min(count, len(found)))
    path = out_dir / ("outside.jsonl" if model == "shared" else f"outside-{model}.jsonl")
    write_jsonl(path, examples(chosen, seed, model))
    return path


def build(out_dir: Path, seed: int = 0) -> dict[str, list[str]]:
    """Write dev.jsonl and test.jsonl (seeded, fixed) and return every split's sentences."""
    splits = split_sentences()
    for offset, name in enumerate(("dev", "test"), start=1):
        write_jsonl(out_dir / f"{name}.jsonl", examples(splits[name], seed + offset))
    return splits
