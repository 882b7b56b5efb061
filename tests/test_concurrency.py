"""Threads: several Python threads fault, convert and punch on one file and on several files
sharing one PhysMem.  Every operation runs under the PhysMem's lock; long ones with a
built-in arch drop the GIL, so they really overlap with the other threads' calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import gmem
import gmem.reference.guest_memfd as reference_guest_memfd

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


HOOKED = {"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION"}
HOOK_NAMES = set(reference_guest_memfd.HOOK_NAMES)  # every hook, under every name


def test_hooks_reading_files_and_recorder_readers_mix(record_property: Any) -> None:
    """Python hooks (per range and batched) that read their own file and now and then a
    file of another PhysMem, each thread on its own file; meanwhile a built-in Recorder's
    file is converted without the GIL and two threads read and clear its log.  Bounded in
    time; a hook reading another PhysMem's file may be refused ("deadlock: ...": the engine
    breaking a lock cycle), never left waiting.  Everything adds up at the end."""
    seconds = 2.0
    stop = time.monotonic() + seconds
    ops: dict[str, int] = {}
    refused: list[str] = []
    running = True  # cross-file reads until the files start closing
    widest = [0]  # the most ranges in one batch: per-range hooks then loop over several
    files: list[Any] = []
    reads = [
        lambda f: f.get_attributes(0),
        lambda f: f.stats,
        lambda f: f.folios(),
        lambda f: f.check(),
    ]

    class Reading(gmem.Arch):
        config = HOOKED

        def __init__(self, key: str, other: int) -> None:
            super().__init__()
            self.key, self.other, self.n = key, other, 0

        def read(self) -> None:
            self.n += 1
            ops[self.key + ":hook"] = ops.get(self.key + ":hook", 0) + 1
            f = self.file
            assert f is not None and not f.closed
            reads[self.n % len(reads)](f)
            if self.n % 8 == 0 and running:  # another PhysMem's file, maybe busy
                other = files[-1 if self.n % 32 == 0 else self.other]  # the Recorder's too
                try:
                    other.get_attributes(self.n % 16)
                except RuntimeError as exc:
                    if not str(exc).startswith("deadlock"):
                        raise
                    refused.append(str(exc))

        def prepare(self, index: int, pfn: int, nr_pages: int) -> None:
            self.read()

        def invalidate_start(self, start: int, end: int, kinds: int) -> None:
            self.read()

        def invalidate_end(self, start: int, end: int) -> None:
            self.read()

    class PerRange(Reading):
        def make_shared(self, start_pfn: int, end_pfn: int) -> None:
            self.read()

        def free_folio(self, start_pfn: int, end_pfn: int) -> None:
            self.read()

    class Batched(Reading):
        batched = True

        def make_shared(self, ranges: Any) -> None:
            assert ranges.shape[1] == 2
            widest[0] = max(widest[0], len(ranges))
            self.read()

        def free_folio(self, ranges: Any) -> None:
            assert ranges.shape[1] == 2
            self.read()

    # Files 0-2: Python archs, each on its own fragmented PhysMem (a batch has many
    # ranges), each reading the next one's file; file 3: a Recorder on a larger file.
    kinds = [PerRange, Batched, PerRange]
    for t, kind in enumerate(kinds):
        pm = gmem.PhysMem(1024, seed=t)
        pm.fragment(0.5)
        arch = kind(f"py{t}", (t + 1) % len(kinds))  # a cycle: 0 reads 1 reads 2 reads 0
        files.append(gmem.GuestMemfd(64 * P, flags=gmem.FLAG_MMAP, arch=arch, physmem=pm))
    rec = gmem.arch.Recorder(HOOKED)
    files.append(gmem.GuestMemfd(16 << 20, flags=gmem.FLAG_MMAP, arch=rec))

    def python_arch_thread(t: int) -> Callable[[], None]:
        def go() -> None:
            f, key, r = files[t], f"py{t}", 0
            while time.monotonic() < stop:
                f.fallocate(0, f.nr_pages)
                f.guest_write(r % f.nr_pages, r + 1)
                f.set_attributes(0, f.nr_pages, gmem.SHARED)
                f.host_write(r % f.nr_pages, r + 2)
                f.set_attributes(0, f.nr_pages, gmem.PRIVATE)
                f.punch_hole(0, f.nr_pages // 2)
                r += 1
                ops[key] = r * 6

        return go

    def converter() -> None:
        f, n, r = files[-1], files[-1].nr_pages, 0
        while time.monotonic() < stop:
            f.fallocate(0, n)  # without the GIL: the readers run meanwhile
            f.set_attributes(0, n, gmem.SHARED)
            f.set_attributes(0, n, gmem.PRIVATE)
            f.punch_hole(0, n)
            r += 1
            ops["recorder-file"] = r * 4

    def reader(key: str) -> Callable[[], None]:
        def go() -> None:
            r = 0
            while time.monotonic() < stop:
                calls = rec.calls
                if calls:
                    ops[key + ":logged"] = ops.get(key + ":logged", 0) + len(calls)
                assert all(c[0] in HOOK_NAMES for c in calls[:8])
                frees = rec.ranges("free_folio")
                assert frees.shape[1:] == (2,)
                assert rec.stats["calls"] >= 0
                if r % 2:
                    rec.clear()
                r += 1
                ops[key] = r * 4

        return go

    run_threads(
        [python_arch_thread(t) for t in range(len(kinds))]
        + [converter, reader("reader0"), reader("reader1")],
        timeout=seconds + 30,
    )
    running = False
    total = sum(v for k, v in ops.items() if not k.endswith(":logged"))
    print(f"{total} operations in {seconds} s ({len(refused)} cross-file reads refused): {ops}")
    record_property("operations", total)
    assert all(ops.get(k, 0) > 0 for k in ["py0", "py1", "py2", "recorder-file", "reader0"])
    assert all(ops.get(f"py{t}:hook", 0) > 0 for t in range(len(kinds)))
    assert all(r.startswith("deadlock") for r in refused)
    assert widest[0] > 1
    assert ops.get("reader0:logged", 0) + ops.get("reader1:logged", 0) > 0
    for f in files:
        assert f.check() == [], (f.arch.name, f.check())
        pm = f.physmem
        f.close()
        assert f.check() == [], (f.arch.name, f.check())
        assert pm.nr_free + pm.nr_kept == pm.nr_pages, (f.arch.name, pm.nr_free, pm.nr_kept)
