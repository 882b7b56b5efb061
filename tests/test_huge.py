"""The "hugetlb" huge-folio policy through the public API, in the engine and the reference:
split on share, merge on unshare, zero on a partial punch, reclaim whole; SNP and TDX
consequences; and every convert/punch range of small files, compared step by step."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import gmem
import gmem.reference as ref

from model import snapshot

IMPLS = [pytest.param(gmem, id="engine"), pytest.param(ref, id="reference")]
P = gmem.PAGE_SIZE
SHARED, PRIVATE = gmem.SHARED, gmem.PRIVATE


def huge_file(impl: Any, order: int = 9, blocks: int = 2, **kw: Any) -> Any:
    kw.setdefault("flags", gmem.FLAG_MMAP)
    return impl.GuestMemfd((blocks << order) * P, folio_order=order, huge_policy="hugetlb", **kw)


def orders(f: Any) -> list[int]:
    return [int(row["order"]) for row in f.folios()]


@pytest.mark.parametrize("impl", IMPLS)
def test_share_splits_the_huge_folio_with_pfns_unchanged(impl: Any) -> None:
    f = huge_file(impl)
    f.fallocate(0, f.nr_pages)
    pfns = f.page_pfns(0, f.nr_pages).tolist()
    assert orders(f) == [9, 9] and f.get_pfn(7) == (pfns[7], 9)
    f.set_attributes(5, 6, SHARED)
    assert orders(f) == [0] * 512 + [9]
    assert f.page_pfns(0, f.nr_pages).tolist() == pfns
    assert f.stats["folio_splits"] == 1
    assert f.get_pfn(7) == (pfns[7], 0)  # the huge order only for an unsplit folio
    assert f.get_pfn(700) == (pfns[700], 9)
    assert f.huge_policy == "hugetlb" and f.check() == []
    f.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_whole_huge_folio_shared_is_split_too(impl: Any) -> None:
    f = huge_file(impl, order=2)
    f.fallocate(0, 8)
    f.set_attributes(0, 4, SHARED)  # no shared page may live in a huge folio
    assert orders(f) == [0, 0, 0, 0, 2] and f.stats["folio_splits"] == 1
    f.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_pin_blocks_only_its_own_page_under_hugetlb(impl: Any) -> None:
    busy = {}
    for policy in ("none", "hugetlb"):
        f = impl.GuestMemfd(1024 * P, folio_order=9, flags=gmem.FLAG_MMAP, huge_policy=policy)
        f.set_attributes(0, 64, SHARED)  # a virtio ring and its buffers
        f.pin(5)  # a device DMAs into one page
        try:
            f.set_attributes(32, 64, PRIVATE)  # the guest takes other buffers back
        except gmem.ConversionBusy as exc:
            assert exc.error_index == 32
        busy[policy] = f.stats["conversions_busy"]
        f.unpin(5)
        f.close()
    assert busy == {"none": 1, "hugetlb": 0}  # one EAGAIN avoided


@pytest.mark.parametrize("impl", IMPLS)
def test_unshare_merges_the_block_back_and_keeps_contents(impl: Any) -> None:
    f = huge_file(impl)
    f.guest_write(5, 0xAB)
    f.guest_write(9, 0xCD)
    f.set_attributes(0, 16, SHARED)
    f.host_write(6, 0xEF)
    f.set_attributes(0, 16, PRIVATE)
    assert orders(f) == [9] and f.stats["folio_merges"] == 1
    assert f.get_pfn(3)[1] == 9
    # sw_protected keeps contents across conversions, in the merged folio too.
    assert [f.guest_read(i) for i in (5, 6, 9, 600)] == [0xAB, 0xEF, 0xCD, 0]
    assert f.check() == []
    f.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_merge_zeroes_the_pieces_never_touched(impl: Any) -> None:
    f = huge_file(impl, order=2, blocks=1)
    f.fallocate(0, 4)  # not yet zeroed: contents undefined until the first touch
    f.set_attributes(1, 2, SHARED)
    f.host_write(1, 7)  # zeroes piece 1 only
    zeroed = f.stats["pages_zeroed"]
    f.set_attributes(1, 2, PRIVATE)
    assert orders(f) == [2] and f.stats["pages_zeroed"] == zeroed + 3
    assert [f.guest_read(i) for i in range(4)] == [0, 7, 0, 0]
    assert f.check() == []
    f.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_poison_blocks_the_merge_until_the_block_leaves(impl: Any) -> None:
    f = huge_file(impl, order=2, blocks=2)
    f.fallocate(0, 8)
    f.set_attributes(1, 2, SHARED)
    f.memory_failure(3)  # one piece of the split block
    f.set_attributes(1, 2, PRIVATE)
    assert orders(f) == [0, 0, 0, 0, 2]
    assert f.stats["merges_blocked"] == 1 and f.stats["folio_merges"] == 0
    with pytest.raises(gmem.HWPoison):
        f.guest_read(3)
    f.punch_hole(0, 4)  # the whole block leaves the file, and its poison with it
    assert orders(f) == [2] and f.stats["folios_freed"] == 1
    assert f.guest_read(3) == 0  # a new huge folio
    f.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_partial_punch_zeroes_and_frees_nothing_then_the_block_goes_whole(impl: Any) -> None:
    f = huge_file(impl, arch=impl.arch.Recorder({"RECLAIM"}))
    f.guest_write(3, 0x33)
    f.guest_write(300, 0x44)
    f.punch_hole(0, 256)
    assert orders(f) == [9] and f.stats["folios_freed"] == 0
    assert f.stats["pages_punched_zeroed"] == 256
    assert f.guest_read(300) == 0x44
    f.guest_read(3)  # a fault takes page 3 back into use: the block is not all punched
    f.punch_hole(256, 512)
    assert orders(f) == [9] and f.stats["folios_freed"] == 0
    f.punch_hole(0, 16)  # now every page of the block has been punched
    assert orders(f) == [] and f.stats["folios_freed"] == 1
    base = f.arch.ranges("reclaim").tolist()
    assert len(base) == 1 and base[0][1] - base[0][0] == 512  # once, whole
    f.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_split_block_is_reclaimed_whole_once(impl: Any) -> None:
    f = huge_file(impl, order=3, blocks=2, arch=impl.arch.Recorder({"RECLAIM"}))
    f.fallocate(0, 16)
    first = f.page_pfns(0, 1).tolist()[0]
    f.set_attributes(2, 3, SHARED)
    f.punch_hole(0, 8)
    assert f.arch.ranges("reclaim").tolist() == [[first, first + 8]]
    f.close()
    assert len(f.arch.ranges("reclaim")) == 2 and f.stats["folios_freed"] == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_a_pinned_split_block_punched_waits_whole_for_its_last_unpin(impl: Any) -> None:
    pm = impl.PhysMem(16)
    f = huge_file(impl, order=3, blocks=2, physmem=pm)
    f.set_attributes(0, 8, SHARED)
    pfn = f.pin(4)
    f.punch_hole(0, 8)
    assert orders(f) == [] and pm.nr_free == 8  # the block waits for the pin
    f.unpin_pfn(pfn)
    assert pm.nr_free == 16 and f.stats["folios_freed"] == 1
    f.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_snp_psmash_on_split_and_2m_entry_restored_on_merge(impl: Any) -> None:
    f = huge_file(impl, arch="snp")
    f.get_pfn(0)  # a private fault of the 2 MiB block: one 2 MiB RMP entry
    assert f.arch.stats["rmp_updates"] == 1
    f.set_attributes(5, 6, SHARED)
    assert f.arch.stats["psmash"] == 1 and f.stats["folio_splits"] == 1
    f.set_attributes(5, 6, PRIVATE)
    assert f.arch.stats["rmp_2m_restores"] == 1 and orders(f)[0] == 9
    assert f.check() == []
    f.close()
    assert f.physmem.rmp_runs().tolist() == [[0, 1024, 0]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("busy_every", [0, 1, 2])
def test_tdx_demotes_before_the_split_retries_busy_and_promotes_on_merge(
    impl: Any, busy_every: int
) -> None:
    f = huge_file(impl, blocks=2, arch=impl.arch.TDX(demote_busy_every=busy_every))
    f.get_pfn(0)
    f.get_pfn(600)  # two 2 MiB S-EPT leaves
    f.set_attributes(5, 6, SHARED)
    f.set_attributes(700, 701, SHARED)
    assert f.arch.stats["demotes"] == 2
    assert f.arch.stats["demote_busy"] == {0: 0, 1: 2, 2: 1}[busy_every]
    f.set_attributes(5, 6, PRIVATE)
    assert f.arch.stats["promotes"] == 1 and f.check() == []
    f.close()


def test_a_1gib_folio_splits_to_order_0_and_merges_back() -> None:
    # Engine only: the reference's list-based page cache is quadratic in 2**18 pieces.
    f = huge_file(gmem, order=18, blocks=1, arch="snp")
    f.get_pfn(0)
    f.set_attributes(1000, 1001, SHARED)
    assert len(f.folios()) == 1 << 18 and f.arch.stats["psmash"] == 512
    f.set_attributes(1000, 1001, PRIVATE)
    assert orders(f) == [18] and f.arch.stats["rmp_2m_restores"] == 512
    assert f.check() == []
    f.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_policy_arguments_name_the_argument_and_change_nothing(impl: Any) -> None:
    with pytest.raises(ValueError, match="huge_policy: must be 'none' or 'hugetlb', got 'thp'"):
        impl.GuestMemfd(8 * P, folio_order=2, huge_policy="thp")
    with pytest.raises(TypeError, match="huge_policy: must be 'none' or 'hugetlb'"):
        impl.GuestMemfd(8 * P, folio_order=2, huge_policy=1)
    with pytest.raises(ValueError, match="folio_order: huge_policy 'hugetlb' needs huge folios"):
        impl.GuestMemfd(8 * P, huge_policy="hugetlb")
    with pytest.raises(ValueError, match="size: under huge_policy 'hugetlb' must be a multiple"):
        impl.GuestMemfd(6 * P, folio_order=2, huge_policy="hugetlb")
    f = huge_file(impl, order=2)
    pm = f.physmem
    before = snapshot(f)
    with pytest.raises(ValueError, match="order: under huge_policy 'hugetlb' a folio is a huge"):
        f.add_folio(0, 0, pm.nr_pages - 1)
    assert snapshot(f) == before
    f.close()


def _scenario(impl: Any, order: int, arch: str, s: int, e: int) -> list[Any]:
    """Every step of one convert/punch range on a 2-folio hugetlb file, as snapshots."""
    f = huge_file(impl, order=order, blocks=2, arch=arch)
    n = f.nr_pages
    for i in range(n):
        f.guest_write(i, 0x100 + i)
    f.get_pfn(0)
    shots = []
    steps: list[tuple[str, tuple[int, ...]]] = [
        ("set_attributes", (s, e, SHARED)),
        ("host_write", (s, 0x77)),
        ("set_attributes", (s, e, PRIVATE)),
        ("set_attributes", (s, e, SHARED)),
        ("punch_hole", (s, e)),
        ("set_attributes", (0, n, PRIVATE)),
        ("guest_read", (s,)),
        ("punch_hole", (0, n)),
    ]
    for name, args in steps:
        try:
            result: Any = getattr(f, name)(*args)
        except gmem.GmemError as exc:
            result = type(exc).__name__
        shots.append((name, args, result, snapshot(f)))
    f.close()
    shots.append(("close", (), None, snapshot(f)))
    return shots


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("arch", ["snp", "tdx"])
def test_every_convert_and_punch_range_of_a_two_folio_file(order: int, arch: str) -> None:
    n = 2 << order
    for s, e in itertools.combinations(range(n + 1), 2):
        engine, reference = (_scenario(impl, order, arch, s, e) for impl in (gmem, ref))
        for got, want in zip(engine, reference, strict=True):
            assert got == want, (order, arch, s, e, got[0], got[1])
        for name, args, _, snap in engine:
            assert snap["violations"] == [], (order, arch, s, e, name, args)
            assert engine[-1][3]["nr_free"] == n  # everything went back


def test_the_policy_comparison_shows_what_hugetlb_costs_and_buys() -> None:
    from gmem import policies

    rows = policies.compare(orders=(9,), archs=("snp", "tdx"))
    churn = {(r["policy"], r["arch"]): r for r in rows if r["workload"] == "virtio churn"}
    for arch in ("snp", "tdx"):
        none, huge = churn[("none", arch)], churn[("hugetlb", arch)]
        assert none["eagain"] > 0 and huge["eagain"] == 0  # EAGAINs avoided
        assert none["shared_in_huge"] > 0 and huge["shared_in_huge"] == 0
        assert none["splits"] == none["merges"] == 0
        assert huge["splits"] == huge["merges"] > 0
    assert churn[("hugetlb", "snp")]["psmash"] > 0 and churn[("hugetlb", "tdx")]["demotes"] > 0
    assert all(r["violations"] == 0 for r in rows)
    text = policies.table(rows)
    assert "shared in huge" in text and "virtio churn" in text
