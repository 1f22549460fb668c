"""The default corrector's real-LLM data: SmolLM2-135M-Instruct's own candidates (the shipped LLM
path, `lmcor candidates`' prompt and sampling) for training, dev and outside sources.

    python -m lmcor.recipes.llm_splits --llm ~/.cache/lmcor/smollm2/bundle --cache build/llm-splits

writes `llm-train.jsonl` (the first `--train` corpus training sentences in a fixed shuffled order,
with sources from the noise model), `llm-dev.jsonl`, `llm-outside.jsonl`,
`llm-outside-licenses.jsonl` and `llm-outside-packages.jsonl` (the sources of `dev.jsonl`,
`outside.jsonl`, `outside-licenses.jsonl` and `outside-packages.jsonl`) into `recipes/splits/`, each line `{"id", "source", "candidates",
"target"}`. Candidates are generated into `--cache` first and resumed from there; a sample's seed
depends only on its source, so an interrupted run resumes with the candidates it would have written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmcor.cli import options
from lmcor.runtime.errors import InputError
from lmcor.runtime.jsonl import dump_record, parse_line

from . import command_line, corrector, data
from .noise import make_example

log = logging.getLogger("lmcor.recipes")

SPLITS = Path(__file__).parent / "splits"
SEED = 16


def train_pairs(count: int) -> list[corrector.Pair]:
    """(noisy source, clean target) pairs of the first `count` training sentences, shuffled once."""
    rng = random.Random(SEED)
    sentences = data.split_sentences()["train"]
    rng.shuffle(sentences)
    pairs = []
    for n, sentence in enumerate(sentences[:count], start=1):
        example = make_example(sentence, rng)
        pairs.append(corrector.Pair(n, example.source, example.target))
    return pairs


def split_pairs(name: str) -> list[corrector.Pair]:
    """The (source, target) pairs of a shipped split, in its order."""
    with open(SPLITS / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [corrector.Pair(n, row["source"], row["target"]) for n, row in enumerate(rows, start=1)]


def write(path: Path, records: Iterable[dict]) -> None:
    """JSON lines into `path` by rename: an interrupted run leaves the former file whole."""
    temp = path.with_name(path.name + ".partial")
    with open(temp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(dump_record(record))
    os.replace(temp, path)


def _split(pairs: list[corrector.Pair]) -> Iterator[dict]:
    for n, p in enumerate(pairs):
        yield {"id": n, "source": p.source, "candidates": list(p.candidates), "target": p.target}


def _seed_cache(cache: Path, split: Path, made_by: str) -> None:
    """Start an empty cache from the split written earlier (possibly a part of it), so that a run on
    a fresh machine answers only the sources the split lacks: its candidates count as this run's
    (`made_by`: the recipe's LLM and settings made them). A line that is not one of the split's is
    said and left to the LLM."""
    if cache.exists() or not split.is_file():
        return
    rows, bad = [], []
    with open(split, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                row = parse_line(raw)
                rows.append({"line": row["id"] + 1, "source": row["source"], "made_by": made_by,
                             "candidates": list(row["candidates"])})
            except (InputError, KeyError, TypeError) as e:
                bad.append((number, e))
    if bad:
        log.warning("%s: %d lines not reused (line %d: %s)", split, len(bad), bad[0][0],
                    bad[0][1] if isinstance(bad[0][1], InputError) else "not one of its records")
    write(cache, rows)


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcor.recipes.llm_splits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", type=Path, required=True, help="the causal-LM bundle (recipes.smollm2)")
    parser.add_argument("--cache", type=Path, default=Path("build/llm-splits"), help="candidates kept here (resumable)")
    parser.add_argument("--train", type=options.positive_int, default=4000, help="training sentences (default: %(default)s)")
    parser.add_argument("--batch-size", type=options.batch_size, default=16, help="prompts per batch (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    writer = None  # the LLM, loaded and its options checked once, before any file is written
    for name, pairs in (("outside", split_pairs("outside")), ("outside-licenses", split_pairs("outside-licenses")),
                        ("outside-packages", split_pairs("outside-packages")), ("dev", split_pairs("dev")),
                        ("train", train_pairs(args.train))):
        out = args.cache / name
        # drawn from the corpus, the training pairs are written out: a source the LLM fails on is named by its line
        read_from = out / "pairs.jsonl" if name == "train" else SPLITS / f"{name}.jsonl"
        job = corrector.Job(pairs=read_from, out=out, llm=args.llm, batch_size=args.batch_size)
        writer = writer or corrector.candidate_writer(job)
        out.mkdir(parents=True, exist_ok=True)
        if name == "train":
            write(read_from, ({"source": p.source, "target": p.target} for p in pairs))
        made_by = corrector._made_by(job)
        _seed_cache(job.out / "candidates.jsonl", SPLITS / f"llm-{name}.jsonl", made_by)
        write(SPLITS / f"llm-{name}.jsonl", _split(corrector.llm_candidates(job, pairs, writer, made_by)))
        log.info("wrote %s", SPLITS / f"llm-{name}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
