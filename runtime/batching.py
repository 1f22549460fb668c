"""tokens -> batches: length-bucketed batches with bounded padding."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

MAX_PADDING = 0.25  # of a batch's tokens


def group_size(lengths: Iterable[int], limit: int, max_padding: float = MAX_PADDING) -> int:
    """How many of `lengths`, taken in order, make one batch of at most `limit` items whose padding is
    at most `max_padding` of its tokens (the first always does)."""
    count = real = longest = 0
    for length in lengths:
        top = max(longest, length)
        if count == limit or (count and 1 - (real + length) / (top * (count + 1)) > max_padding):
            break
        count, real, longest = count + 1, real + length, top
    return count


def plan_batches(lengths: Sequence[int], batch_size: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Group item indices into batches of at most `batch_size` items of similar length.

    Items are taken longest first; a batch is closed early when adding the next item would make
    padding more than `max_padding` of the batch's tokens, so one long request never makes a
    whole batch pay for its length.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    while order:
        size = group_size((lengths[i] for i in order), batch_size, max_padding)
        batches.append(order[:size])
        order = order[size:]
    return batches


def pad_batch(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad int64 sequences into (ids, attention_mask), both (batch, longest)."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask
