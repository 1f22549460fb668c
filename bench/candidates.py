"""Candidate generation: lmcor's `CandidateWriter` vs transformers `generate` on the same prompts
(`lmcor bench --candidates`).

Both write the greedy answer to LMCor's few-shot prompt for each source, at the same batch size,
ending at the first newline (transformers through `stop_strings`). lmcor runs the prompt's shared
part once per variant and retires finished rows; `generate` runs every prompt whole and pads
finished rows until the batch ends; lmcor runs twice, with its greedy drafts (copied from the
prompt, verified by the model) and without. Rounds rotate which one goes first; the medians are
reported as the answers' tokens per second (lmcor's count for all: the answers must be
identical), with the tokens each one generated.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from lmcor.runtime.candidates import CandidateWriter, FewShot, default_few_shot
from lmcor.runtime.errors import InputError
from lmcor.runtime.generator import Generator



@dataclass(frozen=True)
class CandidatesConfig:
    bundle: Path  # the causal-LM bundle
    checkpoint: Path  # the same model as a Hugging Face folder
    data: Path  # JSONL lines with "source" (and "candidates"; only the source is read)
    requests: int = 48
    rounds: int = 2
    batch_size: int = 16
    max_new_tokens: int | None = None  # default: the bundle's max output tokens
    threads: int | None = None
    prompt: str | None = None  # with {source}; default: lmcor candidates' few-shot prompt


def _sources(path: Path, count: int) -> list[str]:
    """The first `count` sources of a JSONL file, read as `lmcor candidates` reads its input; a line
    that is not JSON is named."""
    from lmcor.runtime.jsonl import blank, parse_line

    sources = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if blank(raw, first=number == 1):
                continue
            try:
                value = parse_line(raw, first=number == 1)
            except InputError as e:
                raise InputError(f"{path}: line {number}: {e}") from None
            if isinstance(value, dict) and isinstance(value.get("source"), str):
                sources.append(value["source"])
            if len(sources) == count:
                break
    if not sources:
        raise InputError(f"{path}: no lines with a 'source'")
    return sources


def _transformers(model, tokenizer, prompts: list[str], batch_size: int, limit: int) -> tuple[list[str], int]:
    import torch

    texts, tokens = [], 0
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                          return_token_type_ids=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=limit, do_sample=False, stop_strings=["\n"],
                                 tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch.input_ids.shape[1] :].tolist():
            row = [t for t in row if t != tokenizer.pad_token_id]
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            tokens += len(row)
            # Without transformers' clean-up (which drops the space in " .encode()"): the tokens' own text.
            texts.append(tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                         .split("\n")[0].strip())
    return texts, tokens


def run(config: CandidatesConfig) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    sources = _sources(config.data, config.requests)
    few_shot = FewShot.from_template(config.prompt) if config.prompt else default_few_shot()
    prompts = [few_shot.heads[few_shot.variant(s)] + s + few_shot.tail for s in sources]
    generator = Generator.load(config.bundle, threads=config.threads)
    limit = config.max_new_tokens or generator.manifest.max_output_tokens
    model = AutoModelForCausalLM.from_pretrained(config.checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.checkpoint, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    seconds: dict[str, list[float]] = {"lmcor": [], "lmcor, no drafts": [], "transformers": []}
    tokens: dict[str, int] = {}
    texts: dict[str, list[str]] = {}
    for r in range(config.rounds):
        names = list(seconds)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            if name.startswith("lmcor"):
                writer = CandidateWriter(generator, few_shot, k=1, max_new_tokens=limit,
                                         batch_size=config.batch_size, drafts=name == "lmcor")
                texts[name] = [c.texts[0] for c in writer(sources)]
                tokens[name] = writer.stats.tokens
            else:
                texts[name], tokens[name] = _transformers(model, tokenizer, prompts, config.batch_size, limit)
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    # The same answers are the same useful tokens (transformers may count a few past the stop).
    rates = {name: tokens["lmcor"] / medians[name] for name in medians}
    return {
        "bundle": str(config.bundle),
        "checkpoint": str(config.checkpoint),
        "requests": len(sources),
        "batch_size": config.batch_size,
        "seconds": medians,
        "tokens": tokens,
        "tokens_per_second": rates,
        "speedup": rates["lmcor"] / rates["transformers"],
        "drafts_speedup": rates["lmcor"] / rates["lmcor, no drafts"],
        "identical_outputs": sum(a == b == c for a, b, c in zip(*texts.values())),
    }


def table(report: dict) -> str:
    rows = [f"{report['requests']} greedy answers to the few-shot prompt, batch {report['batch_size']}, "
            "stopping at the first newline:"]
    for name in report["seconds"]:
        rows.append(f"  {name:<17} {report['seconds'][name]:7.2f} s  {report['tokens'][name]:6d} tokens  "
                    f"{report['tokens_per_second'][name]:7.1f} tokens/s")
    rows.append(f"  lmcor {report['speedup']:.2f}x transformers' tokens/s ({report['drafts_speedup']:.2f}x from drafts); "
                f"identical outputs (all three): {report['identical_outputs']} of {report['requests']}")
    return "\n".join(rows)
