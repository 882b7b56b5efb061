"""Bulk operations against a loop of single calls, and one get_pfn against the floor of a
bound call that only converts an integer (IntervalMap(1).load(0)).

Each group times its contenders on the same faulted-in file and indexes and asserts their
results agree.  Run:  pytest bench/test_bench_bulk.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gmem

N = 10**5  # operations per round (gmem bench --full measures 10**6)


@pytest.fixture(scope="module")
def guest() -> Any:
    """16 GiB of 4 KiB folios, shared and mmap-able, every folio faulted in."""
    f = gmem.GuestMemfd(16 << 30, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED)
    f.fallocate(0, f.nr_pages)
    rng = np.random.default_rng(0)
    indexes = {
        "in-order": np.arange(N, dtype=np.uint64),
        "random": rng.integers(0, f.nr_pages, N).astype(np.uint64),
    }
    for idx in indexes.values():
        f.get_pfns(idx)
    yield f, indexes
    f.close()


@pytest.mark.parametrize("order", ["in-order", "random"])
def test_get_pfns(benchmark: Any, guest: Any, order: str) -> None:
    f, indexes = guest
    benchmark.group = f"get_pfn x {N}, {order}"
    pfns, _ = benchmark(f.get_pfns, indexes[order])
    assert pfns[:100].tolist() == [f.get_pfn(i)[0] for i in indexes[order][:100].tolist()]


@pytest.mark.parametrize("order", ["in-order", "random"])
def test_get_pfn_loop(benchmark: Any, guest: Any, order: str) -> None:
    f, indexes = guest
    benchmark.group = f"get_pfn x {N}, {order}"
    args, get_pfn = indexes[order].tolist(), f.get_pfn

    def loop() -> list[tuple[int, int]]:
        return [get_pfn(i) for i in args]

    out = benchmark.pedantic(loop, rounds=3, iterations=1)
    assert [p for p, _ in out[:100]] == f.get_pfns(indexes[order][:100])[0].tolist()


@pytest.mark.parametrize("order", ["in-order", "random"])
def test_floor_loop(benchmark: Any, guest: Any, order: str) -> None:
    """The floor: a bound call that converts one integer and does nothing else."""
    benchmark.group = f"get_pfn x {N}, {order}"
    load = gmem.IntervalMap(1).load
    zeros = [0] * N

    def loop() -> list[int]:
        return [load(i) for i in zeros]

    assert benchmark.pedantic(loop, rounds=3, iterations=1)[0] == 0


@pytest.mark.parametrize("bulk", [True, False], ids=["many", "loop"])
@pytest.mark.parametrize("op", ["guest_read", "host_read", "guest_write", "host_write"])
def test_many_vs_loop(benchmark: Any, guest: Any, op: str, bulk: bool) -> None:
    f, indexes = guest
    benchmark.group = f"{op} x {N}, in order"
    idx = indexes["in-order"]
    tokens = np.arange(1, N + 1, dtype=np.uint64)
    if bulk:
        many = getattr(f, f"{op}_many")
        args = (idx,) if op.endswith("read") else (idx, tokens)
        benchmark.pedantic(many, args=args, rounds=3, iterations=1)
    else:
        single, pairs = getattr(f, op), list(zip(idx.tolist(), tokens.tolist(), strict=True))
        if op.endswith("read"):
            benchmark.pedantic(lambda: [single(i) for i, _ in pairs], rounds=3, iterations=1)
        else:
            benchmark.pedantic(lambda: [single(i, t) for i, t in pairs], rounds=3, iterations=1)
    if op.endswith("write"):
        reader = f.guest_read_many if op == "guest_write" else f.host_read_many
        assert reader(idx[:100]).tolist() == tokens[:100].tolist()
