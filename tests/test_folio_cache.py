"""FolioCache and the PFN walk: exhaustive small layouts, large random ones, the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gmem
import gmem.reference as ref

from conftest import IMPLS, both, norm
from pfnmath import check_walk, layouts


def mirrored(layout: list[tuple[int, int]], size: int) -> list[tuple[int, int, int]]:
    """(index, order, pfn) with PFNs mirrored, so index order and PFN order disagree."""
    return [(i, o, 1000 * size + size - i - (1 << o)) for i, o in layout]


@IMPLS
def test_add_lookup_remove(impl) -> None:
    c = impl.FolioCache()
    c.add_folio(8, 3, 64)
    c.add_folio(0, 0, 7)
    assert len(c) == 2 and c.nr_pages == 9
    assert c.lookup(13) == (8, 3, 64) and c.lookup(3) is None
    assert c.pfn_ranges(2, 12).tolist() == [[64, 68]]
    assert c.page_pfns(0, 3).tolist() == [7, gmem.NO_PFN, gmem.NO_PFN]
    assert c.remove_folio(8) == (8, 3, 64)
    assert c.folios().tolist() == [(0, 0, 7, 0, 0, False)]
    assert c.folios().dtype == gmem.FOLIO_DTYPE


@IMPLS
def test_misaligned_and_overlapping_folios_are_refused(impl) -> None:
    c = impl.FolioCache()
    c.add_folio(512, 9, 1024)
    with pytest.raises(ValueError, match="index: must be a multiple of 2\\*\\*order = 512"):
        c.add_folio(256, 9, 0)
    with pytest.raises(ValueError, match="pfn: must be a multiple"):
        c.add_folio(0, 9, 8)
    with pytest.raises(ValueError, match="overlap"):
        c.add_folio(1000, 0, 3)
    with pytest.raises(ValueError, match="overlap"):
        c.add_folio(0, 10, 0)
    with pytest.raises(ValueError, match="pfn: must be below 2\\*\\*52"):
        c.add_folio(0, 0, 2**52)
    assert c.folios().tolist() == [(512, 9, 1024, 0, 0, False)]


@IMPLS
def test_split_uniform_and_around_a_range(impl) -> None:
    c = impl.FolioCache()
    c.add_folio(0, 4, 32)
    c.split(5, 2)
    assert c.folios()["order"].tolist() == [2, 2, 2, 2]
    assert c.folios()["pfn"].tolist() == [32, 36, 40, 44]
    c2 = impl.FolioCache()
    c2.add_folio(0, 4, 32)
    assert c2.split_range(3, 9) == 1
    rows = c2.folios()[["index", "order", "pfn"]].tolist()
    assert rows == [
        (0, 1, 32),
        (2, 0, 34),
        (3, 0, 35),
        (4, 2, 36),
        (8, 0, 40),
        (9, 0, 41),
        (10, 1, 42),
        (12, 2, 44),
    ]
    assert c2.split_range(4, 8) == 0  # already whole folios


def test_every_layout_of_an_8_page_file_and_every_range() -> None:
    """Exhaustive: all 677 layouts (orders 0..3, holes) x all 37 ranges, engine and reference.
    The 16-page version (458,330 layouts x 137 ranges) runs natively: tests/native."""
    n = 8
    count = 0
    for layout in layouts(0, 3):
        engine, oracle = gmem.FolioCache(), ref.FolioCache()
        for i, o, p in mirrored(layout, n):
            engine.add_folio(i, o, p)
            oracle.add_folio(i, o, p)
        index = np.array([i for i, _ in layout], dtype=np.uint64)
        order = np.array([o for _, o in layout], dtype=np.uint64)
        pfn = np.array([p for _, _, p in mirrored(layout, n)], dtype=np.uint64)
        for start in range(n + 1):
            for end in range(start, n + 1):
                got = engine.pfn_ranges(start, end)
                assert got.tolist() == oracle.pfn_ranges(start, end).tolist()
                assert (
                    got.tolist() == gmem.clamp_folio_ranges(index, order, pfn, start, end).tolist()
                )
                check_walk(engine, start, end, got)
                count += 1
    assert count == 677 * 45


def random_layout(
    rng: np.random.Generator, pm: gmem.PhysMem, first: int, nr_pages: int, max_order: int
) -> list[tuple[int, int, int]]:
    """Folios of random orders (and holes) from a fragmented PhysMem, at indexes from first."""
    out = []
    index = first
    while index < first + nr_pages:
        order = int(rng.integers(0, max_order + 1))
        while order and (index % (1 << order) or index + (1 << order) > first + nr_pages):
            order -= 1
        if rng.random() < 0.1:
            index += 1 << order
            continue
        try:
            out.append((index, order, pm.alloc(order)))
        except gmem.OutOfMemory:
            out.append((index, 0, pm.alloc(0)))
            order = 0
        index += 1 << order
    return out


@pytest.mark.parametrize("seed", range(3))
def test_random_large_layouts_near_2_to_the_40(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pm = gmem.PhysMem(1 << 22, base_pfn=1 << 30, seed=seed)
    pm.fragment(0.002)
    first = (1 << 40) - (1 << 21)
    layout = random_layout(rng, pm, first, 1 << 21, 18)
    engine, oracle = gmem.FolioCache(), ref.FolioCache()
    for i, o, p in layout:
        engine.add_folio(i, o, p)
        oracle.add_folio(i, o, p)
    assert {o for _, o, _ in layout} >= {0, 9}, "mixed orders"
    cols = [np.array(c, dtype=np.uint64) for c in zip(*layout, strict=True)]
    for _ in range(40):
        start = first + int(rng.integers(0, 1 << 21))
        end = min(first + (1 << 21), start + int(rng.integers(1, 1 << 19)))
        got = engine.pfn_ranges(start, end)
        assert got.tolist() == oracle.pfn_ranges(start, end).tolist()
        assert np.array_equal(got, gmem.clamp_folio_ranges(*cols, start, end))
        if end - start <= 1 << 16:
            check_walk(engine, start, end, got)
    whole = engine.pfn_ranges(0, 1 << 41)
    assert len(whole) == len(layout)
    batches = engine.pfn_batches(first, first + (1 << 21))
    assert [len(b) for b in batches[:-1]] == [gmem.FOLIO_BATCH_SIZE] * (len(batches) - 1)
    assert np.array_equal(np.concatenate(batches), whole)


def test_many_folios_in_random_order_against_reference() -> None:
    """Random insertion order splits leaves in the middle; removal merges them again."""
    rng = np.random.default_rng(11)
    slots = rng.permutation(20_000)
    engine, oracle = gmem.FolioCache(), ref.FolioCache()
    for s in slots.tolist():
        engine.add_folio(4 * s, 2, 4 * (20_000 - s))
        oracle.add_folio(4 * s, 2, 4 * (20_000 - s))
    assert norm(engine.folios()) == norm(oracle.folios())
    for s in slots[:15_000].tolist():
        assert engine.remove_folio(4 * s) == oracle.remove_folio(4 * s)
    assert norm(engine.folios()) == norm(oracle.folios())
    assert norm(engine.pfn_ranges(1, 79_999)) == norm(oracle.pfn_ranges(1, 79_999))


@pytest.mark.parametrize("gap_bits", [28, 31, 32, 33, 44])
def test_folios_further_apart_than_a_leaf_base_reaches(gap_bits: int) -> None:
    """A leaf keys its folios by 32-bit offsets from one base: folios 2**32 pages apart or
    more get leaves of their own (and leaves merge only when one base still reaches)."""
    rng = np.random.default_rng(gap_bits)
    slots = rng.permutation(3_000)
    engine, oracle = gmem.FolioCache(), ref.FolioCache()
    jitter = rng.integers(0, 4, 3_000)
    for s in slots.tolist():
        idx = (s << gap_bits) + int(jitter[s]) * 2
        engine.add_folio(idx, 1, 2 * s)
        oracle.add_folio(idx, 1, 2 * s)
    assert norm(engine.folios()) == norm(oracle.folios())
    for s in slots[:2_000].tolist():
        idx = (s << gap_bits) + int(jitter[s]) * 2
        assert engine.remove_folio(idx) == oracle.remove_folio(idx)
        if s % 97 == 0:
            assert norm(engine.folios()) == norm(oracle.folios())
    end = 3_000 << gap_bits
    assert norm(engine.pfn_ranges(1, end)) == norm(oracle.pfn_ranges(1, end))
    for s in slots[2_000:].tolist():
        idx = (s << gap_bits) + int(jitter[s]) * 2
        assert engine.lookup(idx + 1) == oracle.lookup(idx + 1)


def test_appending_in_order_costs_under_16_bytes_per_folio() -> None:
    c = gmem.FolioCache()
    n = 1 << 19  # 1 TiB of 2 MiB folios
    for i in range(n):
        c.add_folio(i << 9, 9, i << 9)
    assert c.memory_bytes / n < 12.6


@IMPLS
def test_add_folios_validates_everything_first(impl) -> None:
    c = impl.FolioCache()
    c.add_folio(64, 2, 4)
    c.add_folio(256, 0, 300)
    c.add_folios(np.arange(0, 64, 8), np.full(8, 3), np.arange(64, 128, 8))
    assert len(c) == 10 and c.nr_pages == 69
    before = norm(c.folios())
    with pytest.raises(ValueError, match=r"overlap.*folio 1"):
        c.add_folios([128, 256], [0, 0], [0, 1])  # the second one overlaps
    with pytest.raises(ValueError, match=r"folio 1 .*not sorted"):
        c.add_folios([200, 100], [0, 0], [0, 1])
    assert norm(c.folios()) == before


INDEX = st.integers(0, 40) | st.sampled_from([2**64 - 1, 2**64 - 2])
OPS = st.one_of(
    st.tuples(st.just("add_folio"), INDEX, st.integers(0, 4), st.integers(0, 40)),
    st.tuples(st.just("remove_folio"), INDEX),
    st.tuples(st.just("lookup"), INDEX),
    st.tuples(st.just("split"), INDEX, st.integers(0, 4)),
    st.tuples(st.just("split_range"), INDEX, INDEX),
    st.tuples(st.just("pfn_ranges"), INDEX, INDEX),
    st.tuples(st.just("pfn_batches"), INDEX, INDEX),
    st.tuples(st.just("folios"), INDEX, INDEX),
    st.tuples(st.just("page_pfns"), st.integers(0, 40), st.integers(0, 40)),
)


@given(ops=st.lists(OPS, max_size=50))
def test_differential_operation_sequences(ops) -> None:
    engine, oracle = gmem.FolioCache(), ref.FolioCache()
    for name, *args in ops:
        both(engine, oracle, name, *args)
        assert norm(engine.folios()) == norm(oracle.folios())
        assert engine.nr_pages == oracle.nr_pages


CLAMP_BAD = [
    ([0, 2], [1, 1], [0, 3], "pfn", "folio 1 .*pfn is not a multiple"),
    ([0, 3], [1, 1], [0, 2], "index", "folio 1 .*index is not a multiple"),
    ([4, 0], [0, 0], [0, 1], "index", "folio 1 .*not sorted"),
    ([0, 1], [1, 0], [0, 9], "index", "folio 1 .*overlaps"),
    ([0], [19], [0], "order", "folio 0 .*order must be in 0..18"),
    ([-4], [0], [0], "index", "must be >= 0"),
]


@IMPLS
@pytest.mark.parametrize(("index", "order", "pfn", "arg", "msg"), CLAMP_BAD)
def test_clamp_folio_ranges_names_the_bad_folio(impl, index, order, pfn, arg, msg) -> None:
    with pytest.raises(ValueError, match=f"^{arg}: .*{msg}" if "folio" in msg else arg):
        impl.clamp_folio_ranges(index, order, pfn, 0, 16)


@IMPLS
def test_clamp_folio_ranges_argument_shapes(impl) -> None:
    with pytest.raises(ValueError, match="one length"):
        impl.clamp_folio_ranges([0, 1], [0], [0, 1], 0, 4)
    with pytest.raises(TypeError, match="index: must hold integers"):
        impl.clamp_folio_ranges([0.5], [0], [0], 0, 4)
    with pytest.raises(ValueError, match="start"):
        impl.clamp_folio_ranges([0], [0], [0], 4, 0)
    assert impl.clamp_folio_ranges([], [], [], 0, 4).shape == (0, 2)
    out = impl.clamp_folio_ranges(np.array([0, 8], np.int32), [3, 3], [16, 0], 2, 10)
    assert out.dtype == np.uint64 and out.tolist() == [[18, 24], [0, 2]]


FOLIO_BAD = [
    ("add_folio", (0, 19, 0), ValueError, "order"),
    ("add_folio", (-1, 0, 0), ValueError, "index"),
    ("add_folio", (0, 0, 2**64), ValueError, "pfn"),
    ("add_folio", ("0", 0, 0), TypeError, "index"),
    ("remove_folio", (3,), ValueError, "index"),
    ("split", (8, 3), ValueError, "new_order"),
    ("split", (100, 0), ValueError, "index"),
    ("pfn_ranges", (5, 4), ValueError, "start"),
    ("page_pfns", (5, 4), ValueError, "start"),
    ("folios", (5, 4), ValueError, "start"),
    ("split_range", (5, -4), ValueError, "end"),
]


@IMPLS
@pytest.mark.parametrize(("method", "args", "exc", "arg"), FOLIO_BAD)
def test_bad_input_raises_and_changes_nothing(impl, method, args, exc, arg) -> None:
    c = impl.FolioCache()
    c.add_folio(8, 3, 64)
    before = norm(c.folios())
    with pytest.raises(exc, match=f"^{arg}:"):
        getattr(c, method)(*args)
    assert norm(c.folios()) == before


@IMPLS
def test_clamp_folio_ranges_near_the_top_of_u64(impl) -> None:
    top = 2**63
    out = impl.clamp_folio_ranges([top, top + 8], [3, 0], [2**62, 2**62 + 8], top + 2, top + 9)
    assert out.tolist() == [[2**62 + 2, 2**62 + 8], [2**62 + 8, 2**62 + 9]]
    with pytest.raises(ValueError, match="folio 0 .*ends past 2\\*\\*64 - 1"):
        impl.clamp_folio_ranges([2**64 - 1], [0], [0], 0, 1)
    with pytest.raises(ValueError, match="folio 1 .*overlaps"):
        impl.clamp_folio_ranges([top, top + 4], [3, 0], [0, 0], 0, 1)


@IMPLS
@pytest.mark.parametrize("bad_at", [1, 511, 512, 513, 1500, 1999])
@pytest.mark.parametrize(
    "fault", ["overlap", "unsorted", "order", "order 40", "order 2**63", "pfn"]
)
def test_clamp_folio_ranges_finds_a_bad_folio_anywhere(impl, bad_at: int, fault: str) -> None:
    """The engine checks the layout a block of folios at a time: a fault in any block, and
    an overlap across a block boundary, is named by its folio."""
    n = 2000
    index = np.arange(n, dtype=np.uint64) * np.uint64(4)
    order = np.full(n, 2, dtype=np.uint64)
    pfn = np.arange(n, dtype=np.uint64)[::-1] * np.uint64(4)
    full = impl.clamp_folio_ranges(index, order, pfn, 0, 4 * n)
    assert full.tolist() == [[int(p), int(p) + 4] for p in pfn]
    if fault == "overlap":
        index[bad_at] -= np.uint64(2)
        order[bad_at] = 1
    elif fault == "unsorted":
        index[bad_at] = index[bad_at - 1] - np.uint64(4) if bad_at > 1 else 0
    elif fault == "order":
        order[bad_at] = 19
    elif fault == "order 40":
        order[bad_at] = 40
    elif fault == "order 2**63":
        order[bad_at] = np.uint64(2**63)
    else:
        pfn[bad_at] += np.uint64(1)
    with pytest.raises(ValueError, match=f"folio {bad_at} "):
        impl.clamp_folio_ranges(index, order, pfn, 4 * (n - 3), 4 * n)


@IMPLS
def test_clamp_folio_ranges_of_an_empty_range_inside_a_folio_is_empty(impl) -> None:
    """[1, 1) lies inside the folio [0, 2) and holds no page: no range."""
    one = np.array([0], dtype=np.uint64), np.array([1], dtype=np.uint64)
    got = impl.clamp_folio_ranges(one[0], one[1], np.array([0], dtype=np.uint64), 1, 1)
    assert got.tolist() == []
