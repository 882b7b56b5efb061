"""Memory: bytes of metadata per folio, and peak RSS for populated guests (docs/performance.md)."""

from __future__ import annotations

import resource

import pytest

import gmem


@pytest.mark.parametrize(
    ("label", "size", "order"),
    [("64GiB-4KiB", 64 << 30, 0), ("1TiB-2MiB", 1 << 40, 9)],
)
def test_memory_per_folio(benchmark, label, size, order) -> None:
    benchmark.group = "memory"
    if benchmark.disabled:
        size >>= 4  # CI checks correctness only
    f = gmem.GuestMemfd(size, folio_order=order)

    def populate():
        f.fallocate(0, f.nr_pages)

    benchmark.pedantic(populate, rounds=1, iterations=1)
    nr = f.nr_pages >> order
    assert f.stats["folios_allocated"] == nr
    # The page cache's own accounting: a FolioCache with the same layout.
    cache = gmem.FolioCache()
    rows = f.folios()
    cache.add_folios(rows["index"], rows["order"], rows["pfn"])
    per_folio = cache.memory_bytes / nr
    benchmark.extra_info.update(
        bytes_per_folio=per_folio,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    assert per_folio < 16.5
    f.close()


def test_host_load_latency_probe() -> None:
    """The figure gmem bench quotes beside its cold rows: a positive time per load, and a
    clear error for sizes it will not allocate."""
    from gmem import _core, bench

    ns = _core._host_load_latency_ns(1 << 16, 1 << 12)
    assert 0 < ns < 1e6
    with pytest.raises(ValueError, match="bytes"):
        _core._host_load_latency_ns(1 << 31, 10)
    with pytest.raises(ValueError, match="steps"):
        _core._host_load_latency_ns(1 << 16, 1 << 27)
    s = bench.Suite()
    bench.bench_host(s)
    assert s.figures["host_load_latency_64mib_ns"] > 0
    assert "a dependent load costs" in bench.table(s)
