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
