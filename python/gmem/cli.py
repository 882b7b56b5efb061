"""The ``gmem`` command: the demo, trace replay, workloads, sweeps, PFN-math checking,
benchmarks, a layout printer.

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
from gmem._consts import BUILTIN_ARCHS, HOOK_DESIGNS, HUGE_POLICIES, MAX_ORDER, PAGE_SIZE
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
RUN_KEYS = [
    ("huge_policy", ("", "policy")),
    ("arch", ("", "arch")),
    ("hook_design", ("", "design")),
]
RUN_COLUMNS: list[tuple[str, tuple[str, str], str]] = [
    ("hook_calls", ("hook", "calls"), "{:,}"),
    ("pfn_ranges", ("PFN", "ranges"), "{:,}"),
    ("pages_scrubbed", ("scrubbed", "(pages)"), "{:,}"),
    ("rmp_updates", ("RMP", "updates"), "{:,}"),
    ("psmash", ("", "PSMASH"), "{:,}"),
    ("folio_splits", ("folio", "splits"), "{:,}"),
    ("folio_merges", ("folio", "merges"), "{:,}"),
    ("demotes", ("S-EPT", "demotes"), "{:,}"),
    ("conversions_busy", ("EAGAIN", "(busy)"), "{:,}"),
    ("rmp_left", ("RMP left", "(pages)"), "{:,}"),
    ("expected_errors", ("expected", "errors"), "{:,}"),
    ("violations", ("", "violations"), "{:,}"),
    ("engine_ms", ("engine", "(ms)"), "{:,.2f}"),
]


# With --costs: the cost model's estimate (docs/workloads.md), in ms of the guest's time.
ESTIMATE_COLUMNS: list[tuple[str, tuple[str, str], str]] = [
    ("estimated_ms", ("estimated", "(ms)"), "{:,.3f}"),
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
    estimated = any("estimated_ns" in r for r in ok_rows)
    for key, head, fmt in RUN_COLUMNS + (ESTIMATE_COLUMNS if estimated else []):
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


def _run_row(summary: Any, costs: Any = None) -> dict[str, Any]:
    row: dict[str, Any] = summary.row()
    row.update(
        ok=True,
        stats=summary.stats,
        arch_stats=summary.arch_stats,
        violation_list=summary.violation_records,
    )
    if costs is not None:
        total, breakdown = costs.estimate(summary)
        row.update(
            estimated_ns=round(total),
            estimated_ms=total / 1e6,
            cost_breakdown_ns={k: round(v) for k, v in breakdown.items()},
        )
    return row


def _costs(args: argparse.Namespace) -> Any:
    """The cost model --costs asked for (None without it)."""
    return getattr(args, "cost_model", None)


def _cost_meta(costs: Any) -> dict[str, Any]:
    if costs is None:
        return {}
    return {
        "cost_model": {
            "origin": costs.origin,
            "note": "estimated_ns is an estimate from per-event latencies, not a measurement",
            "latencies_ns": {r["key"]: r["ns"] for r in costs.table()},
        }
    }


def _failed_row(policy: str, arch: str, design: str, exc: Any) -> dict[str, Any]:
    return {
        "huge_policy": policy,
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
        if "cost_model" in meta:
            print(f"estimated: a cost model ({meta['cost_model']['origin']}), not a measurement")
    failed = any(not r["ok"] for r in rows)
    violated = any(r["ok"] and r["violations"] for r in rows)
    return EXIT_FAILED if failed or (args.fail_on_violation and violated) else EXIT_OK


# ---------------------------------------------------------------------------------------
# The commands.


def _demo(args: argparse.Namespace) -> int:
    from gmem import demo, trace

    order = args.folio_size
    costs = _costs(args)  # a bad cost file is refused before anything runs
    progress = Progress(not args.json and not args.quiet)
    if args.write_trace:
        with open(args.write_trace, "w") as f:
            lines = 0
            policy = (args.huge_policy or ["none"])[0]
            for line in trace.dump_lines(demo.boot_trace(args.size, order, args.seed, policy)):
                f.write(line)
                lines += 1
        print(f"wrote {lines:,} lines to {args.write_trace}", file=sys.stderr)
    results = demo.run_all(
        args.size,
        order,
        archs=tuple(args.arch or BUILTIN_ARCHS),
        designs=tuple(args.hook_design or DESIGNS),
        # hugetlb needs huge folios: with 4 KiB ones the demo runs "none" only.
        policies=tuple(args.huge_policy or (HUGE_POLICIES if order else ("none",))),
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
        **_cost_meta(costs),
    }
    return _emit(args, header, meta, [_run_row(r, costs) for r in results])


def _replay(args: argparse.Namespace) -> int:
    from gmem import trace

    create, operations = trace.validate(args.trace)  # every line, before anything runs
    costs = _costs(args)
    archs, designs = tuple(args.arch or BUILTIN_ARCHS), tuple(args.hook_design or DESIGNS)
    progress = Progress(not args.json and not args.quiet)
    rows = []
    policies = tuple(args.huge_policy or [create.args["huge_policy"]])
    runs = [(p, a, d) for p in policies for a in archs for d in designs]
    for n, (p, a, d) in enumerate(runs):
        progress(n, len(runs), f"{p}: {a}/{d}")
        try:
            summary = trace.replay(
                trace.stream(args.trace),
                arch=a,
                hook_design=d,
                huge_policy=p,
                where=args.trace,
                progress=lambda k: progress.note(f"{k:,} of {operations:,} operations"),
            )
            rows.append(_run_row(summary, costs))
        except trace.TraceError as exc:
            rows.append(_failed_row(p, a, d, exc))
    progress(len(runs), len(runs), "done")
    c = create.args
    header = f"gmem replay {args.trace}: {operations:,} operations on a {c['size']:,}-byte file"
    meta = {
        "trace": args.trace,
        "size": c["size"],
        "folio_order": c["folio_order"],
        "flags": c["flags"],
        "operations": operations,
        **_cost_meta(costs),
    }
    return _emit(args, header, meta, rows)


# The options only some workloads take: option dest -> (keyword, workloads).
_WORKLOAD_OPTIONS = {
    "vcpus": ("vcpus", ("snp_boot", "tdx_boot")),
    "eager": ("lazy", ("tdx_boot",)),
    "fraction": ("fraction", ("balloon",)),
}


def _workload_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "seed": args.seed,
        "folio_order": args.folio_size,
        "huge_policy": args.huge_policy,
    }
    for dest, (key, _) in _WORKLOAD_OPTIONS.items():
        value = getattr(args, dest)
        if value is not None and value is not False:
            kwargs[key] = not value if dest == "eager" else value
    return kwargs


def _workload(args: argparse.Namespace) -> int:
    from gmem import trace, workloads

    records = workloads.generate(args.name, args.size, **_workload_kwargs(args))
    if not args.write_trace and not args.summary:
        for line in trace.dump_lines(records):
            sys.stdout.write(line)
        return EXIT_OK
    if args.write_trace:
        with open(args.write_trace, "w") as f:
            s = workloads.summarize(_written(records, f))
        lines = s["operations"] + s["expected_errors"] + 1
        print(f"wrote {lines:,} lines to {args.write_trace}", file=sys.stderr)
    else:
        s = workloads.summarize(records)
    if args.json:
        json.dump(
            {"gmem_version": gmem.__version__, "workload": args.name, **s}, sys.stdout, indent=1
        )
        sys.stdout.write("\n")
        return EXIT_OK
    print(
        f"gmem workload {args.name}: a {_human(s['size'])} guest, "
        f"{_human(PAGE_SIZE << s['folio_order'])} folios, policy {s['huge_policy']}, "
        f"seed {args.seed}: {s['operations']:,} operations"
    )
    width = max(len(op) for op in s["ops"])
    for op, n in s["ops"].items():
        print(f"  {op:<{width}}  {n:>12,}")
    print(f"  pages made shared {s['pages_to_shared']:,}, made private {s['pages_to_private']:,}")
    return EXIT_OK


def _written(records: Any, f: Any) -> Any:
    """The records, each written to ``f`` as a trace line as it passes."""
    from gmem import trace

    for r in records:
        f.write(trace.dumps([r]))
        yield r


def _human(n: int) -> str:
    from gmem.demo import human_bytes

    return human_bytes(n)


def _sweep(args: argparse.Namespace) -> int:
    from gmem import sweep
    from gmem.workloads import WORKLOADS

    sizes = args.size or [64 << 20, 256 << 20, 1 << 30]
    orders = args.folio_size or [0, 9]
    points, skipped = sweep.grid(
        sizes,
        orders,
        args.arch or BUILTIN_ARCHS,
        args.hook_design or ["mainline"],
        args.huge_policy or HUGE_POLICIES,
        args.workload or list(WORKLOADS),
        seed=args.seed,
    )
    if not points:
        raise ValueError("the grid is empty: " + "; ".join(skipped))
    progress = Progress(not args.json and not args.quiet)
    where = f"Dask at {args.dask}" if args.dask else f"{args.jobs or os.cpu_count()} processes"
    progress(0, len(points), f"{len(points):,} runs on {where}")
    rows = sweep.run(
        points,
        jobs=args.jobs,
        dask=args.dask,
        costs=getattr(args, "cost_model", None),
        progress=lambda n, total: progress(n, total, f"{n:,} of {total:,} runs on {where}"),
    )
    progress.clear()
    meta = {
        "command": "sweep",
        "grid": {
            "sizes": sizes,
            "folio_sizes": [PAGE_SIZE << o for o in orders],
            "archs": list(args.arch or BUILTIN_ARCHS),
            "hook_designs": list(args.hook_design or ["mainline"]),
            "huge_policies": list(args.huge_policy or HUGE_POLICIES),
            "workloads": list(args.workload or WORKLOADS),
            "seed": args.seed,
        },
        "skipped": skipped,
        **_cost_meta(getattr(args, "cost_model", None) or gmem.CostModel.default()),
    }
    doc = sweep.document(rows, meta)
    if args.write_json:
        with open(args.write_json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    if args.plot:
        sweep.plot(rows, args.plot)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(
            f"gmem sweep: {len(rows):,} runs on {where} ({sweep.machine()}, gmem "
            f"{gmem.__version__}); estimated: a cost model, not a measurement"
        )
        print(sweep.table(rows))
        for line in skipped:
            print(f"left out: {line}")
        for path in filter(None, (args.write_json, args.plot)):
            print(f"wrote {path}")
    return EXIT_OK


def _check_pfn(args: argparse.Namespace) -> int:
    from gmem import pfncheck

    if args.layout and args.layout_option:
        raise ValueError("layout: give the layout file once (FILE or --layout FILE)")
    layout = args.layout or args.layout_option
    exhaustive, random, split_merge = args.exhaustive, args.random, args.split_merge
    if not (exhaustive or random or split_merge or layout):
        exhaustive, random, split_merge = 16, 20, 20
    steps = [
        s
        for s, on in (
            ("layout", layout),
            ("exhaustive", exhaustive),
            ("random", random),
            ("split-merge", split_merge),
        )
        if on
    ]
    progress = Progress(not args.quiet)
    ok = True
    for n, step in enumerate(steps):
        report = io.StringIO()  # shown after the step, not across the progress bar
        with contextlib.redirect_stdout(report):
            if step == "layout":
                progress(n, len(steps), f"layout {layout}")
                ok &= pfncheck.check_layout_file(layout, args.ranges, args.seed)
            elif step == "split-merge":
                progress(n, len(steps), f"split-merge: {split_merge:,} sequences")
                ok &= pfncheck.check_split_merge(
                    split_merge,
                    args.seed,
                    lambda k: progress.note(f"sequence {k + 1:,} of {split_merge:,}"),
                )
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
            "--huge-policy",
            action="append",
            choices=HUGE_POLICIES,
            help="only this huge-folio policy, none (never split) or hugetlb (split on share, "
            "merge on unshare; docs/model.md) (repeatable; default: "
            + ("both)" if p.prog.endswith("demo") else "the trace's create line)"),
        )
        p.add_argument(
            "--fail-on-violation",
            action="store_true",
            help="exit 1 when a run reports a contract violation (for CI)",
        )
        p.add_argument(
            "--costs",
            nargs="?",
            const="default",
            metavar="FILE",
            help="add an estimated time per run from a cost model: the defaults, or FILE "
            "(.toml or .json; docs/workloads.md) over them",
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
        "With no LAYOUT and no option: --exhaustive 16 --random 20 --split-merge 20\n"
        "(about 25 s).\n"
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
        "--split-merge",
        type=_int_in(0),
        default=0,
        metavar="N",
        help="N random conversion sequences on huge_policy='hugetlb' files: PFNs unchanged "
        "across every split and merge; N >= 0 (default: 0, or 20 when no check is named)",
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

    from gmem.workloads import WORKLOADS

    w = command(
        "workload",
        "print or save the trace of a realistic guest workload (docs/workloads.md)",
        "workloads: " + ", ".join(WORKLOADS) + "\n"
        "Without --write-trace or --summary the trace goes to standard output (JSON Lines,\n"
        "the format of gmem replay --help); gmem replay runs a saved one.\n\n" + EXIT_STATUS,
    )
    w.add_argument("name", choices=list(WORKLOADS), metavar="NAME", help="the workload (below)")
    w.add_argument(
        "--size",
        type=_size,
        required=True,
        metavar="SIZE",
        help="guest size: bytes, or with a K, M, G or T suffix; a multiple of max(2M, folio "
        "size), at least 16 of them",
    )
    w.add_argument(
        "--folio-size",
        type=_folio_size,
        default=9,
        metavar="SIZE",
        help="folio size: a power of two from 4K to 1G (default 2M)",
    )
    w.add_argument(
        "--huge-policy",
        choices=HUGE_POLICIES,
        default="none",
        help="the create line's huge-folio policy: none or hugetlb (needs folios > 4K; "
        "default none; gmem replay --huge-policy overrides it)",
    )
    w.add_argument("--seed", type=_int_in(0), default=0, help="an integer >= 0 (default 0)")
    w.add_argument(
        "--vcpus",
        type=_int_in(1, 254),
        default=None,
        help="vCPUs, 1..254 (snp_boot and tdx_boot only; default 4)",
    )
    w.add_argument(
        "--eager",
        action="store_true",
        help="accept all memory at boot, not lazily (tdx_boot only)",
    )
    w.add_argument(
        "--fraction",
        type=_fraction,
        default=None,
        help="fraction of free memory ballooned out, 0..1 (balloon only; default 0.25)",
    )
    w.add_argument("--write-trace", metavar="FILE", help="write the trace here, print a summary")
    w.add_argument("--summary", action="store_true", help="print a summary, not the trace")
    w.add_argument("--json", action="store_true", help="print the summary as JSON")
    w.set_defaults(func=_workload)

    s = command(
        "sweep",
        "replay workloads over a grid of sizes, folio sizes, archs, designs and policies",
        "Every option that names a value is repeatable; the grid is their product, less the\n"
        "points that cannot exist (hugetlb with 4K folios, a size the workload cannot lay\n"
        "out). Runs in parallel processes here, or on a Dask cluster with --dask.\n\n"
        + EXIT_STATUS,
    )
    s.add_argument(
        "--size",
        action="append",
        type=_size,
        metavar="SIZE",
        help="guest size, with a K, M, G or T suffix (repeatable; default 64M, 256M, 1G)",
    )
    s.add_argument(
        "--folio-size",
        action="append",
        type=_folio_size,
        metavar="SIZE",
        help="folio size, a power of two from 4K to 1G (repeatable; default 4K and 2M)",
    )
    s.add_argument(
        "--arch",
        action="append",
        choices=BUILTIN_ARCHS,
        help=f"one of {', '.join(BUILTIN_ARCHS)} (repeatable; default: all)",
    )
    s.add_argument(
        "--hook-design",
        action="append",
        choices=DESIGNS,
        help=f"one of {', '.join(DESIGNS)} (repeatable; default: mainline)",
    )
    s.add_argument(
        "--huge-policy",
        action="append",
        choices=HUGE_POLICIES,
        help="none or hugetlb (repeatable; default: both)",
    )
    s.add_argument(
        "--workload",
        action="append",
        choices=list(WORKLOADS),
        help=f"one of {', '.join(WORKLOADS)} (repeatable; default: all)",
    )
    s.add_argument("--seed", type=_int_in(0), default=0, help="an integer >= 0 (default 0)")
    s.add_argument(
        "--jobs",
        type=_int_in(1, 1024),
        default=None,
        help="worker processes, 1..1024 (default: the CPUs)",
    )
    s.add_argument(
        "--dask",
        metavar="ADDRESS",
        help=f"run on this Dask scheduler (tcp://host:8786; pip install '{DIST}[dask]')",
    )
    s.add_argument(
        "--costs",
        metavar="FILE",
        help="a cost file (.toml or .json) over the default cost model",
    )
    s.add_argument("--write-json", metavar="FILE", help="write the rows as a JSON document")
    s.add_argument(
        "--plot",
        metavar="FILE.png",
        help=f"draw the three plots (needs matplotlib: pip install '{DIST}[plot]')",
    )
    s.add_argument("--json", action="store_true", help="print the JSON document")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_sweep)

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
    if getattr(args, "costs", None) is not None:  # demo, replay: before anything runs
        try:
            args.cost_model = (
                gmem.CostModel.default()
                if args.costs == "default"
                else gmem.CostModel.load(args.costs)
            )
        except ValueError as exc:
            error(f"argument --costs: {exc}")
    if args.command == "workload":
        from gmem import workloads

        for dest, (_, names) in _WORKLOAD_OPTIONS.items():
            value = getattr(args, dest)
            if value is not None and value is not False and args.name not in names:
                flag = "--" + dest.replace("_", "-")
                error(f"argument {flag}: only {' and '.join(names)} take it, not {args.name}")
        if args.huge_policy == "hugetlb" and args.folio_size == 0:
            error("argument --huge-policy: hugetlb needs a folio size above 4K (--folio-size)")
        try:
            workloads.check_size(args.size, args.folio_size)
        except ValueError as exc:
            error(f"argument --size: {str(exc).removeprefix('size: ')}")
        args.summary = args.summary or args.json
    if args.command == "layout":
        end = args.pages if args.end is None else args.end
        if end > args.pages:
            error(f"argument --end: must be at most --pages ({args.pages:,}), got {end:,}")
        if args.start > end:
            error(f"argument --start: must be at most --end ({end:,}), got {args.start:,}")
    if args.command == "sweep":
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            error(f"argument --plot: needs matplotlib: pip install '{DIST}[plot]'")
        if args.dask and importlib.util.find_spec("distributed") is None:
            error(f"argument --dask: needs dask.distributed: pip install '{DIST}[dask]'")
        if args.dask and args.jobs:
            error("argument --jobs: the Dask cluster has its own workers; give one of the two")
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
