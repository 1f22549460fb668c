"""`Generator`: a loaded decoder-only LM bundle (students, weak models with distilled rules, the LLM
that writes a corrector's candidates).

prompts -> tokens -> left-padded batches -> prompt pass -> one token per step with the KV cache
-> text. Position ids are explicit (the count of real tokens before each one), so left padding
changes nothing, and a shared prefix (a rules prompt, few-shot examples) is run once: its keys
and values are copied into every batch in front of the prompts' own tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Manifest, load_manifest
from .tokens import load_tokenizer
from .errors import InputError
from .options import (MAX_BATCH_SIZE, check_int, check_items, check_max_new_tokens, check_number, check_optional,
                      check_progress, check_temperature, check_text)
from .sessions import check_graphs, open_session


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (the argmax); otherwise softmax(logits / temperature), cut to the
    smallest set of tokens whose probability reaches `top_p`, drawn with a generator seeded by `seed`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


class Prefix:
    """A shared prompt prefix, run once: its token ids and every layer's keys and values (batch 1)."""

    def __init__(self, ids: list[int], past: list[np.ndarray]):
        self.ids, self.past = ids, past


class Generator:
    def __init__(self, root: Path, manifest: Manifest, tokenizer, session):
        self.root, self.manifest, self.tokenizer, self.session = root, manifest, tokenizer, session
        self._past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self._inputs = {i.name for i in session.get_inputs()}

    @classmethod
    def load(cls, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
             verify: bool = True) -> "Generator":
        root = Path(path)
        manifest = load_manifest(root, verify=verify, kind="causal-lm")
        session = open_session(root / manifest.files["model"], providers=providers, threads=threads)
        check_graphs(root, manifest, {"model": session})
        return cls(root, manifest, load_tokenizer(root / manifest.files["tokenizer"], manifest.special_tokens), session)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, as the checkpoint's tokenizer writes them (its BOS included)."""
        return self.tokenizer.encode(text).ids

    def prefix(self, text: str) -> Prefix:
        """Run a shared prefix once; pass the result as `prefix=` to reuse it."""
        _check_prompt("text (the prefix)", text)
        ids = self.encode(text)
        positions = self.manifest.max_input_tokens
        if not 0 < len(ids) < positions:  # prompts and outputs need room after it
            raise InputError(f"text (the prefix): {len(ids)} tokens; a prefix takes 1 to {positions - 1} of the "
                             f"model's {positions} positions")
        _, past = self._run(np.array([ids]), np.ones((1, len(ids)), dtype=np.int64),
                            np.arange(len(ids))[None, :], self._empty(1))
        return Prefix(ids, past)

    def generate(self, prompt: str, **options: Any) -> str:
        return self.generate_batch([prompt], **options)[0].text

    def generate_batch(self, prompts: Iterable[str], *, max_new_tokens: int | None = None, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None, prefix: Prefix | None = None, batch_size: int = 8,
                       progress: Callable[[int], None] | None = None) -> list[Generation]:
        """Continue each prompt (after `prefix`, when given); greedy by default.

        Options are checked first (`InputError` naming the bad one): `max_new_tokens` is at most the
        bundle's `max_output_tokens`, `batch_size` at most `options.MAX_BATCH_SIZE`, `temperature` 0
        or from 0.001 to 100, `top_p` above 0 and at most 1, `seed` None or an integer >= 0. Each
        prompt, after the prefix, with its new tokens must fit the model's `max_input_tokens` positions.
        """
        limit = check_max_new_tokens(max_new_tokens, self.manifest.max_output_tokens)
        sampling = Sampling(check_temperature(temperature), check_number("top_p", top_p, 0, 1, above_low=True),
                            None if seed is None else check_int("seed", seed, 0))
        check_optional("prefix", prefix, Prefix, "a Prefix (from Generator.prefix)")
        batch_size = check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        check_progress(progress)
        prompts = check_items("prompts", prompts, "strings")
        for n, prompt in enumerate(prompts):
            _check_prompt(f"item {n}: a prompt", prompt)
        rng = np.random.default_rng(sampling.seed)
        encoded = [self.tokenizer.encode(p, add_special_tokens=prefix is None).ids for p in prompts]
        offset = len(prefix.ids) if prefix is not None else 0
        positions = self.manifest.max_input_tokens
        for n, ids in enumerate(encoded):
            needed = offset + len(ids) + limit - 1  # the last new token is never fed back
            if not ids:
                raise InputError(f"item {n}: the prompt has no tokens (this tokenizer drops all of it)")
            if needed > positions:
                after = f" after a prefix of {offset}" if offset else ""
                raise InputError(f"item {n}: the prompt's {len(ids)} tokens{after} and max_new_tokens={limit} need "
                                 f"{needed} of the model's {positions} positions; shorten it or lower max_new_tokens")
        out: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(prompts), batch_size):
            rows = list(range(start, min(start + batch_size, len(prompts))))
            tokens = self._generate([encoded[i] for i in rows], limit, sampling, rng, prefix)
            for i, row in zip(rows, tokens):
                out[i] = Generation(self.tokenizer.decode(row, skip_special_tokens=True), row)
            if progress is not None:
                progress(len(rows))
        return out  # type: ignore[return-value]

    def _empty(self, batch: int) -> list[np.ndarray]:
        shape = self.manifest.decoder
        return [np.zeros((batch, shape.num_heads, 0, shape.head_dim), dtype=np.float32) for _ in self._past]

    def _run(self, ids, mask, positions, past) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **dict(zip(self._past, past))}
        if "position_ids" in self._inputs:
            feed["position_ids"] = positions.astype(np.int64)
        logits, *presents = self.session.run(None, feed)
        return logits, presents

    def _generate(self, prompts: list[list[int]], limit: int, sampling: Sampling, rng, prefix: Prefix | None):
        special = self.manifest.special_tokens
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((batch, width), special.pad, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for r, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[r, width - len(p) :] = p
            mask[r, width - len(p) :] = 1
        offset = len(prefix.ids) if prefix is not None else 0
        positions = offset + np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        if prefix is not None:
            past = [np.repeat(p, batch, axis=0) for p in prefix.past]
            mask = np.concatenate([np.ones((batch, offset), dtype=np.int64), mask], axis=1)
        else:
            past = self._empty(batch)
        logits, past = self._run(ids, mask, positions, past)
        out = np.zeros((batch, 0), dtype=np.int64)
        running = np.ones(batch, dtype=bool)
        next_position = positions[:, -1] + 1
        for _ in range(limit):
            token = np.where(running, _choose(logits[:, -1, :], sampling, rng), special.pad)
            out = np.concatenate([out, token[:, None]], axis=1)
            running &= token != special.eos
            if not running.any() or out.shape[1] == limit:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits, past = self._run(token[:, None], mask, next_position[:, None], past)
            next_position = next_position + 1
        rows = [row.tolist() for row in out]
        return [row[: row.index(special.eos)] if special.eos in row else row for row in rows]


def _check_prompt(where: str, prompt: Any) -> None:
    if not isinstance(prompt, str) or not prompt:
        raise InputError(f"{where} must be a non-empty string")
    check_text(where, prompt)


def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    if sampling.temperature <= 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        keep = np.cumsum(sorted_probs, axis=-1) - sorted_probs < sampling.top_p  # the top token always stays
        cut = np.zeros_like(probs)
        np.put_along_axis(cut, order, np.where(keep, sorted_probs, 0.0), axis=-1)
        probs = cut / cut.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])
