"""IntervalMap.store / load at 10**5 live runs: the engine against the pure-Python reference.

Each round replays the same 1000 random stores (or loads), so the map stays near 10**5 runs;
the time per call is the round time / 1000.
"""

from __future__ import annotations

import numpy as np
import pytest

import gmem
import gmem.reference as ref

PRIVATE = 1 << 3
NR_PAGES = 1_000_000
RUNS = 100_000
CALLS = 1000


def populated(impl):
    m = impl.IntervalMap(NR_PAGES)
    starts = np.arange(0, NR_PAGES, 2 * NR_PAGES // RUNS, dtype=np.uint64)
    m.store_many(starts, starts + np.uint64(NR_PAGES // RUNS), np.full(len(starts), PRIVATE))
    assert len(m) == RUNS
    return m


def workload():
    rng = np.random.default_rng(1)
    starts = rng.integers(0, NR_PAGES - 16, CALLS)
    ends = starts + rng.integers(1, 16, CALLS)
    values = rng.choice([0, PRIVATE], CALLS)
    return list(zip(starts.tolist(), ends.tolist(), values.tolist(), strict=True))


@pytest.mark.parametrize("impl", [gmem, ref], ids=["engine", "reference"])
def test_store(benchmark, impl) -> None:
    benchmark.group = "IntervalMap.store x1000 @1e5 runs"
    m = populated(impl)
    ops = workload()

    def run():
        for s, e, v in ops:
            m.store(s, e, v)

    benchmark.pedantic(run, rounds=5 if impl is gmem else 1, iterations=1)
    assert abs(len(m) - RUNS) < RUNS // 10
    s, e, v = ops[-1]
    assert m.range_has(s, e, v)


@pytest.mark.parametrize("impl", [gmem, ref], ids=["engine", "reference"])
def test_load(benchmark, impl) -> None:
    benchmark.group = "IntervalMap.load x1000 @1e5 runs"
    m = populated(impl)
    probes = np.random.default_rng(2).integers(0, NR_PAGES, CALLS).tolist()

    def run():
        return [m.load(i) for i in probes]

    got = benchmark(run)
    assert got == [PRIVATE if (i % 20) < 10 else 0 for i in probes]


def test_loop_floor(benchmark) -> None:
    """The Python loop itself: the same 1000 iterations calling a no-op."""
    benchmark.group = "IntervalMap.store x1000 @1e5 runs"
    ops = workload()

    def noop(s, e, v):
        return None

    def run():
        for s, e, v in ops:
            noop(s, e, v)

    benchmark(run)
