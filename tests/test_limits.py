"""Limits: outputs never run past the bundle's max_output_tokens, beams and batches are capped, and a
request costs what the model can read of it, however long it is."""

import tracemalloc

import pytest
from conftest import make_requests
from lmcor.runtime.bundle import shipped_bundle
from lmcor.runtime.options import MAX_BATCH_SIZE, MAX_BEAMS
from lmcor.runtime.request import Request
from lmcor.runtime.tokens import encode_requests
from test_api_edges import generator  # noqa: F401 (a fixture)

from lmcor import Classifier, Corrector, InputError

REQUESTS = make_requests(3, seed=5)
HUGE = "My brother went to the station and the city center every day, quietly. " * 28_000  # ~2 MB


@pytest.fixture(scope="module")
def corrector(bundles) -> Corrector:
    return Corrector.load(bundles["t5"])


def test_max_new_tokens_is_capped_by_the_bundle(corrector, generator):  # noqa: F811
    cap = corrector.manifest.max_output_tokens
    for call in (lambda: corrector.correct_batch(REQUESTS, num_beams=2, max_new_tokens=100_000_000),
                 lambda: corrector.generate([[5, 6, 1]], max_new_tokens=cap + 1)):
        with pytest.raises(InputError, match=rf"max_new_tokens must be an integer from 1 to {cap} \(the bundle's "
                                             r"max_output_tokens\), got (100000000|" + str(cap + 1) + ")"):
            call()
    with pytest.raises(InputError, match=r"max_new_tokens must be an integer from 1 to 16 .* got 17"):
        generator.generate_batch(["a b"], max_new_tokens=17)


def test_an_output_that_never_ends_stops_at_the_cap(corrector, generator):  # noqa: F811
    got = corrector.correct_batch(REQUESTS, no_repeat_ngram_size=0, drafts=False)
    assert max(c.stats.output_tokens for c in got) <= corrector.manifest.max_output_tokens
    assert all(len(g.token_ids) <= 16 for g in generator.generate_batch(["a b", "x y z"]))


def test_beams_and_batches_are_capped(corrector, generator):  # noqa: F811
    with pytest.raises(InputError, match=f"num_beams must be an integer from 1 to {MAX_BEAMS}, got {MAX_BEAMS + 1}"):
        corrector.correct_batch(REQUESTS, num_beams=MAX_BEAMS + 1)
    big = MAX_BATCH_SIZE + 1
    message = f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, got {big}"
    for call in (lambda: corrector.correct_batch(REQUESTS, batch_size=big),
                 lambda: corrector.generate([[5, 1]], batch_size=big),
                 lambda: generator.generate_batch(["a"], batch_size=big),
                 lambda: Classifier.load(shipped_bundle("gate")).classify_batch(["a"], batch_size=big)):
        with pytest.raises(InputError, match=message):
            call()


def test_a_huge_candidate_costs_what_the_model_reads_of_it(corrector):
    request = {"id": 7, "source": "she go to the station every day", "candidates": [HUGE]}
    tracemalloc.start()
    # fallback_below=100: a random model's output strays, so the fallback compares it with the candidate
    [got] = corrector.correct_batch([request], max_new_tokens=8, fallback_below=100)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert got.truncated and got.id == 7 and got.stats.input_tokens <= corrector.manifest.max_input_tokens
    assert peak < 32 << 20, peak
    assert got.fallback and got.text is HUGE  # span 0: the candidate returned is whole, though the model read its head
    with_span = corrector.correct_batch([request], max_new_tokens=8, fallback_below=100, fallback_span=2)[0]
    assert with_span.text == request["source"]  # with a span: ~60,000 times the source's length is no edit of it


def test_drafts_and_the_fallback_see_only_what_the_model_read(corrector):
    manifest = corrector.manifest
    request = Request("she go to the station", (HUGE, "She goes to the station."))
    [got] = encode_requests(corrector.tokenizer, manifest.template, [request], manifest.max_input_tokens,
                            references=True)
    assert got.truncated and len(got.ids) <= manifest.max_input_tokens
    assert sum(len(r) for r in got.references) <= len(got.ids)
    assert HUGE.startswith(got.candidates[0]) and 0 < len(got.candidates[0]) < 4 * manifest.max_input_tokens
    assert got.candidates[1] == request.candidates[1]  # a short candidate is seen whole
    [whole] = encode_requests(corrector.tokenizer, manifest.template, [Request("she go", ("She goes.",))],
                              manifest.max_input_tokens)
    assert not whole.truncated and whole.candidates == ("She goes.",)
