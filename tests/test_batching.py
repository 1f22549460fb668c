import numpy as np
import pytest
from lmcor.runtime.batching import pad_batch, pick_group, plan_batches


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batches_cover_every_item_once_with_bounded_padding(batch_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=101).tolist()
    batches = plan_batches(lengths, batch_size, max_padding=0.25)
    assert sorted(i for b in batches for i in b) == list(range(101))
    for batch in batches:
        assert len(batch) <= batch_size
        padded = max(lengths[i] for i in batch) * len(batch)
        assert 1 - sum(lengths[i] for i in batch) / padded <= 0.25


def test_one_long_item_does_not_pad_a_batch_of_short_ones():
    batches = plan_batches([500, 10, 11, 12, 10], batch_size=8)
    assert [0] in batches and len(batches) == 2


def test_a_group_passes_over_an_odd_length_and_takes_those_after_it():
    """Online, requests wait in arrival order: one of another length does not end its group."""
    assert pick_group([10, 40, 10, 11, 9, 10], limit=4) == [0, 2, 3, 4]
    assert pick_group([10, 40, 10, 11, 9, 10], limit=4, passing=False) == [0]
    assert pick_group([40, 10, 10], limit=4) == [0]  # the first always goes: the oldest never waits


def test_pad_batch():
    ids, mask = pad_batch([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_the_encoder_takes_a_ragged_batch_in_sub_batches_of_little_padding(bundles, monkeypatch):
    """On the CPU: the same states where rows are real (zeros past them), from several encoder passes,
    and the same outputs."""
    from conftest import make_requests
    from lmcor import Corrector
    from lmcor.runtime import encode as encoding

    corrector = Corrector.load(bundles["t5"])
    rng = np.random.default_rng(7)
    inputs = [rng.integers(5, 100, size=n).astype(np.int64) for n in (40, 10, 38, 10, 39, 3)]
    pad = corrector.manifest.special_tokens.pad
    whole = encoding.encode(corrector.sessions, *pad_batch(inputs, pad)).numpy()
    passes = []
    run = encoding.encode
    monkeypatch.setattr(encoding, "encode", lambda sessions, ids, mask, **kw: passes.append(ids.shape) or run(
        sessions, ids, mask, **kw))
    hidden, mask, count = encoding.encode_batch(corrector.sessions, None, inputs, pad)
    assert sorted(passes) == [(1, 3), (2, 10), (3, 40)] and count == 3
    split = hidden.numpy()
    assert split.shape == whole.shape and mask.tolist() == pad_batch(inputs, pad)[1].tolist()
    for row, ids in enumerate(inputs):
        np.testing.assert_allclose(split[row, : len(ids)], whole[row, : len(ids)], rtol=1e-5, atol=1e-6)
        if len(ids) <= 10:  # past their sub-batch's width
            assert not split[row, 10:].any()
    monkeypatch.undo()
    requests = make_requests(24, seed=8)
    for n, r in enumerate(requests):  # lengths far apart
        r["candidates"] = r["candidates"][: 1 + n % 5]
    split = corrector.correct_batch(requests, batch_size=16, max_new_tokens=8)
    monkeypatch.setattr(encoding, "SUB_BATCH_PADDING", 1.0)
    assert [c.token_ids for c in corrector.correct_batch(requests, batch_size=16, max_new_tokens=8)] == [
        c.token_ids for c in split]
