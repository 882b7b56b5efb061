"""GuestMemfd scenarios ported from the kernel's guest_memfd selftests, on both implementations.

Each test checks state (attributes, folios), contents and the hook calls (a Recorder).
"""

from __future__ import annotations

import gc

import pytest

import gmem

from conftest import IMPLS
from model import shared_with_data, snapshot, violations

P = gmem.PAGE_SIZE
ALL_HOOKS = {"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION"}


def recorder(impl, config=ALL_HOOKS):
    return impl.arch.Recorder(config)


@IMPLS
def test_init_private(impl) -> None:
    rec = recorder(impl)
    with impl.GuestMemfd(4 * P, flags=gmem.FLAG_MMAP, arch=rec) as f:
        assert f.attribute_runs().tolist() == [[0, 4, gmem.PRIVATE]]
        with pytest.raises(gmem.SigBus) as info:
            f.host_fault(2)
        assert info.value.index == 2 and info.value.errno != 0
        pfn, order = f.get_pfn(2)
        assert order == 0 and f.page_pfns(0, 4).tolist()[2] == pfn
        assert rec.calls == [("make_private", 2, pfn, 1)]
        f.guest_write(2, 0xAB)
        assert f.guest_read(2) == 0xAB
        assert violations(f) == []


@IMPLS
def test_init_shared_is_in_place(impl) -> None:
    with shared_with_data(impl, 4) as f:
        assert f.attribute_runs().tolist() == [[0, 4, 0]]
        assert [f.host_read(i) for i in range(4)] == [100, 101, 102, 103]
        # With in-place conversion the guest's shared pages are the same PFNs.
        assert [f.guest_read(i) for i in range(4)] == [100, 101, 102, 103]
        assert f.get_pfn(1)[0] == f.host_fault(1)
        assert f.folios()["mapped"].tolist() == [1, 1, 1, 1]


@IMPLS
def test_invalid_create_sizes_and_flags(impl) -> None:
    for size in (0, 1, P - 1, P + 1):
        with pytest.raises(ValueError, match="^size:"):
            impl.GuestMemfd(size)
    for flags in (4, 1 << 63, gmem.FLAG_MMAP | 4):
        with pytest.raises(ValueError, match="^flags:"):
            impl.GuestMemfd(P, flags=flags)
    with pytest.raises(ValueError, match="^folio_order:"):
        impl.GuestMemfd(P, folio_order=19)
    with pytest.raises(ValueError, match="^hook_design:"):
        impl.GuestMemfd(P, hook_design="v8")
    with pytest.raises(ValueError, match="^arch:"):
        impl.GuestMemfd(P, arch="s390")
    with pytest.raises(TypeError, match="^arch:"):
        impl.GuestMemfd(P, arch=3)
    with pytest.raises(ValueError, match="^size_bytes:"):
        impl.GuestMemfd(-P)


@IMPLS
def test_indexing_one_page_of_four_converted(impl) -> None:
    with shared_with_data(impl, 4) as f:
        f.set_attributes(1, 2, gmem.PRIVATE)
        assert f.attribute_runs().tolist() == [[0, 1, 0], [1, 2, 8], [2, 4, 0]]
        with pytest.raises(gmem.SigBus):
            f.host_read(1)
        assert [f.host_read(i) for i in (0, 2, 3)] == [100, 102, 103]
        assert f.guest_read(1) == 101  # sw_protected keeps contents
        f.set_memory_attributes2(P, P, 0)
        assert f.host_read(1) == 101
        assert violations(f) == []


@IMPLS
@pytest.mark.parametrize("to", [gmem.PRIVATE, gmem.SHARED])
def test_conversion_before_any_allocation(impl, to) -> None:
    rec = recorder(impl)
    flags = gmem.FLAG_MMAP | (gmem.FLAG_INIT_SHARED if to == gmem.PRIVATE else 0)
    with impl.GuestMemfd(8 * P, flags=flags, folio_order=2, arch=rec) as f:
        f.set_attributes(0, 8, to)
        kinds = gmem.FILTER_SHARED if to == gmem.PRIVATE else gmem.FILTER_PRIVATE
        # No folio exists, so no PFN range reaches the arch.
        assert rec.calls == [("invalidate_start", 0, 8, kinds), ("invalidate_end", 0, 8)]
        assert f.attribute_runs().tolist() == [[0, 8, to]]
        assert len(f.folios()) == 0 and f.stats["conversions"] == 1


@IMPLS
def test_unallocated_folios_in_a_converted_range(impl) -> None:
    rec = recorder(impl)
    with impl.GuestMemfd(32 * P, folio_order=2, arch=rec) as f:
        for i in (1, 13, 14, 22):  # fault in three folios, leave the rest holes
            f.get_pfn(i)
        rec.clear()
        f.set_attributes(2, 30, gmem.SHARED)
        want = [tuple(r) for r in f.pfn_ranges(2, 30).tolist()]
        assert [c[1:] for c in rec.calls if c[0] == "make_shared"] == want
        pages = f.page_pfns(2, 30)
        assert sum(e - s for s, e in want) == int((pages != gmem.NO_PFN).sum()) == 10


@IMPLS
def test_truncate_keeps_the_attribute_and_reads_zero(impl) -> None:
    rec = recorder(impl)
    with impl.GuestMemfd(8 * P, flags=gmem.FLAG_MMAP, folio_order=1, arch=rec) as f:
        f.set_attributes(4, 8, gmem.SHARED)
        f.host_write(5, 0x55)
        pfn = f.host_fault(5)
        rec.clear()
        f.punch_hole(4, 6)
        assert rec.calls == [
            ("invalidate_start", 4, 6, gmem.FILTER_SHARED | gmem.FILTER_PRIVATE),
            ("reclaim", pfn - 1, pfn + 1),
            ("invalidate_end", 4, 6),
        ]
        assert f.attribute_runs().tolist() == [[0, 4, 8], [4, 8, 0]]
        assert f.page_pfns(4, 6).tolist() == [gmem.NO_PFN] * 2
        assert f.physmem.read(pfn) == 0x55  # a freed page keeps its token in the free pool
        assert f.host_read(5) == 0  # the new folio is zeroed at first touch


@IMPLS
def test_second_host_mapping_loses_access_after_to_private(impl) -> None:
    with shared_with_data(impl, 4) as f:
        assert f.folios()["mapped"].tolist() == [1, 1, 1, 1]
        f.set_attributes(0, 2, gmem.PRIVATE)
        assert f.folios()["mapped"].tolist() == [0, 0, 1, 1]
        with pytest.raises(gmem.SigBus):
            f.host_fault(0)
        assert violations(f) == []


@IMPLS
def test_elevated_refcount_fails_to_private_at_its_offset(impl) -> None:
    with shared_with_data(impl, 8) as f:
        pfn = f.pin(5)
        before = snapshot(f)
        with pytest.raises(gmem.ConversionBusy) as info:
            f.set_attributes(0, 8, gmem.PRIVATE)  # bulk
        assert info.value.error_index == 5 and info.value.error_offset == 5 * P
        assert info.value.errno == 11  # EAGAIN
        after = snapshot(f)
        assert after["stats"].pop("conversions_busy") == 1
        before["stats"].pop("conversions_busy")
        assert after == before  # nothing else changed, no hook ran
        for i in range(8):  # page by page: only the pinned page fails
            if i == 5:
                with pytest.raises(gmem.ConversionBusy) as info:
                    f.set_memory_attributes2(i * P, P, gmem.PRIVATE)
                assert info.value.error_offset == 5 * P
            else:
                f.set_memory_attributes2(i * P, P, gmem.PRIVATE)
        f.unpin(5)
        f.set_attributes(5, 6, gmem.PRIVATE)
        assert f.attribute_runs().tolist() == [[0, 8, 8]]
        assert [f.guest_read(i) for i in range(8)] == [100 + i for i in range(8)]
        assert f.physmem.read(pfn) == 105


@IMPLS
def test_a_huge_folio_mapped_outside_the_range_is_busy(impl) -> None:
    with impl.GuestMemfd(
        1024 * P, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED, folio_order=9
    ) as f:
        f.host_fault(700)
        with pytest.raises(gmem.ConversionBusy) as info:
            f.set_attributes(100, 600, gmem.PRIVATE)
        assert info.value.error_index == 512  # max(start, folio.index) of the busy folio
        f.set_attributes(100, 512, gmem.PRIVATE)  # that folio is a hole: holes are never busy


@IMPLS
def test_fallocate_and_punch_bounds(impl) -> None:
    with impl.GuestMemfd(16 * P, folio_order=2) as f:
        for start, end in [(3, 3), (5, 4), (0, 17), (16, 17)]:
            with pytest.raises(ValueError):
                f.fallocate(start, end)
        for start, end in [(3, 3), (5, 4)]:
            with pytest.raises(ValueError):
                f.punch_hole(start, end)
        assert len(f.folios()) == 0 and f.stats["folios_allocated"] == 0
        f.fallocate(3, 9)  # allocates the aligned folios around the range
        assert f.folios()[["index", "order"]].tolist() == [(0, 2), (4, 2), (8, 2)]
        assert not f.folios()["uptodate"].any()  # fallocate neither zeroes nor prepares
        f.punch_hole(10, 1000)  # an end past EOF is clamped
        assert f.folios()[["index", "order"]].tolist() == [(0, 2), (4, 2), (8, 1)]
        f.punch_hole(16, 20)  # wholly past EOF: nothing to do
        assert f.stats["invalidations"] == 1


@IMPLS
def test_uapi_validation_matrix(impl) -> None:
    with impl.GuestMemfd(16 * P, flags=gmem.FLAG_MMAP) as f:
        bad = [
            ((0, P, gmem.PRIVATE, 1), "flags"),
            ((0, P, 1 << 4), "attributes"),
            ((0, P, gmem.PRIVATE | 1), "attributes"),
            ((0, 0, 0), "size"),
            ((P, 2**64 - P, 0), "size"),  # wraps
            ((100, P, 0), "offset"),
            ((0, P + 1, 0), "size"),
            ((8 * P, 9 * P, 0), "size"),  # past the end
        ]
        before = snapshot(f)
        for args, arg in bad:
            with pytest.raises(ValueError, match=f"^{arg}:"):
                f.set_memory_attributes2(*args)
        assert snapshot(f) == before
        f.set_memory_attributes2(2 * P, 3 * P, 0)
        assert f.attribute_runs().tolist() == [[0, 2, 8], [2, 5, 0], [5, 16, 8]]
        f.set_memory_attributes2(2 * P, 3 * P, 0)  # already shared: returns early
        assert f.stats["conversions_noop"] == 1


@IMPLS
def test_closed_file_refuses_everything_but_reports(impl) -> None:
    f = impl.GuestMemfd(4 * P)
    f.get_pfn(0)
    f.close()
    f.close()  # closing twice is fine, as for Python files
    for call in (
        lambda: f.get_pfn(0),
        lambda: f.fallocate(0, 1),
        lambda: f.set_attributes(0, 1, 0),
        lambda: f.folios(),
        lambda: f.pin(0),
        lambda: f.attribute_runs(),
    ):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert f.closed and f.check() == [] and f.stats["folios_freed"] == 1


@IMPLS
def test_add_folio_explicit_layout(impl) -> None:
    pm = impl.PhysMem(1 << 12, seed=3)
    rec = recorder(impl, {"FREE"})
    with impl.GuestMemfd(1024 * P, physmem=pm, arch=rec) as f:
        f.add_folio(512, 9, 2048)
        f.add_folio(3, 0, 7)
        with pytest.raises(ValueError, match="not free"):
            f.add_folio(4, 2, 2048)
        with pytest.raises(ValueError, match="overlap"):
            f.add_folio(512, 0, 9)
        with pytest.raises(ValueError, match="past the end"):
            f.add_folio(1024, 0, 9)
        assert not pm.is_free(2048, 9) and pm.nr_free == 4096 - 513
        assert f.get_pfn(600) == (2048 + 88, 9)  # the whole folio is private
        assert f.folios()["uptodate"].tolist() == [False, True]
    assert rec.ranges("reclaim").tolist() == [[7, 8], [2048, 2560]]
    assert pm.nr_free == 4096


@IMPLS
def test_get_pfn_max_order_follows_attributes_inside_the_folio(impl) -> None:
    rec = recorder(impl, {"PREPARE"})
    with impl.GuestMemfd(1024 * P, folio_order=9, arch=rec) as f:
        f.set_attributes(256, 260, gmem.SHARED)
        pfn, order = f.get_pfn(100)
        assert order == 8  # [0, 256) is private, [0, 512) is not
        assert rec.calls[-1] == ("make_private", 0, pfn - 100, 256)
        assert f.get_pfn(257)[1] == 2  # shared: no prepare
        assert f.get_pfn(600)[1] == 9
        assert len([c for c in rec.calls if c[0] == "make_private"]) == 2


@IMPLS
def test_pinned_piece_is_reclaimed_at_the_punch_and_freed_at_its_last_unpin(impl) -> None:
    # filemap_free_folio() calls free_folio when the folio leaves the page cache, pinned or
    # not; the pages go back to the allocator only with the last reference.
    rec = recorder(impl, {"FREE"})
    with impl.GuestMemfd(
        8 * P, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED, folio_order=3, arch=rec
    ) as f:
        pfn = f.pin(3)
        f.pin(3)
        free_before = f.physmem.nr_free
        f.punch_hole(2, 4)  # splits [0, 8) and punches [2, 4) out while page 3 is pinned
        assert f.folios()[["index", "order"]].tolist() == [(0, 1), (4, 2)]
        assert rec.ranges("reclaim").tolist() == [[pfn - 1, pfn + 1]]
        assert f.physmem.nr_free == free_before
        f.unpin_pfn(pfn)
        assert f.physmem.nr_free == free_before
        f.unpin_pfn(pfn)
        assert f.physmem.nr_free == free_before + 2
        assert rec.ranges("reclaim").tolist() == [[pfn - 1, pfn + 1]]  # not again
        assert f.stats["folios_freed"] == 1
        with pytest.raises(ValueError, match="^pfn:"):
            f.unpin_pfn(pfn)
        with pytest.raises(ValueError, match="^index:"):
            f.unpin(0)
        assert f.check() == []  # a Recorder changes no page


@IMPLS
@pytest.mark.parametrize("arch", ["pkvm", "snp", "sw_protected"])
def test_a_reclaim_that_changes_a_pinned_page_is_a_violation(impl, arch: str) -> None:
    f = impl.GuestMemfd(16 * P, flags=gmem.FLAG_MMAP, folio_order=2, arch=arch)
    f.guest_write(1, 0xAB)  # private, and prepared (SNP: assigned in the RMP)
    f.set_attributes(0, 4, gmem.SHARED)  # shared in place, then pinned by a device
    f.host_write(1, 0xCD)
    pfn = f.pin(1)
    f.punch_hole(0, 4)
    rules = [v.rule for v in f.check()]
    # pKVM scrubs the page the device still holds; SNP has nothing left to give back (the
    # conversion made the pages shared); sw_protected has no reclaim hook.
    assert rules == (["reclaimed-while-pinned"] if arch == "pkvm" else [])
    if arch == "pkvm":
        assert f.physmem.read(pfn) == 0
    f.unpin_pfn(pfn)
    f.close()
    assert f.physmem.nr_free == f.physmem.nr_pages


@IMPLS
def test_snp_reclaim_beside_a_pinned_shared_page_is_no_violation(impl) -> None:
    # Folio [4, 8): page 4 private and assigned in the RMP, page 5 shared and pinned.  The
    # reclaim gives page 4 back; the pinned page was never assigned and does not change.
    f = impl.GuestMemfd(16 * P, flags=gmem.FLAG_MMAP, folio_order=2, arch="snp")
    f.set_attributes(0, 16, gmem.SHARED)
    f.set_attributes(4, 5, gmem.PRIVATE)
    f.guest_write(4, 1)  # prepare: RMP-assigned
    pfn = f.pin(5)
    updates = f.arch.stats["rmp_updates"]
    f.punch_hole(4, 8)
    assert f.arch.stats["rmp_updates"] > updates
    assert [v.rule for v in f.check()] == []
    f.unpin_pfn(pfn)
    f.close()
    assert f.physmem.nr_free == f.physmem.nr_pages


@IMPLS
def test_close_invalidates_then_reclaims(impl) -> None:
    rec = recorder(impl, {"FREE"})
    f = impl.GuestMemfd(8 * P, folio_order=2, arch=rec)
    f.fallocate(0, 8)
    rec.clear()
    f.close()
    assert [c[0] for c in rec.calls] == [
        "invalidate_start",
        "invalidate_end",
        "reclaim",
        "reclaim",
    ]


@IMPLS
def test_init_shared_alone_is_a_shared_file_the_host_cannot_map(impl) -> None:
    f = impl.GuestMemfd(4 * P, flags=gmem.FLAG_INIT_SHARED)
    assert f.attribute_runs().tolist() == [[0, 4, gmem.SHARED]]
    with pytest.raises(gmem.SigBus):
        f.host_read(0)
    f.guest_write(0, 7)
    assert f.guest_read(0) == 7
    f.close()


@IMPLS
def test_fallocate_out_of_memory_takes_nothing(impl) -> None:
    pm = impl.PhysMem(24)
    rec = recorder(impl)
    with impl.GuestMemfd(64 * P, physmem=pm, folio_order=3, arch=rec) as f:
        f.fallocate(0, 8)
        before = snapshot(f)
        with pytest.raises(gmem.OutOfMemory) as info:
            f.fallocate(8, 64)
        assert isinstance(info.value, MemoryError) and info.value.errno == 12
        assert snapshot(f) == before
        f.fallocate(8, 24)  # what fits still works
        assert pm.nr_free == 0
        with pytest.raises(gmem.OutOfMemory):
            f.get_pfn(40)


def test_one_physmem_serves_many_files() -> None:
    pm = gmem.PhysMem(1 << 12)
    a = gmem.GuestMemfd(1024 * P, physmem=pm, folio_order=9, arch="snp")
    b = gmem.GuestMemfd(1024 * P, physmem=pm, folio_order=9, arch="snp")
    a.fallocate(0, 1024)
    b.fallocate(0, 1024)
    pfns_a, pfns_b = set(a.page_pfns(0, 1024).tolist()), set(b.page_pfns(0, 1024).tolist())
    assert not pfns_a & pfns_b and pm.nr_free == 4096 - 2048
    a.get_pfn(0)
    b.get_pfn(0)
    assert pm.rmp_runs()[:, 2].tolist().count(2) == 2  # one RMP, two 2 MiB entries
    a.close()
    b.close()
    assert pm.nr_free == 4096 and pm.rmp_runs().tolist() == [[0, 4096, 0]]


@IMPLS
def test_unclosed_file_warns_and_frees_through_the_hook(impl) -> None:
    rec = impl.arch.Recorder({"FREE"})
    f = impl.GuestMemfd(4 * P, arch=rec)
    f.fallocate(0, 4)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del f
        gc.collect()
    assert rec.ranges("reclaim").tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert rec.file is None or rec.file.closed


@IMPLS
@pytest.mark.parametrize(
    ("design", "names"),
    [
        ("mainline", ["make_private", "invalidate_start", "invalidate_range", "make_shared"]),
        ("split", ["prepare", "invalidate_start", "make_shared"]),
        ("overloaded", ["prepare", "invalidate_start", "free_folio"]),
    ],
)
def test_each_design_calls_its_hooks_by_its_names(impl, design: str, names: list[str]) -> None:
    # The merged kernel: make_private on a private fault, invalidate_range right after
    # invalidate_start (INVALIDATE), make_shared on a to-shared conversion, reclaim on
    # removal.  The thread's designs: prepare, and make_shared or the overloaded free_folio.
    rec = recorder(impl, {"CONVERT", "RECLAIM", "INVALIDATE"})
    f = impl.GuestMemfd(8 * P, folio_order=2, arch=rec, hook_design=design)
    assert f.hook_design == design
    f.get_pfn(0)
    f.set_attributes(0, 4, gmem.SHARED)
    calls = [c[0] for c in rec.calls if c[0] != "invalidate_end"]
    assert calls == names
    rec.clear()
    f.close()
    reclaim = "reclaim" if design == "mainline" else "free_folio"
    assert [c[0] for c in rec.calls][-1] == reclaim
    assert f.config == (
        {"CONVERT", "RECLAIM", "INVALIDATE"}
        if design == "mainline"
        else {"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION", "INVALIDATE"}
    )
    assert f.stats["invalidate_range_calls"] == (2 if design == "mainline" else 0)


@IMPLS
@pytest.mark.parametrize("old_names", [True, False])
def test_a_python_arch_may_use_either_vocabulary_under_every_design(impl, old_names) -> None:
    got: list[str] = []

    class Mine(impl.Arch):
        config = {"PREPARE", "FREE"} if old_names else {"CONVERT", "RECLAIM"}

    if old_names:
        Mine.prepare = lambda self, i, p, n: got.append("private")
        Mine.free_folio = lambda self, s, e: got.append("reclaimed")
    else:
        Mine.make_private = lambda self, i, p, n: got.append("private")
        Mine.reclaim = lambda self, s, e: got.append("reclaimed")
    for design in ("mainline", "split", "overloaded"):
        got.clear()
        f = impl.GuestMemfd(4 * P, arch=Mine(), hook_design=design)
        f.get_pfn(0)
        f.close()
        assert got == ["private", "reclaimed"], design


@IMPLS
def test_a_failing_make_private_is_reported_by_its_design_name(impl) -> None:
    class Failing(impl.Arch):
        config = {"CONVERT"}

        def prepare(self, index: int, pfn: int, nr_pages: int) -> None:
            raise KeyError("no")

    for design, name in (("mainline", "make_private"), ("split", "prepare")):
        f = impl.GuestMemfd(4 * P, arch=Failing(), hook_design=design)
        with pytest.raises(KeyError):
            f.get_pfn(0)
        assert f.check()[0].detail.startswith(f"{name} raised KeyError")
        f.close()


@IMPLS
@pytest.mark.parametrize("arch", ["snp", "tdx", "pkvm", "recorder"])
def test_populate_fills_a_private_page_without_zeroing_or_make_private(impl, arch) -> None:
    a = recorder(impl, {"CONVERT", "RECLAIM", "POPULATE"}) if arch == "recorder" else arch
    f = impl.GuestMemfd(8 * P, folio_order=2, arch=a)
    f.physmem.write(1, 0xAB)  # what the page held before: populate in place keeps it
    f.populate(1)
    f.populate(2, 0x5EED)
    # page 1 keeps its contents; the other three pages of its folio are zeroed
    assert f.stats["pages_zeroed"] == 3 and f.stats["pages_populated"] == 2
    if arch == "recorder":  # post_populate, and no make_private
        assert f.arch.calls == [("post_populate", 1, 1, None), ("post_populate", 2, 2, 0x5EED)]
    if arch == "snp":  # LAUNCH_UPDATE assigned pages 1 and 2, 4 KiB each
        assert f.arch.stats["launch_updates"] == 2
        assert f.physmem.rmp_runs().tolist() == [[0, 1, 0], [1, 3, 1], [3, 8, 0]]
    if arch == "tdx":
        assert f.arch.stats["pages_added"] == 2
    assert f.guest_read(1) == 0xAB and f.guest_read(2) == 0x5EED
    f.set_attributes(4, 8, gmem.SHARED)
    with pytest.raises(ValueError, match="^index: populate needs a private page"):
        f.populate(5)
    assert f.check() == []
    f.close()


@IMPLS
def test_memory_failure_poisons_the_folio_until_it_is_punched_out(impl) -> None:
    rec = recorder(impl, {"CONVERT", "RECLAIM"})
    f = impl.GuestMemfd(
        16 * P, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED, folio_order=2, arch=rec
    )
    f.host_write(5, 1)
    rec.clear()
    f.memory_failure(6)  # the folio [4, 8)
    assert [c[:3] for c in rec.calls] == [("invalidate_start", 4, 8), ("invalidate_end", 4, 8)]
    assert rec.calls[0][3] == gmem.FILTER_SHARED | gmem.FILTER_PRIVATE
    assert f.folios(4, 8)["mapped"].tolist() == [0]  # the host's mapping is gone
    for call in (f.get_pfn, f.host_read, f.guest_read, f.pin):
        with pytest.raises(gmem.HWPoison) as info:
            call(4)
        assert info.value.errno == 133 and info.value.index == 4
    assert f.guest_read(0) == 0  # the other folios are fine
    with pytest.raises(ValueError, match="^index: page 12 is a hole"):
        f.memory_failure(12)
    f.punch_hole(4, 8)
    assert f.host_read(5) == 0  # a fresh folio
    f.close()
    assert f.stats["memory_failures"] == 1
