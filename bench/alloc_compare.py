"""fallocate + close of order-0 folios: this checkout against another build, side by side.

    python bench/alloc_compare.py --old /path/to/site-packages [--pages-log2 28] [--repeats 5]

Each repeat runs every build in a fresh child process (cold: a new PhysMem and file), the
builds taking turns, and times GuestMemfd(...).fallocate(0, n) and close() from Python,
in CPU time of the process (on a shared machine wall time counts the waits; it is printed
per repeat too).
Prints ns per folio: the median and the spread (min..max) per build, and the ratio of the
medians.  --old is a directory holding an installed `gmem` (e.g. made with
`pip install --no-deps --target DIR <old checkout>`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, os, sys, time
if os.environ.get("GMEM_OTHER_BUILD"):  # that build, not an editable install of this one
    sys.path.insert(0, os.environ["GMEM_OTHER_BUILD"])
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import gmem
n = 1 << {lg}
f = gmem.GuestMemfd(n * gmem.PAGE_SIZE, arch="sw_protected")
c0, t0 = time.process_time(), time.perf_counter()
f.fallocate(0, n)
c1, t1 = time.process_time(), time.perf_counter()
f.close()
c2, t2 = time.process_time(), time.perf_counter()
print(json.dumps({{"fallocate": (c1 - c0) * 1e9 / n, "close": (c2 - c1) * 1e9 / n,
                  "fallocate_wall": (t1 - t0) * 1e9 / n, "close_wall": (t2 - t1) * 1e9 / n,
                  "file": gmem.__file__}}))
"""


def run(path: str | None, lg: int) -> dict[str, float]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if path:
        env["GMEM_OTHER_BUILD"] = path
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(lg=lg)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="directory with the other build's gmem")
    ap.add_argument("--pages-log2", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    builds = {"old": args.old, "new": None}
    got: dict[str, list[dict[str, float]]] = {k: [] for k in builds}
    for r in range(args.repeats):
        for name, path in builds.items():
            res = run(path, args.pages_log2)
            got[name].append(res)
            print(
                f"repeat {r}: {name:3} fallocate {res['fallocate']:7.1f} ns/folio cpu "
                f"({res['fallocate_wall']:.1f} wall), close {res['close']:7.1f} cpu "
                f"({res['close_wall']:.1f} wall)  {os.path.dirname(str(res['file']))}",
                flush=True,
            )
    print(f"\n2**{args.pages_log2} order-0 folios, {args.repeats} repeats, ns/folio (cpu):")
    print("  median (min..max)")
    med: dict[tuple[str, str], float] = {}
    for step in ("fallocate", "close"):
        for name in builds:
            xs = sorted(x[step] for x in got[name])
            med[name, step] = statistics.median(xs)
            print(f"  {step:9} {name:3} {med[name, step]:8.1f} ({xs[0]:.1f}..{xs[-1]:.1f})")
        print(f"  {step:9} old/new {med['old', step] / med['new', step]:.1f}x")
    n = 1 << args.pages_log2
    total = {k: (med[k, "fallocate"] + med[k, "close"]) * n / 1e9 for k in builds}
    print(f"  fallocate + close: old {total['old']:.1f} s, new {total['new']:.1f} s")


if __name__ == "__main__":
    main()
