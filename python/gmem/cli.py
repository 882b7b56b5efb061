"""The ``gmem`` command: the demo, trace replay, PFN-math checking and a layout printer.

gmem demo [--size 64G] [--folio-size 2M] [--arch A] [--hook-design D] [--seed N] [--json]
gmem replay TRACE [--arch A] [--hook-design D] [--json]
gmem check-pfn [--exhaustive PAGES] [--random N] [--seed N] [--layout FILE]
gmem layout [--pages N] ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

import gmem
from gmem._consts import BUILTIN_ARCHS

DESIGNS = ("split", "overloaded")


def _size(text: str) -> int:
    """A size like 64G, 2M, 4K, 1T or 4096, in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64G, 2M, 4K)") from None


def _human(n: int) -> str:
    """4096 -> 4K, 2097152 -> 2M, 68719476736 -> 64G (exact powers only, else bytes)."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line per step elsewhere."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(total, 1)
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {done}/{total} {label} ({time.perf_counter() - self.t0:.1f} s)"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(78) + ("\n" if done == total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _print_results(results: list[Any], as_json: bool, header: str) -> None:
    from gmem import demo

    if as_json:
        rows = []
        for r in results:
            row = r.row()
            row.update(stats=r.stats, arch_stats=r.arch_stats, violation_list=r.violations)
            rows.append(row)
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    print(header)
    print(demo.table(results))


def _demo(args: argparse.Namespace) -> int:
    from gmem import demo, trace

    folio_bytes = args.folio_size
    if folio_bytes < gmem.PAGE_SIZE or folio_bytes & (folio_bytes - 1):
        raise ValueError(f"folio-size: must be a power of two >= 4K, got {folio_bytes}")
    folio_order = folio_bytes.bit_length() - 1 - 12
    if folio_order > gmem.MAX_ORDER:
        raise ValueError("folio-size: at most 1G (order 18)")
    ops = demo.boot_trace(args.size, folio_order, args.seed)
    if args.write_trace:
        with open(args.write_trace, "w") as f:
            f.write(trace.dumps(ops))
        print(f"wrote {len(ops)} lines to {args.write_trace}", file=sys.stderr)
    records = list(trace.iter_records(ops))
    results = demo.run_all(
        archs=tuple(args.arch or BUILTIN_ARCHS),
        designs=tuple(args.hook_design or DESIGNS),
        records=records,
        progress=Progress(not args.json and not args.quiet),
    )
    _print_results(
        results,
        args.json,
        f"gmem demo: a boot-like run of a {_human(args.size)} guest with "
        f"{_human(folio_bytes)} folios ({len(records)} operations per run)",
    )
    return 0


def _replay(args: argparse.Namespace) -> int:
    from gmem import trace

    records = trace.load(args.trace)
    archs, designs = tuple(args.arch or BUILTIN_ARCHS), tuple(args.hook_design or DESIGNS)
    progress = Progress(not args.json and not args.quiet)
    results = []
    runs = [(a, d) for a in archs for d in designs]
    for n, (a, d) in enumerate(runs):
        progress(n, len(runs), f"{a}/{d}")
        results.append(trace.replay(records, arch=a, hook_design=d, where=args.trace))
    progress(len(runs), len(runs), "done")
    _print_results(results, args.json, f"gmem replay {args.trace}: {len(records)} lines")
    return 0


def _check_pfn(args: argparse.Namespace) -> int:
    from gmem import pfncheck

    ok = True
    if args.layout:
        ok &= pfncheck.check_layout_file(args.layout, args.ranges, args.seed)
    if args.exhaustive:
        ok &= pfncheck.check_exhaustive(args.exhaustive)
    if args.random:
        ok &= pfncheck.check_random(args.random, args.seed)
    return 0 if ok else 1


def _bench(args: argparse.Namespace) -> int:
    from gmem.bench import main_bench

    return main_bench(args)


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
    parts = [np.arange(s, e, dtype=np.uint64) for s, e in ranges.tolist()]
    emitted = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    ok = np.array_equal(emitted, pages[pages != gmem.NO_PFN])
    print(f"ranges expand to exactly page_pfns of the populated pages: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmem", description="A userspace model of KVM's guest_memfd."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def runs(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--arch",
            action="append",
            choices=BUILTIN_ARCHS,
            help="only this arch (repeatable; default: all)",
        )
        p.add_argument(
            "--hook-design",
            action="append",
            choices=DESIGNS,
            help="only this hook design (repeatable; default: both)",
        )
        p.add_argument("--json", action="store_true", help="print the results as JSON")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    d = sub.add_parser("demo", help="a boot-like run under every arch and hook design")
    d.add_argument("--size", type=_size, default=_size("64G"), help="guest size (default 64G)")
    d.add_argument(
        "--folio-size",
        type=_size,
        default=_size("2M"),
        help="folio size: 4K, 2M, 1G... (default 2M)",
    )
    d.add_argument("--seed", type=int, default=0, help="where the I/O buffers, pin and hole go")
    d.add_argument("--write-trace", metavar="FILE", help="also write the run as a trace file")
    runs(d)
    d.set_defaults(func=_demo)

    r = sub.add_parser("replay", help="run a JSON Lines trace (docs/trace-format.md)")
    r.add_argument("trace", help="the trace file")
    runs(r)
    r.set_defaults(func=_replay)

    c = sub.add_parser("check-pfn", help="validate the clamped PFN-range math")
    c.add_argument(
        "--exhaustive",
        type=int,
        default=0,
        metavar="PAGES",
        help="every layout of every file of up to PAGES pages (1..16), every range",
    )
    c.add_argument(
        "--random",
        type=int,
        default=0,
        metavar="N",
        help="N random large layouts (mixed orders up to 18, fragmented memory)",
    )
    c.add_argument(
        "--layout", metavar="FILE", help="your layout: a .csv or .npy of (index, order, pfn) rows"
    )
    c.add_argument("--ranges", type=int, default=200, help="random ranges per layout")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_check_pfn)

    b = sub.add_parser(
        "bench", help="measure the performance targets (docs/performance.md) side by side"
    )
    b.add_argument("--full", action="store_true", help="the large sizes (minutes, ~6 GB)")
    b.add_argument("--plot", metavar="FILE.png", help="draw ratio and scaling plots")
    b.add_argument("--write-results", metavar="FILE.md", help="write a RESULTS.md")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_bench)

    p = sub.add_parser("layout", help="print the clamped PFN ranges of a random folio layout")
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
    if args.command == "check-pfn" and not (args.exhaustive or args.random or args.layout):
        args.exhaustive, args.random = 16, 20
    from gmem.trace import TraceError

    try:
        return int(args.func(args))
    except (ValueError, gmem.GmemError, TraceError, OSError) as exc:
        print(f"gmem: error: {exc}", file=sys.stderr)
        return 2
