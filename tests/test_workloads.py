"""gmem.workloads: every workload replays under every arch, hook design and huge-folio
policy with the violations the design explains, is deterministic for its seed, follows its
sourced numbers, and refuses bad arguments; and the ``gmem workload`` command."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gmem
from gmem import trace, workloads
from gmem._consts import BUILTIN_ARCHS, HOOK_DESIGNS, HUGE_POLICIES

MiB = 1 << 20
SIZE = 32 * MiB  # the smallest guest at 2 MiB folios
NAMES = list(workloads.WORKLOADS)


def records(name: str, **kw: Any) -> list[dict[str, Any]]:
    return list(workloads.generate(name, kw.pop("size", SIZE), **kw))


@pytest.mark.parametrize("name", NAMES)
def test_every_workload_replays_under_every_arch_design_and_policy(name: str) -> None:
    """No TraceError anywhere; the only violations are pKVM's under "overloaded", where
    the free hook scrubs pages the guest shares (the seed thread's point)."""
    for policy in HUGE_POLICIES:
        recs = records(name, huge_policy=policy)
        for arch, design in itertools.product(BUILTIN_ARCHS, HOOK_DESIGNS):
            s = trace.replay(trace.iter_records(recs), arch=arch, hook_design=design)
            rules = {v["rule"] for v in s.violation_records}
            if arch == "pkvm" and design == "overloaded" and name not in ("balloon", "kexec"):
                assert rules == {"conversion-keeps-guest-data"}, (policy, arch, design)
            else:
                assert not rules, (name, policy, arch, design, s.violations[:1])
            assert s.expected_errors == (8 if name == "passthrough" else 0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("order", "policy"), [(0, "none"), (4, "hugetlb"), (10, "hugetlb")])
def test_workloads_replay_at_other_folio_sizes(name: str, order: int, policy: str) -> None:
    size = 16 * max(2 * MiB, gmem.PAGE_SIZE << order)
    recs = records(name, size=size, folio_order=order, huge_policy=policy)
    for arch in ("snp", "pkvm"):
        s = trace.replay(trace.iter_records(recs), arch=arch, hook_design="mainline")
        assert s.violations == []
    # The trace's own policy and the other one both replay.
    other = "none" if policy == "hugetlb" else None
    if other:
        trace.replay(trace.iter_records(recs), arch="tdx", huge_policy=other)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed_and_the_seed_matters(name: str) -> None:
    assert records(name, seed=3) == records(name, seed=3)
    if name not in ("kexec",):  # kexec's random choices are only I/O slots
        assert records(name, seed=3) != records(name, seed=4)
    first = records(name)[0]
    assert first["op"] == "create" and first["size"] == SIZE
    assert trace.parse(trace.dumps(records(name)).splitlines())  # valid JSON Lines


def test_records_are_arch_neutral() -> None:
    for name in NAMES:
        for r in records(name):
            assert r["op"] != "expect" or set(r) == {"op", "error", "error_offset"}


def test_psc_requests_use_2m_entries_where_aligned_and_at_most_64() -> None:
    assert list(workloads.psc_requests(0, 1024)) == [(0, 1024)]  # two 2 MiB entries
    assert list(workloads.psc_requests(510, 1026)) == [(510, 1026)]  # 2 + 1 + 2 entries
    big = list(workloads.psc_requests(0, 200 * 512))  # 200 entries of 2 MiB: 4 requests
    assert [e - s for s, e in big] == [64 * 512] * 3 + [8 * 512]
    small = list(workloads.psc_requests(1, 100))  # 4 KiB entries
    assert [e - s for s, e in small] == [64, 35]
    assert workloads.SOURCES["snp_psc_entries"][0] == 64


def test_swiotlb_follows_the_6_percent_rule_clamped() -> None:
    for size, want in [(256 * 1024 * MiB, 1024 * MiB), (4096 * MiB, 64 * MiB + 0)]:
        lay = workloads.layout(size, 9)
        got = (lay.swiotlb[1] - lay.swiotlb[0]) * gmem.PAGE_SIZE
        rule = min(max(size * 6 // 100, 64 * MiB), 1024 * MiB)
        assert got == -(-rule // (2 * MiB)) * 2 * MiB
        del want
    lay = workloads.layout(16 * 1024 * MiB, 9)  # 6 % of 16 GiB = 983 MiB
    assert (lay.swiotlb[1] - lay.swiotlb[0]) * gmem.PAGE_SIZE == 984 * MiB


def test_tdx_eager_accepts_everything_lazy_a_part() -> None:
    size = 1024 * MiB
    lazy = workloads.summarize(workloads.tdx_boot(size))
    eager = workloads.summarize(workloads.tdx_boot(size, lazy=False))
    assert eager["ops"]["guest_read"] > lazy["ops"]["guest_read"]
    s = trace.replay(trace.iter_records(workloads.tdx_boot(size, lazy=False)), arch="tdx")
    assert s.stats["folios_allocated"] == size // (2 * MiB)  # every folio faulted in


@pytest.mark.parametrize(
    ("call", "kind", "message"),
    [
        (lambda: workloads.snp_boot(3 * MiB), ValueError, "size: must be a positive multiple"),
        (lambda: workloads.snp_boot(8 * MiB), ValueError, "at least 16 strides"),
        (lambda: workloads.snp_boot(SIZE, vcpus=0), ValueError, r"vcpus: .* 1\.\.254"),
        (lambda: workloads.tdx_boot(SIZE, lazy=1), TypeError, "lazy: must be a bool"),  # type: ignore[arg-type]
        (lambda: workloads.balloon(SIZE, fraction=1.5), ValueError, r"fraction: must be in 0\.\.1"),
        (lambda: workloads.kexec(SIZE, seed=-1), ValueError, "seed: must be an integer >= 0"),
        (lambda: workloads.kexec(SIZE, huge_policy="thp"), ValueError, "huge_policy: must be"),
        (lambda: workloads.kexec(SIZE, folio_order=0, huge_policy="hugetlb"), ValueError, ">= 1"),
        (lambda: workloads.kexec(SIZE, folio_order=19), ValueError, r"folio_order: .* 0\.\.18"),
        (lambda: workloads.kexec(2.0), TypeError, "size: must be an int"),  # type: ignore[arg-type]
        (lambda: workloads.generate("boot", SIZE), ValueError, "unknown workload 'boot'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_generated(
    call: Any, kind: type[Exception], message: str
) -> None:
    with pytest.raises(kind, match=message):
        call()


def test_every_number_has_a_source_or_says_it_is_an_assumption() -> None:
    for key, (_, source) in workloads.SOURCES.items():
        assert source, key
    doc = (Path(__file__).parent.parent / "docs" / "workloads.md").read_text()
    for word in (
        "69dcb1e3bbbe",
        "15d9088779b8",
        "3074152e56c9",
        "mem_encrypt_setup_arch",
        "PR 1220",
        "13535",
        "assumption",
    ):
        assert word in doc, word


def gmem_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args], capture_output=True, text=True, timeout=120
    )


def test_workload_command_prints_writes_and_replays(tmp_path: Path) -> None:
    out = gmem_cli("workload", "passthrough", "--size", "32M", "--seed", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout == trace.dumps(workloads.passthrough(SIZE, seed=2))
    path = tmp_path / "p.jsonl"
    out = gmem_cli(
        "workload", "passthrough", "--size", "32M", "--seed", "2", "--write-trace", str(path)
    )
    assert out.returncode == 0 and path.read_text() == trace.dumps(
        workloads.passthrough(SIZE, seed=2)
    )
    assert "set_attributes" in out.stdout and f"lines to {path}" in out.stderr
    out = gmem_cli("replay", str(path), "--arch", "snp", "--json", "-q")
    assert out.returncode == 0, out.stderr
    assert {r["expected_errors"] for r in json.loads(out.stdout)["runs"]} == {8}


def test_workload_command_summary_json_and_options() -> None:
    out = gmem_cli("workload", "tdx_boot", "--size", "64M", "--eager", "--vcpus", "2", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    want = workloads.summarize(workloads.tdx_boot(64 * MiB, lazy=False, vcpus=2))
    assert doc["workload"] == "tdx_boot" and doc["ops"] == want["ops"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["balloon", "--size", "32M", "--vcpus", "2"],
            "argument --vcpus: only snp_boot and tdx_boot",
        ),
        (["snp_boot", "--size", "32M", "--eager"], "argument --eager: only tdx_boot"),
        (["snp_boot", "--size", "3M"], "argument --size: must be a positive multiple"),
        (
            ["snp_boot", "--size", "32M", "--folio-size", "4K", "--huge-policy", "hugetlb"],
            "argument --huge-policy: hugetlb needs",
        ),
        (["boot", "--size", "32M"], "argument NAME: invalid choice"),
        (["snp_boot"], "the following arguments are required: --size"),
    ],
)
def test_workload_command_names_the_argument_it_refuses(args: list[str], message: str) -> None:
    out = gmem_cli("workload", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
