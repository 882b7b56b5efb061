"""A grid of workload replays: sizes x folio sizes x archs x designs x policies x workloads.

DOC: sweep

Each point generates a workload's trace (gmem.workloads) and replays it (gmem.trace) in a
fresh file; the points run in parallel processes on this machine
(``concurrent.futures.ProcessPoolExecutor``) or on a Dask cluster (``dask.distributed``,
the ``dask`` extra). A point's row carries its counters, the cost model's estimate and
the engine time; the rows make one table, one JSON document and three plots (estimated
cost against guest size per arch, hook calls per GiB, folio splits and merges).

Points that cannot exist are left out, not failed: ``hugetlb`` with 4 KiB folios, and a
size that is not a multiple of 16 strides of max(2 MiB, folio size).
"""

from __future__ import annotations

import itertools
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import gmem
from gmem import trace, workloads
from gmem._consts import BUILTIN_ARCHS, HOOK_DESIGNS, HUGE_POLICIES, MAX_ORDER, PAGE_SIZE

GiB = 1 << 30


@dataclass(frozen=True)
class Point:
    """One replay of the grid."""

    workload: str
    size: int
    folio_order: int
    arch: str
    hook_design: str
    huge_policy: str
    seed: int = 0


def grid(
    sizes: Sequence[int],
    folio_orders: Sequence[int],
    archs: Sequence[str],
    designs: Sequence[str],
    policies: Sequence[str],
    names: Sequence[str],
    seed: int = 0,
) -> tuple[list[Point], list[str]]:
    """The points of the grid, and a line for each combination left out (and why)."""
    for what, values, allowed in (
        ("archs", archs, BUILTIN_ARCHS),
        ("designs", designs, HOOK_DESIGNS),
        ("policies", policies, HUGE_POLICIES),
    ):
        for v in values:
            if v not in allowed:
                raise ValueError(f"{what}: unknown {v!r}; known: {', '.join(allowed)}")
    for o in folio_orders:
        if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o <= MAX_ORDER:
            raise ValueError(f"folio_orders: each must be an int in 0..{MAX_ORDER}, got {o!r}")
    points, skipped = [], []
    for name, size, order, policy in itertools.product(names, sizes, folio_orders, policies):
        if name not in workloads.WORKLOADS:
            raise ValueError(
                f"workloads: unknown {name!r}; known: {', '.join(workloads.WORKLOADS)}"
            )
        folio = PAGE_SIZE << order
        if policy == "hugetlb" and order == 0:
            skipped.append(f"{name} {size:,} B, {folio:,} B folios: hugetlb needs huge folios")
            continue
        try:
            workloads.check_size(size, order)
        except ValueError as exc:
            skipped.append(f"{name} {size:,} B, {folio:,} B folios: {exc}")
            continue
        for arch, design in itertools.product(archs, designs):
            points.append(Point(name, size, order, arch, design, policy, seed))
    return points, skipped


def run_point(point: Point, costs: dict[str, float] | None = None) -> dict[str, Any]:
    """Replay one point; its row (picklable: runs in a worker process or on Dask)."""
    model = gmem.CostModel(costs) if costs is not None else gmem.CostModel.default()
    recs = workloads.generate(
        point.workload,
        point.size,
        seed=point.seed,
        folio_order=point.folio_order,
        huge_policy=point.huge_policy,
    )
    t0 = time.perf_counter()
    s = trace.replay(trace.iter_records(recs), arch=point.arch, hook_design=point.hook_design)
    wall = time.perf_counter() - t0
    total, breakdown = model.estimate(s)
    row = s.row()
    return {
        **asdict(point),
        "folio_size": PAGE_SIZE << point.folio_order,
        "operations": s.operations,
        "hook_calls": row["hook_calls"],
        "hook_calls_per_gib": row["hook_calls"] * GiB / point.size,
        "pfn_ranges": row["pfn_ranges"],
        "conversions": s.stats["conversions"],
        "pages_converted": s.stats["pages_converted"],
        "faults": s.stats["folios_allocated"],
        "rmp_updates": row["rmp_updates"],
        "psmash": row["psmash"],
        "demotes": row["demotes"],
        "pages_scrubbed": row["pages_scrubbed"],
        "folio_splits": row["folio_splits"],
        "folio_merges": row["folio_merges"],
        "conversions_busy": row["conversions_busy"],
        "violations": row["violations"],
        "estimated_ns": round(total),
        "cost_breakdown_ns": {k: round(v) for k, v in breakdown.items()},
        "engine_ms": round(s.seconds * 1000, 3),
        "wall_ms": round(wall * 1000, 3),
    }


def run(
    points: Sequence[Point],
    *,
    jobs: int | None = None,
    dask: str | Any | None = None,
    costs: gmem.CostModel | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """The rows of every point, in the order of ``points``.

    ``dask``: a scheduler address (``tcp://host:8786``) or a ``dask.distributed.Client``;
    else ``jobs`` worker processes here (default: the CPUs; 1 runs in this process)."""
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs: must be an integer >= 1 (or None: the CPUs), got {jobs!r}")
    values = dict(costs.costs) if costs is not None else None
    if dask is not None:
        return _run_dask(points, dask, values, progress)
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(points) <= 1:
        rows = []
        for n, p in enumerate(points):
            rows.append(run_point(p, values))
            if progress:
                progress(n + 1, len(points))
        return rows
    with ProcessPoolExecutor(max_workers=jobs, initializer=_die_with_parent) as pool:
        futures = [pool.submit(run_point, p, values) for p in points]
        for n, fut in enumerate(futures):
            fut.result()
            if progress:
                progress(n + 1, len(points))
        return [f.result() for f in futures]


def _die_with_parent() -> None:
    """In a worker process: be killed when the process that started the sweep exits (an
    interrupted ``gmem sweep`` leaves no worker replaying on). Linux only; elsewhere the
    workers stop after their current point. The signal follows the *thread* that forked
    the worker: the one that runs :func:`run`, alive until the pool is done."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_dask(
    points: Sequence[Point],
    scheduler: str | Any,
    values: dict[str, float] | None,
    progress: Callable[[int, int], None] | None,
) -> list[dict[str, Any]]:
    try:
        import dask.distributed
    except ImportError:
        raise ValueError("dask: needs dask.distributed: pip install 'gmem-kvm[dask]'") from None
    dd: Any = dask.distributed  # untyped
    client = dd.Client(scheduler) if isinstance(scheduler, str) else scheduler
    try:
        futures = client.map(run_point, list(points), costs=values, pure=False)
        for n, _ in enumerate(dd.as_completed(futures)):
            if progress:
                progress(n + 1, len(points))
        return list(client.gather(futures))
    finally:
        if isinstance(scheduler, str):
            client.close()


def machine() -> str:
    """One line naming this machine, for captions."""
    from gmem._progress import cpu_name

    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


COLUMNS = [
    ("workload", "workload", "{}"),
    ("size", "size", "{}"),
    ("folio_size", "folio", "{}"),
    ("huge_policy", "policy", "{}"),
    ("arch", "arch", "{}"),
    ("hook_design", "design", "{}"),
    ("operations", "ops", "{:,}"),
    ("faults", "faults", "{:,}"),
    ("conversions", "conversions", "{:,}"),
    ("hook_calls", "hook calls", "{:,}"),
    ("rmp_updates", "RMP upd", "{:,}"),
    ("demotes", "demotes", "{:,}"),
    ("folio_splits", "splits", "{:,}"),
    ("folio_merges", "merges", "{:,}"),
    ("conversions_busy", "EAGAIN", "{:,}"),
    ("violations", "violations", "{:,}"),
    ("estimated_ns", "estimated", "{}"),
]


def _cell(key: str, fmt: str, value: Any) -> str:
    from gmem.cost import human_ns
    from gmem.demo import human_bytes

    if key in ("size", "folio_size"):
        return human_bytes(value).replace(",", "")
    if key == "estimated_ns":
        return human_ns(value)
    return fmt.format(value)


def table(rows: Iterable[dict[str, Any]]) -> str:
    """The rows as one text table."""
    rows = list(rows)
    cells = [[_cell(k, f, r[k]) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, (_, t, _) in enumerate(COLUMNS)]
    left = 6  # the keys, left-aligned
    out = [
        "  ".join(
            t.ljust(w) if i < left else t.rjust(w)
            for i, ((_, t, _), w) in enumerate(zip(COLUMNS, widths, strict=True))
        )
    ]
    out.append("  ".join("-" * w for w in widths))
    for c in cells:
        out.append(
            "  ".join(
                v.ljust(w) if i < left else v.rjust(w)
                for i, (v, w) in enumerate(zip(c, widths, strict=True))
            )
        )
    return "\n".join(out)


def document(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: gmem version, machine, the grid, the cost model, the rows."""
    return {
        "gmem_version": gmem.__version__,
        "machine": machine(),
        **meta,
        "note": "estimated_ns is a cost model's estimate, not a measurement",
        "runs": rows,
    }


def plot(rows: list[dict[str, Any]], path: str, *, caption: str | None = None) -> None:
    """Three panels, fit for a paper: estimated cost against guest size per arch (one
    workload at a time, log-log), hook calls per GiB per arch and design, and folio
    splits and merges per workload and policy. Needs matplotlib (the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows: nothing to plot")
    caption = caption or f"gmem {gmem.__version__} on {machine()}"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    _plot_cost(axes[0], rows)
    _plot_hooks(axes[1], rows)
    _plot_splits(axes[2], rows)
    fig.text(
        0.5,
        0.005,
        f"{caption}. Estimated time is a cost model (gmem.CostModel), not a measurement.",
        ha="center",
        va="bottom",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _size(n: int) -> str:
    from gmem.demo import human_bytes

    return human_bytes(n).replace(",", "")


def _pick(rows: list[dict[str, Any]], **want: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in want.items())]


def _most(rows: list[dict[str, Any]], key: str, prefer: Any) -> Any:
    values = [r[key] for r in rows]
    return prefer if prefer in values else max(set(values), key=values.count)


def _plot_cost(ax: Any, rows: list[dict[str, Any]]) -> None:
    design = _most(rows, "hook_design", "mainline")
    policy = _most(rows, "huge_policy", "none")
    folio = _most(rows, "folio_size", 2 << 20)
    sel = _pick(rows, hook_design=design, huge_policy=policy, folio_size=folio)
    name = _most(sel, "workload", "snp_boot")
    sel = _pick(sel, workload=name)
    for arch in sorted({r["arch"] for r in sel}):
        pts = sorted((r["size"] / GiB, r["estimated_ns"] / 1e9) for r in sel if r["arch"] == arch)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arch)
    from gmem.demo import human_bytes

    sizes = sorted({r["size"] for r in sel})
    ax.set_xscale("log", base=2)
    ax.set_xticks([n / GiB for n in sizes], [human_bytes(n).replace(",", "") for n in sizes])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("guest size")
    ax.set_ylabel("estimated time (s)")
    ax.set_title(
        f"{name}: estimated cost\n({_size(folio)} folios, {design}, policy {policy})",
        fontsize=10,
    )
    ax.legend(title="arch")
    ax.grid(True, which="both", alpha=0.3)


def _plot_hooks(ax: Any, rows: list[dict[str, Any]]) -> None:
    policy = _most(rows, "huge_policy", "none")
    folio = _most(rows, "folio_size", 2 << 20)
    size = max(r["size"] for r in rows)
    sel = _pick(rows, huge_policy=policy, folio_size=folio, size=size)
    names = sorted({r["workload"] for r in sel})
    series = sorted({(r["arch"], r["hook_design"]) for r in sel})
    width = 0.8 / max(1, len(series))
    for k, (arch, design) in enumerate(series):
        ys = [
            sum(
                r["hook_calls_per_gib"]
                for r in _pick(sel, workload=n, arch=arch, hook_design=design)
            )
            for n in names
        ]
        xs = [i + k * width for i in range(len(names))]
        ax.bar(xs, ys, width, label=f"{arch}/{design}")
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=8
    )
    ax.set_ylabel("hook calls per GiB of guest")
    ax.set_yscale("symlog")
    ax.set_title(
        f"hook calls per GiB\n({_size(size)} guest, {_size(folio)} folios, policy {policy})",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=2, loc="upper left")


def _plot_splits(ax: Any, rows: list[dict[str, Any]]) -> None:
    design = _most(rows, "hook_design", "mainline")
    size = max(r["size"] for r in rows)
    arch = _most(rows, "arch", "snp")
    sel = _pick(rows, hook_design=design, size=size, arch=arch)
    sel = [r for r in sel if r["folio_size"] > PAGE_SIZE]
    names = sorted({r["workload"] for r in sel})
    bars = [("none", "folio_splits"), ("hugetlb", "folio_splits"), ("hugetlb", "folio_merges")]
    width = 0.8 / len(bars)
    for k, (policy, key) in enumerate(bars):
        ys = [sum(r[key] for r in _pick(sel, workload=n, huge_policy=policy)) for n in names]
        xs = [i + k * width for i in range(len(names))]
        ax.bar(xs, ys, width, label=f"{key.split('_')[1]}, policy {policy}")
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=8
    )
    ax.set_ylabel("huge folios split or merged (count)")
    ax.set_title(f"folio splits and merges\n({_size(size)} guest, {arch}, {design})", fontsize=10)
    ax.legend(fontsize=8)
