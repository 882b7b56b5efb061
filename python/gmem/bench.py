"""``gmem bench``: the performance targets of docs/performance.md, measured side by side.

Each measurement is the best of several repeats (time.perf_counter), or, for the
IntervalMap and get_pfn targets, the median of repeats with the spread beside it, cold
(fresh random operations each pass) and warm (one set replayed); every ratio is between
two figures of the same run, since the machines are noisy.  ``gmem bench`` runs with
OPENBLAS_NUM_THREADS=1 (the command restarts itself with it) so that no BLAS thread pool
competes with the measurement.  The quick suite runs
in under a minute here; ``--full`` uses the large sizes (1 TiB of 4 KiB folios, 10**6
runs).  ``--plot FILE.png`` draws the ratios and the scaling curves (the ``plot`` extra),
``--write-results FILE.md`` writes bench/RESULTS.md.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import gmem
import gmem.reference as ref

GiB, TiB = 1 << 30, 1 << 40


def timings(
    fn: Callable[[], Any], repeat: int = 5, setup: Callable[[], Any] | None = None
) -> list[float]:
    """Seconds of each of ``repeat`` calls of fn (after setup, untimed, before each)."""
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def spread(times: list[float], scale: float = 1.0) -> tuple[float, float, float]:
    """(median, min, max) of ``times``, each multiplied by ``scale``."""
    xs = sorted(t * scale for t in times)
    return xs[len(xs) // 2], xs[0], xs[-1]


def timeit(fn: Callable[[], Any], repeat: int = 5, setup: Callable[[], Any] | None = None) -> float:
    """Best seconds of ``repeat`` calls of fn (after setup, untimed, before each): the
    least disturbed run, as timeit reports, since other load only ever adds time."""
    return min(timings(fn, repeat, setup))


@dataclass
class Target:
    name: str
    measured: float
    limit: float
    unit: str
    better: str  # "lower" or "higher"
    detail: str = ""

    @property
    def met(self) -> bool:
        return (
            self.measured <= self.limit if self.better == "lower" else self.measured >= self.limit
        )

    def row(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "measured": self.measured,
            "limit": self.limit,
            "unit": self.unit,
            "met": self.met,
            "detail": self.detail,
        }


@dataclass
class Suite:
    full: bool = False
    targets: list[Target] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    scaling: list[dict[str, Any]] = field(default_factory=list)

    def add(self, *args: Any, **kw: Any) -> None:
        self.targets.append(Target(*args, **kw))


def _layout(nr: int, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = np.arange(nr, dtype=np.uint64) << np.uint64(order)
    pfn = np.random.default_rng(0).permutation(nr).astype(np.uint64) << np.uint64(order)
    return index, np.full(nr, order, dtype=np.uint64), pfn


def bench_walk(s: Suite) -> None:
    nr, order = 1 << 19, 9  # 1 TiB of 2 MiB folios, scattered PFNs
    cols = _layout(nr, order)
    cache = gmem.FolioCache()
    cache.add_folios(*cols)
    start, end = 256, (nr << order) - 256
    t_engine = timeit(lambda: cache.pfn_ranges(start, end), 25)
    ends = cols[2] + (np.uint64(1) << cols[1])

    def floor() -> None:
        out = np.empty((nr, 2), dtype=np.uint64)
        out[:, 0] = cols[2]
        out[:, 1] = ends

    t_floor = timeit(floor, 25)
    oracle = ref.FolioCache()
    small = 1 << 15
    oracle.add_folios(*(c[:small] for c in cols))
    t_ref = timeit(lambda: oracle.pfn_ranges(start, (small << order) - 256), 3) * nr / small
    s.figures.update(
        walk_engine_ms=t_engine * 1e3, walk_floor_ms=t_floor * 1e3, walk_ref_ms_scaled=t_ref * 1e3
    )
    s.add("pfn_ranges ns per folio (1 TiB of 2 MiB folios)", t_engine / nr * 1e9, 5, "ns", "lower")
    s.add("pfn_ranges vs numpy writing the same pairs", t_engine / t_floor, 2, "x", "lower")
    s.add(
        "pfn_ranges vs the reference",
        t_ref / t_engine,
        200,
        "x",
        "higher",
        "reference timed on 2**15 folios, scaled per folio",
    )
    s.add("1 TiB of 2 MiB folios walked", t_engine * 1e3, 3, "ms", "lower")
    t_clamp = timeit(lambda: gmem.clamp_folio_ranges(*cols, start, end), 25)
    s.add("clamp_folio_ranges ns per folio (validates too)", t_clamp / nr * 1e9, 5, "ns", "lower")
    s.add("clamp_folio_ranges vs numpy writing the same pairs", t_clamp / t_floor, 2, "x", "lower")


def bench_convert(s: Suite) -> None:
    f = gmem.GuestMemfd(TiB, folio_order=9, arch="snp")
    f.fallocate(0, f.nr_pages)

    def round_trip(g: Any) -> None:
        g.set_attributes(0, g.nr_pages, gmem.SHARED)
        g.set_attributes(0, g.nr_pages, gmem.PRIVATE)

    t_conv = timeit(lambda: round_trip(f), 5)
    t_walk = timeit(lambda: f.pfn_ranges(0, f.nr_pages), 9)
    f.close()
    small = 64 * GiB if not s.full else TiB
    r = ref.GuestMemfd(small, folio_order=9, arch="snp")
    r.fallocate(0, r.nr_pages)
    t_ref = timeit(lambda: round_trip(r), 1) * (TiB // small)
    r.close()
    s.figures.update(convert_1tib_ms=t_conv * 1e3, convert_ref_ms_scaled=t_ref * 1e3)
    s.add(
        "SNP 1 TiB round trip vs the reference",
        t_ref / t_conv,
        100,
        "x",
        "higher",
        f"reference timed on {small // GiB} GiB, scaled per folio",
    )
    s.add(
        "one SNP conversion of 1 TiB vs pfn_ranges of it",
        t_conv / 2 / t_walk,
        1.6,
        "x",
        "lower",
        "a round trip is two conversions",
    )


def bench_scaling(s: Suite) -> None:
    """Conversion cost against guest size with 1 GiB folios: it follows folios, not pages."""
    sizes = [1, 16, 256, 4096, 65536] if s.full else [1, 16, 256, 4096]
    for order, label in [(18, "1 GiB folios"), (9, "2 MiB folios")]:
        for gib in sizes:
            if order == 9 and gib > (4096 if s.full else 256):
                continue  # 2**21 folios and up: the 1 GiB series makes the point
            f = gmem.GuestMemfd(gib * GiB, folio_order=order, arch="snp")
            f.fallocate(0, f.nr_pages)

            def round_trip(g: Any = f) -> None:
                g.set_attributes(0, g.nr_pages, gmem.SHARED)
                g.set_attributes(0, g.nr_pages, gmem.PRIVATE)

            t = timeit(round_trip, 3)
            folios = f.nr_pages >> order
            s.scaling.append(
                {"series": label, "guest_gib": gib, "folios": folios, "round_trip_us": t * 1e6}
            )
            f.close()


def _interval_ops(n_pages: int, calls: int, seed: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_pages - 16, calls)
    ends = starts + rng.integers(1, 16, calls)
    values = rng.choice([0, 8], calls)
    return list(zip(starts.tolist(), ends.tolist(), values.tolist(), strict=True))


def _populated_map(runs: int) -> Any:
    n_pages = 10 * runs
    starts = np.arange(0, n_pages, 10, dtype=np.uint64)
    m = gmem.IntervalMap(n_pages)
    m.store_many(starts, starts + np.uint64(5), np.full(len(starts), 8))
    return m


def _cold_and_warm(
    m: Any, n_pages: int, calls: int, repeat: int
) -> dict[str, tuple[float, float, float]]:
    """us per store and per load on @m, median/min/max over @repeat passes: "cold" draws
    fresh random operations before each pass (untimed), "warm" replays one set."""
    ops = _interval_ops(n_pages, calls, 1)
    probes = [a for a, _, _ in _interval_ops(n_pages, calls, 2)]
    fresh: dict[str, Any] = {}
    seeds = iter(range(100, 100 + 4 * repeat))

    def new_ops() -> None:
        fresh["ops"] = _interval_ops(n_pages, calls, next(seeds))

    def new_probes() -> None:
        fresh["probes"] = [a for a, _, _ in _interval_ops(n_pages, calls, next(seeds))]

    def store(batch: list[tuple[int, int, int]]) -> None:
        for a, b, c in batch:
            m.store(a, b, c)

    def load(batch: list[int]) -> None:
        for i in batch:
            m.load(i)

    us = 1e6 / calls
    return {
        "store cold": spread(timings(lambda: store(fresh["ops"]), repeat, new_ops), us),
        "load cold": spread(timings(lambda: load(fresh["probes"]), repeat, new_probes), us),
        "store warm": spread(timings(lambda: store(ops), repeat), us),
        "load warm": spread(timings(lambda: load(probes), repeat), us),
    }


def _fmt(t: tuple[float, float, float]) -> str:
    return f"median {t[0]:.3f}, spread {t[1]:.3f}..{t[2]:.3f} us"


def bench_interval_map(s: Suite) -> None:
    """Stores and loads from Python at 10**5 and 10**6 live runs, cold and warm; the
    targets are judged on the median of the cold passes."""
    from gmem import benchpeers

    repeat = 9 if s.full else 5
    for runs in (10**5, 10**6):
        m = _populated_map(runs)
        got = _cold_and_warm(m, 10 * runs, 2000, repeat)
        for what, t in got.items():
            key = f"interval_map_{what.replace(' ', '_')}_{runs:.0e}_us"
            s.figures[key] = t[0]
            s.figures[key.replace("_us", "_min_us")] = t[1]
            s.figures[key.replace("_us", "_max_us")] = t[2]
        for op, limit in (("store", 0.5), ("load", 0.25)):
            cold, warm = got[f"{op} cold"], got[f"{op} warm"]
            s.add(
                f"IntervalMap.{op} from Python @{runs:.0e} runs, cold",
                cold[0],
                limit,
                "us",
                "lower",
                f"{_fmt(cold)} over {repeat}; warm {_fmt(warm)}",
            )
    # The peers store at 10**5 runs (intervaltree at fewer: it is slow to fill).
    runs, n_pages = 10**5, 10**6
    t_store = _cold_and_warm(_populated_map(runs), n_pages, 2000, repeat)["store cold"]
    peers = {"sortedcontainers": 25, "intervaltree": 100}
    starts = np.arange(0, n_pages, 10, dtype=np.uint64)
    for name, want in peers.items():
        try:
            peer = benchpeers.PEERS[name](n_pages)
        except ImportError:
            s.figures[f"{name}_missing"] = 1
            continue
        size = runs if name == "sortedcontainers" else min(runs, 10**5 if s.full else 2 * 10**4)
        for st in starts[:size].tolist():
            peer.store(st, st + 5, 8)
        p_store = _cold_and_warm(peer, n_pages, 500, 3)["store cold"]
        s.figures[f"{name}_store_us"] = p_store[0]
        s.add(
            f"IntervalMap.store vs {name}",
            p_store[0] / t_store[0],
            want,
            "x",
            "higher",
            f"{name} at {size:.0e} runs, cold, medians",
        )
    # The bulk path against a bitmap.
    bulk_s = np.random.default_rng(3).integers(0, n_pages - 64, 100_000).astype(np.uint64)
    bulk_e = bulk_s + np.uint64(32)
    bulk_v = np.where(np.arange(len(bulk_s)) % 2, 8, 0).astype(np.uint64)
    fresh = gmem.IntervalMap(n_pages)
    t_bulk = timeit(lambda: fresh.store_many(bulk_s, bulk_e, bulk_v), 3)
    try:
        bm = benchpeers.RoaringMap(n_pages)
        t_bm = timeit(lambda: bm.store_many(bulk_s, bulk_e, bulk_v), 3)
        s.add("store_many vs pyroaring (10**5 ranges)", t_bm / t_bulk, 1, "x", "higher")
    except ImportError:
        s.figures["pyroaring_missing"] = 1


def bench_get_pfn(s: Suite) -> None:
    """get_pfn of random pages of a 16 GiB guest of 4 KiB folios (2**22 folios, so the
    lookup is a tree search), against the cheapest bound call there is,
    IntervalMap(1).load(0); medians of cold passes (fresh random indexes each).  The target
    is judged on pages already faulted in (a lookup); the first touch of a page, which
    also zeroes it, is reported beside it."""
    f = gmem.GuestMemfd(16 * GiB, folio_order=0)
    f.fallocate(0, f.nr_pages)
    repeat, calls = (9 if s.full else 5), 20_000
    rng = np.random.default_rng(4)
    fresh: dict[str, list[int]] = {}

    def new_indexes() -> None:
        fresh["i"] = rng.integers(0, f.nr_pages, calls).tolist()

    def get_pfns() -> None:
        for i in fresh["i"]:
            f.get_pfn(i)

    one = gmem.IntervalMap(1)
    zeros = [0] * calls

    def floor() -> None:
        for i in zeros:
            one.load(i)

    us = 1e6 / calls
    t_first = spread(timings(get_pfns, repeat, new_indexes), us)
    f.get_pfns(np.arange(f.nr_pages, dtype=np.uint64))  # every page faulted in
    t = spread(timings(get_pfns, repeat, new_indexes), us)
    t_floor = spread(timings(floor, repeat), us)
    f.close()
    s.figures.update(get_pfn_us=t[0], get_pfn_min_us=t[1], get_pfn_max_us=t[2])
    s.figures["get_pfn_first_touch_us"] = t_first[0]
    s.figures["bound_call_floor_us"] = t_floor[0]
    s.add(
        "get_pfn, 16 GiB of 4 KiB folios, vs IntervalMap(1).load(0)",
        t[0] / t_floor[0],
        2,
        "x",
        "lower",
        f"random faulted-in pages: get_pfn {_fmt(t)}; first touch median {t_first[0]:.3f} us; "
        f"the floor {_fmt(t_floor)}",
    )


def bench_hooks(s: Suite) -> None:
    class PerRange(gmem.Arch):
        config = frozenset({"FREE_ON_SHARED_CONVERSION"})

        def make_shared(self, *args: Any) -> None:  # (start_pfn, end_pfn)
            pass

    class Batched(PerRange):
        batched = True

        def make_shared(self, *args: Any) -> None:  # (ranges,)
            pass

    def per_range(arch: Any) -> float:
        f = gmem.GuestMemfd(1 << 29, folio_order=0, arch=arch)
        f.fallocate(0, f.nr_pages)

        def setup() -> None:
            f.set_attributes(0, f.nr_pages, gmem.PRIVATE)

        t = timeit(lambda: f.set_attributes(0, f.nr_pages, gmem.SHARED), 3, setup)
        f.close()
        return t / f.nr_pages

    t_one, t_batch = per_range(PerRange()), per_range(Batched())
    t_cxx = per_range(gmem.arch.Recorder({"FREE_ON_SHARED_CONVERSION"}))
    s.add(
        "Python hook, one call per range",
        t_one * 1e9,
        150,
        "ns",
        "lower",
        f"C++ Recorder on the same conversion: {t_cxx * 1e9:.1f} ns per range",
    )
    s.add("Python hook, batched", t_batch * 1e9, 15, "ns", "lower")


def bench_memory(s: Suite) -> None:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for label, size, order in [
        ("1 TiB of 2 MiB folios", TiB, 9),
        ("64 GiB of 4 KiB folios", 64 * GiB, 0),
    ]:
        f = gmem.GuestMemfd(size, folio_order=order)
        f.fallocate(0, f.nr_pages)
        nr = len(f.folios(0, 1 << order)) and f.nr_pages >> order
        cache = gmem.FolioCache()
        cache.add_folios(*_layout(nr, order))
        s.add(f"metadata per folio, {label}", cache.memory_bytes / nr, 16, "bytes", "lower")
        f.close()
    if s.full:  # in a fresh process, so that nothing measured before counts
        import subprocess

        code = (
            "import gmem, resource\n"
            "f = gmem.GuestMemfd(1 << 40, folio_order=0)\n"
            "f.fallocate(0, f.nr_pages)\n"
            "f.set_attributes(0, f.nr_pages, 0)\n"
            "f.close()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        rss = int(out.stdout.split()[-1])
        s.add(
            "peak RSS: 1 TiB of 4 KiB folios, filled, converted, torn down",
            rss / 1e9,
            6,
            "GB",
            "lower",
            "2**28 folios, in a fresh process",
        )
    s.figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s.figures["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024


def bench_bulk(s: Suite) -> None:
    """The bulk forms against a loop of single calls, and one get_pfn against the cost of a
    call that only converts an integer (IntervalMap(1).load(0)), side by side: each
    repeat times every contender once, in turn, so load on the machine hits them alike."""
    n = 10**6 if s.full else 2 * 10**5
    f = gmem.GuestMemfd(16 * GiB, folio_order=0, flags=gmem.FLAG_MMAP | gmem.FLAG_INIT_SHARED)
    f.fallocate(0, f.nr_pages)
    rng = np.random.default_rng(5)
    seq = np.arange(n, dtype=np.uint64)
    rnd = rng.integers(0, f.nr_pages, n).astype(np.uint64)
    f.get_pfns(seq)
    f.get_pfns(rnd)  # faulted in: the figures are of faults on present folios
    f.host_read_many(seq)
    seq_l, rnd_l, zeros = seq.tolist(), rnd.tolist(), [0] * n
    floor_map = gmem.IntervalMap(1)
    tokens = rng.integers(1, 2**63, n).astype(np.uint64)
    tok_l = tokens.tolist()

    def loop(call: Any, args: list[int]) -> Callable[[], None]:
        def run() -> None:
            for i in args:
                call(i)

        return run

    def loop2(call: Any, args: list[int], vals: list[int]) -> Callable[[], None]:
        def run() -> None:
            for i, v in zip(args, vals, strict=True):
                call(i, v)

        return run

    contenders: dict[str, Callable[[], Any]] = {
        "floor": loop(floor_map.load, zeros),
        "get_pfn_random": loop(f.get_pfn, rnd_l),
        "get_pfn_seq": loop(f.get_pfn, seq_l),
        "get_pfns_random": lambda: f.get_pfns(rnd),
        "get_pfns_seq": lambda: f.get_pfns(seq),
        "guest_read_loop": loop(f.guest_read, seq_l),
        "guest_read_many": lambda: f.guest_read_many(seq),
        "host_read_loop": loop(f.host_read, seq_l),
        "host_read_many": lambda: f.host_read_many(seq),
        "guest_write_loop": loop2(f.guest_write, seq_l, tok_l),
        "guest_write_many": lambda: f.guest_write_many(seq, tokens),
        "host_write_loop": loop2(f.host_write, seq_l, tok_l),
        "host_write_many": lambda: f.host_write_many(seq, tokens),
    }
    repeat = 5
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            times[name].append(timings(fn, 1)[0] / n)
    stat = {k: sorted(v) for k, v in times.items()}
    med = {k: v[len(v) // 2] for k, v in stat.items()}
    for k, v in stat.items():
        s.figures[f"bulk_{k}_ns"] = med[k] * 1e9
        s.figures[f"bulk_{k}_ns_spread"] = (v[-1] - v[0]) * 1e9
    f.close()
    # The get_pfn target itself is the "get_pfn" step's (cold random pages); here, the
    # same call on faulted-in pages in order, as a figure.
    s.figures["get_pfn_seq_vs_floor"] = med["get_pfn_seq"] / med["floor"]
    s.add(
        "get_pfns ns per index, faulted-in, in order",
        med["get_pfns_seq"] * 1e9,
        25,
        "ns",
        "lower",
        f"random indexes: {med['get_pfns_random'] * 1e9:.0f} ns",
    )
    for bulk, single in [
        ("get_pfns_seq", "get_pfn_seq"),
        ("get_pfns_random", "get_pfn_random"),
        ("guest_read_many", "guest_read_loop"),
        ("host_read_many", "host_read_loop"),
        ("guest_write_many", "guest_write_loop"),
        ("host_write_many", "host_write_loop"),
    ]:
        s.add(
            f"{bulk} vs a loop of single calls @{n:.0e}",
            med[single] / med[bulk],
            20,
            "x",
            "higher",
            f"median of {repeat}",
        )


def bench_alloc(s: Suite) -> None:
    """fallocate and close of order-0 folios, cold (a fresh file each repeat): the median
    of 3 in CPU time of the process, which waits on a shared machine do not inflate."""
    nr = 1 << (28 if s.full else 24)
    per: dict[str, list[float]] = {"fallocate": [], "close": []}
    for _ in range(3):
        f = gmem.GuestMemfd(nr * gmem.PAGE_SIZE, arch="sw_protected")
        c0 = time.process_time()
        f.fallocate(0, nr)
        c1 = time.process_time()
        f.close()
        c2 = time.process_time()
        per["fallocate"].append((c1 - c0) / nr * 1e9)
        per["close"].append((c2 - c1) / nr * 1e9)
    for step, limit in (("fallocate", 25), ("close", 12)):
        xs = sorted(per[step])
        s.figures[f"{step}_ns_per_folio"] = xs[1]
        s.add(
            f"{step} ns per order-0 folio (2**{nr.bit_length() - 1} folios)",
            xs[1],
            limit,
            "ns",
            "lower",
            f"CPU time, median of 3 ({xs[0]:.1f}..{xs[2]:.1f})",
        )


def bench_host(s: Suite) -> None:
    """What one cache miss costs on this host: a chain of dependent loads through 1 MiB
    (about what stays in a core's cache) and 64 MiB (the leaves of a large tree), median
    of 3.  No target; the cold lookup targets cannot beat one miss, so the table says it."""
    from gmem import _core

    for label, size in (("1mib", 1 << 20), ("64mib", 64 << 20)):
        xs = sorted(_core._host_load_latency_ns(size, 1 << 20) for _ in range(3))
        s.figures[f"host_load_latency_{label}_ns"] = xs[1]


STEPS = [
    ("host memory latency", bench_host),
    ("PFN walk", bench_walk),
    ("conversion", bench_convert),
    ("scaling", bench_scaling),
    ("IntervalMap and peers", bench_interval_map),
    ("get_pfn", bench_get_pfn),
    ("Python hooks", bench_hooks),
    ("memory", bench_memory),
    ("bulk operations and per-call cost", bench_bulk),
    ("allocation", bench_alloc),
]


def run(full: bool = False, progress: Callable[[int, int, str], None] | None = None) -> Suite:
    s = Suite(full=full)
    for n, (label, step) in enumerate(STEPS):
        if progress:
            progress(n, len(STEPS), label)
        step(s)
    if progress:
        progress(len(STEPS), len(STEPS), "done")
    return s


def table(s: Suite) -> str:
    lines = [f"{'target':<52} {'measured':>12} {'limit':>10}  met"]
    for t in s.targets:
        op = "<=" if t.better == "lower" else ">="
        lines.append(
            f"{t.name:<52} {t.measured:>10.2f} {t.unit:<2}{op}{t.limit:>7g} {t.unit:<5} "
            f"{'yes' if t.met else 'NO'}" + (f"  ({t.detail})" if t.detail else "")
        )
    lines.append("")
    for series in dict.fromkeys(r["series"] for r in s.scaling):
        points = ", ".join(
            f"{r['guest_gib']:g} GiB {r['round_trip_us']:.0f} us"
            for r in s.scaling
            if r["series"] == series
        )
        lines.append(f"scaling, SNP round trip, {series}: {points}")
    lat = [s.figures.get(f"host_load_latency_{k}_ns") for k in ("1mib", "64mib")]
    if None not in lat:
        lines.append(
            f"host: a dependent load costs {lat[0]:.0f} ns within 1 MiB and {lat[1]:.0f} ns "
            "across 64 MiB (a cold lookup pays at least one of the latter)"
        )
    return "\n".join(lines)


def machine() -> str:
    from gmem._progress import cpu_name

    cpu = cpu_name()
    import os

    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, {platform.system()} {platform.release()}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    )


def markdown(s: Suite, command: str) -> str:
    rows = "\n".join(
        f"| {t.name} | {t.measured:.2f} {t.unit} | {'<=' if t.better == 'lower' else '>='} "
        f"{t.limit:g} {t.unit} | {'met' if t.met else '**not met**'} | {t.detail} |"
        for t in s.targets
    )
    scaling = "\n".join(
        f"| {r['series']} | {r['guest_gib']:g} GiB | {r['folios']:,} "
        f"| {r['round_trip_us']:.0f} us |"
        for r in s.scaling
    )
    figures = "\n".join(f"| {k} | {v:.3f} |" for k, v in sorted(s.figures.items()))
    return f"""# Benchmark results

Generated by `{command}` on {time.strftime("%Y-%m-%d")}; do not edit by hand.

Machine: {machine()}

Every ratio is between two figures measured in the same run.

| target (docs/performance.md) | measured | limit | | note |
|---|---|---|---|---|
{rows}

## Scaling: SNP private->shared->private round trip of a fully populated guest

| folios | guest | folio count | time |
|---|---|---|---|
{scaling}

## Raw figures

| figure | value |
|---|---|
{figures}
"""


def plot(s: Suite, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    names = [t.name for t in s.targets]
    # How far inside its limit each target is: > 1 means met.
    margin = [
        t.limit / t.measured if t.better == "lower" else t.measured / t.limit for t in s.targets
    ]
    colors = ["tab:green" if m >= 1 else "tab:red" for m in margin]
    ax1.barh(names, margin, color=colors)
    ax1.axvline(1, color="black", linewidth=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("margin against the target (>1: met)")
    ax1.tick_params(axis="y", labelsize=7)
    ax1.set_title("performance targets (docs/performance.md)")
    for series in dict.fromkeys(r["series"] for r in s.scaling):
        rows = [r for r in s.scaling if r["series"] == series]
        ax2.loglog(
            [r["guest_gib"] for r in rows],
            [r["round_trip_us"] for r in rows],
            "o-",
            label=f"SNP round trip, {series}",
        )
    ax2.set_xlabel("guest size (GiB)")
    ax2.set_ylabel("microseconds")
    ax2.set_title("conversion cost follows folios, not pages")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main_bench(args: Any) -> int:
    from gmem import policies
    from gmem._progress import Progress

    progress = Progress(not args.quiet and not args.json)
    s = run(args.full, progress)
    # The huge-folio policies side by side: 2 MiB folios, and 1 GiB ones under --full.
    policy_rows = policies.compare(
        orders=(9, 18) if args.full else (9,), progress=lambda what: progress.note(what)
    )
    progress.clear()
    if args.json:
        import json

        json.dump(
            {
                "targets": [t.row() for t in s.targets],
                "figures": s.figures,
                "scaling": s.scaling,
                "policies": policy_rows,
                "machine": machine(),
            },
            sys.stdout,
            indent=1,
        )
        print()
    else:
        print(table(s))
        print("\nhuge-folio policies (gmem.policies; docs/model.md, Huge folios):")
        print(policies.table(policy_rows))
    if args.plot:
        plot(s, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.write_results:
        command = (
            "gmem bench"
            + (" --full" if args.full else "")
            + f" --write-results {args.write_results}"
        )
        with open(args.write_results, "w") as f:
            f.write(markdown(s, command))
        print(f"wrote {args.write_results}", file=sys.stderr)
    missed = [t.name for t in s.targets if not t.met]
    if args.fail_on_miss and missed:
        print(f"gmem bench: {len(missed)} target(s) not met: {'; '.join(missed)}", file=sys.stderr)
        return 1
    return 0
