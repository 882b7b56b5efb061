"""Random operation sequences on the C++ GuestMemfd and the reference, compared after each step:
the same results, the same errors, the same state, contents, arch state and hook log."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import gmem
import gmem.reference as ref

from model import snapshot

HOOKS = ["PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION", "CONVERT", "RECLAIM", "INVALIDATE"]
P = gmem.PAGE_SIZE


def outcome(fn: Any, *args: Any) -> Any:
    try:
        result = fn(*args)
    except (ValueError, TypeError, RuntimeError, gmem.GmemError) as exc:
        return (
            "raises",
            type(exc).__name__,
            getattr(exc, "error_index", None),
            getattr(exc, "completed", None),
        )
    return ("ok", result)


def with_tokens(name: str, indexes: Any, token: Any) -> Any:
    """(name, indexes, tokens): as many tokens as indexes."""
    return indexes.flatmap(
        lambda idx: st.lists(token, min_size=len(idx), max_size=len(idx)).map(
            lambda tok: (name, idx, tok)
        )
    )


def ranges_many(index: Any, attrs: Any) -> Any:
    """("set_attributes_many", starts, ends, attrs) from a list of ranges."""
    rows = st.lists(st.tuples(index, index, attrs), max_size=4)
    return rows.map(lambda r: ("set_attributes_many", *([row[k] for row in r] for k in range(3))))


def ops(nr_pages: int) -> st.SearchStrategy[tuple[Any, ...]]:
    index = st.integers(0, nr_pages + 1)
    token = st.integers(0, 2**64 - 1) | st.sampled_from([1, 2, 3])
    attrs = st.sampled_from([gmem.SHARED, gmem.PRIVATE, gmem.PRIVATE, 1])
    indexes = st.lists(index, max_size=10) | st.builds(
        lambda a, n: list(range(a, a + n)), index, st.integers(0, nr_pages)
    )
    return st.one_of(
        st.tuples(st.just("fallocate"), index, index),
        st.tuples(st.just("punch_hole"), index, index | st.just(2 * nr_pages)),
        st.tuples(st.just("get_pfn"), index),
        st.tuples(st.just("host_fault"), index),
        st.tuples(st.just("guest_write"), index, token),
        st.tuples(st.just("guest_read"), index),
        st.tuples(st.just("host_write"), index, token),
        st.tuples(st.just("host_read"), index),
        st.tuples(st.just("pin"), index),
        st.tuples(st.just("unpin"), index),
        st.tuples(st.just("unpin_pinned_pfn"), st.integers(0, 20)),
        st.tuples(st.just("set_attributes"), index, index, attrs),
        st.tuples(st.just("set_attributes"), index, index, attrs),
        st.tuples(
            st.just("set_memory_attributes2"),
            st.integers(0, nr_pages + 1).map(lambda i: i * P) | st.just(100),
            st.integers(0, nr_pages).map(lambda i: i * P),
            st.sampled_from([0, gmem.PRIVATE, 16]),
            st.sampled_from([0, 0, 0, 1]),
        ),
        st.tuples(st.just("add_folio"), index, st.integers(0, 3), st.integers(0, 70)),
        st.tuples(st.just("folios"), index, index),
        # The bulk forms, over random indexes and forward runs.
        st.tuples(st.just("get_pfns"), indexes),
        st.tuples(st.just("guest_read_many"), indexes),
        st.tuples(st.just("host_read_many"), indexes),
        with_tokens("guest_write_many", indexes, token),
        with_tokens("host_write_many", indexes, token),
        ranges_many(index, attrs),
        st.tuples(st.just("pfn_ranges"), index, index),
        # Aimed at the busy check: map (or pin) a page, then take a range next to it private.
        st.tuples(st.just("map_then_convert"), index, index, st.booleans()),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    nr_pages = draw(st.integers(1, 48))
    arch = draw(st.sampled_from(["recorder", "sw_protected", "snp", "tdx", "pkvm"]))
    return {
        "nr_pages": nr_pages,
        "flags": draw(st.sampled_from([0, gmem.FLAG_MMAP, 3, 3])),
        "folio_order": draw(st.sampled_from([0, 1, 2, 3, 9])),
        "physmem_pages": draw(st.sampled_from([None, 64, 24])),
        "arch": arch,
        "config": draw(st.sets(st.sampled_from(HOOKS))),
        "design": draw(st.sampled_from(["mainline", "split", "overloaded"])),
        "ops": draw(st.lists(ops(nr_pages), min_size=4, max_size=40)),
    }


def build(impl: Any, sc: dict[str, Any]) -> Any:
    arch = impl.arch.Recorder(sc["config"]) if sc["arch"] == "recorder" else sc["arch"]
    pm = None if sc["physmem_pages"] is None else impl.PhysMem(sc["physmem_pages"])
    return impl.GuestMemfd(
        sc["nr_pages"] * P,
        flags=sc["flags"],
        folio_order=sc["folio_order"],
        physmem=pm,
        arch=arch,
        hook_design=sc["design"],
    )


def norm(value: Any) -> Any:
    if isinstance(value, tuple):  # get_pfns: (pfns, max_orders)
        return tuple(norm(v) for v in value)
    if hasattr(value, "tolist"):
        return (value.dtype.str, value.tolist())
    return value


@given(sc=scenarios())
def test_engine_and_reference_agree_step_by_step(sc: dict[str, Any]) -> None:
    engine, oracle = build(gmem, sc), build(ref, sc)
    pinned: list[int] = []
    steps: list[tuple[Any, ...]] = []
    for name, *args in sc["ops"]:
        if name == "map_then_convert":
            page, other, pin = args
            steps.append(("pin" if pin else "host_fault", page))
            steps.append(("set_attributes", min(page, other), page, gmem.PRIVATE))
            steps.append(("set_attributes", page + 1, max(page + 2, other), gmem.PRIVATE))
        else:
            steps.append((name, *args))
    for step, (name, *args) in enumerate(steps):
        if name == "unpin_pinned_pfn":
            if not pinned:
                continue
            name, args = "unpin_pfn", [pinned.pop(args[0] % len(pinned))]
        got = outcome(getattr(engine, name), *args)
        want = outcome(getattr(oracle, name), *args)
        got, want = (
            (got[0], norm(got[1])) if got[0] == "ok" else got,
            ((want[0], norm(want[1])) if want[0] == "ok" else want),
        )
        assert got == want, f"step {step}: {name}{tuple(args)}\n{engine.dump()}"
        if name == "pin" and got[0] == "ok":
            pinned.append(got[1])
        assert snapshot(engine) == snapshot(oracle), f"step {step}: {name}{tuple(args)}"
    engine.close()
    oracle.close()
    assert snapshot(engine) == snapshot(oracle)


@st.composite
def wide_fallocates(draw: st.DrawFn) -> dict[str, Any]:
    """Files and PhysMems big enough for the engine's bulk fallocate to cross its bitmap
    groups (4096 pages) and chunks (1024 folios), fragmented, partly populated, short."""
    order = draw(st.sampled_from([0, 0, 1, 3, 9]))
    nr_pages = draw(st.integers(1, 3 << 12))
    before = st.tuples(
        st.sampled_from(["get_pfn", "punch_hole", "add_folio"]), st.integers(0, nr_pages)
    )
    return {
        "nr_pages": nr_pages,
        "folio_order": order,
        "physmem_pages": draw(st.sampled_from([nr_pages + 4096, nr_pages // 2 + 1, 3 << 12])),
        "base_pfn": draw(st.sampled_from([0, 7, 4095, 1 << 18])),
        "fragment": draw(st.sampled_from([0.0, 0.0, 0.002, 0.05])),
        "before": draw(st.lists(before, max_size=12)),
        "ranges": draw(
            st.lists(
                st.tuples(st.integers(0, nr_pages), st.integers(0, nr_pages + 1)),
                min_size=1,
                max_size=4,
            )
        ),
    }


@given(sc=wide_fallocates())
def test_fallocate_agrees_with_the_reference_across_bitmap_groups(sc: dict[str, Any]) -> None:
    files = []
    for impl in (gmem, ref):
        pm = impl.PhysMem(sc["physmem_pages"], base_pfn=sc["base_pfn"], seed=1)
        pm.fragment(sc["fragment"])
        files.append(
            impl.GuestMemfd(
                sc["nr_pages"] * P, folio_order=sc["folio_order"], physmem=pm, arch="sw_protected"
            )
        )
    engine, oracle = files
    for name, index in sc["before"]:
        args: tuple[int, ...] = (index,)
        if name == "punch_hole":
            args = (index, index + 5)
        elif name == "add_folio":
            free = [int(p) for p, o in engine.physmem.free_blocks().tolist() if o == 0]
            args = (index, 0, free[index % len(free)] if free else 0)
        assert outcome(getattr(engine, name), *args) == outcome(getattr(oracle, name), *args)
    for s, e in sc["ranges"]:
        got, want = outcome(engine.fallocate, s, e), outcome(oracle.fallocate, s, e)
        assert got == want, (s, e)
        assert engine.folios().tolist() == oracle.folios().tolist(), (s, e)
        assert engine.stats == oracle.stats
        assert engine.physmem.nr_free == oracle.physmem.nr_free
        assert engine.physmem.free_blocks().tolist() == oracle.physmem.free_blocks().tolist()
    engine.close()
    oracle.close()
    assert engine.physmem.free_blocks().tolist() == oracle.physmem.free_blocks().tolist()
