"""What the "hugetlb" huge-folio policy costs and buys, against "none", on two workloads.

- *boot*: the demo's boot-like run (gmem.demo.boot_trace): private memory, I/O buffers
  shared in 2 MiB and 4 KiB pieces, a pinned page, a hole, teardown.
- *virtio churn*: a guest with virtio queues in a few huge folios shares 4 KiB buffers,
  the host pins some for DMA, the guest takes other buffers of the same folios back
  (to private) while the DMA is in flight, then retries after the unpin.

Each run reports the folio splits and merges, SNP's PSMASHes and 2 MiB restores, TDX's
demotes, the EAGAINs (``conversions_busy``), and the largest number of shared pages that
sat inside a huge folio at once - pages the host can only map by mapping into a huge
folio the guest still holds private memory in, which the policy exists to prevent.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from typing import Any, cast

import gmem
from gmem import demo, trace
from gmem._consts import FLAG_MMAP, HUGE_POLICIES, PAGE_SIZE, PRIVATE, SHARED

ARCHS = ("snp", "tdx", "pkvm")


def _shared_in_huge(f: Any) -> int:
    """Shared pages that live in folios of order > 0."""
    folios = f.folios()
    n = 0
    for row in folios[folios["order"] > 0]:
        i = int(row["index"])
        runs = f.attribute_runs(i, i + (1 << int(row["order"])))
        n += int(((runs[:, 1] - runs[:, 0]) * (runs[:, 2] == SHARED)).sum())
    return n


def virtio_churn(
    f: Any, *, queues: int = 4, buffers: int = 64, rounds: int = 8, seed: int = 0
) -> int:
    """Drive ``f`` through the churn; returns the most shared pages seen in huge folios."""
    rng = random.Random(seed)
    block = 1 << max(f.folio_order, 9)
    nr = f.nr_pages
    bases = rng.sample(range(0, nr - block + 1, block), min(queues, nr // block))
    pages = sorted({b + rng.randrange(block) for b in bases for _ in range(buffers // queues)})
    worst = 0
    for _ in range(rounds):
        for i in pages:
            f.guest_write(i, 0x5000 + i)
            f.set_attributes(i, i + 1, SHARED)
        worst = max(worst, _shared_in_huge(f))
        dma = pages[:: max(1, len(pages) // 8)]  # the host pins every eighth buffer
        for i in dma:
            f.host_write(i, 0x6000 + i)
            f.pin(i)
        for i in pages:  # the guest takes the others back while the DMA is in flight
            if i not in dma:
                with contextlib.suppress(gmem.ConversionBusy):  # EAGAIN: retried below
                    f.set_attributes(i, i + 1, PRIVATE)
        for i in dma:
            f.unpin(i)
        for b in bases:  # the rest comes back with its queue (the host unmaps it)
            f.set_attributes(b, b + block, PRIVATE)
    return worst


def _row(
    workload: str,
    policy: str,
    arch: str,
    order: int,
    counts: tuple[dict[str, int], dict[str, int], int],
    worst: int | None,
    seconds: float,
) -> dict[str, Any]:
    """One run's row from (stats, arch stats, violations)."""
    s, a, violations = counts
    return {
        "workload": workload,
        "folio": demo.human_bytes(PAGE_SIZE << order),
        "policy": policy,
        "arch": arch,
        "splits": s["folio_splits"],
        "merges": s["folio_merges"],
        "psmash": a.get("psmash", 0),
        "rmp_2m_restores": a.get("rmp_2m_restores", 0),
        "demotes": a.get("demotes", 0),
        "eagain": s["conversions_busy"],
        "shared_in_huge": worst,
        "hook_ranges": s["hook_ranges"],
        "violations": violations,
        "ms": round(seconds * 1000, 1),
    }


def compare(
    orders: tuple[int, ...] = (9, 18),
    archs: tuple[str, ...] = ARCHS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Both workloads on folios of each order, under both policies and each arch."""
    rows = []
    for order in orders:
        size = 32 * max(1 << order, 512) * PAGE_SIZE  # the demo's smallest guest
        for policy in HUGE_POLICIES:
            for arch in archs:
                if progress:
                    progress(f"{demo.human_bytes(PAGE_SIZE << order)} {policy} {arch}")
                records = trace.iter_records(demo.boot_trace(size, order, seed, policy))
                t0 = time.perf_counter()
                summary = trace.replay(records, arch=arch, hook_design="mainline")
                counts = (summary.stats, summary.arch_stats, len(summary.violations))
                # Shared pages in huge folios are not sampled during a replay: None.
                rows.append(
                    _row("boot", policy, arch, order, counts, None, time.perf_counter() - t0)
                )
                f = gmem.GuestMemfd(
                    size,
                    folio_order=order,
                    flags=FLAG_MMAP,
                    arch=cast(Any, arch),
                    huge_policy=cast(Any, policy),
                )
                t0 = time.perf_counter()
                worst = virtio_churn(f, seed=seed)
                seconds = time.perf_counter() - t0
                counts = (f.stats, f.arch.stats, len(f.check()))
                rows.append(_row("virtio churn", policy, arch, order, counts, worst, seconds))
                f.close()
    return rows


COLUMNS = [
    ("workload", "workload"),
    ("folio", "folio"),
    ("policy", "policy"),
    ("arch", "arch"),
    ("splits", "splits"),
    ("merges", "merges"),
    ("psmash", "PSMASH"),
    ("rmp_2m_restores", "2M restores"),
    ("demotes", "demotes"),
    ("eagain", "EAGAIN"),
    ("shared_in_huge", "shared in huge"),
    ("hook_ranges", "PFN ranges"),
    ("violations", "violations"),
    ("ms", "ms"),
]


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table, one column per COLUMNS entry."""
    widths = [max(len(t), *(len(_cell(r[k])) for r in rows)) for k, t in COLUMNS]
    lines = ["  ".join(t.rjust(w) for (_, t), w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        cells = (_cell(r[k]).rjust(w) for (k, _), w in zip(COLUMNS, widths, strict=True))
        lines.append("  ".join(cells))
    return "\n".join(lines)
