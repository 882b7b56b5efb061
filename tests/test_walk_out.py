"""Walks into a caller's buffer: pfn_ranges(start, end, out=) on FolioCache and GuestMemfd
and clamp_folio_ranges(..., out=) write the ranges into the first rows of ``out`` and
answer those rows as a view; a bad buffer is refused and left as it was."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gmem

from conftest import IMPLS

P = gmem.PAGE_SIZE
COLS = (  # index, order, pfn: folios [0, 8) [8, 16) [16, 20) and a hole after
    np.array([0, 8, 16], dtype=np.uint64),
    np.array([3, 3, 2], dtype=np.uint64),
    np.array([64, 8, 32], dtype=np.uint64),
)


OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def close_files() -> Any:
    yield
    while OPEN:
        OPEN.pop().close()


def walkers(impl: Any) -> list[tuple[str, Any]]:
    """(name, walk(start, end, out)) for every walk that takes ``out``."""
    cache = impl.FolioCache()
    cache.add_folios(*COLS)
    f = impl.GuestMemfd(32 * P, folio_order=3, physmem=impl.PhysMem(128))
    OPEN.append(f)
    for index, order, pfn in zip(*(c.tolist() for c in COLS), strict=True):
        f.add_folio(index, order, pfn)
    return [
        ("FolioCache", lambda s, e, out=None: cache.pfn_ranges(s, e, out=out)),
        ("GuestMemfd", lambda s, e, out=None: f.pfn_ranges(s, e, out=out)),
        ("clamp", lambda s, e, out=None: impl.clamp_folio_ranges(*COLS, s, e, out=out)),
    ]


@IMPLS
@pytest.mark.parametrize(("start", "end"), [(2, 18), (0, 32), (8, 16), (5, 5), (20, 32)])
def test_the_walk_writes_the_first_rows_and_answers_them(impl: Any, start: int, end: int) -> None:
    for name, walk in walkers(impl):
        want = walk(start, end)
        out = np.full((8, 2), 7, dtype=np.uint64)
        got = walk(start, end, out)
        assert got.tolist() == want.tolist(), name
        assert got.dtype == np.uint64 and got.shape == (len(want), 2)
        assert len(want) == 0 or np.shares_memory(got, out), name  # a view, no copy
        assert out[len(want) :].tolist() == [[7, 7]] * (8 - len(want)), name  # rest untouched
        again = walk(start, end, out[: len(want)])  # exactly the room it needs
        assert again.tolist() == want.tolist()


def read_only() -> Any:
    a = np.zeros((8, 2), dtype=np.uint64)
    a.flags.writeable = False
    return a


BAD_OUT = [
    ([[0, 0]] * 8, TypeError),  # a list
    (np.zeros((8, 2), dtype=np.int64), TypeError),
    (np.zeros((8, 2), dtype=">u8"), TypeError),  # not native byte order
    (np.zeros((8, 3), dtype=np.uint64), ValueError),
    (np.zeros(16, dtype=np.uint64), ValueError),
    (np.zeros((16, 2), dtype=np.uint64)[::2], ValueError),  # not C-contiguous
    (read_only(), ValueError),
    (np.zeros((2, 2), dtype=np.uint64), ValueError),  # no room for 3 ranges
]


@IMPLS
@pytest.mark.parametrize(("bad", "exc"), BAD_OUT, ids=[f"{i}" for i in range(len(BAD_OUT))])
def test_a_bad_buffer_is_refused_and_left_alone(impl: Any, bad: Any, exc: Any) -> None:
    for name, walk in walkers(impl):
        before = np.array(bad, copy=True)
        with pytest.raises(exc, match="^out: "):
            walk(2, 18, bad)
        assert np.array_equal(np.asarray(bad), before), name


@IMPLS
def test_clamp_into_a_buffer_keeps_it_on_a_bad_layout(impl: Any) -> None:
    out = np.full((4, 2), 5, dtype=np.uint64)
    with pytest.raises(ValueError, match="^index: folio 2"):
        # folio 2 overlaps folio 1: found after the folios in range were clamped
        impl.clamp_folio_ranges([0, 8, 12], [2, 3, 0], [0, 8, 100], 0, 4, out=out)
    assert out.tolist() == [[5, 5]] * 4


@IMPLS
def test_clamp_refuses_a_buffer_that_shares_an_input(impl: Any) -> None:
    buf = np.zeros((8, 2), dtype=np.uint64)
    index = buf.reshape(-1)[:3]  # contiguous uint64: used in place, so it would be overwritten
    with pytest.raises(ValueError, match="^out: must not share memory with index"):
        impl.clamp_folio_ranges(index, [0, 0, 0], [0, 1, 2], 0, 1, out=buf)


@IMPLS
def test_a_closed_file_refuses_before_it_checks_the_room(impl: Any) -> None:
    f = impl.GuestMemfd(8 * P)
    f.fallocate(0, 8)
    f.close()
    out = np.zeros((0, 2), dtype=np.uint64)
    with pytest.raises(ValueError, match="closed"):
        f.pfn_ranges(0, 8, out=out)


def test_one_buffer_serves_repeated_walks() -> None:
    """The use it is for: a simulator walking the same file every step, allocation-free."""
    f = gmem.GuestMemfd(64 << 20, folio_order=9)
    f.fallocate(0, f.nr_pages)
    out = np.empty((len(f.folios()), 2), dtype=np.uint64)
    for start in range(0, f.nr_pages, 4096):
        got = f.pfn_ranges(start, f.nr_pages, out=out)
        assert got.tolist() == f.pfn_ranges(start, f.nr_pages).tolist()
    f.close()
