"""The bulk forms (get_pfns, guest_read_many, ..., set_attributes_many): each has exactly
the effect of the single calls in order, and what a failing element raises carries
``completed``, the number of elements done before it.

Each test compares a bulk call with the single calls on a twin file, in both
implementations; the state machine (test_stateful.py) and the differential test compare
the engine with the reference on random states.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

import gmem
import gmem.reference as ref

from conftest import IMPLS
from model import snapshot

P = gmem.PAGE_SIZE
HOOKS = {"CONVERT", "RECLAIM", "INVALIDATE", "POPULATE"}

# name -> (the single call, how many arrays the bulk call takes)
SINGLE = {
    "get_pfns": "get_pfn",
    "guest_read_many": "guest_read",
    "guest_write_many": "guest_write",
    "host_read_many": "host_read",
    "host_write_many": "host_write",
    "set_attributes_many": "set_attributes",
}


def layout(impl: Any, arch: Any = None) -> Any:
    """A file with huge and small folios, holes, both attributes, a mapping and a pin."""
    arch = impl.arch.Recorder(HOOKS) if arch is None else arch
    f = impl.GuestMemfd(64 * P, flags=gmem.FLAG_MMAP, folio_order=3, arch=arch)
    f.fallocate(0, 16)
    f.set_attributes(8, 32, gmem.SHARED)
    f.host_write(9, 99)
    f.pin(20)
    f.guest_write(2, 7)
    return f


def state(f: Any) -> Any:
    return snapshot(f), list(f.arch.calls)


def plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.tolist())
    return value


def run_bulk(f: Any, name: str, columns: list[list[int]]) -> tuple[Any, Any]:
    """(result or (exception type, message, completed)), state after; closes the file."""
    try:
        got: Any = ("ok", plain(getattr(f, name)(*columns)))
    except (ValueError, TypeError, RuntimeError, KeyError, gmem.GmemError) as exc:
        got = ("raises", type(exc), str(exc), exc.completed)  # type: ignore[attr-defined]
    after = state(f)
    f.close()
    return got, after


def run_singles(f: Any, name: str, columns: list[list[int]]) -> tuple[Any, Any]:
    """The single calls in order, stopping at the first error: what the bulk call must do."""
    single = getattr(f, SINGLE[name])
    results = []
    got: Any = None
    for k, args in enumerate(zip(*columns, strict=True)):
        try:
            results.append(single(*args))
        except (ValueError, TypeError, RuntimeError, gmem.GmemError) as exc:
            got = ("raises", type(exc), str(exc), k)
            break
    if got is None and name == "get_pfns":
        pfns = np.array([r[0] for r in results], dtype=np.uint64)
        orders = np.array([r[1] for r in results], dtype=np.uint8)
        got = ("ok", plain((pfns, orders)))
    elif got is None:
        reads = np.array(results, dtype=np.uint64) if name.endswith("read_many") else None
        got = ("ok", plain(reads))
    after = state(f)
    f.close()
    return got, after


CASES = [
    # (call, columns): every outcome, and errors at the start, in the middle and at the end
    ("get_pfns", [[0, 1, 2, 3, 4, 5, 6, 7, 40, 41, 3]]),
    ("get_pfns", [[3, 4, 64, 5]]),  # index past the end: ValueError, completed 2
    ("get_pfns", [list(range(0, 64))]),
    ("get_pfns", [[]]),
    ("guest_read_many", [[2, 9, 30, 40, 2]]),
    ("guest_read_many", [[2, 9, 2**40]]),
    ("guest_write_many", [[1, 2, 3, 50], [5, 6, 7, 8]]),
    ("guest_write_many", [[1, 2, 99, 3], [5, 6, 7, 8]]),
    ("host_read_many", [[9, 10, 11, 12, 30]]),
    ("host_read_many", [[9, 10, 3, 12]]),  # 3 is private: SigBus, completed 2
    ("host_write_many", [[9, 10, 63], [1, 2, 2**64 - 1]]),
    ("host_write_many", [[9, 64, 10], [1, 2, 3]]),  # at the end: SigBus, completed 1
    ("set_attributes_many", [[0, 4, 8], [4, 8, 12], [0, 0, 8]]),
    ("set_attributes_many", [[0, 4, 40], [4, 3, 48], [0, 0, 0]]),  # start > end: completed 1
    ("set_attributes_many", [[0, 16, 0], [8, 24, 8], [0, 8, 8]]),  # pinned page 20: busy
    ("set_attributes_many", [[0, 0], [8, 8], [0, 16]]),  # bad attrs: completed 1
]


@IMPLS
@pytest.mark.parametrize(
    ("name", "columns"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)]
)
def test_a_bulk_call_is_the_single_calls_in_order(impl: Any, name: str, columns: Any) -> None:
    got = run_bulk(layout(impl), name, columns)
    want = run_singles(layout(impl), name, columns)
    assert got == want


@pytest.mark.parametrize(
    ("name", "columns"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)]
)
def test_engine_and_reference_agree_on_bulk_calls(name: str, columns: Any) -> None:
    got, want = run_bulk(layout(gmem), name, columns), run_bulk(layout(ref), name, columns)
    assert got == want


@IMPLS
def test_completed_counts_the_elements_before_the_failing_one(impl: Any) -> None:
    f = layout(impl)
    with pytest.raises(gmem.SigBus) as info:
        f.host_write_many([9, 10, 11, 5, 12], [1, 2, 3, 4, 5])  # 5 is private
    assert info.value.completed == 3 and info.value.index == 5  # type: ignore[attr-defined]
    assert f.host_read_many([9, 10, 11, 12]).tolist() == [1, 2, 3, 0]  # before it: applied
    with pytest.raises(gmem.ConversionBusy) as busy:
        f.set_attributes_many([40, 16], [48, 24], [gmem.PRIVATE, gmem.PRIVATE])
    assert busy.value.completed == 1 and busy.value.error_index == 16  # type: ignore[attr-defined]
    assert f.get_attributes(40) == gmem.PRIVATE and f.get_attributes(16) == gmem.SHARED
    f.close()
    with pytest.raises(ValueError, match="^self: operation on a closed") as closed:
        f.get_pfns([])  # a closed file refuses even an empty batch, as every call on it
    assert closed.value.completed == 0  # type: ignore[attr-defined]


@IMPLS
def test_out_of_memory_midway_keeps_what_was_faulted(impl: Any) -> None:
    pm = impl.PhysMem(8)
    f = impl.GuestMemfd(16 * P, physmem=pm)
    with pytest.raises(gmem.OutOfMemory) as info:
        f.get_pfns(range(16))
    assert info.value.completed == 8  # type: ignore[attr-defined]
    assert len(f.folios()) == 8 and pm.nr_free == 0
    f.close()


@IMPLS
def test_arrays_are_converted_as_single_arguments(impl: Any) -> None:
    f = impl.GuestMemfd(16 * P, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED)
    want = f.get_pfns([0, 1, 2, 3])
    for indexes in (
        np.arange(4),  # int64
        np.arange(4, dtype=np.uint8),
        np.arange(4, dtype=np.int32)[::-1][::-1],  # a view
        np.arange(8, dtype=np.uint64)[::2][:4] // 2,  # not contiguous
        (0, 1, 2, 3),
        range(4),
        [np.int16(0), 1, np.uint64(2), 3],
        np.array([0, 1, 2, 3], dtype=object),
    ):
        got = f.get_pfns(indexes)
        assert [a.tolist() for a in got] == [a.tolist() for a in want], indexes
        assert (got[0].dtype, got[1].dtype) == (np.uint64, np.uint8)
    assert f.get_pfns([True, False])[0].tolist() == want[0][[1, 0]].tolist()  # as get_pfn(True)
    f.host_write_many([0, 1], [2**63, 2**64 - 1])  # Python ints numpy would make float
    assert f.host_read_many([0, 1]).tolist() == [2**63, 2**64 - 1]
    assert f.guest_read_many(np.array([], dtype=np.float64)).dtype == np.uint64  # empty: any
    f.close()


@IMPLS
def test_bulk_results_match_the_single_calls_on_huge_folios(impl: Any) -> None:
    f = impl.GuestMemfd(4 << 20, folio_order=9, arch="snp")
    f.fallocate(0, f.nr_pages)
    f.set_attributes(256, 264, gmem.SHARED)  # splits the max order of the first folio
    indexes = [*range(250, 270), 1000, 0, 511, 512, 1023, 600, 600]
    pfns, orders = f.get_pfns(indexes)
    assert list(zip(pfns.tolist(), orders.tolist(), strict=True)) == [f.get_pfn(i) for i in indexes]
    f.close()


# ---- Python hooks ----------------------------------------------------------------------


def raising_arch(impl: Any, fail_at: int) -> Any:
    class Raising(impl.Arch):  # type: ignore[name-defined, misc]
        config = frozenset({"PREPARE"})

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[Any] = []

        def prepare(self, index: int, pfn: int, nr_pages: int) -> None:
            self.calls.append(("prepare", index, nr_pages))
            if len(self.calls) == fail_at:
                raise KeyError(f"prepare {index}")

    return Raising()


@IMPLS
@pytest.mark.parametrize("fail_at", [1, 3, 99])
def test_a_hook_that_raises_ends_the_batch_after_its_element(impl: Any, fail_at: int) -> None:
    indexes = [0, 5, 9, 13, 3, 30]
    bulk = impl.GuestMemfd(64 * P, arch=raising_arch(impl, fail_at))
    singles = impl.GuestMemfd(64 * P, arch=raising_arch(impl, fail_at))
    done = 0
    for i in indexes:
        done += 1
        try:
            singles.get_pfn(i)
        except KeyError:
            break
    else:
        done = len(indexes)
    if fail_at > len(indexes):
        bulk.get_pfns(indexes)
    else:
        with pytest.raises(KeyError) as info:
            bulk.get_pfns(indexes)
        # the element whose hook raised is done, as the single call is when it raises
        assert info.value.completed == done == fail_at  # type: ignore[attr-defined]
    assert state(bulk) == state(singles)
    bulk.close()
    singles.close()


@pytest.mark.parametrize("fail_at", [1, 4])
def test_engine_and_reference_stop_at_the_same_hook(fail_at: int) -> None:
    def run(impl: Any) -> Any:
        f = impl.GuestMemfd(64 * P, folio_order=2, arch=raising_arch(impl, fail_at))
        f.set_attributes(4, 8, gmem.SHARED)
        return run_bulk(f, "get_pfns", [[0, 1, 4, 8, 9, 40, 44]])

    assert run(gmem) == run(ref)


def switching_arch(impl: Any) -> Any:
    """make_shared replaces itself after its first call: a batch must look it up anew for
    each element, as each single call does."""

    class Switching(impl.Arch):  # type: ignore[name-defined, misc]
        config = frozenset({"FREE_ON_SHARED_CONVERSION"})
        batched = True

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[Any] = []

        def make_shared(self, ranges: Any) -> None:
            self.calls.append(("first", len(ranges)))
            self.make_shared = self.second  # type: ignore[method-assign]

        def second(self, ranges: Any) -> None:
            self.calls.append(("second", len(ranges)))

    return Switching()


@IMPLS
def test_each_element_looks_its_hooks_up_as_a_single_call(impl: Any) -> None:
    def convert(bulk: bool) -> Any:
        f = impl.GuestMemfd(16 * P, arch=switching_arch(impl))
        f.fallocate(0, 16)
        starts, ends = [0, 4, 8], [4, 8, 12]
        if bulk:
            f.set_attributes_many(starts, ends, [0, 0, 0])
        else:
            for s, e in zip(starts, ends, strict=True):
                f.set_attributes(s, e, 0)
        calls = list(f.arch.calls)
        f.close()
        return calls

    assert convert(True) == convert(False) == [("first", 4), ("second", 4), ("second", 4)]


@IMPLS
def test_a_hook_may_not_run_a_bulk_call_on_its_own_file(impl: Any) -> None:
    class Nested(impl.Arch):  # type: ignore[name-defined, misc]
        config = frozenset({"PREPARE"})

        def prepare(self, index: int, pfn: int, nr_pages: int) -> None:
            self.file.guest_write_many([index], [1])

    f = impl.GuestMemfd(8 * P, arch=Nested())
    with pytest.raises(RuntimeError, match="may read the file it serves") as info:
        f.get_pfns([0, 1])
    assert info.value.completed == 1  # type: ignore[attr-defined]
    assert len(f.folios()) == 1  # element 0 ran, element 1 did not
    assert f.physmem.read(int(f.folios()["pfn"][0])) == 0  # the nested call changed nothing
    f.close()


# ---- the GIL and Ctrl-C -----------------------------------------------------------------


def test_a_long_bulk_call_lets_other_threads_run() -> None:
    f = gmem.GuestMemfd(1 << 30, folio_order=9)
    f.fallocate(0, f.nr_pages)
    indexes = np.tile(np.arange(f.nr_pages, dtype=np.uint64), 32)  # 2**23: one long call
    ticks = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.01)
    begin = time.monotonic()
    f.get_pfns(indexes)
    end = time.monotonic()
    stop.set()
    t.join()
    inside = [x for x in ticks if begin < x < end]
    assert len(inside) >= 3, "the other thread never ran while the engine looped"
    f.close()


def test_ctrl_c_ends_a_bulk_call_between_elements() -> None:
    from test_attack import interrupted_after

    out = interrupted_after(
        """
        import numpy as np, gmem
        f = gmem.GuestMemfd(1 << 40, physmem=gmem.PhysMem(1 << 28))
        indexes = np.arange(1 << 24, dtype=np.uint64) * np.uint64(16)
        print("ready", flush=True)
        try:
            f.get_pfns(indexes)  # 2**24 faults, each a new folio: several seconds
        except KeyboardInterrupt as e:
            # the elements before it are applied, one folio each; nothing else
            assert 0 < e.completed < len(indexes), e.completed
            assert f.stats["folios_allocated"] == e.completed == len(f.folios())
            nxt = int(indexes[e.completed])
            assert len(f.folios(nxt, nxt + 1)) == 0
            print("interrupted", e.completed)
        f.close()
        """,
        1.0,
    )
    assert int(out.stdout.split()[-1]) > 0
