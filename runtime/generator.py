"""`Generator`: a loaded decoder-only LM bundle (students, weak models with distilled rules, the LLM
that writes a corrector's candidates).

prompts -> tokens -> left-padded batches -> prompt pass -> one token per step with the KV cache
-> text. Position ids are explicit (the count of real tokens before each one), so left padding
changes nothing, and a shared prefix (a rules prompt, few-shot examples) is run once: its keys
and values are copied into every batch in front of the prompts' own tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .bundle import Manifest, bundle_path, load_manifest
from .drafts import Drafts
from .tokens import check_vocabulary, load_tokenizer
from .errors import InputError
from .jsonl import json_kind
from .options import (ERRORS, MAX_BATCH_SIZE, check_choice, check_flag, check_int, check_items, check_max_new_tokens,
                      check_number, check_progress, check_stops, check_string, check_temperature, check_text,
                      check_words)
from .sessions import check_graphs, open_session, raised_by_onnxruntime, run
from .spacing import cleaned_up

# Every drafted position runs through all the layers, and at batch 16 a 135M model on a CPU is
# nearly compute-bound: on SmolLM2's few-shot answers, drafts of 4 gave 1.6x the tokens/s of
# none, 8 only 1.1x (`lmcor bench --candidates`).
MAX_DRAFT = 4


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (the argmax); otherwise softmax(logits / temperature), cut to the
    smallest set of tokens whose probability reaches `top_p`, drawn with each row's own generator."""

    temperature: float = 0.0
    top_p: float = 1.0


class ScoresNotFinite(ArithmeticError):
    """A row's scores a sample cannot be drawn from: it fails alone, as a prompt ONNX Runtime fails on."""


class Prefix:
    """A shared prompt prefix, run once: its token ids and every layer's keys and values (batch 1),
    and the white space it ended with, which goes before each prompt instead (`Generator.prefix`);
    `model` names the model that ran it (its keys and values are that model's alone)."""

    def __init__(self, ids: list[int], past: list[np.ndarray], gap: str = "", model: str = "", text: str = ""):
        self.ids, self.past, self.gap, self.model, self.text = ids, past, gap, model, text


class Generator:
    def __init__(self, root: Path, manifest: Manifest, tokenizer, session):
        self.root, self.manifest, self.tokenizer, self.session = root, manifest, tokenizer, session
        self._past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self._inputs = {i.name for i in session.get_inputs()}

    @classmethod
    def load(cls, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
             verify: bool = True) -> "Generator":
        root = bundle_path(path)
        manifest = load_manifest(root, verify=verify, kind="causal-lm")
        session = open_session(root / manifest.files["model"], providers=providers, threads=threads)
        check_graphs(root, manifest, {"model": session})
        return cls(root, manifest, load_tokenizer(root / manifest.files["tokenizer"], manifest.special_tokens,
                                                          manifest.decoder.vocab_size), session)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, as the checkpoint's tokenizer writes them (its BOS included)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {json_kind(text)}")
        check_text("text", text)
        return self.tokenizer.encode(text).ids

    def next_logits(self, ids: Sequence[int]) -> np.ndarray:
        """The model's logits (fp32, one per vocabulary entry) for the token after `ids`, run alone."""
        ids = check_items("ids", ids, "token ids")
        if not ids:
            raise InputError("ids is empty: give the token ids of a prompt (Generator.encode writes them)")
        vocabulary = self.manifest.decoder.vocab_size
        ids = [check_int(f"ids[{n}]", i, 0, vocabulary - 1, most_is=" (the model's vocabulary)") for n, i in enumerate(ids)]
        if len(ids) > self.manifest.max_input_tokens:
            raise InputError(f"ids has {len(ids)} tokens, more than the model's {self.manifest.max_input_tokens} positions")
        row = np.asarray([ids], dtype=np.int64)
        logits, _ = self._run(row, np.ones_like(row), np.arange(row.shape[1])[None], self._empty(1))
        return logits[0, -1]

    def prefix(self, text: str) -> Prefix:
        """Run a shared prefix once; pass the result as `prefix=` to reuse it."""
        check_string("text (the prefix)", text)
        # Trailing white space goes with each prompt: run apart, "Rules: " + "Fix" would be tokenized
        # "Rules:", " ", "Fix", where the whole text has "Rules:", " Fix".
        shared = text.rstrip() or text
        ids = self.encode(shared)
        check_vocabulary(self.tokenizer, ids, self.manifest.decoder.vocab_size)
        positions = self.manifest.max_input_tokens
        if not 0 < len(ids) < positions:  # prompts and outputs need room after it
            raise InputError(f"text (the prefix) has {len(ids)} tokens; it must take 1 to {positions - 1} of the "
                             f"model's {positions} positions")
        _, past = self._run(np.array([ids]), np.ones((1, len(ids)), dtype=np.int64),
                            np.arange(len(ids))[None, :], self._empty(1))
        return Prefix(ids, past, text[len(shared) :], self._identity, shared)

    @property
    def _identity(self) -> str:
        """The model, as a prefix records it: its graph's digest, else its bundle's path."""
        return self.manifest.sha256.get(self.manifest.files["model"]) or str(self.root.resolve())

    def generate(self, prompt: str, **options: Any) -> str:
        """Continue one prompt; options as for `generate_batch` (a bad prompt raises its `InputError`,
        whatever `errors` says)."""
        [answer] = self.generate_batch([prompt], **options)
        if isinstance(answer, InputError):  # errors="return"
            raise answer
        return answer.text

    def generate_batch(self, prompts: Iterable[str], *, max_new_tokens: int | None = None, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | Sequence[int] | None = None,
                       prefix: Prefix | Sequence[Prefix | None] | None = None,
                       stop: Sequence[str] = (), batch_size: int = 8, drafts: bool = True,
                       errors: Literal["raise", "return"] = "raise",
                       progress: Callable[[int], None] | None = None) -> list[Generation | InputError]:
        """Continue each prompt (after `prefix`, when given: one for all, or one per prompt, None for a
        prompt without one, so that prompts after different prefixes still share a batch); greedy by
        default.

        A row samples with its own generator, seeded by `seed` and the row's index (or by `seed[n]`
        when `seed` is a sequence, one per prompt), so a prompt's sample does not depend on the
        batch it ran in. A row ends at EOS, after `max_new_tokens`, or once its text contains one of
        the `stop` strings (the text is cut before it; `token_ids` keep the token that completed
        it). Finished rows leave the batch, so a long answer costs only its own steps. Greedy rows
        with `drafts` copy likely continuations from their own prompt and verify them in the same
        decoder call (the answers are the same; an answer that repeats its prompt takes fewer calls).

        Options are checked first (`InputError` naming the bad one): `max_new_tokens` is at most the
        bundle's `max_output_tokens`, `batch_size` at most `options.MAX_BATCH_SIZE`, `temperature` 0
        or from 0.001 to 100, `top_p` above 0 and at most 1, seeds integers >= 0. Each prompt, after
        the prefix, with its new tokens must fit the model's `max_input_tokens` positions: without
        `max_new_tokens`, a prompt gets as many new tokens as fit (at most `max_output_tokens`); with
        it, or where not one fits, a prompt raises, or with `errors="return"` yields its
        `InputError` in its place; so does a prompt the model itself fails on (a batch ONNX Runtime
        fails on runs again prompt by prompt).
        """
        limit = check_max_new_tokens(max_new_tokens, self.manifest.max_output_tokens)
        sampling = Sampling(check_temperature(temperature), check_number("top_p", top_p, 0, 1, above_low=True))
        prompts = check_items("prompts", prompts, "strings")
        prefixes = _row_prefixes(prefix, len(prompts))
        if any(p is not None and p.model != self._identity for p in prefixes):
            raise InputError("prefix: made by another model's Generator.prefix; a prefix's keys and values are its own "
                             "model's: make it with this one")
        batch_size = check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        check_choice("errors", errors, ERRORS)
        check_progress(progress)
        drafts = check_flag("drafts", drafts)
        stops = check_stops(stop)
        seeds = _row_seeds(seed, len(prompts))
        out: list[Generation | InputError | None] = [None] * len(prompts)
        encoded: dict[int, list[int]] = {}
        limits: dict[int, int] = {}
        for n, prompt in enumerate(prompts):
            try:
                encoded[n], limits[n], prefixes[n] = self._encode_prompt(prompt, prefixes[n], limit,
                                                                         fit=max_new_tokens is None)
            except InputError as e:
                if errors == "raise":
                    raise InputError(f"item {n}: {e}") from None
                out[n] = e
        if progress is not None and len(encoded) < len(prompts):  # so that a bar reaches its end
            progress(len(prompts) - len(encoded))

        def run_rows(rows: list[int]) -> list[tuple[str, list[int]]]:
            return self._generate([encoded[n] for n in rows], [limits[n] for n in rows], sampling,
                                  [seeds[n] for n in rows], [prefixes[n] for n in rows], stops, drafts)

        for rows in self._batches(list(encoded), encoded, limits, prefixes, batch_size):
            for n, answer in self._answers(rows, run_rows):
                if isinstance(answer, InputError) and errors == "raise":
                    raise InputError(f"item {n}: {answer}") from answer.__cause__
                out[n] = answer
            if progress is not None:
                progress(len(rows))
        return out  # type: ignore[return-value]

    def _answers(self, rows: list[int], run_rows: Callable[[list[int]], list[tuple[str, list[int]]]],
                 ) -> Iterator[tuple[int, Generation | InputError]]:
        """Each row's generation; where the model fails on the batch, each row alone, and a row it fails
        on alone with its error (a row's answer does not depend on its batch)."""
        try:
            generated = run_rows(rows)
        except Exception as e:
            if not (raised_by_onnxruntime(e) or isinstance(e, ScoresNotFinite)):
                raise  # lmcor's own failure: not the prompt's
            if len(rows) > 1:
                for n in rows:
                    yield from self._answers([n], run_rows)
                return
            said = (str(e).strip().splitlines() or [type(e).__name__])[0]
            failed = InputError(f"the model cannot read this prompt ({said[:200]})")
            failed.__cause__ = e
            yield rows[0], failed
            return
        for n, (text, ids) in zip(rows, generated):
            yield n, Generation(text, ids)

    def _encode_prompt(self, prompt: Any, prefix: Prefix | None, limit: int, *,
                       fit: bool) -> tuple[list[int], int, Prefix | None]:
        """A prompt's token ids, its limit of new tokens (`limit`, which must fit the model's positions
        after the prompt, or with `fit`, as many as do) and the prefix they follow (`_prompt_ids`)."""
        check_words("the prompt", prompt)
        given = prefix
        ids, prefix = self._prompt_ids(prompt, prefix)
        whose = "the prefix and prompt's" if given is not None and prefix is None else "the prompt's"  # run whole
        if not ids:
            raise InputError("the prompt has no tokens (this tokenizer drops all of it)")
        check_vocabulary(self.tokenizer, ids, self.manifest.decoder.vocab_size)
        offset = len(prefix.ids) if prefix is not None else 0
        positions = self.manifest.max_input_tokens
        room = positions - offset - len(ids) + 1  # the last new token is never fed back
        if fit and room >= 1:
            return ids, min(limit, room), prefix
        if limit > room:
            after = f" after a prefix of {offset}" if offset else ""
            if fit:
                raise InputError(f"{whose} {len(ids)} tokens{after} leave no room for an answer in the model's "
                                 f"{positions} positions; shorten it")
            raise InputError(f"{whose} {len(ids)} tokens{after} and max_new_tokens={limit} need "
                             f"{offset + len(ids) + limit - 1} of the model's {positions} positions; shorten it or "
                             "lower max_new_tokens")
        return ids, limit, prefix

    def _prompt_ids(self, prompt: str, prefix: Prefix | None) -> tuple[list[int], Prefix | None]:
        """A prompt's token ids and the prefix they follow. After a prefix: the whole text's tokens past
        the prefix's where they start with them (a SentencePiece tokenizer marks a text's start, which
        a prompt tokenized alone would get again); where a token spans the boundary (":▁" after
        "Sentence:"), the whole text's tokens, run without the prefix, since the model reads the
        text as the whole text's tokens. A `Prefix` made without its text: the prompt's own tokens."""
        if prefix is None:
            return self.tokenizer.encode(prompt).ids, None
        if prefix.text:
            whole = self.tokenizer.encode(prefix.text + prefix.gap + prompt).ids
            if whole[: len(prefix.ids)] == prefix.ids and len(whole) > len(prefix.ids):
                return whole[len(prefix.ids) :], prefix
            return whole, None
        return self.tokenizer.encode(prefix.gap + prompt, add_special_tokens=False).ids, prefix

    def _batches(self, rows: list[int], encoded: dict[int, list[int]], limits: dict[int, int],
                 prefixes: list[Prefix | None], batch_size: int) -> Iterator[list[int]]:
        """The prompts `rows` in batches of at most `batch_size`, in order (those that run without their
        prefix, `_prompt_ids`, last and apart). A batch's cache spans its
        longest prefix and prompt and its most new tokens, and that whole width fits the model's
        positions: some graphs size their masks by it (GPT-Neo's). After a prefix, a sliding-window
        model batches prompts of one length only (shortest first): its window counts cache slots, and
        the padding between a prefix and a shorter prompt would take some of them; so does a model
        whose graph takes no positions (MPT's distances are counted in cache slots, padding included)."""
        positions = self.manifest.max_input_tokens
        # A graph that takes no positions may count them in cache slots (MPT's ALiBi) as a window does.
        windowed = self.manifest.sliding_window is not None or "position_ids" not in self._inputs

        def after(n: int) -> bool:
            return prefixes[n] is not None

        batch: list[int] = []
        widths = (0, 0, 0)  # the batch's longest prefix, longest prompt, most new tokens
        for n in sorted(rows, key=lambda n: (not after(n), len(encoded[n]) if windowed and after(n) else 0)):
            own = (len(prefixes[n].ids) if after(n) else 0, len(encoded[n]), limits[n])
            grown = tuple(map(max, widths, own))
            if batch and (len(batch) == batch_size or sum(grown) - 1 > positions or after(n) != after(batch[0])
                          or (windowed and after(n) and len(encoded[batch[0]]) != len(encoded[n]))):
                yield batch
                batch, grown = [], own
            batch.append(n)
            widths = grown
        if batch:
            yield batch

    def _prefix_past(self, prefixes: list[Prefix]) -> tuple[list[np.ndarray], np.ndarray]:
        """Every layer's prefix keys/values for the batch, each row's right-aligned (left padding),
        and the attention mask over them."""
        longest = max(len(p.ids) for p in prefixes)
        mask = np.zeros((len(prefixes), longest), dtype=np.int64)
        if all(p is prefixes[0] for p in prefixes):
            mask[:] = 1
            return [np.repeat(layer, len(prefixes), axis=0) for layer in prefixes[0].past], mask
        past = [np.zeros((len(prefixes), *layer.shape[1:2], longest, *layer.shape[3:]), dtype=layer.dtype)
                for layer in prefixes[0].past]
        for r, prefix in enumerate(prefixes):
            start = longest - len(prefix.ids)
            mask[r, start:] = 1
            for layer, own in zip(past, prefix.past):
                layer[r, :, start:] = own[0]
        return past, mask

    def _empty(self, batch: int) -> list[np.ndarray]:
        shape = self.manifest.decoder
        return [np.zeros((batch, shape.num_heads, 0, shape.head_dim), dtype=np.float32) for _ in self._past]

    def _run(self, ids, mask, positions, past) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **dict(zip(self._past, past))}
        if "position_ids" in self._inputs:
            feed["position_ids"] = positions.astype(np.int64)
        logits, *presents = run(self.session, None, feed)
        return logits, presents

    def _generate(self, prompts: list[list[int]], limits: list[int], sampling: Sampling, seeds: list[int | None],
                  prefixes: list[Prefix | None], stops: tuple[str, ...], drafts: bool) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt's continuation after its prefix.

        Greedy rows with `drafts` verify drafted tokens (copied from the row's own prompt, see
        `drafts.Drafts`) in the call that feeds their last token: a decoder call then yields every
        drafted token the model would have chosen itself, plus one. Rejected drafts stay in the
        cache, masked out; positions are explicit, so they change nothing for the tokens after them.
        """
        special = self.manifest.special_tokens
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((batch, width), special.pad, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for r, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[r, width - len(p) :] = p
            mask[r, width - len(p) :] = 1
        offsets = np.array([len(p.ids) if p is not None else 0 for p in prefixes])
        positions = offsets[:, None] + np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        if prefixes[0] is not None:
            past, before = self._prefix_past(prefixes)
            mask = np.concatenate([before, mask], axis=1)
        else:
            past = self._empty(batch)
        logits, past = self._run(ids, mask, positions, past)
        rngs = [np.random.default_rng(seed) for seed in seeds]
        drafting = (drafts and sampling.temperature <= 0 and "position_ids" in self._inputs
                    and self.manifest.sliding_window is None)
        drafters = [Drafts([np.array(p)], special.eos) for p in prompts] if drafting else []
        tokens: list[list[int]] = [[] for _ in range(batch)]
        stopped: dict[int, str] = {}  # row -> its text, cut before the stop string
        active = np.arange(batch)  # the rows still in the batch, in batch order
        next_position = positions[:, -1] + 1  # of the token each row feeds next
        new = [[int(t)] for t in _choose(logits[:, -1, :], sampling, rngs)]  # each row's tokens from the last call
        while True:
            keep = np.array([self._take(tokens[r], row_new, limits[r], stops, stopped, r)
                             for r, row_new in zip(active.tolist(), new)], dtype=bool)
            if not keep.any():
                break
            if not keep.all():  # finished rows leave the batch: their steps would be wasted work
                active, next_position, mask = active[keep], next_position[keep], mask[keep]
                new = [row for row, kept in zip(new, keep) if kept]
                past = [p[keep] for p in past]
            # Each row feeds its last token (not in the cache yet) and its draft; the last new
            # token of a row is never fed back, so a row drafts at most limit - written - 1.
            # Drafts take only the slots the rows' remaining tokens leave within the positions: a
            # rejected draft keeps its slots.
            slack = self.manifest.max_input_tokens - mask.shape[1] - max(limits[r] - len(tokens[r]) for r in active)
            proposed = [drafters[r].propose(tokens[r], min(MAX_DRAFT, limits[r] - len(tokens[r]) - 1, slack))
                        if drafting else [] for r in active.tolist()]
            span = 1 + max(len(d) for d in proposed)
            feed = np.full((len(active), span), special.pad, dtype=np.int64)
            fed = np.zeros((len(active), span), dtype=np.int64)
            for i, (row, draft) in enumerate(zip(new, proposed)):
                feed[i, : 1 + len(draft)] = [row[-1], *draft]
                fed[i, : 1 + len(draft)] = 1
            mask = np.concatenate([mask, fed], axis=1)
            # A row's padding slots (masked) may lie past the model's last position when another row
            # drafts further: they are fed at it instead.
            fed_positions = np.minimum(next_position[:, None] + np.arange(span), self.manifest.max_input_tokens - 1)
            logits, past = self._run(feed, mask, fed_positions, past)
            if not drafting:
                new = [[int(t)] for t in _choose(logits[:, -1, :], sampling, [rngs[r] for r in active])]
                next_position = next_position + 1
                continue
            chosen = logits.argmax(axis=-1)
            new = []
            for i, (r, draft) in enumerate(zip(active.tolist(), proposed)):
                accepted = 0
                while accepted < len(draft) and chosen[i, accepted] == draft[accepted]:
                    accepted += 1
                drafters[r].update(len(draft), accepted)
                new.append([*draft[:accepted], int(chosen[i, accepted])])
                mask[i, mask.shape[1] - span + 1 + accepted :] = 0  # the rejected drafts
                next_position[i] += 1 + accepted
        decoded = [self._text(text) for text in self.tokenizer.decode_batch(tokens, skip_special_tokens=True)]
        return [(stopped.get(r, decoded[r]), tokens[r]) for r in range(batch)]

    def _text(self, decoded: str) -> str:
        """An answer's text as transformers writes it: cleaned up where the bundle says so."""
        return cleaned_up(decoded) if self.manifest.clean_up_spaces else decoded

    def _take(self, written: list[int], new: list[int], limit: int, stops: tuple[str, ...],
              stopped: dict[int, str], row: int) -> bool:
        """Append a row's new tokens to `written` until it ends (EOS, `limit` tokens, a stop string:
        its text cut before it goes to `stopped`); whether the row goes on."""
        for token in new:
            if token == self.manifest.special_tokens.eos or token in self.manifest.end_tokens:
                return False
            written.append(token)
            if stops:
                before = self._before_stop(written, stops)
                if before is not None:
                    stopped[row] = before
                    return False
            if len(written) == limit:
                return False
        return True

    def _before_stop(self, written: list[int], stops: tuple[str, ...]) -> str | None:
        """An answer's text before the first stop string in it, or None. Stops are matched against the
        tokens' text with special tokens' text in it, as transformers' stop strings are: a stop may be
        a special token's text ("<|im_start|>"), and none spans one ("bc" is not in "b<|im_start|>c").
        The answer's text leaves special tokens out."""
        if self._special_ids.isdisjoint(written):  # the tokens' own text, as transformers matches; cleaned up after
            text = self.tokenizer.decode(written, skip_special_tokens=True)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            return self._text(text[:cut]) if cut >= 0 else None
        shown = self.tokenizer.decode(written, skip_special_tokens=False)
        cut = min((shown.find(s) for s in stops if s in shown), default=-1)
        if cut < 0:
            return None
        # The tokens wholly before the stop, and the part of the token it starts in (none of a special one's).
        start = next(n for n in range(len(written), -1, -1)
                     if len(self.tokenizer.decode(written[:n], skip_special_tokens=False)) <= cut)
        before = self.tokenizer.decode(written[:start], skip_special_tokens=True)
        if start < len(written) and written[start] not in self._special_ids:
            before += shown[len(self.tokenizer.decode(written[:start], skip_special_tokens=False)) : cut]
        return self._text(before)

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(n for n, token in self.tokenizer.get_added_tokens_decoder().items() if token.special)


def _row_prefixes(prefix: Any, count: int) -> list[Prefix | None]:
    """One prefix per prompt: `prefix` for all, or a list of one per prompt, None where a prompt has
    none (it runs whole, tokenized with BOS, as a prompt after a prefix is not)."""
    if prefix is None or isinstance(prefix, Prefix):
        return [prefix] * count
    if isinstance(prefix, str):
        raise InputError("prefix must be a Prefix, which Generator.prefix(text) makes from text (and runs once), "
                         "or a list of them, one per prompt; got a str")
    prefixes = check_items("prefix", prefix, "Prefix objects (from Generator.prefix)")
    wrong = [p for p in prefixes if p is not None and not isinstance(p, Prefix)]
    if wrong:
        raise InputError(f"prefix must be a Prefix, or a list of them (Generator.prefix(text) makes one; None for a "
                         f"prompt without one), got a list holding a {type(wrong[0]).__name__}")
    if len(prefixes) != count:
        raise InputError(f"prefix: give one Prefix for all prompts, or one per prompt ({count}); got {len(prefixes)}")
    return prefixes


def row_seed(seed: int, index: int) -> int:
    """The sampling seed of a batch's prompt `index` under one `seed` for the batch."""
    return seed * 1_000_003 + index


def _row_seeds(seed: Any, count: int) -> list[int | None]:
    """One seed per prompt: `seed` and the prompt's index (`row_seed`), or `seed[n]`."""
    if seed is None:
        return [None] * count
    if isinstance(seed, np.ndarray) and seed.ndim == 0:  # np.array(3): a scalar
        seed = seed.item()
    if isinstance(seed, (int, float, bool, np.number, np.bool_)):  # one seed for all
        base = check_int("seed", seed, 0)
        return [row_seed(base, n) for n in range(count)]
    seeds = check_items("seed", seed, "integers")
    if len(seeds) != count:
        raise InputError(f"seed: {len(seeds)} seeds for {count} prompts (give one per prompt, or one integer)")
    return [check_int(f"seed[{n}]", value, 0) for n, value in enumerate(seeds)]


def _choose(logits: np.ndarray, sampling: Sampling, rngs: list[np.random.Generator]) -> np.ndarray:
    if sampling.temperature <= 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if not np.isfinite(probs).all():  # a NaN or infinite logit: no distribution to draw from
        raise ScoresNotFinite("its scores (logits) hold NaN or infinity, so there is no distribution to sample from")
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        keep = np.cumsum(sorted_probs, axis=-1) - sorted_probs < sampling.top_p  # the top token always stays
        cut = np.zeros_like(probs)
        np.put_along_axis(cut, order, np.where(keep, sorted_probs, 0.0), axis=-1)
        probs = cut / cut.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for rng, p in zip(rngs, probs)])
