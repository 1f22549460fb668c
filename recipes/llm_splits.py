"""The default corrector's real-LLM data: SmolLM2-135M-Instruct's own candidates (the shipped LLM
path, `lmcor candidates`' prompt and sampling) for training, dev and outside sources.

    python -m lmcor.recipes.llm_splits --llm ~/.cache/lmcor/smollm2/bundle --cache build/llm-splits

writes `llm-train.jsonl` (the first `--train` corpus training sentences in a fixed shuffled order,
with sources from the noise model), `llm-dev.jsonl` and `llm-outside.jsonl` (the sources of
`dev.jsonl` and `outside.jsonl`) into `recipes/splits/`, each line `{"id", "source", "candidates",
"target"}`. Candidates are generated into `--cache` first and resumed from there; a sample's seed
depends only on its source, so an interrupted run resumes with the candidates it would have written.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

from lmcor.runtime.jsonl import dump_record

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


def write(path: Path, pairs: list[corrector.Pair]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for n, p in enumerate(pairs):
            f.write(dump_record({"id": n, "source": p.source, "candidates": list(p.candidates), "target": p.target}))


def _seed_cache(cache: Path, split: Path, made_by: str) -> None:
    """Start an empty cache from the split written earlier (possibly a part of it), so that a run on
    a fresh machine answers only the sources the split lacks: its candidates count as this run's
    (`made_by`: the recipe's LLM and settings made them)."""
    if cache.exists() or not split.is_file():
        return
    with open(split, encoding="utf-8") as f, open(cache, "w", encoding="utf-8") as out:
        for line in f:
            row = json.loads(line)
            out.write(dump_record({"line": row["id"] + 1, "source": row["source"], "made_by": made_by,
                                   "candidates": row["candidates"]}))


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcor.recipes.llm_splits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", type=Path, required=True, help="the causal-LM bundle (recipes.smollm2)")
    parser.add_argument("--cache", type=Path, default=Path("build/llm-splits"), help="candidates kept here (resumable)")
    parser.add_argument("--train", type=int, default=4000, help="training sentences (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    writer = None  # the LLM, loaded and its options checked once, before any file is written
    for name, pairs in (("outside", split_pairs("outside")), ("dev", split_pairs("dev")), ("train", train_pairs(args.train))):
        job = corrector.Job(pairs=SPLITS / f"{name}.jsonl", out=args.cache / name, llm=args.llm,
                            batch_size=args.batch_size)
        writer = writer or corrector.candidate_writer(job)
        job.out.mkdir(parents=True, exist_ok=True)
        _seed_cache(job.out / "candidates.jsonl", SPLITS / f"llm-{name}.jsonl", corrector._made_by(job))
        write(SPLITS / f"llm-{name}.jsonl", corrector.llm_candidates(job, pairs, writer))
        log.info("wrote %s", SPLITS / f"llm-{name}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
