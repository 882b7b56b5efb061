"""Constants shared by the C++ engine's wrapper and the pure-Python reference."""

from __future__ import annotations

from typing import Literal

import numpy as np

PAGE_SIZE = 4096
SHARED = 0
PRIVATE = 1 << 3  # KVM_MEMORY_ATTRIBUTE_PRIVATE
FLAG_MMAP = 1 << 0  # GUEST_MEMFD_FLAG_MMAP
FLAG_INIT_SHARED = 1 << 1  # GUEST_MEMFD_FLAG_INIT_SHARED
FILTER_SHARED = 1  # invalidate_start kinds: KVM_FILTER_SHARED
FILTER_PRIVATE = 2  # KVM_FILTER_PRIVATE
GARBLED = 0x6761726231656421  # what an SNP page reads as after conversion
# Hook config names: the merged kernel's (CONVERT, RECLAIM, INVALIDATE) and the June 2026
# thread's (PREPARE, FREE, FREE_ON_SHARED_CONVERSION); CONVERT and RECLAIM stand for these.
CONFIG_ALIASES = {
    "CONVERT": frozenset({"PREPARE", "FREE_ON_SHARED_CONVERSION"}),
    "RECLAIM": frozenset({"FREE"}),
}
HOOK_CONFIGS = frozenset(
    {
        "CONVERT",
        "RECLAIM",
        "INVALIDATE",
        "POPULATE",
        "PREPARE",
        "FREE",
        "FREE_ON_SHARED_CONVERSION",
    }
)
HOOK_DESIGNS = ("mainline", "split", "overloaded")
HUGE_POLICIES = ("none", "hugetlb")
BUILTIN_ARCHS = ("sw_protected", "snp", "tdx", "pkvm")
# The names GuestMemfd takes, for type checkers.
ArchName = Literal["sw_protected", "snp", "tdx", "pkvm"]
HookDesign = Literal["mainline", "split", "overloaded"]
HugePolicy = Literal["none", "hugetlb"]
MAX_ORDER = 18
FOLIO_BATCH_SIZE = 31  # PAGEVEC_SIZE - 1: folios per filemap_get_folios() batch
NO_PFN = 2**64 - 1  # page_pfns() value for a hole
PFN_LIMIT = 2**52  # PFNs fit in 52 bits (64-bit physical addresses, 4 KiB pages)
FREE_BLOCKS_LISTED = 2**24  # PhysMem.free_blocks() lists at most this many
U64_MAX = 2**64 - 1

# One row of FolioCache.folios() / GuestMemfd.folios(), laid out like the C++ struct.
FOLIO_DTYPE = np.dtype(
    {
        "names": ["index", "order", "pfn", "pins", "mapped", "uptodate"],
        "formats": ["<u8", "u1", "<u8", "<u4", "<u4", "?"],
        "offsets": [0, 8, 16, 24, 28, 32],
        "itemsize": 40,
    }
)
