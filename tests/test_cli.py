"""The gmem command, run through its real entry point (python -m gmem), or through
gmem.cli.main where a test has to swap something out."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gmem
from gmem import cli, demo, trace

ROOT = Path(__file__).resolve().parent.parent
CREATE = '{"op": "create", "version": 1, "size": 16384, "flags": 1}\n'


def run(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=300,
    )


def rows(stdout: str, policy: str = "none") -> dict[tuple[str, str], list[str]]:
    """The table's rows of one huge-folio policy by (arch, design), split on runs of two or
    more spaces; the cells start at the arch."""
    out = {}
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())[1:]
        if (
            line.startswith(policy + " ")
            and len(cells) >= 3
            and cells[0] in gmem._consts.BUILTIN_ARCHS
            and cells[1] in cli.DESIGNS
        ):
            out[(cells[0], cells[1])] = cells
    return out


# --- gmem demo ---------------------------------------------------------------------


def test_demo_prints_the_table_with_a_progress_bar() -> None:
    out = run("demo", "--size", "256M")
    assert out.returncode == 0, out.stderr
    assert "[" + "#" * 30 + "] 24/24 done" in out.stderr  # 2 policies x 4 archs x 3 designs
    lines = out.stdout.splitlines()
    assert lines[2].split()[:4] == ["policy", "arch", "design", "calls"]
    assert "engine" in lines[1] and "(ms)" in lines[2] and "(pages)" in lines[2]
    table = rows(out.stdout)
    assert len(table) == 12
    assert table[("pkvm", "overloaded")][-2] != "0" and table[("pkvm", "split")][-2] == "0"
    assert table[("pkvm", "split")][4] == "65,536"  # scrubbed pages, with separators
    huge = rows(out.stdout, "hugetlb")
    assert len(huge) == 12 and huge[("snp", "split")][7] == "4"  # folio splits
    assert all(re.fullmatch(r"\d+\.\d\d", r[-1]) for r in table.values())  # ms: 2 decimals
    assert "first violation, pkvm/overloaded: pkvm: conversion-keeps-guest-data" in out.stdout


def test_demo_table_fits_a_narrow_terminal() -> None:
    out = run("demo", "--size", "256M", "-q", columns=80)
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 80
    assert out.stdout.count("arch  ") >= 2  # the columns that did not fit: a second block


def test_demo_json_carries_version_size_seed_and_structured_violations() -> None:
    out = run("demo", "--size", "64M", "--arch", "pkvm", "--json", "--seed", "3")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["gmem_version"] == gmem.__version__
    assert (doc["size"], doc["seed"], doc["folio_size"]) == (64 << 20, 3, 2 << 20)
    assert [r["huge_policy"] for r in doc["runs"]] == ["none"] * 3 + ["hugetlb"] * 3
    runs = doc["runs"][:3]
    assert [(r["arch"], r["hook_design"]) for r in runs] == [
        ("pkvm", "mainline"),
        ("pkvm", "split"),
        ("pkvm", "overloaded"),
    ]
    assert runs[0]["violations"] == runs[1]["violations"] == 0
    assert runs[2]["violations"] == len(runs[2]["violation_list"]) > 0
    v = runs[2]["violation_list"][0]
    assert set(v) == {"arch", "rule", "index", "pfn", "detail"}
    assert v["arch"] == "pkvm" and v["rule"] == "conversion-keeps-guest-data"
    assert isinstance(v["index"], int) and isinstance(v["pfn"], int)
    assert runs[0]["stats"]["conversions_busy"] == 1


def test_demo_header_counts_the_operations_its_json_counts() -> None:
    text = run("demo", "--size", "64M", "--arch", "snp", "-q")
    doc = json.loads(run("demo", "--size", "64M", "--arch", "snp", "--json").stdout)
    counted = re.search(r"\(([\d,]+) operations per run\)", text.stdout)
    assert counted is not None, text.stdout
    n = int(counted.group(1).replace(",", ""))
    assert n == doc["operations"] == doc["runs"][0]["operations"]
    ops = list(demo.boot_trace(64 << 20, 9))
    assert n == sum(op["op"] not in ("create", "expect") for op in ops)


def test_demo_fail_on_violation() -> None:
    found = run("demo", "--size", "64M", "--arch", "pkvm", "-q", "--fail-on-violation")
    assert found.returncode == 1 and "first violation, pkvm/overloaded" in found.stdout
    clean = run("demo", "--size", "64M", "--arch", "snp", "-q", "--fail-on-violation")
    assert clean.returncode == 0, clean.stderr
    assert run("demo", "--size", "64M", "--arch", "pkvm", "-q").returncode == 0


@pytest.mark.parametrize(("size", "folio"), [("64M", "4K"), ("256M", "64K"), ("32G", "1G")])
def test_demo_runs_at_every_folio_size(size: str, folio: str) -> None:
    out = run("demo", "--size", size, "--folio-size", folio, "-q", "--seed", "2")
    assert out.returncode == 0, out.stderr
    unit = {"4K": "4 KiB", "64K": "64 KiB", "1G": "1 GiB"}[folio]
    assert f"guest with {unit} folios" in out.stdout
    table = rows(out.stdout)
    assert table[("pkvm", "overloaded")][-2] != "0" and table[("snp", "split")][-2] == "0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--folio-size", "3K"], "argument --folio-size: must be a power of two from 4K to 1G"),
        (["--folio-size", "2G"], "argument --folio-size: must be a power of two from 4K to 1G"),
        (["--size=-1G"], "argument --size: must be positive, got '-1G'"),
        (["--size", "0"], "argument --size: must be positive"),
        (["--size", "lots"], "argument --size: not a size: 'lots'"),
        (
            ["--size", "1000000000"],
            "argument --size: must be a multiple of the 4 KiB page, got 1,000,000,000 bytes",
        ),
        (
            ["--size", "32M"],
            "argument --size: the demo needs at least 64 MiB with 2 MiB folios (32 I/O "
            "strides of 2 MiB), got 32 MiB",
        ),
        (
            ["--size", "16G", "--folio-size", "1G"],
            "at least 32 GiB with 1 GiB folios (32 I/O strides of 1 GiB), got 16 GiB",
        ),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
        (["--arch", "arm"], "argument --arch: invalid choice: 'arm'"),
    ],
)
def test_demo_says_which_rule_an_argument_breaks(args: list[str], message: str) -> None:
    out = run("demo", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_demo_trace_file_matches_the_generator(tmp_path: Path) -> None:
    path = tmp_path / "boot.jsonl"
    out = run("demo", "--size", "1G", "-q", "--write-trace", str(path), "--arch", "tdx")
    assert out.returncode == 0, out.stderr
    assert path.read_text() == trace.dumps(demo.boot_trace(1 << 30, 9))
    assert path.read_text() == (ROOT / "examples" / "boot-1g.jsonl").read_text()


def _peak_rss_mb(*args: str) -> float:
    code = (
        "import resource, sys\n"
        "from gmem.cli import main\n"
        f"status = main({list(args)!r})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return int(out.stderr.split()[-1]) / 1024


def test_demo_streams_its_trace() -> None:
    """The trace is produced as it is replayed: memory follows what the model holds (16
    bytes per folio), not the number of operations (~170 bytes per op as Python dicts)."""
    assert not isinstance(demo.boot_trace(1 << 30, 0), list)
    small = _peak_rss_mb("demo", "--size", "256M", "--folio-size", "4K", "-q", "--arch", "tdx")
    large = _peak_rss_mb("demo", "--size", "2G", "--folio-size", "4K", "-q", "--arch", "tdx")
    # 458,752 more operations: ~78 MB more if they were held as dicts; 7 MB of folios.
    assert large - small < 60, (small, large)


# --- gmem replay -------------------------------------------------------------------


def test_replay_runs_a_trace() -> None:
    out = run("replay", str(ROOT / "examples" / "elevated-refcount.jsonl"), "--arch", "snp", "-q")
    assert out.returncode == 0, out.stderr
    assert set(rows(out.stdout)) == {("snp", "mainline"), ("snp", "split"), ("snp", "overloaded")}


def test_replay_runs_every_arch_and_shows_a_failing_run_as_a_row() -> None:
    path = str(ROOT / "examples" / "share-in-place.jsonl")
    out = run("replay", path)
    assert out.returncode == 1, out.stderr
    assert "[" + "#" * 30 + "] 12/12 done" in out.stderr  # every run ran
    table = rows(out.stdout)
    assert len(table) == 12
    garbled = "fails at line 9: expected value 0xbeef from line 8 (host_read), got GARBLED"
    assert table[("snp", "split")][2] == garbled
    assert table[("tdx", "split")][2].endswith("got 0x0")
    assert table[("pkvm", "split")][-2] == "0"  # a successful run: numbers
    assert "Traceback" not in out.stderr and "gmem: error" not in out.stderr

    doc = json.loads(run("replay", path, "--json").stdout)
    by = {(r["arch"], r["hook_design"]): r for r in doc["runs"]}
    assert by[("snp", "split")]["ok"] is False
    assert by[("snp", "split")]["error"] == {"line": 9, "message": garbled}
    assert by[("pkvm", "split")]["ok"] is True
    assert (doc["size"], doc["operations"], doc["gmem_version"]) == (4 << 20, 6, gmem.__version__)


def test_replay_fail_on_violation() -> None:
    path = str(ROOT / "examples" / "boot-1g.jsonl")
    assert run("replay", path, "-q", "--arch", "pkvm").returncode == 0
    out = run("replay", path, "-q", "--arch", "pkvm", "--fail-on-violation")
    assert out.returncode == 1 and "first violation, pkvm/overloaded" in out.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CREATE + '{"op": "fallocate", "offset": 0}\n', ":2: fallocate: missing field(s) len"),
        (CREATE + "not json\n", ":2: not valid JSON: Expecting value (column 1)"),
        ('{"op": "create", "version": 2, "size": 4096}\n', ":1: unsupported trace version 2"),
        ('{"op": "guest_read", "index": 0}\n', ":1: a trace starts with create"),
        ("", ":1: empty trace"),
        (CREATE + '{"op": "teleport"}\n', ":2: unknown op 'teleport'"),
        (CREATE + "{}\n", ":2: missing field op"),
        # Checked before anything runs: alignment, attribute bits, signs, sizes.
        (
            CREATE + '{"op": "fallocate", "offset": 100, "len": 4096}\n',
            ":2: fallocate: offset must be a multiple of 4096 (bytes), got 100",
        ),
        (
            CREATE + '{"op": "set_attributes", "offset": 0, "size": 4096, "attributes": 4}\n',
            ":2: set_attributes: attributes: unknown bits 0x4 (allowed: 8 = private, 0 = shared)",
        ),
        (
            CREATE + '{"op": "guest_read", "index": -1}\n',
            ":2: guest_read: index must be in 0..2**64-1, got -1",
        ),
        (
            CREATE + '{"op": "guest_read", "index": 1.5}\n',
            ":2: guest_read: index must be an integer",
        ),
        (
            '{"op": "create", "version": 1, "size": 1000}\n',
            ":1: create: size must be a positive multiple of 4096, got 1000",
        ),
        (
            '{"op": "create", "version": 1, "size": 4096, "flags": 4}\n',
            ":1: create: flags: unknown bits 0x4",
        ),
        (
            '{"op": "create", "version": 1, "size": 4096, "folio_order": 19}\n',
            ":1: create: folio_order must be in 0..18, got 19",
        ),
        # Hostile shapes (issue 9): each a FILE:LINE error, never a traceback.
        (CREATE + "[" * 100_000 + "]" * 100_000 + "\n", ":2: not valid JSON: nested too deeply"),
        (CREATE + '{"op": ["check"]}\n', ":2: unknown op ['check']"),
        (CREATE + '{"op": "check", "op": "close"}\n', ":2: duplicate key 'op'"),
        (
            CREATE + '{"op": "guest_read", "index": 1, "index": 2}\n',
            ":2: duplicate key 'index'",
        ),
        (
            CREATE + '{"op": "guest_read", "index": ' + "9" * 5000 + "}\n",
            ":2: integer of 5,000 digits (fields are 64-bit)",
        ),
        (
            '{"op": "create", "version": 1, "size": ' + "9" * 5000 + "}\n",
            ":1: integer of 5,000 digits",
        ),
    ],
)
def test_replay_names_the_line_of_a_bad_trace(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    out = run("replay", str(path), "--arch", "sw_protected", "--hook-design", "split", "-q")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"gmem: error: {path}{message}" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_replay_names_the_line_of_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(CREATE.encode() + b'{"op": "check"}\n{"op": "cl\xffose"}\n')
    out = run("replay", str(path), "-q")
    assert out.returncode == 2
    assert f"gmem: error: {path}:3: not UTF-8: byte 0xff at column 11" in out.stderr


def test_replay_names_the_create_line_when_the_file_cannot_be_made(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"  # 2**48 pages: more than a file's own PhysMem may hold
    path.write_text('\n# a comment\n{"op": "create", "version": 1, "size": 1152921504606846976}\n')
    out = run("replay", str(path), "-q", "--arch", "snp", "--hook-design", "split")
    assert out.returncode == 1
    row = rows(out.stdout)[("snp", "split")]
    assert row[2].startswith("fails at line 3: create failed: ValueError: physmem:")


def test_replay_validates_every_line_before_anything_runs(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    good = '{"op": "guest_write", "index": 0, "token": 5}\n' * 50
    path.write_text(CREATE + good + '{"op": "punch_hole", "offset": 0, "len": 0}\n')
    out = run("replay", str(path))
    assert out.returncode == 2
    assert f"{path}:52: punch_hole: len must be > 0" in out.stderr
    assert out.stdout == "" and "1/8" not in out.stderr  # no run started


def test_replay_shows_a_failed_operation_as_a_row(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"op": "create", "version": 1, "size": 4096}\n{"op": "host_read", "index": 0}\n'
    )
    out = run("replay", str(path), "--arch", "sw_protected", "--hook-design", "split", "-q")
    assert out.returncode == 1
    row = rows(out.stdout)[("sw_protected", "split")]
    assert row[2].startswith("fails at line 2: host_read failed: SigBus")


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ('{"op": "expect", "value": 7}', "fails at line 3: expected value 0x7 from line 2"),
        (
            '{"op": "expect", "error": "SigBus"}',
            "fails at line 3: expected SigBus from line 2, but host_read succeeded",
        ),
    ],
)
def test_replay_unmet_expectations(tmp_path: Path, expect: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"op": "create", "version": 1, "size": 4096, "flags": 3}\n'
        '{"op": "host_read", "index": 0}\n' + expect + "\n"
    )
    out = run("replay", str(path), "--arch", "tdx", "-q")
    assert out.returncode == 1
    assert rows(out.stdout)[("tdx", "split")][2].startswith(message)


def test_replay_help_says_where_the_format_is() -> None:
    out = run("replay", "--help")
    assert out.returncode == 0
    assert "python -m pydoc gmem.trace" in out.stdout
    for op in trace.OPS:
        assert re.search(rf"^  {op}\s", out.stdout, re.M), op
    pydoc = subprocess.run(
        [sys.executable, "-m", "pydoc", "gmem.trace"], capture_output=True, text=True, check=True
    )
    assert all(op in pydoc.stdout for op in trace.OPS)


def test_replay_of_a_missing_file() -> None:
    out = run("replay", "/nonexistent/trace.jsonl")
    assert out.returncode == 2 and "No such file" in out.stderr


# --- gmem check-pfn ----------------------------------------------------------------


def test_check_pfn_exhaustive_and_random() -> None:
    out = run("check-pfn", "--exhaustive", "8", "--random", "2", "--seed", "5")
    assert out.returncode == 0, out.stderr
    assert "exhaustive: 710 layouts of files of 1..8 pages, 30,891 ranges: ok" in out.stdout
    assert "random: 2 layouts" in out.stdout
    assert "] 2/2 done" in out.stderr  # the progress bar


def test_check_pfn_split_merge_proves_contiguity_across_the_hugetlb_policy() -> None:
    out = run("check-pfn", "--split-merge", "3", "--seed", "4", "-q")
    assert out.returncode == 0, out.stderr
    assert "split-merge: 3 sequences on hugetlb files (120 conversions" in out.stdout
    assert "PFNs unchanged, walk and checker agree: ok" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exhaustive", "12"], "argument --exhaustive: invalid choice: 12 (choose from 1, 2, 4"),
        (["--random", "-1"], "argument --random: must be an integer >= 0, got '-1'"),
        (["--split-merge", "x"], "argument --split-merge: must be an integer >= 0, got 'x'"),
        (["--ranges", "x"], "argument --ranges: must be an integer >= 0, got 'x'"),
        (["--seed", "-3"], "argument --seed: must be an integer >= 0"),
    ],
)
def test_check_pfn_refuses_bad_arguments(args: list[str], message: str) -> None:
    out = run("check-pfn", *args)
    assert out.returncode == 2 and message in out.stderr
    assert out.stdout == ""


def test_check_pfn_help_states_defaults_and_allowed_values() -> None:
    out = run("check-pfn", "--help", columns=100)
    text = " ".join(out.stdout.split())
    assert "PAGES is one of 1, 2, 4, 8, 16" in text
    assert "--exhaustive 16 --random 20" in text  # what runs by default
    assert "(default 200)" in text and "N >= 0" in text


@pytest.mark.parametrize(
    ("rows_", "message"),
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
def test_check_pfn_names_a_broken_layout(tmp_path: Path, rows_: str, message: str) -> None:
    path = tmp_path / "layout.csv"
    path.write_text("index,order,pfn\n" + rows_)
    out = run("check-pfn", str(path))
    assert out.returncode == 1
    assert message in out.stdout


def test_check_pfn_takes_the_layout_as_a_positional_file_or_an_option(tmp_path: Path) -> None:
    path = tmp_path / "layout.csv"
    path.write_text("0,9,512\n512,0,7\n")
    for args in ([str(path)], ["--layout", str(path)]):
        out = run("check-pfn", *args, "--ranges", "5")
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"layout {path}: 2 folios" in out.stdout and "exhaustive" not in out.stdout
    both = run("check-pfn", str(path), "--layout", str(path))
    assert both.returncode == 2 and "give the layout file once" in both.stderr


def test_check_pfn_reads_hex_and_headers_by_name(tmp_path: Path) -> None:
    hexed = tmp_path / "hex.csv"
    hexed.write_text("0x0,9,0x1000\n0x200,0,0x7\n0x400,10,0x2000\n")  # no header, hex first
    out = run("check-pfn", str(hexed), "--ranges", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 folios" in out.stdout  # the first row is not taken for a header
    named = tmp_path / "named.csv"
    named.write_text("# from a kernel dump\npfn,index,order\n0x1000,0,9\n7,512,0\n")
    out = run("check-pfn", str(named), "--ranges", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 folios" in out.stdout
    from gmem.pfncheck import load_layout

    index, order, pfn = load_layout(named)
    assert (index.tolist(), order.tolist(), pfn.tolist()) == ([0, 512], [9, 0], [0x1000, 7])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("index,order,pfn\n0,0,1\n4,zero,2\n", ":3: order: not an integer: 'zero'"),
        ("index,order,pfn\n0,0,1\n4,0\n", ":3: expected 3 values"),
        ("start,order,pfn\n0,0,1\n", ":1: neither a header naming index, order and pfn"),
        ("0,0,1\n-4,0,2\n", ":2: index: must be in 0..2**64-1, got -4"),
        ("0,0,1,9\n", ":1: expected 3 values (index,order,pfn), got 4"),
    ],
)
def test_check_pfn_names_the_line_it_cannot_read(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "layout.csv"
    path.write_text(text)
    out = run("check-pfn", str(path))
    assert out.returncode == 2
    assert f"gmem: error: {path}{message}" in out.stderr and "Traceback" not in out.stderr


def test_check_pfn_accepts_a_good_npy_layout(tmp_path: Path) -> None:
    path = tmp_path / "layout.npy"
    np.save(path, np.array([[0, 9, 512], [512, 0, 7], [1024, 10, 4096]], dtype=np.uint64))
    out = run("check-pfn", "--layout", str(path), "--ranges", "20")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 folios" in out.stdout and ": ok" in out.stdout


def test_check_pfn_refuses_a_float_npy_layout(tmp_path: Path) -> None:
    path = tmp_path / "layout.npy"
    np.save(path, np.array([[0, 0, 0.9], [1, 0, 1.0]]))
    out = run("check-pfn", str(path))
    assert out.returncode == 2
    assert f"{path}: index: dtype float64 is not an integer type" in out.stderr


# --- gmem layout -------------------------------------------------------------------


def test_layout_prints_ranges_that_match_page_pfns() -> None:
    out = run("layout", "--pages", "128", "--max-order", "5", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "ranges expand to exactly page_pfns of the populated pages: yes" in out.stdout
    assert "pfn_ranges(3, 128)" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--pages", "16", "--start", "9", "--end", "4"],
            "argument --start: must be at most --end",
        ),
        (["--max-order", "-1"], "argument --max-order: must be an integer in 0..18, got '-1'"),
        (["--max-order", "19"], "argument --max-order: must be an integer in 0..18"),
        (
            ["--end", "4294967296"],
            "argument --end: must be at most --pages (64), got 4,294,967,296",
        ),
        (["--pages", "0"], "argument --pages: must be an integer in 1..1,048,576"),
        (["--fragment", "2"], "argument --fragment: must be a fraction in 0..1"),
    ],
)
def test_layout_refuses_bad_arguments(args: list[str], message: str) -> None:
    out = run("layout", *args)
    assert out.returncode == 2, out.stdout
    assert message in out.stderr and "Traceback" not in out.stderr


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


# --- gmem bench --------------------------------------------------------------------


def test_bench_reports_every_target_as_json() -> None:
    out = run("bench", "--json", "-q")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    names = [t["target"] for t in result["targets"]]
    assert any("pfn_ranges vs the reference" in n for n in names)
    assert any("IntervalMap.store vs sortedcontainers" in n for n in names)
    assert all(t["measured"] > 0 for t in result["targets"])
    assert {r["series"] for r in result["scaling"]} == {"1 GiB folios", "2 MiB folios"}
    churn = {
        r["policy"]: r["eagain"] for r in result["policies"] if r["workload"] == "virtio churn"
    }
    assert churn["none"] > churn["hugetlb"] == 0  # the policy's EAGAINs avoided


def _fake_bench(monkeypatch: pytest.MonkeyPatch, measured: float) -> list[str]:
    from gmem import bench

    ran: list[str] = []

    def step(s: bench.Suite) -> None:
        ran.append("step")
        s.add("fake target", measured, 1.0, "x", "lower")

    monkeypatch.setattr(bench, "STEPS", [("fake", step)])
    return ran


def test_bench_fail_on_miss(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_bench(monkeypatch, measured=2.0)  # 2x where at most 1x is allowed: missed
    assert cli.main(["bench", "-q"]) == 0
    assert cli.main(["bench", "-q", "--fail-on-miss"]) == 1
    assert "1 target(s) not met: fake target" in capsys.readouterr().err
    _fake_bench(monkeypatch, measured=0.5)
    assert cli.main(["bench", "-q", "--fail-on-miss"]) == 0


def test_bench_plot_checks_for_matplotlib_before_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ran = _fake_bench(monkeypatch, measured=0.5)
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--plot", str(tmp_path / "out.png")])
    assert info.value.code == 2 and ran == []
    assert "--plot: needs matplotlib: pip install 'gmem-kvm[plot]'" in capsys.readouterr().err


# --- the command as a whole --------------------------------------------------------


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"gmem {gmem.__version__} (gmem-kvm)"


@pytest.mark.parametrize(
    "args",
    [
        ["check-pfn", "--exhaustive", "16"],  # one long C++ call
        ["demo", "--size", "16G", "--folio-size", "4K", "--arch", "tdx"],  # a long replay
    ],
)
def test_ctrl_c_stops_promptly_with_one_line(args: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gmem", *args, "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.5)  # well inside the work (it takes > 15 s)
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == 130
    assert err.strip() == "gmem: interrupted"
