"""The seed thread's argument, made concrete: a boot-like run under every arch and design.

A guest boots with private memory, shares I/O buffers with the host (in 2 MiB and 4 KiB
pieces, back and forth), the host writes into them, a pinned page makes one to-private
conversion fail with EAGAIN until it is unpinned, a hole is punched into a huge folio,
and the VM is torn down.  Under pKVM the "overloaded" hook design (v8 of the in-place
conversion series: the free hook also runs on private->shared conversion) scrubs the
guest's shared buffers; the "split" design (a separate, config-gated make_shared) and the
kernel as merged ("mainline") do not.  The run is a trace (gmem.trace), so ``gmem
replay`` can run it from a file too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

import gmem
from gmem import trace
from gmem._consts import (
    BUILTIN_ARCHS,
    FLAG_MMAP,
    HOOK_DESIGNS,
    HUGE_POLICIES,
    PAGE_SIZE,
    PRIVATE,
    SHARED,
)

HUGE = 512  # the I/O pieces are 2 MiB, whatever the folio size


def human_bytes(n: int) -> str:
    """4096 -> 4 KiB, 2097152 -> 2 MiB; bytes where no binary unit divides ``n``."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift:,} {unit}"
    return f"{n:,} bytes"


def check_size(size_bytes: int, folio_order: int) -> None:
    """Raise ValueError naming the rule a demo guest size breaks."""
    stride = max(1 << folio_order, HUGE)
    least = 32 * stride * PAGE_SIZE
    if size_bytes <= 0:
        raise ValueError(f"size: must be positive, got {size_bytes:,} bytes")
    if size_bytes % PAGE_SIZE:
        raise ValueError(
            f"size: must be a multiple of the 4 KiB page, got {size_bytes:,} bytes "
            f"({size_bytes % PAGE_SIZE:,} bytes over)"
        )
    if size_bytes < least:
        raise ValueError(
            f"size: the demo needs at least {human_bytes(least)} with "
            f"{human_bytes(PAGE_SIZE << folio_order)} folios (32 I/O strides of "
            f"{human_bytes(stride * PAGE_SIZE)}), got {human_bytes(size_bytes)}"
        )


def boot_trace(
    size_bytes: int = 64 << 30, folio_order: int = 9, seed: int = 0, policy: str = "none"
) -> Iterator[dict[str, Any]]:
    """The operations of one boot-like run of a guest of ``size_bytes``, as trace lines.

    A generator: a 64 GiB guest of 4 KiB folios is 16 million lines, produced as they are
    replayed, never held."""
    check_size(size_bytes, folio_order)
    if policy not in HUGE_POLICIES:
        raise ValueError(f"policy: must be 'none' or 'hugetlb', got {policy!r}")
    return _boot_ops(size_bytes, folio_order, seed, policy)


def _boot_ops(
    size_bytes: int, folio_order: int, seed: int, policy: str
) -> Iterator[dict[str, Any]]:
    nr_pages = size_bytes // PAGE_SIZE
    block = 1 << folio_order
    # Four 2 MiB I/O buffers, each at the start of its own folio when folios are larger:
    # a page the host maps in a folio makes a to-private conversion of the rest of that
    # folio busy, and buffers 0-1 (host-mapped) must not share a folio with 2-3.
    stride = max(block, HUGE)
    rng = random.Random(seed)
    io_start = rng.randrange(nr_pages // 2, nr_pages - 8 * stride, stride)
    buffers = [io_start + k * stride for k in range(4)]

    def share(s: int, e: int, attrs: int) -> dict[str, Any]:
        return {
            "op": "set_attributes",
            "offset": s * PAGE_SIZE,
            "size": (e - s) * PAGE_SIZE,
            "attributes": attrs,
        }

    yield {
        "op": "create",
        "version": trace.VERSION,
        "size": size_bytes,
        "flags": FLAG_MMAP,
        "folio_order": folio_order,
        **({"huge_policy": policy} if policy != "none" else {}),
    }
    # Boot: the guest touches every folio (private: prepare runs) and writes a token.
    for i in range(0, nr_pages, block):
        yield {"op": "guest_write", "index": i, "token": 0x1000 + i}
    # The guest fills its I/O buffers, then shares them with the host in 2 MiB pieces.
    for b in buffers:
        for i in range(b, b + HUGE, 64):
            yield {"op": "guest_write", "index": i, "token": 0x10000 + i}
    for b in buffers:
        yield share(b, b + HUGE, SHARED)
    # The host reads the first two buffers (what it finds depends on the arch: check()
    # says whether that is what the arch promises) and writes its replies into them.
    for b in buffers[:2]:
        for i in range(b, b + HUGE, 64):
            yield {"op": "host_read", "index": i}
    for b in buffers[:2]:
        for i in range(b + 1, b + HUGE, 64):
            yield {"op": "host_write", "index": i, "token": 0x20000 + i}
    # 4 KiB pieces in the last buffer, which the host has not mapped (a page mapped
    # elsewhere in its folio would make each of these conversions busy).
    for i in range(buffers[3] + 3, buffers[3] + 3 + 8 * 17, 17):
        yield share(i, i + 1, PRIVATE)
        yield {"op": "guest_write", "index": i, "token": 0x30000 + i}
        yield share(i, i + 1, SHARED)
    # A device pins a shared page for DMA: taking its 2 MiB back fails until it is unpinned.
    pinned = buffers[2] + rng.randrange(HUGE)
    piece = pinned & ~(HUGE - 1)
    busy_at = max(piece, pinned & ~(block - 1))  # max(start, index of the pinned folio)
    yield {"op": "pin", "index": pinned}
    yield share(piece, piece + HUGE, PRIVATE)
    # The first busy page: the pinned folio's start, or under "hugetlb" (the 2 MiB was
    # split when it was shared) the pinned page itself.
    if policy == "hugetlb":
        busy_at = pinned
    yield {"op": "expect", "error": "ConversionBusy", "error_offset": busy_at * PAGE_SIZE}
    yield {"op": "unpin", "index": pinned}
    yield share(piece, piece + HUGE, PRIVATE)
    # Balloon: a 1 MiB hole punched into the middle of a private huge folio.
    hole = rng.randrange(0, nr_pages // 2 - HUGE, HUGE) + HUGE // 4
    yield {"op": "punch_hole", "offset": hole * PAGE_SIZE, "len": 256 * PAGE_SIZE}
    yield {"op": "check"}
    yield {"op": "close"}


def run_all(
    size_bytes: int = 64 << 30,
    folio_order: int = 9,
    archs: tuple[str, ...] = BUILTIN_ARCHS,
    designs: tuple[str, ...] = HOOK_DESIGNS,
    impl: ModuleType = gmem,
    seed: int = 0,
    policies: tuple[str, ...] = ("none",),
    records: Callable[[str], Iterable[trace.Record]] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    on_operations: Callable[[int], None] | None = None,
) -> list[trace.Summary]:
    """Replay the boot trace (or what ``records(policy)`` yields) under every huge-folio
    policy x arch x design.

    Each run reads a fresh stream of records, so the trace is never held whole."""

    def boot(policy: str) -> Iterable[trace.Record]:
        return trace.iter_records(boot_trace(size_bytes, folio_order, seed, policy))

    make = records or boot
    runs = [(p, a, d) for p in policies for a in archs for d in designs]
    out = []
    for n, (p, a, d) in enumerate(runs):
        if progress:
            progress(n, len(runs), f"{p}: {a}/{d}")
        out.append(
            trace.replay(
                make(p), arch=a, hook_design=d, huge_policy=p, impl=impl, progress=on_operations
            )
        )
    if progress:
        progress(len(runs), len(runs), "done")
    return out


COLUMNS = [
    ("huge_policy", "policy"),
    ("arch", "arch"),
    ("hook_design", "design"),
    ("hook_calls", "hook calls"),
    ("pfn_ranges", "PFN ranges"),
    ("pages_scrubbed", "scrubbed"),
    ("rmp_updates", "RMP upd"),
    ("psmash", "PSMASH"),
    ("rmp_left", "RMP left"),
    ("expected_errors", "EAGAIN"),
    ("violations", "violations"),
    ("engine_ms", "engine ms"),
]


def table(results: list[trace.Summary]) -> str:
    rows = [r.row() for r in results]
    widths = [max(len(title), *(len(str(row[key])) for row in rows)) for key, title in COLUMNS]
    lines = ["  ".join(t.rjust(w) for (_, t), w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(str(row[k]).rjust(w) for (k, _), w in zip(COLUMNS, widths, strict=True))
        )
    for r in rows:
        if r["violations"]:
            lines.append(f"first violation, {r['arch']}/{r['hook_design']}: {r['first_violation']}")
    return "\n".join(lines)
