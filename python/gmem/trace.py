"""Conversion workload traces: JSON Lines, one operation per line, and their replay.

The format is documented in docs/trace-format.md.  A trace starts with a ``create`` line
that carries the format ``version``; every later line is one operation on that file, in
the uapi's units (bytes for fallocate, punch_hole and set_attributes; page indexes for
the page accesses), or an ``expect`` line that asserts what the operation before it did.
Blank lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import gmem
from gmem._consts import PAGE_SIZE

VERSION = 1

# op -> (required fields, optional fields with defaults)
OPS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "create": (("version", "size"), {"flags": 0, "folio_order": 0}),
    "fallocate": (("offset", "len"), {}),
    "punch_hole": (("offset", "len"), {}),
    "guest_read": (("index",), {}),
    "guest_write": (("index", "token"), {}),
    "host_read": (("index",), {}),
    "host_write": (("index", "token"), {}),
    "pin": (("index",), {}),
    "unpin": (("index",), {}),
    "set_attributes": (("offset", "size", "attributes"), {"flags": 0}),
    "check": ((), {}),
    "close": ((), {}),
    "expect": ((), {"error": None, "error_offset": None, "value": None}),
}
ERRORS = ("ConversionBusy", "SigBus", "OutOfMemory", "ValueError")


class TraceError(Exception):
    """A malformed trace line or a failed expectation; names the file and line."""

    def __init__(self, where: str, line: int, message: str) -> None:
        super().__init__(f"{where}:{line}: {message}")
        self.line = line


@dataclass
class Record:
    line: int
    op: str
    args: dict[str, Any]


def _check_record(where: str, line: int, obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise TraceError(where, line, f"expected a JSON object, got {type(obj).__name__}")
    op = obj.get("op")
    if op not in OPS:
        raise TraceError(where, line, f"unknown op {op!r}; known: {', '.join(OPS)}")
    required, optional = OPS[op]
    unknown = set(obj) - {"op", *required, *optional}
    if unknown:
        raise TraceError(where, line, f"{op}: unknown field(s) {', '.join(sorted(unknown))}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise TraceError(where, line, f"{op}: missing field(s) {', '.join(missing)}")
    args = {**optional, **{k: v for k, v in obj.items() if k != "op"}}
    for key, value in args.items():
        if key == "error":
            if value is not None and value not in ERRORS:
                raise TraceError(where, line, f"expect: error must be one of {ERRORS}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TraceError(where, line, f"{op}: {key} must be an integer, got {value!r}")
    if op == "create" and args["version"] != VERSION:
        raise TraceError(where, line, f"unsupported trace version {args['version']} (want 1)")
    if op == "expect" and args["error"] is None and args["value"] is None:
        raise TraceError(where, line, "expect: needs an error or a value")
    return Record(line, op, args)


def parse(lines: Iterable[str], where: str = "<trace>") -> list[Record]:
    """Parse and validate a whole trace before anything runs."""
    records = []
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(where, number, f"not valid JSON: {exc.msg}") from None
        records.append(_check_record(where, number, obj))
    if not records or records[0].op != "create":
        raise TraceError(where, records[0].line if records else 1, "a trace starts with create")
    for r in records[1:]:
        if r.op == "create":
            raise TraceError(where, r.line, "only the first line may create the file")
    for prev, r in itertools.pairwise(records):
        if r.op == "expect" and prev.op in ("create", "expect"):
            raise TraceError(where, r.line, f"expect follows {prev.op}, not an operation")
    return records


def load(path: str | Path) -> list[Record]:
    path = Path(path)
    with path.open() as f:
        return parse(f, str(path))


def dumps(records: Iterable[dict[str, Any]]) -> str:
    """JSON Lines text for a list of operation dicts (each with an "op")."""
    return "".join(json.dumps(r, separators=(", ", ": ")) + "\n" for r in records)


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

    def row(self) -> dict[str, Any]:
        s, a = self.stats, self.arch_stats
        return {
            "arch": self.arch,
            "hook_design": self.hook_design,
            "operations": self.operations,
            "hook_calls": s["prepare_calls"] + s["make_shared_calls"] + s["free_calls"],
            "pfn_ranges": s["hook_ranges"],
            "pages_scrubbed": a.get("pages_scrubbed", 0),
            "rmp_updates": a.get("rmp_updates", 0),
            "psmash": a.get("psmash", 0),
            "rmp_left": self.rmp_left,
            "expected_errors": self.expected_errors,
            "violations": len(self.violations),
            "first_violation": self.violations[0] if self.violations else "",
            "engine_ms": round(self.seconds * 1000, 2),
        }


def _call(f: Any, r: Record) -> Any:
    a = r.args
    if r.op in ("fallocate", "punch_hole"):
        if a["offset"] % PAGE_SIZE or a["len"] % PAGE_SIZE or a["len"] == 0:
            raise ValueError(f"offset: {r.op} needs a page-aligned, non-empty range")
        start = a["offset"] // PAGE_SIZE
        return getattr(f, r.op)(start, start + a["len"] // PAGE_SIZE)
    if r.op == "set_attributes":
        return f.set_memory_attributes2(a["offset"], a["size"], a["attributes"], a["flags"])
    if r.op in ("guest_write", "host_write"):
        return getattr(f, r.op)(a["index"], a["token"])
    if r.op in ("guest_read", "host_read", "pin", "unpin"):
        return getattr(f, r.op)(a["index"])
    return getattr(f, r.op)()


def replay(
    records: list[Record],
    *,
    arch: str = "sw_protected",
    hook_design: str = "split",
    impl: ModuleType = gmem,
    where: str = "<trace>",
) -> Summary:
    """Run a parsed trace on a new file; raise TraceError at the first unmet expectation."""
    c = records[0].args
    f = impl.GuestMemfd(
        c["size"],
        flags=c["flags"],
        folio_order=c["folio_order"],
        arch=arch,
        hook_design=hook_design,
    )
    seconds, expected, found = 0.0, 0, []
    try:
        i = 1
        while i < len(records):
            r = records[i]
            t0 = time.perf_counter()
            try:
                result, error = _call(f, r), None
            except (gmem.GmemError, ValueError) as exc:
                result, error = None, exc
            seconds += time.perf_counter() - t0
            if i + 1 < len(records) and records[i + 1].op == "expect":
                _expect(where, records[i + 1], r, result, error)
                expected += error is not None
                i += 2
            elif error is not None:
                raise TraceError(where, r.line, f"{r.op} failed: {type(error).__name__}: {error}")
            else:
                i += 1
            if r.op == "check" and error is None:
                found += [str(v) for v in result]
    finally:
        f.close()
    found += [str(v) for v in f.check() if str(v) not in set(found)]  # incl. teardown
    rmp = f.physmem.rmp_runs()
    rmp_left = int(((rmp[:, 1] - rmp[:, 0]) * (rmp[:, 2] != 0)).sum())
    return Summary(
        arch,
        hook_design,
        f.stats,
        f.arch.stats,
        found,
        expected,
        seconds,
        rmp_left,
        operations=sum(r.op != "expect" for r in records[1:]),
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
                f"expected {want_error} from line {prev.line}, got {type(error).__name__}: {error}",
            )
        got_offset = getattr(error, "error_offset", None)
        if want_offset is not None and got_offset != want_offset:
            raise TraceError(
                where, r.line, f"expected error_offset {want_offset}, got {got_offset}"
            )
    elif error is not None:
        raise TraceError(
            where, r.line, f"line {prev.line} ({prev.op}) failed: {type(error).__name__}: {error}"
        )
    if want_value is not None and result != want_value:
        shown = "nothing" if result is None else hex(result)
        raise TraceError(
            where,
            r.line,
            f"expected value {want_value:#x} from line {prev.line} ({prev.op}), got {shown}",
        )


def iter_records(ops: Iterable[dict[str, Any]]) -> Iterator[Record]:
    """Records from operation dicts (as a generator builds them), validated."""
    for number, op in enumerate(ops, 1):
        yield _check_record("<generated>", number, op)
