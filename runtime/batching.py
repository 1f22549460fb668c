"""tokens -> batches: length-bucketed batches with bounded padding."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

MAX_PADDING = 0.25  # of a batch's tokens


def pick_group(lengths: Iterable[int], limit: int, max_padding: float = MAX_PADDING, *,
               passing: bool = True) -> list[int]:
    """Indices of at most `limit` of `lengths` that make one batch whose padding is at most
    `max_padding` of its tokens: the first, then, in order, each that keeps it so; one that does not
    is passed over, and those after it may still join (without `passing`: the group ends there)."""
    chosen: list[int] = []
    real = longest = 0
    for n, length in enumerate(lengths):
        top = max(longest, length)
        if chosen and 1 - (real + length) / (top * (len(chosen) + 1)) > max_padding:
            if not passing:
                break
            continue
        chosen.append(n)
        real, longest = real + length, top
        if len(chosen) == limit:
            break
    return chosen


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
        size = len(pick_group((lengths[i] for i in order), batch_size, max_padding, passing=False))
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
