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
            join: float = 0.0, related: float = 0.0) -> Iterator[Example]:
    """Training examples: the sentences in a new order each epoch, with fresh noise every time
    (`model`: a candidate model of `noise`, or a mixture of them). A `join` share of the examples
    are two or three sentences in a row (up to `JOINED_WORDS` words): the corpora's sentences are
    short, and a model that never copied a long input skips ahead in one. A `related` share of
    those is a sentence and another that shares a word's stem with it (`related_to`)."""
    rng = random.Random(seed)
    order = list(sentences)
    stems = stem_index(sentences) if related else {}
    while True:
        rng.shuffle(order)
        n = 0
        while n < len(order):
            size = rng.choice((2, 3)) if join and rng.random() < join else 1
            partner = related_to(order[n], stems, rng) if size > 1 and related and rng.random() < related else None
            if partner is None:
                text, used = joined(order[n : n + size])
            else:  # the partner is drawn, not consumed: each sentence still comes once an epoch
                text, used = joined([order[n], partner])[0], 1
            yield make_example(text, rng, model, pool=pool)
            n += used


# Words of this many letters and more are indexed by their first STEM letters (`stem_index`).
STEM = 5


def _stems(sentence: str) -> set[str]:
    words = ("".join(c for c in w if c.isalpha()).lower() for w in sentence.split())
    return {w[:STEM] for w in words if len(w) > STEM}


def stem_index(sentences: list[str]) -> dict[str, list[str]]:
    """Each stem (the first letters of a longer word) -> the sentences holding it, where two or more do."""
    index: dict[str, list[str]] = {}
    for sentence in dict.fromkeys(sentences):
        for stem in _stems(sentence):
            index.setdefault(stem, []).append(sentence)
    return {stem: found for stem, found in index.items() if len(found) > 1}


def related_to(sentence: str, stems: dict[str, list[str]], rng: random.Random) -> str | None:
    """Another sentence sharing a stem with `sentence` ("connected" / "connection"), or None. Joined,
    the same pieces recur with other pieces after them, as a technical text's names do ("module" /
    "sys.modules"): a copy that follows the last two pieces alone jumps from one to the other."""
    shared = sorted(stem for stem in _stems(sentence) if stem in stems)
    if not shared:
        return None
    others = [s for s in stems[rng.choice(shared)] if s != sentence]
    return rng.choice(others) if others else None


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


def in_rows(sentences: list[str], size: int = 3) -> list[str]:
    """The sentences `size` at a time in their order, each text within `JOINED_WORDS` words (`joined`)."""
    texts, n = [], 0
    while n < len(sentences):
        text, used = joined(sentences[n : n + size])
        texts.append(text)
        n += used
    return texts


def build(out_dir: Path, seed: int = 0) -> dict[str, list[str]]:
    """Write dev.jsonl and test.jsonl (seeded, fixed), dev-independent.jsonl (the dev sentences with
    the same source errors, their candidates' errors independent: the fallback is calibrated on both
    kinds) and test-joined.jsonl (the test sentences three in a row: long inputs of several
    sentences), and return every split's sentences."""
    splits = split_sentences()
    for offset, name in enumerate(("dev", "test"), start=1):
        write_jsonl(out_dir / f"{name}.jsonl", examples(splits[name], seed + offset))
    write_jsonl(out_dir / "dev-independent.jsonl", examples(splits["dev"], seed + 1, "independent"))
    write_jsonl(out_dir / "test-joined.jsonl", examples(in_rows(splits["test"]), seed + 4))
    return splits
