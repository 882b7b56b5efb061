"""The ``gmem`` command: the demo, trace replay, PFN-math checking, benchmarks, a layout printer.

Every command runs its work on a worker thread while the main thread waits: Ctrl-C then
stops the command at once, even inside a long C++ call (those run without the GIL),
with one line and exit status 130.  Bad arguments are refused before anything runs,
naming the argument and what is allowed (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np

import gmem
from gmem._consts import BUILTIN_ARCHS, HOOK_DESIGNS, MAX_ORDER, PAGE_SIZE
from gmem._progress import Progress

DESIGNS = HOOK_DESIGNS
DIST = "gmem-kvm"  # the distribution name on PyPI (the import name and command are gmem)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_STATUS = """\
exit status: 0 done (and every check held), 1 a run or check failed (or, with
--fail-on-violation / --fail-on-miss, a violation or missed target), 2 bad arguments or
input, 130 interrupted (Ctrl-C)."""

# ---------------------------------------------------------------------------------------
# Argument types: each refuses a bad value with what is allowed, at parse time.

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """A size like 64G, 2M, 4K, 1T or 4096 (bytes); K, M, G, T are binary (KiB...)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    allowed = "a positive number of bytes, with an optional K, M, G or T suffix (64G, 2M, 4K)"
    if t.startswith("-"):
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}; give {allowed}")
    try:
        value = int(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}; give {allowed}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}; give {allowed}")
    return value


def _folio_size(text: str) -> int:
    """A folio size: a power of two from 4K to 1G; returned as the folio order."""
    size = _size(text)
    if size < PAGE_SIZE or size & (size - 1) or size > PAGE_SIZE << MAX_ORDER:
        raise argparse.ArgumentTypeError(
            f"must be a power of two from 4K to 1G (4K, 8K, ..., 2M, ..., 1G), got {text!r}"
        )
    return size.bit_length() - 1 - 12


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer type in lo..hi (no upper bound when hi is None)."""
    allowed = f"an integer >= {lo:,}" if hi is None else f"an integer in {lo:,}..{hi:,}"

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = allowed
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in 0..1, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------
# Progress and tables.


def terminal_width() -> int:
    """The terminal's width; when the output is not a terminal, 120 (or $COLUMNS)."""
    return shutil.get_terminal_size((120, 24)).columns


# (key, two header lines, format): one format per column, units in the header.
RUN_KEYS = [("arch", ("", "arch")), ("hook_design", ("", "design"))]
RUN_COLUMNS: list[tuple[str, tuple[str, str], str]] = [
    ("hook_calls", ("hook", "calls"), "{:,}"),
    ("pfn_ranges", ("PFN", "ranges"), "{:,}"),
    ("pages_scrubbed", ("scrubbed", "(pages)"), "{:,}"),
    ("rmp_updates", ("RMP", "updates"), "{:,}"),
    ("psmash", ("", "PSMASH"), "{:,}"),
    ("rmp_left", ("RMP left", "(pages)"), "{:,}"),
    ("expected_errors", ("expected", "errors"), "{:,}"),
    ("violations", ("", "violations"), "{:,}"),
    ("engine_ms", ("engine", "(ms)"), "{:,.2f}"),
]


def table(rows: Sequence[dict[str, Any]], width: int | None = None) -> str:
    """The runs as a table no wider than ``width`` where that can be done: the columns
    that do not fit go to a second block (with the arch and design repeated).  A failed
    run (``ok`` false) is one row that says where and why it failed."""
    width = terminal_width() if width is None else width
    keys = [
        (k, h, max(len(h[1]), *(len(str(r[k])) for r in rows)) if rows else len(h[1]))
        for k, h in RUN_KEYS
    ]
    ok_rows = [r for r in rows if r.get("ok", True)]
    cols = []
    for key, head, fmt in RUN_COLUMNS:
        cells = [fmt.format(r[key]) for r in ok_rows]
        cols.append((key, head, fmt, max(len(head[0]), len(head[1]), *map(len, cells or [""]))))
    key_width = sum(w + 2 for _, _, w in keys)
    blocks: list[list[Any]] = [[]]
    used = key_width
    for col in cols:
        if blocks[-1] and used + col[3] + 2 > width:
            blocks.append([])
            used = key_width
        blocks[-1].append(col)
        used += col[3] + 2
    out: list[str] = []
    for n, block in enumerate(blocks):
        if n:
            out.append("")
        for line in (0, 1):
            cells = [h[line].ljust(w) for _, h, w in keys]
            cells += [h[line].rjust(w) for _, h, _, w in block]
            out.append("  ".join(cells).rstrip())
        out.append("  ".join("-" * w for w in [w for *_, w in keys] + [c[3] for c in block]))
        for r in rows:
            lead = "  ".join(str(r[k]).ljust(w) for k, _, w in keys)
            if r.get("ok", True):
                out.append(
                    lead + "  " + "  ".join(fmt.format(r[k]).rjust(w) for k, _, fmt, w in block)
                )
            elif n == 0:
                out.append(
                    textwrap.fill(
                        f"{lead}  {r['error']['message']}",
                        width,
                        subsequent_indent=" " * (key_width + 2),
                        break_on_hyphens=False,
                    )
                )
            else:
                out.append(lead + "  (failed)")
    for r in ok_rows:
        if r["violations"]:
            out.append(
                textwrap.fill(
                    f"first violation, {r['arch']}/{r['hook_design']}: {r['first_violation']}",
                    width,
                    subsequent_indent="  ",
                    break_on_hyphens=False,
                )
            )
    return "\n".join(out)


def _run_row(summary: Any) -> dict[str, Any]:
    row: dict[str, Any] = summary.row()
    row.update(
        ok=True,
        stats=summary.stats,
        arch_stats=summary.arch_stats,
        violation_list=summary.violation_records,
    )
    return row


def _failed_row(arch: str, design: str, exc: Any) -> dict[str, Any]:
    return {
        "arch": arch,
        "hook_design": design,
        "ok": False,
        "error": {"line": exc.line, "message": f"fails at line {exc.line}: {exc.message}"},
    }


def _emit(args: argparse.Namespace, header: str, meta: dict[str, Any], rows: list[Any]) -> int:
    """Print the runs (table or JSON); the exit status they call for."""
    if args.json:
        doc = {"gmem_version": gmem.__version__, "command": args.command, **meta, "runs": rows}
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(textwrap.fill(header, terminal_width(), subsequent_indent="  "))
        print(table(rows))
    failed = any(not r["ok"] for r in rows)
    violated = any(r["ok"] and r["violations"] for r in rows)
    return EXIT_FAILED if failed or (args.fail_on_violation and violated) else EXIT_OK


# ---------------------------------------------------------------------------------------
# The commands.


def _demo(args: argparse.Namespace) -> int:
    from gmem import demo, trace

    order = args.folio_size
    progress = Progress(not args.json and not args.quiet)
    if args.write_trace:
        with open(args.write_trace, "w") as f:
            lines = 0
            for line in trace.dump_lines(demo.boot_trace(args.size, order, args.seed)):
                f.write(line)
                lines += 1
        print(f"wrote {lines:,} lines to {args.write_trace}", file=sys.stderr)
    results = demo.run_all(
        args.size,
        order,
        archs=tuple(args.arch or BUILTIN_ARCHS),
        designs=tuple(args.hook_design or DESIGNS),
        seed=args.seed,
        progress=progress,
        on_operations=lambda n: progress.note(f"{n:,} operations"),
    )
    operations = results[0].operations
    folio = demo.human_bytes(PAGE_SIZE << order)
    header = (
        f"gmem demo: a boot-like run of a {demo.human_bytes(args.size)} guest with {folio} "
        f"folios, seed {args.seed} ({operations:,} operations per run)"
    )
    meta = {
        "size": args.size,
        "folio_size": PAGE_SIZE << order,
        "seed": args.seed,
        "operations": operations,
    }
    return _emit(args, header, meta, [_run_row(r) for r in results])


def _replay(args: argparse.Namespace) -> int:
    from gmem import trace

    create, operations = trace.validate(args.trace)  # every line, before anything runs
    archs, designs = tuple(args.arch or BUILTIN_ARCHS), tuple(args.hook_design or DESIGNS)
    progress = Progress(not args.json and not args.quiet)
    rows = []
    runs = [(a, d) for a in archs for d in designs]
    for n, (a, d) in enumerate(runs):
        progress(n, len(runs), f"{a}/{d}")
        try:
            summary = trace.replay(
                trace.stream(args.trace),
                arch=a,
                hook_design=d,
                where=args.trace,
                progress=lambda k: progress.note(f"{k:,} of {operations:,} operations"),
            )
            rows.append(_run_row(summary))
        except trace.TraceError as exc:
            rows.append(_failed_row(a, d, exc))
    progress(len(runs), len(runs), "done")
    c = create.args
    header = f"gmem replay {args.trace}: {operations:,} operations on a {c['size']:,}-byte file"
    meta = {
        "trace": args.trace,
        "size": c["size"],
        "folio_order": c["folio_order"],
        "flags": c["flags"],
        "operations": operations,
    }
    return _emit(args, header, meta, rows)


def _check_pfn(args: argparse.Namespace) -> int:
    from gmem import pfncheck

    if args.layout and args.layout_option:
        raise ValueError("layout: give the layout file once (FILE or --layout FILE)")
    layout = args.layout or args.layout_option
    exhaustive, random = args.exhaustive, args.random
    if not (exhaustive or random or layout):
        exhaustive, random = 16, 20
    steps = [
        s for s, on in (("layout", layout), ("exhaustive", exhaustive), ("random", random)) if on
    ]
    progress = Progress(not args.quiet)
    ok = True
    for n, step in enumerate(steps):
        report = io.StringIO()  # shown after the step, not across the progress bar
        with contextlib.redirect_stdout(report):
            if step == "layout":
                progress(n, len(steps), f"layout {layout}")
                ok &= pfncheck.check_layout_file(layout, args.ranges, args.seed)
            elif step == "exhaustive":
                progress(n, len(steps), f"exhaustive: every layout of 1..{exhaustive} pages")
                ok &= pfncheck.check_exhaustive(exhaustive)
            else:
                progress(n, len(steps), f"random: {random:,} layouts")
                ok &= pfncheck.check_random(
                    random, args.seed, lambda k: progress.note(f"layout {k + 1:,} of {random:,}")
                )
        progress.clear()
        sys.stdout.write(report.getvalue())
        sys.stdout.flush()
    progress(len(steps), len(steps), "done")
    return EXIT_OK if ok else EXIT_FAILED


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
    print(f"pfn_ranges({start}, {end}): {len(ranges):,} ranges")
    for s, e in ranges.tolist():
        print(f"  [{s:#x}, {e:#x})  {e - s:,} pages")
    pages = cache.page_pfns(start, end)
    parts = [np.arange(s, e, dtype=np.uint64) for s, e in ranges.tolist()]
    emitted = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    ok = np.array_equal(emitted, pages[pages != gmem.NO_PFN])
    print(f"ranges expand to exactly page_pfns of the populated pages: {'yes' if ok else 'NO'}")
    return EXIT_OK if ok else EXIT_FAILED


# ---------------------------------------------------------------------------------------
# The parser.


def _trace_format() -> str:
    from gmem import trace

    lines = [
        'trace format (version 1): JSON Lines, one object per line with an "op" and',
        "integer fields; byte offsets and sizes are multiples of 4096; blank lines and",
        "lines starting with # are skipped. Fields in [] are optional (0 by default;",
        "expect needs an error or a value):",
    ]
    for op, (required, optional) in trace.OPS.items():
        fields = [*required, *(f"[{k}]" for k in optional)]
        lines.append(f"  {op:<15} {', '.join(fields)}".rstrip())
    lines += [
        "Every line is checked before anything runs (FILE:LINE: what is wrong). The full",
        "description is installed with gmem: python -m pydoc gmem.trace (the same as",
        "docs/trace-format.md in the source).",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmem",
        description="A userspace model of KVM's guest_memfd.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gmem {gmem.__version__} ({DIST})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, epilog: str = EXIT_STATUS) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def runs(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--arch",
            action="append",
            choices=BUILTIN_ARCHS,
            help=f"only this arch, one of {', '.join(BUILTIN_ARCHS)} (repeatable; default: all)",
        )
        p.add_argument(
            "--hook-design",
            action="append",
            choices=DESIGNS,
            help=f"only this hook design, one of {', '.join(DESIGNS)} (repeatable; default: all)",
        )
        p.add_argument(
            "--fail-on-violation",
            action="store_true",
            help="exit 1 when a run reports a contract violation (for CI)",
        )
        p.add_argument("--json", action="store_true", help="print the results as JSON")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    d = command("demo", "a boot-like run under every arch and hook design")
    d.add_argument(
        "--size",
        type=_size,
        default=64 << 30,
        metavar="SIZE",
        help="guest size: bytes, or with a K, M, G or T suffix; page aligned, and at least "
        "32 I/O strides of max(2M, folio size) (default 64G)",
    )
    d.add_argument(
        "--folio-size",
        type=_folio_size,
        default=9,
        metavar="SIZE",
        help="folio size: a power of two from 4K to 1G (default 2M)",
    )
    d.add_argument(
        "--seed",
        type=_int_in(0),
        default=0,
        help="where the I/O buffers, pin and hole go: an integer >= 0 (default 0)",
    )
    d.add_argument("--write-trace", metavar="FILE", help="also write the run as a trace file")
    runs(d)
    d.set_defaults(func=_demo)

    r = command(
        "replay",
        "run a JSON Lines trace under every arch and hook design",
        _trace_format() + "\n\n" + EXIT_STATUS,
    )
    r.add_argument("trace", metavar="TRACE", help="the trace file (format below)")
    runs(r)
    r.set_defaults(func=_replay)

    c = command(
        "check-pfn",
        "validate the clamped PFN-range math: exhaustive, random, or on your layout",
        "With no LAYOUT and no option: --exhaustive 16 --random 20 (about 25 s).\n"
        "A layout file is a .npy array ((n, 3) rows or fields index, order, pfn; integer\n"
        "dtype) or a CSV file: rows index,order,pfn (decimal or 0x hex), optionally under a\n"
        "header that names the columns in any order; # lines are skipped.\n\n" + EXIT_STATUS,
    )
    c.add_argument("layout", nargs="?", metavar="LAYOUT", help="your layout file (.csv or .npy)")
    c.add_argument(
        "--layout", dest="layout_option", metavar="LAYOUT", help="the same, as an option"
    )
    c.add_argument(
        "--exhaustive",
        type=int,
        choices=[1, 2, 4, 8, 16],
        default=0,
        metavar="PAGES",
        help="every layout of every file of up to PAGES pages, every range; "
        "PAGES is one of 1, 2, 4, 8, 16 (16 takes about 20 s; default: off, or 16 when "
        "no check is named)",
    )
    c.add_argument(
        "--random",
        type=_int_in(0),
        default=0,
        metavar="N",
        help="N random large layouts (mixed orders up to 18, fragmented memory); N >= 0 "
        "(default: 0, or 20 when no check is named)",
    )
    c.add_argument(
        "--ranges",
        type=_int_in(0),
        default=200,
        metavar="N",
        help="random ranges per layout file, besides every folio (default 200)",
    )
    c.add_argument("--seed", type=_int_in(0), default=0, help="an integer >= 0 (default 0)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_check_pfn)

    b = command("bench", "measure gmem's performance targets side by side, say which are met")
    b.add_argument("--full", action="store_true", help="the large sizes (minutes, ~6 GB)")
    b.add_argument(
        "--plot",
        metavar="FILE.png",
        help=f"draw ratio and scaling plots (needs matplotlib: pip install '{DIST}[plot]')",
    )
    b.add_argument("--write-results", metavar="FILE.md", help="write a RESULTS.md")
    b.add_argument(
        "--fail-on-miss",
        action="store_true",
        help="exit 1 when a target is not met (for CI)",
    )
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_bench)

    p = command("layout", "print the clamped PFN ranges of a random folio layout")
    p.add_argument(
        "--pages",
        type=_int_in(1, 1 << 20),
        default=64,
        help="file size in pages, 1..1,048,576 (default 64)",
    )
    p.add_argument(
        "--max-order",
        type=_int_in(0, MAX_ORDER),
        default=4,
        help=f"largest folio order, 0..{MAX_ORDER} (default 4)",
    )
    p.add_argument(
        "--fragment",
        type=_fraction,
        default=0.1,
        help="fraction of memory fragmented first, 0..1 (default 0.1)",
    )
    p.add_argument("--seed", type=_int_in(0), default=1, help="an integer >= 0 (default 1)")
    p.add_argument(
        "--start", type=_int_in(0), default=3, help="range start index, >= 0 (default 3)"
    )
    p.add_argument(
        "--end",
        type=_int_in(0),
        default=None,
        help="range end index, --start..--pages (default: --pages)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="dump every folio")
    p.set_defaults(func=_layout)
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What one argument's type cannot check: rules between arguments, missing tools."""

    def error(message: str) -> NoReturn:
        parser.exit(EXIT_USAGE, f"gmem {args.command}: error: {message}\n")

    if args.command == "demo":
        from gmem import demo

        try:
            demo.check_size(args.size, args.folio_size)
        except ValueError as exc:
            error(f"argument --size: {str(exc).removeprefix('size: ')}")
    if args.command == "layout":
        end = args.pages if args.end is None else args.end
        if end > args.pages:
            error(f"argument --end: must be at most --pages ({args.pages:,}), got {end:,}")
        if args.start > end:
            error(f"argument --start: must be at most --end ({end:,}), got {args.start:,}")
    if args.command == "bench" and args.plot and importlib.util.find_spec("matplotlib") is None:
        error(f"argument --plot: needs matplotlib: pip install '{DIST}[plot]'")


def _interrupted() -> NoReturn:
    with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
        sys.stdout.flush()
    sys.stderr.write("\ngmem: interrupted\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _guarded(args: argparse.Namespace) -> int:
    from gmem.trace import TraceError

    try:
        return int(args.func(args))
    except BrokenPipeError:  # gmem ... | head: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except (ValueError, gmem.GmemError, TraceError, OSError) as exc:
        print(f"gmem: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.command == "bench" and argv is None and os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        # numpy loaded OpenBLAS with gmem, so its thread pool is sized already: start over
        # with one BLAS thread, that no pool competes with the measurement.
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "gmem", *sys.argv[1:]])
    if threading.current_thread() is not threading.main_thread():
        return _guarded(args)  # signals go to the main thread: nothing to wait for here
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["status"] = _guarded(args)
        except BaseException as exc:  # a bug: shown by the main thread, with its traceback
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"gmem {args.command}", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.25)
            if Progress.active is not None:
                Progress.active.tick()
    except KeyboardInterrupt:
        _interrupted()
    if "error" in outcome:
        raise outcome["error"]
    return int(outcome["status"])
