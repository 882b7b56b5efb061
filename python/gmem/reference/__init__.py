"""gmem.reference: the gmem API in plain Python.

It is written to be read: each class says in a few lines what the kernel does and does
exactly that, with no attention to speed.  The tests use it as the oracle for the C++
engine, and the benchmarks as the baseline the engine is measured against.
"""

from __future__ import annotations

from gmem._consts import (
    FILTER_PRIVATE,
    FILTER_SHARED,
    FLAG_INIT_SHARED,
    FLAG_MMAP,
    FOLIO_BATCH_SIZE,
    FOLIO_DTYPE,
    GARBLED,
    MAX_ORDER,
    NO_PFN,
    PAGE_SIZE,
    PFN_LIMIT,
    PRIVATE,
    SHARED,
)
from gmem.errors import ConversionBusy, GmemError, HWPoison, OutOfMemory, SigBus
from gmem.reference import arch
from gmem.reference.arch import Arch, Violation
from gmem.reference.folio_cache import FolioCache, clamp_folio_ranges
from gmem.reference.guest_memfd import GuestMemfd
from gmem.reference.interval_map import IntervalMap
from gmem.reference.physmem import PhysMem

__all__ = [
    "FILTER_PRIVATE",
    "FILTER_SHARED",
    "FLAG_INIT_SHARED",
    "FLAG_MMAP",
    "FOLIO_BATCH_SIZE",
    "FOLIO_DTYPE",
    "GARBLED",
    "MAX_ORDER",
    "NO_PFN",
    "PAGE_SIZE",
    "PFN_LIMIT",
    "PRIVATE",
    "SHARED",
    "Arch",
    "ConversionBusy",
    "FolioCache",
    "GmemError",
    "GuestMemfd",
    "HWPoison",
    "IntervalMap",
    "OutOfMemory",
    "PhysMem",
    "SigBus",
    "Violation",
    "arch",
    "clamp_folio_ranges",
]
