"""A typed simulator script, as a user writes one: checked by ``mypy --strict`` in CI
(the README's test line) and run by tests/test_typing.py.  Every pattern the docs show
for subclassing gmem.Arch must type-check here without a cast or an ignore."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

import gmem


class PerRange(gmem.Arch):
    """One call per PFN range: int parameters, as the engine passes them."""

    config = frozenset({"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION"})

    def __init__(self) -> None:
        super().__init__()
        self.shared_pages = self.freed_pages = 0
        self.seen: list[int] = []

    def prepare(self, index: int, pfn: int, nr_pages: int) -> None:
        self.seen.append(self.file.get_attributes(index))  # file: a GuestMemfd in a hook

    def make_shared(self, start_pfn: int, end_pfn: int) -> None:
        self.shared_pages += end_pfn - start_pfn

    def free_folio(self, start_pfn: int, end_pfn: int) -> None:
        self.freed_pages += end_pfn - start_pfn

    def invalidate_start(self, start: int, end: int, kinds: int) -> None:
        assert kinds & (gmem.FILTER_SHARED | gmem.FILTER_PRIVATE)
        assert self.file.stats["folios_allocated"] >= 0

    def invalidate_end(self, start: int, end: int) -> None:
        pass


class Batched(gmem.BatchedArch):
    """One call per folio batch: an (n, 2) uint64 array."""

    config = frozenset({"FREE_ON_SHARED_CONVERSION"})

    def __init__(self) -> None:
        super().__init__()
        self.ranges = 0

    def make_shared(self, ranges: npt.NDArray[np.uint64]) -> None:
        self.ranges += len(ranges)


class QuietSNP(gmem.arch.SNP):
    """A built-in model with one hook changed; super() keeps the rest."""

    def make_shared(self, start_pfn: int, end_pfn: int) -> None:
        super().make_shared(start_pfn, end_pfn)


def converted_pages(
    arch: gmem.AnyArch, design: gmem.HookDesign = "split", policy: gmem.HugePolicy = "none"
) -> int:
    with gmem.GuestMemfd(
        4 << 20, folio_order=9, arch=arch, hook_design=design, huge_policy=policy
    ) as f:
        f.fallocate(0, f.nr_pages)
        f.get_pfn(600)  # a private page: prepare runs
        f.set_attributes(0, 512, gmem.SHARED)
        return f.stats["pages_converted"]  # __exit__ returns None: no missing return


def faults_in_bulk(indexes: npt.NDArray[np.uint64]) -> int:
    """The bulk forms: arrays in and out, and the count a failing batch carries."""
    with gmem.GuestMemfd(1 << 21, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED) as f:
        pfns, orders = f.get_pfns(indexes)
        f.host_write_many(indexes, pfns)
        try:
            f.host_read_many([0, f.nr_pages])
        except gmem.SigBus as e:
            assert e.completed == 1
        buf = np.empty((f.nr_pages, 2), dtype=np.uint64)
        walked: npt.NDArray[np.uint64] = f.pfn_ranges(0, f.nr_pages, out=buf)
        return int(orders.sum()) + len(walked) + int(f.guest_read_many(indexes)[-1] - pfns[-1])


def builtin(name: gmem.ArchName) -> int:
    with gmem.GuestMemfd(1 << 21, arch=name) as f:
        return f.guest_read(0)


def main() -> None:
    per_range, batched = PerRange(), Batched()
    assert converted_pages(per_range) == 512 and per_range.shared_pages == 512
    assert per_range.freed_pages == 1024 and per_range.seen
    assert converted_pages(batched) == 512 and batched.ranges == 1
    assert converted_pages(QuietSNP(), "overloaded") == 512
    assert all(builtin(n) == 0 for n in ("sw_protected", "snp", "tdx", "pkvm"))
    assert faults_in_bulk(np.arange(8, dtype=np.uint64)) == 8  # order 0, 8 folios walked


if __name__ == "__main__":
    main()
