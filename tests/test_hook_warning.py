"""An Arch that overrides a hook its config does not enable is never called: creating a
file with one warns, naming the class, the hook and the config entry it needs."""

from __future__ import annotations

import warnings

import pytest

import gmem

P = gmem.PAGE_SIZE


class NoConfig(gmem.Arch):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def prepare(self, index: int, pfn: int, nr_pages: int) -> None:
        self.calls += 1


def test_a_hook_without_its_config_warns_and_is_indeed_never_called() -> None:
    arch = NoConfig()
    with pytest.warns(gmem.UnusedHookWarning) as record:
        f = gmem.GuestMemfd(8 * P, arch=arch)
    assert str(record[0].message) == (
        "NoConfig overrides prepare, but its config does not enable it: the hook will "
        "never be called; add 'PREPARE' to config"
    )
    assert record[0].filename == __file__  # points at the caller's line
    with f:
        f.get_pfn(0)
    assert arch.calls == 0


@pytest.mark.parametrize(
    ("base", "hook", "entry"),
    [
        (gmem.Arch, "free_folio", "FREE"),
        (gmem.Arch, "make_shared", "FREE_ON_SHARED_CONVERSION"),
        (gmem.BatchedArch, "make_shared", "FREE_ON_SHARED_CONVERSION"),
        (gmem.arch.TDX, "free_folio", "FREE"),  # TDX's own config has none of the hooks
        (gmem.arch.PKVM, "make_shared", "FREE_ON_SHARED_CONVERSION"),
    ],
)
def test_each_gated_hook(base: type, hook: str, entry: str) -> None:
    cls = type("Custom", (base,), {hook: lambda self, *a: None})
    with pytest.warns(gmem.UnusedHookWarning, match=f"overrides {hook}.*add '{entry}'"):
        gmem.GuestMemfd(8 * P, arch=cls()).close()


class InstanceConfig(gmem.Arch):
    config: frozenset[str] = frozenset()  # each instance chooses (the class hides the property)

    def __init__(self) -> None:
        super().__init__()
        self.config = frozenset({"FREE"})

    def free_folio(self, start_pfn: int, end_pfn: int) -> None:
        pass


class LeakySNP(gmem.arch.SNP):
    def free_folio(self, start_pfn: int, end_pfn: int) -> None:
        pass


class Invalidates(gmem.Arch):  # invalidate_* are notifications, never gated
    def invalidate_start(self, start: int, end: int, kinds: int) -> None:
        pass


@pytest.mark.parametrize(
    "make",
    [
        InstanceConfig,
        LeakySNP,
        Invalidates,
        lambda: gmem.arch.Recorder(set()),
        lambda: "pkvm",
        lambda: type("Configured", (gmem.Arch,), {"config": {"PREPARE"}, "prepare": print})(),
    ],
)
def test_no_warning_when_every_override_is_enabled(make) -> None:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gmem.GuestMemfd(8 * P, arch=make()).close()


def test_a_bad_config_is_still_the_engines_error() -> None:
    class Bad(NoConfig):
        config = {"PREPAIR"}

    with pytest.raises(ValueError, match="^config: unknown hook config 'PREPAIR'"):
        gmem.GuestMemfd(8 * P, arch=Bad())
