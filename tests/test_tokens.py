"""Templates and truncation: candidates shrink evenly, the source is never cut silently."""

import pytest
from lmcor.runtime.bundle import Template
from lmcor.runtime.errors import InputError
from lmcor.runtime.request import Request, as_request
from lmcor.runtime.template import render
from lmcor.runtime.tokens import cut_to_read, encode_requests
from tokenizers import Tokenizer


def test_lmcor_template_is_the_default():
    text, spans, source = render(Template(), "she go", ["She goes.", "she goes"])
    assert text == "source: she go\ncandidates: She goes. <extra_id_0> she goes"
    assert [text[a:b] for a, b in spans] == ["She goes.", "she goes"] and text[slice(*source)] == "she go"


def test_genfuser_style_template_and_braces_in_user_text():
    template = Template(text="{source}{candidates}", candidate=" <extra_id_{i}> {candidate}", separator="")
    text, spans, source = render(template, "x {candidates} y", ["a {i}", "b"])
    assert text == "x {candidates} y <extra_id_0> a {i} <extra_id_1> b"
    assert [text[a:b] for a, b in spans] == ["a {i}", "b"] and text[slice(*source)] == "x {candidates} y"


def test_a_placeholder_used_twice_is_filled_twice_and_spans_its_first_place():
    template = Template(text="{source} | {source}: {candidates}", candidate="{candidate}={candidate}", separator=", ")
    text, spans, source = render(template, "s", ["a", "bc"])
    assert text == "s | s: a=a, bc=bc"
    assert [text[a:b] for a, b in spans] == ["a", "bc"] and spans[1] == (12, 14) and source == (0, 1)


@pytest.fixture
def tokenizer(bundles) -> Tokenizer:
    return Tokenizer.from_file(str(bundles["t5v11"] / "tokenizer.json"))


def test_short_input_is_tokenized_whole(tokenizer):
    request = Request("the cat", ("The cat.", "the cats"))
    [got] = encode_requests(tokenizer, Template(), [request], 512)
    assert not got.truncated
    assert got.ids.tolist() == tokenizer.encode(render(Template(), request.source, request.candidates)[0]).ids


def test_references_are_the_prompts_own_tokens_of_each_candidate_and_the_source(tokenizer):
    request = Request("she go to school every days", ("She goes to school every day.", "she go to school every day",
                                                      "She goes to the school every days."))
    [got] = encode_requests(tokenizer, Template(), [request], 512, references=True)
    texts = [*request.candidates, request.source]
    assert [r.tolist() for r in got.references] == [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert all(set(r.tolist()) <= set(got.ids.tolist()) for r in got.references)
    [plain] = encode_requests(tokenizer, Template(), [request], 512)
    assert plain.references == () and plain.ids.tolist() == got.ids.tolist()


@pytest.mark.parametrize("character", ["…", "½", "™"])
def test_a_character_of_several_tokens_is_never_cut_through(character):
    """The shipped tokenizer normalizes "…" to "..." (three tokens at one character): a cut there kept all
    three, every round alike, and a request that fits was refused."""
    from lmcor.runtime.bundle import load_manifest, shipped_bundle
    from lmcor.runtime.tokens import load_tokenizer

    bundle = shipped_bundle("default")
    manifest = load_manifest(bundle, verify=False)
    tokenizer = load_tokenizer(bundle / manifest.files["tokenizer"])
    request = Request("She go home.", ["She goes home" + character * 6, "She goes home."])
    full = len(tokenizer.encode(render(manifest.template, request.source, request.candidates).text).ids)
    for limit in range(full - 1, full - 14, -1):
        [got] = encode_requests(tokenizer, manifest.template, [request], limit)
        assert not isinstance(got, InputError), (limit, got)
        assert got.truncated and len(got.ids) <= limit


def test_long_candidates_are_shortened_evenly(tokenizer):
    long = "My brother went to the station and the city center every day, quietly. " * 4
    request = Request("She go to school every days.", (long, "She goes to school.", long[::-1], long + long))
    full = len(tokenizer.encode(render(Template(), request.source, request.candidates)[0]).ids)
    limit = full // 2
    [got] = encode_requests(tokenizer, Template(), [request], limit)
    assert got.truncated and len(got.ids) <= limit
    ids = got.ids.tolist()
    assert _contains(ids, tokenizer.encode(request.source, add_special_tokens=False).ids)  # the source is intact
    separator = tokenizer.token_to_id("<extra_id_0>")
    cuts = [i for i, t in enumerate(ids) if t == separator]
    pieces = [ids[cuts[0] + 1 : cuts[1]], ids[cuts[1] + 1 : cuts[2]], ids[cuts[2] + 1 : -1]]
    short = tokenizer.encode("She goes to school.", add_special_tokens=False).ids
    assert pieces[0][: len(short)] == short  # the short one is kept whole (a separator space may follow)
    assert abs(len(pieces[1]) - len(pieces[2])) <= 2  # long ones cut to one length, each keeping its head
    kept = tokenizer.decode(pieces[2]).strip()
    assert len(kept) > 20 and (long + long).startswith(kept)


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_source_too_long_is_an_error_not_a_cut(tokenizer):
    request = Request("word " * 200, ("a", "b"))
    [got] = encode_requests(tokenizer, Template(), [request], 64)
    assert isinstance(got, InputError) and "never cut" in str(got)
    [got] = encode_requests(tokenizer, Template(), [Request("word " * 200, ("a",))], 64)
    assert "the separators of 1 candidate)" in str(got) and "less than a token for the candidate" in str(got)


def test_too_many_candidates_is_said_so(tokenizer):
    """A short source with more candidates than the input has tokens for: the message says both ways out."""
    [got] = encode_requests(tokenizer, Template(), [Request("She go.", ("She goes.",) * 40)], 64)
    assert isinstance(got, InputError) and "the separators of 40 candidates" in str(got)
    assert "shorten the source or send fewer candidates" in str(got)


def test_more_candidates_than_input_tokens_are_refused_before_tokenizing(tokenizer):
    """Each candidate keeps a token at least: a request with as many candidates as the input has
    tokens cannot fit, and is refused at once (tokenizing it would cost time that grows with their
    number); the others of its batch are served as if alone."""
    crowded, fine = Request("She go.", ("x",) * 64), Request("She go.", ("She goes.",) * 3)
    calls = []

    class Counting:  # the tokenizer, counting the texts it is given
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode_batch(self, texts, **options):
            calls.extend(texts)
            return tokenizer.encode_batch(texts, **options)

        def encode(self, text, *args, **options):
            calls.append(text)
            return tokenizer.encode(text, *args, **options)

    got = encode_requests(Counting(), Template(), [crowded, fine, crowded], 64, references=True)
    assert [isinstance(g, InputError) for g in got] == [True, False, True]
    assert "64 candidates cannot fit the model's 64 input tokens" in str(got[0])
    [alone] = encode_requests(tokenizer, Template(), [fine], 64, references=True)
    assert got[1].ids.tolist() == alone.ids.tolist() and len(calls) == 1


def test_the_tokens_of_each_span_are_a_plain_scans(tokenizer):
    """`_tokens_in` finds each span's tokens by bisection; a plain scan of every token for every span
    (the first span that a token overlaps takes it) gives the same, whatever the spans' order."""
    import random

    import numpy as np
    from lmcor.runtime.tokens import _tokens_in

    def scan(encoding, spans):
        taken, out = set(), []
        for s_start, s_end in spans:
            found = [n for n, ((start, end), special) in enumerate(zip(encoding.offsets, encoding.special_tokens_mask))
                     if not special and n not in taken
                     and ((s_start < start <= s_end) if start == end else (start < s_end and end > s_start))]
            taken.update(found)
            out.append(found)
        return out

    rng = random.Random(0)
    words = ["the", "cat", ",", "école", "中文", "\u200b", "", "\n", "<extra_id_0>", "  "]
    for _ in range(400):
        text = "".join(rng.choice(words) + rng.choice([" ", "", "  "]) for _ in range(rng.randint(0, 25)))
        cuts = sorted(rng.randint(0, len(text)) for _ in range(2 * rng.randint(1, 5)))
        spans = [(max(0, cuts[i] - rng.randint(0, 1)), cuts[i + 1]) for i in range(0, len(cuts), 2)]
        rng.shuffle(spans)
        encoding = tokenizer.encode(text)
        assert [t.tolist() for t in _tokens_in(encoding, spans)] == scan(encoding, spans), (text, spans)
        assert all(t.dtype == np.int64 for t in _tokens_in(encoding, spans))


@pytest.mark.parametrize(
    "item, message",
    [
        ({"candidates": ["a"]}, "missing field 'source'"),
        ({"source": "  ", "candidates": ["a"]}, "'source' is only white space"),
        ({"source": "a", "candidates": []}, "empty list"),
        ({"source": "a", "candidates": "b"}, "must be a list of strings"),
        ({"source": "a", "candidates": ["b", 3]}, r"candidates\[1\] must be a string"),
        ({"source": 5, "candidates": ["b"]}, "'source' must be a string"),
        (42, "expected an object"),
    ],
)
def test_bad_requests_name_the_field(item, message):
    with pytest.raises(InputError, match=message):
        as_request(item)


def test_a_candidate_is_cut_by_what_the_model_reads_not_by_white_space():
    most = 12
    assert cut_to_read("good" + " " * 100 + "bad", most) == "good" + " " * 100 + "bad"
    assert cut_to_read("abcdef ghijkl mnop", most) == "abcdef ghijkl"
    assert cut_to_read("abcdef ghijklmnop", most) == "abcdef ghijkl"
    assert cut_to_read("x" * 40, most) == "x" * 12 and cut_to_read("short", most) == "short"


def test_white_space_a_byte_level_tokenizer_trims_to_nothing_counts_for_its_candidate(bundles):
    """BART's tokenizer (RobertaProcessing, trim_offsets) gives tokens of white space alone empty offsets;
    they are their candidate's, so candidates holding runs of spaces or line breaks are cut to fill the
    input, not refused as if the source took those tokens."""
    tokenizer = Tokenizer.from_file(str(bundles["bart"] / "tokenizer.json"))
    source = "My brother don't like the meeting at 10."
    fixed = len(tokenizer.encode(render(Template(), source, ["", ""])[0]).ids)
    for spaced in ("word     " * 40, "x\n\n\n\t " * 60):
        request = Request(source, (spaced, "My brother doesn't like the meeting at 10."))
        [got] = encode_requests(tokenizer, Template(), [request], fixed + 60, references=True)
        assert not isinstance(got, InputError), got
        assert got.truncated and fixed + 55 <= len(got.ids) <= fixed + 60  # filled, not cut far short
        assert got.candidates[1] == request.candidates[1]  # the short one whole
        assert len(got.references[0]) + len(got.references[1]) + len(got.references[2]) >= 55
