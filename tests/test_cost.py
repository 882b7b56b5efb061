"""gmem.CostModel: defaults with sources, files that override them (TOML, JSON), bad files
named by key, estimates that add up, and --costs on gmem demo and gmem replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gmem
from gmem import cost, trace, workloads

MiB = 1 << 20


def test_every_event_has_a_default_with_a_source_or_an_assumption() -> None:
    model = gmem.CostModel.default()
    assert set(cost.EVENTS) <= set(model.costs)
    for row in model.table():
        assert row["source"] and row["counts"], row
    assert model.latency("fault", "tdx") == 7_750.0  # TDX's own, from the published 8 us
    assert model.latency("fault", "snp") == model.costs["fault"]
    sourced = [k for k, (_, s) in cost.DEFAULTS.items() if not s.startswith("assumption")]
    assert sourced == ["tdx.fault"]  # the docs say which are assumptions; keep them honest


def test_estimate_is_the_sum_of_latency_times_count() -> None:
    recs = workloads.passthrough(32 * MiB)
    s = trace.replay(trace.iter_records(recs), arch="snp")
    model = gmem.CostModel.default()
    total, breakdown = model.estimate(s)
    assert total == pytest.approx(sum(breakdown.values()))
    assert breakdown["rmp_update"] == s.arch_stats["rmp_updates"] * 500.0
    assert breakdown["conversion_busy"] == 8 * 8_000.0
    assert breakdown["fault"] == s.stats["folios_allocated"] * 2_000.0
    row = {"arch": "snp", "stats": s.stats, "arch_stats": s.arch_stats}
    assert model.estimate(row) == (total, breakdown)


def test_a_toml_file_overrides_some_values_per_event_and_per_arch(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'fault = 1000\n[tdx]\nfault = 9000\n[snp.rmp_update]\nns = 600\nsource = "ours"\n'
    )
    model = gmem.CostModel.load(path)
    assert model.latency("fault", "snp") == 1000 and model.latency("fault", "tdx") == 9000
    assert model.costs["rmp_update"] == 500 and model.latency("rmp_update", "snp") == 600
    assert model.sources["snp.rmp_update"] == "ours" and model.sources["fault"] == "from c.toml"
    assert model.costs["zero_page"] == 250  # untouched defaults stay


def test_a_json_file_works_the_same(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"zero_page": 100, "pkvm": {"scrub_page": {"ns": 1}}}))
    model = gmem.CostModel.load(path)
    assert model.costs["zero_page"] == 100 and model.latency("scrub_page", "pkvm") == 1


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.toml", "fualt = 3\n", "unknown event 'fualt'; events: fault, zero_page"),
        ("c.toml", "[sev]\nfault = 3\n", "unknown event 'sev'"),
        ("c.toml", "[tdx]\nfualt = 3\n", "unknown event 'tdx.fualt'"),
        ("c.toml", 'fault = "fast"\n', "fault must be a number of ns, got 'fast'"),
        ("c.toml", "fault = -1\n", r"fault must be in 0\.\.1e15 ns, got -1"),
        ("c.toml", "fault = nan\n", "fault must be in"),
        ("c.toml", "fault = true\n", "fault must be a number of ns, got True"),
        ("c.toml", "[fault]\nms = 3\n", "fault must be a number of ns or a table with ns"),
        ("c.toml", "tdx = 3\n", "tdx must be a table of events"),
        ("c.toml", "fault = \n", "not valid TOML"),
        ("c.json", "[1, 2]", "expected a table of events, got list"),
        ("c.json", "{", "not valid JSON"),
        ("c.yaml", "fault: 3", "a cost file ends in .toml or .json, not '.yaml'"),
    ],
)
def test_a_bad_file_is_refused_naming_the_key(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(cost.CostFileError, match=message) as info:
        gmem.CostModel.load(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_named() -> None:
    with pytest.raises(cost.CostFileError, match="nope.toml: cannot read"):
        gmem.CostModel.load("nope.toml")


def test_human_ns() -> None:
    assert cost.human_ns(999) == "999 ns"
    assert cost.human_ns(1_234_567) == "1.23 ms"
    assert cost.human_ns(90e9) == "90 s"


def gmem_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gmem", *args], capture_output=True, text=True, timeout=120
    )


def test_replay_and_demo_show_the_estimate_and_carry_it_in_json(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(trace.dumps(workloads.tdx_boot(32 * MiB)))
    out = gmem_cli(
        "replay", str(path), "--arch", "tdx", "--hook-design", "mainline", "--costs", "--json", "-q"
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (run,) = doc["runs"]
    summary = trace.replay(trace.stream(path), arch="tdx", hook_design="mainline")
    total, breakdown = gmem.CostModel.default().estimate(summary)
    assert run["estimated_ns"] == round(total)
    assert run["cost_breakdown_ns"] == {k: round(v) for k, v in breakdown.items()}
    assert doc["cost_model"]["latencies_ns"]["tdx.fault"] == 7750
    costs = tmp_path / "c.toml"
    costs.write_text("[tdx]\nfault = 0\nzero_page = 0\n")
    out = gmem_cli(
        "demo",
        "--size",
        "64M",
        "--arch",
        "tdx",
        "--hook-design",
        "split",
        "--huge-policy",
        "none",
        "--costs",
        str(costs),
        "-q",
    )
    assert out.returncode == 0, out.stderr
    assert "estimated" in out.stdout and f"a cost model ({costs})" in out.stdout


def test_without_costs_there_is_no_estimate() -> None:
    out = gmem_cli(
        "demo",
        "--size",
        "64M",
        "--arch",
        "tdx",
        "--hook-design",
        "split",
        "--huge-policy",
        "none",
        "--json",
        "-q",
    )
    assert "estimated_ns" not in out.stdout and "cost_model" not in json.loads(out.stdout)


def test_a_bad_cost_file_stops_the_command_before_it_runs(tmp_path: Path) -> None:
    costs = tmp_path / "c.toml"
    costs.write_text("fault = -3\n")
    out = gmem_cli("demo", "--size", "64M", "--costs", str(costs))
    assert out.returncode == 2
    assert "argument --costs:" in out.stderr and "fault must be in" in out.stderr
    assert out.stdout == ""
