"""The gmem command, run through its real entry point."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args], capture_output=True, text=True, check=False
    )


def test_layout_prints_ranges_that_match_page_pfns() -> None:
    out = run("layout", "--pages", "128", "--max-order", "5", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "ranges expand to exactly page_pfns of the populated pages: yes" in out.stdout
    assert "pfn_ranges(3, 128)" in out.stdout


def test_layout_rejects_a_bad_range() -> None:
    out = run("layout", "--pages", "16", "--start", "9", "--end", "4")
    assert out.returncode == 2
    assert "gmem: error: start: must be <= end" in out.stderr
