"""Page contents written page by page: the engine keeps a group of pages whose tokens
differ as an array (ContentMap, docs/performance.md), and a long bulk call over scattered
indexes finds its folios ahead, in index order.  Neither may change anything observable:
each test runs the same operations on the engine and the reference and compares full
snapshots (contents, folios, attributes, stats, violations) after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import gmem
import gmem.reference as ref

from model import snapshot, violations

P = gmem.PAGE_SIZE
GROUP = 512  # pages per dense group in the engine
Step = Callable[[Any], Any]


def outcome(f: Any, step: Step) -> Any:
    try:
        got = step(f)
        if isinstance(got, tuple):
            got = tuple(np.asarray(g).tolist() for g in got)
        elif isinstance(got, np.ndarray):
            got = got.tolist()
    except (ValueError, RuntimeError, gmem.GmemError) as exc:
        got = (type(exc).__name__, str(exc), getattr(exc, "completed", None))
    return got


def replay(make: Callable[[Any], Any], steps: list[Step]) -> None:
    files = [make(gmem), make(ref)]
    for n, step in enumerate(steps):
        got = [outcome(f, step) for f in files]
        assert got[0] == got[1], f"step {n}"
        assert snapshot(files[0]) == snapshot(files[1]), f"step {n}"
    for f in files:
        f.close()
    assert snapshot(files[0]) == snapshot(files[1])


def written(start: int, n: int, salt: int) -> Step:
    """Distinct tokens page by page: enough single stores to make their groups dense."""
    idx = np.arange(start, start + n, dtype=np.uint64)
    return lambda f: f.host_write_many(idx, idx * 7 + salt)


@pytest.mark.parametrize("arch", ["sw_protected", "snp", "tdx", "pkvm"])
def test_dense_groups_through_punch_conversion_and_close(arch: str) -> None:
    def make(impl: Any) -> Any:
        f = impl.GuestMemfd(6 * GROUP * P, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED, arch=arch)
        f.fallocate(0, f.nr_pages)
        return f

    steps: list[Step] = [
        written(0, 3 * GROUP + 100, 1),
        lambda f: f.guest_write(GROUP + 3, 5),  # a single call into a dense group
        lambda f: f.host_read_many(np.arange(0, 4 * GROUP, 3)),
        lambda f: f.punch_hole(GROUP // 2, GROUP + 10),  # a dense group in part, one whole
        lambda f: f.host_write(GROUP // 2 + 1, 77),  # refaults a punched page
        lambda f: f.set_attributes(2 * GROUP - 5, 3 * GROUP + 7, gmem.PRIVATE),  # garble/zero
        lambda f: f.guest_read_many(np.arange(2 * GROUP - 8, 3 * GROUP + 9)),
        lambda f: f.set_attributes(2 * GROUP, 2 * GROUP + 40, gmem.SHARED),
        written(2 * GROUP, 40, 9),
        lambda f: f.host_read_many(np.arange(2 * GROUP - 8, 2 * GROUP + 48)),
        lambda f: f.punch_hole(0, 6 * GROUP),  # freed pages keep their tokens (or a scrub)
        violations,
    ]
    replay(make, steps)


def test_a_group_written_uniform_and_then_covered_goes_back_to_runs() -> None:
    def make(impl: Any) -> Any:
        f = impl.GuestMemfd(2 * GROUP * P, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED)
        f.fallocate(0, f.nr_pages)
        return f

    idx = np.arange(GROUP, dtype=np.uint64)
    steps: list[Step] = [
        written(0, GROUP, 3),  # dense
        lambda f: f.host_write_many(idx, np.full(GROUP, 4, dtype=np.uint64)),  # uniform
        lambda f: f.set_attributes(0, GROUP // 2, gmem.PRIVATE),  # no contents change
        lambda f: f.punch_hole(0, GROUP // 2),
        lambda f: f.get_pfns(idx[: GROUP // 2]),  # zeroes them: a range store
        lambda f: f.physmem.content_runs(),
    ]
    replay(make, steps)


def test_memory_failure_in_a_dense_group() -> None:
    def make(impl: Any) -> Any:
        f = impl.GuestMemfd(2 * GROUP * P, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED)
        f.fallocate(0, f.nr_pages)
        return f

    steps: list[Step] = [
        written(0, 2 * GROUP, 5),
        lambda f: f.memory_failure(GROUP + 1),
        lambda f: f.host_read_many(np.arange(GROUP - 2, GROUP + 4)),  # completed 3
        lambda f: f.punch_hole(GROUP + 1, GROUP + 2),
        lambda f: f.host_read_many(np.arange(GROUP - 2, GROUP + 4)),
        written(GROUP, 8, 6),
    ]
    replay(make, steps)


def scattered(n: int, hi: int, seed: int, bad: int | None = None) -> np.ndarray:
    idx = np.random.default_rng(seed).integers(0, hi, n).astype(np.uint64)
    if bad is not None:
        idx[n // 2] = bad  # past the end: the element in the middle fails
    return idx


@pytest.mark.parametrize("huge_policy", ["none", "hugetlb"])
def test_long_scattered_batches_find_their_folios_ahead(huge_policy: str) -> None:
    nr = 4 * GROUP

    def make(impl: Any) -> Any:
        f = impl.GuestMemfd(
            nr * P, flags=gmem.FLAG_MMAP, folio_order=3, arch="snp", huge_policy=huge_policy
        )
        f.fallocate(0, nr // 2)  # the rest are holes, faulted in by the batches
        f.set_attributes(100, 900, gmem.SHARED)
        f.memory_failure(40)
        return f

    steps: list[Step] = [
        lambda f: f.get_pfns(scattered(3000, nr, 1)),  # poisoned 40: fails early
        lambda f: f.punch_hole(40, 48),
        lambda f: f.get_pfns(scattered(3000, nr, 2)),
        lambda f: f.get_pfns(scattered(3000, nr, 3, bad=nr)),
        lambda f: f.host_write_many(scattered(800, 900, 4) // 2 + 450, scattered(800, 99, 5)),
        lambda f: f.host_read_many(scattered(800, 900, 6)),  # private pages: SigBus
        lambda f: f.guest_write_many(scattered(2000, nr, 7), scattered(2000, 2**40, 8)),
        lambda f: f.guest_read_many(scattered(2000, nr, 9)),
        violations,
    ]
    replay(make, steps)
