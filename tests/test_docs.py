"""The documentation is tested: every example trace replays as examples/README.md says, and
every Python code block in the README and docs/ runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from gmem import trace

ROOT = Path(__file__).resolve().parent.parent


def example_rows() -> list[list[str]]:
    text = (ROOT / "examples" / "README.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].endswith(".jsonl"):
            rows.append(cells)
    return rows


def test_every_example_is_in_the_table_under_every_arch_and_design() -> None:
    listed = {(row[0], row[1], row[2]) for row in example_rows()}
    names = {p.name for p in (ROOT / "examples").glob("*.jsonl")}
    assert listed == {
        (name, arch, design)
        for name in names
        for arch in ("sw_protected", "snp", "tdx", "pkvm")
        for design in ("mainline", "split", "overloaded")
    }


@pytest.mark.parametrize("row", example_rows(), ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}")
def test_example_replays_as_documented(row: list[str]) -> None:
    name, arch, design, result, busy, violations = row
    path = ROOT / "examples" / name
    records = trace.load(path)
    if result.startswith("fails at line"):
        with pytest.raises(trace.TraceError) as info:
            trace.replay(records, arch=arch, hook_design=design, where=str(path))
        assert info.value.line == int(result.split()[-1])
        return
    summary = trace.replay(records, arch=arch, hook_design=design)
    assert result == "ok"
    assert summary.expected_errors == int(busy)
    assert len(summary.violations) == int(violations)


def code_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            blocks.append((f"{path.name}#{n}", block))
    return blocks


@pytest.mark.parametrize(("where", "code"), code_blocks(), ids=[w for w, _ in code_blocks()])
def test_code_block_runs(where: str, code: str) -> None:
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


# python/gmem/reference/ is being reworked on another branch; its one mention goes there.
def test_the_project_stands_on_its_own() -> None:
    """Nothing a user gets (clone, sdist or wheel) points at files outside the project."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = [
        name
        for name in files
        if not name.startswith(".ci/")
        and (ROOT / name).is_file()
        and re.search(r"DESIGN\.md|\.\./shared", (ROOT / name).read_text(errors="replace"))
    ]
    assert offenders == []
