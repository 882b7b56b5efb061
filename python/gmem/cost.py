"""An estimate of what a run costs in time: a latency in ns for each event the model counts.

DOC: cost model

gmem counts events (faults, zeroed pages, RMP updates, conversions, ...), not time. A
:class:`CostModel` gives each event a latency and multiplies::

    estimated_ns = sum(latency[event] * count[event])   over EVENTS

Each event maps onto counters of ``GuestMemfd.stats`` or the arch's ``stats`` (``EVENTS``).
A latency may differ per arch: ``"tdx.fault"`` overrides ``"fault"`` for runs under TDX.
``CostModel.default()`` gives every value with its source, or marks it an assumption;
``CostModel.load(path)`` reads a TOML or JSON file that overrides some of them::

    fault = 2500                      # ns, every arch
    [tdx]
    fault = 7750                      # ns, TDX only
    [snp.rmp_update]
    ns = 600
    source = "measured on our Genoa, 2026-11"

It is an estimate: it leaves out what the model does not count (KVM's own page tables,
re-faults after a zap, contention between vCPUs, the guest's own work). docs/workloads.md
compares it with the published TDX figures.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmem._consts import BUILTIN_ARCHS

Counts = Mapping[str, int]


def _s(*keys: str) -> Callable[[Counts, Counts], int]:
    return lambda stats, arch: sum(int(stats.get(k, 0)) for k in keys)


def _a(*keys: str) -> Callable[[Counts, Counts], int]:
    return lambda stats, arch: sum(int(arch.get(k, 0)) for k in keys)


# event -> (what it counts, the counters, how they are read)
EVENTS: dict[str, tuple[str, str, Callable[[Counts, Counts], int]]] = {
    "fault": (
        "a guest fault that brings a folio in (TD exit or NPF, mapping; TDX: + PAGE.AUG)",
        "stats.folios_allocated",
        _s("folios_allocated"),
    ),
    "zero_page": (
        "zeroing one 4 KiB page (new folio, punched piece, merge)",
        "stats.pages_zeroed + stats.pages_punched_zeroed",
        _s("pages_zeroed", "pages_punched_zeroed"),
    ),
    "scrub_page": (
        "pKVM scrubbing one page on reclaim",
        "arch.pages_scrubbed",
        _a("pages_scrubbed"),
    ),
    "conversion": (
        "one conversion: guest exit to the VMM, KVM_SET_MEMORY_ATTRIBUTES2, resume",
        "stats.conversions",
        _s("conversions"),
    ),
    "conversion_noop": (
        "a conversion that finds nothing to do (the exit round trip)",
        "stats.conversions_noop",
        _s("conversions_noop"),
    ),
    "conversion_busy": (
        "a conversion refused with EAGAIN (the round trip, then a retry)",
        "stats.conversions_busy",
        _s("conversions_busy"),
    ),
    "page_converted": (
        "the per-page part of a conversion (attribute store, unmap)",
        "stats.pages_converted",
        _s("pages_converted"),
    ),
    "invalidation": (
        "a KVM invalidation: zap of the range and a TLB flush",
        "stats.invalidations",
        _s("invalidations"),
    ),
    "hook_call": (
        "one arch hook call (make_private, make_shared, reclaim, invalidate_range)",
        "stats.prepare_calls + make_shared_calls + free_calls + invalidate_range_calls",
        _s("prepare_calls", "make_shared_calls", "free_calls", "invalidate_range_calls"),
    ),
    "hook_range": ("one PFN range handed to a hook", "stats.hook_ranges", _s("hook_ranges")),
    "rmp_update": (
        "SNP: one RMPUPDATE (4 KiB or 2 MiB entry; 2 MiB restores included)",
        "arch.rmp_updates",
        _a("rmp_updates"),
    ),
    "psmash": ("SNP: one PSMASH of a 2 MiB RMP entry", "arch.psmash", _a("psmash")),
    "cache_flush": (
        "SNP: one cache flush of an unassigned range",
        "arch.cache_flushes",
        _a("cache_flushes"),
    ),
    "launch_update": (
        "SNP: LAUNCH_UPDATE of one page (firmware encrypts and measures it)",
        "arch.launch_updates",
        _a("launch_updates"),
    ),
    "page_add": (
        "TDX: TDH.MEM.PAGE.ADD + TDH.MR.EXTEND of one page",
        "arch.pages_added",
        _a("pages_added"),
    ),
    "sept_demote": ("TDX: one S-EPT 2 MiB -> 4 KiB demote", "arch.demotes", _a("demotes")),
    "sept_demote_busy": (
        "TDX: a demote that failed TDX_OPERAND_BUSY (kick the vCPUs, retry)",
        "arch.demote_busy",
        _a("demote_busy"),
    ),
    "sept_promote": ("TDX: one S-EPT 4 KiB -> 2 MiB promote", "arch.promotes", _a("promotes")),
    "folio_split": (
        "splitting one huge folio (hugetlb policy)",
        "stats.folio_splits",
        _s("folio_splits"),
    ),
    "folio_merge": ("merging one huge folio back", "stats.folio_merges", _s("folio_merges")),
}

_DSTACK = (
    "Dstack-TEE/dstack PR 1220: one 4 KiB accept fault (TD exit + TDH.MEM.PAGE.AUG) costs "
    "about 8 us on Granite Rapids; 8,000 ns less this model's zero_page, which the model "
    "counts apart"
)
# (ns, source); a source that starts with "assumption" is one.
DEFAULTS: dict[str, tuple[float, str]] = {
    "fault": (2_000.0, "assumption: an NPF/EPT violation exit, guest_memfd lookup and map"),
    "tdx.fault": (7_750.0, _DSTACK),
    "zero_page": (250.0, "assumption: clearing 4 KiB at ~16 GB/s"),
    "scrub_page": (400.0, "assumption: clearing 4 KiB plus cache maintenance at EL2"),
    "conversion": (
        10_000.0,
        "assumption: exit to the VMM (KVM_HC_MAP_GPA_RANGE / MapGPA / MEM_SHARE), one "
        "ioctl, re-entry",
    ),
    "conversion_noop": (8_000.0, "assumption: the same round trip, no attribute change"),
    "conversion_busy": (8_000.0, "assumption: the round trip that ends in EAGAIN"),
    "page_converted": (20.0, "assumption: per-page attribute and unmap work"),
    "invalidation": (2_000.0, "assumption: an MMU zap of the range and a remote TLB flush"),
    "hook_call": (50.0, "assumption: an indirect call and its locking"),
    "hook_range": (20.0, "assumption: one clamped range walked"),
    "rmp_update": (500.0, "assumption: one RMPUPDATE"),
    "psmash": (1_000.0, "assumption: one PSMASH"),
    "cache_flush": (300.0, "assumption: flushing the cache lines of one 4 KiB page"),
    "launch_update": (20_000.0, "assumption: one SNP_LAUNCH_UPDATE page through the PSP"),
    "page_add": (10_000.0, "assumption: TDH.MEM.PAGE.ADD and TDH.MR.EXTEND of one page"),
    "sept_demote": (2_000.0, "assumption: one TDH.MEM.PAGE.DEMOTE"),
    "sept_demote_busy": (20_000.0, "assumption: kicking every vCPU out and retrying"),
    "sept_promote": (2_000.0, "assumption: one TDH.MEM.PAGE.PROMOTE"),
    "folio_split": (5_000.0, "assumption: splitting a huge folio in the page cache"),
    "folio_merge": (5_000.0, "assumption: merging a huge folio back"),
}


class CostFileError(ValueError):
    """A cost file that cannot be used; the message names the file and the key."""


@dataclass
class CostModel:
    """Latencies in ns per event (keys ``event`` or ``arch.event``) and their sources."""

    costs: dict[str, float]
    sources: dict[str, str] = field(default_factory=dict)
    origin: str = "default"

    def __post_init__(self) -> None:
        for key, value in self.costs.items():
            _check_key(key, self.origin)
            _check_value(key, value, self.origin)

    @classmethod
    def default(cls) -> CostModel:
        return cls(
            {k: v for k, (v, _) in DEFAULTS.items()}, {k: s for k, (_, s) in DEFAULTS.items()}
        )

    @classmethod
    def load(cls, path: str | Path, base: CostModel | None = None) -> CostModel:
        """The defaults (or ``base``) with the values of a TOML (``.toml``) or JSON file."""
        path = Path(path)
        where = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CostFileError(f"{where}: cannot read: {exc.strerror}") from None
        doc = _parse(where, path.suffix.lower(), raw)
        model = base or cls.default()
        costs, sources = dict(model.costs), dict(model.sources)
        for key, value in _flatten(where, doc):
            _check_key(key, where)
            ns, source = _entry(where, key, value)
            costs[key] = ns
            sources[key] = source or f"from {path.name}"
        return cls(costs, sources, where)

    def latency(self, event: str, arch: str) -> float:
        """The ns of one ``event`` under ``arch``: the arch's own value, else the event's."""
        return self.costs.get(f"{arch}.{event}", self.costs.get(event, 0.0))

    def estimate(self, summary: Any) -> tuple[float, dict[str, float]]:
        """(total ns, ns per event) for a run: a ``trace.Summary``, or a mapping with
        ``arch``, ``stats`` and ``arch_stats`` (a row of ``gmem demo --json``)."""
        if isinstance(summary, Mapping):
            arch, stats, arch_stats = summary["arch"], summary["stats"], summary["arch_stats"]
        else:
            arch, stats, arch_stats = summary.arch, summary.stats, summary.arch_stats
        breakdown: dict[str, float] = {}
        for event, (_, _, count) in EVENTS.items():
            n = count(stats, arch_stats)
            if n:
                breakdown[event] = n * self.latency(event, arch)
        return sum(breakdown.values()), breakdown

    def table(self) -> list[dict[str, Any]]:
        """Every latency with what it counts and its source, for the docs and ``--json``."""
        rows = []
        for key in sorted(self.costs, key=lambda k: (k.count("."), k)):
            event = key.rsplit(".", 1)[-1]
            rows.append(
                {
                    "key": key,
                    "ns": self.costs[key],
                    "counts": EVENTS[event][1],
                    "source": self.sources.get(key, ""),
                }
            )
        return rows


def _check_key(key: str, where: str) -> None:
    arch, _, event = key.rpartition(".")
    if event not in EVENTS:
        raise CostFileError(
            f"{where}: unknown event {key!r}; events: {', '.join(EVENTS)} (or ARCH.EVENT)"
        )
    if arch and arch not in BUILTIN_ARCHS:
        raise CostFileError(
            f"{where}: unknown arch {arch!r} in {key!r}; archs: {', '.join(BUILTIN_ARCHS)}"
        )


def _check_value(key: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CostFileError(f"{where}: {key} must be a number of ns, got {value!r}")
    if not 0 <= value < 1e15:  # NaN fails too
        raise CostFileError(f"{where}: {key} must be in 0..1e15 ns, got {value!r}")
    return float(value)


def _parse(where: str, suffix: str, raw: bytes) -> Any:
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise CostFileError(f"{where}: TOML needs Python 3.11; give JSON") from None
        try:
            return tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise CostFileError(f"{where}: not valid TOML: {exc}") from None
    if suffix == ".json":
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CostFileError(f"{where}: not valid JSON: {exc}") from None
    raise CostFileError(f"{where}: a cost file ends in .toml or .json, not {suffix or 'nothing'!r}")


def _flatten(where: str, doc: Any) -> list[tuple[str, Any]]:
    """(key, value) pairs: top-level events, and [arch] tables of events."""
    if not isinstance(doc, dict):
        raise CostFileError(f"{where}: expected a table of events, got {type(doc).__name__}")
    out: list[tuple[str, Any]] = []
    for key, value in doc.items():
        if key in BUILTIN_ARCHS:
            if not isinstance(value, dict):
                raise CostFileError(f"{where}: {key} must be a table of events")
            out += [(f"{key}.{event}", v) for event, v in value.items()]
        else:
            out.append((key, value))
    return out


def _entry(where: str, key: str, value: Any) -> tuple[float, str]:
    """A value: a number of ns, or a table with ns and an optional source."""
    if isinstance(value, dict):
        unknown = set(value) - {"ns", "source"}
        if unknown or "ns" not in value:
            raise CostFileError(
                f"{where}: {key} must be a number of ns or a table with ns (and source); "
                f"got keys {', '.join(sorted(value)) or 'none'}"
            )
        source = value.get("source", "")
        if not isinstance(source, str):
            raise CostFileError(f"{where}: {key}.source must be a string")
        return _check_value(key, value["ns"], where), source
    return _check_value(key, value, where), ""


def human_ns(ns: float) -> str:
    """1234567 -> '1.23 ms'."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:,.3g} {unit}" if ns < 1000 * scale else f"{ns / scale:,.0f} {unit}"
    return f"{ns:,.0f} ns"
