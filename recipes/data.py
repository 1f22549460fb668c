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


# Joined sentences hold at most this many words: their targets stay within the corrector's 96
# output tokens.
JOINED_WORDS = 50


def endless(sentences: list[str], seed: int, model="shared", pool: list[str] | None = None,
            join: float = 0.0) -> Iterator[Example]:
    """Training examples: the sentences in a new order each epoch, with fresh noise every time
    (`model`: a candidate model of `noise`, or a mixture of them). A `join` share of the examples
    are two or three sentences in a row (up to `JOINED_WORDS` words): the corpora's sentences are
    short, and a model that never copied a long input skips ahead in one."""
    rng = random.Random(seed)
    order = list(sentences)
    while True:
        rng.shuffle(order)
        n = 0
        while n < len(order):
            size = rng.choice((2, 3)) if join and rng.random() < join else 1
            text, used = joined(order[n : n + size])
            yield make_example(text, rng, model, pool=pool)
            n += used


def joined(sentences: list[str]) -> tuple[str, int]:
    """The first sentence and the next ones while the text stays within `JOINED_WORDS` words, and
    how many it holds."""
    text, words, used = sentences[0], len(sentences[0].split()), 1
    for sentence in sentences[1:]:
        words += len(sentence.split())
        if words > JOINED_WORDS:
            break
        text, used = text + " " + sentence, used + 1
    return text, used


def write_jsonl(path: Path, items: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for n, e in enumerate(items):
            f.write(json.dumps({"id": n, "source": e.source, "candidates": e.candidates, "target": e.target},
                               ensure_ascii=False) + "\n")


def build_outside(out_dir: Path, count: int = 500, seed: int = 3, model: str = "shared",
                  source: str = "docstrings") -> Path:
    """`outside.jsonl` (`outside-{model}.jsonl` for another candidate model): correction examples
    from sentences the model never saw in any form, the Python standard library's docstrings; with
    `source="licenses"`, `outside-licenses[-{model}].jsonl` from Debian's license texts, and with
    `source="packages"`, `outside-packages[-{model}].jsonl` from the docstrings of installed packages
    (`corpus.PACKAGES`: which sentences depends on their versions), none of the standard library's."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sentences = {"docstrings": lambda: corpus.docstring_sentences(stdlib), "licenses": corpus.license_sentences,
                 "packages": corpus.package_sentences}[source]()
    known = set(corpus.sentences()) | (set(corpus.docstring_sentences(stdlib)) if source == "packages" else set())
    found: dict[str, None] = {}
    for sentence in sentences:
        if corpus.usable(sentence) and sentence not in known:
            found.setdefault(sentence, None)
    chosen = random.Random(seed).sample(sorted(found), min(count, len(found)))
    stem = "outside" if source == "docstrings" else f"outside-{source}"
    path = out_dir / (f"{stem}.jsonl" if model == "shared" else f"{stem}-{model}.jsonl")
    write_jsonl(path, examples(chosen, seed, model))
    return path


def build(out_dir: Path, seed: int = 0) -> dict[str, list[str]]:
    """Write dev.jsonl and test.jsonl (seeded, fixed), and dev-independent.jsonl (the dev sentences with
    the same source errors, their candidates' errors independent: the fallback is calibrated on both
    kinds), and return every split's sentences."""
    splits = split_sentences()
    for offset, name in enumerate(("dev", "test"), start=1):
        write_jsonl(out_dir / f"{name}.jsonl", examples(splits[name], seed + offset))
    write_jsonl(out_dir / "dev-independent.jsonl", examples(splits["dev"], seed + 1, "independent"))
    return splits
