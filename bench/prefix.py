"""A shared prefix run once vs in every prompt (`lmcor bench --shared-prefix`).

Workload: a fixed rules prompt of about `prefix_tokens` tokens (Concept Distillation's setting)
in front of short correction prompts, greedy. Both ways run on the same loaded generator,
interleaved round by round; outputs must be identical. The prefix's own run is counted once in
the shared way's time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from lmcor.runtime.errors import InputError
from lmcor.runtime.generator import Generator

RULES = [
    "Rule: a singular subject takes a singular verb.", "Rule: use 'an' before a vowel sound.",
    "Rule: keep one tense within a sentence.", "Rule: a sentence starts with a capital letter.",
    "Rule: do not double words.", "Rule: 'their' owns, 'there' points, 'they're' is 'they are'.",
    "Rule: a question ends with a question mark.", "Rule: do not change what is already right.",
]
SOURCES = ["she go to school every days", "The results was suprising", "He don't like spicy food",
           "I has a apple", "they is here now", "We was late yesterday", "a elephant are big", "it rain tomorrow"]


@dataclass(frozen=True)
class PrefixConfig:
    bundle: Path
    prefix_tokens: int = 500
    requests: int = 8
    rounds: int = 3
    batch_size: int = 8
    max_new_tokens: int = 16
    threads: int | None = None


def rules_prefix(generator: Generator, tokens: int) -> str:
    """Rules, one a line, until the text holds at least `tokens` tokens. The lines' own token counts
    say about how many it takes; the text is measured again only near the end."""
    counts = [len(generator.encode(rule + "\n")) for rule in RULES]
    lines: list[str] = []
    estimate = 0
    while True:
        if estimate >= tokens and len(generator.encode("".join(lines))) >= tokens:
            return "".join(lines)
        lines.append(RULES[len(lines) % len(RULES)] + "\n")
        estimate += counts[(len(lines) - 1) % len(RULES)]


def run(config: PrefixConfig) -> dict:
    generator = Generator.load(config.bundle, threads=config.threads)
    most = generator.manifest.max_input_tokens
    if config.prefix_tokens >= most:
        raise InputError(f"--prefix-tokens {config.prefix_tokens}: this model reads at most {most} input tokens, "
                         "its prompts included")
    prefix_text = rules_prefix(generator, config.prefix_tokens)
    prompts = [f"Sentence: {SOURCES[i % len(SOURCES)]}\nCorrected:" for i in range(config.requests)]
    options = dict(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    times: dict[str, list[float]] = {"in every prompt": [], "shared": []}
    outputs: dict[str, list] = {}
    for r in range(config.rounds):
        for name in (list(times) if r % 2 == 0 else list(times)[::-1]):
            started = time.perf_counter()
            if name == "shared":
                outputs[name] = generator.generate_batch(prompts, prefix=generator.prefix(prefix_text), **options)
            else:
                outputs[name] = generator.generate_batch([prefix_text + p for p in prompts], **options)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "bundle": str(config.bundle),
        "prefix_tokens": len(generator.encode(prefix_text)),
        "requests": config.requests,
        "batch_size": config.batch_size,
        "max_new_tokens": config.max_new_tokens,
        "seconds": medians,
        "speedup": medians["in every prompt"] / medians["shared"],
        "identical_outputs": sum(a.token_ids == b.token_ids
                                 for a, b in zip(outputs["in every prompt"], outputs["shared"])),
    }


def table(report: dict) -> str:
    s = report["seconds"]
    return (f"{report['requests']} prompts after a {report['prefix_tokens']}-token prefix, batch {report['batch_size']}, "
            f"{report['max_new_tokens']} new tokens:\n"
            f"  prefix in every prompt  {s['in every prompt']:.2f} s\n"
            f"  prefix shared           {s['shared']:.2f} s\n"
            f"  speedup {report['speedup']:.2f}x; identical outputs: {report['identical_outputs']} of {report['requests']}")
