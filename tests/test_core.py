"""The compiled core (`lmcor._core`) against its Python references, exactly, on random and real inputs:
chrF and the nearest candidate, the n-gram bans, acceptance with the logits processors fused into the
argmax (ties included), the drafter's proposals, the ragged cache writes, the tokens of each candidate
and of the source in an input's encoding; and a corrector that gives
the same outputs with the core on and off (`LMCOR_CORE=0`)."""

import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from lmcor.runtime import core, decode
from lmcor.runtime.bundle import SpecialTokens
from lmcor.runtime.decode import (
    Batch,
    Search,
    _choose_native,
    _choose_reference,
    _write_rows,
)
from lmcor.runtime.drafts import Drafts
from lmcor.runtime.fallback import _nearest_reference, char_ngrams, chrf, nearest
from lmcor.runtime.request import as_request
from lmcor.runtime.sequence import Sequence, repeat_ban
from lmcor.runtime.template import render
from lmcor.runtime.tokens import _tokens_in_reference, encode_requests
from lmcor.runtime.vote import _edit_vote_reference, _opcodes, _ratio, edit_vote, minimal_edits

from lmcor import Corrector

NATIVE = core.built()
needs_core = pytest.mark.skipif(NATIVE is None, reason="lmcor._core is not built (reinstall lmcor with a C++17 "
                                "compiler: pip install -e .)")

def test_the_core_is_built_where_a_compiler_is():
    """The extension is built optionally (lmcor runs its references without one): where a C++ compiler
    is at hand, a build that failed, or one older than its sources, fails here instead of skipping every
    comparison of the core with its references."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler here: lmcor runs its Python references")
    assert NATIVE is not None, "lmcor._core is not built or is older than its sources: pip install -e ."


# chrF: the core does the reference's double arithmetic in the reference's order (no fused
# multiply-adds), so the scores are the same doubles.
CHRF_TOLERANCE = 0.0

ROOT = Path(__file__).resolve().parents[1]
# Whitespace Python's str.split() removes (and the core must too), astral and combining characters.
ALPHABET = list("abcdeéü,.' ") + ["\t", "\n", "\xa0", "\u2003", "\u3000", "\x1c", "\x85", "😀", "e\u0301", "ß", "字"]


def _real_requests(count: int) -> list:
    lines = (ROOT / "examples" / "requests.jsonl").read_text(encoding="utf-8").splitlines()
    test = ROOT / "recipes" / "splits" / "test.jsonl"
    if test.is_file():
        lines += test.read_text(encoding="utf-8").splitlines()[:count]
    return [as_request(json.loads(line)) for line in lines if line.strip()]


def _random_text(rng: np.random.Generator, longest: int = 40) -> str:
    return "".join(rng.choice(ALPHABET, size=int(rng.integers(0, longest))))


def _edited(rng: np.random.Generator, text: str) -> str:
    """`text` with a few words dropped, repeated or swapped: an output near some candidates."""
    words = text.split(" ")
    for _ in range(int(rng.integers(0, 4))):
        i = int(rng.integers(len(words)))
        op = rng.integers(3)
        if op == 0 and len(words) > 1:
            del words[i]
        elif op == 1:
            words.insert(i, words[i])
        else:
            words[i] = words[int(rng.integers(len(words)))]
    return " ".join(words)


@pytest.fixture(scope="module")
def corrector() -> Corrector:
    return Corrector.load()


@needs_core
def test_chrf_equals_the_reference_on_random_texts():
    rng = np.random.default_rng(0)
    texts = ["", " ", "a", "ab", "\xa0\u3000", "😀😀😀😀😀😀😀"] + [_random_text(rng) for _ in range(300)]
    for _ in range(3000):
        a, b = texts[rng.integers(len(texts))], texts[rng.integers(len(texts))]
        expected = chrf(char_ngrams(a), char_ngrams(b))
        assert abs(NATIVE.chrf(a, b) - expected) <= CHRF_TOLERANCE, (a, b)


@needs_core
def test_nearest_equals_the_reference_on_real_requests():
    rng = np.random.default_rng(1)
    for request in _real_requests(400):
        candidates = list(request.candidates)
        for text in (_edited(rng, candidates[int(rng.integers(len(candidates)))]), request.source, "", candidates[0]):
            index, score = NATIVE.nearest(text, candidates)
            expected_index, expected = _nearest_reference(text, candidates)
            assert index == expected_index and abs(score - expected) <= CHRF_TOLERANCE, (text, candidates)
    # ties: equal candidates and equal scores pick the first, as max() does
    assert NATIVE.nearest("abc", ["xyz", "abd", "abd"]) == _nearest_reference("abc", ["xyz", "abd", "abd"])
    assert NATIVE.nearest("abc", ("", "")) == (0, 0.0)


@needs_core
def test_nearest_dispatches_to_the_core_and_keeps_its_shortcut(monkeypatch):
    calls = []

    class Counted:  # the core, its `nearest` calls counted
        def __getattr__(self, name):
            return getattr(NATIVE, name)

        def nearest(self, *args):
            calls.append(args)
            return NATIVE.nearest(*args)

    monkeypatch.setattr(core, "native", Counted())
    assert nearest("a b", ["x", "a b"]) == (1, 100.0) and not calls  # an exact match: the shortcut
    assert nearest(" ", [" ", "x"]) == _nearest_reference(" ", [" ", "x"])
    assert nearest("a c", ["x", "a b"]) == _nearest_reference("a c", ["x", "a b"]) and calls  # the core's
    with pytest.raises(ValueError):
        nearest("a", [])


@needs_core
def test_edit_vote_equals_the_reference(monkeypatch):
    """difflib's alignment (longest matches, earliest first) and the vote's tie-breaks, on real requests
    and on texts of a few repeated words, where matches tie most."""
    monkeypatch.setattr(core, "native", NATIVE)
    rng = np.random.default_rng(3)
    cases = [(r.source, list(r.candidates)) for r in _real_requests(400)]
    words = ["a", "b", "c", "a.", "B", "é", "😀", "ab"]
    for _ in range(1500):
        source = " ".join(rng.choice(words, size=int(rng.integers(0, 12))))
        cases.append((source, [_edited(rng, source) if rng.random() < 0.7 else " ".join(rng.choice(words, size=5))
                               for _ in range(int(rng.integers(1, 6)))]))
    cases += [("", ["a b", "a b"]), ("a b", ["", ""]), ("a\xa0b \u3000 c", ["a b c", "a  b  c", "x"])]
    for source, candidates in cases:
        for need in (1, 2, 3):
            assert edit_vote(source, candidates, need) == _edit_vote_reference(source, candidates, need), (
                source, candidates, need)


@needs_core
def test_alignments_and_minimal_edits_equal_difflib(monkeypatch):
    """The core's opcodes and similarity ratio are difflib's, and the fallback's minimal edits come out
    the same with the core on and off, on real requests and on texts of a few repeated words."""
    rng = np.random.default_rng(4)
    cases = [(r.source, list(r.candidates)) for r in _real_requests(300)]
    words = ["a", "b", "c", "a.", "A", "é", "😀", "ab", "the", "house"]
    for _ in range(1000):
        source = " ".join(rng.choice(words, size=int(rng.integers(0, 14))))
        cases.append((source, [_edited(rng, source) for _ in range(int(rng.integers(1, 6)))]))
    cases += [("", ["a b"]), ("a b", [""]), ("a\xa0b \u3000 c", ["a b c", "x"])]
    for source, candidates in cases:
        text = _edited(rng, candidates[0])
        for a, b in ((source, text), *((source, c) for c in candidates)):
            monkeypatch.setattr(core, "native", NATIVE)
            native = _opcodes(a.split(), b.split()), _ratio(a, b)
            monkeypatch.setattr(core, "native", None)
            assert native == (_opcodes(a.split(), b.split()), _ratio(a, b)), (a, b)
        for span in (0, 2):
            known = {*source.split(), *text.split()[:2]}
            monkeypatch.setattr(core, "native", NATIVE)
            native = minimal_edits(source, text, span, known, candidates)
            monkeypatch.setattr(core, "native", None)
            assert native == minimal_edits(source, text, span, known, candidates), (source, text, span, candidates)


@needs_core
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_repeat_bans_equal_the_reference(size):
    rng = np.random.default_rng(size)
    for _ in range(60):
        ours, theirs = repeat_ban(size, 0, compiled=True), repeat_ban(size, 0, compiled=False)
        assert type(ours) is not type(theirs)
        for _ in range(int(rng.integers(1, 12))):
            tokens = rng.integers(0, 6, size=int(rng.integers(0, 6))).tolist()
            ours.extend(tokens)
            theirs.extend(tokens)
            extra = rng.integers(0, 6, size=int(rng.integers(0, 5))).tolist()
            assert ours.banned(extra) == theirs.banned(extra)
            assert ours.banned() == theirs.banned()
        assert ours.seq == theirs.seq and ours.size == theirs.size


@pytest.mark.parametrize("compiled", [True, False])
def test_a_ban_of_single_tokens_bans_the_start_token_as_generate_does(compiled):
    if compiled and NATIVE is None:
        pytest.skip("the compiled core is not built")
    ban = repeat_ban(1, 7, compiled=compiled)  # transformers bans every token of the sequence, the start one too
    assert ban.banned() == [7]
    ban.extend([3, 5])
    assert sorted(ban.banned()) == [3, 5, 7] and sorted(ban.banned([9])) == [3, 5, 7, 9]
    assert repeat_ban(2, 7, compiled=compiled).banned([7]) == [7]


def _rows(rng: np.random.Generator, count: int, positions: int, vocab: int, compiled: bool, seed_state: list) -> list:
    """Sequences at random states: tokens written, drafts, bans, limits, some done."""
    rows = []
    for r in range(count):
        written, draft, n, least, most, done = seed_state[r]
        s = Sequence(Search(max_new_tokens=most, min_new_tokens=least, no_repeat_ngram_size=n), 0)
        s.ban = repeat_ban(n, 0, compiled=compiled) if n else None
        s.tokens = list(written)
        if s.ban is not None:
            s.ban.extend(written)
        s.draft, s.done = list(draft), done
        rows.append(s)
    return rows


def _states(rng: np.random.Generator, logits: np.ndarray, vocab: int) -> list:
    rows, positions = logits.shape[:2]
    states = []
    for r in range(rows):
        written = rng.integers(0, vocab, size=int(rng.integers(0, 8))).tolist()
        # drafts mostly follow the raw argmax (so acceptance goes deep), with an early miss at random
        draft = logits[r].argmax(axis=-1)[: int(rng.integers(0, positions))].tolist()
        if draft and rng.random() < 0.5:
            draft[int(rng.integers(len(draft)))] = int(rng.integers(vocab))
        n = int(rng.choice([0, 1, 2, 3]))
        least = int(rng.integers(0, 5))
        most = int(rng.integers(max(least, 1), 12))
        states.append((written, draft, n, least, most, bool(rng.random() < 0.1)))
    return states


@needs_core
@pytest.mark.parametrize("forced", [(None, None), (5, 6), (2, None)])
def test_acceptance_equals_the_reference_on_random_logits_with_ties(forced):
    rng = np.random.default_rng(sum(x or 0 for x in forced))
    special = SpecialTokens(pad=0, eos=1, decoder_start=0, forced_bos=forced[0], forced_eos=forced[1])
    for trial in range(150):
        rows, positions, vocab = int(rng.integers(1, 6)), int(rng.integers(1, 7)), int(rng.integers(7, 14))
        # few distinct values: ties everywhere; -inf and NaN sometimes
        logits = rng.integers(-2, 3, size=(rows, positions, vocab)).astype(np.float32)
        if trial % 5 == 0:
            logits[rng.random(logits.shape) < 0.2] = -np.inf
        if trial % 17 == 0:
            logits[rng.random(logits.shape) < 0.05] = np.nan
        states = _states(rng, logits, vocab)
        first = int(rng.integers(0, rows))
        results = []
        for compiled in (True, False):
            batch = Batch(decoder=None, special=special)
            batch.rows = _rows(rng, rows, positions, vocab, compiled, states)
            batch._limits()
            ids = np.zeros((rows - first, positions), dtype=np.int64)
            for i, s in enumerate(batch.rows[first:]):
                ids[i, 1 : 1 + len(s.draft)] = s.draft
            batch.fed = ids
            choose = _choose_native if compiled else (lambda _, b, x, f: _choose_reference(b, x, f))
            results.append(choose(NATIVE, batch, logits[first:].copy(), first))
        assert results[0] is not None
        assert results[0] == results[1], (trial, states)


@needs_core
def test_acceptance_runs_the_reference_where_a_ban_is_not_native():
    special = SpecialTokens(pad=0, eos=1, decoder_start=0)
    batch = Batch(decoder=None, special=special)
    s = Sequence(Search(max_new_tokens=5, no_repeat_ngram_size=2), 0)
    s.ban = repeat_ban(2, 0, compiled=False)
    batch.rows = [s]
    batch._limits()
    batch.fed = np.zeros((1, 1), dtype=np.int64)
    assert _choose_native(NATIVE, batch, np.zeros((1, 1, 4), dtype=np.float32), 0) is None


def _compare_drafts(references: list, end: int, histories: list, rng: np.random.Generator) -> None:
    ours, theirs = Drafts(references, end, compiled=True), Drafts(references, end, compiled=False)
    assert ours.compiled and not theirs.compiled
    for history in histories:
        limit = int(rng.integers(-1, 40))
        assert ours.propose(history, limit) == theirs.propose(history, limit), history
        drafted = int(rng.integers(0, 30))
        accepted = int(rng.integers(0, drafted + 1)) if rng.random() < 0.7 else drafted
        ours.update(drafted, accepted)
        theirs.update(drafted, accepted)
        assert ours.size == theirs.size


@needs_core
def test_drafts_equal_the_reference_on_random_sequences():
    rng = np.random.default_rng(3)
    for _ in range(200):
        vocab = int(rng.integers(3, 12))
        references = [rng.integers(2, vocab, size=int(rng.integers(0, 30))) for _ in range(int(rng.integers(1, 7)))]
        references += [references[0]] * int(rng.integers(0, 3))  # repeated candidates vote more
        histories = [[]] + [rng.integers(1, vocab, size=int(rng.integers(1, 9))).tolist() for _ in range(20)]
        _compare_drafts(references, 1, histories, rng)
    for max_ngram in (0, 1, 2, 6):
        refs = [np.array([5, 6, 7, 5, 6, 8]), np.array([5, 6, 8])]
        for history in ([], [5], [5, 6], [7, 5, 6], [9]):
            assert (Drafts(refs, 1, max_ngram=max_ngram, compiled=True).propose(history, 10)
                    == Drafts(refs, 1, max_ngram=max_ngram, compiled=False).propose(history, 10))


@needs_core
def test_a_draft_size_set_past_its_bound_grows_back_to_it_as_the_reference():
    for size in (2**63 - 1, 2**40, 40):
        sizes = []
        for compiled in (True, False):
            drafts = Drafts([np.array([2, 3])], 1, compiled=compiled)
            drafts.size = size
            drafts.update(3, 3)
            sizes.append(drafts.size)
        assert sizes[0] == sizes[1] == 32


@needs_core
def test_drafts_equal_the_reference_on_the_default_corrector_inputs(corrector):
    rng = np.random.default_rng(4)
    requests = _real_requests(150)
    inputs = encode_requests(corrector.tokenizer, corrector.manifest.template, requests,
                             corrector.manifest.max_input_tokens, references=True)
    eos = corrector.manifest.special_tokens.eos
    for model_input in inputs:
        references = list(model_input.references)
        histories = [[]]
        for ref in references:  # prefixes of each candidate (what an output copying it has written), edited
            for cut in sorted(rng.integers(0, len(ref) + 1, size=4).tolist()):
                prefix = ref[:cut].tolist()
                if prefix and rng.random() < 0.3:
                    prefix[int(rng.integers(len(prefix)))] = int(rng.integers(4000))
                histories.append(prefix)
        _compare_drafts(references, eos, histories, rng)


@needs_core
def test_cache_writes_equal_the_reference():
    rng = np.random.default_rng(5)
    for _ in range(50):
        slots, heads, room, dim, new = (int(rng.integers(1, 6)), int(rng.integers(1, 4)), 32, int(rng.integers(1, 9)),
                                        int(rng.integers(1, 8)))
        first = int(rng.integers(0, slots))
        rows = slots - first
        caches = [rng.standard_normal((slots, heads, room, dim)).astype(np.float32) for _ in range(4)]
        presents = [rng.standard_normal((rows, heads, new, dim)).astype(np.float32) for _ in range(4)]
        lengths = rng.integers(0, room - new + 1, size=rows).astype(np.int64)
        expected = [c.copy() for c in caches]
        _write_rows(expected, presents, lengths, first)
        NATIVE.write_rows(caches, presents, lengths, first)
        for a, b in zip(caches, expected):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="room"):
        NATIVE.write_rows(caches, presents, np.full(rows, room, dtype=np.int64), first)
    # presents are only read: one that is a strided view, or float64, is written as the reference writes it
    wide = [rng.standard_normal((rows, heads, new, 2 * dim)) for _ in range(4)]
    expected = [c.copy() for c in caches]
    _write_rows(expected, [w[..., ::2] for w in wide], lengths, first)
    NATIVE.write_rows(caches, [w[..., ::2] for w in wide], lengths, first)
    for a, b in zip(caches, expected):
        np.testing.assert_array_equal(a, b)


@needs_core
def test_the_core_refuses_buffers_it_would_write_outside_or_into_a_copy():
    """Arrays the core writes are taken as they are: one of another type or layout is refused (it was
    converted, and the writes went to the copy), and so is a row before the first."""
    present = [np.ones((1, 2, 1, 4), dtype=np.float32)]
    big = np.zeros((6, 2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="first"):
        NATIVE.write_rows([big[3:5]], present, np.zeros(1, dtype=np.int64), -1)  # wrote into big[2]
    assert not big.any()
    for cache in (np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4, 8), dtype=np.float32)[..., ::2]):
        with pytest.raises(ValueError, match="float32"):
            NATIVE.write_rows([cache], present, np.zeros(1, dtype=np.int64), 0)
    logits, ids = np.zeros((2, 1, 5), dtype=np.float32), np.zeros((2, 1), dtype=np.int64)
    per_row = [np.zeros(2, dtype=np.int64) for _ in range(4)]
    done, bans = np.zeros(2, dtype=bool), [None, None]
    for accepted, following in ((np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int64)),
                                (np.zeros(2, dtype=np.int64), np.zeros(4, dtype=np.int64)[::2])):
        with pytest.raises(TypeError):
            NATIVE.accept(logits, ids, *per_row, done, bans, 1, -1, -1, accepted, following)
    with pytest.raises(ValueError, match="empty vocabulary"):
        NATIVE.accept(logits[..., :0], ids, *per_row, done, bans, 1, -1, -1, *per_row[:2])


def _same_tokens_in(offsets, special, spans) -> None:
    ours, theirs = NATIVE.tokens_in(offsets, special, spans), _tokens_in_reference(offsets, special, spans)
    assert len(ours) == len(theirs) == len(spans)
    for a, b in zip(ours, theirs):
        assert a.dtype == np.int64
        np.testing.assert_array_equal(a, b)


@needs_core
def test_token_spans_equal_the_reference_on_random_offsets():
    """Offsets in text order (bisection) and not (the whole scan), empty offsets, special tokens,
    spans that overlap, repeat, hold nothing or reach past the text."""
    rng = np.random.default_rng(6)
    for trial in range(400):
        count = int(rng.integers(0, 40))
        if trial % 2:  # in text order: tokens' starts and ends never go back
            start = np.cumsum(rng.integers(0, 4, size=count))
            end = start + rng.integers(0, 5, size=count)
            end = np.maximum.accumulate(end) if count else end
        else:
            start = rng.integers(0, 60, size=count)
            end = start + rng.integers(0, 5, size=count)
        offsets = [(int(a), int(b)) for a, b in zip(start, end)]
        special = rng.choice([0, 0, 0, 1], size=count).tolist()
        spans = []
        for _ in range(int(rng.integers(0, 8))):
            a = int(rng.integers(0, 70))
            spans.append((a, a + int(rng.integers(0, 20))))
        _same_tokens_in(offsets, special, spans)
    with pytest.raises(ValueError, match="flag per offset"):
        NATIVE.tokens_in([(0, 1)], [], [(0, 1)])


@needs_core
def test_token_spans_equal_the_reference_on_the_default_corrector_inputs(corrector):
    template = corrector.manifest.template
    for request in _real_requests(150):
        rendered = render(template, request.source, tuple(request.candidates))
        encoding = corrector.tokenizer.encode(rendered.text)
        _same_tokens_in(encoding.offsets, encoding.special_tokens_mask, [*rendered.spans, rendered.source])


@needs_core
@pytest.mark.parametrize("options", [{}, {"min_new_tokens": 12, "no_repeat_ngram_size": 2}, {"drafts": False}])
def test_a_corrector_gives_the_same_outputs_with_the_core_off(corrector, monkeypatch, options):
    """Real logits, drafts and bans: every step's fused acceptance is checked against the reference,
    and the outputs (fallback included) against a run with LMCOR_CORE=0."""
    requests = _real_requests(48)
    checked = []

    def both(native, batch, logits, first):
        ours = _choose_native(native, batch, logits, first)
        assert ours is None or ours == _choose_reference(batch, logits.copy(), first)
        checked.append(ours is not None)
        return ours

    monkeypatch.setattr(decode, "_choose_native", both)
    monkeypatch.setattr(core, "native", core.native)  # restored after the test
    monkeypatch.setattr(core, "_module", core._module)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LMCOR_CORE", flag)
        assert (core.configure() is None) == (flag == "0")
        runs[flag] = [corrector.correct_batch(requests, batch_size=size, **options) for size in (1, 16)]
    assert checked and all(checked)
    for ours, theirs in zip(runs["1"], runs["0"]):
        for a, b in zip(ours, theirs):
            assert (a.text, a.token_ids, a.fallback) == (b.text, b.token_ids, b.fallback)
            assert (a.stats.decoder_calls, a.stats.drafted_tokens, a.stats.accepted_tokens) == (
                b.stats.decoder_calls, b.stats.drafted_tokens, b.stats.accepted_tokens)


def _install(monkeypatch, module: types.ModuleType | None) -> None:
    """`module` as what `import lmcor._core` gives (None: the import fails), for this test only, with the
    core's state restored after it."""
    monkeypatch.setitem(sys.modules, "lmcor._core", module)
    monkeypatch.setattr(core, "_warned", False)
    monkeypatch.setattr(core, "native", core.native)
    monkeypatch.setattr(core, "_module", core._module)


def test_a_missing_core_is_reported_once(monkeypatch, caplog):
    _install(monkeypatch, None)  # import fails
    with caplog.at_level(logging.WARNING, logger="lmcor"):
        assert core.configure() is None
        assert core.configure(True) is None
        assert core.built() is None
    assert sum("compiled core is not built" in r.getMessage() for r in caplog.records) == 1
    assert not Drafts([np.array([3, 4])], 1).compiled  # the references run


def test_a_core_built_from_older_sources_is_not_used(monkeypatch, caplog):
    """Sources updated without a rebuild: a module lacking a function the Python layer calls would fail
    mid-request; the references run instead, and lmcor says what to do."""
    stale = types.ModuleType("lmcor._core")
    stale.chrf = stale.nearest = lambda *args: None
    _install(monkeypatch, stale)
    with caplog.at_level(logging.WARNING, logger="lmcor"):
        assert core.configure(True) is None
        assert edit_vote("a b", ["a c", "a c"]) == "a c"
    (message,) = [r.getMessage() for r in caplog.records if "compiled core" in r.getMessage()]
    assert "older sources" in message and "edit_vote" in message and "pip install -e ." in message


@needs_core
def test_a_core_built_from_other_sources_than_the_checkouts_is_not_used(monkeypatch, caplog):
    """Every function there, but compiled from sources the checkout has since changed: its results
    could differ from the references', so the references run."""
    assert NATIVE.SOURCES == core.checkout_digest()  # this build is the checkout's
    stale = types.ModuleType("lmcor._core")
    for name in core.NAMES:
        setattr(stale, name, getattr(NATIVE, name))
    stale.SOURCES = "0" * 64
    _install(monkeypatch, stale)
    with caplog.at_level(logging.WARNING, logger="lmcor"):
        assert core.configure(True) is None
    assert any("built from other sources" in r.getMessage() for r in caplog.records)


@needs_core
def test_bench_host_compares_core_and_references(tmp_path, capsys):
    from lmcor.cli import main

    code = main(["bench", "--host", "--data", str(ROOT / "examples" / "requests.jsonl"), "--requests", "6",
                 "--rounds", "1", "--batch-size", "4", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["identical_outputs"] == report["requests"] == 6
    # the FLOP bound counts every decoded token, of outputs the fallback replaced too
    from lmcor.bench.drafts import read_requests
    from lmcor.runtime.corrector import Corrector

    corrector = Corrector.load()
    requests = read_requests(ROOT / "examples" / "requests.jsonl", 6, fit=(corrector.tokenizer, corrector.manifest))
    decoded = corrector.correct_batch(requests, fallback_below=0)
    assert report["mean_output_tokens"] == pytest.approx(sum(len(r.token_ids) for r in decoded) / 6)
    for mode in report["modes"].values():
        assert mode["batch1_host_p50_ms"] > 0 and 0 < mode["vs_flop_bound"] < 1.5
        # stages of a request's host time, each counted inside it
        assert 0 < mode["batch1_tokenize_p50_ms"] < mode["batch1_host_p50_ms"]
        assert 0 < mode["batch1_finish_p50_ms"] < mode["batch1_host_p50_ms"]
    assert "of bound" in capsys.readouterr().out
