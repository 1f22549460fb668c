"""The noise model: a seeded source model and candidate models that each mimic one kind of LLM."""

import itertools
import random

import pytest
from lmcor.recipes import noise
from lmcor.runtime.errors import InputError

SENTENCES = [
    "She has already seen the new film at the cinema.",
    "The results were surprising, and nobody expected them!",
    "Can you tell me where the station is?",
    "In 2019 we moved to Paris for 3 years.",
    "He doesn't like \"spicy\" food.",
    "My brother is waiting for the bus in the rain.",
    "The old man, who was very tired, went home early.",
    "We want to buy a big house near the road.",
]
POOL = ["The cat sat on the mat.", "Rivers flow into the sea.", "Nobody answered the phone."]
MODELS = sorted(noise.CANDIDATE_MODELS)


def _examples(model, count=300, seed=0, pool=None):
    rng = random.Random(seed)
    return [noise.make_example(s, rng, model, pool) for s in itertools.islice(itertools.cycle(SENTENCES), count)]


def _share(flags):
    flags = list(flags)
    return sum(flags) / len(flags)


def test_noise_model_is_deterministic_for_a_seed():
    first = [noise.make_example(s, random.Random(3)) for s in SENTENCES]
    again = [noise.make_example(s, random.Random(3)) for s in SENTENCES]
    other = [noise.make_example(s, random.Random(4)) for s in SENTENCES]
    assert first == again and first != other


@pytest.mark.parametrize("model", MODELS + ["mixture"])
def test_every_model_is_deterministic_for_a_seed(model):
    model = noise.mixture() if model == "mixture" else model
    first, again, other = _examples(model, 40, 3, POOL), _examples(model, 40, 3, POOL), _examples(model, 40, 4, POOL)
    assert first == again and first != other


@pytest.mark.parametrize("model", MODELS)
def test_every_model_writes_k_candidates_for_the_clean_target(model):
    for k in (1, 5, 8):
        rng = random.Random(k)
        for s in SENTENCES:
            e = noise.make_example(s, rng, model, POOL, k=k)
            assert len(e.candidates) == k and e.target == s
    assert noise.make_example("", random.Random(0), model).source == ""  # no error to place: source = target


@pytest.mark.parametrize("model", MODELS)
def test_greedy_comes_first(model):
    # The greedy output is drawn first, as lmcor's CandidateWriter does: it does not depend on K.
    for seed, s in enumerate(SENTENCES * 3):
        one = noise.make_example(s, random.Random(seed), model, POOL, k=1)
        five = noise.make_example(s, random.Random(seed), model, POOL, k=5)
        assert one.candidates == five.candidates[:1]


def test_shared_model_is_todays_model():
    examples = _examples("shared", 240)
    assert all(len(e.candidates) == 5 and e.target in SENTENCES for e in examples)
    assert _share(e.source != e.target for e in examples) > 0.9
    fixed = _share(c == e.target for e in examples for c in e.candidates)
    assert 0.3 < fixed < 0.95  # candidates fix some errors, miss others, add their own
    assert any(c != e.target and c != e.source for e in examples for c in e.candidates)


def _identical_pairs(examples):
    return _share(a == b for e in examples for a, b in itertools.combinations(e.candidates, 2))


def test_independent_candidates_agree_less_than_shared_ones():
    assert _identical_pairs(_examples("independent")) < _identical_pairs(_examples("shared")) - 0.08


def test_weak_model_often_returns_the_source():
    examples = _examples("weak")
    assert _share(c == e.source for e in examples for c in e.candidates) > 0.5
    assert _share(all(c == e.source for c in e.candidates) for e in examples) > 0.15
    assert _share(c == e.target for e in examples for c in e.candidates) < 0.25


def test_rewriting_model_paraphrases():
    examples = _examples("rewriting")
    rewritten = [c for e in examples for c in e.candidates if c not in (e.source, e.target)]
    assert len(rewritten) > 0.5 * 5 * len(examples)
    assert all(any(c not in (e.source, e.target) for c in e.candidates) for e in examples)
    assert any(c.startswith(("In the", "For 3 years,")) for c in rewritten)  # a phrase moved to the front
    assert any("purchase" in c or "large" in c or "movie" in c for c in rewritten)  # a synonym
    assert any(len(c.split()) < len(e.target.split()) - 1 for e in examples for c in e.candidates)  # truncated


def _rewritten(change, text: str, rng: random.Random) -> str:
    return " ".join(change(text.split(), rng))


def test_rewrites():
    rng = random.Random(0)
    assert _rewritten(noise._drop_clause, SENTENCES[6], rng) == "The old man went home early."
    assert _rewritten(noise._front_phrase, SENTENCES[5], rng) in (
        "In the rain, my brother is waiting for the bus.", "For the bus in the rain, my brother is waiting.")
    assert _rewritten(noise._synonyms, "A big house.", rng) in ("A large house.", "A big home.", "A large home.")
    cut = _rewritten(noise._truncate, SENTENCES[0], rng).split()
    assert 4 <= len(cut) < 10 and cut[-1].rstrip(".") not in {"the", "at"}


def test_echo_candidates_repeat_other_sentences():
    examples = _examples("echo", pool=POOL)
    assert all(any(c in POOL or c in noise.FEW_SHOT_TEXTS for c in e.candidates) for e in examples)
    assert _share(c in POOL for e in examples for c in e.candidates) > 0.05
    assert _share(c in noise.FEW_SHOT_TEXTS for e in examples for c in e.candidates) > 0.05
    assert _share(c not in POOL and c not in noise.FEW_SHOT_TEXTS for e in examples for c in e.candidates) > 0.5
    # The sentence itself is no echo: with only itself in the pool, the echoes are few-shot texts.
    alone = [noise.make_example(POOL[0], random.Random(seed), "echo", POOL[:1]) for seed in range(50)]
    assert all(any(c in noise.FEW_SHOT_TEXTS for c in e.candidates) for e in alone)


def test_mixture_draws_every_model():
    rng = random.Random(0)
    drawn = [noise.draw_model(rng) for _ in range(400)]
    assert set(drawn) == set(noise.CANDIDATE_MODELS)
    assert set(noise.DEFAULT_WEIGHTS) == set(noise.CANDIDATE_MODELS)
    assert {noise.draw_model(rng, {"weak": 1, "echo": 0}) for _ in range(50)} == {"weak"}
    examples = _examples(noise.mixture(), 300, pool=POOL)
    assert any(c in POOL for e in examples for c in e.candidates)  # echo was drawn
    assert any(all(c == e.source for c in e.candidates) for e in examples)  # weak was drawn


def test_unknown_models_and_weights_are_refused():
    with pytest.raises(InputError, match="unknown candidate model"):
        noise.make_example(SENTENCES[0], random.Random(0), "creative")
    with pytest.raises(InputError, match="unknown candidate model"):
        noise.mixture({"shared": 1, "creative": 1})
    with pytest.raises(InputError, match="positive sum"):
        noise.draw_model(random.Random(0), {"shared": 0})


def test_every_error_kind_applies():
    words = ["The", "man", "has", "gone", "to", "the", "shop", ",", "and", "he", "is", "buying", "an", "apple", "today."]
    rng = random.Random(0)
    for name, (make, _) in noise.ERRORS.items():
        edits = [make(words, i, rng) for i in range(len(words))]
        assert any(e is not None for e in edits), name
