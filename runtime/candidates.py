"""K candidates per source from a causal LM, as LMCor samples them: 1 greedy + K-1 samples.

A corrector is trained on, and then corrects, the candidates of one LLM; this module is how lmcor
asks that LLM. The few-shot prompt comes in variants: each source sees one variant's examples
(chosen by a hash of the source, so a source always gets the same prompt), so no example sentence
is in every prompt, and a small LLM that echoes an example does so rarely, with different
sentences, none of them a plausible answer. Each variant's text before `{source}` is run once
(a `Prefix`), and sources of every variant share a batch, each after its own prefix. Generation
stops at the end of the answer (the first newline): the tokens after it would be wasted.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InputError
from .generator import Generator, Prefix
from .options import (MAX_BATCH_SIZE, check_int, check_items, check_max_new_tokens, check_number, check_stops,
                      check_temperature, check_text, check_words)

INSTRUCTION = "Correct the grammar and spelling of each sentence. Change only what is wrong.\n"
# (wrong, right) pairs about things no ordinary sentence is about, so that an echo never passes for
# an answer; one of them is already right and stays as it is.
EXAMPLES = (
    ("the lighthouse keeper have wrote three letter to his sister", "The lighthouse keeper has written three letters to his sister."),
    ("Our canoe were painted yelow before the regatta.", "Our canoe was painted yellow before the regatta."),
    ("A walrus cannot climb a ladder.", "A walrus cannot climb a ladder."),
    ("she dont remember where the telescope are kept", "She doesn't remember where the telescope is kept."),
    ("The glacier melt more faster every summers.", "The glacier melts faster every summer."),
    ("two beekeeper was arguing about the honey", "Two beekeepers were arguing about the honey."),
    ("The tuba player has practised since dawn.", "The tuba player has practised since dawn."),
    ("my grandmother knit a scarf for the scarecrow yesterday", "My grandmother knitted a scarf for the scarecrow yesterday."),
    ("Neither of the astronauts have seen a penguin.", "Neither of the astronauts has seen a penguin."),
)
SHOTS = 3  # examples per variant


@dataclass(frozen=True)
class FewShot:
    """A prompt in variants: `heads[v]` is variant v's text before the source, `tail` the text after."""

    heads: tuple[str, ...]
    tail: str
    examples: tuple[str, ...] = ()  # the example texts, to count the answers that echo one

    @classmethod
    def from_template(cls, template: str) -> "FewShot":
        """One variant from a prompt with `{source}` (its text before `{source}` is shared)."""
        check_text("prompt", template)
        if template.count("{source}") != 1:
            raise InputError("the prompt must contain {source} exactly once")
        head, tail = template.split("{source}")
        return cls((head,), tail)

    def variant(self, source: str) -> int:
        digest = hashlib.sha256(source.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "little") % len(self.heads)


def default_few_shot() -> FewShot:
    """The shipped prompt: the instruction and SHOTS examples, in len(EXAMPLES) / SHOTS variants
    with no example in common."""
    heads = []
    for v in range(len(EXAMPLES) // SHOTS):
        shots = EXAMPLES[v * SHOTS : (v + 1) * SHOTS]
        heads.append(INSTRUCTION + "".join(f"Sentence: {wrong}\nCorrected: {right}\n" for wrong, right in shots)
                     + "Sentence: ")
    return FewShot(tuple(heads), "\nCorrected:", tuple(text for pair in EXAMPLES for text in pair))


@dataclass(frozen=True)
class Candidates:
    source: str
    texts: list[str]  # the greedy answer first, then the samples


@dataclass
class CandidateStats:
    sources: int = 0
    tokens: int = 0  # generated, over all K
    seconds: float = 0.0
    echoes: int = 0  # candidates equal to one of the prompt's example texts

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        echoes = f"; {self.echoes} candidate(s) echo a prompt example" if self.echoes else ""
        return (f"{self.sources} sources, {self.tokens} generated tokens in {self.seconds:.1f} s "
                f"({rate:.1f} tokens/s){echoes}")


@dataclass
class CandidateWriter:
    """Writes K candidates per source: the greedy answer, then K-1 samples at `temperature`.

    A sample's seed depends on `seed`, the source and its index only, so the candidates of a source
    are the same in any batch and after any resume."""

    generator: Generator
    few_shot: FewShot = field(default_factory=default_few_shot)
    k: int = 5
    temperature: float = 0.6
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int | None = None
    batch_size: int = 8
    stop: Sequence[str] = ("\n",)
    drafts: bool = True  # for the greedy answers (see Generator.generate_batch)
    stats: CandidateStats = field(default_factory=CandidateStats)

    def __post_init__(self) -> None:
        # Checked as `generate_batch` checks them, but now: not first when the first batch runs.
        self.k = check_int("k", self.k, 1)
        self.temperature = check_temperature(self.temperature)
        self.top_p = check_number("top_p", self.top_p, 0, 1, above_low=True)
        self.seed = check_int("seed", self.seed, 0)
        self.batch_size = check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        self.stop = check_stops(self.stop)  # read by each source's check (`_refused`) before a batch runs
        if self.max_new_tokens is not None:
            self.max_new_tokens = check_max_new_tokens(self.max_new_tokens, self.generator.manifest.max_output_tokens)
        positions = self.generator.manifest.max_input_tokens
        for head in filter(None, self.few_shot.heads):  # said of the prompt, which the user wrote or took by default
            if (n := len(self.generator.encode(head.rstrip() or head))) >= positions:
                raise InputError(f"the prompt's part before {{source}} takes {n} tokens, and this model has "
                                 f"{positions} positions in all: write a shorter prompt (--prompt on the command line)")
        self._prefixes: list[Prefix | None] = [self.generator.prefix(head) if head else None
                                               for head in self.few_shot.heads]

    def __call__(self, sources: Sequence[str]) -> list[Candidates | InputError]:
        """The candidates of each source, or in its place the `InputError` it failed with (a source that
        is no text, or white space alone, fails alone)."""
        started = time.perf_counter()
        sources = check_items("sources", sources, "strings")
        out: list[Candidates | InputError | None] = [_refused(n, source, self.stop) for n, source in enumerate(sources)]
        served = [n for n, answer in enumerate(out) if answer is None]
        # Each prompt after its own variant's prefix (None where a variant's head is empty), all in one batch.
        # (stripped: a line break after a source read from a file would end the few-shot pattern early)
        prompts = [sources[n].strip() + self.few_shot.tail for n in served]
        options = dict(max_new_tokens=self.max_new_tokens, top_p=self.top_p, stop=self.stop,
                       prefix=[self._prefixes[self.few_shot.variant(sources[n])] for n in served],
                       batch_size=self.batch_size, drafts=self.drafts, errors="return")
        rounds = [self.generator.generate_batch(prompts, **options)]
        for k in range(1, self.k):
            seeds = [_seed(self.seed, k, sources[n]) for n in served]
            rounds.append(self.generator.generate_batch(prompts, temperature=self.temperature, seed=seeds, **options))
        for row, n in enumerate(served):
            failed = next((r[row] for r in rounds if isinstance(r[row], InputError)), None)
            if failed is not None:
                out[n] = failed
                continue
            texts = [r[row].text.strip() for r in rounds]
            self.stats.tokens += sum(len(r[row].token_ids) for r in rounds)
            self.stats.echoes += sum(text in self.few_shot.examples for text in texts)
            out[n] = Candidates(sources[n], texts)
        self.stats.sources += sum(isinstance(answer, Candidates) for answer in out)  # those answered
        self.stats.seconds += time.perf_counter() - started
        return out  # type: ignore[return-value]


def _refused(n: int, source: object, stop: Sequence[str]) -> InputError | None:
    """Why source `n` cannot be answered (not text, white space alone, not Unicode, a stop string
    inside it), or None."""
    try:
        check_words(f"sources[{n}]", source)
    except InputError as e:
        return e
    # An answer repeats its source, mended: one that holds a stop string (a line break, by default) would
    # be cut there, and every candidate would be the start of an answer.
    inside = next((s for s in stop if s and s in source.strip()), None)
    if inside is not None:
        return InputError(f"the source holds {inside!r}, where an answer ends (a stop string), so its candidates "
                          "would be cut short there: give other stop strings (--stop) for such text")
    return None


def _seed(seed: int, k: int, source: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{k}\0{source}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little")
