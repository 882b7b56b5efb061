"""IntervalMap: unit checks, differential runs against the reference, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gmem
import gmem.reference as ref

from conftest import IMPLS, both

PRIVATE = 1 << 3
VALUES = st.sampled_from([0, PRIVATE, 1, 2**64 - 1])


def check_runs_invariant(m: gmem.IntervalMap) -> None:
    runs = m.runs()
    assert runs[0, 0] == 0 and runs[-1, 1] == m.nr_pages
    assert (runs[1:, 0] == runs[:-1, 1]).all(), "runs must not leave gaps"
    assert (runs[1:, 2] != runs[:-1, 2]).all(), "equal neighbours must be merged"
    assert len(m) == len(runs)


@IMPLS
def test_store_merges_and_splits(impl) -> None:
    m = impl.IntervalMap(100)
    assert m.runs().tolist() == [[0, 100, 0]]
    m.store(10, 20, PRIVATE)
    m.store(20, 30, PRIVATE)  # merges with [10, 20)
    assert m.runs().tolist() == [[0, 10, 0], [10, 30, PRIVATE], [30, 100, 0]]
    m.store(15, 16, 0)  # splits it
    assert len(m) == 5
    m.store(0, 100, 0)
    assert m.runs().tolist() == [[0, 100, 0]] and len(m) == 1
    assert m.load(99) == 0
    assert m.runs(5, 5).shape == (0, 3)


@IMPLS
def test_range_has_and_clipped_runs(impl) -> None:
    m = impl.IntervalMap(64, default=PRIVATE)
    m.store(8, 16, 0)
    assert m.range_has(8, 16, 0) and not m.range_has(7, 16, 0) and not m.range_has(8, 17, 0)
    assert m.range_has(3, 3, 12345)  # an empty range has every value
    assert m.runs(4, 12).tolist() == [[4, 8, PRIVATE], [8, 12, 0]]


@IMPLS
def test_indexes_near_2_to_the_40(impl) -> None:
    n = 1 << 40
    m = impl.IntervalMap(n)
    m.store(n - 512, n, PRIVATE)
    m.store(1 << 39, (1 << 39) + 1, PRIVATE)
    assert m.load(n - 1) == PRIVATE and m.load(n - 513) == 0
    assert m.runs(n - 1024).tolist() == [[n - 1024, n - 512, 0], [n - 512, n, PRIVATE]]
    check_runs_invariant(m)


def test_store_many_matches_sequential_stores() -> None:
    rng = np.random.default_rng(7)
    starts = rng.integers(0, 10_000, 2000)
    ends = starts + rng.integers(1, 50, 2000)
    values = rng.choice([0, PRIVATE], 2000)
    bulk, seq = gmem.IntervalMap(10_100), gmem.IntervalMap(10_100)
    bulk.store_many(starts, ends, values)
    for s, e, v in zip(starts.tolist(), ends.tolist(), values.tolist(), strict=True):
        seq.store(s, e, v)
    assert np.array_equal(bulk.runs(), seq.runs())
    oracle = ref.IntervalMap(10_100)
    oracle.store_many(starts, ends, values)
    assert np.array_equal(bulk.runs(), oracle.runs())


@pytest.mark.parametrize("seed", range(4))
def test_many_runs_against_reference(seed: int) -> None:
    """Thousands of runs: leaves split, merge and vanish in the engine's tree."""
    rng = np.random.default_rng(seed)
    n = 50_000
    m, oracle = gmem.IntervalMap(n), ref.IntervalMap(n)
    for step in range(6000):
        if step % 500 == 499:  # a wide store that swallows many leaves at once
            s = int(rng.integers(0, n - 1))
            e = int(rng.integers(s + 1, n + 1))
        else:
            s = int(rng.integers(0, n - 1))
            e = min(n, s + int(rng.integers(1, 8)))
        v = int(rng.choice([0, PRIVATE, 1]))
        m.store(s, e, v)
        oracle.store(s, e, v)
        if step % 250 == 0:
            assert np.array_equal(m.runs(), oracle.runs())
    assert np.array_equal(m.runs(), oracle.runs())
    check_runs_invariant(m)
    probe = rng.integers(0, n, 500).tolist()
    assert [m.load(i) for i in probe] == [oracle.load(i) for i in probe]


def op_strategy(n: int) -> st.SearchStrategy[tuple]:
    index = st.integers(0, n + 2) | st.sampled_from([n - 1, n, 2**64 - 1])
    return st.one_of(
        st.tuples(st.just("store"), index, index, VALUES),
        st.tuples(st.just("load"), index),
        st.tuples(st.just("range_has"), index, index, VALUES),
        st.tuples(st.just("runs"), index, index),
        st.tuples(
            st.just("store_many"),
            st.lists(st.tuples(index, index, VALUES), max_size=6),
        ),
    )


@given(data=st.data(), n=st.integers(1, 70) | st.sampled_from([1 << 40, 2**63]))
def test_differential_operation_sequences(data: st.DataObject, n: int) -> None:
    m, oracle = gmem.IntervalMap(n), ref.IntervalMap(n)
    for op in data.draw(st.lists(op_strategy(n), max_size=40)):
        name, *args = op
        if name == "store_many":
            rows = args[0]
            args = [np.array([r[i] for r in rows], dtype=np.uint64) for i in range(3)]
        both(m, oracle, name, *args)
        both(m, oracle, "runs")
        assert len(m) == len(oracle)
    check_runs_invariant(m)


BAD_CALLS = [
    ("store", (5, 3, 0), ValueError),  # start > end
    ("store", (3, 3, 0), ValueError),  # empty
    ("store", (0, 101, 0), ValueError),  # past the end
    ("store", (-1, 3, 0), ValueError),
    ("store", (0, 3, -8), ValueError),
    ("store", (0, 3, 2**64), ValueError),
    ("store", (0.5, 3, 0), TypeError),
    ("store", ("0", 3, 0), TypeError),
    ("load", (100,), ValueError),
    ("load", (-1,), ValueError),
    ("load", (None,), TypeError),
    ("range_has", (4, 2, 0), ValueError),
    ("runs", (0, 101), ValueError),
    ("store_many", ([0, 5], [3, 4], [0, 0]), ValueError),  # row 1 is backwards
    ("store_many", ([0], [3, 4], [0, 0]), ValueError),  # lengths differ
    ("store_many", ([-1], [3], [0]), ValueError),
    ("store_many", ([0.5], [3], [0]), TypeError),
    ("store_many", ([[0]], [[3]], [[0]]), ValueError),
]


@IMPLS
@pytest.mark.parametrize(("method", "args", "exc"), BAD_CALLS)
def test_bad_input_raises_and_changes_nothing(impl, method, args, exc) -> None:
    m = impl.IntervalMap(100)
    m.store(10, 20, PRIVATE)
    before = m.runs().tolist()
    with pytest.raises(exc) as info:
        getattr(m, method)(*args)
    assert str(info.value).split(":")[0] in {
        "start",
        "end",
        "index",
        "value",
        "starts",
        "ends",
        "values",
    }
    assert m.runs().tolist() == before


@IMPLS
def test_constructor_rejects_bad_sizes(impl) -> None:
    with pytest.raises(ValueError, match="nr_pages"):
        impl.IntervalMap(0)
    with pytest.raises(ValueError, match="nr_pages"):
        impl.IntervalMap(-5)
    with pytest.raises(TypeError, match="nr_pages"):
        impl.IntervalMap("10")
    with pytest.raises(ValueError, match="default"):
        impl.IntervalMap(10, default=2**64)


def test_repr_and_dump_show_the_runs() -> None:
    m = gmem.IntervalMap(16)
    m.store(4, 8, PRIVATE)
    assert "runs=3" in repr(m)
    assert "[4, 8) = 0x8" in m.dump()
