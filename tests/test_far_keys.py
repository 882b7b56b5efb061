"""Keys too far apart for one 32-bit leaf base: the core against the reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import gmem
import gmem.reference as ref

SPAN = 2**32 - 1
TOP = 2**64 - 1


def far_index() -> st.SearchStrategy[int]:
    near = st.sampled_from(
        [0, SPAN - 1, SPAN, SPAN + 1, 2 * SPAN, 2**33, 2**62, 2**63, TOP - SPAN, TOP - 2**20]
    )
    return st.builds(lambda b, d: min(max(b + d, 0), TOP - 2**19), near, st.integers(-300, 300))


def same(a: object, b: object) -> None:
    assert np.array_equal(np.asarray(a), np.asarray(b)), (a, b)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(far_index(), st.integers(0, 2**33), st.integers(0, 3)), max_size=60),
    st.lists(st.tuples(far_index(), far_index()), max_size=10),
)
def test_interval_map_far(
    stores: list[tuple[int, int, int]], queries: list[tuple[int, int]]
) -> None:
    c, r = gmem.IntervalMap(TOP), ref.IntervalMap(TOP)
    for s, ln, v in stores:
        e = min(s + ln + 1, TOP)
        c.store(s, e, v)
        r.store(s, e, v)
        same(c.runs(), r.runs())
    for a, b in queries:
        a, b = min(a, b), max(a, b) + 1
        same(c.runs(a, b), r.runs(a, b))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(far_index(), st.integers(0, 18), st.integers(0, 2**30)), max_size=80),
    st.lists(st.tuples(far_index(), far_index()), max_size=10),
    st.data(),
)
def test_folio_cache_far(
    adds: list[tuple[int, int, int]], queries: list[tuple[int, int]], data: st.DataObject
) -> None:
    c, r = gmem.FolioCache(), ref.FolioCache()
    added = []
    for idx, o, p in adds:
        idx &= ~((1 << o) - 1)
        p = (p << 18) & ~((1 << o) - 1)
        ok = True
        try:
            r.add_folio(idx, o, p)
        except (ValueError, gmem.GmemError):
            ok = False
        if ok:
            c.add_folio(idx, o, p)
            added.append(idx)
        else:
            try:
                c.add_folio(idx, o, p)
            except (ValueError, gmem.GmemError):
                pass
            else:
                raise AssertionError("core accepted a folio the reference refused")
        if added and data.draw(st.integers(0, 4)) == 0:
            i = added.pop(data.draw(st.integers(0, len(added) - 1)))
            assert c.remove_folio(i) == r.remove_folio(i)
    same(c.folios(), r.folios())
    for a, b in [*queries, (0, TOP - 1)]:
        a, b = min(a, b), max(a, b) + 1
        same(c.pfn_ranges(a, b), r.pfn_ranges(a, b))
        cb, rb = c.pfn_batches(a, b), r.pfn_batches(a, b)
        assert len(cb) == len(rb)
        for x, y in zip(cb, rb, strict=True):
            same(x, y)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 18), st.integers(0, 3), st.integers(0, 2**20)), max_size=40),
    st.sampled_from([0, 2**20, 2**62 - 2**26, 2**63, TOP - 2**26]),
    st.integers(0, 2**25),
    st.integers(0, 2**25),
    st.sampled_from([0, 2**40, TOP - 2**30]),
)
def test_clamp_near_top(
    layout: list[tuple[int, int, int]], base: int, s: int, ln: int, pbase: int
) -> None:
    idx, ords, pfns = [], [], []
    cur = base
    for o, gap, p in layout:
        nr = 1 << o
        cur = (cur + nr - 1) & ~(nr - 1)
        cur += gap * nr
        if cur + nr > TOP:
            break
        idx.append(cur)
        ords.append(o)
        pfns.append(((pbase + (p << 18)) % 2**64) & ~(nr - 1))
        cur += nr
    args = [np.array(x, dtype=np.uint64) for x in (idx, ords, pfns)]
    start = min(base + s, TOP - 1)
    end = min(start + ln + 1, TOP)
    try:
        want = ref.clamp_folio_ranges(*args, start, end)
    except (ValueError, gmem.GmemError) as e:
        try:
            gmem.clamp_folio_ranges(*args, start, end)
        except type(e) as f:
            assert str(f) == str(e)
            return
        raise AssertionError("core accepted what the reference refused") from e
    same(gmem.clamp_folio_ranges(*args, start, end), want)
