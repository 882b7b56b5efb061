"""``gmem check-pfn``: validate the clamped PFN-range math on small, random or your layouts.

The ranges the engine emits are compared with ones rebuilt page by page by independent
code: in C++ from per-page lookups (the exhaustive check), in numpy from a sorted search
over the layout (random and user layouts).  A problem is reported as its smallest case:
the folio, the range, what was expected and what was emitted; the command exits 1.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import gmem
from gmem import _core

U64 = npt.NDArray[np.uint64]


def expected_ranges(index: U64, order: U64, pfn: U64, start: int, end: int) -> U64:
    """The walk's output rebuilt from pages: each page's folio found by a sorted search,
    consecutive pages of one folio joined.  Independent of the engine's walk."""
    if start >= end or len(index) == 0:
        return np.zeros((0, 2), np.uint64)
    pages = np.arange(start, end, dtype=np.uint64)
    k = np.searchsorted(index, pages, side="right").astype(np.int64) - 1
    kk = np.maximum(k, 0)
    inside = (k >= 0) & (pages < index[kk] + (np.uint64(1) << order[kk]))
    pages, k = pages[inside], k[inside]
    if len(pages) == 0:
        return np.zeros((0, 2), np.uint64)
    page_pfn = pfn[k] + (pages - index[k])
    first = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    last = np.r_[first[1:], len(k)] - 1
    return np.stack([page_pfn[first], page_pfn[last] + np.uint64(1)], axis=1)


def _describe(index: U64, order: U64, pfn: U64, start: int, end: int, want: Any, got: Any) -> str:
    near = [
        f"folio(index={i}, order={o}, pfn={p})"
        for i, o, p in zip(index.tolist(), order.tolist(), pfn.tolist(), strict=True)
        if i < end and i + (1 << o) > start
    ]
    return (
        f"  range [{start}, {end}) over {', '.join(near[:4]) or 'no folio'}"
        f"{' ...' if len(near) > 4 else ''}\n"
        f"  expected {np.asarray(want).tolist()[:8]}\n  emitted  {np.asarray(got).tolist()[:8]}"
    )


def check_ranges(index: U64, order: U64, pfn: U64, ranges: list[tuple[int, int]]) -> str | None:
    """Check the engine on ``ranges`` of one layout; the smallest failing case, or None."""
    failures = []
    for start, end in ranges:
        want = expected_ranges(index, order, pfn, start, end)
        got = gmem.clamp_folio_ranges(index, order, pfn, start, end)
        if not np.array_equal(want, got):
            failures.append((end - start, start, end, want, got))
    if not failures:
        return None
    _, start, end, want, got = min(failures, key=lambda f: (f[0], f[1]))
    return _describe(index, order, pfn, start, end, want, got)


def layout_ranges(index: U64, order: U64, count: int, seed: int) -> list[tuple[int, int]]:
    """The whole layout, each folio, each folio cut at its middle, and random ranges."""
    if len(index) == 0:
        return [(0, 1)]
    ends = index + (np.uint64(1) << order)
    lo, hi = int(index[0]), int(ends[-1])
    out = [(lo, hi)]
    for i, e in zip(index.tolist()[:500], ends.tolist()[:500], strict=True):
        out += [(i, e), (i + (e - i) // 2, e + 1), (max(lo, i - 1), i + (e - i) // 2 or e)]
    rng = np.random.default_rng(seed)
    for _ in range(count):
        s = int(rng.integers(lo, hi))
        out.append((s, min(hi, s + int(rng.integers(1, 1 << 20)))))
    return [(s, e) for s, e in out if s < e]


def check_exhaustive(pages: int) -> bool:
    if pages not in (1, 2, 4, 8, 16):
        raise ValueError(f"exhaustive: must be one of 1, 2, 4, 8, 16, got {pages}")
    rep = _core.check_pfn_exhaustive(pages.bit_length() - 1)
    if rep["ok"]:
        print(
            f"exhaustive: {rep['layouts']:,} layouts of files of 1..{pages} pages, "
            f"{rep['ranges']:,} ranges: ok"
        )
        return True
    print(f"exhaustive: FAILED: {rep['what']}")
    print(f"  layout {rep['layout']}\n  range [{rep['start']}, {rep['end']})")
    print(f"  expected {rep['expected']}\n  emitted  {rep['emitted']}")
    return False


def random_layout(
    rng: np.random.Generator, pm: gmem.PhysMem, first: int, pages: int
) -> tuple[U64, U64, U64]:
    rows = []
    index = first
    while index < first + pages:
        order = int(rng.integers(0, 19))
        while order and (index % (1 << order) or index + (1 << order) > first + pages):
            order -= 1
        if rng.random() < 0.1:  # a hole
            index += 1 << order
            continue
        try:
            rows.append((index, order, pm.alloc(order)))
        except gmem.OutOfMemory:
            order = 0
            rows.append((index, 0, pm.alloc(0)))
        index += 1 << order
    cols = np.array(rows, dtype=np.uint64).reshape(-1, 3)
    return cols[:, 0].copy(), cols[:, 1].copy(), cols[:, 2].copy()


def check_random(count: int, seed: int, progress: Callable[[int], None] | None = None) -> bool:
    rng = np.random.default_rng(seed)
    folios = ranges = 0
    for n in range(count):
        if progress:
            progress(n)
        pm = gmem.PhysMem(1 << 22, base_pfn=1 << 30, seed=seed + n)
        pm.fragment(float(rng.choice([0.0, 0.0005, 0.002])))
        first = (1 << 40) - (1 << 21) * int(rng.integers(1, 4))
        index, order, pfn = random_layout(rng, pm, first, 1 << 21)
        rs = layout_ranges(index, order, 50, seed + n)
        problem = check_ranges(index, order, pfn, rs)
        # The page cache's own walk must agree with the pure function.
        cache = gmem.FolioCache()
        cache.add_folios(index, order, pfn)
        for s, e in rs[:20]:
            if not np.array_equal(
                cache.pfn_ranges(s, e), gmem.clamp_folio_ranges(index, order, pfn, s, e)
            ):
                problem = (
                    problem or f"  FolioCache.pfn_ranges({s}, {e}) differs from clamp_folio_ranges"
                )
        folios += len(index)
        ranges += len(rs)
        if problem:
            print(f"random: layout {n} (seed {seed}): FAILED\n{problem}")
            return False
    print(
        f"random: {count} layouts ({folios:,} folios, orders 0..18, indexes near 2**40), "
        f"{ranges:,} ranges: ok"
    )
    return True


COLUMNS = ("index", "order", "pfn")
U64_MAX = 2**64 - 1


def _csv_int(where: str, line: int, name: str, text: str) -> int:
    try:
        value = int(text.strip(), 0)  # decimal, 0x hex, 0o, 0b
    except ValueError:
        raise ValueError(f"{where}:{line}: {name}: not an integer: {text.strip()!r}") from None
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{where}:{line}: {name}: must be in 0..2**64-1, got {value}")
    return value


def _is_int(text: str) -> bool:
    try:
        int(text.strip(), 0)
    except ValueError:
        return False
    return True


def load_csv_layout(path: Path) -> tuple[U64, U64, U64]:
    """(index, order, pfn) from CSV rows, under a header that names the columns (in any
    order, other columns ignored) or none (then the rows are index,order,pfn)."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ValueError(f"{where}:{line}: not UTF-8 text") from None
    numbered = [
        (n, line)
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    rows = csv.reader(line for _, line in numbered)
    columns: dict[str, int] | None = None
    width = 3
    out: list[tuple[int, int, int]] = []
    for (line, _), cells in zip(numbered, rows, strict=True):
        if columns is None:
            columns = {name: k for k, name in enumerate(COLUMNS)}
            if not all(_is_int(c) for c in cells):  # a header
                names = [c.strip().lower() for c in cells]
                if not all(name in names for name in COLUMNS):
                    raise ValueError(
                        f"{where}:{line}: neither a header naming index, order and pfn nor "
                        f"a row of three integers: {','.join(cells)!r}"
                    )
                columns = {name: names.index(name) for name in COLUMNS}
                width = len(names)
                continue
        if len(cells) != width:
            what = "index,order,pfn" if width == 3 else "one per header column"
            raise ValueError(f"{where}:{line}: expected {width} values ({what}), got {len(cells)}")
        index, order, pfn = (_csv_int(where, line, name, cells[columns[name]]) for name in COLUMNS)
        out.append((index, order, pfn))
    a = np.array(out, dtype=np.uint64).reshape(-1, 3)
    return a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy()


def load_layout(path: str | Path) -> tuple[U64, U64, U64]:
    """(index, order, pfn) columns from a .npy ((n, 3) or structured) or a .csv file."""
    path = Path(path)
    if path.suffix != ".npy":
        return load_csv_layout(path)
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a .npy array without objects: {exc}") from None
    if a.dtype.names:
        missing = [n for n in COLUMNS if n not in a.dtype.names]
        if missing:
            raise ValueError(f"{path}: the array has no field(s) {', '.join(missing)}")
        cols = [a[name] for name in COLUMNS]
    elif a.ndim == 2 and a.shape[1] == 3:
        cols = [a[:, i] for i in range(3)]
    else:
        raise ValueError(
            f"{path}: must hold (n, 3) rows or index/order/pfn fields, got shape {a.shape}"
        )
    for name, c in zip(COLUMNS, cols, strict=True):
        if c.dtype.kind not in "iu":
            raise ValueError(
                f"{path}: {name}: dtype {c.dtype} is not an integer type "
                "(a float would be truncated: save the layout as integers)"
            )
        if c.dtype.kind == "i" and (c < 0).any():
            raise ValueError(f"{path}: {name}: negative values")
    index, order, pfn = (np.ascontiguousarray(c, dtype=np.uint64) for c in cols)
    return index, order, pfn


def check_split_merge(count: int, seed: int, progress: Callable[[int], None] | None = None) -> bool:
    """PFN contiguity across the "hugetlb" policy's splits and merges: ``count`` random
    sequences of conversions (and pins, faults, poison) on huge folios of 2**2..2**9
    pages.  After every step each page keeps the PFN it had (a split or merge never moves
    memory), the page cache's walk agrees with the pure function on the file's current
    layout, and check() finds nothing."""
    rng = np.random.default_rng(seed)
    steps = ranges = 0
    for n in range(count):
        if progress:
            progress(n)
        order = int(rng.integers(2, 10))
        blocks = int(rng.integers(2, 9))
        nr = blocks << order
        f = gmem.GuestMemfd(
            nr * gmem.PAGE_SIZE, folio_order=order, flags=gmem.FLAG_MMAP, huge_policy="hugetlb"
        )
        f.fallocate(0, nr)
        pfns = f.page_pfns(0, nr)
        pinned: list[int] = []
        for step in range(40):
            s = int(rng.integers(0, nr))
            e = int(rng.integers(s + 1, min(nr, s + 3 << order) + 1))
            kind = rng.random()
            try:
                if kind < 0.4:
                    f.set_attributes(s, e, gmem.SHARED)
                elif kind < 0.8:
                    f.set_attributes(s, e, gmem.PRIVATE)
                elif kind < 0.9 and not f.get_attributes(s):
                    f.pin(s)
                    pinned.append(s)
                elif pinned:
                    f.unpin(pinned.pop())
            except gmem.ConversionBusy:
                pass
            folios = f.folios()
            index, order_, pfn = (folios[k].astype(np.uint64) for k in ("index", "order", "pfn"))
            cuts = np.sort(rng.integers(0, nr + 1, size=(8, 2)), axis=1)
            rs = [(0, nr), (s, e)] + [(int(a), int(b)) for a, b in cuts if a < b]
            problem = check_ranges(index, order_, pfn, rs)
            if not np.array_equal(f.page_pfns(0, nr), pfns):
                problem = problem or "  a split or merge moved a page to another PFN"
            for a, b in rs[:4]:
                if not np.array_equal(
                    f.pfn_ranges(a, b), gmem.clamp_folio_ranges(index, order_, pfn, a, b)
                ):
                    problem = problem or f"  GuestMemfd.pfn_ranges({a}, {b}) differs"
            if f.check():
                problem = problem or f"  check(): {f.check()[0]}"
            if problem:
                print(f"split-merge: sequence {n} step {step} (seed {seed}): FAILED\n{problem}")
                return False
            steps += 1
            ranges += len(rs)
        f.close()
    print(
        f"split-merge: {count} sequences on hugetlb files ({steps:,} conversions, "
        f"{ranges:,} ranges): PFNs unchanged, walk and checker agree: ok"
    )
    return True


def check_layout_file(path: str, count: int, seed: int) -> bool:
    index, order, pfn = load_layout(path)
    try:
        gmem.clamp_folio_ranges(index, order, pfn, 0, 0)  # validates the whole layout
    except ValueError as exc:
        print(f"layout {path}: INVALID: {exc}")
        return False
    rs = layout_ranges(index, order, count, seed)
    problem = check_ranges(index, order, pfn, rs)
    if problem:
        print(f"layout {path}: FAILED\n{problem}")
        return False
    print(f"layout {path}: {len(index):,} folios, {len(rs):,} ranges: ok")
    return True
