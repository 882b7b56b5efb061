"""SNP's conversion walk hands the built-in model merged PFN extents, one call each,
where the kernel (and the reference) hand over batches of up to 31 folio ranges.  That
must change nothing observable: here on files large enough for 2 MiB RMP entries
(PSMASH at their edges), "hugetlb" files that split on share, fragmented free pools,
punches and mid-folio conversions, the engine's built-in SNP, a batched Python subclass
of it (which must still get batches of at most 31) and the reference agree."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

import gmem
import gmem.reference as ref

from model import snapshot

P = gmem.PAGE_SIZE
PM_PAGES = 2048  # four 2 MiB regions
NR_PAGES = 1024


def batched_snp(impl: Any) -> Any:
    """A batched subclass of SNP that forwards each range and records its batch sizes."""

    class Batched(impl.arch.SNP):
        batched = True

        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def make_shared(self, ranges: Any) -> None:
            self.sizes.append(len(ranges))
            for start_pfn, end_pfn in ranges.tolist():
                super().make_shared(start_pfn, end_pfn)

        def free_folio(self, ranges: Any) -> None:
            self.sizes.append(len(ranges))
            for start_pfn, end_pfn in ranges.tolist():
                super().free_folio(start_pfn, end_pfn)

    return Batched()


page = st.integers(0, NR_PAGES - 1)
OPS = st.one_of(
    st.tuples(st.just("fallocate"), page, page),
    st.tuples(st.just("punch_hole"), page, page),
    st.tuples(st.just("guest_write"), page, st.integers(1, 99)),
    st.tuples(st.just("guest_touch"), page, page, st.integers(1, 64)),
    st.tuples(st.just("host_write"), page, st.integers(1, 99)),
    st.tuples(st.just("populate"), page, st.integers(1, 99)),
    st.tuples(st.just("add_folio"), page, st.sampled_from([0, 1, 4, 9]), st.integers(0, PM_PAGES)),
    st.tuples(st.just("set_attributes"), page, page, st.sampled_from([0, gmem.PRIVATE])),
    st.tuples(st.just("set_attributes"), page, page, st.sampled_from([0, gmem.PRIVATE])),
)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    policy = draw(st.sampled_from(["none", "hugetlb"]))
    return {
        "policy": policy,
        "order": draw(st.sampled_from([4, 9] if policy == "hugetlb" else [0, 2, 9])),
        "fragment": draw(st.sampled_from([0.0, 0.0, 0.02])),
        "design": draw(st.sampled_from(["mainline", "split", "overloaded"])),
        "flags": draw(st.sampled_from([gmem.FLAG_MMAP, gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED])),
        "ops": [
            ("fallocate", 0, NR_PAGES - 1),
            ("set_attributes", 0, NR_PAGES - 1, gmem.PRIVATE),
            ("guest_touch", 0, NR_PAGES - 1, draw(st.sampled_from([1, 5, 300]))),
        ][: draw(st.sampled_from([0, 1, 3, 3]))]
        + draw(st.lists(OPS, min_size=4, max_size=30)),
    }


def run(impl: Any, sc: dict[str, Any], arch: Any) -> Any:
    pm = impl.PhysMem(PM_PAGES, seed=1)
    pm.fragment(sc["fragment"])
    f = impl.GuestMemfd(
        NR_PAGES * P,
        flags=sc["flags"],
        folio_order=sc["order"],
        physmem=pm,
        arch=arch,
        hook_design=sc["design"],
        huge_policy=sc["policy"],
    )
    log = []
    for name, *args in sc["ops"]:
        if name == "add_folio":
            index, order, pfn = args
            args = [index & -(1 << order), order, pfn & -(1 << order)]
        if name == "guest_touch":  # private faults across a range: 2 MiB RMP entries
            s, e, step = min(args[0], args[1]), max(args[0], args[1]) + 1, args[2]
            name, args = "guest_write_many", [list(range(s, e, step)), [7] * len(range(s, e, step))]
        elif name in ("fallocate", "punch_hole", "set_attributes"):
            args = [min(args[0], args[1]), max(args[0], args[1]) + 1, *args[2:]]
        try:
            getattr(f, name)(*args)
            log.append("ok")
        except (ValueError, gmem.GmemError) as exc:
            log.append(type(exc).__name__)
    return f, log


@settings(max_examples=150, deadline=None)
@given(sc=scenarios())
def test_snp_extents_agree_with_batches_of_31(sc: dict[str, Any]) -> None:
    batched = batched_snp(gmem)
    runs = [run(gmem, sc, "snp"), run(gmem, sc, batched), run(ref, sc, "snp")]
    want = snapshot(runs[2][0]) | {"log": runs[2][1]}
    for f, log in runs[:2]:
        assert snapshot(f) | {"log": log} == want
    assert all(0 < n <= gmem.FOLIO_BATCH_SIZE for n in batched.sizes)
    stats = runs[0][0].arch.stats
    event(f"psmash={min(stats['psmash'], 1)} updates={min(stats['rmp_updates'] // 50, 3)}")
    event(f"max batch {max(batched.sizes, default=0) // 10 * 10}")
    for f, _ in runs:
        with contextlib.suppress(gmem.GmemError):
            f.close()


def test_psmash_at_both_edges_of_a_2m_entry_counts_alike() -> None:
    # One 2 MiB folio faulted private whole (a 2 MiB RMP entry), then a mid-folio share
    # that cuts it on both sides, then the rest: the same PSMASH and RMPUPDATE counts.
    results = []
    for impl, arch in ((gmem, "snp"), (gmem, batched_snp(gmem)), (ref, "snp")):
        f = impl.GuestMemfd(2048 * P, folio_order=9, flags=gmem.FLAG_MMAP, arch=arch)
        f.fallocate(0, 2048)
        for i in range(0, 2048, 97):
            f.guest_write(i, 5)
        f.set_attributes(100, 1500, gmem.SHARED)
        f.set_attributes(0, 2048, gmem.SHARED)
        results.append((f.arch.stats, f.stats, f.physmem.rmp_runs().tolist(), f.check()))
        f.close()
    assert results[0][0]["psmash"] >= 2
    assert results[0] == results[1] == results[2]
