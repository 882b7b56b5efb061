"""The conversion walk: contents and hooks in one walk where the arch allows it.

The engine garbles an SNP conversion's pages in the walk that hands their ranges to the
built-in model; any other arch (a Python one, a subclass of a model) gets every page
converted before its first hook.  Either way the result is the reference's, on files
fragmented enough that the walk's extents, attribute runs and batches all break up.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import gmem
import gmem.reference as ref

from conftest import IMPLS
from model import snapshot

P = gmem.PAGE_SIZE
NR_PAGES = 512


def python_snp(impl: Any) -> Any:
    """An SNP model whose make_shared reads the pages it is handed, then forwards."""

    class Reading(impl.arch.SNP):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, int]] = []

        def make_shared(self, start_pfn: int, end_pfn: int) -> None:
            for pfn in range(start_pfn, end_pfn):  # (SNP's free_folio calls it too)
                self.seen.append((pfn, self.file.physmem.read(pfn)))
            super().make_shared(start_pfn, end_pfn)

    return Reading()


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, Any]:
    """A file of mixed folio orders (some at scattered PFNs), pages written, attributes in
    many runs, then conversions that cross runs, holes and batches."""
    page = st.integers(0, NR_PAGES - 1)
    setup = st.one_of(
        st.tuples(st.just("fallocate"), page, page),
        st.tuples(st.just("add_folio"), page, st.integers(0, 3), st.integers(0, 1023)),
        st.tuples(st.just("guest_write"), page, st.integers(1, 99)),
        st.tuples(st.just("host_write"), page, st.integers(1, 99)),
        st.tuples(st.just("set_attributes"), page, page, st.sampled_from([0, gmem.PRIVATE])),
    )
    convert = st.tuples(st.just("set_attributes"), page, page, st.sampled_from([0, gmem.PRIVATE]))
    return {
        "folio_order": draw(st.sampled_from([0, 1, 2, 4, 9])),
        "fragment": draw(st.booleans()),
        "design": draw(st.sampled_from(["mainline", "split", "overloaded"])),
        "flags": draw(st.sampled_from([gmem.FLAG_MMAP, gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED])),
        "ops": draw(st.lists(setup, min_size=3, max_size=25)) + draw(st.lists(convert, max_size=8)),
    }


def run(impl: Any, sc: dict[str, Any], arch: Any) -> Any:
    pm = impl.PhysMem(1024)
    if sc["fragment"]:
        for pfn in range(1, 1024, 7):
            pm.take(pfn, 0)  # a free pool with holes: folios land out of order
    f = impl.GuestMemfd(
        NR_PAGES * P,
        flags=sc["flags"],
        folio_order=sc["folio_order"],
        physmem=pm,
        arch=arch,
        hook_design=sc["design"],
    )
    for name, *args in sc["ops"]:
        if name == "add_folio":
            index, order, pfn = args
            args = [index & -(1 << order), order, pfn & -(1 << order)]
        elif name in ("fallocate", "set_attributes"):
            args = [min(args[0], args[1]), max(args[0], args[1]) + 1, *args[2:]]
        with contextlib.suppress(ValueError, gmem.ConversionBusy, gmem.OutOfMemory, gmem.SigBus):
            getattr(f, name)(*args)
        if hasattr(arch, "seen") and name == "set_attributes":
            # What the hook read is what the pages hold once the conversion is over.
            assert all(f.physmem.read(pfn) == token for pfn, token in arch.seen)
            arch.seen.clear()
    return f


@given(sc=layouts())
def test_snp_conversions_agree_with_the_reference_fused_or_not(sc: dict[str, Any]) -> None:
    fused = run(gmem, sc, "snp")
    forwarding = run(gmem, sc, python_snp(gmem))
    oracle = run(ref, sc, "snp")
    want = snapshot(oracle)
    assert snapshot(fused) == want
    assert snapshot(forwarding) == want
    for f in (fused, forwarding, oracle):
        f.close()


@IMPLS
def test_a_python_hook_sees_every_page_of_a_conversion_converted(impl) -> None:
    arch = python_snp(impl)
    with impl.GuestMemfd(4096 * P, flags=gmem.FLAG_MMAP, folio_order=4, arch=arch) as f:
        f.fallocate(0, 4096)  # 256 folios: 9 batches
        for i in range(0, 4096, 5):
            f.guest_write(i, 7)
        f.set_attributes(1000, 1100, gmem.SHARED)
        for i in range(1000, 1100, 5):
            f.host_write(i, 9)  # shared already: the next conversion keeps these
        arch.seen.clear()
        f.set_attributes(0, 4096, gmem.SHARED)  # crosses a run already shared
        seen = dict(arch.seen)
        pfns = f.page_pfns(0, 4096).tolist()
        assert len(seen) == 4096
        for i in range(0, 4096, 5):  # written, then garbled; the pages already shared kept
            assert seen[pfns[i]] == (9 if 1000 <= i < 1100 else gmem.GARBLED), i
        assert f.stats["make_shared_calls"] == 256 + 7


def test_snp_round_trip_of_a_large_guest_garbles_every_page_once() -> None:
    # 64 GiB of 2 MiB folios, front to back: one extent, one RMP update per conversion.
    with gmem.GuestMemfd(64 << 30, folio_order=9, arch="snp") as f:
        f.fallocate(0, f.nr_pages)
        f.set_attributes(0, f.nr_pages, gmem.SHARED)
        assert f.physmem.content_runs().tolist() == [[0, f.nr_pages, gmem.GARBLED]]
        assert f.arch.stats["rmp_updates"] == 0  # nothing was assigned: nothing to give back
        assert f.stats["make_shared_calls"] == f.nr_pages // 512
        f.set_attributes(0, f.nr_pages, gmem.PRIVATE)
        assert f.physmem.content_runs().tolist() == [[0, f.nr_pages, gmem.GARBLED]]
        assert f.check() == []
