"""Figures for comparing two builds of gmem side by side: run it under each build in turn
(e.g. ``PYTHONPATH=/path/to/other/build python bench/side_by_side.py``) and compare the
JSON.  Uses only the API both builds share.  us per call for the IntervalMap and get_pfn
rows (one entry per pass), seconds for fallocate and close.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import gmem

CALLS, REPEAT = 2000, 5


def timings(fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> list[float]:
    out = []
    for _ in range(REPEAT):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) / CALLS * 1e6)
    return out


def ops(n_pages: int, seed: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    s = rng.integers(0, n_pages - 16, CALLS)
    e = s + rng.integers(1, 16, CALLS)
    v = rng.choice([0, 8], CALLS)
    return list(zip(s.tolist(), e.tolist(), v.tolist(), strict=True))


def main() -> None:
    res: dict[str, list[float]] = {}
    for runs in (10**5, 10**6):
        n = 10 * runs
        m = gmem.IntervalMap(n)
        st = np.arange(0, n, 10, dtype=np.uint64)
        m.store_many(st, st + np.uint64(5), np.full(len(st), 8))
        seeds = iter(range(100, 1000))
        cur: dict[str, Any] = {}

        def fresh(n: int = n, seeds: Any = seeds, cur: dict[str, Any] = cur) -> None:
            cur["o"] = ops(n, next(seeds))

        def store(m: Any = m, cur: dict[str, Any] = cur) -> None:
            for a, b, c in cur["o"]:
                m.store(a, b, c)

        def load(m: Any = m, cur: dict[str, Any] = cur) -> None:
            for a, _, _ in cur["o"]:
                m.load(a)

        warm = ops(n, 1)

        def replay(cur: dict[str, Any] = cur, warm: Any = warm) -> None:
            cur["o"] = warm

        res[f"store cold {runs:.0e}"] = timings(store, fresh)
        res[f"load cold {runs:.0e}"] = timings(load, fresh)
        res[f"store warm {runs:.0e}"] = timings(store, replay)
        res[f"load warm {runs:.0e}"] = timings(load, replay)
    f = gmem.GuestMemfd(16 << 30, folio_order=0)
    t0 = time.perf_counter()
    f.fallocate(0, f.nr_pages)
    res["fallocate 16GiB s"] = [time.perf_counter() - t0]
    rng = np.random.default_rng(4)
    idx: dict[str, list[int]] = {}

    def new_indexes() -> None:
        idx["i"] = rng.integers(0, f.nr_pages, CALLS).tolist()

    def get_pfns() -> None:
        for i in idx["i"]:
            f.get_pfn(i)

    res["get_pfn cold 16GiB"] = timings(get_pfns, new_indexes)
    one = gmem.IntervalMap(1)
    zeros = [0] * CALLS

    def floor() -> None:
        for i in zeros:
            one.load(i)

    res["IntervalMap(1).load(0)"] = timings(floor)
    t0 = time.perf_counter()
    f.close()
    res["close 16GiB s"] = [time.perf_counter() - t0]
    json.dump(res, sys.stdout)
    print()


if __name__ == "__main__":
    main()
