"""Regressions from an outside attack on the engine: crashes, use-after-free, deadlock, lost
pages, memory out of proportion to the input.

Whatever could crash the interpreter or hang runs in a child process with a time and an
address-space bound (``isolated``): a crash or a hang fails the test instead of the run.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

import gmem

from conftest import IMPLS
from model import snapshot

P = gmem.PAGE_SIZE
HOOKS = {"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION"}
SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")


def isolated(
    code: str, *, timeout: float = 60, memory_gib: float = 4
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with an address-space limit; it must exit 0.

    A signal (SIGSEGV, SIGABRT) or the timeout fails the test with the child's output.
    Under ASan the address-space limit cannot apply (its shadow memory is reserved up front).
    """
    limit = int(memory_gib * 2**30)

    def bound() -> None:
        if not SANITIZED:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=bound,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"child hung for {timeout} s\n{exc.stdout!r}\n{exc.stderr!r}")
    if proc.returncode:
        how = (
            f"signal {signal.Signals(-proc.returncode).name}"
            if proc.returncode < 0
            else f"exit {proc.returncode}"
        )
        pytest.fail(f"child failed ({how})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


# ---- blockers: crash or memory corruption --------------------------------------------


def test_recorder_read_while_another_thread_appends() -> None:
    # Thread A runs whole-file operations without the GIL (a built-in arch); thread B reads
    # and clears the Recorder's log all the while.
    isolated(
        """
        import threading, time, gmem
        rec = gmem.arch.Recorder({"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION"})
        n = (256 << 20) // gmem.PAGE_SIZE
        f = gmem.GuestMemfd(n * gmem.PAGE_SIZE, flags=gmem.FLAG_MMAP, arch=rec)
        stop = time.monotonic() + 4
        def writer():
            while time.monotonic() < stop:
                f.fallocate(0, n)
                f.set_attributes(0, n, gmem.SHARED)
                f.set_attributes(0, n, gmem.PRIVATE)
                f.punch_hole(0, n)
        def reader():
            reads = 0
            while time.monotonic() < stop:
                assert all(c[0] for c in rec.calls[:3])
                rec.ranges("free_folio")
                rec.clear()
                reads += 1
            assert reads > 0
        ts = [threading.Thread(target=writer), threading.Thread(target=reader)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        f.close()
        """,
        timeout=120,
    )


@pytest.mark.parametrize("reader", ["get_attributes(0)", "stats", "folios()", "check()"])
@pytest.mark.parametrize("hook", ["make_shared", "free_folio"])
def test_per_range_hook_reads_its_own_file(hook: str, reader: str) -> None:
    # Per-range delivery (batched=False) of a batch of several ranges, each calling back into
    # the file: the nested read must not drop the override the batch is looping over.
    isolated(
        f"""
        import gmem
        seen = []
        class A(gmem.Arch):
            config = {{"FREE", "FREE_ON_SHARED_CONVERSION"}}
            def {hook}(self, start_pfn, end_pfn):
                self.file.{reader}
                seen.append((start_pfn, end_pfn))
        pm = gmem.PhysMem(4096)
        pm.fragment(0.5)  # scattered pages: one range per folio
        f = gmem.GuestMemfd(64 * gmem.PAGE_SIZE, flags=gmem.FLAG_MMAP, arch=A(), physmem=pm)
        f.fallocate(0, 64)
        f.set_attributes(0, 64, gmem.SHARED)
        f.close()
        assert len(seen) >= 64, seen
        """
    )


def test_hook_during_the_close_of_a_dropped_file_cannot_keep_it() -> None:
    # A file dropped without close() is closed by its deleter; its hooks then find no file
    # (None) instead of a wrapper around memory about to be freed.
    isolated(
        """
        import gc, warnings, gmem
        kept = []
        class A(gmem.Arch):
            config = {"FREE"}
            def free_folio(self, start_pfn, end_pfn):
                kept.append(self.file)
        warnings.simplefilter("ignore", ResourceWarning)
        a = A()
        f = gmem.GuestMemfd(16 * gmem.PAGE_SIZE, arch=a)
        f.fallocate(0, 16)
        del f
        gc.collect()
        assert kept and all(k is None for k in kept), kept
        assert a.file is None
        """
    )


@pytest.mark.parametrize(
    "call",
    [
        "prepare(0, pfn, Evil())",
        "make_shared(pfn, Evil())",
        "free_folio(pfn, Evil())",
        "invalidate_start(0, 1, Evil())",
        "invalidate_end(0, Evil())",
    ],
)
def test_direct_hook_call_whose_argument_drops_the_file(call: str) -> None:
    isolated(
        f"""
        import gc, warnings, gmem
        warnings.simplefilter("ignore", ResourceWarning)
        a = gmem.arch.SNP()
        f = gmem.GuestMemfd(16 * gmem.PAGE_SIZE, arch=a)
        pfn = f.get_pfn(0)[0]
        class Evil:
            def __index__(self):
                global f
                f = None
                gc.collect()
                return pfn + 1
        try:
            a.{call}
        except ValueError as exc:
            assert "self" in str(exc), exc
        """
    )
