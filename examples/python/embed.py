"""gmem embedded in a simulator, from Python: a 4 MiB pKVM guest with 2 MiB folios goes
through guest faults, a share, a host pin that makes unsharing busy, populate, a memory
failure and teardown, under an arch of its own that counts its hook calls.  It prints
the counters in the fixed format that examples/c/embed.c and examples/cpp/embed.cpp
print: the three front ends agree line for line (tests/test_embedding.py checks it).

    python examples/python/embed.py
"""

from __future__ import annotations

import gmem


class Counting(gmem.arch.PKVM):
    """pKVM as built in, plus INVALIDATE, counting the hook calls it gets."""

    config = frozenset({"RECLAIM", "INVALIDATE"})

    def __init__(self) -> None:
        super().__init__()
        self.counts = dict.fromkeys(
            ["invalidate_start", "invalidate_range", "invalidate_end", "reclaim_ranges"], 0
        )

    def invalidate_start(self, start: int, end: int, kinds: int) -> None:
        self.counts["invalidate_start"] += 1

    def invalidate_range(self, start: int, end: int, kinds: int) -> None:
        self.counts["invalidate_range"] += 1

    def invalidate_end(self, start: int, end: int) -> None:
        self.counts["invalidate_end"] += 1

    def reclaim(self, start_pfn: int, end_pfn: int) -> None:
        self.counts["reclaim_ranges"] += 1
        super().reclaim(start_pfn, end_pfn)  # pKVM's own: scrub the pages


def main() -> None:
    arch = Counting()
    f = gmem.GuestMemfd(4 << 20, flags=gmem.FLAG_MMAP, folio_order=9, arch=arch)
    f.get_pfn(0)  # guest faults on private pages
    f.get_pfn(600)
    f.guest_write(0, 1000)
    f.guest_write(600, 2000)
    f.set_attributes(512, 1024, gmem.SHARED)  # the guest shares its upper half
    f.host_fault(600)
    f.host_write(600, 3000)
    f.pin(600)  # a device pins a shared page...
    try:
        f.set_attributes(512, 1024, gmem.PRIVATE)  # ...so unsharing is busy
    except gmem.ConversionBusy as e:
        print("busy_index", e.error_index)
    f.unpin(600)
    f.set_attributes(512, 1024, gmem.PRIVATE)
    print("guest_read", f.guest_read(600))  # pKVM keeps the contents in place
    f.populate(700, 4000)
    f.memory_failure(0)
    try:
        f.get_pfn(5)
    except gmem.HWPoison as e:
        print("hwpoison_index", e.index)
    f.punch_hole(0, 512)  # the poisoned folio leaves; the index faults in a fresh one
    print("get_pfn_after_punch", f.get_pfn(5)[0])
    f.close()
    for name, value in arch.counts.items():
        print("hook", name, value)
    for name, value in f.stats.items():
        print("stat", name, value)
    for name, value in arch.stats.items():
        print("arch", name, value)
    print("violations", len(f.check()))


if __name__ == "__main__":
    main()
