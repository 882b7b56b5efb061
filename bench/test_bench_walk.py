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
    # name: (number of folios, order)
    "1TiB-2MiB-folios": (1 << 19, 9),
    "2^24-order0-folios": (1 << 24, 0),
}


def build(nr_folios: int, order: int):
    index = np.arange(nr_folios, dtype=np.uint64) << np.uint64(order)
    # Scatter the folios over physical memory: a fixed shuffle of aligned slots.
    pfn = np.random.default_rng(0).permutation(nr_folios).astype(np.uint64) << np.uint64(order)
    orders = np.full(nr_folios, order, dtype=np.uint64)
    return index, orders, pfn


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    nr, order = LAYOUTS[request.param]
    index, orders, pfn = build(nr, order)
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
    name = "1TiB-2MiB-folios"
    nr, order = LAYOUTS[name]
    cols = build(nr, order)
    cache, oracle = gmem.FolioCache(), ref.FolioCache()
    cache.add_folios(*cols)
    oracle.add_folios(*cols)
    start, end = (1 << order) // 2, (nr << order) - (1 << order) // 2
    benchmark.group = f"pfn_ranges {name}"
    out = benchmark.pedantic(oracle.pfn_ranges, args=(start, end), rounds=3, iterations=1)
    assert np.array_equal(out, cache.pfn_ranges(start, end))
