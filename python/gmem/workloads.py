"""Realistic guest workloads as conversion traces: what a real guest does to its guest_memfd.

DOC: workloads

Each generator yields trace records (dicts in the JSON Lines format of :mod:`gmem.trace`,
the first one a ``create``), so ``trace.dumps`` writes them, ``trace.replay`` runs them and
``gmem workload NAME --size SIZE`` prints or saves them. A workload is deterministic for
its seed and arch-neutral: no value expectations, and the only ``expect`` lines are errors
that every arch, hook design and huge-folio policy gives alike (a pinned page's EAGAIN).
Every number a workload uses is in the ``SOURCES`` table below with its primary source, or
marked as an assumption; docs/workloads.md in the source tree says the same at length.

The guest's physical memory is the file (one memslot, gfn = index). It is laid out in
*strides* of ``max(2 MiB, folio size)`` so that each kind of shared memory lives in folios
of its own::

    | firmware prefix | kernel | swiotlb ... | rings | DMA | accepted lazily, ballooned ... |
      populate, accept  .bss..decrypted, per-CPU GHCB and steal-time pages (4 KiB)

That keeps the traces replayable under both huge-folio policies: a to-private conversion
never meets a host-mapped page of another range in the folios it touches, except where
the workload means it to (a DMA pin, which is busy at the pinned page under either policy).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from gmem import trace
from gmem._consts import FLAG_MMAP, HUGE_POLICIES, MAX_ORDER, PAGE_SIZE, PRIVATE, SHARED

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HUGE = 2 * MiB // PAGE_SIZE  # a 2 MiB RMP entry / PMD, in pages

# Each number a workload uses: value, and where it comes from ("assumption: ..." where no
# public source gives it). docs/workloads.md cites the same, with links.
SOURCES: dict[str, tuple[Any, str]] = {
    "snp_psc_entries": (
        64,
        "Linux VMGEXIT_PSC_MAX_ENTRY, cut from the GHCB maximum of 253 to 64 by commit "
        "69dcb1e3bbbe (x86/sev: Put PSC struct on the stack, 2023)",
    ),
    "snp_psc_2m_entries": (
        True,
        "commit 15d9088779b8 (x86/sev: Use large PSC requests if applicable): a 2 MiB entry "
        "where the address is 2 MiB aligned and 2 MiB remain",
    ),
    "swiotlb_percent": (
        6,
        "arch/x86/mm/mem_encrypt.c mem_encrypt_setup_arch(): total_mem * 6 / 100, clamped "
        "to IO_TLB_DEFAULT_SIZE (64 MiB)..SZ_1G, for SEV and TDX guests",
    ),
    "arm64_swiotlb": (
        64 * MiB,
        "IO_TLB_DEFAULT_SIZE (include/linux/swiotlb.h); arm64 has no 6 % rule",
    ),
    "firmware_accepted": (
        512 * MiB,
        "edk2 PcdLazyAcceptPartialMemorySize, 512 MB in the IntelTdx build "
        "(kata-containers issue 13535; edk2 PR 3572); SNP: assumption, the same",
    ),
    "firmware_image": (
        4 * MiB,
        "OVMF.inteltdx.fd is 4,194,304 bytes (kata-containers issue 13535), added by "
        "TDH.MEM.PAGE.ADD / SNP LAUNCH_UPDATE (kvm_gmem_populate)",
    ),
    "accept_chunk": (
        4 * MiB,
        "mm/page_alloc.c: unaccepted memory is kept and accepted in MAX_PAGE_ORDER blocks "
        "(4 MiB on x86) by cond_accept_memory() / __accept_page()",
    ),
    "accepted_per_vcpu": (
        53 * MiB,
        "Dstack-TEE/dstack PR 1220: a 248-vCPU TD accepted about 13 GiB during SMP bring-up "
        "(zone watermarks still zero), ~53 MiB per vCPU; SNP: assumption, the same",
    ),
    "bss_decrypted_pages": (4, "assumption: .bss..decrypted holds a few pages (hv_clock, ...)"),
    "percpu_decrypted": (
        3,
        "DEFINE_PER_CPU_DECRYPTED steal_time, apf_reason, kvm_apic_eoi (arch/x86/kernel/"
        "kvm.c), each made shared by sev_map_percpu_data(); one page per CPU is an assumption",
    ),
    "ghcb_per_cpu": (1, "SNP: one GHCB page per CPU, shared (arch/x86/coco/sev: init_ghcb)"),
    "ring_pages_per_vcpu": (4, "assumption: one virtio queue pair per vCPU, 2 pages each ring"),
    "io_rounds": (8, "assumption: rounds of virtio I/O per vCPU in a trace"),
    "pkvm_granule": (
        PAGE_SIZE,
        "pKVM MEM_SHARE/MEM_UNSHARE/MEM_RELINQUISH act on one granule per call, the size "
        "HYP_MEMINFO returns (PAGE_SIZE on a 4 KiB host): drivers/virt/coco/pkvm-guest/"
        "arm-pkvm-guest.c, Documentation/virt/kvm/arm/hypercalls.rst",
    ),
    "balloon_chunk": (
        2 * MiB,
        "free page reporting hands back pageblock_order blocks (PAGE_REPORTING_MIN_ORDER, "
        "2 MiB on x86); virtio-balloon's own 4 KiB pages are the assumption's alternative",
    ),
    "dma_buffers": (4, "assumption: DMA buffer groups a passthrough device keeps pinned"),
    "kexec_request": (
        64 * HUGE,
        "kexec converts each shared run back (commit 3074152e56c9, x86/sev: Convert shared "
        "memory back to private on kexec) in PSC requests of 64 2 MiB entries; the model "
        "converts at least a whole folio per request (departure for folios over 128 MiB)",
    ),
}


def _n(key: str) -> Any:
    return SOURCES[key][0]


def check_size(size: int, folio_order: int, name: str = "size") -> None:
    """Raise ValueError naming what a workload guest size breaks."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{name}: must be an int (bytes), got {type(size).__name__}")
    stride = _stride(folio_order) * PAGE_SIZE
    if size <= 0 or size % stride:
        raise ValueError(
            f"{name}: must be a positive multiple of {stride // KiB:,} KiB (max(2 MiB, folio "
            f"size)), got {size:,} bytes"
        )
    if size < 16 * stride:
        raise ValueError(
            f"{name}: a workload needs at least 16 strides of max(2 MiB, folio size) = "
            f"{16 * stride // MiB:,} MiB, got {size:,} bytes"
        )


def _stride(folio_order: int) -> int:
    return max(HUGE, 1 << folio_order)


def _check(size: int, folio_order: int, huge_policy: str, seed: int, **ints: int) -> None:
    if isinstance(folio_order, bool) or not isinstance(folio_order, int):
        raise TypeError(f"folio_order: must be an int, got {type(folio_order).__name__}")
    if not 0 <= folio_order <= MAX_ORDER:
        raise ValueError(f"folio_order: must be in 0..{MAX_ORDER}, got {folio_order}")
    if huge_policy not in HUGE_POLICIES:
        raise ValueError(f"huge_policy: must be 'none' or 'hugetlb', got {huge_policy!r}")
    if huge_policy == "hugetlb" and folio_order == 0:
        raise ValueError("huge_policy: 'hugetlb' needs folio_order >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
    for key, v in ints.items():
        lo, hi = _LIMITS[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{key}: must be an integer in {lo}..{hi}, got {v!r}")
    check_size(size, folio_order)


# vcpus: .bss..decrypted and the per-CPU pages (2 each) fit in one 2 MiB stride.
_LIMITS = {"vcpus": (1, 254)}


# ---------------------------------------------------------------------------------------
# Records.


def _create(size: int, folio_order: int, huge_policy: str) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "op": "create",
        "version": trace.VERSION,
        "size": size,
        "flags": FLAG_MMAP,
        "folio_order": folio_order,
    }
    if huge_policy != "none":
        rec["huge_policy"] = huge_policy
    return rec


def _set(start: int, end: int, attrs: int) -> dict[str, Any]:
    return {
        "op": "set_attributes",
        "offset": start * PAGE_SIZE,
        "size": (end - start) * PAGE_SIZE,
        "attributes": attrs,
    }


def _op(op: str, index: int, token: int | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"op": op, "index": index}
    if token is not None:
        rec["token"] = token
    return rec


def psc_requests(start: int, end: int, entries: int | None = None) -> Iterator[tuple[int, int]]:
    """The page ranges of the SNP page-state-change requests a Linux guest sends for
    ``[start, end)``: at most ``entries`` entries each (64, VMGEXIT_PSC_MAX_ENTRY), a
    2 MiB entry where the page is 2 MiB aligned and 2 MiB remain, else a 4 KiB one. KVM
    turns the contiguous entries of one request into one KVM_HC_MAP_GPA_RANGE exit, so
    each request is one conversion."""
    entries = _n("snp_psc_entries") if entries is None else entries
    i = start
    while i < end:
        first, n = i, 0
        while i < end and n < entries:
            i += HUGE if i % HUGE == 0 and end - i >= HUGE else 1
            n += 1
        yield first, i


def _touch(start: int, end: int, folio_order: int) -> Iterator[dict[str, Any]]:
    """Guest faults over [start, end): one per folio, and at least one per 2 MiB (the
    guest accepts or validates 2 MiB at a time, and a fault maps at most a folio)."""
    step = min(1 << folio_order, HUGE)
    for i in range(start, end, step):
        yield _op("guest_read", i)


def _snp_psc(start: int, end: int, attrs: int, folio_order: int) -> Iterator[dict[str, Any]]:
    """Page-state changes over [start, end); to private, QEMU pre-faults each request."""
    for s, e in psc_requests(start, end):
        yield _set(s, e, attrs)
        if attrs == PRIVATE:
            yield from _touch(s, e, folio_order)


# ---------------------------------------------------------------------------------------
# The layout shared by the x86 guests.


@dataclass
class Layout:
    """Where a guest's memory goes, in pages (see the module's DOC block)."""

    nr_pages: int
    stride: int
    firmware: int  # populated firmware image [0, firmware)
    prefix: int  # firmware-accepted [0, prefix)
    kernel: int  # .bss..decrypted and per-CPU shared pages: one stride
    swiotlb: tuple[int, int]
    rings: tuple[int, int]
    dma: tuple[int, int]  # coherent DMA buffers, churned one at a time
    free: int  # [free, nr_pages): accepted lazily, ballooned

    @property
    def shared_runs(self) -> list[tuple[int, int]]:
        return [self.swiotlb, self.rings]


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def layout(size: int, folio_order: int, vcpus: int = 4, swiotlb: int | None = None) -> Layout:
    """The guest layout; ``swiotlb`` in bytes (default: the x86 6 % rule)."""
    nr, s = size // PAGE_SIZE, _stride(folio_order)
    if swiotlb is None:
        pct = _n("swiotlb_percent")
        swiotlb = min(max(size * pct // 100, 64 * MiB), 1 * GiB)
    # Toy guests (tests, sweeps from 32 MiB): the swiotlb takes at most an eighth of the
    # guest and the firmware prefix a quarter, so the rest of the layout fits.
    sw = max(HUGE, min(_round_up(swiotlb // PAGE_SIZE, HUGE), (nr // 8) // HUGE * HUGE))
    prefix = max(s, min(_n("firmware_accepted") // PAGE_SIZE, nr // 4) // s * s)
    firmware = min(_n("firmware_image") // PAGE_SIZE, prefix)
    kernel = prefix
    sw_start = kernel + s
    ring_pages = vcpus * _n("ring_pages_per_vcpu")
    rings = sw_start + _round_up(sw, s)
    dma = rings + _round_up(ring_pages, s)
    free = dma + s
    if free + s > nr:
        raise ValueError(f"size: {size:,} bytes is too small for this layout")
    return Layout(
        nr,
        s,
        firmware,
        prefix,
        kernel,
        (sw_start, sw_start + sw),
        (rings, rings + ring_pages),
        (dma, dma + min(s, 64)),
        free,
    )


def _boot_common(
    lay: Layout, folio_order: int, vcpus: int, share: Callable[[int, int], Iterator[Any]]
) -> Iterator[dict[str, Any]]:
    """Accept the kernel's windows (memblock allocations accept what they take), then make
    .bss..decrypted, the per-CPU pages, the swiotlb and the rings shared."""
    for s, e in ((lay.kernel, lay.kernel + lay.stride), (lay.swiotlb[0], lay.dma[0] + lay.stride)):
        yield from _touch(s, e, folio_order)
    k = lay.kernel
    yield from share(k, k + _n("bss_decrypted_pages"))
    percpu = k + _n("bss_decrypted_pages")
    for cpu in range(vcpus):
        page = percpu + 2 * cpu
        for _ in range(_n("percpu_decrypted")):  # one request per variable, one page
            yield from share(page, page + 1)
    yield from share(*lay.swiotlb)
    yield from share(*lay.rings)


def _virtio_io(lay: Layout, vcpus: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Bounce-buffered virtio I/O: the guest fills swiotlb slots, the host (QEMU, through
    its mapping) reads them and writes replies; the rings are read and written too. No
    conversion: that is the point of the swiotlb."""
    s0, s1 = lay.swiotlb
    for r in range(_n("io_rounds")):
        for q in range(vcpus):
            ring = lay.rings[0] + q * _n("ring_pages_per_vcpu")
            slot = rng.randrange(s0, s1)
            yield _op("guest_write", slot, 0x7100_0000 + slot)
            yield _op("host_read", slot)
            yield _op("host_write", ring, 0x7200_0000 + r)
            yield _op("host_write", slot, 0x7300_0000 + slot)
            yield _op("guest_read", slot)


def _dma_churn(
    lay: Layout, rounds: int, share: Callable[[int, int, int], Iterator[Any]], rng: random.Random
) -> Iterator[dict[str, Any]]:
    """dma_alloc_coherent()/dma_free_coherent(): a buffer made shared, used by the host,
    made private again; one at a time, so no other mapped page shares its folios."""
    d0, d1 = lay.dma
    for _ in range(rounds):
        n = rng.choice((1, 1, 2, 4))
        b = rng.randrange(d0, d1 - n + 1)
        yield from share(b, b + n, SHARED)
        yield _op("host_write", b, 0x7400_0000 + b)
        yield from share(b, b + n, PRIVATE)


def _lazy_accept(
    lay: Layout,
    nbytes: int,
    folio_order: int,
    before: Callable[[int, int], Iterator[Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """The guest accepts ``nbytes`` of the unaccepted memory, 4 MiB at a time, from the
    start of the free area (the allocator takes the unaccepted list in order)."""
    chunk = _n("accept_chunk") // PAGE_SIZE
    end = min(lay.nr_pages, lay.free + _round_up(nbytes // PAGE_SIZE, chunk))
    for s in range(lay.free, end, chunk):
        e = min(s + chunk, end)
        if before is not None:
            yield from before(s, e)
        yield from _touch(s, e, folio_order)


def _kexec_back(lay: Layout, runs: list[tuple[int, int]]) -> Iterator[dict[str, Any]]:
    """Every shared run back to private, in requests of 64 2 MiB entries (at least a
    folio each, see SOURCES["kexec_request"])."""
    step = max(_n("kexec_request"), lay.stride)
    for s, e in runs:
        for i in range(s, e, step):
            yield _set(i, min(i + step, e), PRIVATE)


def _end() -> Iterator[dict[str, Any]]:
    yield {"op": "check"}
    yield {"op": "close"}


# ---------------------------------------------------------------------------------------
# The workloads.


def snp_boot(
    size: int,
    *,
    vcpus: int = 4,
    seed: int = 0,
    folio_order: int = 9,
    huge_policy: str = "none",
) -> Iterator[dict[str, Any]]:
    """A Linux SEV-SNP guest boots: LAUNCH_UPDATE of the firmware image, firmware-validated
    low memory, .bss..decrypted, per-CPU GHCB and steal-time pages and the swiotlb made
    shared in page-state-change requests (<= 64 entries, 2 MiB where aligned), lazy
    acceptance in 4 MiB chunks (each a PSC to private that QEMU pre-faults), then virtio
    I/O through the swiotlb and coherent DMA churn."""
    _check(size, folio_order, huge_policy, seed, vcpus=vcpus)
    return _snp_boot(size, vcpus, seed, folio_order, huge_policy)


def _snp_boot(
    size: int, vcpus: int, seed: int, folio_order: int, huge_policy: str
) -> Iterator[dict[str, Any]]:
    lay, rng = layout(size, folio_order, vcpus), random.Random(seed)

    def share(s: int, e: int, attrs: int = SHARED) -> Iterator[dict[str, Any]]:
        return _snp_psc(s, e, attrs, folio_order)

    yield _create(size, folio_order, huge_policy)
    for i in range(lay.firmware):  # SNP_LAUNCH_UPDATE
        yield _op("populate", i, 0x5000_0000 + i)
    yield from _snp_psc(0, lay.prefix, PRIVATE, folio_order)  # OVMF validates low memory
    yield from _boot_common(lay, folio_order, vcpus, share)
    per_vcpu = _n("accepted_per_vcpu")
    yield from _lazy_accept(lay, vcpus * per_vcpu, folio_order, lambda s, e: share(s, e, PRIVATE))
    yield from _virtio_io(lay, vcpus, rng)
    yield from _dma_churn(lay, 4 * vcpus, share, rng)
    yield from _end()


def tdx_boot(
    size: int,
    *,
    vcpus: int = 4,
    lazy: bool = True,
    seed: int = 0,
    folio_order: int = 9,
    huge_policy: str = "none",
) -> Iterator[dict[str, Any]]:
    """A Linux TD boots: TDH.MEM.PAGE.ADD of the firmware image, the firmware accepts a
    prefix, Linux accepts the rest in 4 MiB chunks as it allocates (about 53 MiB per vCPU
    during SMP bring-up) or, with ``lazy=False``, all of it at boot; each accept is a
    fault (TD exit + PAGE.AUG). Shared ranges (MapGPA: one conversion each), virtio I/O
    through the swiotlb and coherent DMA churn follow."""
    if not isinstance(lazy, bool):
        raise TypeError(f"lazy: must be a bool, got {type(lazy).__name__}")
    _check(size, folio_order, huge_policy, seed, vcpus=vcpus)
    return _tdx_boot(size, vcpus, lazy, seed, folio_order, huge_policy)


def _tdx_boot(
    size: int, vcpus: int, lazy: bool, seed: int, folio_order: int, huge_policy: str
) -> Iterator[dict[str, Any]]:
    lay, rng = layout(size, folio_order, vcpus), random.Random(seed)

    def share(s: int, e: int, attrs: int = SHARED) -> Iterator[dict[str, Any]]:
        yield _set(s, e, attrs)

    yield _create(size, folio_order, huge_policy)
    for i in range(lay.firmware):  # TDH.MEM.PAGE.ADD
        yield _op("populate", i, 0x5000_0000 + i)
    yield from _touch(0, lay.prefix, folio_order)  # TDVF accepts the prefix
    yield from _boot_common(lay, folio_order, vcpus, share)
    rest = (lay.nr_pages - lay.free) * PAGE_SIZE
    nbytes = vcpus * _n("accepted_per_vcpu") if lazy else rest
    yield from _lazy_accept(lay, nbytes, folio_order)
    yield from _virtio_io(lay, vcpus, rng)
    yield from _dma_churn(lay, 4 * vcpus, share, rng)
    yield from _end()


def pkvm_share(
    size: int, *, seed: int = 0, folio_order: int = 9, huge_policy: str = "none"
) -> Iterator[dict[str, Any]]:
    """A protected VM under pKVM: the guest shares and unshares memory one granule per
    hypercall (MEM_SHARE / MEM_UNSHARE, each one conversion): its 64 MiB swiotlb, virtio
    buffers it fills and shares in place (the host reads them), coherent DMA churn, and
    balloon pages given back with MEM_RELINQUISH (the VMM punches them out) and later
    faulted in again."""
    _check(size, folio_order, huge_policy, seed)
    return _pkvm_share(size, seed, folio_order, huge_policy)


def _pkvm_share(
    size: int, seed: int, folio_order: int, huge_policy: str
) -> Iterator[dict[str, Any]]:
    lay, rng = layout(size, folio_order, 1, swiotlb=_n("arm64_swiotlb")), random.Random(seed)
    g = _n("pkvm_granule") // PAGE_SIZE

    def share(s: int, e: int, attrs: int = SHARED) -> Iterator[dict[str, Any]]:
        for i in range(s, e, g):  # one hypercall, one conversion, per granule
            yield _set(i, min(i + g, e), attrs)

    yield _create(size, folio_order, huge_policy)
    for i in range(lay.firmware):  # pvmfw and the kernel image, loaded before boot
        yield _op("populate", i, 0x5000_0000 + i)
    yield from _touch(0, lay.prefix, folio_order)
    yield from _touch(lay.swiotlb[0], lay.dma[0] + lay.stride, folio_order)
    yield from share(*lay.swiotlb)
    yield from share(*lay.rings)
    # Share in place: the guest writes a request into a buffer of its own, shares it,
    # the host reads it (the data must still be there), then the guest takes it back.
    d0, d1 = lay.dma
    for r in range(_n("io_rounds")):
        b = rng.randrange(d0, d1)
        yield _op("guest_write", b, 0x7500_0000 + r)
        yield from share(b, b + 1)
        yield _op("host_read", b)
        yield from share(b, b + 1, PRIVATE)
    yield from _virtio_io(lay, 1, rng)
    yield from _dma_churn(lay, 8, share, rng)
    # Balloon: relinquish granules of the free area (the VMM punches each out), then the
    # guest deflates and faults them in again.
    yield from _touch(lay.free, lay.nr_pages, folio_order)
    pages = sorted(rng.sample(range(lay.free, lay.nr_pages, g), min(64, lay.nr_pages - lay.free)))
    for i in pages:
        yield {"op": "punch_hole", "offset": i * PAGE_SIZE, "len": g * PAGE_SIZE}
    for i in pages[::2]:
        yield _op("guest_write", i, 0x7600_0000 + i)
    yield from _end()


def balloon(
    size: int,
    *,
    fraction: float = 0.25,
    seed: int = 0,
    folio_order: int = 9,
    huge_policy: str = "none",
) -> Iterator[dict[str, Any]]:
    """A booted guest balloons ``fraction`` of its free memory out in 2 MiB blocks (free
    page reporting order): each block private -> shared, then the VMM punches the hole;
    then it deflates half of them: to private again and faulted in."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"fraction: must be a number in 0..1, got {type(fraction).__name__}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: must be in 0..1, got {fraction!r}")
    _check(size, folio_order, huge_policy, seed)
    return _balloon(size, float(fraction), seed, folio_order, huge_policy)


def _balloon(
    size: int, fraction: float, seed: int, folio_order: int, huge_policy: str
) -> Iterator[dict[str, Any]]:
    lay, rng = layout(size, folio_order), random.Random(seed)
    chunk = _n("balloon_chunk") // PAGE_SIZE
    yield _create(size, folio_order, huge_policy)
    yield from _touch(0, lay.nr_pages, folio_order)  # a booted, fully accepted guest
    blocks = list(range(lay.free, lay.nr_pages - chunk + 1, chunk))
    out = sorted(rng.sample(blocks, round(len(blocks) * fraction)))
    for b in out:
        yield _set(b, b + chunk, SHARED)
        yield {"op": "punch_hole", "offset": b * PAGE_SIZE, "len": chunk * PAGE_SIZE}
    for b in out[::2]:
        yield _set(b, b + chunk, PRIVATE)
        yield from _touch(b, b + chunk, folio_order)
    yield from _end()


def passthrough(
    size: int, *, seed: int = 0, folio_order: int = 9, huge_policy: str = "none"
) -> Iterator[dict[str, Any]]:
    """A device passed through to the guest DMAs into shared buffers that the VMM pins
    (VFIO): while a buffer group's first page is pinned, taking the group back to private
    fails with EAGAIN (ConversionBusy at that page, under every arch, design and policy);
    after the unpin the retry succeeds."""
    _check(size, folio_order, huge_policy, seed)
    return _passthrough(size, seed, folio_order, huge_policy)


def _passthrough(
    size: int, seed: int, folio_order: int, huge_policy: str
) -> Iterator[dict[str, Any]]:
    lay, rng = layout(size, folio_order), random.Random(seed)
    yield _create(size, folio_order, huge_policy)
    yield from _touch(0, lay.nr_pages, folio_order)
    # Each group a stride of its own, so no other group's mapped page shares its folios.
    strides = list(range(lay.free, lay.nr_pages - lay.stride + 1, lay.stride))
    groups = sorted(rng.sample(strides, min(_n("dma_buffers"), len(strides))))
    for rnd in range(2):
        for g in groups:
            n = rng.choice((1, 8, 64))
            yield _set(g, g + n, SHARED)
            yield _op("pin", g)
            yield _op("host_write", g, 0x7700_0000 + rnd)
            if n > 1:
                yield _op("host_write", g + n - 1, 0x7800_0000 + rnd)
            yield _set(g, g + n, PRIVATE)  # the guest wants it back while the DMA runs
            yield {"op": "expect", "error": "ConversionBusy", "error_offset": g * PAGE_SIZE}
            yield _op("unpin", g)
            yield _set(g, g + n, PRIVATE)
            yield _op("guest_write", g, 0x7900_0000 + rnd)
    yield from _end()


def kexec(
    size: int, *, seed: int = 0, folio_order: int = 9, huge_policy: str = "none"
) -> Iterator[dict[str, Any]]:
    """An SNP guest that has booted and done I/O kexecs into a new kernel: before the
    jump every shared page is converted back to private (per-CPU pages one by one, the
    swiotlb and rings in requests of 64 2 MiB entries); the new kernel then touches its
    memory again."""
    _check(size, folio_order, huge_policy, seed)
    return _kexec(size, seed, folio_order, huge_policy)


def _kexec(size: int, seed: int, folio_order: int, huge_policy: str) -> Iterator[dict[str, Any]]:
    vcpus = 4
    lay, rng = layout(size, folio_order, vcpus), random.Random(seed)

    def share(s: int, e: int, attrs: int = SHARED) -> Iterator[dict[str, Any]]:
        return _snp_psc(s, e, attrs, folio_order)

    yield _create(size, folio_order, huge_policy)
    yield from _touch(0, lay.prefix, folio_order)
    yield from _boot_common(lay, folio_order, vcpus, share)
    yield from _virtio_io(lay, vcpus, rng)
    # unshare_all_memory(): the 4 KiB shared pages one by one, then the big runs.
    k, bss = lay.kernel, _n("bss_decrypted_pages")
    for i in [*range(k, k + bss), *(k + bss + 2 * c for c in range(vcpus))]:
        yield _set(i, i + 1, PRIVATE)
    yield from _kexec_back(lay, lay.shared_runs)
    yield from _touch(0, lay.prefix, folio_order)  # the new kernel runs
    yield from _end()


WORKLOADS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "snp_boot": snp_boot,
    "tdx_boot": tdx_boot,
    "pkvm_share": pkvm_share,
    "balloon": balloon,
    "passthrough": passthrough,
    "kexec": kexec,
}


def generate(name: str, size: int, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """The records of workload ``name`` (one of WORKLOADS)."""
    if name not in WORKLOADS:
        raise ValueError(f"name: unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[name](size, **kwargs)


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What a workload's records do, counted: operations by op, conversions and pages
    made shared or private, expected errors."""
    ops: dict[str, int] = {}
    pages = {"to_shared": 0, "to_private": 0}
    create: dict[str, Any] = {}
    for r in records:
        op = r["op"]
        if op == "create":
            create = r
            continue
        ops[op] = ops.get(op, 0) + 1
        if op == "set_attributes":
            key = "to_private" if r["attributes"] == PRIVATE else "to_shared"
            pages[key] += r["size"] // PAGE_SIZE
    return {
        "size": create.get("size", 0),
        "folio_order": create.get("folio_order", 0),
        "huge_policy": create.get("huge_policy", "none"),
        "operations": sum(n for op, n in ops.items() if op != "expect"),
        "ops": dict(sorted(ops.items())),
        "pages_to_shared": pages["to_shared"],
        "pages_to_private": pages["to_private"],
        "expected_errors": ops.get("expect", 0),
    }
