"""gmem: a userspace model of Linux KVM's guest_memfd.

The engine is C++ (``gmem._core``); :mod:`gmem.reference` implements the same API in
plain Python and is the oracle the tests compare against.
"""

from __future__ import annotations

from gmem import reference
from gmem._consts import (
    FOLIO_BATCH_SIZE,
    FOLIO_DTYPE,
    MAX_ORDER,
    NO_PFN,
    PAGE_SIZE,
    PFN_LIMIT,
)
from gmem._core import FolioCache, IntervalMap, PhysMem, clamp_folio_ranges
from gmem.errors import GmemError, OutOfMemory

__version__ = "0.1.0"

__all__ = [
    "FOLIO_BATCH_SIZE",
    "FOLIO_DTYPE",
    "MAX_ORDER",
    "NO_PFN",
    "PAGE_SIZE",
    "PFN_LIMIT",
    "FolioCache",
    "GmemError",
    "IntervalMap",
    "OutOfMemory",
    "PhysMem",
    "__version__",
    "clamp_folio_ranges",
    "reference",
]
