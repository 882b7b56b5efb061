"""GuestMemfd, the reference: one guest_memfd file, in plain Python.

This follows csrc/gmem/guest_memfd.cpp step for step (and docs/model.md): every
operation validates its arguments and checks every failure condition before it changes
anything, then runs the kernel's steps in order, calling the arch hooks at the kernel's
points.  Hooks run after the point of no return; an exception from one is recorded as a
violation and re-raised when the operation has completed.
"""

from __future__ import annotations

import warnings
from bisect import bisect_left, insort
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from gmem._consts import (
    BUILTIN_ARCHS,
    FILTER_PRIVATE,
    FILTER_SHARED,
    FLAG_INIT_SHARED,
    FLAG_MMAP,
    FOLIO_BATCH_SIZE,
    GARBLED,
    HOOK_DESIGNS,
    HUGE_POLICIES,
    MAX_ORDER,
    PAGE_SIZE,
    PRIVATE,
    SHARED,
)
from gmem.errors import ConversionBusy, HWPoison, OutOfMemory, SigBus
from gmem.reference._args import (
    SMALL_REQUEST,
    check_start_end,
    end_arg,
    host_memory_available,
    index_list,
    order_arg,
    out_rows,
    u64,
)
from gmem.reference._config import config_for, config_names
from gmem.reference.arch import PKVM, SNP, TDX, Arch, SwProtected, Violation
from gmem.reference.folio_cache import Folio, FolioCache, folio_rows, ranges_array
from gmem.reference.interval_map import IntervalMap
from gmem.reference.physmem import PhysMem

RELEASE_CHUNK = 65536  # folios a punch takes out of the page cache at a time

STAT_KEYS = (
    "folios_allocated",
    "folios_freed",
    "pages_zeroed",
    "conversions",
    "conversions_noop",
    "conversions_busy",
    "pages_converted",
    "invalidations",
    "prepare_calls",
    "make_shared_calls",
    "free_calls",
    "hook_ranges",
    "invalidate_range_calls",
    "pages_populated",
    "memory_failures",
    "folio_splits",
    "folio_merges",
    "merges_blocked",
    "pages_punched_zeroed",
)


HOOK_NAMES = (
    "make_private",
    "prepare",
    "make_shared",
    "reclaim",
    "free_folio",
    "invalidate_range",
    "invalidate_start",
    "invalidate_end",
    "post_populate",
)


def _arch_attr(arch: Arch, name: str) -> Any:
    """An attribute of a user's arch; what reading it raises is a TypeError naming it."""
    try:
        return getattr(arch, name)
    except Exception as exc:
        raise TypeError(f"{name}: reading it raised {type(exc).__name__}: {exc}") from exc


def _make_arch(arch: Any) -> Arch:
    if isinstance(arch, str):
        builtins: dict[str, type[Arch]] = dict(
            zip(BUILTIN_ARCHS, (SwProtected, SNP, TDX, PKVM), strict=True)
        )
        if arch not in builtins:
            raise ValueError(
                f"arch: unknown arch '{arch}'; allowed: sw_protected, snp, tdx, pkvm, "
                "or a gmem.reference.Arch"
            )
        return builtins[arch]()
    if not isinstance(arch, Arch):
        raise TypeError(f"arch: must be a name or a gmem.Arch, got {type(arch).__name__}")
    if arch.file is not None:
        raise ValueError("arch: this Arch already serves another file; create one per file")
    return arch


def _erase_ranges(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Disjoint sorted ranges without [start, end)."""
    return [
        (a, b) for lo, hi in ranges for a, b in ((lo, min(hi, start)), (max(lo, end), hi)) if a < b
    ]


def _merge_range(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Disjoint sorted ranges with [start, end) added, touching ranges joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted([*ranges, (start, end)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _covered(ranges: list[tuple[int, int]], start: int, end: int) -> int:
    """Pages of [start, end) that disjoint ranges cover."""
    return sum(max(0, min(end, b) - max(start, a)) for a, b in ranges)


class GuestMemfd:
    def __init__(
        self,
        size_bytes: Any,
        *,
        flags: Any = 0,
        folio_order: Any = 0,
        physmem: PhysMem | None = None,
        arch: Any = "sw_protected",
        hook_design: Any = "mainline",
        huge_policy: Any = "none",
    ) -> None:
        size, fl = u64(size_bytes, "size_bytes"), u64(flags, "flags")
        order = order_arg(folio_order, "folio_order")
        if physmem is not None and not isinstance(physmem, PhysMem):
            raise TypeError("physmem: must be a gmem.reference.PhysMem or None")
        if not isinstance(hook_design, str):
            raise TypeError("hook_design: must be 'mainline', 'split' or 'overloaded'")
        if hook_design not in HOOK_DESIGNS:
            raise ValueError(
                f"hook_design: must be 'mainline', 'split' or 'overloaded', got '{hook_design}'"
            )
        if not isinstance(huge_policy, str):
            raise TypeError("huge_policy: must be 'none' or 'hugetlb'")
        if huge_policy not in HUGE_POLICIES:
            raise ValueError(f"huge_policy: must be 'none' or 'hugetlb', got '{huge_policy}'")
        a = _make_arch(arch)
        config = config_names(_arch_attr(a, "config"))
        batched = _arch_attr(a, "batched")
        if not isinstance(batched, int):
            raise TypeError(f"batched: must be a bool, got {type(batched).__name__}")
        for hook in HOOK_NAMES:
            fn = _arch_attr(a, hook)
            if not callable(fn):
                raise TypeError(f"{hook}: must be a method, got {type(fn).__name__}")
        if size == 0:
            raise ValueError("size: must be > 0")
        if size % PAGE_SIZE:
            raise ValueError(f"size: must be a multiple of PAGE_SIZE (4096), got {size}")
        if fl & ~(FLAG_MMAP | FLAG_INIT_SHARED):
            raise ValueError(
                f"flags: unknown bits {fl & ~3:#x}; allowed: FLAG_MMAP (1) | FLAG_INIT_SHARED (2)"
            )
        if huge_policy == "hugetlb":
            if order == 0:
                raise ValueError(
                    "folio_order: huge_policy 'hugetlb' needs huge folios: must be in 1..18, got 0"
                )
            if size % (PAGE_SIZE << order):
                raise ValueError(
                    "size: under huge_policy 'hugetlb' must be a multiple of the folio size "
                    f"({PAGE_SIZE << order} bytes), got {size}"
                )
        self._nr_pages = size // PAGE_SIZE
        self._flags, self._folio_order, self._design = fl, order, hook_design
        self._policy = huge_policy
        self._punched: list[tuple[int, int]] = []  # "hugetlb": pages punched but kept
        self._config, self._batched = config, bool(batched)
        if physmem is None:
            if self._nr_pages > 1 << 40:
                raise ValueError(
                    f"physmem: a file of {self._nr_pages} pages needs an explicit PhysMem "
                    "(the default one is the file's size, up to 2**40 pages)"
                )
            nr = 1 << order
            physmem = PhysMem((self._nr_pages + nr - 1) // nr * nr)
        self._pm = physmem
        self._arch = a
        self._attrs = IntervalMap(self._nr_pages, SHARED if fl & FLAG_INIT_SHARED else PRIVATE)
        self._expected = IntervalMap(self._nr_pages)  # contents each index should hold
        self._cache = FolioCache()
        self._pins: dict[int, int] = {}  # pfn -> pin count
        self._mapped: list[int] = []  # sorted host-mapped indexes
        self._orphans: dict[int, int] = {}  # pfn -> order: punched out while pinned
        self._poisoned: list[tuple[int, int]] = []  # file pages of poisoned folios
        self._violations: list[Violation] = []
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self._closed = False
        self._in_operation = False
        self._pending: BaseException | None = None
        a.file = self

    # ---- properties -------------------------------------------------------------
    size = property(lambda self: self._nr_pages * PAGE_SIZE)
    nr_pages = property(lambda self: self._nr_pages)
    flags = property(lambda self: self._flags)
    folio_order = property(lambda self: self._folio_order)
    closed = property(lambda self: self._closed)
    hook_design = property(lambda self: self._design)
    huge_policy = property(lambda self: self._policy)
    config = property(lambda self: config_for(self._config, self._design))
    arch = property(lambda self: self._arch)
    physmem = property(lambda self: self._pm)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    # ---- plumbing ---------------------------------------------------------------
    def _operation(self, fn: Callable[[], Any]) -> Any:
        """Run a changing operation: refuse re-entry from a hook, re-raise a hook's error."""
        if self._in_operation:
            raise RuntimeError("an arch hook may read the file it serves, not change it")
        self._in_operation = True
        # The arch's own models reach the file through it during the operation, even when
        # the garbage collector is closing a file nothing refers to any more.
        outer, self._arch._op_file = self._arch._op_file, self
        try:
            result = fn()
        except BaseException:
            self._pending = None
            raise
        finally:
            self._in_operation = False
            self._arch._op_file = outer
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc
        return result

    # The hooks' names in the vocabulary of the file's design, for logs and violations.
    _THREAD_NAMES: ClassVar[dict[str, str]] = {"make_private": "prepare", "reclaim": "free_folio"}

    def _label(self, name: str) -> str:
        return name if self._design == "mainline" else self._THREAD_NAMES.get(name, name)

    def _invalidate_begin(self, start: int, end: int, kinds: int) -> None:
        """invalidate_start; under "mainline", invalidate_range right after (INVALIDATE)."""
        self._stats["invalidations"] += 1
        self._hook("invalidate_start", start, end, kinds)
        if self._design == "mainline" and "INVALIDATE" in self._config:
            self._stats["invalidate_range_calls"] += 1
            self._hook("invalidate_range", start, end, kinds)

    def _hook(self, name: str, *args: Any) -> None:
        try:
            method = getattr(self._arch, name)
            thread_name = self._THREAD_NAMES.get(name)
            if thread_name and getattr(type(self._arch), name, None) is getattr(Arch, name):
                method = getattr(self._arch, thread_name)  # the class defines the old name
            if getattr(method, "__module__", None) != Arch.__module__:
                self._arch.contents_touched = True  # a user's hook may write pages
            if not callable(method):
                raise TypeError(f"{name} is not callable (it is {type(method).__name__})")
            method(*args)
        except Exception as exc:
            self._violations.append(
                Violation(
                    self._arch.name,
                    "hook-raised",
                    None,
                    None,
                    f"{self._label(name)} raised {type(exc).__name__}: {exc}",
                )
            )
            if self._pending is None:
                self._pending = exc

    def _ranges_hook(self, name: str, ranges: list[tuple[int, int]]) -> None:
        if self._batched:
            self._hook(name, ranges_array(ranges))
        else:
            for s, e in ranges:
                self._hook(name, s, e)

    def _violation(self, rule: str, index: int | None, pfn: int | None, detail: str) -> Violation:
        return Violation(self._arch.name, rule, index, pfn, detail)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("self: operation on a closed guest_memfd")

    def _check_index(self, index: int) -> None:
        if index >= self._nr_pages:
            raise ValueError(f"index: must be < nr_pages ({self._nr_pages}), got {index}")

    def _check_range(self, start: int, end: int) -> None:
        if start >= end:
            raise ValueError(f"start: must be < end, got start={start} end={end}")
        if end > self._nr_pages:
            raise ValueError(f"end: must be <= nr_pages ({self._nr_pages}), got {end}")

    def _pins_in(self, pfn: int, nr: int) -> int:
        return sum(c for p, c in self._pins.items() if pfn <= p < pfn + nr)

    def _mapped_in(self, start: int, end: int) -> int:
        if start >= end:
            return 0
        return bisect_left(self._mapped, end) - bisect_left(self._mapped, start)

    def _unmap(self, start: int, end: int) -> None:
        del self._mapped[bisect_left(self._mapped, start) : bisect_left(self._mapped, end)]

    # ---- allocation and faults --------------------------------------------------
    def _alloc_folio(self, index: int) -> Folio | None:
        """The folio for the hole at index: folio_order, or the largest order that fits
        (under "hugetlb" the huge page only, split at once if a page of it is shared)."""
        lowest = self._folio_order if self._policy == "hugetlb" else 0
        for order in range(self._folio_order, lowest - 1, -1):
            block = index & ~((1 << order) - 1)
            if block + (1 << order) > self._nr_pages or self._cache.overlapping(
                block, block + (1 << order)
            ):
                continue
            pfn = self._pm._try_alloc(order)
            if pfn is not None:
                folio = Folio(block, order, pfn)
                self._cache.insert(folio)
                self._split_if_shared(folio)
                self._stats["folios_allocated"] += 1
                return folio
        return None

    def _fault_in(self, index: int) -> Folio:
        folio = self._cache.lookup_folio(index)
        if folio is None:
            folio = self._alloc_folio(index)
            if folio is None:
                raise OutOfMemory(f"guest_memfd: no free page for index {index}")
            folio = self._cache.lookup_folio(index)  # it may have been split
            assert folio is not None
        return folio

    def _zero_folio(self, f: Folio) -> None:
        """First touch: zero the folio and mark it uptodate."""
        if f.uptodate:
            return
        self._pm.fill(f.pfn, f.nr_pages, 0)
        f.uptodate = True
        self._expected.store(f.index, f.end, 0)
        self._stats["pages_zeroed"] += f.nr_pages

    def _max_order(self, f: Folio, index: int) -> tuple[int, int]:
        """(order, block): the largest aligned block around index in f of one attribute."""
        value = self._attrs.load(index)
        for order in range(f.order, 0, -1):
            block = index & ~((1 << order) - 1)
            if self._attrs.range_has(block, block + (1 << order), value):
                return order, block
        return 0, index

    def _check_poison(self, index: int) -> None:
        for start, end in self._poisoned:
            if start <= index < end:
                raise HWPoison(
                    f"index {index}: the folio had a memory failure (EHWPOISON); punch it out",
                    index,
                )

    def _get_pfn(self, index: int) -> tuple[int, int]:
        self._check_open()
        self._check_index(index)
        self._check_poison(index)
        f = self._fault_in(index)
        self._zero_folio(f)
        self._touch(index, index + 1)
        order, block = self._max_order(f, index)
        private = bool(self._attrs.load(index) & PRIVATE)
        block_pfn = f.file_pfn(block)
        self._arch._guest_mapped(block, block_pfn, 1 << order, private)
        if private and "PREPARE" in self._config:
            self._stats["prepare_calls"] += 1
            self._hook("make_private", block, block_pfn, 1 << order)
        return f.file_pfn(index), order

    def _host_fault(self, index: int) -> int:
        self._check_open()
        if index >= self._nr_pages:
            raise SigBus(
                f"host fault at index {index}: at or past the end of the file "
                f"({self._nr_pages} pages)",
                index,
            )
        if not self._flags & FLAG_MMAP:
            raise SigBus(
                f"host fault at index {index}: the file was created without FLAG_MMAP", index
            )
        if self._attrs.load(index) & PRIVATE:
            raise SigBus(f"host fault at index {index}: the page is private", index)
        self._check_poison(index)
        f = self._fault_in(index)
        self._zero_folio(f)
        self._touch(index, index + 1)
        if index not in self._mapped:
            insort(self._mapped, index)
        return f.file_pfn(index)

    def get_pfn(self, index: Any) -> tuple[int, int]:
        i = u64(index, "index")
        result: tuple[int, int] = self._operation(lambda: self._get_pfn(i))
        return result

    def host_fault(self, index: Any) -> int:
        i = u64(index, "index")
        result: int = self._operation(lambda: self._host_fault(i))
        return result

    def guest_read(self, index: Any) -> int:
        i = u64(index, "index")
        result: int = self._operation(lambda: self._pm.read(self._get_pfn(i)[0]))
        return result

    def guest_write(self, index: Any, token: Any) -> None:
        i, t = u64(index, "index"), u64(token, "token")

        def write() -> None:
            self._pm.write(self._get_pfn(i)[0], t)
            self._expected.store(i, i + 1, t)

        self._operation(write)

    def host_read(self, index: Any) -> int:
        i = u64(index, "index")
        result: int = self._operation(lambda: self._pm.read(self._host_fault(i)))
        return result

    def host_write(self, index: Any, token: Any) -> None:
        i, t = u64(index, "index"), u64(token, "token")

        def write() -> None:
            self._pm.write(self._host_fault(i), t)
            self._expected.store(i, i + 1, t)

        self._operation(write)

    # ---- bulk forms ------------------------------------------------------------------
    # Element k has exactly the effect of the single call on element k, in order.  What a
    # failing element raises (its own error; a hook's, after its element completed) carries
    # ``completed``: the elements done before the call stopped, which stay applied.

    def _bulk(self, n: int, element: Callable[[int], None]) -> None:
        done = 0

        def run() -> None:
            nonlocal done
            self._check_open()  # a closed file refuses even an empty batch
            while done < n:
                element(done)
                done += 1
                if self._pending is not None:  # a hook raised: the single call would have
                    return

        try:
            self._operation(run)
        except BaseException as exc:
            exc.completed = done  # type: ignore[attr-defined]
            raise

    def _indexes_and_tokens(self, indexes: Any, tokens: Any) -> tuple[list[int], list[int]]:
        idx, tok = index_list(indexes, "indexes"), index_list(tokens, "tokens")
        if len(tok) != len(idx):
            raise ValueError(
                f"tokens: indexes and tokens must have one length, got {len(idx)} and {len(tok)}"
            )
        return idx, tok

    def get_pfns(self, indexes: Any) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint8]]:
        idx = index_list(indexes, "indexes")
        pfns, orders = np.zeros(len(idx), dtype=np.uint64), np.zeros(len(idx), dtype=np.uint8)

        def element(k: int) -> None:
            pfns[k], orders[k] = self._get_pfn(idx[k])

        self._bulk(len(idx), element)
        return pfns, orders

    def guest_read_many(self, indexes: Any) -> npt.NDArray[np.uint64]:
        idx = index_list(indexes, "indexes")
        out = np.zeros(len(idx), dtype=np.uint64)

        def element(k: int) -> None:
            out[k] = self._pm.read(self._get_pfn(idx[k])[0])

        self._bulk(len(idx), element)
        return out

    def guest_write_many(self, indexes: Any, tokens: Any) -> None:
        idx, tok = self._indexes_and_tokens(indexes, tokens)

        def element(k: int) -> None:
            self._pm.write(self._get_pfn(idx[k])[0], tok[k])
            self._expected.store(idx[k], idx[k] + 1, tok[k])

        self._bulk(len(idx), element)

    def host_read_many(self, indexes: Any) -> npt.NDArray[np.uint64]:
        idx = index_list(indexes, "indexes")
        out = np.zeros(len(idx), dtype=np.uint64)

        def element(k: int) -> None:
            out[k] = self._pm.read(self._host_fault(idx[k]))

        self._bulk(len(idx), element)
        return out

    def host_write_many(self, indexes: Any, tokens: Any) -> None:
        idx, tok = self._indexes_and_tokens(indexes, tokens)

        def element(k: int) -> None:
            self._pm.write(self._host_fault(idx[k]), tok[k])
            self._expected.store(idx[k], idx[k] + 1, tok[k])

        self._bulk(len(idx), element)

    def set_attributes_many(self, starts: Any, ends: Any, attrs: Any) -> None:
        s, e, a = index_list(starts, "starts"), index_list(ends, "ends"), index_list(attrs, "attrs")
        if not len(s) == len(e) == len(a):
            raise ValueError(
                f"ends: starts, ends and attrs must have one length, got {len(s)}, {len(e)}, "
                f"{len(a)}"
            )
        self._bulk(len(s), lambda k: self._set_attributes(s[k], e[k], a[k]))

    def pin(self, index: Any) -> int:
        i = u64(index, "index")

        def pin() -> int:
            pfn = self._host_fault(i)
            self._pins[pfn] = self._pins.get(pfn, 0) + 1
            return pfn

        result: int = self._operation(pin)
        return result

    def unpin(self, index: Any) -> None:
        i = u64(index, "index")

        def unpin() -> None:
            self._check_open()
            self._check_index(i)
            f = self._cache.lookup_folio(i)
            if f is None or f.file_pfn(i) not in self._pins:
                raise ValueError(f"index: page {i} is not pinned")
            pfn = f.file_pfn(i)
            self._pins[pfn] -= 1
            if not self._pins[pfn]:
                del self._pins[pfn]

        self._operation(unpin)

    def populate(self, index: Any, token: Any = None) -> None:
        """kvm_gmem_populate: a private page, no zeroing, no make_private; ``token`` sets its
        contents, None keeps them (in place); then post_populate (POPULATE)."""
        i = u64(index, "index")
        t = None if token is None else u64(token, "token")

        def populate() -> None:
            self._check_open()
            self._check_index(i)
            if not self._attrs.load(i) & PRIVATE:
                raise ValueError(
                    f"index: populate needs a private page (EINVAL), page {i} is shared"
                )
            self._check_poison(i)
            f = self._fault_in(i)
            self._touch(i, i + 1)
            pfn = f.file_pfn(i)
            if not f.uptodate:  # the page keeps its contents; the rest of the folio is zeroed
                keep = self._pm.read(pfn)
                self._zero_folio(f)
                self._pm.write(pfn, keep)
                self._expected.store(i, i + 1, keep)
                self._stats["pages_zeroed"] -= 1
            if t is not None:
                self._pm.write(pfn, t)
                self._expected.store(i, i + 1, t)
            self._stats["pages_populated"] += 1
            if "POPULATE" in self._config:
                self._hook("post_populate", i, pfn, t)

        self._operation(populate)

    def memory_failure(self, index: Any) -> None:
        """error_remove_folio: poison the folio of ``index`` until it is punched out."""
        i = u64(index, "index")

        def fail() -> None:
            self._check_open()
            self._check_index(i)
            f = self._cache.lookup_folio(i)
            if f is None:
                raise ValueError(f"index: page {i} is a hole: no memory there to fail")
            if not any(a <= f.index < b for a, b in self._poisoned):
                self._poisoned.append((f.index, f.end))
            self._stats["memory_failures"] += 1
            self._unmap(f.index, f.end)
            self._invalidate_begin(f.index, f.end, FILTER_SHARED | FILTER_PRIVATE)
            self._hook("invalidate_end", f.index, f.end)

        self._operation(fail)

    def unpin_pfn(self, pfn: Any) -> None:
        p = u64(pfn, "pfn")

        def unpin() -> None:
            self._check_open()
            if p not in self._pins:
                raise ValueError(f"pfn: {p:#x} is not pinned by this file")
            self._pins[p] -= 1
            if self._pins[p]:
                return
            del self._pins[p]
            for base, order in self._orphans.items():  # the last pin of a punched piece
                if base <= p < base + (1 << order) and not self._pins_in(base, 1 << order):
                    del self._orphans[base]
                    self._give_back(Folio(base, order, base, True))  # reclaimed already
                    return

        self._operation(unpin)

    # ---- teardown -----------------------------------------------------------------
    def _pinned_state(self, pfn: int, nr: int) -> list[tuple[int, int, int, int]]:
        """The pinned pages of [pfn, pfn + nr) as the arch models see them."""
        pm, b = self._pm, self._pm.base_pfn
        return [
            (p, pm.read(p), pm.rmp.load(p - b), pm.owner.load(p - b))
            for p in sorted(self._pins)
            if pfn <= p < pfn + nr
        ]

    def _reclaim(self, folios: list[Folio]) -> None:
        """Folios that just left the cache: free_folio per folio (FREE), as
        filemap_free_folio() does even for a pinned one, which then waits for its last
        unpin; the others go back to PhysMem.  A reclaim that changes a pinned page is a
        reclaimed-while-pinned violation, one per page."""
        for first in range(0, len(folios), FOLIO_BATCH_SIZE):
            batch = folios[first : first + FOLIO_BATCH_SIZE]
            pinned = {
                f.pfn: self._pinned_state(f.pfn, f.nr_pages)
                for f in batch
                if self._pins and self._pins_in(f.pfn, f.nr_pages)
            }
            if "FREE" in self._config:
                self._stats["free_calls"] += len(batch)
                self._stats["hook_ranges"] += len(batch)
                self._ranges_hook("reclaim", [(f.pfn, f.pfn + f.nr_pages) for f in batch])
            for f in batch:
                if f.pfn not in pinned:
                    continue
                now = self._pinned_state(f.pfn, f.nr_pages)
                for was, page in zip(pinned[f.pfn], now, strict=True):
                    if was != page:
                        self._violations.append(
                            self._violation(
                                "reclaimed-while-pinned",
                                None,
                                page[0],
                                "the reclaim hook changed a page (contents, RMP or owner) "
                                "that a pin still holds",
                            )
                        )
                self._orphans[f.pfn] = f.order  # back to PhysMem at its last unpin_pfn()
            for f in batch:
                if f.pfn not in pinned:
                    self._give_back(f)

    def _give_back(self, f: Folio) -> None:
        """A reclaimed folio's pages go back to the PhysMem, checked first."""
        self._arch._check_freed(f.pfn, f.nr_pages, self._violations)
        self._pm._free_block(f.pfn, f.order)
        self._stats["folios_freed"] += 1

    def _release_range(self, start: int, end: int, with_orphans: bool) -> None:
        """truncate_inode_pages_range(): the folios of [start, end) leave the cache (all at
        once on teardown, else RELEASE_CHUNK at a time) and are reclaimed in batches of up
        to 31; with_orphans (teardown: the pins are gone) gives back the pinned ones."""
        batch: list[Folio] = []
        block: list[Folio] = []

        def release(f: Folio) -> None:
            if self._policy == "hugetlb" and f.order < self._folio_order:
                # The pieces of a split huge folio come in order: reclaimed whole, once.
                if f.index == self._huge_block(f.index):
                    block[:] = [Folio(f.index, self._folio_order, f.pfn, f.uptodate)]
                if f.end != block[0].end:
                    return
                f = block[0]
            batch.append(f)
            if len(batch) == FOLIO_BATCH_SIZE:
                self._reclaim(batch)
                batch.clear()

        if start == 0 and end == self._nr_pages:  # teardown: the cache empties at once
            taken, self._cache = self._cache, FolioCache()
            for f in taken.overlapping(start, end):
                release(f)
        else:  # a punch: RELEASE_CHUNK folios at a time
            while chunk := self._cache.first_overlapping(start, end, RELEASE_CHUNK):
                for f in chunk:
                    self._cache.pop(f.index)
                for f in chunk:
                    release(f)
        if batch:
            self._reclaim(batch)
        if with_orphans:
            for pfn, order in sorted(self._orphans.items()):
                self._give_back(Folio(pfn, order, pfn, True))
            self._orphans.clear()

    def fallocate(self, start: Any, end: Any) -> None:
        s, e = u64(start, "start"), u64(end, "end")

        def fallocate() -> None:
            self._check_open()
            self._check_range(s, e)
            # At worst one folio per 2**folio_order pages (and the edges), one per free page.
            most = min(((e - s) >> self._folio_order) + 2, self._pm.nr_free)
            if most > SMALL_REQUEST // 16 and most > host_memory_available() // 16:
                raise OutOfMemory(
                    f"fallocate: [{s}, {e}) may need {most} folios ({most * 16 >> 20} MiB of "
                    "page cache), more than the host has available; nothing was allocated"
                )
            got: list[Folio] = []
            splits = self._stats["folio_splits"]
            i = s
            while i < e:
                f = self._cache.lookup_folio(i)
                if f is None:
                    f = self._alloc_folio(i)
                    if f is None:
                        for g in reversed(got):  # give back what this call took
                            for piece in self._cache.overlapping(g.index, g.end):
                                self._cache.pop(piece.index)
                                self._pm._free_block(piece.pfn, piece.order)
                        self._stats["folios_allocated"] -= len(got)
                        self._stats["folio_splits"] = splits
                        raise OutOfMemory(
                            f"fallocate: physical memory ran out at index {i}; "
                            "nothing was allocated"
                        )
                    got.append(f)
                i = f.end
            self._touch(s, e)

        self._operation(fallocate)

    def add_folio(self, index: Any, order: Any, pfn: Any) -> None:
        i, o, p = u64(index, "index"), order_arg(order), u64(pfn, "pfn")

        def add() -> None:
            self._check_open()
            self._cache.check_new(i, o, p)
            if i + (1 << o) > self._nr_pages:
                raise ValueError(
                    f"index: folio [{i}, {i + (1 << o)}) runs past the end of the file "
                    f"({self._nr_pages} pages)"
                )
            if self._policy == "hugetlb" and o != self._folio_order:
                raise ValueError(
                    "order: under huge_policy 'hugetlb' a folio is a huge page: must be "
                    f"{self._folio_order}, got {o}"
                )
            self._pm.check_block(p, o)
            if not self._pm.is_free(p, o):
                raise ValueError(
                    f"pfn: pages [{p}, {p + (1 << o)}) are not free in the file's PhysMem"
                )
            self._pm._take_block(p, o)
            folio = Folio(i, o, p)
            self._cache.insert(folio)
            self._split_if_shared(folio)
            self._stats["folios_allocated"] += 1

        self._operation(add)

    def punch_hole(self, start: Any, end: Any) -> None:
        s, e = u64(start, "start"), u64(end, "end")

        def punch() -> None:
            self._check_open()
            if s >= e:
                raise ValueError(f"start: must be < end, got start={s} end={e}")
            stop = min(e, self._nr_pages)  # truncation stops at EOF
            if s >= stop:
                return
            if self._policy == "hugetlb":
                self._punch_huge(s, stop)
                return
            self._invalidate_begin(s, stop, FILTER_SHARED | FILTER_PRIVATE)
            self._unmap(s, stop)
            self._cache.split_range_pages(s, stop)
            self._expected.store(s, stop, 0)
            self._release_range(s, stop, with_orphans=False)
            self._poisoned = _erase_ranges(self._poisoned, s, stop)
            self._hook("invalidate_end", s, stop)

        self._operation(punch)

    def _close(self) -> None:
        if self._closed:
            return
        # kvm_gmem_release(): invalidate both kinds over the file, start and end; the
        # folios are reclaimed afterwards, at eviction.
        self._invalidate_begin(0, self._nr_pages, FILTER_SHARED | FILTER_PRIVATE)
        self._mapped.clear()
        self._hook("invalidate_end", 0, self._nr_pages)
        self._pins.clear()  # the pinning devices go away with the VM
        self._release_range(0, self._nr_pages, with_orphans=True)
        self._poisoned.clear()
        self._punched.clear()
        self._closed = True

    def close(self) -> None:
        self._operation(self._close)

    def __enter__(self) -> GuestMemfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(
            "unclosed gmem.GuestMemfd: closing it frees its folios through the free hook",
            ResourceWarning,
            stacklevel=1,
        )
        self.close()

    # ---- conversion ---------------------------------------------------------------
    def _walk(self, start: int, end: int) -> Iterator[list[tuple[Folio, int, int]]]:
        """The folios of [start, end) in batches: (folio, start_pfn, end_pfn) clamped."""
        folios = self._cache.overlapping(start, end)
        for first in range(0, len(folios), FOLIO_BATCH_SIZE):
            yield [(f, *f.clamp(start, end)) for f in folios[first : first + FOLIO_BATCH_SIZE]]

    def _extents(self, start: int, end: int) -> Iterator[tuple[int, int, int, bool]]:
        """(index, pfn, nr_pages, uptodate): populated stretches of [start, end) contiguous
        in the file and in memory and of one uptodate state (as FolioCache::walk_extents)."""
        index = pfn = nr = 0
        uptodate = False
        for f in self._cache.overlapping(start, end):
            sp, ep = f.clamp(start, end)
            first = max(start, f.index)
            if nr and first == index + nr and sp == pfn + nr and f.uptodate == uptodate:
                nr += ep - sp
                continue
            if nr:
                yield index, pfn, nr, uptodate
            index, pfn, nr, uptodate = first, sp, ep - sp, f.uptodate
        if nr:
            yield index, pfn, nr, uptodate

    def _convert_contents(self, start: int, end: int, attrs: int) -> None:
        policy = self._arch.CONTENTS
        if policy == "keep":
            return
        token = 0 if policy == "zero" else GARBLED
        for a, b, value in self._attrs.runs(start, end).tolist():
            if value == attrs:
                continue
            for index, pfn, nr, _ in self._extents(a, b):
                self._pm.fill(pfn, nr, token)
                self._expected.store(index, index + nr, token)

    def _hook_walk(self, start: int, end: int, free_hook: bool) -> None:
        for batch in self._walk(start, end):
            for f, sp, ep in batch:
                first = max(start, f.index)
                if not (
                    sp < ep and sp >= f.pfn and ep <= f.pfn + f.nr_pages and first + ep - sp <= end
                ):
                    self._violations.append(
                        self._violation(
                            "hook-range-inside-folio-and-range",
                            first,
                            sp,
                            "range leaves its folio or range",
                        )
                    )
            ranges = [(sp, ep) for _, sp, ep in batch]
            if free_hook:
                self._stats["free_calls"] += len(batch)
                self._ranges_hook("reclaim", ranges)
            else:
                self._stats["make_shared_calls"] += len(batch)
                self._ranges_hook("make_shared", ranges)
            self._stats["hook_ranges"] += len(batch)

    def _set_attributes(self, s: int, e: int, attrs: int) -> None:
        self._check_open()
        self._check_range(s, e)
        if attrs not in (SHARED, PRIVATE):
            raise ValueError(f"attrs: must be SHARED (0) or PRIVATE (8), got {attrs}")
        if self._attrs.range_has(s, e, attrs):  # 1. nothing to do
            self._stats["conversions_noop"] += 1
            return
        if attrs == PRIVATE:  # 3. busy folios fail the call before anything changes
            for f in self._cache.overlapping(s, e):
                if (
                    self._pins_in(f.pfn, f.nr_pages)
                    or self._mapped_in(f.index, max(s, f.index))
                    or self._mapped_in(min(e, f.end), f.end)
                ):
                    self._stats["conversions_busy"] += 1
                    raise ConversionBusy(
                        f"set_attributes: folio at index {f.index} is pinned or mapped "
                        "outside the range (EAGAIN)",
                        max(s, f.index),
                    )
            self._unmap(s, e)
        # 3b. To shared under "hugetlb": the huge folios the range touches are split.
        split = self._split_for_share(s, e) if self._policy == "hugetlb" and not attrs else []
        # 4. Point of no return: the arch hears of the splits, then KVM zaps its mappings.
        for f in split:
            self._split_huge(f)
        self._invalidate_begin(s, e, FILTER_SHARED if attrs == PRIVATE else FILTER_PRIVATE)
        self._convert_contents(s, e, attrs)
        hooked = False
        if attrs == SHARED:  # 5. the arch gets the clamped PFN ranges
            overloaded = self._design == "overloaded"
            gate = "FREE" if overloaded else "FREE_ON_SHARED_CONVERSION"
            hooked = gate in self._config
            self._arch.contents_touched = False
            if hooked:
                self._hook_walk(s, e, free_hook=overloaded)
        # Did the hooks keep the arch's promise about contents?  Only hooks that wrote
        # pages can have broken it: the model sets the expectation with its own changes.
        if hooked and self._arch.contents_touched:
            self._check_contents(s, e, self._violations)
        self._attrs.store(s, e, attrs)  # 6.
        self._stats["conversions"] += 1
        self._stats["pages_converted"] += e - s
        if self._policy == "hugetlb" and attrs == PRIVATE:  # 7. merge wholly private blocks
            self._merge_after_unshare(s, e)
        self._arch._attributes_set(s, e, attrs)
        self._hook("invalidate_end", s, e)

    def set_attributes(self, start: Any, end: Any, attrs: Any) -> None:
        s, e, a = u64(start, "start"), u64(end, "end"), u64(attrs, "attrs")
        self._operation(lambda: self._set_attributes(s, e, a))

    def set_memory_attributes2(
        self, offset: Any, size: Any, attributes: Any, flags: Any = 0
    ) -> None:
        o, n = u64(offset, "offset"), u64(size, "size")
        a, fl = u64(attributes, "attributes"), u64(flags, "flags")

        def convert() -> None:
            self._check_open()
            if fl:
                raise ValueError(f"flags: must be 0, got {fl}")
            if a & ~PRIVATE:
                raise ValueError(
                    f"attributes: unknown bits {a & ~PRIVATE:#x}; allowed: "
                    "KVM_MEMORY_ATTRIBUTE_PRIVATE (8)"
                )
            if n == 0:
                raise ValueError("size: must be > 0")
            if o + n >= 2**64:
                raise ValueError("size: offset + size wraps around")
            if o % PAGE_SIZE:
                raise ValueError(f"offset: must be page aligned, got {o}")
            if n % PAGE_SIZE:
                raise ValueError(f"size: must be page aligned, got {n}")
            if o + n > self.size:
                raise ValueError(
                    f"size: offset + size ({o + n}) is past the end of the file ({self.size})"
                )
            self._set_attributes(o // PAGE_SIZE, (o + n) // PAGE_SIZE, a)

        self._operation(convert)

    # ---- queries ------------------------------------------------------------------
    def get_attributes(self, index: Any) -> int:
        i = u64(index, "index")
        self._check_open()
        self._check_index(i)
        return self._attrs.load(i)

    def _query(self, start: Any, end: Any) -> tuple[int, int]:
        """A query range: start <= end <= nr_pages (an empty range answers empty)."""
        s, e = u64(start, "start"), end_arg(end, self._nr_pages)
        check_start_end(s, e)
        if e > self._nr_pages:
            raise ValueError(f"end: must be <= nr_pages ({self._nr_pages}), got {e}")
        return s, e

    def attribute_runs(self, start: Any = 0, end: Any = None) -> npt.NDArray[np.uint64]:
        s, e = self._query(start, end)
        self._check_open()
        return self._attrs.runs(s, e)

    def folios(self, start: Any = 0, end: Any = None) -> npt.NDArray[Any]:
        s, e = self._query(start, end)
        self._check_open()
        folios = self._cache.overlapping(s, e)
        rows = folio_rows(folios)
        for row, f in zip(rows, folios, strict=True):
            row["pins"] = self._pins_in(f.pfn, f.nr_pages)
            row["mapped"] = self._mapped_in(f.index, f.end)
        return rows

    def pfn_ranges(self, start: Any, end: Any, out: Any = None) -> npt.NDArray[np.uint64]:
        s, e = self._query(u64(start, "start"), u64(end, "end"))
        buffer = None if out is None else out_rows(out)
        self._check_open()
        return self._cache.pfn_ranges(s, e, buffer)

    def page_pfns(self, start: Any, end: Any) -> npt.NDArray[np.uint64]:
        s, e = self._query(u64(start, "start"), u64(end, "end"))
        self._check_open()
        return self._cache.page_pfns(s, e)

    def _check_contents(self, start: int, end: int, out: list[Violation]) -> None:
        """Populated, uptodate pages whose contents differ from what is expected."""
        for lo, pfn, nr, uptodate in self._extents(start, end):
            if not uptodate:
                continue  # undefined until the first touch zeroes the folio
            hi = lo + nr
            want = self._expected.runs(lo, hi).tolist()
            got = [(a - pfn + lo, b - pfn + lo, v) for a, b, v in self._pm.contents(pfn, nr)]
            i = j = 0
            at = lo
            while at < hi:
                stop = min(want[i][1], got[j][1])
                if want[i][2] != got[j][2]:
                    out.append(
                        self._violation(
                            self._arch.CONTENTS_RULE,
                            at,
                            pfn + at - lo,
                            f"pages [{at}, {stop}) hold {got[j][2]:#x}, expected {want[i][2]:#x}",
                        )
                    )
                at = stop
                i += at == want[i][1]
                j += at == got[j][1]

    # ---- the "hugetlb" policy (guest_memfd_huge.cpp) -------------------------------
    def _huge_block(self, index: int) -> int:
        return index & ~((1 << self._folio_order) - 1)

    def _touch(self, start: int, end: int) -> None:
        """A page the file uses again (a fault, populate, fallocate) is no longer punched."""
        if self._punched:
            self._punched = _erase_ranges(self._punched, start, end)

    def _split_huge(self, f: Folio) -> None:
        self._arch._split_folio(f.index, f.pfn, f.order)
        self._stats["folio_splits"] += 1

    def _split_to_pages(self, f: Folio) -> None:
        self._cache.pop(f.index)
        for i in range(f.nr_pages):
            self._cache.insert(Folio(f.index + i, 0, f.pfn + i, f.uptodate))

    def _split_if_shared(self, f: Folio) -> None:
        """A huge folio just added over a block with a shared page is split at once."""
        if self._policy != "hugetlb" or f.order == 0:
            return
        if self._attrs.range_has(f.index, f.end, PRIVATE):
            return
        self._split_to_pages(f)
        self._split_huge(f)

    def _split_for_share(self, s: int, e: int) -> list[Folio]:
        """Split every huge folio [s, e) touches into order-0 folios; returns them."""
        huge = []
        for b in range(self._huge_block(s), e, 1 << self._folio_order):
            f = self._cache.lookup_folio(b)
            if f is not None and f.order > 0:
                huge.append(f)
        pieces = sum(f.nr_pages for f in huge)
        if pieces > SMALL_REQUEST // 16 and pieces > host_memory_available() // 16:
            raise OutOfMemory(
                f"set_attributes: splitting {len(huge)} huge folios needs "
                f"{pieces * 16 >> 20} MiB of page cache, more than the host has available; "
                "nothing was converted"
            )
        for f in huge:
            self._split_to_pages(f)
        return huge

    def _merge_after_unshare(self, s: int, e: int) -> None:
        """Merge each split block [s, e) touches that is wholly private again; a poisoned
        page blocks the merge (counted)."""
        nr = 1 << self._folio_order
        for b in range(self._huge_block(s), e, nr):
            f = self._cache.lookup_folio(b)
            if f is None or f.order == self._folio_order:
                continue
            if not self._attrs.range_has(b, b + nr, PRIVATE):
                continue
            if _covered(self._poisoned, b, b + nr):
                self._stats["merges_blocked"] += 1
                continue
            pieces = self._cache.overlapping(b, b + nr)
            base = pieces[0].pfn
            whole = len(pieces) == nr and base % nr == 0
            whole = whole and all(p.order == 0 and p.pfn == base + i for i, p in enumerate(pieces))
            if not whole:
                self._violations.append(
                    self._violation(
                        "split-block-contiguous",
                        b,
                        base,
                        "the pieces of a split huge folio are not its pages, contiguous "
                        "and aligned",
                    )
                )
                continue
            any_up = any(p.uptodate for p in pieces)
            if any_up and not all(p.uptodate for p in pieces):
                for p in pieces:
                    if not p.uptodate:
                        self._pm.fill(p.pfn, 1, 0)
                        self._expected.store(p.index, p.index + 1, 0)
                        self._stats["pages_zeroed"] += 1
            for p in pieces:
                self._cache.pop(p.index)
            self._cache.insert(Folio(b, self._folio_order, base, any_up))
            self._stats["folio_merges"] += 1
            self._arch._merge_folio(b, base, self._folio_order)

    def _punch_huge(self, s: int, e: int) -> None:
        """Zero and keep the pages of blocks [s, e) covers in part; reclaim whole, once,
        each block the punches have covered whole."""
        nr = 1 << self._folio_order
        lo, hi = (s + nr - 1) & ~(nr - 1), self._huge_block(e)

        def whole_after(b: int) -> bool:
            a, z = max(s, b), min(e, b + nr)
            done = _covered(self._punched, b, b + nr) - _covered(self._punched, a, z)
            return done + z - a == nr

        if lo > hi:
            lo = hi = self._huge_block(s)
            if whole_after(lo):
                hi = lo + nr
        else:
            if lo > s and whole_after(self._huge_block(s)):
                lo = self._huge_block(s)
            if hi < e and whole_after(hi):
                hi += nr
        self._invalidate_begin(s, e, FILTER_SHARED | FILTER_PRIVATE)
        self._unmap(s, e)
        for a, z in ((s, min(e, lo)), (max(s, hi), e)):
            if a >= z:
                continue
            for index, pfn, n, _ in list(self._extents(a, z)):
                self._pm.fill(pfn, n, 0)
                self._stats["pages_punched_zeroed"] += n
                self._punched = _merge_range(self._punched, index, index + n)
        self._expected.store(s, e, 0)
        if lo < hi:
            self._release_range(lo, hi, with_orphans=False)
            self._punched = _erase_ranges(self._punched, lo, hi)
            self._poisoned = _erase_ranges(self._poisoned, lo, hi)
        self._hook("invalidate_end", s, e)

    def _check_huge(self, out: list[Violation]) -> None:
        """No shared, mapped or pinned page in a huge folio; split blocks contiguous and
        complete."""
        nr = 1 << self._folio_order
        block: int | None = None
        base = seen = 0

        def close_block() -> None:
            nonlocal block
            if block is not None and seen != nr:
                out.append(
                    self._violation(
                        "split-block-complete",
                        block,
                        base,
                        f"{seen} of the {nr} pages of a split huge folio are in the page cache",
                    )
                )
            block = None

        for f in self._cache.overlapping(0, self._nr_pages):
            if f.order == self._folio_order:
                close_block()
                if (
                    not self._attrs.range_has(f.index, f.end, PRIVATE)
                    or self._mapped_in(f.index, f.end)
                    or self._pins_in(f.pfn, f.nr_pages)
                ):
                    out.append(
                        self._violation(
                            "huge-folio-holds-only-private-pages",
                            f.index,
                            f.pfn,
                            "a huge folio holds a page that is shared, or that the host maps "
                            "or pins",
                        )
                    )
                continue
            if f.order != 0:
                out.append(
                    self._violation(
                        "hugetlb-folio-order",
                        f.index,
                        f.pfn,
                        f"a folio of order {f.order} under the hugetlb policy",
                    )
                )
                continue
            if self._huge_block(f.index) != block:
                close_block()
                block = self._huge_block(f.index)
                base, seen = f.pfn - (f.index - block), 0
            seen += 1
            if f.pfn != base + f.index - block or base % nr:
                out.append(
                    self._violation(
                        "split-block-contiguous",
                        f.index,
                        f.pfn,
                        "a piece of a split huge folio is not the block's page (pfns not "
                        "contiguous or not aligned)",
                    )
                )
        close_block()

    def check(self) -> list[Violation]:
        """Violations recorded during calls, plus those in the current state, each once."""
        out = list(self._violations)
        for index in self._mapped:
            f = self._cache.lookup_folio(index)
            if f is None:
                continue
            pfn = f.file_pfn(index)
            if self._attrs.load(index) & PRIVATE:
                out.append(
                    self._violation(
                        "host-reaches-only-shared-pages", index, pfn, "the host maps a private page"
                    )
                )
            self._arch._check_host_reach(index, pfn, out)
        self._check_contents(0, self._nr_pages, out)
        if self._policy == "hugetlb":
            self._check_huge(out)
        self._arch._check_state(self, out)
        return list(dict.fromkeys(out))

    def dump(self) -> str:
        lines = [
            f"GuestMemfd(size={self.size}, arch={self._arch.name}, hook_design={self._design}, "
            f"huge_policy={self._policy}, "
            f"folios={len(self._cache)}, attribute runs={len(self._attrs)}"
            + (", closed)" if self._closed else ")")
        ]
        for f in self._cache.overlapping(0, self._nr_pages)[:32]:
            line = f"  folio [{f.index}, {f.end}) order {f.order} pfn {f.pfn:#x}"
            line += " uptodate" if f.uptodate else ""
            pins, mapped = self._pins_in(f.pfn, f.nr_pages), self._mapped_in(f.index, f.end)
            line += f" pins={pins}" if pins else ""
            line += f" mapped={mapped}" if mapped else ""
            lines.append(line)
        for a, b, v in self._attrs.runs().tolist():
            lines.append(f"  attrs [{a}, {b}) {'PRIVATE' if v & PRIVATE else 'SHARED'}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<gmem.reference.{self.dump().splitlines()[0]}>"


__all__ = ["MAX_ORDER", "GuestMemfd", "config_names"]
