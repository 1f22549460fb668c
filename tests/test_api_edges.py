"""The public API's edges: every argument is checked at the call (an `InputError` naming it), and a
request that is not Unicode text fails alone, in its place."""

import math
import re

import numpy as np
import pytest
import torch
from conftest import make_requests
from lmcor.runtime.bundle import shipped_bundle
from lmcor.runtime.request import Request

from lmcor import Classifier, CorrectionOptions, Corrector, Generator, InputError

SURROGATE = "\ud800"
REQUESTS = make_requests(6, seed=21)
DECODE = {"max_new_tokens": 4}

# (argument, bad value) for the options `correct_batch` and `generate` share.
BAD_DECODING = [
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("max_new_tokens", 2.0), ("max_new_tokens", "8"),
    ("max_new_tokens", True),
    ("min_new_tokens", -1), ("min_new_tokens", "0"), ("min_new_tokens", 1.5), ("min_new_tokens", 5),  # > max_new_tokens
    ("num_beams", 0), ("num_beams", "2"), ("num_beams", 2.0), ("num_beams", None),
    ("length_penalty", "x"), ("length_penalty", math.nan), ("length_penalty", math.inf), ("length_penalty", None),
    ("length_penalty", 11.0), ("length_penalty", 10**400),
    ("no_repeat_ngram_size", -1), ("no_repeat_ngram_size", 1.5), ("no_repeat_ngram_size", "2"),
    ("no_repeat_ngram_size", 4097), ("no_repeat_ngram_size", 2**64),  # past the compiled core's integers
    ("drafts", "no"), ("drafts", 1), ("drafts", None),
    ("batch_size", 0), ("batch_size", "16"), ("batch_size", 2.0), ("batch_size", None),
]
BAD_CORRECTION = BAD_DECODING + [
    ("gate", "gate"), ("gate", 3),
    ("gate_threshold", math.nan), ("gate_threshold", 1.5), ("gate_threshold", -0.1), ("gate_threshold", "0.5"),
    ("fallback_below", math.nan), ("fallback_below", math.inf), ("fallback_below", -1), ("fallback_below", 101),
    ("fallback_below", "90"), ("fallback_below", True),
    ("fallback_span", -1), ("fallback_span", 1.5), ("fallback_span", "2"), ("fallback_span", True),
    ("errors", "bogus"), ("errors", None), ("errors", "RAISE"),
    ("progress", 3), ("progress", "print"),
]


@pytest.fixture(scope="module")
def corrector(bundles) -> Corrector:
    return Corrector.load(bundles["t5"])


@pytest.fixture(scope="module")
def gate() -> Classifier:
    return Classifier.load(shipped_bundle("gate"))


@pytest.fixture(scope="module")
def generator(gpt2_bundle) -> Generator:
    return Generator.load(gpt2_bundle)


def _names(argument: str, call) -> None:
    with pytest.raises(InputError, match=argument):
        call()


@pytest.mark.parametrize("argument, value", BAD_CORRECTION)
def test_correct_batch_checks_each_option(corrector, argument, value):
    _names(argument, lambda: corrector.correct_batch(REQUESTS, **{**DECODE, argument: value}))


@pytest.mark.parametrize("argument, value", BAD_DECODING)
def test_generate_checks_each_option(corrector, argument, value):
    ids = [[5, 6, 7, 1]]
    _names(argument, lambda: corrector.generate(ids, **{**DECODE, argument: value}))


@pytest.mark.parametrize("input_ids, message", [
    ("abc", "input_ids must be a list"), (None, "input_ids must be a list"), ([["a", "b"]], "item 0: input_ids"),
    ([[[1, 2]]], "item 0: input_ids"), ([[1.5, 2.0]], "item 0: input_ids"), ([[5], []], "item 1: 0 input tokens"),
    ([[5, -1]], "item 0: token id -1"), ([[5, 10**6]], "item 0: token id 1000000"),
])
def test_generate_checks_the_token_ids(corrector, input_ids, message):
    with pytest.raises(InputError, match=message):
        corrector.generate(input_ids, **DECODE)


@pytest.mark.parametrize("items", ["she go", None, 3, {"source": "a", "candidates": ["b"]}, np.array(5)])
def test_items_must_be_a_list_of_requests(corrector, items):
    _names("items", lambda: corrector.correct_batch(items, **DECODE))


def test_generate_refuses_what_it_would_not_read_and_options_given_twice(corrector):
    """generate runs no gate and no fallback; an option given both ways (a NumPy array one of them)
    is ambiguous."""
    with pytest.raises(InputError, match="gate_threshold, fallback_below: generate runs no gate and no fallback"):
        corrector.generate([[5, 6, 1]], options=CorrectionOptions(gate_threshold=0.3, fallback_below=10))
    _names("input_ids", lambda: corrector.generate(np.array(3)))
    with pytest.raises(InputError, match="max_new_tokens: give the options either as keywords or as options="):
        corrector.correct_batch(REQUESTS, options=CorrectionOptions(), max_new_tokens=np.array([1, 2]))

    class NoTruth:  # a tensor's or pandas.NA's comparison: no truth value
        def __eq__(self, other):
            return self

        def __bool__(self):
            raise TypeError("no truth value")

    for odd in (NoTruth(), torch.tensor([1.0, 2.0])):
        with pytest.raises(InputError, match="length_penalty: give the options either as keywords or as options="):
            corrector.correct_batch(REQUESTS, options=CorrectionOptions(), length_penalty=odd)
    for default in ({"num_beams": 1}, {"length_penalty": 1}, {"num_beams": np.int64(1)}, {"drafts": np.bool_(True)}):
        assert corrector.correct_batch(REQUESTS, options=CorrectionOptions(**DECODE), **default)  # equal: not given


@pytest.mark.parametrize("candidates, message", [
    ("She goes.", "field 'candidates' must be a list of strings, got a string"),
    (None, "field 'candidates' must be a list of strings, got null"),
    ([], "'candidates' is an empty list"),
    (["ok", None], r"candidates\[1\] must be a string"),
])
def test_correct_checks_its_request_as_correct_batch_does(corrector, candidates, message):
    with pytest.raises(InputError, match=f"^item 0: .*{message}"):
        corrector.correct("she go", candidates, **DECODE)
    with pytest.raises(InputError, match=f"^item 0: .*{message}"):  # the same, whatever errors says
        corrector.correct("she go", candidates, errors="return", **DECODE)
    with pytest.raises(InputError, match="field 'source'"):
        corrector.correct(None, ["She goes."], **DECODE)


def test_an_option_in_a_request_dict_is_refused_not_ignored(corrector):
    request = {"source": "she go", "candidates": ["She goes."], "num_beams": 4}
    [got] = corrector.correct_batch([request], errors="return", **DECODE)
    assert isinstance(got, InputError) and str(got).startswith("field 'num_beams' is an option of the call")


def _with_bad(requests: list, bad: dict[int, dict]) -> list:
    out = list(requests)
    for n, request in sorted(bad.items()):
        out.insert(n, request)
    return out


@pytest.mark.parametrize("many", [False, True])  # many: more texts than `encode_batch` is used from
def test_a_request_that_is_not_unicode_fails_alone(corrector, many):
    good = make_requests(70, seed=3) if many else REQUESTS
    bad = {1: {"source": "she go" + SURROGATE, "candidates": ["She goes."]},
           3: {"source": "she go", "candidates": ["She goes.", SURROGATE + "x"]},
           4: {"id": "a" + SURROGATE, "source": "she go", "candidates": ["She goes."]}}
    got = corrector.correct_batch(_with_bad(good, bad), errors="return", **DECODE)
    assert [str(got[n]) for n in bad] == [
        "field 'source' holds a lone surrogate (U+D800), which is not Unicode text",
        "candidates[1] holds a lone surrogate (U+D800), which is not Unicode text",
        "field 'id' holds a lone surrogate (U+D800), which is not Unicode text"]
    answered = [c for c in got if not isinstance(c, InputError)]
    assert [c.token_ids for c in answered] == [c.token_ids for c in corrector.correct_batch(good, **DECODE)]
    assert [c.id for c in answered] == [r["id"] for r in good]
    alone = [corrector.correct_batch([r], **DECODE)[0] for r in good[:3]]
    assert [c.token_ids for c in answered[:3]] == [c.token_ids for c in alone]
    with pytest.raises(InputError, match=r"item 3: candidates\[1\] holds a lone surrogate"):
        corrector.correct_batch(_with_bad(good, {3: bad[3]}), **DECODE)


def test_the_gate_checks_and_passes_over_blank_first_candidates(corrector, gate):
    requests = [{"source": "she go", "candidates": ["  ", "She goes."]},
                {"source": "They was late.", "candidates": ["They were late."]},
                {"source": "It be fine.", "candidates": ["It is fine.", "It be fine."]}]
    got = corrector.correct_batch(requests, gate=gate, gate_threshold=0.0, **DECODE)
    assert not got[0].gated and got[1].gated and got[2].gated  # threshold 0 passes every candidate asked about
    _names("gate", lambda: corrector.correct_batch(requests, gate=corrector, **DECODE))


@pytest.mark.parametrize("argument, value", [
    ("max_new_tokens", 0), ("max_new_tokens", "4"),
    ("temperature", "x"), ("temperature", math.nan), ("temperature", -1.0), ("temperature", 1e-9),
    ("temperature", 1000.0), ("temperature", None),
    ("top_p", 0), ("top_p", 1.5), ("top_p", math.nan), ("top_p", "1"),
    ("seed", -1), ("seed", 1.5), ("seed", "1"),
    ("prefix", "text"), ("prefix", 3),
    ("batch_size", 0), ("batch_size", "8"),
    ("progress", 3), ("drafts", None), ("drafts", "no"),
])
def test_generate_batch_checks_each_option(generator, argument, value):
    _names(argument, lambda: generator.generate_batch(["a b"], **{"max_new_tokens": 4, argument: value}))


def test_a_generators_default_length_fits_the_positions_left(generator):
    tokens, positions = generator.tokenizer.encode, generator.manifest.max_input_tokens
    near_end = next(p for p in ("x y " * k + "z" * j for k in range(positions) for j in range(3))
                    if positions - 6 <= len(tokens(p).ids) < positions - 1)
    room = positions - len(tokens(near_end).ids) + 1  # the last new token is never fed back
    (sampled,) = generator.generate_batch([near_end], temperature=1.0, seed=0)  # sampled: no early end
    assert 1 <= len(sampled.token_ids) <= room
    # greedy with drafts, beside prompts that draft far (they repeat themselves): the near-end row's
    # padding slots are fed within the positions, and each row answers as it does alone
    batch = [near_end, "a b c a b c a b c a b c", "x y x y x y x y"]
    alone = [generator.generate_batch([p])[0].token_ids for p in batch]
    assert [g.token_ids for g in generator.generate_batch(batch)] == alone
    assert len(alone[0]) <= room
    with pytest.raises(InputError, match=f"item 0: the prompt's .* need .* of the model's {positions} positions"):
        generator.generate_batch([near_end], max_new_tokens=room + 1)


def test_generator_checks_prompts_and_prefixes(generator):
    _names("prompts", lambda: generator.generate_batch("a b", max_new_tokens=4))
    _names("prompts", lambda: generator.generate_batch(None, max_new_tokens=4))
    with pytest.raises(InputError, match="item 1: the prompt must be a non-empty string, got an empty one"):
        generator.generate_batch(["a", ""], max_new_tokens=4)
    with pytest.raises(InputError, match="item 1: the prompt must be a non-empty string, got only white space"):
        generator.generate_batch(["a", " \n"], max_new_tokens=4)  # as `lmcor generate` and the server refuse it
    assert generator.generate_batch(["a"], max_new_tokens=4, stop=["\n", " "])  # white space stops
    assert generator.prefix("\n")  # and heads a prompt (`lmcor candidates --prompt $'\n{source}'`)
    with pytest.raises(InputError, match=r"item 1: the prompt holds a lone surrogate \(U\+D800\)"):
        generator.generate_batch(["a", "b" + SURROGATE], max_new_tokens=4)
    with pytest.raises(InputError, match="item 0: the prompt's .* need .* of the model's 64 positions"):
        generator.generate_batch(["x y z " * 40], max_new_tokens=4)
    for text, message in [("", "must be a non-empty string"), (None, "must be a non-empty string"),
                          ("a" + SURROGATE, "lone surrogate"), ("x y z " * 40, "it must take 1 to 63")]:
        with pytest.raises(InputError, match=r"text \(the prefix\).*" + message):
            generator.prefix(text)
    assert generator.generate("a b", max_new_tokens=4) == generator.generate_batch(["a b"], max_new_tokens=4)[0].text
    _names("stop", lambda: generator.generate("a b", max_new_tokens=4, stop=np.array("x")))  # 0-d: not iterable
    sampled = dict(max_new_tokens=4, temperature=1.0)
    assert generator.generate("a b", seed=np.array(3), **sampled) == generator.generate("a b", seed=3, **sampled)


@pytest.mark.parametrize("argument, value", [
    ("batch_size", 0), ("batch_size", "32"), ("errors", "bogus"), ("progress", "x"),
])
def test_classify_batch_checks_each_option(gate, argument, value):
    _names(argument, lambda: gate.classify_batch(["a b"], **{argument: value}))


def test_a_text_that_is_not_unicode_fails_alone(gate):
    items = ["She goes to school.", ("a" + SURROGATE, "b"), {"text": "x", "pair": SURROGATE}, ("She goes.", "she go"),
             {"id": SURROGATE, "text": "x"}]
    got = gate.classify_batch(items, errors="return")
    assert [str(got[n]).split(" holds")[0] for n in (1, 2, 4)] == ["field 'text'", "field 'pair'", "field 'id'"]
    for n in (0, 3):
        np.testing.assert_array_equal(got[n].probabilities, gate.classify_batch([items[n]])[0].probabilities)
    _names("items", lambda: gate.classify_batch("a b"))
    with pytest.raises(InputError, match="item 0: field 'text' holds a lone surrogate"):
        gate.classify(SURROGATE)


@pytest.mark.parametrize("threads", ["2", 0, -1, 2.5, True])
def test_load_checks_threads(bundles, threads):
    with pytest.raises(InputError, match="threads must be an integer"):
        Corrector.load(bundles["t5"], threads=threads)


@pytest.mark.parametrize("load", [Corrector.load, Classifier.load, Generator.load])
def test_load_checks_the_path_and_verify(bundles, load):
    for path in (5, 2.5 if load == Corrector.load else None, ["a"]):  # None: the shipped corrector
        with pytest.raises(InputError, match="a bundle is a folder's path"):
            load(path)
    with pytest.raises(InputError, match="verify must be true or false"):
        load(bundles["t5"], verify="no")


def test_a_bundle_whose_path_is_not_utf8_is_refused_by_name(bundles, tmp_path):
    """ONNX Runtime takes paths as UTF-8 text: one holding other bytes failed with its pybind11 types."""
    import shutil

    copy = shutil.copytree(bundles["t5"], tmp_path / "bundle\udcff")
    with pytest.raises(InputError, match=re.escape(f"{copy}: the path is not UTF-8 (byte 0xff), which ONNX Runtime")):
        Corrector.load(copy)


def test_a_shipped_bundles_name_is_checked():
    for name in (None, "", "../models/gate", 3):
        with pytest.raises(InputError, match="a shipped bundle's name is one of 'default', 'default-int8', 'gate'"):
            shipped_bundle(name)


def test_a_source_longer_than_any_input_is_refused_before_tokenizing(corrector):
    """Its cost stays bound: the check counts characters, the tokenizer would read them all."""
    from lmcor.runtime.tokens import MAX_CHARS_PER_TOKEN, encode_requests

    read, tokenizer = [], corrector.tokenizer

    class Counting:  # the lengths of the texts it tokenizes
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, text, **options):
            read.append(len(text))
            return tokenizer.encode(text, **options)

    most = corrector.manifest.max_input_tokens * MAX_CHARS_PER_TOKEN
    long = "x y " * most
    (refused,) = encode_requests(Counting(), corrector.manifest.template, [Request(long, ("y",))],
                                 corrector.manifest.max_input_tokens)
    assert isinstance(refused, InputError) and "characters besides white space" in str(refused)
    assert read and max(read) < 2 * most < len(long)  # its head only
    shipped = Corrector.load()  # SentencePiece: a run of characters it does not know is one token
    (folded,) = encode_requests(shipped.tokenizer, shipped.manifest.template, [Request("中" * 40_000, ("y",))],
                                shipped.manifest.max_input_tokens)
    assert not isinstance(folded, InputError) and len(folded.ids) < 20
    spaced = "she go " + " " * len(long) + "home"  # white space does not count: a tokenizer may fold it
    (read,) = encode_requests(tokenizer, corrector.manifest.template, [Request(spaced, ("y",))],
                              corrector.manifest.max_input_tokens)
    assert "characters besides white space" not in str(read)


def test_classifications_compare_by_identity(gate):
    """Their probabilities are an array: `==` (and `in`) may not ask NumPy for one truth value."""
    a, b = gate.classify_batch(["She goes home.", "She goes home."])
    assert a == a and a != b and a in [b, a] and len({a, b}) == 2
