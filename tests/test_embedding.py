"""The three ways to embed gmem agree: the C++ core installed as a CMake package, the C
ABI (gmem.h, libgmem.so) and the Python API run the same guest (examples/cpp, examples/c,
examples/python) and print the same counters, line for line.

The package is configured, built and installed once per session into a temporary prefix,
and each example is built against it with nothing but cmake and a compiler, as a
simulator's own build would (find_package(gmem CONFIG REQUIRED)).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def missing_tools() -> str | None:
    """Why the native examples cannot be built here, or None."""
    if shutil.which("cmake") is None:
        return "cmake is not installed: the C and C++ embedding examples cannot be built"
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "no C compiler (cc, gcc or clang) on PATH"
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++ or clang++) on PATH"
    return None


needs_tools = pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))


def run(*cmd: str | Path, cwd: Path = ROOT) -> str:
    """Run a command; its output, or a failure that shows everything it printed."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gmem configured, built and installed (cmake --install) into a fresh prefix."""
    tmp = tmp_path_factory.mktemp("embed")
    build, prefix = tmp / "build", tmp / "prefix"
    run("cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release")
    run("cmake", "--build", build, "-j2")
    run("cmake", "--install", build, "--prefix", prefix)
    return prefix


def build_example(prefix: Path, lang: str, tmp: Path) -> Path:
    build = tmp / f"embed-{lang}"
    run("cmake", "-S", EXAMPLES / lang, "-B", build, f"-DCMAKE_PREFIX_PATH={prefix}")
    run("cmake", "--build", build)
    return build / "embed"


@pytest.fixture(scope="module")
def python_output() -> str:
    return run(sys.executable, EXAMPLES / "python" / "embed.py")


@needs_tools
def test_the_package_installs_headers_libraries_and_config(prefix: Path) -> None:
    lib = next(p for p in (prefix / "lib", prefix / "lib64") if p.is_dir())
    assert (prefix / "include" / "gmem.h").is_file()
    assert (prefix / "include" / "gmem" / "guest_memfd.hpp").is_file()
    assert (lib / "libgmem_core.a").is_file()
    assert (lib / "libgmem.so").exists()
    for name in ("gmemConfig.cmake", "gmemConfigVersion.cmake", "gmemTargets.cmake"):
        assert (lib / "cmake" / "gmem" / name).is_file()
    # libgmem.so exports the C ABI and nothing of the C++ inside it.
    if shutil.which("nm"):
        symbols = run("nm", "-D", "--defined-only", lib / "libgmem.so").split("\n")
        names = {line.split()[-1].split("@")[0] for line in symbols if line.strip()}
        assert "gmem_file_create" in names
        assert {n for n in names if not n.startswith("gmem_")} <= {"GMEM_1"}


def test_python_run_is_the_documented_one(python_output: str) -> None:
    lines = python_output.splitlines()
    assert lines[:4] == [
        "busy_index 512",
        "guest_read 3000",
        "hwpoison_index 5",
        "get_pfn_after_punch 5",
    ]
    assert "hook invalidate_range 5" in lines
    assert "arch pages_scrubbed 1536" in lines
    assert sum(line.startswith("stat ") for line in lines) >= 15
    assert lines[-1] == "violations 0"


@needs_tools
@pytest.mark.parametrize("lang", ["c", "cpp"])
def test_native_example_prints_what_python_prints(
    prefix: Path, lang: str, python_output: str, tmp_path: Path
) -> None:
    exe = build_example(prefix, lang, tmp_path)
    # The C example links the shared libgmem.so: found through the build tree's RPATH,
    # not through the environment.
    env_free = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run([str(exe)], capture_output=True, text=True, env=env_free, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == python_output.splitlines()


@pytest.mark.parametrize(
    ("fence", "path"),
    [
        ("python", "python/embed.py"),
        ("cpp", "cpp/embed.cpp"),
        ("c", "c/embed.c"),
        ("cmake", "cpp/CMakeLists.txt"),
        ("cmake", "c/CMakeLists.txt"),
    ],
)
def test_the_docs_show_each_example_whole(fence: str, path: str) -> None:
    """docs/embedding.md carries each example complete, as it is in examples/."""
    doc = (ROOT / "docs" / "embedding.md").read_text()
    blocks = re.findall(rf"```{fence}\n(.*?)```", doc, re.S)
    assert (EXAMPLES / path).read_text() in blocks


def test_the_docs_show_the_output(python_output: str) -> None:
    doc = (ROOT / "docs" / "embedding.md").read_text()
    assert f"```text\n{python_output}```" in doc
