"""gmem: a userspace model of Linux KVM's guest_memfd.

The engine is C++ (``gmem._core``); :mod:`gmem.reference` implements the same API in
plain Python and is the oracle the tests compare against.
"""

from __future__ import annotations

from gmem import arch, reference
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
    ArchName,
    HookDesign,
    HugePolicy,
)
from gmem._core import (
    Arch,
    FolioCache,
    GuestMemfd,
    IntervalMap,
    PhysMem,
    Violation,
    clamp_folio_ranges,
)
from gmem.arch import AnyArch, BatchedArch, UnusedHookWarning
from gmem.cost import CostModel
from gmem.errors import ConversionBusy, GmemError, HWPoison, OutOfMemory, SigBus

__version__ = "0.1.0"

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
    "AnyArch",
    "Arch",
    "ArchName",
    "BatchedArch",
    "ConversionBusy",
    "CostModel",
    "FolioCache",
    "GmemError",
    "GuestMemfd",
    "HWPoison",
    "HookDesign",
    "HugePolicy",
    "IntervalMap",
    "OutOfMemory",
    "PhysMem",
    "SigBus",
    "UnusedHookWarning",
    "Violation",
    "__version__",
    "arch",
    "clamp_folio_ranges",
    "reference",
]
