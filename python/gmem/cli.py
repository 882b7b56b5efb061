"""The ``gmem`` command."""

from __future__ import annotations

import argparse
import sys

import numpy as np

import gmem
from gmem._consts import BUILTIN_ARCHS


def _layout(args: argparse.Namespace) -> int:
    """Build a mixed-order folio layout on fragmented memory and print its PFN ranges."""
    pm = gmem.PhysMem(args.pages * 2, seed=args.seed)
    pm.fragment(args.fragment)
    cache = gmem.FolioCache()
    rng = np.random.default_rng(args.seed)
    index = 0
    while index < args.pages:
        if rng.random() < 0.2:  # leave a hole
            index += 1
            continue
        order = int(rng.integers(0, args.max_order + 1))
        while order and (index % (1 << order) or index + (1 << order) > args.pages):
            order -= 1
        try:
            pfn = pm.alloc(order)
        except gmem.OutOfMemory:
            break
        cache.add_folio(index, order, pfn)
        index += 1 << order
    start = args.start
    end = args.pages if args.end is None else args.end
    print(cache.dump() if args.verbose else repr(cache))
    ranges = cache.pfn_ranges(start, end)
    print(f"pfn_ranges({start}, {end}): {len(ranges)} ranges")
    for s, e in ranges.tolist():
        print(f"  [{s:#x}, {e:#x})  {e - s} pages")
    pages = cache.page_pfns(start, end)
    emitted = np.concatenate(
        [np.arange(s, e, dtype=np.uint64) for s, e in ranges.tolist()] or [np.zeros(0, np.uint64)]
    )
    ok = np.array_equal(emitted, pages[pages != gmem.NO_PFN])
    print(f"ranges expand to exactly page_pfns of the populated pages: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def _size(text: str) -> int:
    """A size like 64G, 2M, 4096 or 1T, in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def _demo(args: argparse.Namespace) -> int:
    from gmem import demo

    folio_order = (_size(args.folio_size) // gmem.PAGE_SIZE).bit_length() - 1
    archs = tuple(args.arch) if args.arch else BUILTIN_ARCHS
    designs = tuple(args.hook_design) if args.hook_design else demo.HOOK_DESIGNS
    size = _size(args.size)
    print(
        f"gmem demo: a boot-like run of a {args.size} guest with {args.folio_size} folios "
        f"(order {folio_order}) under {len(archs)} arch(s) x {len(designs)} hook design(s)"
    )
    results = demo.run_all(size, folio_order, archs, designs)
    print(demo.table(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the boot-like run under every arch and hook design")
    d.add_argument("--size", default="64G", help="guest size (default 64G)")
    d.add_argument("--folio-size", default="2M", help="folio size: 4K, 2M or 1G (default 2M)")
    d.add_argument(
        "--arch",
        action="append",
        choices=BUILTIN_ARCHS,
        help="only this arch (repeatable)",
    )
    d.add_argument(
        "--hook-design",
        action="append",
        choices=("split", "overloaded"),
        help="only this hook design (repeatable)",
    )
    d.set_defaults(func=_demo)
    p = sub.add_parser("layout", help="print the clamped PFN ranges of a demo folio layout")
    p.add_argument("--pages", type=int, default=64, help="file size in pages (default 64)")
    p.add_argument("--max-order", type=int, default=4, help="largest folio order (default 4)")
    p.add_argument("--fragment", type=float, default=0.1, help="PhysMem.fragment fraction")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--start", type=int, default=3, help="range start index (default 3)")
    p.add_argument("--end", type=int, default=None, help="range end index (default: --pages)")
    p.add_argument("-v", "--verbose", action="store_true", help="dump every folio")
    p.set_defaults(func=_layout)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, gmem.GmemError) as exc:
        print(f"gmem: error: {exc}", file=sys.stderr)
        return 2
