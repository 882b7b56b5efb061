"""The gmem command, run through its real entry point (python -m gmem)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gmem
from gmem import demo, trace

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args], capture_output=True, text=True, check=False
    )


def test_demo_prints_the_table_with_a_progress_bar() -> None:
    out = run("demo", "--size", "256M")
    assert out.returncode == 0, out.stderr
    assert "[" + "#" * 30 + "] 8/8 done" in out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:3] == ["arch", "design", "hook"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[3:11]}
    assert rows[("pkvm", "overloaded")][-2] != "0" and rows[("pkvm", "split")][-2] == "0"
    assert "first violation, pkvm/overloaded: pkvm: conversion-keeps-guest-data" in out.stdout


def test_demo_json_and_filters() -> None:
    out = run("demo", "--size", "64M", "--arch", "pkvm", "--json", "--seed", "3")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["arch"], r["hook_design"]) for r in rows] == [
        ("pkvm", "split"),
        ("pkvm", "overloaded"),
    ]
    assert rows[1]["violations"] == len(rows[1]["violation_list"]) > 0
    assert rows[0]["stats"]["conversions_busy"] == 1


@pytest.mark.parametrize(("size", "folio"), [("64M", "4K"), ("256M", "64K"), ("32G", "1G")])
def test_demo_runs_at_every_folio_size(size: str, folio: str) -> None:
    out = run("demo", "--size", size, "--folio-size", folio, "-q", "--seed", "2")
    assert out.returncode == 0, out.stderr
    assert f"guest with {folio} folios" in out.stdout
    rows = {tuple(line.split()[:2]): line.split() for line in out.stdout.splitlines()[3:11]}
    assert rows[("pkvm", "overloaded")][-2] != "0" and rows[("snp", "split")][-2] == "0"


def test_demo_rejects_a_bad_folio_size() -> None:
    out = run("demo", "--folio-size", "3K")
    assert out.returncode == 2 and "folio-size" in out.stderr


def test_demo_trace_file_matches_the_generator(tmp_path: Path) -> None:
    path = tmp_path / "boot.jsonl"
    out = run("demo", "--size", "1G", "-q", "--write-trace", str(path), "--arch", "tdx")
    assert out.returncode == 0, out.stderr
    assert path.read_text() == trace.dumps(demo.boot_trace(1 << 30, 9))
    assert path.read_text() == (ROOT / "examples" / "boot-1g.jsonl").read_text()


def test_replay_runs_a_trace() -> None:
    out = run("replay", str(ROOT / "examples" / "elevated-refcount.jsonl"), "--arch", "snp", "-q")
    assert out.returncode == 0, out.stderr
    assert "snp" in out.stdout and "overloaded" in out.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"op": "create", "version": 1, "size": 4096}\n{"op": "fallocate", "offset": 0}\n',
            ":2: fallocate: missing field(s) len",
        ),
        ('{"op": "create", "version": 1, "size": 4096}\nnot json\n', ":2: not valid JSON"),
        ('{"op": "create", "version": 2, "size": 4096}\n', ":1: unsupported trace version 2"),
        ('{"op": "guest_read", "index": 0}\n', ":1: a trace starts with create"),
        (
            '{"op": "create", "version": 1, "size": 4096}\n{"op": "teleport"}\n',
            ":2: unknown op 'teleport'",
        ),
        (
            '{"op": "create", "version": 1, "size": 4096}\n{"op": "host_read", "index": 0}\n',
            ":2: host_read failed: SigBus",
        ),
        (
            '{"op": "create", "version": 1, "size": 4096, "flags": 3}\n'
            '{"op": "host_read", "index": 0}\n{"op": "expect", "value": 7}\n',
            ":3: expected value 0x7 from line 2 (host_read), got 0x0",
        ),
        (
            '{"op": "create", "version": 1, "size": 4096, "flags": 3}\n'
            '{"op": "host_read", "index": 0}\n{"op": "expect", "error": "SigBus"}\n',
            ":3: expected SigBus from line 2, but host_read succeeded",
        ),
    ],
)
def test_replay_names_the_line_of_a_bad_trace(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    out = run("replay", str(path), "--arch", "sw_protected", "--hook-design", "split", "-q")
    assert out.returncode == 2
    assert f"gmem: error: {path}{message}" in out.stderr


def test_replay_of_a_missing_file() -> None:
    out = run("replay", "/nonexistent/trace.jsonl")
    assert out.returncode == 2 and "No such file" in out.stderr


def test_check_pfn_exhaustive_and_random() -> None:
    out = run("check-pfn", "--exhaustive", "8", "--random", "2", "--seed", "5")
    assert out.returncode == 0, out.stderr
    assert "exhaustive: 710 layouts of files of 1..8 pages, 30,891 ranges: ok" in out.stdout
    assert "random: 2 layouts" in out.stdout


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("0,2,8\n4,1,3\n", "pfn: folio 1 folio(index=4, order=1, pfn=3): pfn is not a multiple"),
        (
            "0,2,8\n5,1,2\n",
            "index: folio 1 folio(index=5, order=1, pfn=2): index is not a multiple",
        ),
        ("0,2,8\n2,0,3\n", "index: folio 1 folio(index=2, order=0, pfn=3): overlaps"),
        ("8,0,8\n4,0,3\n", "index: folio 1 folio(index=4, order=0, pfn=3): not sorted"),
    ],
)
def test_check_pfn_names_a_broken_layout(tmp_path: Path, rows: str, message: str) -> None:
    path = tmp_path / "layout.csv"
    path.write_text("index,order,pfn\n" + rows)
    out = run("check-pfn", "--layout", str(path))
    assert out.returncode == 1
    assert message in out.stdout


def test_check_pfn_accepts_a_good_npy_layout(tmp_path: Path) -> None:
    path = tmp_path / "layout.npy"
    np.save(path, np.array([[0, 9, 512], [512, 0, 7], [1024, 10, 4096]], dtype=np.uint64))
    out = run("check-pfn", "--layout", str(path), "--ranges", "20")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 folios" in out.stdout and ": ok" in out.stdout


def test_layout_prints_ranges_that_match_page_pfns() -> None:
    out = run("layout", "--pages", "128", "--max-order", "5", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "ranges expand to exactly page_pfns of the populated pages: yes" in out.stdout
    assert "pfn_ranges(3, 128)" in out.stdout


def test_layout_rejects_a_bad_range() -> None:
    out = run("layout", "--pages", "16", "--start", "9", "--end", "4")
    assert out.returncode == 2
    assert "gmem: error: start: must be <= end" in out.stderr


def test_expected_ranges_oracle_agrees_with_the_engine() -> None:
    from gmem.pfncheck import expected_ranges

    index = np.array([0, 8, 16], np.uint64)
    order = np.array([3, 2, 4], np.uint64)
    pfn = np.array([64, 4, 32], np.uint64)
    for s, e in [(0, 32), (3, 11), (12, 17), (9, 10)]:
        assert np.array_equal(
            expected_ranges(index, order, pfn, s, e),
            gmem.clamp_folio_ranges(index, order, pfn, s, e),
        )


def test_bench_reports_every_target_as_json() -> None:
    out = run("bench", "--json", "-q")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    names = [t["target"] for t in result["targets"]]
    assert any("pfn_ranges vs the reference" in n for n in names)
    assert any("IntervalMap.store vs sortedcontainers" in n for n in names)
    assert all(t["measured"] > 0 for t in result["targets"])
    assert {r["series"] for r in result["scaling"]} == {"1 GiB folios", "2 MiB folios"}
