"""Drafted decoding: drafts come from the candidates, and outputs are exactly plain greedy's."""

import numpy as np
import pytest
from conftest import make_requests
from lmcor.runtime.batching import pad_batch
from lmcor.runtime.decode import Search, greedy, open_decoder
from lmcor.runtime.drafts import FIRST_DRAFT, Drafter
from lmcor.runtime.encode import encode
from lmcor.runtime.request import as_request
from lmcor.runtime.tokens import encode_requests
from test_parity import _reference

from lmcor import Corrector

EOS = 1


def _drafter(*sequences: list[int]) -> Drafter:
    return Drafter([[np.array(s) for s in sequences]], EOS)


def test_drafts_follow_the_majority_of_the_candidates():
    drafter = _drafter([5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 8])
    assert drafter.propose(0, [], 3) == [5, 6, 7]  # before the first token: the sequences' starts
    assert drafter.propose(0, [6], 8) == [7, 8, EOS]  # two of three continue with 7; each sequence ends with EOS
    assert drafter.propose(0, [42], 8) == []  # nothing to copy


def test_longer_matches_win_over_shorter_ones():
    drafter = _drafter([1 + 9, 3, 4, 20, 21], [11, 3, 4, 30, 31], [12, 3, 4, 30, 31])
    assert drafter.propose(0, [3, 4], 2) == [30, 31]  # majority after "3 4"
    assert drafter.propose(0, [10, 3, 4], 2) == [20, 21]  # "10 3 4" occurs once, and decides


def test_draft_size_adapts_to_acceptance():
    drafter = _drafter(list(range(10, 60)))
    assert drafter.sizes[0] == FIRST_DRAFT
    drafter.update(0, drafted=FIRST_DRAFT, accepted=FIRST_DRAFT)
    assert drafter.sizes[0] > FIRST_DRAFT
    drafter.update(0, drafted=10, accepted=3)
    assert drafter.sizes[0] == 5
    drafter.update(0, drafted=5, accepted=0)
    drafter.update(0, drafted=2, accepted=0)
    drafter.update(0, drafted=1, accepted=0)
    assert drafter.sizes[0] == 1
    assert len(drafter.propose(0, [10], 30)) == 1


def _decode(corrector: Corrector, requests: list[dict], references=None, **options):
    """Greedy over one batch, with drafts copied from `references` (one list of sequences per row)."""
    inputs = encode_requests(corrector.tokenizer, corrector.manifest.template, [as_request(r) for r in requests],
                             corrector.manifest.max_input_tokens)
    special = corrector.manifest.special_tokens
    ids, mask = pad_batch([x.ids for x in inputs], special.pad)
    hidden = encode(corrector.sessions, ids, mask)
    decoder = open_decoder(corrector.sessions, corrector.manifest)
    drafter = None if references is None else Drafter(references, special.eos)
    tokens, drafted, accepted = greedy(decoder, hidden, mask, special, Search(**options), drafter)
    return tokens, int(drafted.sum()), int(accepted.sum()), decoder.calls


def _oracle(tokens: list[list[int]], rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Per row: its own output (drafts accepted whole), the output with one token changed (accepted up
    to there, then rejected), or unrelated tokens (rejected)."""
    out = []
    for n, row in enumerate(tokens):
        row = np.array(row + [EOS])
        if n % 3 == 1:
            row = row.copy()
            row[rng.integers(len(row))] = 3
        elif n % 3 == 2:
            row = rng.integers(4, 40, size=len(row))
        out.append([row])
    return out


@pytest.mark.parametrize("arch", ["t5", "t5v11"])
@pytest.mark.parametrize("max_new_tokens", [6, 20])
def test_drafted_greedy_is_token_identical_to_plain_greedy(arch, bundles, max_new_tokens):
    corrector = Corrector.load(bundles[arch])
    assert corrector.drafts_supported
    requests = make_requests(12, seed=11)
    plain, _, _, plain_calls = _decode(corrector, requests, max_new_tokens=max_new_tokens)
    references = _oracle(plain, np.random.default_rng(0))
    got, drafted, accepted, calls = _decode(corrector, requests, references, max_new_tokens=max_new_tokens)
    assert got == plain
    assert 0 < accepted < drafted, "drafts should be both accepted and rejected"
    exact = [[np.array(row + [EOS])] for row in plain]
    got, drafted, accepted, calls = _decode(corrector, requests, exact, max_new_tokens=max_new_tokens)
    # Repeated tokens make some matches ambiguous, so a few drafted tokens are still wrong.
    assert got == plain and accepted > 0.9 * drafted
    assert calls <= 4 < plain_calls  # drafts of 8, then 12, 16 tokens: a batch advances many tokens per call


@pytest.mark.parametrize("options", [dict(max_new_tokens=14, min_new_tokens=9),
                                     dict(max_new_tokens=14, no_repeat_ngram_size=2)])
def test_drafted_greedy_applies_the_same_logits_processors(bundles, options):
    corrector = Corrector.load(bundles["t5"])
    requests = make_requests(10, seed=5)
    plain, *_ = _decode(corrector, requests, **options)
    got, _, accepted, _ = _decode(corrector, requests, _oracle(plain, np.random.default_rng(1)), **options)
    assert got == plain and accepted > 0


@pytest.mark.parametrize("batch_size", [1, 8])
def test_drafts_are_on_by_default_and_change_nothing(checkpoints, bundles, batch_size):
    corrector = Corrector.load(bundles["t5v11"])
    requests = make_requests(16, seed=13)
    expected = _reference(checkpoints["t5v11"], corrector, requests, max_new_tokens=16, num_beams=1)
    drafted = corrector.correct_batch(requests, max_new_tokens=16, batch_size=batch_size)
    assert [c.token_ids for c in drafted] == expected
    assert sum(c.stats.drafted_tokens for c in drafted) > 0


def test_bundles_without_a_ragged_decoder_decode_without_drafts(bundles):
    corrector = Corrector.load(bundles["bart"])
    assert not corrector.drafts_supported
    got = corrector.correct_batch(make_requests(4, seed=3), max_new_tokens=8)
    assert all(c.stats.drafted_tokens == 0 for c in got)
