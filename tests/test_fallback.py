"""The fallback: sacrebleu's sentence chrF, the nearest candidate, outputs that stray from every
candidate replaced by it (by option, by the bundle's calibrated threshold, from the CLI), and the
recipe that calibrates the threshold."""

import dataclasses
import json
import shutil

import pytest
from conftest import english_sentences, make_requests
from lmcor.bench.quality import score
from lmcor.recipes import fallback as recipe
from lmcor.runtime.bundle import load_manifest, shipped_bundle, write_manifest
from lmcor.runtime.errors import InputError
from lmcor.runtime.fallback import best_guess, char_ngrams, chrf, guard, nearest
from lmcor.runtime.request import Correction
from lmcor.runtime.vote import adds_fixes, edit_vote, minimal_edits

from lmcor import Corrector
from lmcor.cli import main


def test_chrf_is_sacrebleus_sentence_chrf():
    from sacrebleu.metrics import CHRF

    sacrebleu = CHRF()
    texts = english_sentences(12, seed=11) + ["", " ", "a", "ab", "Ünïcödé, naïve café!", "x y  z", "xyz", "...?!"]
    for hypothesis in texts:
        for reference in texts:
            expected = sacrebleu.sentence_score(hypothesis, [reference]).score
            assert chrf(char_ngrams(hypothesis), char_ngrams(reference)) == pytest.approx(expected, abs=1e-9)


def test_nearest_candidate_and_guard():
    candidates = ["The cat sat on the mat.", "A dog ran in the park.", "The cat sat on a mat."]
    assert nearest("The cat sat on a mat.", candidates) == (2, 100.0)
    index, similarity = nearest("The cat sat on the mat", candidates)
    assert index == 0 and 80 < similarity < 100
    lost = Correction("The cat mat.", [5, 6, 7])
    replaced = guard(lost, candidates, 90)
    assert replaced.text == candidates[best_guess(lost.text, None, candidates)] and replaced.fallback
    assert replaced.text.startswith("The cat") and replaced.token_ids == []
    assert guard(lost, candidates, 0) is lost
    close = Correction("The cat sat on the mat!", [5])
    assert guard(close, candidates, 80) is close


def test_the_fallback_takes_the_best_guess_not_the_nearest_candidate():
    """An output that strayed towards an odd candidate is replaced by the text the candidates agree
    on, which the source can be."""
    source = "The results was surprising, and nobody expected them."
    candidates = ["The results were surprising, and nobody expected them.",
                  "The results were surprising and nobody expected them.", "Results surprised nobody.", source]
    lost = Correction("Results surprised nobody nobody.", [5])
    assert nearest(lost.text, candidates)[0] == 2
    assert guard(lost, candidates, 99).text == candidates[0]
    assert guard(lost, candidates, 99, source=source).text == candidates[0]
    # A weak LLM drops a different clause in each answer: the source holds what they all kept.
    partial = ["She goes to class.", "She likes it.", "Every day, she likes it.", "She goes to class every day."]
    assert best_guess("She she she", "She go to class every day, and she likes it.", partial) == 0


def test_corrector_falls_back_by_option_and_by_manifest(bundles, tmp_path):
    requests = make_requests(8, seed=7)
    corrector = Corrector.load(bundles["t5"])
    assert corrector.manifest.fallback_below is None
    plain = corrector.correct_batch(requests, max_new_tokens=8)
    assert not any(c.fallback for c in plain)
    strict = corrector.correct_batch(requests, max_new_tokens=8, fallback_below=100)
    # A random model writes text unlike its candidates: every such output is replaced.
    assert sum(c.fallback for c in strict) >= 6
    for s, p, r in zip(strict, plain, requests):
        replacements = (r["source"], *r["candidates"], edit_vote(r["source"], r["candidates"]))
        assert (s.text == p.text) if not s.fallback else (s.text in replacements and s.text != p.text)
        assert s.stats.output_tokens == p.stats.output_tokens
    calibrated = tmp_path / "bundle"
    shutil.copytree(bundles["t5"], calibrated)
    write_manifest(calibrated, dataclasses.replace(load_manifest(calibrated), fallback_below=100.0))
    corrector = Corrector.load(calibrated)
    assert [c.text for c in corrector.correct_batch(requests, max_new_tokens=8)] == [c.text for c in strict]
    assert [c.text for c in corrector.correct_batch(requests, max_new_tokens=8, fallback_below=0)] == [
        c.text for c in plain]
    for wrong in (-1, 100.5, "90"):
        with pytest.raises(InputError, match="fallback_below must be a chrF between 0 and 100"):
            corrector.correct_batch(requests, fallback_below=wrong)


def test_cli_correct_and_eval_count_fallbacks(bundles, tmp_path, capsys):
    requests = make_requests(5, seed=3)
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "-q", "--stats",
            "--max-new-tokens", "8", "--fallback-below", "100"]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    fallbacks = sum(bool(r.get("fallback")) for r in records)
    assert fallbacks and f", {fallbacks} replaced by the fallback" in capsys.readouterr().err
    for record, request in zip(records, requests):  # a guess or the vote, kept to a writer's fixes
        source, candidates = request["source"], request["candidates"]
        chosen = {minimal_edits(source, text, 0, candidates=candidates)
                  for text in (source, *candidates, edit_vote(source, candidates))}
        assert not record.get("fallback") or record["output"] in chosen
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(dict(r, target=r["candidates"][0])) for r in requests) + "\n")
    assert main(["eval", "--model", str(bundles["t5"]), str(data), "--json", str(tmp_path / "e.json"),
                 "--max-new-tokens", "8", "--fallback-below", "100"]) == 0
    assert f"({fallbacks} of 5 outputs changed by the fallback: a best guess, the edit vote, or edits kept small)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["fallbacks"] == fallbacks


def test_calibration_writes_the_lowest_threshold_and_largest_span_as_good_as_the_best(bundles, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["t5"], bundle)
    dev = tmp_path / "dev.jsonl"
    requests = make_requests(8, seed=9)
    requests += [dict(r, candidates=[c * 40 for c in r["candidates"]]) for r in requests[:3]]  # cut to fit
    dev.write_text("\n".join(json.dumps(dict(r, target=r["candidates"][0])) for r in requests) + "\n")
    tried = recipe.calibrate_bundle(bundle, dev)
    chosen = tried[0]
    manifest = load_manifest(bundle)
    assert (manifest.fallback_below, manifest.fallback_span or 0) == (chosen["threshold"], chosen["span"])
    # what it scored is what the runtime returns, truncated requests included
    results = Corrector.load(bundle).correct_batch([{k: r[k] for k in ("source", "candidates")} for r in requests])
    assert sum(r.truncated for r in results) == 3
    assert score([r.text for r in results], [r["candidates"][0] for r in requests]) == {
        k: chosen[k] for k in ("exact_match", "chrf")}
    assert len(tried) == 1 + (len(recipe.THRESHOLDS) - 1) * len(recipe.SPANS)
    value = [t["exact_match"] + t["chrf"] for t in tried]
    best = max(value)
    assert value[0] >= best - 0.05
    widest = float("inf")
    assert all(v < best - 0.05 for t, v in zip(tried, value) if (t["threshold"], -(t["span"] or widest))
               < (chosen["threshold"], -(chosen["span"] or widest)))
    assert chosen["threshold"] > 0 and chosen["fell_back"] > 0  # a random model's outputs are worth replacing


def test_the_shipped_correctors_carry_a_calibrated_fallback():
    for name in ("default", "default-int8"):
        manifest = load_manifest(shipped_bundle(name))
        assert 50 <= manifest.fallback_below < 100 and manifest.fallback_span in (None, *recipe.SPANS[1:])


def test_minimal_edits_keep_small_edits_and_the_source_elsewhere():
    source = "If shear is not given : return the current shearfactor , i. e. the tangent"
    assert minimal_edits(source, "If shearfactor , i. e. the tangent", 2) == source  # a skip: 7 words dropped
    assert minimal_edits("she go to school every days", "She goes to school every day.", 2) == (
        "She goes to school every day.")
    # The sentence's frame (a first capital, an end mark) is no part of an edit: "She goes" is an edit
    # of 1 word, and "home" -> "home." none.
    assert minimal_edits("she go to school every days", "She goes to school every day.", 1) == (
        "She goes to school every day.")
    assert minimal_edits("she go home", "She goes home.", 2) == "She goes home."
    assert minimal_edits("she go home", "She goes home.", 1) == "She goes home."  # capital and end mark: no span
    assert minimal_edits("she go home", "She goes to the home.", 1) == "she go home"  # one edit of 5 words
    assert minimal_edits("we met the Big old man", "we met a big new man", 2) == "we met the Big old man"
    # A word written next to itself is a stutter of the model's copying, not a fix; a doubled one dropped is.
    assert minimal_edits("I saw the cat", "I saw the the cat", 2) == "I saw the cat"
    assert minimal_edits("she go home", "She goes home home.", 2) == "She goes home"
    assert minimal_edits("I saw the the cat", "I saw the cat", 2) == "I saw the cat"
    assert minimal_edits("a b c", "x y z w", 3) == "a b c" and minimal_edits("a b c", "x y z w", 4) == "x y z w"
    assert minimal_edits("", "a b", 2) == "a b" and minimal_edits("a b", "", 2) == ""
    # nothing left out: the text as it is, its spacing and line breaks too (not a change of the fallback's)
    assert minimal_edits("a b c", "a  b\nc", 2) == "a  b\nc" and minimal_edits("a b", "a\tb.", 1) == "a\tb."


def test_a_case_changed_inside_a_sentence_is_no_writers_fix():
    """A weak LLM respells names ("SocketIO" -> "socketio") and capitalizes common words; a writer's
    case errors are a sentence's first word and the pronoun I."""
    for source, text in [("Create new Popen insance.", "Create new Popen Insance."),
                         ("the first satellite to orbit the earth.", "the first satellite to orbit the Earth."),
                         ("Perform a Turtle-data update.", "Perform a turtle-data update.")]:
        assert minimal_edits(source, text, 2) == source, text
    assert minimal_edits("True if the SocketIO is open on seeking.", "True if the socketio is open for seeking.", 2) \
        == "True if the SocketIO is open for seeking."  # the fix beside it stays
    assert minimal_edits("she went home. he slept", "She went home. He slept.", 2) == "She went home. He slept."
    assert minimal_edits("yesterday i went home", "Yesterday I went home.", 2) == "Yesterday I went home."


def test_minimal_edits_keep_a_writers_fixes_and_leave_rewrites_out():
    """With a span, fixes of the errors writers make are kept; a weak LLM's swapped and dropped content
    words are not. Span 0 keeps edits of any size and kind (tasks that rewrite)."""
    fixes = [
        ("He have a dog .", "He has a dog ."),  # short words swapped
        ("She recieve the leter", "She receives the letter"),  # respelled, inflected
        ("He went in home", "He went home"),  # a short word dropped
        ("We went museum", "We went to the museum"),  # short words written
        ("The the cherry tree bloomed", "The cherry tree bloomed"),  # a doubled word dropped
        ("Demotic Demotic script", "Demotic script"),
        ("What we look for depends", "What we depends look for"),  # words moved
    ]
    for source, text in fixes:
        assert minimal_edits(source, text, 2) == text, (source, text)
    rewrites = [
        ("These are troublous times.", "These are difficult times."),
        ("He stood foursquare for liberty", "He stood for liberty"),  # a content word dropped
        ("He has a master's touch.", "He has a master's degree."),
        ("Round numbers are always false.", "Round numbers are always correct."),
    ]
    for source, text in rewrites:
        assert minimal_edits(source, text, 2) == source, (source, text)
    assert minimal_edits("These are troublous times.", "These are difficult times.", 0) == "These are difficult times."
    # each edit on its own: the rewrite goes, the fix beside it stays
    assert minimal_edits("He stood foursquare for religous liberty", "He stood for religious liberty", 2) == (
        "He stood foursquare for religious liberty")
    # a short word most candidates drop too (a tense fixed), kept; one that few drop, not
    source = "I have visited Paris in 2019 ."
    agreeing = ["I visited Paris in 2019 .", "I visited Paris on 2019 .", "I have visited Paris in 2019 ."]
    assert minimal_edits(source, "I visited Paris in 2019 .", 2, candidates=agreeing) == "I visited Paris in 2019 ."
    assert minimal_edits(source, "I visited Paris in 2019 .", 2, candidates=agreeing[1:]) == source
    assert minimal_edits(source, "I visited Paris in 2019 .", 2) == source
    # a move whose other half is left out is a drop: the words are never lost
    assert minimal_edits("A liberty B C D", "A B C liberty and tolerance forever D", 2) == "A liberty B C D"


def test_a_writers_fix_leaves_brackets_quotes_colons_and_dashes_in_place():
    """A weak LLM drops marks with what they hold ("(K)", "tup :", quotes); a writer's slip never
    touches them. Commas, semicolons, end marks, apostrophes, a doubled word dropped and words moved
    as they are stay fixes."""
    for source, text in [
        ("Lst the dim (K) must be divisible by 32.", "Last dim must be divisible by 32."),
        ("parameters ---------- tup : sequence of arrays.", "parameters : sequence of arrays."),
        ('Check that "not implemented" operations prduce a failure.',
         "Check that not implemented operations produce a failure."),
        ("Each a domain must (successfully) convert.", "Each domain must successfully convert."),
        ("Args: tree: a pytree", "Args: a pytree."),
        ("Three families of strategies: 1.", "Three families of strategies: 2."),  # a number is no slip
    ]:
        kept = minimal_edits(source, text, 2)
        assert all(mark in kept for mark in '():"-1' if mark in source), (source, kept)
    assert minimal_edits("Lst the dim (K) must be divisible by 32.", "Last dim (K) must be divisible by 32.", 2) == \
        "Last dim (K) must be divisible by 32."  # its other fixes stay
    for source, text in [
        ("She was drop-dead drop-dead gorgeous.", "She was drop-dead gorgeous."),  # a doubled word
        ("the same character probable (the delimiter).", "the same character (the probable delimiter)."),  # a move
        ("This is a dictionary of pairs. str-str", "This is a dictionary of str-str pairs."),
        ("He don't know, why", "He doesn't know why."),  # a contraction respelled, a comma dropped
        ("The childrens' toys are here.", "The children's toys are here."),  # apostrophes are a writer's
        ("It’s tail is long.", "Its tail is long."), ("John 's car", "John's car"),
        ("However; I like it.", "However, I like it."),  # and semicolons
    ]:
        assert minimal_edits(source, text, 2) == text, (source, text)


def test_a_word_respelled_is_a_writers_slip_fixed_not_another_word():
    """One letter dropped, added, changed or two swapped, another form of the same stem or irregular
    verb, a contraction's: a writer's fix. A weak LLM's respelling into another word is left out."""
    from lmcor.runtime.inflection import slip

    for old, new in [("recieve", "receive"), ("formattted", "formatted"), ("studied", "study"), ("running", "run"),
                     ("walked", "walking"), ("finding", "found"), ("giving", "given"), ("wrote", "writing"),
                     ("beginning", "began"), ("doesn't", "don't"), ("weren't", "wasn't"), ("quick", "quickly"),
                     ("your", "you're"), ("there", "they're"), ("don’t", "doesn’t"), ("tommorow", "tomorrow"),
                     ("dissapointed", "disappointed"), ("childs", "children"), ("teached", "taught")]:
        assert slip(old, new) and slip(new, old), (old, new)
    for old, new in [("shothand", "shohad"), ("pytree", "tree"), ("counnt", "counc"), ("precisely", "exactly"),
                     ("negative", "positive"), ("dtype", "data"), ("found", "fund!"), ("eventlist", "event")]:
        assert not slip(old, new), (old, new)
    source = "Shothand for creating marginchart."
    assert minimal_edits(source, "Shohad for creating margaritart.", 2) == source
    assert minimal_edits("Counnt flops for matmul.", "Counc goes for matmul.", 2) == "Counnt flops for matmul."
    assert minimal_edits("has went home", "have gone home", 2) == "have gone home"  # short words, each
    assert minimal_edits("what one finding uncertain", "What one found uncertain", 2) == "What one found uncertain"


def test_the_span_applies_to_whatever_the_guard_returns(bundles):
    """Through `correct_batch`: every returned text is within the span of its source (and marked as
    a fallback where that changed it); a fallback of 0 leaves the model's output, and a span without
    a fallback (this bundle has none calibrated) is refused, not ignored."""
    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(10, seed=3)
    plain = corrector.correct_batch(requests, max_new_tokens=8, fallback_below=0, fallback_span=0)
    assert [c.text for c in plain] == [c.text for c in corrector.correct_batch(requests, max_new_tokens=8)]
    for off in ({"fallback_below": 0}, {}):
        with pytest.raises(InputError, match="fallback_span must come with the fallback"):
            corrector.correct_batch(requests, fallback_span=2, **off)
    # and one whose candidates agree on a rewrite wider than the span: the guard's best guess, cut to it
    requests.append({"source": "she go home", "candidates": ["She goes to the home."] * 3})
    plain.append(corrector.correct_batch(requests[-1:], max_new_tokens=8, fallback_below=0)[0])
    guarded = corrector.correct_batch(requests, max_new_tokens=8, fallback_below=100, fallback_span=1)
    for c, p, r in zip(guarded, plain, requests):
        assert minimal_edits(r["source"], c.text, 1) == c.text and c.fallback == (c.text != p.text)
    assert guarded[-1].text != "She goes to the home."
    with pytest.raises(InputError, match="fallback_span"):
        corrector.correct_batch(requests, fallback_span=-1)


def test_best_guess_is_the_same_with_the_compiled_core_and_without():
    from lmcor.runtime import core

    if core.built() is None:
        pytest.skip("lmcor._core is not built")
    requests = make_requests(40, seed=5)
    outputs = english_sentences(40, seed=9)
    try:
        got = {}
        for enabled in (True, False):
            core.configure(enabled)
            got[enabled] = [best_guess(o, r["source"], r["candidates"]) for o, r in zip(outputs, requests)]
    finally:
        core.configure()
    assert got[True] == got[False]


def test_the_candidates_outvote_an_output_that_missed_their_edits():
    """Each candidate keeps one error of the source; every error is fixed by most candidates."""
    source = "My brother have two cat and a dog."
    candidates = ["My brother has two cats and a dog.", "My brother has two cat and a dog.",
                  "My brother have two cats and a dog.", "My brother has two cats and dog.",
                  "My brother has two cats and a dog."]
    assert edit_vote(source, candidates) == "My brother has two cats and a dog."
    assert edit_vote(source, candidates, need=5) == source  # no edit is made by all five
    missed = Correction("My brother has two cats and dog.", [5])
    voted = guard(missed, candidates, 50, source=source)
    assert voted.text == "My brother has two cats and a dog." and voted.fallback
    assert guard(missed, candidates, 0, source=source) is missed  # 0: the model's output as it is
    # A truncated request (the model read cut candidates) is voted on the whole candidates.
    assert guard(missed, candidates, 50, source=source, seen=[c[:20] for c in candidates]).text == voted.text


def test_the_vote_adds_the_respelled_and_dropped_words_two_candidates_agree_on():
    """Candidates that slip independently: two fix a misspelling or drop a stray word that the output
    (and most candidates) kept. The vote makes every edit the output makes and those: it is taken,
    though the candidates that missed the fix resemble the output more. Words the vote writes or
    replaces otherwise ("mopping" -> "mop": a weak LLM's samples rewrite alike) are weighed as before."""
    source = "The book had a leatther binding."
    candidates = ["The book had a leather binding.", "The book had a leatther binding.", "The book had a leatther binding.",
                  "An book had a leatther binding.", "The book had a leather binding."]
    got = guard(Correction(source, [5]), candidates, 50, source=source, span=2)
    assert got.text == "The book had a leather binding." and got.fallback
    source = "I kept the myself up all nihgt studying."
    candidates = ["I kept the myself up all night studying.", "I kept myself up all night studying.",
                  "I kept myself up all night the studying.", "I kept the myself up all night studying.",
                  "I kept myself up all night studying."]
    output = Correction("I kept the myself up all night studying.", [5])
    assert guard(output, candidates, 50, source=source, span=2).text == "I kept myself up all night studying."
    assert adds_fixes(source, output.text, "I kept myself up all night studying.")
    # A clause two samples drop alike is a rewrite, not a slip: each added fix is one word.
    assert not adds_fixes("He left early, tired of the noise.", "He left early, tired of the noise.", "He left early.")
    # An edit of the output's own that the vote lacks: not the output with more fixes.
    assert not adds_fixes(source, "I kept the myself up all night studying hard.", "I kept myself up all night studying.")
    source = "He a gave it a good mopping."
    candidates = ["He gave it a good mopping.", "He gave it a good mop.", "He gave a good mopping to the beekeeper.",
                  "He gave it a good mopping.", "He gave it a good mop."]
    assert not adds_fixes(source, "He gave it a good mopping.", "He gave it a good mop.")
    assert guard(Correction("He gave it a good mopping.", [5]), candidates, 50, source=source, span=2).text \
        == "He gave it a good mopping."


def test_a_vote_of_no_edit_does_not_undo_the_outputs_corrections():
    """Where no edit reaches the vote (one candidate's edits never do), the vote is the source, which
    a candidate resembles more than a cut output: it must not replace the output's corrections."""
    source = "She go to school every days. He go home late."
    candidate = "She goes to school every day. He goes home late."
    cut = Correction("She goes to school every day.", [5])  # the model stopped after the first sentence
    kept = guard(cut, [candidate], 50, source=source, span=2)
    # its fix kept; the edit that ends where it stopped ("days. He go home late." -> "day.") left out
    assert kept.text == "She goes to school every days. He go home late."
    assert guard(Correction(candidate, [5]), [candidate], 50, source=source, span=2).text == candidate


def test_a_long_request_the_model_read_cut_is_voted_on_whole_candidates():
    """Many sentences, each with an error every candidate fixes: the model read the candidates cut and
    fixed the first error; the vote, which reads them whole, fixes them all. A candidate far longer
    than the source is left out of the vote, whose cost stays bound by the source."""
    source = " ".join(f"She go to school on day {n}." for n in range(30))
    fixed = " ".join(f"She goes to school on day {n}." for n in range(30))
    partly = Correction(source.replace("She go ", "She goes ", 1), [5])
    candidates = [fixed] * 4 + [fixed * 50]
    got = guard(partly, candidates, 50, source=source, seen=[c[:200] for c in candidates], span=2)
    assert got.text == fixed and got.fallback


def test_edit_vote_keeps_the_source_where_the_candidates_disagree():
    source = "She go to class every day, and she likes it."
    rewrites = ["She goes to class.", "She attends her classes daily and enjoys them.", "Every day, she likes it."]
    assert edit_vote(source, rewrites) == source


def test_a_move_whose_new_place_is_too_far_is_not_kept_as_a_drop():
    """"me" moved to the end takes a 3-word edit there, past the span: its drop alone would lose it."""
    source = "She explained me the problem."
    assert minimal_edits(source, "She explained the problem to me.", 2) == source
    assert minimal_edits("He quickly ran home.", "He ran home quickly.", 2) == "He ran home quickly."
    # the other way: the drop is too large, and the words written alone would stand twice
    for source, moved in (("I like very much this song.", "I like this song very much."),
                          ("She gave to me the book.", "She gave the book to me.")):
        assert minimal_edits(source, moved, 2) == source


def test_of_two_edits_from_one_word_the_vote_takes_the_one_more_candidates_make():
    """Three candidates fix "go" and drop the doubled "to", two fix "go" alone: the three win."""
    source = "She go to to school every day."
    candidates = ["She goes to school every day."] * 3 + ["She goes to to school every day."] * 2
    assert edit_vote(source, candidates) == "She goes to school every day."
    # an insertion before a word and a change of it are answers to one place: the one more make wins
    assert edit_vote("a b c", ["a Y b c"] * 2 + ["a X c"] * 3) == "a X c"
    assert edit_vote("a b c", ["a Y b c"] * 3 + ["a X c"] * 2) == "a Y b c"


def test_a_vote_of_no_edit_is_the_source_with_its_own_spacing(monkeypatch):
    """A fallback that answers with the source keeps its no-break spaces (and any other spacing)."""
    from lmcor.runtime import core

    source = "Prix :\u00a0100\u00a0€ par mois."
    others = ["Le prix est de cent euros.", "Cent euros par mois.", "C'est cher."]  # no edit two make
    for native in (core.native, None):  # the compiled core's vote (where built) and the reference
        monkeypatch.setattr(core, "native", native)
        assert edit_vote(source, others) == source
        assert edit_vote("a\u00a0b c", ["a B c"] * 2) == "a B c"  # an edit: words joined by single spaces
    monkeypatch.undo()
    got = guard(Correction("Le prix.", [5]), others, 50, source=source, span=2)
    assert got.text == source and got.fallback
    # through the engine, a source with a line break too: not respaced
    corrector = Corrector.load()
    for text in (source, "Prix :\u00a0100\u00a0€\npar mois."):
        [answer] = corrector.correct_batch([(text, others)], fallback_below=50, fallback_span=2)
        assert answer.text == text and answer.fallback


def test_the_vote_writes_one_answer_where_candidates_give_different_ones():
    """Candidates that disagree on what goes at one place: the vote takes the answer more of them give,
    never two of them side by side ("an the apple", "a a dog"), and the fallback does not return such
    a text in place of the model's."""
    source = "She bought apple yesterday."
    candidates = ["She bought an apple yesterday."] * 3 + ["She bought the apple yesterday."] * 2
    assert edit_vote(source, candidates) == "She bought an apple yesterday."
    assert edit_vote("I saw cat.", ["I saw a cat."] * 2 + ["I saw a dog."] * 2) == "I saw a cat."
    assert edit_vote("This the is telephone company.", ["This This is the telephone company."] * 3
                     + ["This is the telephone company."] * 2) == "This This is the telephone company."
    right = Correction("I saw a cat in park.", [5])
    got = guard(right, ["I saw a cat in park."] * 2 + ["I saw the cat in park."] * 3, 50, source="I saw cat in park.")
    assert got.text in ("I saw a cat in park.", "I saw the cat in park.")
    # an edit that ends at a word and an insertion before it stand together: different places
    assert edit_vote("I go school.", ["I went school."] * 2 + ["I go to school."] * 2) == "I went to school."


def test_candidates_that_are_no_answer_do_not_undo_the_models_fix():
    """Three of five candidates are a refusal: their vote replaces the whole sentence, which kept to
    small edits is the source again, and the output's fix, which two candidates make, stays."""
    source = "She go to school every days."
    candidates = ["She goes to school every day."] * 2 + ["I cannot help with that."] * 3
    fixed = Correction("She goes to school every day.", [5])
    assert guard(fixed, candidates, 50, source=source, span=2) is fixed


def test_an_edit_writing_a_word_no_input_holds_is_left_out():
    """A word outside the tokenizer's vocabulary ("café") comes out as other words: the edit that
    writes them is left out, the source's word kept, and the output's other edits stay."""
    source = "My brother have two cat and we goes to the café every days."
    candidates = ["My brother has two cats and we go to the café every day."]
    spelled = Correction("My brother have two cats and we go to the caf bacteria every day.", [5])
    kept = guard(spelled, candidates, 50, source=source, span=2)
    assert kept.text == "My brother have two cats and we go to the café every day." and kept.fallback
    assert minimal_edits(source, spelled.text, 0, {"x"}) == source  # no edit writes only known words
    assert minimal_edits("a b", "a c", 0) == "a c"  # span 0 and no known words: any edit


def test_the_calibration_recipe_leaves_out_what_the_model_cannot_read_and_errs_in_one_line(bundles, tmp_path, capsys,
                                                                                           caplog):
    dev = tmp_path / "dev.jsonl"
    rows = [dict(r, target=r["candidates"][0]) for r in make_requests(12, seed=4)]
    rows.append({"source": "word " * 3000, "candidates": ["a"], "target": "a"})  # past the model's input
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = shutil.copytree(bundles["t5"], tmp_path / "bundle")
    with caplog.at_level("WARNING", logger="lmcor.recipes"):
        assert recipe.main([str(bundle), "--dev", str(dev), "--report", str(bundle / "tried.json")]) == 0
    assert f"{dev}: 1 lines left out (line 13: " in caplog.text  # the file and line, among several --dev
    # A report written into the bundle's folder is no part of it: rewritten, the bundle still loads.
    assert recipe.main([str(bundle), "--dev", str(dev), "--tolerance", "1", "--report", str(bundle / "tried.json")]) == 0
    assert Corrector.load(bundle).manifest.fallback_below is not None
    assert recipe.main([str(tmp_path / "nowhere"), "--dev", str(dev)]) == 2
    assert capsys.readouterr().err.strip().endswith("no such bundle directory")
