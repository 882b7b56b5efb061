"""Conversion workload traces: JSON Lines, one operation per line, and their replay.

Format, version 1 (docs/trace-format.md in the source tree says the same at length).

A trace is one guest_memfd file and the operations done to it: one JSON object per
line; blank lines and lines starting with ``#`` are ignored.  Every object has an
``"op"``; the fields are integers (0 .. 2**64-1).  Byte offsets and sizes are
page aligned (4096), as the kernel's uapi requires.

=============== ================================================ =======================
op              fields (default)                                 what it does
=============== ================================================ =======================
create          version (1), size (bytes), flags (0),            first line only: the
                folio_order (0)                                  file; flags 1 = MMAP,
                                                                 2 = INIT_SHARED
fallocate       offset, len (bytes)                              allocate the holes
punch_hole      offset, len (bytes)                              free the folios
set_attributes  offset, size, attributes, flags (0)              conversion: attributes
                                                                 8 = private, 0 = shared
guest_read      index (page)                                     result: the token read
guest_write     index, token                                     store a 64-bit token
host_read       index                                            a host mmap access
host_write      index, token
pin / unpin     index                                            a GUP (DMA) pin
populate        index, token (none: in place)                    kvm_gmem_populate
memory_failure  index                                            poison the folio
check                                                            run the checker
close                                                            tear the file down
expect          error, error_offset, value                       what the line before
                                                                 did: error is one of
                                                                 ConversionBusy, SigBus,
                                                                 HWPoison, OutOfMemory,
                                                                 ValueError
=============== ================================================ =======================

Every line is validated before anything runs; a bad line is reported as ``FILE:LINE:
what is wrong``.  An operation that fails without an ``expect`` after it, or an
``expect`` that does not hold, ends that replay with ``FILE:LINE``.

From Python: ``trace.load(path)`` (or ``trace.parse(lines)``), then ``trace.replay(records,
arch=..., hook_design=...)``, which returns a :class:`Summary`.  ``replay`` also takes
any iterable of records (``trace.stream(path)``, ``trace.iter_records(dicts)``), so a
trace never has to be held in memory whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import gmem
from gmem._consts import (
    FLAG_INIT_SHARED,
    FLAG_MMAP,
    GARBLED,
    HUGE_POLICIES,
    MAX_ORDER,
    PAGE_SIZE,
    PRIVATE,
)

VERSION = 1
U64_MAX = 2**64 - 1

# op -> (required fields, optional fields with defaults)
OPS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "create": (("version", "size"), {"flags": 0, "folio_order": 0, "huge_policy": "none"}),
    "fallocate": (("offset", "len"), {}),
    "punch_hole": (("offset", "len"), {}),
    "guest_read": (("index",), {}),
    "guest_write": (("index", "token"), {}),
    "host_read": (("index",), {}),
    "host_write": (("index", "token"), {}),
    "pin": (("index",), {}),
    "unpin": (("index",), {}),
    "populate": (("index",), {"token": None}),
    "memory_failure": (("index",), {}),
    "set_attributes": (("offset", "size", "attributes"), {"flags": 0}),
    "check": ((), {}),
    "close": ((), {}),
    "expect": ((), {"error": None, "error_offset": None, "value": None}),
}
ERRORS = ("ConversionBusy", "SigBus", "HWPoison", "OutOfMemory", "ValueError")
# Fields in bytes that must be page aligned, per op; (offset field, length field).
_BYTE_RANGES = {
    "fallocate": ("offset", "len"),
    "punch_hole": ("offset", "len"),
    "set_attributes": ("offset", "size"),
}


def token(value: int | None) -> str:
    """A content token as printed: ``GARBLED`` by name, anything else in hex."""
    if value is None:
        return "nothing"
    return "GARBLED" if value == GARBLED else f"{value:#x}"


def name_garbled(text: str) -> str:
    """``text`` with the GARBLED token, where it appears in hex, named."""
    return text.replace(f"{GARBLED:#x}", "GARBLED")


class TraceError(Exception):
    """A malformed trace line or a failed expectation; names the file and line."""

    def __init__(self, where: str, line: int, message: str) -> None:
        super().__init__(f"{where}:{line}: {message}")
        self.where = where
        self.line = line
        self.message = message


@dataclass
class Record:
    line: int
    op: str
    args: dict[str, Any]


class _BadJSON(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is an error (json would keep the last)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _BadJSON(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _int(text: str) -> int:
    # Every field is a u64 (at most 20 digits): refuse a longer one before converting it,
    # which for thousands of digits is slow and past 4,300 digits an error of its own.
    if len(text.lstrip("-")) > 20:
        raise _BadJSON(f"integer of {len(text.lstrip('-')):,} digits (fields are 64-bit)")
    return int(text)


def _decode(where: str, number: int, raw: str | bytes) -> Any:
    """One line's JSON value, or a TraceError that says why not."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(
                where, number, f"not UTF-8: byte {raw[exc.start]:#04x} at column {exc.start + 1}"
            ) from None
    else:
        text = raw
    try:
        return json.loads(text, object_pairs_hook=_object, parse_int=_int)
    except json.JSONDecodeError as exc:
        raise TraceError(where, number, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except _BadJSON as exc:
        raise TraceError(where, number, str(exc)) from None
    except RecursionError:
        raise TraceError(where, number, "not valid JSON: nested too deeply") from None
    except ValueError as exc:  # anything else json refuses
        raise TraceError(where, number, f"not valid JSON: {exc}") from None


def _fail(where: str, line: int, op: str, message: str) -> TraceError:
    return TraceError(where, line, f"{op}: {message}")


def _check_values(where: str, line: int, op: str, args: dict[str, Any]) -> None:
    """What can be known from the line alone: types, ranges, alignment, bits."""
    for key, value in args.items():
        if key == "error":
            if value is not None and value not in ERRORS:
                raise _fail(where, line, op, f"error must be one of {', '.join(ERRORS)}")
            continue
        if key == "huge_policy":
            if value not in HUGE_POLICIES:
                raise _fail(
                    where, line, op, f"huge_policy must be 'none' or 'hugetlb', got {value!r}"
                )
            continue
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, line, op, f"{key} must be an integer, got {value!r}")
        if not 0 <= value <= U64_MAX:
            raise _fail(where, line, op, f"{key} must be in 0..2**64-1, got {value}")
    if op in _BYTE_RANGES:
        off, length = _BYTE_RANGES[op]
        for key in (off, length):
            if args[key] % PAGE_SIZE:
                raise _fail(
                    where, line, op, f"{key} must be a multiple of 4096 (bytes), got {args[key]}"
                )
        if args[length] == 0:
            raise _fail(where, line, op, f"{length} must be > 0")
    if op == "set_attributes":
        if args["attributes"] & ~PRIVATE:
            raise _fail(
                where,
                line,
                op,
                f"attributes: unknown bits {args['attributes'] & ~PRIVATE:#x} "
                "(allowed: 8 = private, 0 = shared)",
            )
        if args["flags"]:
            raise _fail(where, line, op, f"flags must be 0, got {args['flags']}")
    if op == "create":
        if args["version"] != VERSION:
            raise TraceError(
                where, line, f"unsupported trace version {args['version']} (want {VERSION})"
            )
        if args["size"] == 0 or args["size"] % PAGE_SIZE:
            raise _fail(
                where, line, op, f"size must be a positive multiple of 4096, got {args['size']}"
            )
        if args["flags"] & ~(FLAG_MMAP | FLAG_INIT_SHARED):
            raise _fail(
                where,
                line,
                op,
                f"flags: unknown bits {args['flags'] & ~3:#x} (allowed: 1 = MMAP, 2 = INIT_SHARED)",
            )
        if args["folio_order"] > MAX_ORDER:
            raise _fail(
                where, line, op, f"folio_order must be in 0..{MAX_ORDER}, got {args['folio_order']}"
            )
        if args["huge_policy"] == "hugetlb" and not args["folio_order"]:
            raise _fail(where, line, op, "huge_policy 'hugetlb' needs folio_order >= 1")
    if op == "expect":
        if args["error"] is None and args["value"] is None:
            raise TraceError(where, line, "expect: needs an error or a value")
        if args["error_offset"] is not None and args["error"] is None:
            raise TraceError(where, line, "expect: error_offset needs an error")


def _check_record(where: str, line: int, obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise TraceError(where, line, f"expected a JSON object, got {type(obj).__name__}")
    if "op" not in obj:
        raise TraceError(where, line, "missing field op")
    op = obj["op"]
    if not isinstance(op, str) or op not in OPS:
        raise TraceError(where, line, f"unknown op {op!r}; known: {', '.join(OPS)}")
    required, optional = OPS[op]
    unknown = set(obj) - {"op", *required, *optional}
    if unknown:
        raise TraceError(where, line, f"{op}: unknown field(s) {', '.join(sorted(unknown))}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise TraceError(where, line, f"{op}: missing field(s) {', '.join(missing)}")
    args = {**optional, **{k: v for k, v in obj.items() if k != "op"}}
    _check_values(where, line, op, args)
    return Record(line, op, args)


def _in_order(records: Iterable[Record], where: str) -> Iterator[Record]:
    """The records, checked for their order: one create first, an expect after an op."""
    prev: Record | None = None
    for r in records:
        if prev is None and r.op != "create":
            raise TraceError(where, r.line, "a trace starts with create")
        if prev is not None and r.op == "create":
            raise TraceError(where, r.line, "only the first line may create the file")
        if r.op == "expect" and prev is not None and prev.op in ("create", "expect"):
            raise TraceError(where, r.line, f"expect follows {prev.op}, not an operation")
        prev = r
        yield r
    if prev is None:
        raise TraceError(where, 1, "empty trace: a trace starts with create")


def iter_parse(lines: Iterable[str | bytes], where: str = "<trace>") -> Iterator[Record]:
    """Records from JSON Lines text (str or bytes lines), validated one by one."""

    def records() -> Iterator[Record]:
        for number, raw in enumerate(lines, 1):
            stripped = raw.strip()
            if not stripped or stripped[:1] in ("#", b"#"):
                continue
            yield _check_record(where, number, _decode(where, number, stripped))

    return _in_order(records(), where)


def parse(lines: Iterable[str | bytes], where: str = "<trace>") -> list[Record]:
    """Parse and validate a whole trace before anything runs."""
    return list(iter_parse(lines, where))


def stream(path: str | Path) -> Iterator[Record]:
    """The records of a trace file, read as they are used (validate it first)."""
    path = Path(path)
    with path.open("rb") as f:
        yield from iter_parse(f, str(path))


def validate(path: str | Path) -> tuple[Record, int]:
    """Check every line of a trace file without keeping it: its create record and the
    number of operations (expect lines not counted)."""
    create, operations = None, 0
    for r in stream(path):
        if r.op == "create":
            create = r
        elif r.op != "expect":
            operations += 1
    assert create is not None  # _in_order raised otherwise
    return create, operations


def load(path: str | Path) -> list[Record]:
    return list(stream(path))


def dumps(records: Iterable[dict[str, Any]]) -> str:
    """JSON Lines text for operation dicts (each with an "op")."""
    return "".join(dump_lines(records))


def dump_lines(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    """One JSON Lines line per operation dict, as they come."""
    for r in records:
        yield json.dumps(r, separators=(", ", ": ")) + "\n"


def violation_record(v: Any) -> dict[str, Any]:
    """A violation as data: arch, rule, index, pfn (None where it has none), detail."""
    return {
        "arch": v.arch,
        "rule": v.rule,
        "index": v.index,
        "pfn": v.pfn,
        "detail": name_garbled(v.detail),
    }


@dataclass
class Summary:
    """What one replay did: the file's counters, the arch's, and every violation."""

    arch: str
    hook_design: str
    stats: dict[str, int]
    arch_stats: dict[str, int]
    violations: list[str]
    expected_errors: int
    seconds: float
    rmp_left: int = 0
    operations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # The same violations as data (arch, rule, index, pfn, detail).
    violation_records: list[dict[str, Any]] = field(default_factory=list)
    huge_policy: str = "none"

    def row(self) -> dict[str, Any]:
        s, a = self.stats, self.arch_stats
        return {
            "arch": self.arch,
            "hook_design": self.hook_design,
            "huge_policy": self.huge_policy,
            "operations": self.operations,
            "hook_calls": s["prepare_calls"] + s["make_shared_calls"] + s["free_calls"],
            "pfn_ranges": s["hook_ranges"],
            "pages_scrubbed": a.get("pages_scrubbed", 0),
            "rmp_updates": a.get("rmp_updates", 0),
            "psmash": a.get("psmash", 0),
            "folio_splits": s["folio_splits"],
            "folio_merges": s["folio_merges"],
            "demotes": a.get("demotes", 0),
            "conversions_busy": s["conversions_busy"],
            "rmp_left": self.rmp_left,
            "expected_errors": self.expected_errors,
            "violations": len(self.violations),
            "first_violation": self.violations[0] if self.violations else "",
            "engine_ms": round(self.seconds * 1000, 2),
        }


def _call(f: Any, r: Record) -> Any:
    a = r.args
    if r.op in ("fallocate", "punch_hole"):
        start = a["offset"] // PAGE_SIZE
        return getattr(f, r.op)(start, start + a["len"] // PAGE_SIZE)
    if r.op == "set_attributes":
        return f.set_memory_attributes2(a["offset"], a["size"], a["attributes"], a["flags"])
    if r.op in ("guest_write", "host_write"):
        return getattr(f, r.op)(a["index"], a["token"])
    if r.op in ("guest_read", "host_read", "pin", "unpin", "memory_failure"):
        return getattr(f, r.op)(a["index"])
    if r.op == "populate":
        return f.populate(a["index"], a["token"])
    return getattr(f, r.op)()


def replay(
    records: Iterable[Record],
    *,
    arch: str = "sw_protected",
    hook_design: str = "mainline",
    huge_policy: str | None = None,
    impl: ModuleType = gmem,
    where: str = "<trace>",
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Run a trace on a new file; raise TraceError at the first unmet expectation.

    ``records`` may be any iterable, a list or a stream: it is read once, one record
    ahead.  ``huge_policy`` overrides the create line's (default "none").
    ``progress(operations)``, if given, is called every 65,536 operations."""
    it = _in_order(records, where)
    first = next(it)
    c = first.args
    policy = huge_policy if huge_policy is not None else c["huge_policy"]
    try:
        f = impl.GuestMemfd(
            c["size"],
            flags=c["flags"],
            folio_order=c["folio_order"],
            arch=arch,
            hook_design=hook_design,
            huge_policy=policy,
        )
    except (gmem.GmemError, ValueError) as exc:
        raise TraceError(where, first.line, f"create failed: {type(exc).__name__}: {exc}") from None
    seconds, expected, operations = 0.0, 0, 0
    found: dict[str, Any] = {}  # str(violation) -> violation, in order, each once
    try:
        pending = next(it, None)
        while pending is not None:
            r, pending = pending, next(it, None)
            t0 = time.perf_counter()
            try:
                result, error = _call(f, r), None
            except (gmem.GmemError, ValueError) as exc:
                result, error = None, exc
            seconds += time.perf_counter() - t0
            operations += 1
            if progress is not None and operations % 65536 == 0:
                progress(operations)
            if pending is not None and pending.op == "expect":
                _expect(where, pending, r, result, error)
                expected += error is not None
                pending = next(it, None)
            elif error is not None:
                raise TraceError(
                    where,
                    r.line,
                    f"{r.op} failed: {type(error).__name__}: {name_garbled(str(error))}",
                )
            if r.op == "check" and error is None:
                found.update((str(v), v) for v in result if str(v) not in found)
    finally:
        f.close()
    found.update((str(v), v) for v in f.check() if str(v) not in found)  # incl. teardown
    rmp = f.physmem.rmp_runs()
    rmp_left = int(((rmp[:, 1] - rmp[:, 0]) * (rmp[:, 2] != 0)).sum())
    return Summary(
        arch,
        hook_design,
        f.stats,
        f.arch.stats,
        [name_garbled(text) for text in found],
        expected,
        seconds,
        rmp_left,
        operations=operations,
        violation_records=[violation_record(v) for v in found.values()],
        huge_policy=policy,
    )


def _expect(where: str, r: Record, prev: Record, result: Any, error: BaseException | None) -> None:
    want_error, want_offset, want_value = r.args["error"], r.args["error_offset"], r.args["value"]
    if want_error is not None:
        if error is None:
            raise TraceError(
                where,
                r.line,
                f"expected {want_error} from line {prev.line}, but {prev.op} succeeded",
            )
        if type(error).__name__ != want_error:
            raise TraceError(
                where,
                r.line,
                f"expected {want_error} from line {prev.line}, got {type(error).__name__}: "
                f"{name_garbled(str(error))}",
            )
        got_offset = getattr(error, "error_offset", None)
        if want_offset is not None and got_offset != want_offset:
            raise TraceError(
                where, r.line, f"expected error_offset {want_offset}, got {got_offset}"
            )
    elif error is not None:
        raise TraceError(
            where,
            r.line,
            f"line {prev.line} ({prev.op}) failed: {type(error).__name__}: "
            f"{name_garbled(str(error))}",
        )
    if want_value is not None and result != want_value:
        raise TraceError(
            where,
            r.line,
            f"expected value {token(want_value)} from line {prev.line} ({prev.op}), "
            f"got {token(result)}",
        )


def iter_records(ops: Iterable[dict[str, Any]]) -> Iterator[Record]:
    """Records from operation dicts (as a generator builds them), validated."""
    for number, op in enumerate(ops, 1):
        yield _check_record("<generated>", number, op)
