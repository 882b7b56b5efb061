"""Argument conversion with the engine's rules: integers via ``__index__``, 0 <= v < 2**64."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import numpy.typing as npt

from gmem._consts import MAX_ORDER, U64_MAX


def u64(value: Any, name: str) -> int:
    """``value`` as an unsigned 64-bit int; TypeError or ValueError naming ``name``."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: must be an integer, got {type(value).__name__}") from None
    if v < 0:
        raise ValueError(f"{name}: must be >= 0, got {v}")
    if v > U64_MAX:
        raise ValueError(f"{name}: must be < 2**64, got {v}")
    return v


def order_arg(value: Any, name: str = "order") -> int:
    v = u64(value, name)
    if v > MAX_ORDER:
        raise ValueError(f"{name}: must be in 0..18, got {v}")
    return v


def end_arg(value: Any, none_value: int) -> int:
    return none_value if value is None else u64(value, "end")


def check_start_end(start: int, end: int) -> None:
    if start > end:
        raise ValueError(f"start: must be <= end, got start={start} end={end}")


def u64_array(obj: Any, name: str) -> npt.NDArray[np.uint64]:
    """A 1-D array of non-negative integers as a contiguous uint64 array."""
    a = np.asarray(obj)
    if a.ndim != 1:
        raise ValueError(f"{name}: must be a 1-D array, got {a.ndim} dims")
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"{name}: must hold integers, got dtype {a.dtype}")
    if a.size and a.dtype.kind == "i" and (a < 0).any():
        i = int(np.argmax(a < 0))
        raise ValueError(f"{name}: must be >= 0, got {a[i]} at position {i}")
    return np.ascontiguousarray(a, dtype=np.uint64)


def index_list(obj: Any, name: str) -> list[int]:
    """A bulk call's 1-D array-like of integers, each value converted as ``u64`` converts
    one argument: numpy integer and bool arrays, or element by element through
    ``__index__`` for anything numpy makes an object array of.  Errors name the argument
    and the position."""
    try:
        a = np.asarray(obj)
        # numpy makes a list of Python ints float64 when one of them does not fit int64
        # ([1, 2**63]): a sequence that is no integer array goes element by element.
        if not isinstance(obj, np.ndarray) and a.size and a.dtype.kind not in "iub":
            a = np.asarray(obj, dtype=object)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{name}: must be a 1-D array of integers ({exc})") from None
    if a.ndim != 1:
        raise ValueError(f"{name}: must be a 1-D array, got {a.ndim} dims")
    if not a.size:
        return []
    if a.dtype.kind == "i" and (a < 0).any():
        i = int(np.argmax(a < 0))
        raise ValueError(f"{name}: must be >= 0, got {a[i]} at position {i}")
    if a.dtype.kind in "iub":
        return [int(v) for v in a.tolist()]
    if a.dtype.kind != "O":
        raise TypeError(f"{name}: must hold integers, got dtype {a.dtype}")
    out = []
    for i, item in enumerate(a.tolist()):
        try:
            out.append(u64(item, name))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} at position {i}") from None
    return out


def u64_columns(
    a: Any, b: Any, c: Any, names: tuple[str, str, str]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Three parallel arrays of one length (a mismatch is a ValueError naming the second)."""
    cols = u64_array(a, names[0]), u64_array(b, names[1]), u64_array(c, names[2])
    if not len(cols[0]) == len(cols[1]) == len(cols[2]):
        raise ValueError(
            f"{names[1]}: {names[0]}, {names[1]} and {names[2]} must have one length, got "
            f"{len(cols[0])}, {len(cols[1])}, {len(cols[2])}"
        )
    return cols


def out_rows(out: Any) -> npt.NDArray[np.uint64]:
    """A caller's buffer for a walk: a writable, C-contiguous (m, 2) uint64 array."""
    if not isinstance(out, np.ndarray):
        raise TypeError(
            f"out: must be a numpy array of uint64 with shape (n, 2), got {type(out).__name__}"
        )
    if out.dtype != np.uint64 or not out.dtype.isnative:
        raise TypeError(f"out: must have dtype uint64, got {out.dtype}")
    if out.ndim != 2 or out.shape[1] != 2:
        raise ValueError(f"out: must have shape (n, 2), got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out: must be C-contiguous (np.empty((n, 2), np.uint64) is)")
    if not out.flags.writeable:
        raise ValueError("out: must be writable (this array is read-only)")
    return out


def check_room(out: npt.NDArray[np.uint64], n: int) -> None:
    if out.shape[0] < n:
        raise ValueError(f"out: has room for {out.shape[0]} ranges, the walk needs {n}")


def into(out: npt.NDArray[np.uint64], ranges: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Write the walk's ranges into the first rows of ``out``; those rows, as a view."""
    check_room(out, len(ranges))
    out[: len(ranges)] = ranges
    return out[: len(ranges)]


SMALL_REQUEST = 64 << 20  # requests below this many bytes fit without asking the host


def host_memory_available() -> int:
    """MemAvailable in bytes, capped by what RLIMIT_AS leaves this process (as the engine)."""
    import resource

    avail = 2**64 - 1
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) << 10
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * resource.getpagesize()
            avail = min(avail, max(0, limit - used))
    except OSError:
        pass
    return avail


def check_page_count(start: int, end: int) -> None:
    """A page_pfns answer of end - start entries must fit in the host's memory."""
    n = end - start
    if n > SMALL_REQUEST // 8 and n > host_memory_available() // 8:
        raise ValueError(
            f"end: [{start}, {end}) is {end - start} pages: one PFN each is more than the host "
            "has available"
        )
