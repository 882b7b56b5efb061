"""Conversion of a fully populated guest, private->shared and back: engine vs reference,
and against pfn_ranges over the same folios (the targets in docs/performance.md).

Run:  pytest bench/test_bench_convert.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import numpy as np
import pytest

import gmem
import gmem.reference as ref

TIB_2M = (1 << 40, 9)  # 1 TiB of 2 MiB folios: 2**19 folios
SIZES = {"1TiB-2MiB": TIB_2M, "64GiB-4KiB": (64 << 30, 0)}


def populated(impl, size, order, arch, design="mainline"):
    f = impl.GuestMemfd(size, folio_order=order, arch=arch, hook_design=design)
    f.fallocate(0, f.nr_pages)
    return f


def round_trip(f):
    f.set_attributes(0, f.nr_pages, gmem.SHARED)
    f.set_attributes(0, f.nr_pages, gmem.PRIVATE)


@pytest.mark.parametrize("arch", ["sw_protected", "snp", "pkvm"])
@pytest.mark.parametrize("design", ["mainline", "split", "overloaded"])
def test_convert_1tib_engine(benchmark, arch, design) -> None:
    benchmark.group = f"convert 1TiB-2MiB round trip: {arch}"
    with populated(gmem, *TIB_2M, arch, design) as f:
        benchmark.pedantic(round_trip, args=(f,), rounds=5, iterations=1)
        trips = f.stats["conversions"] // 2  # 5, or 1 with --benchmark-disable
        assert trips >= 1 and f.stats["conversions"] == 2 * trips
        if arch == "snp" and design != "overloaded":
            assert f.stats["make_shared_calls"] == trips * (1 << 19)


def test_convert_1tib_pfn_ranges_floor(benchmark) -> None:
    """The walk alone over the same folios: what a conversion cannot beat."""
    benchmark.group = "convert 1TiB-2MiB round trip: snp"
    with populated(gmem, *TIB_2M, "snp") as f:
        out = benchmark(f.pfn_ranges, 0, f.nr_pages)
        assert len(out) == 1 << 19


def test_convert_1tib_reference(benchmark) -> None:
    benchmark.group = "convert 1TiB-2MiB round trip: snp"
    # With --benchmark-disable (CI) only correctness counts: a 16 GiB guest will do.
    size = 16 << 30 if benchmark.disabled else TIB_2M[0]
    with populated(ref, size, 9, "snp") as f:
        benchmark.pedantic(round_trip, args=(f,), rounds=1, iterations=1)
        assert f.stats["make_shared_calls"] == f.nr_pages >> 9


@pytest.mark.parametrize("impl", [gmem, ref], ids=["engine", "reference"])
def test_convert_64gib_4k(benchmark, impl) -> None:
    benchmark.group = "convert 64GiB-4KiB round trip: snp"
    size = 64 << 30 if impl is gmem else 1 << 30  # the reference at 1/64th
    if benchmark.disabled:
        size = 1 << 28  # CI checks correctness only
    with populated(impl, size, 0, "snp") as f:
        benchmark.pedantic(round_trip, args=(f,), rounds=3 if impl is gmem else 1, iterations=1)
        assert f.stats["make_shared_calls"] == f.stats["conversions"] // 2 * f.nr_pages
        benchmark.extra_info["pages"] = f.nr_pages


class PerRange(gmem.Arch):
    config = {"FREE_ON_SHARED_CONVERSION"}

    def make_shared(self, start_pfn, end_pfn):
        pass


class Batched(gmem.Arch):
    config = {"FREE_ON_SHARED_CONVERSION"}
    batched = True

    def make_shared(self, ranges):
        pass


HOOKS = {
    "python-per-range": PerRange,
    "python-batched": Batched,
    "cxx-recorder": lambda: gmem.arch.Recorder({"FREE_ON_SHARED_CONVERSION"}),
    "no-hook": lambda: gmem.arch.Recorder(set()),
}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_python_hooks(benchmark, hook) -> None:
    """One private->shared conversion of 2**17 order-0 folios: 2**17 hook ranges."""
    benchmark.group = "hooks: 2**17 ranges, one conversion"
    with gmem.GuestMemfd(1 << 29, folio_order=0, arch=HOOKS[hook]()) as f:
        f.fallocate(0, f.nr_pages)

        def convert():
            f.set_attributes(0, f.nr_pages, gmem.PRIVATE)
            f.set_attributes(0, f.nr_pages, gmem.SHARED)

        f.set_attributes(0, f.nr_pages, gmem.SHARED)
        benchmark.pedantic(convert, rounds=3, iterations=1)
        to_shared = (f.stats["conversions"] + 1) // 2
        want = 0 if hook == "no-hook" else to_shared * (1 << 17)
        assert to_shared >= 2 and f.stats["make_shared_calls"] == want


@pytest.mark.parametrize("impl", [gmem, ref], ids=["engine", "reference"])
def test_convert_fragmented_attributes_whole(benchmark, impl) -> None:
    """A 64 GiB guest of 2 MiB folios with 10**4 shared islands, taken private whole."""
    benchmark.group = "convert 64GiB with 1e4 shared islands, whole range"
    f = impl.GuestMemfd(64 << 30, folio_order=9, arch="snp")
    f.fallocate(0, f.nr_pages)
    islands = np.random.default_rng(5).choice(f.nr_pages // 64, 10_000, replace=False) * 64

    def setup():
        for i in islands.tolist():
            f.set_attributes(i, i + 3, gmem.SHARED)

    def convert():
        f.set_attributes(0, f.nr_pages, gmem.PRIVATE)

    benchmark.pedantic(convert, setup=setup, rounds=3 if impl is gmem else 1, iterations=1)
    assert f.attribute_runs().tolist() == [[0, f.nr_pages, gmem.PRIVATE]]
    f.close()
