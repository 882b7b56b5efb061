"""Types for the people who subclass: the docs' examples and a typed simulator script
pass ``mypy --strict``, and the types catch the mistakes they are there to catch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
api = pytest.importorskip("mypy.api")  # the lint extra, which CI installs


def mypy(*paths: Path) -> tuple[int, str]:
    out, err, status = api.run(
        ["--strict", "--cache-dir", str(ROOT / ".mypy_cache"), *map(str, paths)]
    )
    return status, out + err


def test_docs_examples_and_a_simulator_type_check(tmp_path: Path) -> None:
    files = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
        for n, block in enumerate(blocks):
            files.append(tmp_path / f"{doc.stem.replace('-', '_')}_{n}.py")
            files[-1].write_text(block)
    assert len(files) >= 10
    status, report = mypy(*files, ROOT / "tests" / "typing")
    assert status == 0, report


def test_the_simulator_runs() -> None:
    import runpy

    runpy.run_path(str(ROOT / "tests" / "typing" / "simulator.py"), run_name="__main__")


MISTAKES = """
import gmem
import numpy as np
import numpy.typing as npt

gmem.GuestMemfd(4096, arch="sev")
gmem.GuestMemfd(4096, hook_design="overload")


class WrongHook(gmem.Arch):
    def prepare(self, index: str, pfn: int, nr_pages: int) -> None: ...


class BatchedWithoutArray(gmem.BatchedArch):
    def make_shared(self, start_pfn: int, end_pfn: int) -> None: ...


class PerRangeWithArray(gmem.Arch):
    def free_folio(self, ranges: npt.NDArray[np.uint64]) -> None: ...
"""


def test_the_types_catch_mistakes(tmp_path: Path) -> None:
    path = tmp_path / "mistakes.py"
    path.write_text(MISTAKES)
    status, report = mypy(path)
    assert status == 1
    lines = {int(m.group(1)) for m in re.finditer(r"mistakes\.py:(\d+): error", report)}
    assert lines == {6, 7, 11, 15, 19}, report
    assert "Literal['sw_protected', 'snp', 'tdx', 'pkvm']" in report
