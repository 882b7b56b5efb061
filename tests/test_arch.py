"""The arch models, the two hook designs, the contract checker and Python hooks."""

from __future__ import annotations

from itertools import chain

import pytest

import gmem
import gmem.reference as ref
from gmem import demo

from conftest import IMPLS
from model import snapshot, violations

P = gmem.PAGE_SIZE


@pytest.fixture(scope="module")
def headline():
    """The boot-like run on a 64 MiB guest, engine and reference."""
    return {impl: demo.run_all(64 << 20, 9, impl=impl) for impl in (gmem, ref)}


def by_key(results):
    return {(r.arch, r.hook_design): r for r in results}


def test_headline_pkvm_loses_contents_only_under_overloaded(headline) -> None:
    runs = by_key(headline[gmem])
    lost = runs[("pkvm", "overloaded")].violations
    assert lost and all("conversion-keeps-guest-data" in v for v in lost)
    assert runs[("pkvm", "split")].violations == []
    assert (
        runs[("pkvm", "overloaded")].arch_stats["pages_scrubbed"]
        > runs[("pkvm", "split")].arch_stats["pages_scrubbed"]
    )


def test_headline_snp_tdx_and_sw_protected_are_clean_under_both(headline) -> None:
    for (arch, design), r in by_key(headline[gmem]).items():
        assert r.expected_errors == 1, "the pinned page made exactly one conversion fail"
        assert r.rmp_left == 0, f"{arch}/{design} left RMP-assigned pages"
        if arch != "pkvm":
            assert r.violations == [], (arch, design, r.violations[:2])
    snp = by_key(headline[gmem])
    assert snp[("snp", "split")].stats["make_shared_calls"] > 0
    assert snp[("snp", "overloaded")].stats["make_shared_calls"] == 0
    assert snp[("snp", "overloaded")].arch_stats == snp[("snp", "split")].arch_stats


def test_headline_engine_and_reference_agree(headline) -> None:
    for ours, theirs in zip(headline[gmem], headline[ref], strict=True):
        a, b = ours.row(), theirs.row()
        a.pop("engine_ms")
        b.pop("engine_ms")
        assert a == b
        assert ours.violations == theirs.violations


@IMPLS
def test_snp_rmp_entries_and_psmash(impl) -> None:
    with impl.GuestMemfd(2048 * P, flags=gmem.FLAG_MMAP, folio_order=9, arch="snp") as f:
        pfn, order = f.get_pfn(700)
        assert order == 9
        base = pfn - 700 % 512
        assert [base, base + 512, 2] in f.physmem.rmp_runs().tolist()  # one 2 MiB entry
        assert f.arch.stats["rmp_updates"] == 1
        f.set_attributes(600, 700, gmem.SHARED)  # part of the 2 MiB entry: PSMASH first
        assert f.arch.stats["psmash"] == 1
        rmp = f.physmem.rmp_runs().tolist()
        assert [base, base + 88, 1] in rmp and [base + 88, base + 188, 0] in rmp
        assert f.arch.stats["rmp_updates"] == 1 + 100
        f.set_attributes(1030, 1031, gmem.SHARED)
        pfn, order = f.get_pfn(1029)  # the private block around 1029 is [1028, 1030)
        assert order == 1 and f.arch.stats["rmp_updates"] == 101 + 2  # two 4 KiB entries
        assert f.host_read(650) == gmem.GARBLED and violations(f) == []  # read via the other key


@IMPLS
@pytest.mark.parametrize(("arch", "token"), [("tdx", 0), ("snp", gmem.GARBLED), ("pkvm", 0x77)])
def test_contents_on_conversion_both_directions(impl, arch, token) -> None:
    with impl.GuestMemfd(8 * P, flags=gmem.FLAG_MMAP, arch=arch) as f:
        f.guest_write(3, 0x77)
        f.set_attributes(0, 8, gmem.SHARED)
        assert f.host_read(3) == token
        f.host_write(4, 0x99)
        f.set_attributes(4, 5, gmem.PRIVATE)
        assert f.guest_read(4) == (0x99 if arch == "pkvm" else token)
        assert violations(f) == []


@IMPLS
def test_pkvm_ownership_follows_share_and_unshare(impl) -> None:
    f = impl.GuestMemfd(4 * P, flags=gmem.FLAG_MMAP, arch="pkvm")
    pfn = f.get_pfn(1)[0]
    owner = {tuple(r[:2]): r[2] for r in f.physmem.owner_runs().tolist()}
    assert owner[(pfn, pfn + 1)] == 1  # guest
    f.set_attributes(0, 4, gmem.SHARED)
    assert [pfn, pfn + 1, 2] in f.physmem.owner_runs().tolist()  # shared with the host
    f.host_write(1, 5)
    f.close()
    assert f.physmem.owner_runs().tolist() == [[0, 4, 0]] and f.physmem.read(pfn) == 0
    assert f.arch.stats["pages_scrubbed"] == 1 and violations(f) == []


def python_archs(impl):
    """The same Python archs for either implementation."""

    class Logged(impl.Arch):
        config = {"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION"}

        def __init__(self):
            super().__init__()
            self.log = []

        def prepare(self, index, pfn, nr_pages):
            self.log.append(("prepare", index, pfn, nr_pages))

        def make_shared(self, start_pfn, end_pfn):
            self.log.append(("make_shared", start_pfn, end_pfn))

        def free_folio(self, start_pfn, end_pfn):
            self.log.append(("free_folio", start_pfn, end_pfn))

        def invalidate_start(self, start, end, kinds):
            self.log.append(("invalidate_start", start, end, kinds))

    class Batched(Logged):
        batched = True

        def make_shared(self, ranges):
            self.log.append(("make_shared", ranges.tolist()))

        def free_folio(self, ranges):
            self.log.append(("free_folio", ranges.tolist()))

    class BrokenFree(impl.arch.SNP):
        def free_folio(self, start_pfn, end_pfn):
            pass  # forgets to give the pages back in the RMP

    class BrokenShare(impl.arch.SNP):
        def make_shared(self, start_pfn, end_pfn):
            pass

    class Raises(Logged):
        def make_shared(self, start_pfn, end_pfn):
            super().make_shared(start_pfn, end_pfn)
            raise KeyError(start_pfn)

    class Reenters(Logged):
        def invalidate_start(self, start, end, kinds):
            if self.log:
                return
            self.log.append(("attrs", self.file.get_attributes(start)))  # reading is fine
            self.file.fallocate(0, 1)  # changing is not

    return Logged, Batched, BrokenFree, BrokenShare, Raises, Reenters


def workload(f):
    f.fallocate(0, 160)
    f.get_pfn(170)
    f.set_attributes(2, 200, gmem.SHARED)
    f.punch_hole(32, 40)


@IMPLS
def test_python_arch_gets_every_hook_one_by_one_or_batched(impl) -> None:
    Logged, Batched, *_ = python_archs(impl)
    logged, batched = Logged(), Batched()
    for arch in (logged, batched):
        with impl.GuestMemfd(256 * P, folio_order=2, arch=arch) as f:
            assert arch.file is f and f.arch is arch and arch.name == type(arch).__name__
            workload(f)
    singles = [c[1:] for c in logged.log if c[0] == "make_shared"]
    batches = [c[1] for c in batched.log if c[0] == "make_shared"]
    assert [len(b) for b in batches] == [31, 10]
    assert list(chain(*batches)) == [list(s) for s in singles]
    frees = [list(c[1:]) for c in logged.log if c[0] == "free_folio"]
    assert list(chain(*(c[1] for c in batched.log if c[0] == "free_folio"))) == frees
    assert logged.log[0][0] == "prepare" and ("invalidate_start", 2, 200, 2) in logged.log


def test_python_arch_engine_and_reference_agree() -> None:
    logs = []
    for impl in (gmem, ref):
        Logged, Batched, *_ = python_archs(impl)
        for cls in (Logged, Batched):
            arch = cls()
            with impl.GuestMemfd(256 * P, folio_order=2, arch=arch) as f:
                workload(f)
                snap = snapshot(f)
            logs.append((arch.log, snap))
    assert logs[0] == logs[2] and logs[1] == logs[3]


@IMPLS
def test_checker_finds_an_snp_page_freed_while_assigned(impl) -> None:
    _, _, BrokenFree, *_ = python_archs(impl)
    f = impl.GuestMemfd(1024 * P, folio_order=9, arch=BrokenFree())
    f.get_pfn(3)
    f.close()
    found = f.check()
    assert [(v.arch, v.rule) for v in found] == [("BrokenFree", "free-pool-page-unassigned")]
    assert "512 pages" in found[0].detail and found[0].pfn == 0
    assert "BrokenFree" in str(found[0]) and "free-pool-page-unassigned" in str(found[0])


@IMPLS
def test_checker_finds_the_host_reaching_an_assigned_page(impl) -> None:
    _, _, _, BrokenShare, *_ = python_archs(impl)
    with impl.GuestMemfd(16 * P, flags=gmem.FLAG_MMAP, arch=BrokenShare()) as f:
        f.get_pfn(5)
        f.set_attributes(0, 16, gmem.SHARED)
        pfn = f.host_fault(5)
        found = [(v.rule, v.index, v.pfn) for v in f.check()]
        assert found == [("host-reaches-unassigned-pages", 5, pfn)]


@IMPLS
def test_a_raising_hook_completes_the_operation_then_reraises(impl) -> None:
    Logged, _, _, _, Raises, _ = python_archs(impl)
    twin, raising = Logged(), Raises()
    with (
        impl.GuestMemfd(64 * P, folio_order=2, arch=twin) as a,
        impl.GuestMemfd(64 * P, folio_order=2, arch=raising) as b,
    ):
        for f in (a, b):
            f.fallocate(0, 16)
        a.set_attributes(0, 64, gmem.SHARED)
        with pytest.raises(KeyError):
            b.set_attributes(0, 64, gmem.SHARED)
        assert b.attribute_runs().tolist() == a.attribute_runs().tolist() == [[0, 64, 0]]
        assert b.stats == a.stats and raising.log == twin.log  # every range was still delivered
        found = b.check()
        assert len(found) == 4 and {v.rule for v in found} == {"hook-raised"}
        assert "make_shared raised KeyError" in found[0].detail


@IMPLS
def test_a_hook_may_read_its_file_but_not_change_it(impl) -> None:
    *_, Reenters = python_archs(impl)
    arch = Reenters()
    with impl.GuestMemfd(8 * P, arch=arch) as f:
        with pytest.raises(RuntimeError, match="not change it"):
            f.set_attributes(0, 8, gmem.SHARED)
        assert ("attrs", gmem.PRIVATE) in arch.log
        assert f.attribute_runs().tolist() == [[0, 8, 0]]  # the conversion completed
        assert len(f.folios()) == 0  # the hook's fallocate did not happen


@IMPLS
def test_config_is_read_once_and_validated(impl) -> None:
    Logged, *_ = python_archs(impl)
    arch = Logged()
    with impl.GuestMemfd(8 * P, arch=arch) as f:
        Logged.config = set()  # too late: read when the file was created
        f.get_pfn(0)
        assert arch.log[0][0] == "prepare"
        with pytest.raises(ValueError, match="another file"):
            impl.GuestMemfd(8 * P, arch=arch)

    class Bad(impl.Arch):
        config = {"FREE", "PREPAIR"}

    with pytest.raises(ValueError, match="^config: unknown hook config 'PREPAIR'"):
        impl.GuestMemfd(8 * P, arch=Bad())
    with pytest.raises(ValueError, match="^config:"):
        impl.arch.Recorder({"NOPE"})


@IMPLS
@pytest.mark.parametrize("design", ["split", "overloaded"])
def test_which_hook_runs_on_conversion(impl, design) -> None:
    for config, want in [
        ({"FREE"}, "free_folio" if design == "overloaded" else None),
        ({"FREE_ON_SHARED_CONVERSION"}, "make_shared" if design == "split" else None),
        (
            {"FREE", "FREE_ON_SHARED_CONVERSION"},
            "free_folio" if design == "overloaded" else "make_shared",
        ),
        (set(), None),
    ]:
        rec = impl.arch.Recorder(config)
        with impl.GuestMemfd(8 * P, arch=rec, hook_design=design) as f:
            f.fallocate(0, 8)
            rec.clear()
            f.set_attributes(0, 8, gmem.SHARED)
            hooks = {c[0] for c in rec.calls} - {"invalidate_start", "invalidate_end"}
            assert hooks == ({want} if want else set()), (config, design)
            f.set_attributes(0, 8, gmem.PRIVATE)  # to private: never a PFN hook
            assert {c[0] for c in rec.calls} - {"invalidate_start", "invalidate_end"} == hooks


@IMPLS
def test_huge_folios_partly_converted_and_punched(impl) -> None:
    """A 1 GiB folio and a 2 MiB one, each converted and punched in part (SNP)."""
    gib = 1 << 18
    with impl.GuestMemfd(2 * gib * P, flags=gmem.FLAG_MMAP, folio_order=18, arch="snp") as f:
        pfn, order = f.get_pfn(12345)
        assert order == 18 and f.arch.stats["rmp_updates"] == 512  # 512 2 MiB entries
        base = pfn - 12345
        start, end = 1000, 1000 + 3 * 512  # 6 MiB, starting inside a 2 MiB entry
        f.set_attributes(start, end, gmem.SHARED)
        assert f.arch.stats["psmash"] == 2  # both ends cut a 2 MiB entry
        assert f.stats["make_shared_calls"] == 1  # one folio, one clamped range
        rmp = f.physmem.rmp_runs().tolist()
        assert [base + start, base + end, 0] in rmp
        f.punch_hole(gib // 2, gib // 2 + 256)  # 1 MiB out of the middle
        pieces = f.folios(0, gib)[["index", "order"]].tolist()
        assert (0, 17) in pieces and (gib // 2 + 256, 8) in pieces and (gib // 2 + 512, 9) in pieces
        assert sum(1 << o for _, o in pieces) == gib - 256
        assert f.arch.stats["psmash"] == 3  # the punched 2 MiB entry was split first
        assert f.page_pfns(gib // 2 - 1, gib // 2 + 257).tolist()[1:-1] == [gmem.NO_PFN] * 256
        assert violations(f) == []
    assert f.physmem.rmp_runs()[:, 2].tolist() == [0] and violations(f) == []


@IMPLS
def test_two_mib_folios_converted_in_4k_pieces(impl) -> None:
    rec = impl.arch.Recorder({"FREE_ON_SHARED_CONVERSION"})
    with impl.GuestMemfd(2048 * P, folio_order=9, arch=rec) as f:
        f.fallocate(0, 2048)
        rec.clear()
        f.set_attributes(500, 1030, gmem.SHARED)  # the tail of one, one whole, the head of one
        pfns = f.page_pfns(0, 2048)
        assert rec.ranges("make_shared").tolist() == [
            [int(pfns[500]), int(pfns[511]) + 1],
            [int(pfns[512]), int(pfns[1023]) + 1],
            [int(pfns[1024]), int(pfns[1029]) + 1],
        ]


# Every hook call site and gate under the three designs: event -> the hook a Recorder logs.
CALL_SITES = {
    # event: (config that enables it, {design: logged name})
    "private fault": (
        {"PREPARE"},
        {"mainline": "make_private", "split": "prepare", "overloaded": "prepare"},
    ),
    "to-shared conversion": (
        {"CONVERT", "RECLAIM"},
        {"mainline": "make_shared", "split": "make_shared", "overloaded": "free_folio"},
    ),
    "punch": (
        {"RECLAIM"},
        {"mainline": "reclaim", "split": "free_folio", "overloaded": "free_folio"},
    ),
    "invalidation": ({"INVALIDATE"}, {"mainline": "invalidate_range"}),
    "populate": ({"POPULATE"}, dict.fromkeys(("mainline", "split", "overloaded"), "post_populate")),
}


def _event(f, event: str) -> None:
    if event == "private fault":
        f.get_pfn(0)
    elif event == "to-shared conversion":
        f.set_attributes(0, 4, gmem.SHARED)
    elif event == "punch":
        f.punch_hole(0, 4)
    elif event == "invalidation":
        f.set_attributes(0, 4, gmem.SHARED)
    else:
        f.populate(1, 5)


@IMPLS
@pytest.mark.parametrize("design", ["mainline", "split", "overloaded"])
@pytest.mark.parametrize("event", sorted(CALL_SITES))
@pytest.mark.parametrize("gated", [True, False])
def test_every_call_site_and_gate_under_every_design(impl, design, event, gated) -> None:
    config, names = CALL_SITES[event]
    rec = impl.arch.Recorder(config if gated else set())
    with impl.GuestMemfd(8 * P, folio_order=2, arch=rec, hook_design=design) as f:
        f.fallocate(0, 8)
        rec.clear()
        _event(f, event)
        logged = {c[0] for c in rec.calls} - {"invalidate_start", "invalidate_end"}
        want = names.get(design) if gated else None
        assert logged == ({want} if want else set()), (event, design, gated, rec.calls)
