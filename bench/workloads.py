"""Benchmark inputs: correction-shaped token ids, from real text or random for a model shape.

A workload is a list of input id sequences (template rendered, special tokens included) and an
output length per input: forced (every backend emits exactly that many tokens) or natural
(each stops at EOS, up to a cap). Every backend receives the same ids.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# T5 shapes from their public configs; weights are random, only the shape matters for latency.
SHAPES = {
    "tiny": dict(vocab_size=512, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6,
                     num_decoder_layers=6, feed_forward_proj="relu", tie_word_embeddings=True),
    "flan-t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8,
                          num_decoder_layers=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
_RESERVED = 3  # pad, eos, unk: never drawn as random content


@dataclass(frozen=True)
class Workload:
    name: str
    inputs: list[np.ndarray]
    new_tokens: list[int]  # forced length per input, or the cap when `forced` is False
    forced: bool

    def take(self, count: int) -> "Workload":
        return Workload(self.name, self.inputs[:count], self.new_tokens[:count], self.forced)


def shape_checkpoint(shape: str, out: Path) -> Path:
    """A random-init T5 of a named shape, with a word-level tokenizer over its vocabulary."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import (
        PreTrainedTokenizerFast,
        T5Config,
        T5ForConditionalGeneration,
    )

    if (out / "tokenizer.json").is_file():
        return out
    # Built beside it and renamed into place: an interrupted build leaves no folder that looks whole.
    shutil.rmtree(out, ignore_errors=True)
    building = out.with_name(out.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    config = T5Config(**SHAPES[shape], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).eval().save_pretrained(building)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"t{i}": i for i in range(_RESERVED, config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # T5's relative positions set no input limit; the K sweep goes past 512 tokens.
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=4096).save_pretrained(building)
    building.rename(out)
    return out


def random_workload(vocab_size: int, count: int, *, source: int = 64, k: int = 5, candidate: int = 64,
                    new_tokens: int = 64, ragged: bool = False, separator: int = 3, seed: int = 0) -> Workload:
    """Source of `source` ids + `k` candidates of `candidate` ids, separated, EOS-terminated.
    With `ragged`, every length is drawn from [0.5x, 1.5x]."""
    rng = random.Random(seed)
    vary = (lambda n: max(1, round(n * rng.uniform(0.5, 1.5)))) if ragged else (lambda n: n)  # noqa: E731
    inputs = []
    for _ in range(count):
        ids = [rng.randrange(_RESERVED + 1, vocab_size) for _ in range(vary(source))]
        for j in range(k):
            ids += [separator] if j else []
            ids += [rng.randrange(_RESERVED + 1, vocab_size) for _ in range(vary(candidate))]
        inputs.append(np.asarray(ids + [1], dtype=np.int64))
    lengths = [vary(new_tokens) for _ in range(count)]
    return Workload(f"random S={source} K={k} C={candidate}{' ragged' if ragged else ''}", inputs, lengths, True)


def text_workload(data: Path, bundle: Path, count: int, *, new_tokens: int | None = None) -> Workload:
    """Real correction requests from a JSONL file, tokenized as the bundle's corrector does. Output
    lengths are natural (capped at the bundle's maximum) unless `new_tokens` forces them."""
    from lmcor.runtime.bundle import load_manifest
    from lmcor.runtime.tokens import load_tokenizer

    from .drafts import read_inputs

    manifest = load_manifest(bundle)
    tokenizer = load_tokenizer(bundle / manifest.files["tokenizer"])
    _, inputs = read_inputs(data, count, tokenizer, manifest)
    cap = new_tokens or manifest.max_output_tokens
    return Workload(f"text {Path(data).name}", [x.ids for x in inputs], [cap] * len(inputs), new_tokens is not None)
