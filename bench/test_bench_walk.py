"""The PFN-range walk: the engine, the pure-Python reference and the numpy write floor.

Each group times the three on the same folios and asserts the results agree, so a fast
wrong answer fails.  Run:  pytest bench --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import numpy as np
import pytest

import gmem
import gmem.reference as ref

LAYOUTS = {
    # name: (number of folios, order, scattered PFNs)
    "1TiB-1GiB-folios": (1 << 10, 18, True),
    "1TiB-2MiB-folios-scattered": (1 << 19, 9, True),
    "1TiB-2MiB-folios-contiguous": (1 << 19, 9, False),
    "2^24-order0-folios": (1 << 24, 0, True),
}


def build(nr_folios: int, order: int, scattered: bool = True):
    index = np.arange(nr_folios, dtype=np.uint64) << np.uint64(order)
    # Scatter the folios over physical memory: a fixed shuffle of aligned slots.
    slots = np.random.default_rng(0).permutation(nr_folios) if scattered else np.arange(nr_folios)
    pfn = slots.astype(np.uint64) << np.uint64(order)
    orders = np.full(nr_folios, order, dtype=np.uint64)
    return index, orders, pfn


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    nr, order, scattered = LAYOUTS[request.param]
    index, orders, pfn = build(nr, order, scattered)
    cache = gmem.FolioCache()
    cache.add_folios(index, orders, pfn)
    # Walk from the middle of the first folio to the middle of the last: clamping at both ends.
    start, end = (1 << order) // 2, (nr << order) - (1 << order) // 2
    expected_first = int(pfn[0]) + start
    return request.param, cache, (index, orders, pfn), start, end, expected_first


def test_walk_engine(benchmark, layout) -> None:
    name, cache, _, start, end, first = layout
    benchmark.group = f"pfn_ranges {name}"
    out = benchmark(cache.pfn_ranges, start, end)
    assert out.shape == (len(cache), 2) and int(out[0, 0]) == first


def test_walk_clamp_pure_function(benchmark, layout) -> None:
    name, cache, cols, start, end, first = layout
    benchmark.group = f"pfn_ranges {name}"
    out = benchmark(gmem.clamp_folio_ranges, *cols, start, end)
    assert out.shape == (len(cache), 2) and int(out[0, 0]) == first


def test_walk_numpy_floor(benchmark, layout) -> None:
    """The floor: numpy writing the same (start, end) pairs from precomputed columns."""
    name, cache, (_, orders, pfn), _, _, _ = layout
    benchmark.group = f"pfn_ranges {name}"
    ends = pfn + (np.uint64(1) << orders)

    def floor():
        out = np.empty((len(pfn), 2), dtype=np.uint64)
        out[:, 0] = pfn
        out[:, 1] = ends
        return out

    out = benchmark(floor)
    assert out.shape == (len(cache), 2)


def test_walk_reference(benchmark) -> None:
    # Only on the 2 MiB layout: 16M Python folio objects would take minutes and gigabytes.
    name = "1TiB-2MiB-folios-scattered"
    nr, order, scattered = LAYOUTS[name]
    cols = build(nr, order, scattered)
    cache, oracle = gmem.FolioCache(), ref.FolioCache()
    cache.add_folios(*cols)
    oracle.add_folios(*cols)
    start, end = (1 << order) // 2, (nr << order) - (1 << order) // 2
    benchmark.group = f"pfn_ranges {name}"
    out = benchmark.pedantic(oracle.pfn_ranges, args=(start, end), rounds=3, iterations=1)
    assert np.array_equal(out, cache.pfn_ranges(start, end))


def mixed_layout(nr_pages: int, seed: int):
    """Folios of random orders 0..9 (and holes) from a fragmented PhysMem."""
    rng = np.random.default_rng(seed)
    pm = gmem.PhysMem(2 * nr_pages, seed=seed)
    pm.fragment(0.001)
    rows, index = [], 0
    while index < nr_pages:
        order = int(rng.integers(0, 10))
        while order and index % (1 << order):
            order -= 1
        if rng.random() > 0.05:
            rows.append((index, order, pm.alloc(order)))
        index += 1 << order
    cols = np.array(rows, dtype=np.uint64)
    return cols[:, 0].copy(), cols[:, 1].copy(), cols[:, 2].copy()


@pytest.mark.parametrize("impl", [gmem, ref], ids=["engine", "reference"])
def test_walk_mixed_orders_unaligned_ranges(benchmark, impl) -> None:
    """Mixed orders with holes, 1000 ranges with unaligned ends over a 4 GiB file."""
    benchmark.group = "pfn_ranges mixed orders, 1000 unaligned ranges"
    cols = mixed_layout(1 << 20, 3)
    cache = impl.FolioCache()
    cache.add_folios(*cols)
    rng = np.random.default_rng(4)
    starts = rng.integers(0, 1 << 20, 1000)
    ranges = [(int(s), int(s + rng.integers(1, 1 << 14))) for s in starts]
    if impl is ref:
        ranges = ranges[:50]  # the reference walks in Python: a sample, per range below

    def walk():
        return [cache.pfn_ranges(s, e) for s, e in ranges]

    out = benchmark.pedantic(walk, rounds=3, iterations=1)
    benchmark.extra_info["ranges"] = len(ranges)
    for (s, e), got in zip(ranges[:50], out[:50], strict=True):
        assert np.array_equal(got, gmem.clamp_folio_ranges(*cols, s, e))
