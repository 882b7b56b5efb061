"""PhysMem, the reference: a buddy allocator over modelled PFNs, plus per-PFN state.

Free blocks are kept in one sorted list per order.  ``alloc`` is lowest-address first
fit over all orders that can hold the request; ``free`` coalesces with the buddy.  Each
PFN holds a 64-bit content token (0 = zeroed), an RMP state (SNP) and an owner (pKVM),
each in an IntervalMap over ``pfn - base_pfn``, so untouched memory is one run.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from gmem._consts import FREE_BLOCKS_LISTED, MAX_ORDER, PFN_LIMIT
from gmem.errors import OutOfMemory
from gmem.reference._args import order_arg, u64
from gmem.reference.interval_map import IntervalMap

_MASK64 = 2**64 - 1


class SplitMix64:
    """The generator PhysMem.fragment draws from: the same bits as the C++ engine's."""

    def __init__(self, seed: int) -> None:
        self.state = seed

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)


class FreeList:
    """The free blocks of one order, as runs of consecutive blocks: [starts[i], ends[i]).

    A fresh PhysMem of 2**52 pages is 2**34 free blocks of the top order, but one run.
    """

    def __init__(self, block: int) -> None:
        self.block = block
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        for s, e in zip(self.starts, self.ends, strict=True):
            yield from range(s, e, self.block)

    def first(self) -> int:
        return self.starts[0]

    def _run(self, pfn: int) -> int:
        """Index of the run holding pfn, or -1."""
        i = bisect_right(self.starts, pfn) - 1
        return i if i >= 0 and pfn < self.ends[i] else -1

    def contains(self, pfn: int) -> bool:
        i = self._run(pfn)
        return i >= 0 and (pfn - self.starts[i]) % self.block == 0

    def at_or_after(self, pfn: int) -> int | None:
        i = self._run(pfn)
        if i >= 0:
            p = self.starts[i] + -(-(pfn - self.starts[i]) // self.block) * self.block
            if p < self.ends[i]:
                return p
            i += 1
        else:
            i = bisect_left(self.starts, pfn)
        return self.starts[i] if i < len(self.starts) else None

    def insert(self, pfn: int, n: int = 1) -> None:
        end = pfn + n * self.block
        i = bisect_left(self.starts, pfn)
        join_prev = i > 0 and self.ends[i - 1] == pfn
        join_next = i < len(self.starts) and self.starts[i] == end
        if join_prev and join_next:
            self.ends[i - 1] = self.ends[i]
            del self.starts[i], self.ends[i]
        elif join_prev:
            self.ends[i - 1] = end
        elif join_next:
            self.starts[i] = pfn
        else:
            self.starts.insert(i, pfn)
            self.ends.insert(i, end)
        self.count += n

    def erase(self, pfn: int) -> None:
        i = self._run(pfn)
        start, end = self.starts[i], self.ends[i]
        if start == pfn and pfn + self.block == end:
            del self.starts[i], self.ends[i]
        elif start == pfn:
            self.starts[i] = pfn + self.block
        else:
            self.ends[i] = pfn
            if pfn + self.block < end:
                self.starts.insert(i + 1, pfn + self.block)
                self.ends.insert(i + 1, end)
        self.count -= 1


class PhysMem:
    def __init__(self, nr_pages: Any, *, base_pfn: Any = 0, seed: Any = 0) -> None:
        nr, base, sd = u64(nr_pages, "nr_pages"), u64(base_pfn, "base_pfn"), u64(seed, "seed")
        if nr == 0:
            raise ValueError("nr_pages: must be at least 1")
        if base + nr > PFN_LIMIT:
            raise ValueError(
                f"nr_pages: base_pfn + nr_pages must be <= 2**52 (52-bit PFNs), got {base} + {nr}"
            )
        self._base, self._nr_pages, self._seed = base, nr, sd
        self._rng = SplitMix64(sd)
        self._free = [FreeList(1 << o) for o in range(MAX_ORDER + 1)]
        self._nr_free = 0
        self.tokens = IntervalMap(nr)  # indexed by pfn - base_pfn, like rmp and owner
        self.rmp = IntervalMap(nr)
        self.owner = IntervalMap(nr)
        self._user = IntervalMap(nr)  # 1: held through alloc/take
        self._kept: list[int] = []
        self._add_free_range(base, base + nr)

    nr_pages = property(lambda self: self._nr_pages)
    base_pfn = property(lambda self: self._base)
    seed = property(lambda self: self._seed)
    nr_free = property(lambda self: self._nr_free)
    nr_kept = property(lambda self: len(self._kept))

    @property
    def end_pfn(self) -> int:
        return self._base + self._nr_pages

    def _add_free_range(self, start: int, end: int) -> None:
        """Tile [start, end) with the largest naturally aligned blocks."""
        while start < end:
            order = 0
            while order < MAX_ORDER and start % (2 << order) == 0 and start + (2 << order) <= end:
                order += 1
            n = (end - start) >> MAX_ORDER if order == MAX_ORDER else 1  # one run, however many
            self._free[order].insert(start, n)
            self._nr_free += n << order
            start += n << order

    def _remove_free(self, pfn: int, order: int) -> None:
        self._free[order].erase(pfn)

    def _check_pfn(self, pfn: int, name: str = "pfn") -> None:
        if not self._base <= pfn < self.end_pfn:
            raise ValueError(f"{name}: must be in [{self._base}, {self.end_pfn}), got {pfn}")

    def check_block(self, pfn: int, order: int) -> None:
        if pfn % (1 << order):
            raise ValueError(f"pfn: must be aligned to 2**order = {1 << order} pages, got {pfn}")
        self._check_pfn(pfn)
        if pfn + (1 << order) > self.end_pfn:
            raise ValueError(
                f"order: block [{pfn}, {pfn + (1 << order)}) runs past the end of physical "
                f"memory ({self.end_pfn})"
            )

    def _free_container(self, pfn: int, order: int) -> tuple[int, int] | None:
        for o in range(order, MAX_ORDER + 1):
            block = pfn & ~((1 << o) - 1)
            if self._free[o].contains(block):
                return block, o
        return None

    def alloc(self, order: Any) -> int:
        want = order_arg(order)
        pfn = self._try_alloc(want)
        if pfn is None:
            blocks = sum(map(len, self._free))
            raise OutOfMemory(
                f"PhysMem: no free block of order {want} ({self._nr_free} pages free in "
                f"{blocks} blocks)"
            )
        self._user.store(pfn - self._base, pfn - self._base + (1 << want), 1)
        return pfn

    def _try_alloc(self, want: int) -> int | None:
        best: tuple[int, int] | None = None
        for o in range(want, MAX_ORDER + 1):
            if self._free[o] and (best is None or self._free[o].first() < best[0]):
                best = (self._free[o].first(), o)
        if best is None:
            return None
        pfn, o = best
        self._free[o].erase(pfn)
        while o > want:  # keep the lowest half, free the upper one
            o -= 1
            self._free[o].insert(pfn + (1 << o))
        self._nr_free -= 1 << want
        return pfn

    def free(self, pfn: Any, order: Any) -> None:
        """Give back a block from alloc/take/fragment; pages a file holds are refused."""
        p, o = u64(pfn, "pfn"), order_arg(order)
        self.check_block(p, o)
        end = p + (1 << o)
        k0 = bisect_left(self._kept, p)
        k1 = bisect_left(self._kept, end, k0)
        if k1 - k0 == 1 << o:  # pages kept by fragment may be given back too
            self._free_block(p, o)
            del self._kept[k0:k1]
            return
        if not self._user.range_has(p - self._base, end - self._base, 1):
            self._check_not_free(p, o)
            raise ValueError(
                f"pfn: pages [{p}, {end}) are held by a guest_memfd file; only pages from "
                "PhysMem.alloc, take or fragment can be freed here"
            )
        self._free_block(p, o)
        self._user.store(p - self._base, end - self._base, 0)

    def _check_not_free(self, p: int, o: int) -> None:
        end = p + (1 << o)
        overlap = self._free_container(p, o) is not None or any(
            (q := self._free[k].at_or_after(p)) is not None and q < end for k in range(o)
        )
        if overlap:
            raise ValueError(f"pfn: pages [{p}, {end}) are already free (double free)")

    def _free_block(self, p: int, o: int) -> None:
        """Free a block a file held (the file's own bookkeeping says it is not free)."""
        self.check_block(p, o)
        self._check_not_free(p, o)
        self._nr_free += 1 << o
        while o < MAX_ORDER:
            buddy = p ^ (1 << o)
            if not self._free[o].contains(buddy):
                break
            self._free[o].erase(buddy)
            p = min(p, buddy)
            o += 1
        self._free[o].insert(p)

    def is_free(self, pfn: Any, order: Any) -> bool:
        p, o = u64(pfn, "pfn"), order_arg(order)
        self.check_block(p, o)
        return self._free_container(p, o) is not None

    def take(self, pfn: Any, order: Any) -> None:
        p, o = u64(pfn, "pfn"), order_arg(order)
        self._take_block(p, o)
        self._user.store(p - self._base, p - self._base + (1 << o), 1)

    def _take_block(self, p: int, o: int) -> None:
        self.check_block(p, o)
        found = self._free_container(p, o)
        if found is None:
            raise ValueError(f"pfn: pages [{p}, {p + (1 << o)}) are not all free")
        block, bo = found
        self._remove_free(block, bo)
        while bo > o:  # split towards pfn, freeing the other half at each level
            bo -= 1
            half = 1 << bo
            if p >= block + half:
                self._free[bo].insert(block)
                block += half
            else:
                self._free[bo].insert(block + half)
        self._nr_free -= 1 << o

    def fragment(self, fraction: float) -> None:
        if not hasattr(fraction, "__float__") and not hasattr(fraction, "__index__"):
            raise TypeError(f"fraction: must be a number, got {type(fraction).__name__}")
        f = float(fraction)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fraction: must be in [0, 1], got {f}")
        threshold = int(f * 2.0**53)
        hit: list[tuple[int, int, list[int]]] = []  # drawn first, then applied
        for pfn, order in self._free_blocks():
            taken = [
                p for p in range(pfn, pfn + (1 << order)) if self._rng.next() >> 11 < threshold
            ]
            if taken:
                hit.append((pfn, order, taken))
        for pfn, order, taken in hit:
            self._remove_free(pfn, order)
            self._nr_free -= 1 << order
            start = pfn
            for p in taken:
                self._add_free_range(start, p)
                start = p + 1
            self._add_free_range(start, pfn + (1 << order))
            self._kept.extend(taken)
        self._kept.sort()

    def read(self, pfn: Any) -> int:
        p = u64(pfn, "pfn")
        self._check_pfn(p)
        return self.tokens.load(p - self._base)

    def write(self, pfn: Any, token: Any) -> None:
        p, t = u64(pfn, "pfn"), u64(token, "token")
        self._check_pfn(p)
        self.tokens.store(p - self._base, p - self._base + 1, t)

    def fill(self, pfn: int, nr: int, token: int) -> None:
        self.tokens.store(pfn - self._base, pfn - self._base + nr, token)

    def contents(self, pfn: int, nr: int) -> list[tuple[int, int, int]]:
        """Content runs over [pfn, pfn + nr): (start_pfn, end_pfn, token)."""
        b = self._base
        return [(s + b, e + b, v) for s, e, v in self.tokens.runs(pfn - b, pfn - b + nr).tolist()]

    def _shifted(self, m: IntervalMap) -> npt.NDArray[np.uint64]:
        runs = m.runs()
        runs[:, :2] += np.uint64(self._base)
        return runs

    def content_runs(self) -> npt.NDArray[np.uint64]:
        return self._shifted(self.tokens)

    def rmp_runs(self) -> npt.NDArray[np.uint64]:
        return self._shifted(self.rmp)

    def owner_runs(self) -> npt.NDArray[np.uint64]:
        return self._shifted(self.owner)

    def _free_blocks(self) -> Iterator[tuple[int, int]]:
        """(pfn, order) of every free block, in PFN order, one at a time."""
        return heapq.merge(
            *(zip(blocks, itertools.repeat(o)) for o, blocks in enumerate(self._free))
        )

    def free_blocks(self) -> npt.NDArray[np.uint64]:
        n = sum(map(len, self._free))
        if n > FREE_BLOCKS_LISTED:
            raise ValueError(
                f"self: {n} free blocks are more than free_blocks() lists (2**24); "
                "nr_free counts them"
            )
        return np.array(list(self._free_blocks()), dtype=np.uint64).reshape(-1, 2)

    def dump(self) -> str:
        lines = [
            f"PhysMem(pfns=[{self._base}, {self.end_pfn}), free={self._nr_free} pages in "
            f"{sum(map(len, self._free))} blocks, kept={len(self._kept)}, "
            f"content runs={len(self.tokens)})"
        ]
        blocks = list(itertools.islice(self._free_blocks(), 33))
        lines += [f"  free [{p}, {p + (1 << o)}) order {o}" for p, o in blocks[:32]]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<gmem.reference.{self.dump().splitlines()[0]}>"
