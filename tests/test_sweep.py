"""gmem sweep: the grid, its rows (the same as replaying each point alone), parallel
processes, a Dask LocalCluster, the table, the JSON document and the plots."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gmem
from gmem import sweep, trace, workloads

MiB = 1 << 20


def small_grid() -> list[sweep.Point]:
    points, skipped = sweep.grid(
        [32 * MiB, 64 * MiB],
        [0, 9],
        ["snp", "pkvm"],
        ["mainline"],
        ["none", "hugetlb"],
        ["balloon", "passthrough"],
    )
    assert len(skipped) == 4  # hugetlb with 4 KiB folios, per workload and size
    assert all("hugetlb needs huge folios" in s for s in skipped)
    return points


def test_grid_leaves_out_what_cannot_exist() -> None:
    points = small_grid()
    assert len(points) == 2 * 2 * 3 * 2  # workloads x sizes x (order, policy) x archs
    _, skipped = sweep.grid([8 * MiB], [9], ["snp"], ["mainline"], ["none"], ["kexec"])
    assert skipped and "at least 16 strides" in skipped[0]
    with pytest.raises(ValueError, match="workloads: unknown 'boot'"):
        sweep.grid([32 * MiB], [9], ["snp"], ["mainline"], ["none"], ["boot"])
    with pytest.raises(ValueError, match="archs: unknown 'sev'; known: sw_protected"):
        sweep.grid([32 * MiB], [9], ["sev"], ["mainline"], ["none"], ["kexec"])
    with pytest.raises(ValueError, match="designs: unknown 'v8'"):
        sweep.grid([32 * MiB], [9], ["snp"], ["v8"], ["none"], ["kexec"])
    with pytest.raises(ValueError, match="policies: unknown 'thp'"):
        sweep.grid([32 * MiB], [9], ["snp"], ["mainline"], ["thp"], ["kexec"])
    with pytest.raises(ValueError, match=r"folio_orders: each must be an int in 0\.\.18"):
        sweep.grid([32 * MiB], [19], ["snp"], ["mainline"], ["none"], ["kexec"])
    with pytest.raises(ValueError, match="jobs: must be an integer >= 1"):
        sweep.run(points, jobs=0)


def test_a_row_is_the_replay_of_its_point() -> None:
    p = sweep.Point("passthrough", 32 * MiB, 9, "snp", "mainline", "hugetlb")
    row = sweep.run_point(p)
    s = trace.replay(
        trace.iter_records(workloads.passthrough(32 * MiB, huge_policy="hugetlb")), arch="snp"
    )
    assert row["hook_calls"] == s.row()["hook_calls"] and row["conversions_busy"] == 8
    assert row["estimated_ns"] == round(gmem.CostModel.default().estimate(s)[0])
    assert row["hook_calls_per_gib"] == row["hook_calls"] * 32
    cheap = sweep.run_point(p, {"fault": 0.0})
    assert cheap["estimated_ns"] < row["estimated_ns"] and "fault" in cheap["cost_breakdown_ns"]


def test_processes_give_the_rows_of_one_process() -> None:
    points = small_grid()[:6]
    serial = sweep.run(points, jobs=1)
    parallel = sweep.run(points, jobs=2)
    strip = [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in serial]
    assert [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in parallel] == strip
    text = sweep.table(serial)
    assert "passthrough" in text.splitlines()[2] or "balloon" in text.splitlines()[2]
    assert "estimated" in text.splitlines()[0]


def test_on_a_dask_local_cluster() -> None:
    pytest.importorskip("dask.distributed")
    from dask.distributed import Client, LocalCluster

    points = small_grid()[:4]
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        rows = sweep.run(points, dask=client)
        by_address = sweep.run(points[:1], dask=cluster.scheduler_address)
    assert [r["estimated_ns"] for r in rows] == [sweep.run_point(p)["estimated_ns"] for p in points]
    assert by_address[0]["hook_calls"] == rows[0]["hook_calls"]


def test_plot_has_three_labelled_panels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = sweep.run(small_grid(), jobs=1)
    path = tmp_path / "s.png"
    sweep.plot(rows, str(path), caption="test machine")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000


def gmem_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args], capture_output=True, text=True, timeout=300
    )


def test_sweep_command_table_json_and_left_out_points(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    out = gmem_cli(
        "sweep",
        "--size",
        "32M",
        "--folio-size",
        "4K",
        "--folio-size",
        "2M",
        "--arch",
        "tdx",
        "--workload",
        "kexec",
        "--jobs",
        "2",
        "--write-json",
        str(path),
        "-q",
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(path.read_text())
    assert doc["gmem_version"] == gmem.__version__ and doc["machine"]
    assert len(doc["runs"]) == 3 and doc["grid"]["folio_sizes"] == [4096, 2 << 20]
    assert doc["cost_model"]["latencies_ns"]["tdx.fault"] == 7750
    assert "left out: kexec" in out.stdout and f"wrote {path}" in out.stdout
    assert out.stdout.count("kexec ") >= 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "3M"], "the grid is empty"),
        (["--jobs", "0"], "argument --jobs: must be an integer in 1..1,024"),
        (["--workload", "boot"], "argument --workload: invalid choice"),
        (["--dask", "tcp://127.0.0.1:1", "--jobs", "2"], "argument"),
    ],
)
def test_sweep_command_refuses_bad_arguments(args: list[str], message: str) -> None:
    out = gmem_cli("sweep", *args, "-q")
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_sweep_plot_needs_matplotlib_or_draws(tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    out = gmem_cli(
        "sweep",
        "--size",
        "32M",
        "--arch",
        "snp",
        "--workload",
        "balloon",
        "--folio-size",
        "2M",
        "--huge-policy",
        "none",
        "--plot",
        str(path),
        "-q",
    )
    if importlib.util.find_spec("matplotlib") is None:
        assert out.returncode == 2 and "argument --plot: needs matplotlib" in out.stderr
    else:
        assert out.returncode == 0 and path.exists(), out.stderr


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # a thread that has exited
            out |= {int(c) for c in (task / "children").read_text().split()}
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_an_interrupted_sweep_leaves_no_worker_running() -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gmem",
            "sweep",
            "--size",
            "4G",
            "--folio-size",
            "4K",
            "--jobs",
            "2",
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(workers := _children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGINT)  # the parent only, not the process group
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "interrupted" in err
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{w}/cmdline").exists() for w in workers)
    finally:
        proc.kill()
        proc.wait()
