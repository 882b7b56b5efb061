"""IntervalMap, the reference: a value for every index of [0, nr_pages), kept as runs.

Two parallel sorted lists hold the start and the value of each run; a run ends where the
next one starts.  There is always a run at 0 and never two neighbours of one value.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

import numpy as np
import numpy.typing as npt

from gmem.reference._args import end_arg, u64, u64_columns


class IntervalMap:
    def __init__(self, nr_pages: Any, default: Any = 0) -> None:
        nr = u64(nr_pages, "nr_pages")
        value = u64(default, "default")
        if nr == 0:
            raise ValueError("nr_pages: must be at least 1")
        self._nr_pages = nr
        self._starts: list[int] = [0]
        self._values: list[int] = [value]

    @property
    def nr_pages(self) -> int:
        return self._nr_pages

    def __len__(self) -> int:
        return len(self._starts)

    def _check_range(self, start: int, end: int, allow_empty: bool) -> None:
        if end > self._nr_pages:
            raise ValueError(f"end: must be <= nr_pages ({self._nr_pages}), got {end}")
        if start > end or (start == end and not allow_empty):
            op = "<=" if allow_empty else "<"
            raise ValueError(f"start: must be {op} end, got start={start} end={end}")

    def _run_at(self, index: int) -> int:
        return bisect_right(self._starts, index) - 1

    def load(self, index: Any) -> int:
        i = u64(index, "index")
        if i >= self._nr_pages:
            raise ValueError(f"index: must be < nr_pages ({self._nr_pages}), got {i}")
        return self._values[self._run_at(i)]

    def _store(self, start: int, end: int, value: int) -> None:
        after = self._values[self._run_at(end)] if end < self._nr_pages else None
        # Drop every run boundary in [start, end] ...
        lo = bisect_left(self._starts, start)
        hi = bisect_right(self._starts, end)
        del self._starts[lo:hi]
        del self._values[lo:hi]
        # ... then put back the ones that separate different values.
        starts, values = [], []
        if start == 0 or self._values[lo - 1] != value:
            starts.append(start)
            values.append(value)
        if after is not None and after != value:
            starts.append(end)
            values.append(after)
        self._starts[lo:lo] = starts
        self._values[lo:lo] = values

    def store(self, start: Any, end: Any, value: Any) -> None:
        s, e, v = u64(start, "start"), u64(end, "end"), u64(value, "value")
        self._check_range(s, e, allow_empty=False)
        self._store(s, e, v)

    def store_many(self, starts: Any, ends: Any, values: Any) -> None:
        s, e, v = u64_columns(starts, ends, values, ("starts", "ends", "values"))
        rows = list(zip(s.tolist(), e.tolist(), v.tolist(), strict=True))
        for i, (a, b, _) in enumerate(rows):
            try:
                self._check_range(a, b, allow_empty=False)
            except ValueError as exc:
                raise ValueError(f"{exc} (row {i})") from None
        for a, b, c in rows:
            self._store(a, b, c)

    def range_has(self, start: Any, end: Any, value: Any) -> bool:
        s, e, v = u64(start, "start"), u64(end, "end"), u64(value, "value")
        self._check_range(s, e, allow_empty=True)
        if s == e:
            return True
        i = self._run_at(s)
        run_end = self._starts[i + 1] if i + 1 < len(self._starts) else self._nr_pages
        return self._values[i] == v and run_end >= e

    def runs(self, start: Any = 0, end: Any = None) -> npt.NDArray[np.uint64]:
        s, e = u64(start, "start"), end_arg(end, self._nr_pages)
        self._check_range(s, e, allow_empty=True)
        rows = []
        if s < e:
            i = self._run_at(s)
            while i < len(self._starts) and self._starts[i] < e:
                run_end = self._starts[i + 1] if i + 1 < len(self._starts) else self._nr_pages
                rows.append((max(self._starts[i], s), min(run_end, e), self._values[i]))
                i += 1
        return np.array(rows, dtype=np.uint64).reshape(-1, 3)

    def dump(self) -> str:
        lines = [f"IntervalMap(nr_pages={self._nr_pages}, runs={len(self)})"]
        for a, b, v in self.runs().tolist()[:64]:
            lines.append(f"  [{a}, {b}) = {v:#x}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<gmem.reference.{self.dump().splitlines()[0]}>"
