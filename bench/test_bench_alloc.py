"""Allocation: fallocate and close of order-0 folios, per folio (docs/performance.md).

Each round starts cold: a fresh file and PhysMem (and, for close, a fresh fallocate that
is not timed).  bench/alloc_compare.py runs the same steps against an older build, side by
side, and bench/native/bench_alloc.cpp times the allocator alone.
"""

from __future__ import annotations

import pytest

import gmem


@pytest.mark.parametrize("step", ["fallocate", "close"])
def test_fallocate_and_close_per_folio(benchmark, step: str) -> None:
    benchmark.group = "allocation"
    n = 1 << (12 if benchmark.disabled else 24)  # 64 GiB of 4 KiB folios
    files: list[gmem.GuestMemfd] = []

    def setup() -> tuple[tuple[gmem.GuestMemfd], dict[str, object]]:
        f = gmem.GuestMemfd(n * gmem.PAGE_SIZE, arch="sw_protected")
        if step == "close":
            f.fallocate(0, n)
        files.append(f)
        return (f,), {}

    def run(f: gmem.GuestMemfd) -> None:
        if step == "fallocate":
            f.fallocate(0, n)
        else:
            f.close()

    benchmark.pedantic(run, setup=setup, rounds=1 if benchmark.disabled else 5, iterations=1)
    f = files[-1]
    assert f.stats["folios_allocated"] == n
    if step == "close":  # every page back, coalesced into the blocks it started as
        assert f.physmem.nr_free == n and len(f.physmem.free_blocks()) == max(1, n >> 18)
    if not benchmark.disabled:
        benchmark.extra_info["ns_per_folio"] = benchmark.stats.stats.median * 1e9 / n
    for g in files:
        g.close()
