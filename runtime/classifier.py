"""`Classifier`: a loaded classifier bundle (an encoder with a classification head).

texts (or text pairs) -> tokens (truncated longest-first to the bundle's max input tokens) ->
length-bucketed batches -> ONNX Runtime -> softmax -> the label with the highest probability.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Encoding

from .batching import pad_batch, plan_batches
from .bundle import MANIFEST_NAME, Manifest, bundle_path, load_manifest
from .tokens import MAX_CHARS_PER_TOKEN, check_vocabulary, cut_to_read, load_tokenizer
from .errors import BundleError, InputError
from .jsonl import json_kind
from .options import ERRORS, MAX_BATCH_SIZE, check_choice, check_int, check_items, check_progress, check_text, check_words
from .sessions import check_graphs, open_session, raised_by_onnxruntime, run

log = logging.getLogger("lmcor")


@dataclass(frozen=True, eq=False)  # an array field: compared and hashed by identity, as NumPy arrays are not
class Classification:
    label: str
    probabilities: np.ndarray  # one per label, in the manifest's label order
    id: Any = None
    truncated: bool = False


@dataclass(frozen=True)
class Reading:
    """What the model reads of a text (and pair): token ids and type ids, special tokens included."""

    ids: list[int]
    type_ids: list[int]
    truncated: bool


def longest_first(first: int, second: int, room: int) -> tuple[int, int]:
    """How many tokens of a pair's two texts `room` positions keep under Hugging Face tokenizers'
    longest-first truncation: both whole if they fit; else a text of at most half the room whole and
    the other cut to the rest; else half each, the longer text (the second of two alike) taking the
    odd one."""
    if first + second <= room:
        return first, second
    short, long = sorted((first, second))
    long = short if short > room else max(short, room - short)
    if short + long > room:
        short, long = room // 2, room // 2 + room % 2
    return (long, short) if first > second else (short, long)


def as_texts(item: Any) -> tuple[str, str | None, Any]:
    """A text, a (text, pair) tuple, or a mapping with `text` (and `pair`, `id`) -> (text, pair, id)."""
    if isinstance(item, str):
        text, pair, ident = item, None, None
    elif isinstance(item, Mapping):
        if "text" not in item:
            raise InputError("missing field 'text'")
        text, pair, ident = item["text"], item.get("pair"), item.get("id")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        (text, pair), ident = item, None
    else:
        raise InputError(f"expected a text, a (text, pair) pair or an object with 'text', got {json_kind(item)}")
    check_words("field 'text'", text)
    if pair is not None:
        if not isinstance(pair, str):
            raise InputError(f"field 'pair' must be a string, got {json_kind(pair)}")
        check_text("field 'pair'", pair)
        pair = pair or None  # as transformers' tokenizers take an empty pair: no pair
    if isinstance(ident, str):
        check_text("field 'id'", ident)
    return text, pair, ident


def gate_input(source: str, candidates: Sequence[str]) -> tuple[str, str]:
    """What a gate reads to judge the first candidate: that candidate, and the source with how many
    of the other candidates equal it. Agreement is the strongest sign that a candidate is right, and
    a count costs a gate a few tokens where the other candidates' texts would cost it their length."""
    agree = sum(c == candidates[0] for c in candidates[1:])
    return candidates[0], f"{source} | {agree} of {len(candidates) - 1} agree"


def check_gate_labels(root: Path, labels: Sequence[str]) -> None:
    """A gate (the bundle at `root`) answers whether the first candidate is right: it needs that label."""
    if "right" not in labels:
        raise BundleError(f"{root}: the gate must have a 'right' label (it has {', '.join(labels)})")


def check_gate_bundle(path: str | Path) -> None:
    """A gate bundle, checked without loading it: a classifier's manifest with a 'right' label."""
    check_gate_labels(path, load_manifest(path, verify=False, kind="classifier").labels)


# The share of the source's words (case and punctuation aside) a first candidate must hold for a gate
# to pass it: on the splits this kept every pass but two wrong ones (SmolLM2's rewrites), and refusals
# ("Sure!") out; a character measure would not, as a short sentence's fix changes most of its n-grams.
GATE_MIN_SHARED = 0.5
_WORD = re.compile(r"\w+")


def right_probabilities(gate: "Classifier", requests: Sequence[tuple[str, Sequence[str]]]) -> list[float | None]:
    """For (source, candidates) pairs, the gate's probability that the first candidate is right, or
    None where the gate is not asked and the corrector answers: a blank first candidate (a classifier
    reads no empty text); one that holds less than `GATE_MIN_SHARED` of the source's words (a
    correction edits its source, and such a candidate, a refusal, an answer to something else, a
    rewrite, is one the gate, which learned from corrections, may pass when every candidate repeats
    it); one the gate reads only in part (cut to its positions: truncation cuts the candidates'
    agreement at the end first, and the candidate's own end, so the gate would judge what it never
    read); and one the gate's model cannot read (a token its embeddings lack), which fails no other."""
    check_gate_labels(gate.root, gate.labels)
    right = gate.labels.index("right")
    asked = [n for n, (source, candidates) in enumerate(requests)
             if candidates[0].strip() and shared_words(candidates[0], source) >= GATE_MIN_SHARED]
    verdicts = gate.classify_batch([gate_input(*requests[n]) for n in asked], errors="return")
    out: list[float | None] = [None] * len(requests)
    for n, verdict in zip(asked, verdicts):
        if not isinstance(verdict, InputError) and not verdict.truncated:
            out[n] = verdict.probabilities[right]
    return out


def shared_words(text: str, source: str) -> float:
    """The share of `source`'s words that `text` holds (case and punctuation aside). A source without
    words ("—", an emoji) is held whole by a text without words, and not at all by one that writes
    some (a refusal, an answer to something else)."""
    theirs = set(_WORD.findall(text.lower()))
    words = _WORD.findall(source.lower())
    if not words:
        return 0.0 if theirs else 1.0
    return sum(word in theirs for word in words) / len(words)


def passing_threshold(gate: "Classifier", threshold: float | None = None) -> float:
    """The P(right) a gate needs to pass a candidate: `threshold` if given, else the one calibrated
    into the gate's bundle, else 0.5."""
    if threshold is not None:
        return threshold
    return 0.5 if gate.manifest.gate_threshold is None else gate.manifest.gate_threshold


class Classifier:
    def __init__(self, root: Path, manifest: Manifest, tokenizer, session):
        self.root, self.manifest, self.tokenizer, self.session = root, manifest, tokenizer, session
        self._inputs = {i.name for i in session.get_inputs()}
        self._pad = manifest.pad_token or 0
        # BART's head reads each row's last EOS, which its graph finds only where every row of the
        # batch holds as many (a pair holds three, a text one): its texts are classified one by one.
        self._alone = manifest.architecture in ("bart", "mbart")

    @classmethod
    def load(cls, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
             verify: bool = True) -> "Classifier":
        root = bundle_path(path)
        manifest = load_manifest(root, verify=verify, kind="classifier")
        session = open_session(root / manifest.files["model"], providers=providers, threads=threads)
        check_graphs(root, manifest, {"model": session})
        if manifest.int8_per_tensor:
            log.warning("%s: an int8 bundle of format %d quantizes activations per tensor, so a text's "
                        "probabilities depend on the rest of its batch; re-export it with this lmcor "
                        "(`lmcor export --kind classifier --precision int8`)", root, manifest.format_version)
        tokenizer = load_tokenizer(root / manifest.files["tokenizer"])
        post = tokenizer.post_processor
        least = (post.num_special_tokens_to_add(True) if post is not None else 0) + 2
        if manifest.max_input_tokens < least:  # as export refuses it: the tokenizer would cut nothing
            raise BundleError(f"{root / MANIFEST_NAME}: max_input_tokens: {manifest.max_input_tokens}: a text pair "
                              f"needs {least} tokens (its special tokens and one of each text)")
        return cls(root, manifest, tokenizer, session)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    def classify(self, text: str, pair: str | None = None) -> Classification:
        return self.classify_batch([(text, pair)])[0]  # type: ignore[return-value]

    def classify_batch(self, items: Iterable[Any], *, batch_size: int = 32, errors: Literal["raise", "return"] = "raise",
                       progress: Callable[[int], None] | None = None) -> list[Classification | InputError]:
        """Classify texts or text pairs, in order; a bad item raises, or with `errors="return"` yields
        its `InputError` in its place. `batch_size` is at most `options.MAX_BATCH_SIZE`."""
        check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        check_choice("errors", errors, ERRORS)
        check_progress(progress)
        items = check_items("items", items, "texts or (text, pair) pairs")
        results: list[Classification | InputError | None] = [None] * len(items)

        def failed(n: int, error: InputError) -> None:
            if errors == "raise":
                raise InputError(f"item {n}: {error}") from None
            results[n] = error

        good: list[tuple[int, str, str | None, Any]] = []
        for n, item in enumerate(items):
            try:
                good.append((n, *as_texts(item)))
            except InputError as e:
                failed(n, e)
        encodings: dict[int, Reading] = {}  # rows the model can read: each other text fails alone, by name
        for i, (n, text, pair, _) in enumerate(good):
            try:
                encodings[i] = self._read(text, pair)
                check_vocabulary(self.tokenizer, encodings[i].ids, self.manifest.vocab_size)
            except InputError as e:
                encodings.pop(i, None)
                failed(n, e)
        readable = list(encodings)
        if progress is not None and len(readable) < len(items):  # those that failed are done too
            progress(len(items) - len(readable))
        lengths = [len(encodings[i].ids) for i in readable]
        for planned in plan_batches(lengths, 1 if self._alone else batch_size):
            batch = [readable[k] for k in planned]
            # A batch the model fails on (in a bundle that records no vocab_size, a token id past its
            # embeddings) is run again text by text, so that only the texts it fails on fail.
            for rows, probabilities in self._probabilities(batch, encodings):
                if isinstance(probabilities, InputError):
                    failed(good[rows[0]][0], probabilities)
                    continue
                for i, row in zip(rows, probabilities):
                    n, _, _, ident = good[i]
                    results[n] = Classification(self.labels[int(row.argmax())], row.astype(np.float32), ident,
                                                encodings[i].truncated)
            if progress is not None:
                progress(len(batch))
        return results  # type: ignore[return-value]

    def _read(self, text: str, pair: str | None) -> Reading:
        """What the model reads of a text (and pair): its tokens, cut to its positions as the tokenizer's
        longest-first truncation cuts them (`_truncated`). A text is first cut to what the model can
        read (`tokens.MAX_CHARS_PER_TOKEN` characters a token), as a corrector's candidates are, so
        that its cost is bounded whatever its length. Where that cut decides what is read (characters
        the tokenizer deletes, a word longer than any token, which becomes one unknown token, leave a
        cut text with few tokens), the whole text is read: the tokens kept of a cut text must end
        before the word it split, and be fewer than the cut text holds. Of a pair, truncation gives the
        longer text the odd token: a cut text must stay the longer one, and where both are cut, which
        is longer is not known without them, so such a pair is read whole (its cost linear in the
        input, whose own limit, a line's or a body's bytes, bounds it). A text (or pair) of which the
        tokenizer keeps no token (control characters, zero-width spaces) is refused: the model would
        read nothing of it, as of an empty one."""
        reading, _, tokens = self._reading(text, pair)
        for field, count in zip(("text", "pair"), tokens[: 1 + (pair is not None)]):
            if not count:
                raise InputError(f"field {field!r} holds no token the model reads: its tokenizer drops every "
                                 "character of it")
        return reading

    def _reading(self, text: str, pair: str | None) -> tuple[Reading, tuple[int, int], tuple[int, int]]:
        """`_read`'s reading, how many tokens of each text it keeps, and how many each text has (as read:
        whole, or cut where the cut decides nothing)."""
        paired = pair is not None
        most = self.manifest.max_input_tokens * MAX_CHARS_PER_TOKEN
        shown = (cut_to_read(text, most), None if pair is None else cut_to_read(pair, most))
        if shown == (text, pair):
            return self._truncated(self.tokenizer.encode(text, pair), paired)
        uncut = self.tokenizer.encode(*shown)
        reading, kept, tokens = self._truncated(uncut, paired)
        if paired:
            counts = [sum(s == sequence for s in uncut.sequence_ids) for sequence in (0, 1)]
            cut = [part != whole for part, whole in zip(shown, (text, pair))]
            if all(cut) or counts[cut.index(True)] <= counts[cut.index(False)]:
                return self._truncated(self.tokenizer.encode(text, pair), paired)
        for sequence, (part, whole) in enumerate(zip(shown, (text, pair))):
            if part == whole:
                continue
            own = [(word, start, end)
                   for word, (start, end), s in zip(uncut.word_ids, uncut.offsets, uncut.sequence_ids) if s == sequence]
            ends = [end for _, _, end in own]
            # Where the last word starts, as the tokenizer's pre-tokenizer splits words (at white space,
            # punctuation, each CJK character): the word the cut may have split.
            split = next((start for word, start, _ in own if word == own[-1][0]), 0) if own else 0
            if kept[sequence] >= len(ends) or (kept[sequence] and ends[kept[sequence] - 1] > split):
                return self._truncated(self.tokenizer.encode(text, pair), paired)
        return reading, kept, tokens

    def _truncated(self, whole: Encoding, paired: bool) -> tuple[Reading, tuple[int, int], tuple[int, int]]:
        """The tokens of an encoding (its special tokens included) that the model's positions hold, as
        the tokenizer's longest-first truncation keeps them, and how many of each text's. Computed
        here: the tokenizer's own truncation of a pair keeps every combination of both texts' cut-off
        pieces, its time and memory growing with the product of their lengths (gigabytes for two
        texts of 40 KB). Also how many tokens each text has."""
        sequence = whole.sequence_ids
        counts = (sequence.count(0), sequence.count(1))
        room = max(self.manifest.max_input_tokens - (len(sequence) - sum(counts)), 0)  # past the special tokens
        kept = longest_first(*counts, room) if paired else (min(counts[0], room), 0)
        if kept == counts:
            return Reading(whole.ids, whole.type_ids, False), kept, counts
        left = list(kept)
        ids, types = [], []
        for token, kind, s in zip(whole.ids, whole.type_ids, sequence):
            if s is not None:
                if not left[s]:
                    continue
                left[s] -= 1
            ids.append(token)
            types.append(kind)
        return Reading(ids, types, True), kept, counts

    def _probabilities(self, batch: list[int], encodings: list) -> Iterator[tuple[list[int], np.ndarray | InputError]]:
        """(rows, their probabilities) of `batch`; where the model fails on it, each row alone, and a row
        it fails on alone with its error."""
        chosen = [encodings[i] for i in batch]
        ids, mask = pad_batch([np.asarray(e.ids, dtype=np.int64) for e in chosen], self._pad)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = (pad_batch([np.asarray(e.type_ids, dtype=np.int64) for e in chosen], 0)[0]
                                      if self.manifest.token_types else np.zeros_like(ids))
        try:
            logits = run(self.session, None, feed)[0].astype(np.float64)
        except Exception as e:
            if not raised_by_onnxruntime(e):
                raise  # lmcor's own failure: not the texts'
            if len(batch) > 1:
                for row in batch:
                    yield from self._probabilities([row], encodings)
                return
            said = (str(e).strip().splitlines() or [type(e).__name__])[0]
            yield batch, InputError(f"the model cannot read this text ({said[:200]})")
            return
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        yield batch, probabilities / probabilities.sum(axis=1, keepdims=True)
