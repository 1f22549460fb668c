"""Model weights on 2 MB pages (Linux): a decode step reads every weight of the decoder once, and
on 4 KB pages part of that time goes to address translation (TLB misses).

ONNX Runtime copies (and prepacks) a graph's weights into memory it allocates while it opens the
session. `mark()` notes the process's anonymous memory before that, and `back_added()` asks the
kernel to back what was added with 2 MB pages (`madvise(MADV_COLLAPSE)`, Linux 6.1+), whatever
the system's transparent-huge-page setting. Only memory that appeared while the session opened is
touched (by any thread), never what the process held before; so a weight that malloc places in
room the process had freed before stays on 4 KB pages (large ones always get new memory: in a fresh process, all of them do). On the
project's 2-core machine this made a Flan-T5-small decoder step at batch 1 about 10% faster
(`docs/benchmarks.md`), for about 0.3 s more at load (the kernel copies the pages once). Where the
kernel cannot (another system, an older kernel) nothing changes; `LMCOR_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

from .core import OFF_WORDS

log = logging.getLogger("lmcor")

MADV_COLLAPSE = 25  # linux/mman.h
HUGE = 2 << 20
_MAPS = "/proc/self/maps"


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("LMCOR_HUGE_PAGES", "1").strip().lower() not in OFF_WORDS


def anonymous_regions() -> dict[int, int]:
    """Start -> end of this process's private, writable memory not backed by a file (the heap
    included): where ONNX Runtime's allocations land."""
    regions = {}
    with open(_MAPS, "rb") as maps:  # a mapped file's path is bytes in any encoding
        for line in maps:
            fields = line.split(maxsplit=5)
            name = fields[5].strip() if len(fields) > 5 else b""
            if fields[1].startswith(b"rw") and fields[1].endswith(b"p") and name in (b"", b"[heap]"):
                start, end = (int(x, 16) for x in fields[0].split(b"-"))
                regions[start] = end
    return regions


def added(before: dict[int, int], after: dict[int, int]) -> list[tuple[int, int]]:
    """The address ranges of `after` that no region of `before` covered: new regions, and what an
    old region grew by at either end (the kernel merges a new mapping into an old neighbour)."""
    old = sorted(before.items())
    ranges = []
    for start, end in sorted(after.items()):
        for old_start, old_end in old:
            if old_end <= start or old_start >= end:
                continue
            if old_start > start:
                ranges.append((start, old_start))
            start = max(start, old_end)
        if start < end:
            ranges.append((start, end))
    return ranges


def whole_pages(start: int, end: int) -> range:
    """The addresses of the 2 MB pages that lie wholly inside [start, end)."""
    return range(-(-start // HUGE) * HUGE, end // HUGE * HUGE, HUGE)


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def collapse(ranges: list[tuple[int, int]]) -> int:
    """Back the 2 MB pages of `ranges` whose memory is all in use with huge pages; returns the bytes
    the kernel collapsed. A page partly unused (a thread's stack, an arena's reserve) is left alone,
    as collapsing it would fill it; so is one the kernel refuses (an older kernel, freed memory)."""
    libc, done = _libc(), 0
    resident = ctypes.create_string_buffer(HUGE // os.sysconf("SC_PAGE_SIZE"))
    for start, end in ranges:
        for page in whole_pages(start, end):
            if libc.mincore(page, HUGE, resident) != 0 or any(b & 1 == 0 for b in resident.raw):
                continue
            if libc.madvise(page, HUGE, MADV_COLLAPSE) == 0:
                done += HUGE
    return done


def mark() -> dict[int, int] | None:
    """What `back_added` compares against: the anonymous memory now, or None where this is off or
    not Linux."""
    if not enabled():
        return None
    try:
        return anonymous_regions()
    except Exception:  # noqa: BLE001 - a speed-up: never a reason for a model not to load
        log.debug("huge pages: /proc/self/maps unreadable", exc_info=True)
        return None


def back_added(before: dict[int, int] | None, what: str) -> None:
    """Put the memory added since `mark()` returned `before` on 2 MB pages where the kernel can."""
    if before is None:
        return
    try:
        ranges = added(before, anonymous_regions())
        done = collapse(ranges)
    except Exception:  # noqa: BLE001 - as in mark()
        log.debug("huge pages: %s left on small pages", what, exc_info=True)
        return
    log.debug("%s: %.0f of %.0f MB added on 2 MB pages", what, done / 1e6, sum(e - s for s, e in ranges) / 1e6)
