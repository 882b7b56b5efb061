"""gmem.reference: the gmem API in plain Python.

It is written to be read: each class says in a few lines what the kernel does and does
exactly that, with no attention to speed.  The tests use it as the oracle for the C++
engine, and the benchmarks as the baseline the engine is measured against.
"""

from __future__ import annotations

from gmem._consts import FOLIO_BATCH_SIZE, FOLIO_DTYPE, MAX_ORDER, NO_PFN, PAGE_SIZE, PFN_LIMIT
from gmem.errors import GmemError, OutOfMemory
from gmem.reference.folio_cache import FolioCache, clamp_folio_ranges
from gmem.reference.interval_map import IntervalMap
from gmem.reference.physmem import PhysMem

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
    "clamp_folio_ranges",
]
