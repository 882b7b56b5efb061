"""IntervalMap.store / load at 10**5 and 10**6 live runs: the engine against the pure-Python
reference and the range maps a user would otherwise pick (gmem.benchpeers).

Two kinds of round, 1000 calls each (the time per call is the round time / 1000):
- cold: fresh random stores (or loads) drawn before every round, untimed, so nothing is
  left in the cache from the round before; the targets are judged on these;
- warm: the same 1000 operations replayed every round.
The map stays near its run count either way.  pytest-benchmark reports the median and the
spread (min, max, IQR) over the rounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gmem
import gmem.reference as ref

PRIVATE = 1 << 3
NR_PAGES = 1_000_000
RUNS = 100_000
CALLS = 1000
ROUNDS = 7


def populated(impl, runs=RUNS):
    nr_pages = 10 * runs
    m = impl.IntervalMap(nr_pages)
    starts = np.arange(0, nr_pages, 2 * nr_pages // runs, dtype=np.uint64)
    m.store_many(starts, starts + np.uint64(nr_pages // runs), np.full(len(starts), PRIVATE))
    assert len(m) == runs
    return m


def workload(seed=1, nr_pages=NR_PAGES):
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, nr_pages - 16, CALLS)
    ends = starts + rng.integers(1, 16, CALLS)
    values = rng.choice([0, PRIVATE], CALLS)
    return list(zip(starts.tolist(), ends.tolist(), values.tolist(), strict=True))


class Fresh:
    """A pedantic setup that draws new random operations for every round."""

    def __init__(self, make: Any) -> None:
        self.make, self.seed = make, 1000

    def __call__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.seed += 1
        return (self.make(self.seed),), {}


@pytest.mark.parametrize("impl", [gmem, ref], ids=["engine", "reference"])
def test_store(benchmark, impl) -> None:
    benchmark.group = "IntervalMap.store x1000 @1e5 runs, warm"
    m = populated(impl)
    ops = workload()

    def run():
        for s, e, v in ops:
            m.store(s, e, v)

    benchmark.pedantic(run, rounds=ROUNDS if impl is gmem else 1, iterations=1)
    assert abs(len(m) - RUNS) < RUNS // 10
    s, e, v = ops[-1]
    assert m.range_has(s, e, v)


@pytest.mark.parametrize("impl", [gmem, ref], ids=["engine", "reference"])
def test_load(benchmark, impl) -> None:
    benchmark.group = "IntervalMap.load x1000 @1e5 runs, warm"
    m = populated(impl)
    probes = np.random.default_rng(2).integers(0, NR_PAGES, CALLS).tolist()

    def run():
        return [m.load(i) for i in probes]

    got = benchmark(run)
    assert got == [PRIVATE if (i % 20) < 10 else 0 for i in probes]


@pytest.mark.parametrize("runs", [10**5, 10**6], ids=["1e5", "1e6"])
def test_store_cold(benchmark, runs) -> None:
    benchmark.group = f"IntervalMap.store x1000 @{runs:.0e} runs, cold"
    m = populated(gmem, runs)
    last: list[tuple[int, int, int]] = []

    def run(ops):
        for s, e, v in ops:
            m.store(s, e, v)
        last[:] = ops[-1:]

    benchmark.pedantic(run, setup=Fresh(lambda seed: workload(seed, 10 * runs)), rounds=ROUNDS)
    assert abs(len(m) - runs) < runs // 10
    (s, e, v) = last[0]
    assert m.range_has(s, e, v)


@pytest.mark.parametrize("runs", [10**5, 10**6], ids=["1e5", "1e6"])
def test_load_cold(benchmark, runs) -> None:
    benchmark.group = f"IntervalMap.load x1000 @{runs:.0e} runs, cold"
    m = populated(gmem, runs)
    nr_pages = 10 * runs

    def probes(seed):
        return np.random.default_rng(seed).integers(0, nr_pages, CALLS).tolist()

    seen: list[list[int]] = []

    def run(idx):
        seen[:] = [idx, [m.load(i) for i in idx]]

    benchmark.pedantic(run, setup=Fresh(probes), rounds=ROUNDS)
    idx, got = seen
    assert got == [PRIVATE if (i % 20) < 10 else 0 for i in idx]


def test_get_pfn_cold(benchmark) -> None:
    """get_pfn of fresh random pages of a 16 GiB guest of 4 KiB folios (2**22 folios)."""
    benchmark.group = "get_pfn x1000, 16 GiB of 4 KiB folios, cold"
    f = gmem.GuestMemfd(16 << 30 if not benchmark.disabled else 1 << 30, folio_order=0)
    f.fallocate(0, f.nr_pages)
    nr = f.nr_pages

    def indexes(seed):
        return np.random.default_rng(seed).integers(0, nr, CALLS).tolist()

    seen: list[Any] = []

    def run(idx):
        seen[:] = [idx, [f.get_pfn(i) for i in idx]]

    benchmark.pedantic(run, setup=Fresh(indexes), rounds=ROUNDS)
    idx, got = seen
    assert all(o == 0 for _, o in got) and len({p for p, _ in got}) == len(set(idx))
    f.close()


def test_bound_call_floor(benchmark) -> None:
    """The cheapest bound call: IntervalMap(1).load(0), 1000 times (get_pfn's yardstick)."""
    benchmark.group = "get_pfn x1000, 16 GiB of 4 KiB folios, cold"
    one = gmem.IntervalMap(1)
    zeros = [0] * CALLS
    got = benchmark(lambda: [one.load(i) for i in zeros])
    assert got == zeros


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


PEER_RUNS = {"sortedcontainers": RUNS, "intervaltree": 10_000, "portion": 500, "engine": RUNS}


def peer(name):
    if name == "engine":
        return populated(gmem)
    from gmem import benchpeers

    m = benchpeers.PEERS[name](NR_PAGES)
    step = NR_PAGES // PEER_RUNS[name]
    for s in range(0, NR_PAGES, step):
        m.store(s, s + step // 2, PRIVATE)
    return m


WORKLOADS = {
    "random-stores": lambda: workload(),
    "2MiB-toggles": lambda: [
        (s, s + 512, v) for s, v in zip(range(0, 512 * 500, 512), [PRIVATE, 0] * 250, strict=True)
    ],
    "page-toggles": lambda: [(s, s + 1, PRIVATE if s % 2 else 0) for s in range(1, 2001, 2)],
}


@pytest.mark.parametrize("workload_name", list(WORKLOADS))
@pytest.mark.parametrize("name", ["engine", "sortedcontainers", "intervaltree", "portion"])
def test_store_against_peers(benchmark, name, workload_name) -> None:
    benchmark.group = f"store x{len(WORKLOADS[workload_name]())}: {workload_name}"
    m = peer(name)
    ops = WORKLOADS[workload_name]()
    if name == "portion":
        ops = ops[:100]  # portion takes milliseconds per store: a sample

    def run():
        for s, e, v in ops:
            m.store(s, e, v)

    benchmark.pedantic(run, rounds=3 if name == "engine" else 1, iterations=1)
    s, e, v = ops[-1]
    assert m.range_has(s, e, v) and m.load(s) == v


@pytest.mark.parametrize("name", ["engine", "sortedcontainers", "intervaltree", "portion"])
def test_lookups_against_peers(benchmark, name) -> None:
    benchmark.group = "load + range_has x1000"
    m = peer(name)
    probes = np.random.default_rng(7).integers(0, NR_PAGES - 4, 500).tolist()

    def run():
        return [m.load(i) for i in probes] + [m.range_has(i, i + 4, PRIVATE) for i in probes]

    got = benchmark.pedantic(run, rounds=3, iterations=1)
    assert len(got) == 1000


def bulk_ranges():
    rng = np.random.default_rng(8)
    starts = rng.integers(0, NR_PAGES - 64, 100_000).astype(np.uint64)
    values = np.where(np.arange(len(starts)) % 2, PRIVATE, 0).astype(np.uint64)
    return starts, starts + np.uint64(32), values


def test_store_many_against_a_bitmap(benchmark) -> None:
    """Bulk stores of the one-bit case: store_many from numpy against pyroaring."""
    from gmem import benchpeers

    benchmark.group = "store_many 10**5 ranges"
    starts, ends, values = bulk_ranges()
    m, bm = gmem.IntervalMap(NR_PAGES), benchpeers.RoaringMap(NR_PAGES)
    benchmark(m.store_many, starts, ends, values)
    bm.store_many(starts, ends, values)
    probes = np.random.default_rng(9).integers(0, NR_PAGES, 2000).tolist()
    assert [m.load(i) for i in probes] == [bm.load(i) for i in probes]


def test_store_many_pyroaring(benchmark) -> None:
    from gmem import benchpeers

    benchmark.group = "store_many 10**5 ranges"
    starts, ends, values = bulk_ranges()
    bm = benchpeers.RoaringMap(NR_PAGES)
    benchmark.pedantic(bm.store_many, args=(starts, ends, values), rounds=3, iterations=1)
