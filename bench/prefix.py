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
    """The fewest rule lines whose text holds at least `tokens` tokens: their number found by doubling
    and then halving, so a long prefix costs a few dozen encodes, whatever the tokenizer adds."""

    def text(lines: int) -> str:
        return "".join(RULES[n % len(RULES)] + "\n" for n in range(lines))

    def enough(lines: int) -> bool:
        return len(generator.encode(text(lines))) >= tokens

    low, high = 0, 1  # not enough at low (or none), maybe at high
    while not enough(high):
        if high > 4 * tokens:  # every line holds tokens: only a tokenizer that drops all text gets here
            raise InputError(f"--prefix-tokens {tokens}: this model's tokenizer gives no tokens for the rules text")
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return text(high)


def run(config: PrefixConfig) -> dict:
    generator = Generator.load(config.bundle, threads=config.threads)
    most = generator.manifest.max_input_tokens
    if config.prefix_tokens >= most:
        raise InputError(f"--prefix-tokens {config.prefix_tokens}: this model reads at most {most} input tokens, "
                         "its prompts included")
    prefix_text = rules_prefix(generator, config.prefix_tokens)
    prompts = [f"Sentence: {SOURCES[i % len(SOURCES)]}\nCorrected:" for i in range(config.requests)]
    need = max(len(generator.encode(prefix_text + p)) for p in prompts) + config.max_new_tokens - 1
    if need > most:
        raise InputError(f"--prefix-tokens {config.prefix_tokens}: the prefix, a prompt and {config.max_new_tokens} new "
                         f"tokens need {need} of the model's {most} positions; lower it by at least {need - most}")
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
