"""The engine's block paths of the bulk calls are still the single calls in order.

A run of consecutive indexes is done as one block (its folios walked off the leaves, the
attribute run and the host mapping asked once), and a scattered batch of 256 or more finds
its folios in index order first.  Both are taken only with a C++ arch (a Python arch's
hooks are looked up per element), so these files use built-in arches: sw_protected, which
hears nothing, and snp, whose guest_mapped and prepare run for every element.  Each batch
is compared with the single calls on a twin file, and the engine with the reference: what
each returns or raises (with ``completed``), and the state after.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gmem
import gmem.reference as ref

from model import snapshot

P = gmem.PAGE_SIZE
NR = 96  # pages of the files below

SINGLE = {
    "get_pfns": "get_pfn",
    "guest_read_many": "guest_read",
    "guest_write_many": "guest_write",
    "host_read_many": "host_read",
    "host_write_many": "host_write",
}

# One step of a file's history: fallocate, attributes, a write, a read (uptodate), a punch.
step = st.one_of(
    st.tuples(st.just("fallocate"), st.integers(0, NR - 1), st.integers(1, 40)),
    st.tuples(st.just("attrs"), st.integers(0, NR - 1), st.integers(1, 40)),
    st.tuples(st.just("write"), st.integers(0, NR - 1), st.integers(1, 2**64 - 1)),
    st.tuples(st.just("read"), st.integers(0, NR - 1), st.just(0)),
    st.tuples(st.just("punch"), st.integers(0, NR - 1), st.integers(1, 16)),
    st.tuples(st.just("poison"), st.integers(0, NR - 1), st.just(0)),
)


def make(impl: Any, arch: str, order: int, history: list[tuple[str, int, int]]) -> Any:
    """A file with @history applied; order 4 under the "hugetlb" policy, whose conversions
    to shared split huge folios, so that small folios follow a huge one in a leaf."""
    f = impl.GuestMemfd(
        NR * P,
        flags=gmem.FLAG_MMAP,
        folio_order=min(order, 4),
        arch=arch,
        huge_policy="hugetlb" if order == 5 else "none",
    )
    for kind, a, b in history:
        try:
            if kind == "fallocate":
                f.fallocate(a, min(NR, a + b))
            elif kind == "attrs":
                f.set_attributes(a, min(NR, a + b), gmem.SHARED if b % 2 else 0)
            elif kind == "write":
                f.guest_write(a, b)
            elif kind == "read":
                f.guest_read(a)
            elif kind == "punch":
                f.punch_hole(a, min(NR, a + b))
            else:
                f.memory_failure(a)
        except (ValueError, gmem.GmemError):
            pass  # the same in both implementations; the differential tests check that
    return f


def outcome(f: Any, name: str, columns: list[Any]) -> Any:
    """What the bulk call returns or raises, then the state; closes the file."""
    try:
        got = getattr(f, name)(*columns)
        out: Any = ("ok", [a.tolist() for a in got] if isinstance(got, tuple) else got)
        if isinstance(got, np.ndarray):
            out = ("ok", got.tolist())
    except (ValueError, gmem.GmemError) as exc:
        out = ("raises", type(exc), str(exc), exc.completed)  # type: ignore[union-attr]
    after = snapshot(f)
    f.close()
    return out, after


def singles(f: Any, name: str, columns: list[Any]) -> Any:
    """The single calls in order, stopping at the first error, as the bulk call must."""
    single = getattr(f, SINGLE[name])
    results = []
    out: Any = None
    for k, args in enumerate(zip(*columns, strict=True)):
        try:
            results.append(single(*args))
        except (ValueError, gmem.GmemError) as exc:
            out = ("raises", type(exc), str(exc), k)
            break
    if out is None and name == "get_pfns":
        out = ("ok", [[r[0] for r in results], [r[1] for r in results]])
    elif out is None:
        out = ("ok", results if name.endswith("read_many") else None)
    after = snapshot(f)
    f.close()
    return out, after


def columns_for(name: str, indexes: list[int]) -> list[Any]:
    idx = np.array(indexes, dtype=np.uint64)
    if name.endswith("write_many"):
        return [idx, (idx * 7 + 1) | np.uint64(1)]
    return [idx]


def check(arch: str, order: int, history: Any, name: str, indexes: list[int]) -> None:
    cols = columns_for(name, indexes)
    got = outcome(make(gmem, arch, order, history), name, cols)
    want = singles(make(gmem, arch, order, history), name, [c.tolist() for c in cols])
    assert got == want
    assert got == outcome(make(ref, arch, order, history), name, cols)


# Runs of consecutive indexes, some past the end of the file.
runs = st.lists(st.tuples(st.integers(0, NR + 2), st.integers(1, 60)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["sw_protected", "snp"]),
    order=st.sampled_from([0, 0, 2, 4, 5]),
    history=st.lists(step, max_size=8),
    name=st.sampled_from(sorted(SINGLE)),
    runs=runs,
)
def test_runs_of_consecutive_indexes_are_the_single_calls(
    arch: str, order: int, history: Any, name: str, runs: list[tuple[int, int]]
) -> None:
    check(arch, order, history, name, [i for a, n in runs for i in range(a, a + n)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["sw_protected", "snp"]),
    order=st.sampled_from([0, 2, 4, 5]),
    history=st.lists(step, max_size=8),
    name=st.sampled_from(sorted(SINGLE)),
    seed=st.integers(0, 2**32 - 1),
    past_end=st.booleans(),
)
def test_scattered_batches_are_the_single_calls(
    arch: str, order: int, history: Any, name: str, seed: int, past_end: bool
) -> None:
    # 256 or more indexes, most steps going back: the folios are found ahead, in order.
    rng = np.random.default_rng(seed)
    indexes = rng.integers(0, NR + (4 if past_end else 0), 300).tolist()
    check(arch, order, history, name, indexes)


def test_a_run_longer_than_a_block_is_the_single_calls() -> None:
    """A run is done in blocks of at most 4096 elements; a long one crosses blocks, holes,
    a change of attributes and the end of the file."""
    nr = 3 * 4096
    for name in sorted(SINGLE):
        files = [
            impl.GuestMemfd(nr * P, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED, arch="snp")
            for impl in (gmem, gmem, ref)
        ]
        for f in files:
            f.fallocate(0, 5000)
            f.fallocate(5100, nr)
            f.set_attributes(9000, 9100, 0)  # private: host accesses stop there
        cols = columns_for(name, list(range(10, nr + 1)))
        got = outcome(files[0], name, cols)
        assert got == singles(files[1], name, [c.tolist() for c in cols])
        assert got == outcome(files[2], name, cols)
