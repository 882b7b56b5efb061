"""PhysMem: the buddy allocator and page contents, against the reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gmem
import gmem.reference as ref

from conftest import IMPLS, both


def check_free_blocks(pm: gmem.PhysMem) -> None:
    """Free blocks are aligned, inside memory, disjoint, sum to nr_free, and no two are buddies."""
    blocks = pm.free_blocks().tolist()
    seen = set()
    for pfn, order in blocks:
        assert pfn % (1 << order) == 0
        assert pm.base_pfn <= pfn and pfn + (1 << order) <= pm.base_pfn + pm.nr_pages
        seen.add((pfn, order))
    for (pfn, order), (nxt, _) in itertools.pairwise(blocks):
        assert pfn + (1 << order) <= nxt, "free blocks overlap"
    assert sum(1 << o for _, o in blocks) == pm.nr_free
    for pfn, order in blocks:
        if order < gmem.MAX_ORDER:
            assert (pfn ^ (1 << order), order) not in seen, "two free buddies were not merged"


@IMPLS
def test_lowest_address_first_fit(impl) -> None:
    pm = impl.PhysMem(16)
    assert pm.free_blocks().tolist() == [[0, 4]]
    assert pm.alloc(0) == 0
    assert pm.free_blocks().tolist() == [[1, 0], [2, 1], [4, 2], [8, 3]]
    assert pm.alloc(2) == 4 and pm.alloc(0) == 1
    pm.free(0, 0)
    pm.free(1, 0)  # coalesces with 0, then with [2, 4)
    assert pm.free_blocks().tolist() == [[0, 2], [8, 3]]


@IMPLS
def test_unaligned_base_is_tiled_with_aligned_blocks(impl) -> None:
    pm = impl.PhysMem(21, base_pfn=3)
    assert pm.free_blocks().tolist() == [[3, 0], [4, 2], [8, 3], [16, 3]]
    assert pm.nr_free == 21
    with pytest.raises(gmem.OutOfMemory):
        pm.alloc(4)


@IMPLS
def test_take_and_is_free(impl) -> None:
    pm = impl.PhysMem(64)
    pm.take(20, 2)
    assert not pm.is_free(20, 2) and not pm.is_free(16, 3) and pm.is_free(24, 3)
    assert pm.nr_free == 60
    with pytest.raises(ValueError, match="not all free"):
        pm.take(16, 3)
    pm.free(20, 2)
    assert pm.free_blocks().tolist() == [[0, 6]]


@IMPLS
def test_double_free_and_partial_free_are_refused(impl) -> None:
    pm = impl.PhysMem(32)
    pfn = pm.alloc(3)
    pm.free(pfn, 3)
    with pytest.raises(ValueError, match="already free"):
        pm.free(pfn, 3)
    pfn = pm.alloc(0)
    with pytest.raises(ValueError, match="already free"):
        pm.free(0, 2)  # covers pages that are still free
    assert pm.nr_free == 31


@IMPLS
def test_contents_are_sparse_and_survive_free(impl) -> None:
    pm = impl.PhysMem(1 << 28)  # 1 TiB of 4 KiB pages: costs nothing until written
    pfn = pm.alloc(9)
    pm.write(pfn + 3, 0xABC)
    pm.free(pfn, 9)
    assert pm.read(pfn + 3) == 0xABC  # a freed page keeps its token until scrubbed
    pm.write(pfn + 3, 0)
    assert pm.read(pfn + 3) == 0


def test_fragment_is_seeded_and_matches_reference() -> None:
    for seed in (0, 1, 99):
        pm, oracle = (
            gmem.PhysMem(4096, base_pfn=512, seed=seed),
            ref.PhysMem(4096, base_pfn=512, seed=seed),
        )
        pm.fragment(0.05)
        oracle.fragment(0.05)
        assert np.array_equal(pm.free_blocks(), oracle.free_blocks())
        assert pm.nr_kept == oracle.nr_kept and pm.nr_free + pm.nr_kept == 4096
        check_free_blocks(pm)
    a, b = gmem.PhysMem(4096, seed=1), gmem.PhysMem(4096, seed=2)
    a.fragment(0.05)
    b.fragment(0.05)
    assert not np.array_equal(a.free_blocks(), b.free_blocks())


def test_fragment_breaks_large_blocks() -> None:
    pm = gmem.PhysMem(1 << 20, seed=5)
    pm.fragment(0.001)
    assert max(o for _, o in pm.free_blocks().tolist()) < 18
    with pytest.raises(gmem.OutOfMemory, match="order 18"):
        pm.alloc(18)


OPS = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 6) | st.just(19)),
    st.tuples(st.just("free_allocated"), st.integers(0, 50)),
    st.tuples(st.just("free"), st.integers(0, 140), st.integers(0, 5)),
    st.tuples(st.just("take"), st.integers(0, 140), st.integers(0, 5)),
    st.tuples(st.just("is_free"), st.integers(0, 140), st.integers(0, 5)),
    st.tuples(st.just("fragment"), st.sampled_from([0.0, 0.1, 0.5, 1.5])),
    st.tuples(st.just("write"), st.integers(0, 140), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("read"), st.integers(0, 140)),
)


@given(
    ops=st.lists(OPS, max_size=40),
    nr=st.integers(1, 130),
    base=st.integers(0, 9),
    seed=st.integers(0, 3),
)
def test_differential_operation_sequences(ops, nr, base, seed) -> None:
    pm, oracle = (
        gmem.PhysMem(nr, base_pfn=base, seed=seed),
        ref.PhysMem(nr, base_pfn=base, seed=seed),
    )
    allocated: list[tuple[int, int]] = []
    for name, *args in ops:
        if name == "free_allocated":
            if not allocated:
                continue
            name, args = "free", list(allocated.pop(args[0] % len(allocated)))
        kind, result = both(pm, oracle, name, *args)
        if name == "alloc" and kind == "ok":
            allocated.append((result, args[0]))
        assert np.array_equal(pm.free_blocks(), oracle.free_blocks())
        assert pm.nr_free == oracle.nr_free
        check_free_blocks(pm)


# Big enough to cross the engine's 4096-page bitmap groups and reach its top tier (orders
# 12 and up): pfns are drawn as block numbers, so most frees and takes are aligned.
WIDE_OPS = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 15)),
    st.tuples(st.just("free_allocated"), st.integers(0, 50)),
    st.tuples(st.just("free"), st.integers(0, 2**15), st.integers(0, 14)),
    st.tuples(st.just("take"), st.integers(0, 2**15), st.integers(0, 14)),
    st.tuples(st.just("is_free"), st.integers(0, 2**15), st.integers(0, 14)),
    st.tuples(st.just("fragment"), st.sampled_from([0.0, 0.001, 0.02])),
)


@given(
    ops=st.lists(WIDE_OPS, max_size=30),
    nr=st.integers(1, 3 << 13),
    base=st.integers(0, 5000) | st.sampled_from([4095, 4096, 8192, 1 << 18]),
    seed=st.integers(0, 3),
)
def test_differential_across_bitmap_groups(ops, nr, base, seed) -> None:
    pm, oracle = (
        gmem.PhysMem(nr, base_pfn=base, seed=seed),
        ref.PhysMem(nr, base_pfn=base, seed=seed),
    )
    allocated: list[tuple[int, int]] = []
    for name, *args in ops:
        if name == "free_allocated":
            if not allocated:
                continue
            name, args = "free", list(allocated.pop(args[0] % len(allocated)))
        elif name in ("free", "take", "is_free"):
            order = args[1]
            args = [base - base % (1 << order) + (args[0] << order) % (nr + (1 << order)), order]
        kind, result = both(pm, oracle, name, *args)
        if kind == "ok" and name in ("alloc", "take"):
            allocated.append((result, args[0]) if name == "alloc" else (args[0], args[1]))
        assert np.array_equal(pm.free_blocks(), oracle.free_blocks())
        assert pm.nr_free == oracle.nr_free
        assert pm.dump().splitlines()[0] == oracle.dump().splitlines()[0]
    check_free_blocks(pm)


BAD = [
    ("alloc", (19,), ValueError, "order"),
    ("alloc", (-1,), ValueError, "order"),
    ("alloc", ("1",), TypeError, "order"),
    ("free", (3, 1), ValueError, "pfn"),  # misaligned
    ("free", (64, 0), ValueError, "pfn"),  # past the end
    ("free", (0, 7), ValueError, "order"),  # runs past the end
    ("take", (2**64, 0), ValueError, "pfn"),
    ("read", (64,), ValueError, "pfn"),
    ("write", (0, -1), ValueError, "token"),
    ("write", (0, 2**64), ValueError, "token"),
    ("fragment", (-0.1,), ValueError, "fraction"),
    ("fragment", (float("nan"),), ValueError, "fraction"),
    ("fragment", ("half",), TypeError, "fraction"),
]


@IMPLS
@pytest.mark.parametrize(("method", "args", "exc", "arg"), BAD)
def test_bad_input_raises_and_changes_nothing(impl, method, args, exc, arg) -> None:
    pm = impl.PhysMem(64, seed=1)
    pm.alloc(2)
    pm.write(5, 77)
    before = (pm.free_blocks().tolist(), pm.nr_free, pm.read(5))
    with pytest.raises(exc, match=arg):
        getattr(pm, method)(*args)
    assert (pm.free_blocks().tolist(), pm.nr_free, pm.read(5)) == before


@IMPLS
def test_constructor_rejects_bad_sizes(impl) -> None:
    with pytest.raises(ValueError, match="nr_pages"):
        impl.PhysMem(0)
    with pytest.raises(ValueError, match="nr_pages"):
        impl.PhysMem(2, base_pfn=2**52 - 1)
    with pytest.raises(ValueError, match="base_pfn"):
        impl.PhysMem(2, base_pfn=-1)
    with pytest.raises(TypeError):
        impl.PhysMem(2, 0)  # base_pfn is keyword-only


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def test_scattered_pages_cost_a_bounded_bitmap_each() -> None:
    # A page taken in each of 20,000 far-apart 16 MiB groups of a 2**52-page PhysMem: each
    # group gets its bitmap (576 bytes) and a few free-list nodes, never more.
    pm = gmem.PhysMem(2**52)
    before = _rss()
    pfns = [(g * 7919 % 2**30) << 20 | 3 for g in range(20000)]
    for p in pfns:
        pm.take(p, 0)
    grown = _rss() - before
    assert grown < 20000 * 4096, f"{grown / 20000:.0f} bytes per scattered page"
    for p in pfns:
        pm.free(p, 0)
    # Back to the one run of top-order blocks it started as.
    assert f"free={2**52} pages in {2**34} blocks" in pm.dump().splitlines()[0]
