"""Threads: several Python threads fault, convert and punch on one file and on several files
sharing one PhysMem.  Every operation runs under the PhysMem's lock; long ones with a
built-in arch drop the GIL, so they really overlap with the other threads' calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import gmem

P = gmem.PAGE_SIZE
REGION = 1024  # pages each thread owns: two 2 MiB folios


def run_threads(work: list[Callable[[], Any]], timeout: float = 60) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], Any]) -> Callable[[], None]:
        def go() -> None:
            try:
                fn()
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        return go

    threads = [threading.Thread(target=wrap(fn)) for fn in work]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a thread is stuck: deadlock?"
    assert not errors, errors[0]


def test_threads_on_one_file_lose_nothing() -> None:
    threads, rounds = 4, 25
    f = gmem.GuestMemfd(threads * REGION * P, flags=gmem.FLAG_MMAP, folio_order=9, arch="snp")
    last: dict[int, int] = {}

    def worker(t: int) -> Callable[[], None]:
        base = t * REGION

        def go() -> None:
            for r in range(rounds):
                for i in range(base, base + REGION, 97):
                    f.guest_write(i, (t << 32) | (r << 16) | (i - base) | 1)
                f.set_attributes(base, base + REGION, gmem.SHARED)  # SNP garbles...
                for i in range(base + 1, base + REGION, 97):
                    f.host_write(i, (t << 32) | r | 2)
                    last[i] = (t << 32) | r | 2
                f.set_attributes(base, base + REGION, gmem.PRIVATE)  # ...both ways
                f.punch_hole(base + 512, base + 768)  # part of the second folio
                f.fallocate(base, base + REGION)

        return go

    run_threads([worker(t) for t in range(threads)])
    assert f.check() == []
    assert f.stats["conversions"] == 2 * threads * rounds
    assert f.stats["conversions_busy"] == 0
    for i, _token in last.items():
        if (i % REGION) < 512 or (i % REGION) >= 768:  # not punched after the last write
            assert f.guest_read(i) == gmem.GARBLED  # written shared, converted: garbled
    f.close()
    assert f.physmem.rmp_runs().tolist() == [[0, f.physmem.nr_pages, 0]]


def test_threads_on_files_sharing_one_physmem() -> None:
    pm = gmem.PhysMem(1 << 22, seed=1)
    archs = ["snp", "pkvm", "tdx", "sw_protected"]
    files = [
        gmem.GuestMemfd(1 << 32, flags=gmem.FLAG_MMAP, physmem=pm, folio_order=9, arch=a)
        for a in archs
    ]
    counts = {a: 0 for a in archs}

    def worker(f: Any) -> Callable[[], None]:
        def go() -> None:
            for r in range(20):
                f.fallocate(0, f.nr_pages)  # 2048 folios: the GIL is dropped
                f.guest_write(r, r + 1)
                f.set_attributes(0, f.nr_pages, gmem.SHARED)
                f.host_write(r + 1, r + 2)
                assert f.host_read(r + 1) == r + 2
                f.set_attributes(0, f.nr_pages, gmem.PRIVATE)
                f.punch_hole(0, f.nr_pages // 2)
                counts[f.arch.name] += 1

        return go

    run_threads([worker(f) for f in files])
    assert all(c == 20 for c in counts.values())
    for f in files:
        assert f.check() == [], f.arch.name
        f.close()
    assert pm.nr_free == 1 << 22


def test_python_hooks_and_other_threads_do_not_deadlock() -> None:
    """A Python hook runs under the model lock and lets other threads take the GIL; those
    threads touching the same PhysMem must wait for the lock without holding the GIL."""
    pm = gmem.PhysMem(1 << 16)

    class Slow(gmem.Arch):
        config = {"FREE_ON_SHARED_CONVERSION", "FREE"}
        batched = True

        def make_shared(self, ranges: Any) -> None:
            time.sleep(0.0005)  # give the GIL away inside the hook

    slow = gmem.GuestMemfd(1 << 26, physmem=pm, folio_order=2, arch=Slow())
    other = gmem.GuestMemfd(1 << 24, physmem=pm, folio_order=0, arch="pkvm")
    stop = threading.Event()

    def converter() -> None:
        for _ in range(10):
            slow.fallocate(0, slow.nr_pages)
            slow.set_attributes(0, slow.nr_pages, gmem.SHARED)
            slow.set_attributes(0, slow.nr_pages, gmem.PRIVATE)
        stop.set()

    def poker() -> None:
        i = 0
        while not stop.is_set():
            other.guest_write(i % other.nr_pages, i + 1)
            pm.read(0)
            slow.get_attributes(i % slow.nr_pages)
            i += 1

    run_threads([converter, poker, poker])
    assert slow.check() == [] and other.check() == []
    slow.close()
    other.close()
