"""Helpers for PFN-math tests: layout enumeration and the properties every walk must have."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

import gmem


def layouts(base: int, order: int) -> Iterator[list[tuple[int, int]]]:
    """Every layout of naturally aligned folios (and order-0 holes) in [base, base + 2**order).

    A block is either one folio of its order or two half-size blocks; a single page is a
    folio or a hole.  Yields lists of (index, order).
    """
    yield [(base, order)]
    if order == 0:
        yield []
        return
    half = 1 << (order - 1)
    lows = list(layouts(base, order - 1))
    for high in layouts(base + half, order - 1):
        for low in lows:
            yield low + high


def check_walk(cache: object, start: int, end: int, ranges: np.ndarray) -> None:
    """The ranges of one walk over [start, end): each non-empty and inside one folio, in index
    order, and expanding to exactly the PFNs of the populated pages of the range."""
    folios = cache.folios(start, end)  # type: ignore[attr-defined]
    assert len(ranges) == len(folios), "one range per folio overlapping the range"
    expanded = []
    for (s, e), f in zip(ranges.tolist(), folios, strict=True):
        nr = 1 << int(f["order"])
        assert s < e, "empty range emitted"
        assert int(f["pfn"]) <= s and e <= int(f["pfn"]) + nr, "range leaves its folio"
        assert e - s <= end - start, "range longer than the range asked"
        expanded.extend(range(s, e))
    pages = cache.page_pfns(start, end)  # type: ignore[attr-defined]
    assert expanded == pages[pages != gmem.NO_PFN].tolist()
    assert len(set(expanded)) == len(expanded), "ranges overlap"
