"""FolioCache and clamp_folio_ranges, the reference: the page cache and the PFN-range walk.

Folios live in a dict keyed by their first index, with a sorted list of those indexes
beside it.  The walk clamps each folio that overlaps [start, end) to the range:

    start_index = max(start, folio.index)
    end_index   = min(end, folio.index + nr_pages)
    start_pfn   = folio.pfn + (start_index & (nr_pages - 1))
    end_pfn     = start_pfn + end_index - start_index
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gmem._consts import FOLIO_BATCH_SIZE, FOLIO_DTYPE, MAX_ORDER, NO_PFN, PFN_LIMIT, U64_MAX
from gmem.reference._args import (
    check_page_count,
    check_start_end,
    end_arg,
    into,
    order_arg,
    out_rows,
    u64,
    u64_columns,
)


@dataclass
class Folio:
    index: int
    order: int
    pfn: int
    uptodate: bool = False

    @property
    def nr_pages(self) -> int:
        return 1 << self.order

    @property
    def end(self) -> int:
        return self.index + self.nr_pages

    def file_pfn(self, index: int) -> int:
        return self.pfn + (index & (self.nr_pages - 1))

    def clamp(self, start: int, end: int) -> tuple[int, int]:
        """This folio's [start_pfn, end_pfn) inside the range [start, end)."""
        start_index, end_index = max(start, self.index), min(end, self.end)
        start_pfn = self.file_pfn(start_index)
        return start_pfn, start_pfn + end_index - start_index

    def __str__(self) -> str:
        return f"folio(index={self.index}, order={self.order}, pfn={self.pfn})"


def aligned_pieces(start: int, end: int, max_order: int) -> Iterator[tuple[int, int]]:
    """(index, order) of the largest naturally aligned blocks that tile [start, end)."""
    while start < end:
        order = 0
        while order < max_order and start % (2 << order) == 0 and start + (2 << order) <= end:
            order += 1
        yield start, order
        start += 1 << order


def folio_rows(folios: list[Folio]) -> npt.NDArray[Any]:
    out = np.zeros(len(folios), dtype=FOLIO_DTYPE)
    for i, f in enumerate(folios):
        out[i] = (f.index, f.order, f.pfn, 0, 0, f.uptodate)
    return out


def ranges_array(ranges: list[tuple[int, int]]) -> npt.NDArray[np.uint64]:
    return np.array(ranges, dtype=np.uint64).reshape(-1, 2)


class FolioCache:
    def __init__(self) -> None:
        self._folios: dict[int, Folio] = {}
        self._indexes: list[int] = []  # sorted keys of _folios

    def __len__(self) -> int:
        return len(self._folios)

    @property
    def nr_pages(self) -> int:
        return sum(f.nr_pages for f in self._folios.values())

    def lookup_folio(self, index: int) -> Folio | None:
        i = bisect_right(self._indexes, index) - 1
        if i < 0:
            return None
        f = self._folios[self._indexes[i]]
        return f if index < f.end else None

    def overlapping(self, start: int, end: int) -> list[Folio]:
        """The folios that overlap [start, end), in index order."""
        if start >= end:
            return []
        first = self.lookup_folio(start)
        lo = bisect_left(self._indexes, start)
        hi = bisect_left(self._indexes, end)
        found = [self._folios[i] for i in self._indexes[lo:hi]]
        return ([first] if first is not None and first.index < start else []) + found

    def first_overlapping(self, start: int, end: int, count: int) -> list[Folio]:
        """Up to ``count`` folios overlapping [start, end), in index order."""
        if start >= end:
            return []
        first = self.lookup_folio(start)
        head = [first] if first is not None and first.index < start else []
        lo = bisect_left(self._indexes, start)
        hi = min(bisect_left(self._indexes, end), lo + count - len(head))
        return head + [self._folios[i] for i in self._indexes[lo:hi]]

    def check_new(self, index: int, order: int, pfn: int) -> None:
        nr = 1 << order
        if index % nr:
            raise ValueError(
                f"index: must be a multiple of 2**order = {nr} (folios are naturally aligned), "
                f"got {index}"
            )
        if index > U64_MAX - nr:
            raise ValueError(f"index: folio would end past 2**64 - 1, got {index}")
        if pfn % nr:
            raise ValueError(
                f"pfn: must be a multiple of 2**order = {nr} (folios are naturally aligned), "
                f"got {pfn}"
            )
        if pfn + nr > PFN_LIMIT:
            raise ValueError(f"pfn: must be below 2**52, got {pfn}")
        clash = self.overlapping(index, index + nr)
        if clash:
            raise ValueError(f"index: pages [{index}, {index + nr}) overlap {clash[0]}")

    def insert(self, folio: Folio) -> None:
        self._folios[folio.index] = folio
        insort(self._indexes, folio.index)

    def add_folio(self, index: Any, order: Any, pfn: Any, uptodate: bool = False) -> None:
        i, p, o = u64(index, "index"), u64(pfn, "pfn"), order_arg(order)
        self.check_new(i, o, p)
        self.insert(Folio(i, o, p, bool(uptodate)))

    def add_folios(self, index: Any, order: Any, pfn: Any) -> None:
        idx, o, p = u64_columns(index, order, pfn, ("index", "order", "pfn"))
        rows = list(zip(idx.tolist(), o.tolist(), p.tolist(), strict=True))
        check_folio_layout(idx.tolist(), o.tolist(), p.tolist())
        for n, (i, od, pf) in enumerate(rows):
            try:
                self.check_new(i, od, pf)
            except ValueError as exc:
                raise ValueError(f"{exc} (folio {n})") from None
        for i, od, pf in rows:
            self.insert(Folio(i, od, pf))

    def pop(self, index: int) -> Folio:
        f = self._folios.pop(index)
        del self._indexes[bisect_left(self._indexes, index)]
        return f

    def remove_folio(self, index: Any) -> tuple[int, int, int]:
        i = u64(index, "index")
        if i not in self._folios:
            raise ValueError(f"index: no folio starts at index {i}")
        f = self.pop(i)
        return f.index, f.order, f.pfn

    def lookup(self, index: Any) -> tuple[int, int, int] | None:
        f = self.lookup_folio(u64(index, "index"))
        return None if f is None else (f.index, f.order, f.pfn)

    def split(self, index: Any, new_order: Any) -> None:
        i, o = u64(index, "index"), order_arg(new_order, "new_order")
        f = self.lookup_folio(i)
        if f is None:
            raise ValueError(f"index: no folio covers index {i}")
        if o >= f.order:
            raise ValueError(f"new_order: must be below the folio's order {f.order}, got {o}")
        self.pop(f.index)
        for off in range(0, f.nr_pages, 1 << o):
            self.insert(Folio(f.index + off, o, f.pfn + off, f.uptodate))

    def split_around(self, f: Folio, start: int, end: int) -> None:
        """Replace ``f`` by the largest aligned pieces that cross neither start nor end."""
        self.pop(f.index)
        cuts = sorted({f.index, f.end} | {c for c in (start, end) if f.index < c < f.end})
        for a, b in itertools.pairwise(cuts):
            for index, order in aligned_pieces(a, b, f.order):
                self.insert(Folio(index, order, f.file_pfn(index), f.uptodate))

    def split_range_pages(self, start: int, end: int) -> int:
        split = 0
        for edge in (start, end - 1):
            f = self.lookup_folio(edge)
            if f is not None and (f.index < start or f.end > end):
                self.split_around(f, start, end)
                split += 1
        return split

    def split_range(self, start: Any, end: Any) -> int:
        s, e = u64(start, "start"), u64(end, "end")
        check_start_end(s, e)
        return self.split_range_pages(s, e) if s < e else 0

    def folios(self, start: Any = 0, end: Any = None) -> npt.NDArray[Any]:
        s, e = u64(start, "start"), end_arg(end, U64_MAX)
        check_start_end(s, e)
        return folio_rows(self.overlapping(s, e))

    def pfn_ranges(self, start: Any, end: Any, out: Any = None) -> npt.NDArray[np.uint64]:
        s, e = u64(start, "start"), u64(end, "end")
        check_start_end(s, e)
        buffer = None if out is None else out_rows(out)
        ranges = ranges_array([f.clamp(s, e) for f in self.overlapping(s, e)])
        return ranges if buffer is None else into(buffer, ranges)

    def pfn_batches(self, start: Any, end: Any) -> list[npt.NDArray[np.uint64]]:
        s, e = u64(start, "start"), u64(end, "end")
        check_start_end(s, e)
        folios = self.overlapping(s, e)
        return [
            ranges_array([f.clamp(s, e) for f in folios[i : i + FOLIO_BATCH_SIZE]])
            for i in range(0, len(folios), FOLIO_BATCH_SIZE)
        ]

    def page_pfns(self, start: Any, end: Any) -> npt.NDArray[np.uint64]:
        s, e = u64(start, "start"), u64(end, "end")
        check_start_end(s, e)
        check_page_count(s, e)
        out = []
        for index in range(s, e):
            f = self.lookup_folio(index)
            out.append(NO_PFN if f is None else f.file_pfn(index))
        return np.array(out, dtype=np.uint64)

    def dump(self) -> str:
        lines = [f"FolioCache(folios={len(self)}, pages={self.nr_pages})"]
        for i in self._indexes[:64]:
            f = self._folios[i]
            flag = " uptodate" if f.uptodate else ""
            lines.append(f"  [{f.index}, {f.end}) order {f.order} pfn {f.pfn}{flag}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<gmem.reference.{self.dump().splitlines()[0]}>"


def check_folio_layout(index: list[int], order: list[int], pfn: list[int]) -> None:
    """Raise ValueError naming the first folio that is misaligned, unsorted or overlapping."""
    for i, (idx, o, p) in enumerate(zip(index, order, pfn, strict=True)):
        shown = Folio(idx, min(o, 99), p)

        def bad(arg: str, why: str, i: int = i, shown: Folio = shown) -> ValueError:
            return ValueError(f"{arg}: folio {i} {shown}: {why}")

        if o > MAX_ORDER:
            raise bad("order", "order must be in 0..18")
        nr = 1 << o
        if idx % nr:
            raise bad("index", "index is not a multiple of 2**order")
        if idx > U64_MAX - nr:
            raise bad("index", "folio ends past 2**64 - 1")
        if p % nr:
            raise bad("pfn", "pfn is not a multiple of 2**order")
        if p > U64_MAX - nr:
            raise bad("pfn", "PFN range ends past 2**64 - 1")
        if i:
            prev_end = index[i - 1] + (1 << order[i - 1])
            if idx < index[i - 1]:
                raise bad("index", f"not sorted: index below the previous folio's {index[i - 1]}")
            if idx < prev_end:
                raise bad("index", f"overlaps the previous folio, which ends at {prev_end}")


def clamp_folio_ranges(
    index: Any, order: Any, pfn: Any, start: Any, end: Any, out: Any = None
) -> npt.NDArray[np.uint64]:
    """The walk as a pure function over a sorted folio layout given as three arrays."""
    idx, o, p = u64_columns(index, order, pfn, ("index", "order", "pfn"))
    s, e = u64(start, "start"), u64(end, "end")
    check_start_end(s, e)
    buffer = None if out is None else out_rows(out)
    if buffer is not None:
        for name, column in (("index", idx), ("order", o), ("pfn", p)):
            if np.may_share_memory(buffer, column):
                raise ValueError(f"out: must not share memory with {name}")
    check_folio_layout(idx.tolist(), o.tolist(), p.tolist())
    folios = zip(idx.tolist(), o.tolist(), p.tolist(), strict=True)
    ranges = ranges_array(
        [
            Folio(i, od, pf).clamp(s, e)
            for i, od, pf in folios
            if s < e and i < e and i + (1 << od) > s
        ]
    )
    return ranges if buffer is None else into(buffer, ranges)
