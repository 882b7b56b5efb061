"""The range maps a user would otherwise pick, wrapped to IntervalMap's store/load/range_has
semantics (a value for every index, runs merged where the library allows it).

Used by ``gmem bench`` and bench/; the libraries come with the ``bench`` extra
(``pip install 'gmem[bench]'``) and are imported only when a peer is created."""

from __future__ import annotations

from typing import Any

PRIVATE = 1 << 3


class SortedDictMap:
    """Run starts in a sortedcontainers.SortedDict: the classic Python range map."""

    name = "sortedcontainers"

    def __init__(self, nr_pages: int, default: int = 0) -> None:
        from sortedcontainers import SortedDict

        self.n = nr_pages
        self.d = SortedDict({0: default})

    def load(self, i: int) -> Any:
        d = self.d
        return d.peekitem(d.bisect_right(i) - 1)[1]

    def store(self, s: int, e: int, v: int) -> None:
        d = self.d
        after = self.load(e) if e < self.n else None
        for k in list(d.irange(s, e)):
            del d[k]
        if s == 0 or self.load(s - 1) != v:
            d[s] = v
        if after is not None and after != v:
            d[e] = after

    def range_has(self, s: int, e: int, v: int) -> bool:
        d = self.d
        i = d.bisect_right(s) - 1
        nxt = d.peekitem(i + 1)[0] if i + 1 < len(d) else self.n
        return bool(d.peekitem(i)[1] == v and nxt >= e)

    def __len__(self) -> int:
        return len(self.d)


class IntervalTreeMap:
    """intervaltree.IntervalTree: chop the range, add the new interval (no merging)."""

    name = "intervaltree"

    def __init__(self, nr_pages: int, default: int = 0) -> None:
        from intervaltree import IntervalTree

        self.t = IntervalTree.from_tuples([(0, nr_pages, default)])

    def store(self, s: int, e: int, v: int) -> None:
        self.t.chop(s, e)
        self.t.addi(s, e, v)

    def load(self, i: int) -> Any:
        return next(iter(self.t.at(i))).data

    def range_has(self, s: int, e: int, v: int) -> bool:
        return all(iv.data == v for iv in self.t.overlap(s, e))

    def __len__(self) -> int:
        return len(self.t)


class PortionMap:
    """portion.IntervalDict: closed-open intervals to values."""

    name = "portion"

    def __init__(self, nr_pages: int, default: int = 0) -> None:
        import portion

        self.P = portion
        self.d = portion.IntervalDict()
        self.d[portion.closedopen(0, nr_pages)] = default

    def store(self, s: int, e: int, v: int) -> None:
        self.d[self.P.closedopen(s, e)] = v

    def load(self, i: int) -> Any:
        return self.d[i]

    def range_has(self, s: int, e: int, v: int) -> bool:
        return set(self.d[self.P.closedopen(s, e)].values()) == {v}

    def __len__(self) -> int:
        return len(self.d)


class RoaringMap:
    """pyroaring.BitMap for the one-bit case: the set of private pages."""

    name = "pyroaring"

    def __init__(self, nr_pages: int, default: int = 0) -> None:
        from pyroaring import BitMap

        self.bm = BitMap()
        if default:
            self.bm.add_range(0, nr_pages)

    def store(self, s: int, e: int, v: int) -> None:
        if v:
            self.bm.add_range(s, e)
        else:
            self.bm.remove_range(s, e)

    def load(self, i: int) -> int:
        return PRIVATE if i in self.bm else 0

    def store_many(self, starts: Any, ends: Any, values: Any) -> None:
        for s, e, v in zip(starts.tolist(), ends.tolist(), values.tolist(), strict=True):
            self.store(s, e, v)


PEERS = {cls.name: cls for cls in (SortedDictMap, IntervalTreeMap, PortionMap, RoaringMap)}
