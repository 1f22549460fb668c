"""Train lmcor's default corrector from scratch: tokenizer, small T5 v1.1-style model, export.

    python -m lmcor.recipes.train --out build/default-corrector --minutes 170

writes `dev.jsonl`/`test.jsonl`, the tokenizer, checkpoints (the same command continues an
interrupted run; --restart starts over), the
Hugging Face folder `hf/`, and the exported bundle `bundle/` with its fallback threshold calibrated
on dev (`recipes/fallback.py`). Seeds are fixed.

The training data mixes two kinds of candidates, LMCor's way and beyond it: a real LLM's own
(`recipes/splits/llm-train.jsonl`, SmolLM2's candidates, written by `recipes.llm_splits`; a
`--llm-share` of the examples), and, for the rest, candidates from the synthetic candidate
models (`recipes.noise`: shared and independent errors, weak, rewriting and echoing LLMs) over
every corpus training sentence, so that the corrector learns to vote among candidates and to
keep the source when the candidates are bad. Checkpoints are chosen on both kinds of dev data.

A from-scratch seq2seq sits on a long plateau before it learns to copy, and a corrector is
mostly copying. Three choices shorten the plateau on a CPU: the output layer is tied to the
input embeddings (copying an attended token's embedding through the residual stream then reads
out as that token), training starts with a copy warm-up (one candidate, which is the target,
so inputs are short and the only thing to learn is where to copy from), and the learning rate
stays constant after warm-up until half of the time budget, then decays. After the warm-up some
teacher-forced decoder inputs slip by one token, so that the model learns to recover from its own
slips instead of looping.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lmcor.runtime.bundle import Template
from lmcor.runtime.errors import InputError
from lmcor.runtime.request import Request
from lmcor.runtime.tokens import encode_requests, reading_whole

from . import command_line, data, fallback, noise
from .noise import Example

log = logging.getLogger("lmcor.recipes")

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(8)]
TEMPLATE = Template()
MAX_INPUT_TOKENS = 512  # what the exported corrector reads (its tokenizer's model_max_length)
MAX_TARGET_TOKENS = 96  # what it writes (its bundle's max output tokens), EOS included


@dataclass(frozen=True)
class Settings:
    vocab_size: int = 4000
    d_model: int = 256
    d_kv: int = 64
    num_heads: int = 4
    d_ff: int = 640
    encoder_layers: int = 3
    decoder_layers: int = 2
    lr: float = 1e-3
    warmup_steps: int = 300
    tokens_per_batch: int = 3600
    copy_until_loss: float = 0.35  # per-token loss at which the copy warm-up ends
    copy_share_after: float = 0.1
    decoder_noise: float = 0.1  # share of teacher-forced decoder inputs replaced by a slip, after warm-up
    decay_from: float = 0.5  # share of the time budget after which the learning rate decays (cosine)
    seed: int = 0


def train_tokenizer(sentences: list[str], vocab_size: int):
    """A Unigram tokenizer in T5's conventions, covering ordinary English and the template."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Replace(Regex("[\u2018\u2019]"), "'"),
        normalizers.Replace(Regex("[\u201c\u201d]"), '"'),
        normalizers.Replace(Regex(r"\s+"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-$%&/*+=@#[]_")
    # Every character of the text needs a piece: a script of thousands (Chinese) grows the vocabulary.
    characters = {c for s in sentences for c in tok.normalizer.normalize_str(s) if not c.isspace()} | set(alphabet)
    if len(characters) + len(SPECIAL_TOKENS) + 64 > vocab_size:
        grown = len(characters) + len(SPECIAL_TOKENS) + 64
        log.info("vocabulary: %d pieces instead of %d, for the text's %d characters", grown, vocab_size, len(characters))
        vocab_size = grown
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>",
                                      initial_alphabet=alphabet, max_piece_length=12)
    tok.train_from_iterator(sentences + ["source: candidates:"] * 1000, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=MAX_INPUT_TOKENS,
                                   model_input_names=["input_ids", "attention_mask"])


def build_model(settings: Settings, vocab_size: int):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=vocab_size, d_model=settings.d_model, d_kv=settings.d_kv, num_heads=settings.num_heads,
        d_ff=settings.d_ff, num_layers=settings.encoder_layers, num_decoder_layers=settings.decoder_layers,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(settings.seed)
    return T5ForConditionalGeneration(config)


def copy_init(model, seed: int = 0) -> None:
    """Start from a model that already copies by content, instead of waiting for training to
    discover it.

    The residual stream is split in three: A (96 dims) holds the current token, B (96) the
    previous one, C (64) the one before that. Token embeddings live in A. In the encoder, heads
    0-1 attend one position back and head 2 two positions back (through T5's relative bias) and
    write those tokens into B and C; in the decoder, self-attention head 0 writes the previous
    output token into C. Every decoder cross-attention head then matches the last two output
    tokens (A, C) against each input position's two preceding tokens (B, C) and reads that
    position's own token (A): the next token after every place in the source and the candidates
    where the last two output tokens occur, averaged over all of them, which is a vote among the
    candidates. All other output projections start at zero, so the rest of the network starts as
    the identity and training refines a working copier.
    """
    import torch

    config = model.config
    d, d_kv = config.d_model, config.d_kv
    if (d, d_kv, config.num_heads) != (256, 64, 4):
        raise ValueError("copy_init is laid out for d_model 256 with 4 heads of 64")
    a, b, c = slice(0, 96), slice(96, 192), slice(192, 256)
    g = torch.Generator().manual_seed(seed)

    def bucket(attention, distance: int, bidirectional: bool) -> int:
        return int(attention._relative_position_bucket(torch.tensor(distance), bidirectional=bidirectional,
                                                       num_buckets=config.relative_attention_num_buckets,
                                                       max_distance=config.relative_attention_max_distance))

    def orthonormal(rows: int, cols: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(cols, cols, generator=g))[0].T[:rows]

    def look_back(attention, head: int, distance: int, bidirectional: bool, src: slice, dst: slice) -> None:
        """Make `head` attend `distance` positions back and copy residual dims `src` into `dst`."""
        bias = attention.relative_attention_bias.weight  # (buckets, heads)
        bias[:, head] = -20.0
        bias[bucket(attention, -distance, bidirectional), head] = 20.0
        rows = slice(head * d_kv, head * d_kv + (src.stop - src.start))
        attention.q.weight[head * d_kv : (head + 1) * d_kv].zero_()
        attention.v.weight[head * d_kv : (head + 1) * d_kv].zero_()
        attention.v.weight[rows, src] = torch.eye(src.stop - src.start)
        # RMSNorm scales an embedding-only stream (A is 96 of 256 dims) up by sqrt(256/96).
        attention.o.weight[dst, rows] = torch.eye(dst.stop - dst.start) * math.sqrt(96 / 256)

    with torch.no_grad():
        model.shared.weight.zero_()
        model.shared.weight[:, a] = torch.randn(config.vocab_size, 96, generator=g)
        for stack in (model.encoder, model.decoder):
            for block in stack.block:
                for layer in block.layer:
                    for name in ("SelfAttention", "EncDecAttention"):
                        if hasattr(layer, name):
                            getattr(layer, name).o.weight.zero_()
                    if hasattr(layer, "DenseReluDense"):
                        layer.DenseReluDense.wo.weight.zero_()
        encoder = model.encoder.block[0].layer[0].SelfAttention
        look_back(encoder, 0, 1, True, slice(0, 48), slice(96, 144))
        look_back(encoder, 1, 1, True, slice(48, 96), slice(144, 192))
        look_back(encoder, 2, 2, True, slice(0, 64), c)
        look_back(model.decoder.block[0].layer[0].SelfAttention, 0, 1, False, slice(0, 64), c)
        cross = model.decoder.block[0].layer[1].EncDecAttention
        for weight in (cross.q, cross.k, cross.v):
            weight.weight.zero_()
        values = [orthonormal(96, 96) for _ in range(2)]
        for h in range(4):
            first, second = slice(h * d_kv, h * d_kv + 32), slice(h * d_kv + 32, (h + 1) * d_kv)
            r, s = orthonormal(32, 96), orthonormal(32, 64)
            cross.q.weight[first, a], cross.k.weight[first, b] = 0.25 * r, r  # last token vs previous input token
            cross.q.weight[second, c], cross.k.weight[second, c] = 0.25 * s, s  # the token before, likewise
            value = values[h // 2][(h % 2) * 48 : (h % 2 + 1) * 48]  # two heads cover A once
            cross.v.weight[h * d_kv : h * d_kv + 48, a] = value
            cross.o.weight[a, h * d_kv : h * d_kv + 48] = 2.0 * value.T


def _pad(rows: list[list[int]], width: int, fill: int):
    import torch

    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width])
    return out


def _tensors(pairs: list[tuple[list[int], list[int]]], pad: int):
    """(input_ids, attention_mask, labels) from (input ids, target ids) pairs."""
    inputs = _pad([x for x, _ in pairs], max(len(x) for x, _ in pairs), pad)
    mask = _pad([[1] * len(x) for x, _ in pairs], inputs.shape[1], 0)
    labels = _pad([y for _, y in pairs], max(len(y) for _, y in pairs), -100)
    return inputs, mask, labels


def _slipped(decoder_ids, share: float, pad: int, eos: int):
    """Teacher-forced decoder inputs with a `share` of positions replaced by the token before or after.

    Under teacher forcing the decoder never sees its own slips; at inference one repeated or skipped
    token then matches a wrong place in the candidates and the copy runs in a loop. Training on
    inputs that repeat or skip a token (labels unchanged) teaches it to get back on track.
    """
    import torch

    if share <= 0:
        return decoder_ids
    real = decoder_ids != pad
    real[:, 0] = False  # the start token stays
    slip = real & (torch.rand(decoder_ids.shape) < share)
    before, after = torch.roll(decoder_ids, 1, dims=1), torch.roll(decoder_ids, -1, dims=1)
    replacement = torch.where(torch.rand(decoder_ids.shape) < 0.5, before, after)
    slip &= (replacement != pad) & (replacement != eos)
    return torch.where(slip, replacement, decoder_ids)


def _random_copies(tokenizer, rng: random.Random, count: int) -> list[tuple[list[int], list[int]]]:
    """Copy tasks over random token ids: no language model helps, only finding the next token in the
    input does, which is the skill the corrector rests on."""
    prefix = tokenizer.backend_tokenizer.encode("source:", add_special_tokens=False).ids
    middle = tokenizer.backend_tokenizer.encode("candidates:", add_special_tokens=False).ids
    # Frequent pieces only (Unigram vocabularies list pieces by score): every id is seen often
    # enough that the copying skill, not each id's embedding, is what limits the loss.
    low, high = len(SPECIAL_TOKENS), min(len(tokenizer), len(SPECIAL_TOKENS) + 400)
    pairs = []
    for _ in range(count):
        span = [rng.randrange(low, high) for _ in range(rng.randint(3, 24))]
        pairs.append((prefix + span + middle + span + [1], span + [1]))
    return pairs


def _text_pairs(tokenizer, items: list[Example], copy: bool) -> list[tuple[list[int], list[int]]]:
    """Inputs as the runtime encodes them (`tokens.encode_requests`): a long one has its candidates
    cut evenly to MAX_INPUT_TOKENS, and one whose source alone is longer, or whose target is longer
    than the corrector writes, is left out."""
    return [pair for pair in _encoded(tokenizer, items, copy) if pair is not None]


def _encoded(tokenizer, items: list[Example], copy: bool) -> list[tuple[list[int], list[int]] | None]:
    """(input ids, labels) of each item, or None for one the runtime would refuse: its source alone
    longer than MAX_INPUT_TOKENS, or empty (noise can drop a one-word sentence's only word); or None
    where the labels are longer than MAX_TARGET_TOKENS: cut, they would end without EOS and teach the
    model never to stop."""
    if not items:
        return []
    enc = _read(tokenizer, [Example(e.source, [e.target], e.target) for e in items] if copy else items)
    # As targets: mBART's start with the target language's code, not the source's.
    dec = tokenizer(text_target=[e.target for e in items], truncation=False, verbose=False)["input_ids"]
    return [None if isinstance(x, InputError) or len(y) > MAX_TARGET_TOKENS else (x.ids.tolist(), y)
            for x, y in zip(enc, dec)]


@functools.lru_cache(maxsize=4)
def _untruncated(tokenizer):
    """The tokenizer's Rust tokenizer as the runtime reads with it (`tokens.load_tokenizer`): never
    truncating or padding, whatever the checkpoint saved or the last `tokenizer(...)` call set."""
    return reading_whole(copy.deepcopy(tokenizer.backend_tokenizer))


def _batches(tokenizer, stream, copying, settings: Settings, rng: random.Random):
    """Length-bucketed batches of at most `tokens_per_batch` padded input tokens.

    During the copy warm-up, half the pools are copies of random ids, half copies of sentences.
    """
    while True:
        warm = copying()
        if warm and rng.random() < 0.5:
            kind, pairs = "random-copy", _random_copies(tokenizer, rng, 512)
        else:
            copy = warm or rng.random() < settings.copy_share_after
            kind, pairs = ("copy" if copy else "correct"), _text_pairs(tokenizer, [next(stream) for _ in range(512)], copy)
        pairs.sort(key=lambda p: len(p[0]))
        chunks, start = [], 0
        while start < len(pairs):
            size = 1
            while start + size < len(pairs) and (size + 1) * len(pairs[start + size][0]) <= settings.tokens_per_batch:
                size += 1
            chunks.append(pairs[start : start + size])
            start += size
        rng.shuffle(chunks)
        for chunk in chunks:
            yield kind, _tensors(chunk, tokenizer.pad_token_id)


def evaluate(model, tokenizer, examples: list[Example], batch_size: int = 50, no_repeat_ngram_size: int = 0,
             progress: Callable[[int], None] | None = None) -> dict:
    """Greedy outputs' scores against the targets, the inputs read and decoded as the bundle reads and
    decodes them: candidates cut evenly (`tokens.encode_requests`), and of the checkpoint's generation
    settings only those lmcor applies (a fine-tuned checkpoint's min_length or repetition_penalty
    would choose the weights and the n-gram ban on outputs the bundle never writes). An input the
    runtime refuses scores as an empty output. `progress` is called with each chunk's count."""
    import torch
    from lmcor.bench.quality import score
    from transformers import GenerationConfig

    given = model.generation_config
    settings = GenerationConfig(**{name: getattr(given, name) for name in _APPLIED if getattr(given, name) is not None},
                                max_new_tokens=MAX_TARGET_TOKENS, num_beams=1, do_sample=False,
                                no_repeat_ngram_size=no_repeat_ngram_size)
    pad = tokenizer.pad_token_id
    outputs = []
    model.eval()
    model.generation_config = settings  # replaced: transformers fills a given config's default values from the model's
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                read = [None if isinstance(e, InputError) else e.ids.tolist()
                        for e in _read(tokenizer, examples[i : i + batch_size])]
                rows = [row for row in read if row is not None]
                if rows:
                    width = max(map(len, rows))
                    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
                    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
                    written = iter(tokenizer.batch_decode(model.generate(input_ids=ids, attention_mask=mask),
                                                          skip_special_tokens=True))
                outputs += ["" if row is None else next(written) for row in read]
                if progress is not None:
                    progress(len(read))
    finally:
        model.generation_config = given
    model.train()
    return {**score(outputs, [e.target for e in examples]), "sample": outputs[0]}


# The generation settings lmcor's runtime applies (the bundle's special tokens); the others it does not.
_APPLIED = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
            "forced_eos_token_id")


def _read(tokenizer, items: list[Example]) -> list:
    """Each item's model input as the runtime encodes it, or the InputError it refuses it with."""
    requests = []
    for e in items:
        try:
            requests.append(Request(e.source, tuple(e.candidates)))
        except InputError as error:
            requests.append(error)
    usable = [r for r in requests if not isinstance(r, InputError)]
    encoded = iter(encode_requests(_untruncated(tokenizer), TEMPLATE, usable, MAX_INPUT_TOKENS) if usable else ())
    return [r if isinstance(r, InputError) else next(encoded) for r in requests]


def train(out: Path, minutes: float, settings: Settings = Settings(), resume: bool = False,
          eval_minutes: float = 10.0, device: str = "cpu", llm_share: float = 0.4, init: Path | None = None,
          join: float = 0.0, related: float = 0.0) -> Path:
    """The default corrector: corpus sentences with synthetic candidates, mixed with a real LLM's.

    From scratch (tokenizer, copy initialization, copy warm-up), or continued from `init`, a
    Hugging Face folder written by an earlier run (its tokenizer is kept). A `join` share of the
    synthetic examples are sentences in a row, a `related` share of those a sentence and another
    sharing a word's stem (`data.endless`); the dev examples then hold as many pairs of dev
    sentences, so that model selection sees long inputs too."""
    out.mkdir(parents=True, exist_ok=True)
    splits = data.build(out, seed=settings.seed)
    llm = {name: _llm_examples(name) for name in ("train", "dev")}
    if not llm["train"]:
        llm_share = 0.0
        log.warning("no %s: training on synthetic candidates only (see recipes.llm_splits)", LLM_SPLITS / "llm-train.jsonl")
    from transformers import PreTrainedTokenizerFast

    if init is None:
        tokenizer_dir = out / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").is_file():
            train_tokenizer(splits["train"], settings.vocab_size).save_pretrained(tokenizer_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        model = build_model(settings, len(tokenizer))
        copy_init(model, settings.seed)
    else:
        from transformers import T5ForConditionalGeneration

        try:  # a user's folder: whatever fails to read in it is said, not a traceback
            tokenizer = PreTrainedTokenizerFast.from_pretrained(init)
            model = T5ForConditionalGeneration.from_pretrained(init)
        except Exception as e:
            raise InputError(f"--init {init}: cannot be loaded ({type(e).__name__}: {e})") from None
    synthetic_dev = data.examples(splits["dev"], settings.seed + 1)
    pairs = [data.joined(splits["dev"][n : n + 2])[0] for n in range(0, len(splits["dev"]) - 1, 2)]
    joined_dev = data.examples(pairs[: int(join * len(synthetic_dev))], settings.seed + 2)
    dev = _interleaved(synthetic_dev, llm["dev"], joined_dev)
    return fit(out, minutes, settings, model=model, tokenizer=tokenizer,
               examples=lambda step: _mixture(splits["train"], llm["train"], llm_share, settings.seed + step, join,
                                                  related),
               dev=dev, copy_warmup=init is None, resume=resume, eval_minutes=eval_minutes, device=device)


def _interleaved(*lists: list[Example]) -> list[Example]:
    """Every item of `lists`, taking one of each in turn (the first 200 are the watched dev examples)."""
    longest = max(len(items) for items in lists)
    return [items[n] for n in range(longest) for items in lists if n < len(items)]


LLM_SPLITS = Path(__file__).parent / "splits"


def _llm_examples(name: str) -> list[Example]:
    path = LLM_SPLITS / f"llm-{name}.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Example(r["source"], r["candidates"], r["target"]) for r in rows]


def _mixture(sentences: list[str], llm: list[Example], llm_share: float, seed: int, join: float = 0.0,
             related: float = 0.0):
    """Endless examples: a `llm_share` of the LLM's (cycled), the rest synthetic over `sentences`
    with a candidate model drawn per example (a `join` share of them sentences in a row, `related`
    as `data.endless` says)."""
    rng = random.Random(seed)
    own = iter(())
    synthetic = data.endless(sentences, seed, model=noise.mixture(), pool=sentences, join=join,
                              related=related)
    order = list(llm)
    while True:
        if order and rng.random() < llm_share:
            example = next(own, None)
            if example is None:
                rng.shuffle(order)
                own = iter(order)
                example = next(own)
            yield _shuffled_samples(example, rng)
        else:
            yield next(synthetic)


def _shuffled_samples(example: Example, rng: random.Random) -> Example:
    """The example with its sampled candidates (all but the first, greedy one) in a random order:
    the LLM's examples are few and cycled many times, and the samples' order carries nothing."""
    samples = list(example.candidates[1:])
    rng.shuffle(samples)
    return Example(example.source, [*example.candidates[:1], *samples], example.target)


def fit(out: Path, minutes: float, settings: Settings, *, model, tokenizer, examples, dev: list[Example],
        copy_warmup: bool, resume: bool = False, eval_minutes: float = 10.0, device: str = "cpu",
        show_progress: bool = True) -> Path:
    """Train `model` on `examples(step)` (an endless stream of Examples, started at a step) for
    `minutes`, keeping the checkpoint with the best dev chrF; returns the Hugging Face folder.

    `copy_warmup` starts with the copy tasks (a model from scratch, with `copy_init`); a
    pretrained model goes straight to correcting. Checkpoints every 5 minutes; `resume`
    continues from `out/checkpoint.pt`. `show_progress`: a bar of the training time on stderr."""
    import torch
    from lmcor.cli import STDERR
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    # fp32 weights whatever the checkpoint was saved in (transformers 5 loads bf16 as bf16): AdamW's
    # small updates vanish in half-precision weights.
    model = model.to(device=device, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01)
    state = {"step": 0, "elapsed": 0.0, "copying": copy_warmup, "ema": {}}
    checkpoint = out / "checkpoint.pt"
    if not (resume and checkpoint.is_file()):  # a fresh start: an earlier run's best weights are not this one's
        (out / "best.pt").unlink(missing_ok=True)
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError:  # its tensors' names or shapes differ
            raise InputError(f"{checkpoint}: a run of another model (another --size or --init); restart it "
                             "(--restart) or train into another folder") from None
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log.info("resumed at step %d (%.1f min)", state["step"], state["elapsed"] / 60)
    budget = minutes * 60
    if state.setdefault("budget", budget) != budget:
        # A resumed run given another --minutes moves the schedule: warmed up again from here, the
        # learning rate does not jump (from the end of a decay back to its peak, for one).
        state.update(budget=budget, warm_from=state["step"])
        log.info("--minutes changed: the learning rate warms up again over %d steps", settings.warmup_steps)
    rng = random.Random(settings.seed + state["step"])
    torch.manual_seed(settings.seed + state["step"])  # the decoder slips' draws (a model from --init skips build_model's)
    batches = _batches(tokenizer, examples(state["step"]), lambda: state["copying"], settings, rng)
    watch = dev[:200]  # scored every eval_minutes: enough to see progress, cheap enough to repeat
    started = time.time() - state["elapsed"]
    last_save, last_eval = time.time(), time.time()
    history = out / "train_log.jsonl"
    # Since the last record: when it began, the seconds spent waiting for data, the steps taken.
    since, waited, steps = time.perf_counter(), 0.0, 0
    model.train()
    bar = tqdm(total=round(budget), initial=min(round(state["elapsed"]), round(budget)), unit="s", desc="training",
               file=STDERR, disable=not show_progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s "
               "[{elapsed}<{remaining}{postfix}]")
    try:
        while (elapsed := time.time() - started) < budget:
            bar.update(max(0, min(round(elapsed), bar.total) - bar.n))
            progress = elapsed / budget
            scale = min(1.0, (state["step"] + 1 - state.get("warm_from", 0)) / settings.warmup_steps)
            if progress > settings.decay_from:
                tail = (progress - settings.decay_from) / (1.0 - settings.decay_from)
                scale *= 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * tail))
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * scale
            waiting = time.perf_counter()
            kind, (ids, mask, labels) = next(batches)
            waited += time.perf_counter() - waiting
            steps += 1
            noise = 0.0 if state["copying"] else settings.decoder_noise
            decoder_ids = _slipped(model.prepare_decoder_input_ids_from_labels(labels=labels), noise, tokenizer.pad_token_id,
                                   tokenizer.eos_token_id)
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), decoder_input_ids=decoder_ids.to(device),
                         labels=labels.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            value = loss.item()
            if state["step"] % 10 == 0:
                bar.set_postfix_str(f"step {state['step']}, loss {value:.3f}", refresh=False)
            ema = state["ema"]
            ema[kind] = value if kind not in ema else 0.95 * ema[kind] + 0.05 * value
            if state["copying"] and state["step"] > 100 and ema.get("copy", math.inf) < settings.copy_until_loss:
                state["copying"] = False
                log.info("copy warm-up done at step %d (sentence copy loss %.3f)", state["step"], ema["copy"])
            if state["step"] % 50 == 0:
                seconds = time.perf_counter() - since
                _append(history, {"step": state["step"], "minutes": round(elapsed / 60, 2), "loss": round(value, 4),
                                  "ema": {k: round(v, 3) for k, v in ema.items()}, "lr": settings.lr * scale,
                                  "steps_per_s": round(steps / seconds, 2), "data_share": round(waited / seconds, 3)})
                since, waited, steps = time.perf_counter(), 0.0, 0
            if time.time() - last_eval > eval_minutes * 60:
                scores = evaluate(model, tokenizer, watch)
                _append(history, {"step": state["step"], "minutes": round(elapsed / 60, 2), "dev": scores})
                log.info("step %d: dev chrF %.2f exact %.1f", state["step"], scores["chrf"], scores["exact_match"])
                # Free-running quality can fall while the teacher-forced loss still improves: keep the best.
                if scores["chrf"] > state.get("best_chrf", -1.0):
                    _save_whole(out / "best.pt", model.state_dict())  # a signal mid-write leaves the former best
                    state["best_chrf"] = scores["chrf"]
                last_eval = time.time()
                since, waited, steps = time.perf_counter(), 0.0, 0  # the scoring is not a step
            if time.time() - last_save > 300:
                state["elapsed"] = time.time() - started
                _save(checkpoint, model, optimizer, state)
                last_save = time.time()
    except KeyboardInterrupt:  # the step reached is kept: the same command continues from it
        bar.close()
        state["elapsed"] = time.time() - started
        if not state["step"]:  # no checkpoint: one is a run that trained (train-corrector keeps its split for it)
            log.warning("interrupted before the first training step: nothing to save; run the same command to start")
            raise
        _save(checkpoint, model, optimizer, state)
        log.warning("interrupted at step %d (%.1f of %.1f min): checkpoint saved in %s; run the same command to "
                    "continue", state["step"], state["elapsed"] / 60, minutes, checkpoint)
        raise
    bar.close()
    state["elapsed"] = time.time() - started
    if state["step"] == 0:  # before any scoring: an untrained model is not worth its minutes, nor a checkpoint
        raise InputError(f"--minutes {minutes:g} ran out before the first training step: an untrained corrector "
                         "is not exported; give more --minutes")
    _save(checkpoint, model, optimizer, state)
    try:
        with tqdm(total=len(dev) * (3 + (out / "best.pt").is_file()), unit=" outputs", desc="scoring on dev",
                  file=STDERR, disable=not show_progress) as scoring:
            scores = _chosen(model, tokenizer, dev, out / "best.pt", device, scoring.update)
    except KeyboardInterrupt:  # a run again scores again, straight after the saved training
        log.warning("interrupted while scoring the weights on dev (training is done and saved in %s); run the same "
                    "command to continue", checkpoint)
        raise
    hf_dir = out / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    _append(history, {"step": state["step"], "minutes": round(state["elapsed"] / 60, 2), "final_dev": scores})
    log.info("done: %d steps in %.1f min, dev chrF %.2f exact %.1f (no_repeat_ngram_size %d)", state["step"],
             state["elapsed"] / 60, scores["chrf"], scores["exact_match"], model.generation_config.no_repeat_ngram_size)
    return hf_dir


def _chosen(model, tokenizer, dev: list[Example], best: Path, device: str,
            progress: Callable[[int], None] | None = None) -> dict:
    """Leaves `model` with the last weights or the watch's best, whichever scores higher on the whole
    dev split (200 examples choose between checkpoints a few tenths of chrF apart by chance), and
    its n-gram ban; returns their dev scores. `progress`: called with the outputs written."""
    import torch

    log.info("scoring the last and the best weights on the %d dev examples, then n-gram bans", len(dev))
    scores = evaluate(model, tokenizer, dev, progress=progress)
    try:
        weights = torch.load(best, map_location=device) if best.is_file() else None
    except Exception as e:  # torch's own errors for a file it cannot read (one torn by an earlier lmcor)
        log.warning("%s cannot be read (%s): the last weights are kept", best, str(e).splitlines()[0] if str(e) else e)
        weights = None
    if weights is not None:
        last = {name: value.clone() for name, value in model.state_dict().items()}
        model.load_state_dict(weights)
        scores_of_best = evaluate(model, tokenizer, dev, progress=progress)
        if scores_of_best["chrf"] > scores["chrf"]:
            scores = scores_of_best
        else:
            model.load_state_dict(last)
    model.generation_config.no_repeat_ngram_size, scores = choose_no_repeat(model, tokenizer, dev, without=scores,
                                                                            progress=progress)
    return scores


def choose_no_repeat(model, tokenizer, dev: list[Example], without: dict | None = None,
                     progress: Callable[[int], None] | None = None) -> tuple[int, dict]:
    """The n-gram ban (transformers' no_repeat_ngram_size; 0: none) that scores best on the whole dev
    split, and its dev scores (`without`: the scores with none, where already known). A copying model
    that loses its place can loop; banning repeated n-grams ends the loop."""
    scores = {n: without if n == 0 and without is not None else
              evaluate(model, tokenizer, dev, no_repeat_ngram_size=n, progress=progress) for n in (0, 3, 4)}
    best = max(scores, key=lambda n: (scores[n]["chrf"], -n))
    log.info("dev chrF by no_repeat_ngram_size: %s -> %d", {n: round(v["chrf"], 2) for n, v in scores.items()}, best)
    return best, scores[best]


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _save(path: Path, model, optimizer, state: dict) -> None:
    _save_whole(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state})


def _save_whole(path: Path, value) -> None:
    """`torch.save` into a temporary file renamed over `path`: never half a file at `path`."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(path)


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share from 0 to 1, got {text}")
    return value


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcor.recipes.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/default-corrector"), help="(default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=170.0, help="training time budget (default: %(default)s)")
    parser.add_argument("--restart", action="store_true",
                        help="train from the start instead of continuing OUT's checkpoint (the default)")
    parser.add_argument("--device", default="cpu", help="PyTorch's device: cpu, cuda, cuda:1... (default: %(default)s)")
    parser.add_argument("--llm-share", type=_share, default=0.4, help="share of examples with the real LLM's candidates")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this Hugging Face folder (an earlier run's hf/) instead of from scratch")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {Settings.lr:g}; 3e-4 with --init)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: all cores)")
    parser.add_argument("--join", type=_share, default=0.0,
                        help="share of synthetic examples made of two or three sentences in a row (long inputs)")
    parser.add_argument("--related", type=_share, default=0.0,
                        help="share of those joined examples that pair a sentence with another sharing a word's "
                             "stem (the same pieces recur, followed by others)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if not 0 < args.minutes < math.inf:
        raise InputError(f"--minutes must be a number of minutes above 0, got {args.minutes}")
    from .corrector import _check_device, _check_init

    _check_device(args.device)
    if args.init is not None:  # a local T5 folder, checked before the data and tokenizer work
        kind = _check_init(args.init)
        if kind not in ("t5", "mt5"):
            raise InputError(f"--init {args.init}: a {kind!r} checkpoint; this recipe continues T5 models "
                             "(`lmcor train-corrector --init` fine-tunes other seq2seq models)")
    # Calibrated on the dev splits there are (without recipes.llm_splits' files: the synthetic one).
    calibration = [args.out / "dev.jsonl", args.out / "dev-independent.jsonl",
                   *(path for path in [LLM_SPLITS / "llm-dev.jsonl"] if path.is_file())]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    np.random.seed(0)
    lr = args.lr if args.lr is not None else (3e-4 if args.init else Settings.lr)
    from lmcor.cli.lines import EXIT_SIGNAL
    from lmcor.cli.signals import sigterm_as_interrupt

    with sigterm_as_interrupt() as terminated:  # as Ctrl-C: the training keeps the step it reached
        try:
            hf_dir = train(args.out, args.minutes, Settings(lr=lr), resume=not args.restart, device=args.device,
                           llm_share=args.llm_share, init=args.init, join=args.join, related=args.related)
            from lmcor.export import export_corrector

            export_corrector(hf_dir, args.out / "bundle", max_output_tokens=MAX_TARGET_TOKENS, overwrite=True)
            log.info("exported %s", args.out / "bundle")
            fallback.calibrate_bundle(args.out / "bundle", calibration)
        except KeyboardInterrupt:
            if terminated:
                return EXIT_SIGNAL[signal.SIGTERM]
            raise  # Ctrl-C: 130, as every command
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
