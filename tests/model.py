"""Helpers for GuestMemfd tests: full-state snapshots that compare across implementations."""

from __future__ import annotations

from typing import Any

import gmem


def violations(f: Any) -> list[tuple[Any, ...]]:
    return [(v.arch, v.rule, v.index, v.pfn, v.detail) for v in f.check()]


def snapshot(f: Any) -> dict[str, Any]:
    """Everything observable about a file and its PhysMem, as plain values."""
    pm = f.physmem
    snap: dict[str, Any] = {
        "closed": f.closed,
        "stats": f.stats,
        "arch_stats": f.arch.stats,
        "free_blocks": pm.free_blocks().tolist(),
        "nr_free": pm.nr_free,
        "contents": pm.content_runs().tolist(),
        "rmp": pm.rmp_runs().tolist(),
        "owner": pm.owner_runs().tolist(),
        "violations": violations(f),
    }
    if not f.closed:
        snap["attrs"] = f.attribute_runs().tolist()
        snap["folios"] = f.folios().tolist()
    if hasattr(f.arch, "calls"):
        snap["calls"] = list(f.arch.calls)
    return snap


def shared_with_data(impl: Any, nr_pages: int = 16, **kw: Any) -> Any:
    """A shared, mmap-able file whose pages hold 100 + index, written by the host."""
    f = impl.GuestMemfd(
        nr_pages * gmem.PAGE_SIZE, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED, **kw
    )
    for i in range(nr_pages):
        f.host_write(i, 100 + i)
    return f
