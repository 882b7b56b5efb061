"""Very large guests: 64 TiB of 1 GiB folios, files at the 64-bit size limit, exhaustion."""

from __future__ import annotations

import pytest

import gmem

from conftest import IMPLS
from model import snapshot

P = gmem.PAGE_SIZE
GIB = 1 << 18  # pages


@IMPLS
def test_64_tib_of_1_gib_folios(impl) -> None:
    size = 64 << 40
    with impl.GuestMemfd(size, flags=gmem.FLAG_MMAP, folio_order=18, arch="snp") as f:
        assert f.nr_pages == 1 << 34
        f.fallocate(0, f.nr_pages)
        assert f.stats["folios_allocated"] == 65536
        f.get_pfn(f.nr_pages - 1)  # prepare: 512 2 MiB RMP entries for the last folio
        assert f.arch.stats["rmp_updates"] == 512
        f.set_attributes(0, f.nr_pages, gmem.SHARED)
        assert f.stats["make_shared_calls"] == 65536 and f.arch.stats["psmash"] == 0
        f.set_attributes(GIB // 2, f.nr_pages - GIB // 2, gmem.PRIVATE)
        f.punch_hole(3 * GIB + 5, 40 * GIB)  # splits the folio at 3 GiB + 5 pages
        pieces = f.folios(3 * GIB, 4 * GIB)[["index", "order"]].tolist()
        assert pieces == [(3 * GIB, 2), (3 * GIB + 4, 0)]  # what is left of that 1 GiB folio
        f.host_write(3, 0xAA)
        assert f.host_read(3) == 0xAA
        assert f.check() == []
    assert f.physmem.nr_free == 1 << 34
    assert f.physmem.rmp_runs().tolist() == [[0, 1 << 34, 0]]


@IMPLS
def test_a_file_at_the_64_bit_size_limit(impl) -> None:
    size = 2**64 - P  # nr_pages = 2**52 - 1: the largest file
    with pytest.raises(ValueError, match="^physmem:"):
        impl.GuestMemfd(size)
    pm = impl.PhysMem(1 << 20)
    rec = impl.arch.Recorder({"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION"})
    with impl.GuestMemfd(size, flags=gmem.FLAG_MMAP, folio_order=9, physmem=pm, arch=rec) as f:
        last = f.nr_pages - 1
        assert last == 2**52 - 2
        _, order = f.get_pfn(last)
        assert order == 0  # the folio of the last page cannot be 2 MiB: it would pass EOF
        f.set_attributes(0, f.nr_pages, gmem.SHARED)
        assert f.host_read(last) == 0
        f.set_memory_attributes2(size - 2 * P, 2 * P, gmem.PRIVATE)
        assert f.attribute_runs().tolist() == [[0, last - 1, 0], [last - 1, last + 1, 8]]
        with pytest.raises(ValueError, match="^size:"):
            f.set_memory_attributes2(size - P, 2 * P, gmem.PRIVATE)  # past the end
        with pytest.raises(gmem.SigBus):
            f.host_fault(last + 1)
        f.punch_hole(0, 2**63)  # clamped to the end of the file
        assert len(f.folios()) == 0
    assert pm.nr_free == 1 << 20


@IMPLS
def test_physmem_exhaustion_allocates_nothing_half_way(impl) -> None:
    pm = impl.PhysMem(4096 + 7)
    pm.fragment(0.01)
    rec = impl.arch.Recorder({"FREE"})
    with impl.GuestMemfd(8192 * P, folio_order=9, physmem=pm, arch=rec) as f:
        f.fallocate(0, 1024)
        before = snapshot(f)
        free_before = pm.free_blocks().tolist()
        with pytest.raises(gmem.OutOfMemory):
            f.fallocate(0, 8192)  # needs more than there is, in many folios of many orders
        assert snapshot(f) == before and pm.free_blocks().tolist() == free_before
        for i in range(1024, 8192):  # fault pages in until the last page of memory is gone
            try:
                f.get_pfn(i)
            except gmem.OutOfMemory:
                break
        assert pm.nr_free == 0
        with pytest.raises(gmem.OutOfMemory):
            f.guest_write(8000, 1)
