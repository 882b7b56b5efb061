"""The seed thread's argument, made concrete: a boot-like run under every arch and design.

A guest boots with private memory, shares I/O buffers with the host (in 2 MiB and 4 KiB
pieces, back and forth), the host writes into them, a pinned page makes one to-private
conversion fail with EAGAIN until it is unpinned, a hole is punched into a huge folio,
and the VM is torn down.  Under pKVM the "overloaded" hook design (v8 of the in-place
conversion series: the free hook also runs on private->shared conversion) scrubs the
guest's shared buffers; the "split" design (a separate, config-gated make_shared) does
not.  ``run_trace`` replays the operations on the engine or on the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import gmem
from gmem._consts import BUILTIN_ARCHS, FLAG_MMAP, PAGE_SIZE, PRIVATE, SHARED

HOOK_DESIGNS = ("split", "overloaded")
Op = dict[str, Any]


def boot_trace(size_bytes: int = 64 << 30, folio_order: int = 9) -> list[Op]:
    """The operations of one boot-like run of a guest of ``size_bytes``."""
    nr_pages = size_bytes // PAGE_SIZE
    block = 1 << folio_order
    if nr_pages < 8 * max(block, 512):
        raise ValueError(f"size: at least {8 * max(block, 512) * PAGE_SIZE} bytes for this trace")
    huge = 512  # the I/O pieces are 2 MiB, whatever the folio size
    io_start = nr_pages // 2
    io_end = io_start + 4 * huge
    ops: list[Op] = [
        {"op": "create", "size": size_bytes, "flags": FLAG_MMAP, "folio_order": folio_order}
    ]
    # Boot: the guest touches every folio (private: prepare runs) and writes a token.
    ops += [
        {"op": "guest_write", "index": i, "token": 0x1000 + i} for i in range(0, nr_pages, block)
    ]
    # The guest fills its I/O buffers, then shares them with the host: 2 MiB pieces.
    ops += [
        {"op": "guest_write", "index": i, "token": 0x10000 + i} for i in range(io_start, io_end, 64)
    ]
    ops += [
        {"op": "set_attributes", "start": s, "end": s + huge, "attrs": SHARED}
        for s in range(io_start, io_end, huge)
    ]
    # The host reads the first two buffers and writes its replies into them.
    ops += [{"op": "host_read", "index": i} for i in range(io_start, io_start + 2 * huge, 64)]
    ops += [
        {"op": "host_write", "index": i, "token": 0x20000 + i}
        for i in range(io_start + 1, io_start + 2 * huge, 64)
    ]
    # 4 KiB pieces in the last buffer, which the host has not mapped (a page mapped
    # elsewhere in its folio would make each of these conversions busy).
    for i in range(io_start + 3 * huge + 3, io_start + 3 * huge + 3 + 8 * 17, 17):
        ops += [
            {"op": "set_attributes", "start": i, "end": i + 1, "attrs": PRIVATE},
            {"op": "guest_write", "index": i, "token": 0x30000 + i},
            {"op": "set_attributes", "start": i, "end": i + 1, "attrs": SHARED},
        ]
    # A device pins a shared page for DMA: taking its 2 MiB back fails until it is unpinned.
    pinned = io_start + 2 * huge + 5
    piece = pinned & ~(huge - 1)
    ops += [
        {"op": "pin", "index": pinned},
        {
            "op": "set_attributes",
            "start": piece,
            "end": piece + huge,
            "attrs": PRIVATE,
            "expect_error": "ConversionBusy",
            "error_index": piece,
        },
        {"op": "unpin", "index": pinned},
        {"op": "set_attributes", "start": piece, "end": piece + huge, "attrs": PRIVATE},
    ]
    # Balloon: a 1 MiB hole punched into the middle of a private huge folio.
    hole = nr_pages // 4 + huge // 4
    ops += [{"op": "punch_hole", "start": hole, "end": hole + 256}]
    ops += [{"op": "check"}, {"op": "close"}]
    return ops


@dataclass
class RunResult:
    arch: str
    hook_design: str
    stats: dict[str, int]
    arch_stats: dict[str, int]
    violations: list[str]
    busy_seen: int
    seconds: float
    assigned_in_free_pool: int = 0
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        s, a = self.stats, self.arch_stats
        return {
            "arch": self.arch,
            "hook_design": self.hook_design,
            "hook_calls": s["prepare_calls"] + s["make_shared_calls"] + s["free_calls"],
            "pfn_ranges": s["hook_ranges"],
            "pages_scrubbed": a.get("pages_scrubbed", 0),
            "rmp_updates": a.get("rmp_updates", 0),
            "psmash": a.get("psmash", 0),
            "rmp_left": self.assigned_in_free_pool,
            "violations": len(self.violations),
            "first_violation": self.violations[0] if self.violations else "",
            "engine_ms": round(self.seconds * 1000, 2),
        }


def run_trace(ops: list[Op], *, arch: str, hook_design: str, impl: ModuleType = gmem) -> RunResult:
    """Replay ``ops`` on a new file of ``impl`` (gmem or gmem.reference); time the calls."""
    create = ops[0]
    f = impl.GuestMemfd(
        create["size"],
        flags=create.get("flags", 0),
        folio_order=create.get("folio_order", 0),
        arch=arch,
        hook_design=hook_design,
    )
    busy = 0
    seconds = 0.0
    found: list[Any] = []
    for op in ops[1:]:
        name = op["op"]
        args = {k: v for k, v in op.items() if k not in ("op", "expect_error", "error_index")}
        t0 = time.perf_counter()
        try:
            result = getattr(f, name)(**args)
        except gmem.GmemError as exc:
            seconds += time.perf_counter() - t0
            if type(exc).__name__ != op.get("expect_error"):
                raise
            if "error_index" in op and getattr(exc, "error_index", None) != op["error_index"]:
                raise
            busy += 1
            continue
        seconds += time.perf_counter() - t0
        if "expect_error" in op:
            raise AssertionError(f"{op} did not fail with {op['expect_error']}")
        if name == "check":
            found = list(result)
    seen = {str(v) for v in found}
    found += [v for v in f.check() if str(v) not in seen]  # what teardown recorded
    rmp = f.physmem.rmp_runs()
    assigned = int(((rmp[:, 1] - rmp[:, 0]) * (rmp[:, 2] != 0)).sum())
    return RunResult(
        arch, hook_design, f.stats, f.arch.stats, [str(v) for v in found], busy, seconds, assigned
    )


def run_all(
    size_bytes: int = 64 << 30,
    folio_order: int = 9,
    archs: tuple[str, ...] = BUILTIN_ARCHS,
    designs: tuple[str, ...] = HOOK_DESIGNS,
    impl: ModuleType = gmem,
) -> list[RunResult]:
    ops = boot_trace(size_bytes, folio_order)
    return [run_trace(ops, arch=a, hook_design=d, impl=impl) for a in archs for d in designs]


COLUMNS = [
    ("arch", "arch"),
    ("hook_design", "design"),
    ("hook_calls", "hook calls"),
    ("pfn_ranges", "PFN ranges"),
    ("pages_scrubbed", "scrubbed"),
    ("rmp_updates", "RMP upd"),
    ("psmash", "PSMASH"),
    ("rmp_left", "RMP left"),
    ("violations", "violations"),
    ("engine_ms", "engine ms"),
]


def table(results: list[RunResult]) -> str:
    rows = [r.row() for r in results]
    widths = [max(len(title), *(len(str(row[key])) for row in rows)) for key, title in COLUMNS]
    lines = ["  ".join(t.rjust(w) for (_, t), w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(str(row[k]).rjust(w) for (k, _), w in zip(COLUMNS, widths, strict=True))
        )
    firsts = [(r["arch"], r["hook_design"], r["first_violation"]) for r in rows if r["violations"]]
    for arch, design, first in firsts:
        lines.append(f"first violation, {arch}/{design}: {first}")
    return "\n".join(lines)
