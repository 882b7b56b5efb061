"""Bad input, everywhere: every public function and constructor of both implementations.

Each bad call must raise the documented exception (ValueError or TypeError, or SigBus for a
host access the kernel would refuse) with a message that starts with the argument's name,
and a snapshot of the whole state before and after must be equal, with no hook called.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import gmem

from conftest import IMPLS
from model import snapshot

P = gmem.PAGE_SIZE
HOOKS = {"CONVERT", "RECLAIM", "INVALIDATE", "POPULATE"}

# Values that are not a u64: (value, exception).
NOT_U64 = [
    ("x", TypeError),
    (None, TypeError),
    (1.5, TypeError),
    (-1, ValueError),
    (2**64, ValueError),
    (-(2**70), ValueError),
]


def file_under_test(impl: Any) -> Any:
    """A file with some of everything: folios, both attributes, a mapping and a pin."""
    rec = impl.arch.Recorder(HOOKS)
    f = impl.GuestMemfd(64 * P, flags=gmem.FLAG_MMAP, folio_order=2, arch=rec)
    f.fallocate(0, 16)
    f.set_attributes(8, 32, gmem.SHARED)
    f.host_write(9, 99)
    f.pin(20)
    f.guest_write(2, 7)
    return f


def state(f: Any) -> Any:
    return snapshot(f), list(f.arch.calls)


# (method, good arguments, names of the integer arguments in order)
FILE_CALLS = [
    ("fallocate", (16, 24), ("start", "end")),
    ("punch_hole", (16, 24), ("start", "end")),
    ("add_folio", (48, 2, 40), ("index", "order", "pfn")),
    ("get_pfn", (3,), ("index",)),
    ("host_fault", (12,), ("index",)),
    ("guest_read", (3,), ("index",)),
    ("guest_write", (3, 5), ("index", "token")),
    ("host_read", (12,), ("index",)),
    ("host_write", (12, 5), ("index", "token")),
    ("pin", (12,), ("index",)),
    ("unpin", (20,), ("index",)),
    ("set_attributes", (0, 4, gmem.SHARED), ("start", "end", "attrs")),
    ("set_memory_attributes2", (0, 4 * P, 0, 0), ("offset", "size", "attributes", "flags")),
    ("get_attributes", (3,), ("index",)),
    ("attribute_runs", (0, 8), ("start", "end")),
    ("folios", (0, 8), ("start", "end")),
    ("pfn_ranges", (0, 8), ("start", "end")),
    ("page_pfns", (0, 8), ("start", "end")),
    ("populate", (3,), ("index",)),  # token: None populates in place
    ("memory_failure", (3,), ("index",)),
]

# The bulk forms: (method, good arrays, names of the arrays in order).  Bad arrays are
# refused before anything runs, so their errors carry no ``completed``.
BULK_CALLS = [
    ("get_pfns", ([3],), ("indexes",)),
    ("guest_read_many", ([3],), ("indexes",)),
    ("guest_write_many", ([3], [5]), ("indexes", "tokens")),
    ("host_read_many", ([12],), ("indexes",)),
    ("host_write_many", ([12], [5]), ("indexes", "tokens")),
    ("set_attributes_many", ([0], [4], [0]), ("starts", "ends", "attrs")),
]


def not_u64_cases() -> list[Any]:
    cases = []
    for method, good, names in FILE_CALLS:
        for i, name in enumerate(names):
            for value, exc in NOT_U64:
                if value is None and name == "end" and method in ("attribute_runs", "folios"):
                    continue  # end=None means "to the end of the file"
                args = list(good)
                args[i] = value
                cases.append(
                    pytest.param(method, tuple(args), exc, name, id=f"{method}-{name}={value!r}")
                )
    return cases


SEMANTIC = [
    ("fallocate", (8, 8), ValueError, "start"),  # empty
    ("fallocate", (9, 8), ValueError, "start"),
    ("fallocate", (60, 65), ValueError, "end"),  # past the end
    ("punch_hole", (8, 8), ValueError, "start"),
    ("punch_hole", (9, 8), ValueError, "start"),
    ("add_folio", (48, 19, 40), ValueError, "order"),
    ("add_folio", (50, 2, 40), ValueError, "index"),  # misaligned index
    ("add_folio", (48, 2, 41), ValueError, "pfn"),  # misaligned pfn
    ("add_folio", (4, 2, 40), ValueError, "index"),  # over a populated index
    ("add_folio", (60, 3, 40), ValueError, "index"),  # past the end
    ("add_folio", (48, 2, 4096), ValueError, "pfn"),  # a foreign PFN: not in this PhysMem
    ("add_folio", (48, 2, 0), ValueError, "pfn"),  # PFNs the file already uses
    ("get_pfn", (64,), ValueError, "index"),
    ("guest_write", (64, 1), ValueError, "index"),
    ("host_fault", (64,), gmem.SigBus, "host fault"),  # at EOF
    ("host_fault", (3,), gmem.SigBus, "host fault"),  # private
    ("host_write", (3, 1), gmem.SigBus, "host fault"),
    ("pin", (3,), gmem.SigBus, "host fault"),
    ("unpin", (12,), ValueError, "index"),  # not pinned
    ("unpin", (40,), ValueError, "index"),  # a hole
    ("unpin_pfn", (12345,), ValueError, "pfn"),
    ("set_attributes", (4, 4, 8), ValueError, "start"),
    ("set_attributes", (5, 4, 8), ValueError, "start"),
    ("set_attributes", (0, 65, 8), ValueError, "end"),
    ("set_attributes", (0, 4, 1), ValueError, "attrs"),  # unknown attribute bit
    ("set_attributes", (0, 4, 16), ValueError, "attrs"),
    ("set_memory_attributes2", (0, 4 * P, 8, 1), ValueError, "flags"),
    ("set_memory_attributes2", (0, 4 * P, 9), ValueError, "attributes"),
    ("set_memory_attributes2", (0, 0, 8), ValueError, "size"),
    ("set_memory_attributes2", (100, 4 * P, 8), ValueError, "offset"),
    ("set_memory_attributes2", (0, 4 * P + 1, 8), ValueError, "size"),
    ("set_memory_attributes2", (P, 2**64 - P, 8), ValueError, "size"),  # wraps
    ("set_memory_attributes2", (60 * P, 8 * P, 8), ValueError, "size"),  # past the end
    ("get_attributes", (64,), ValueError, "index"),
    ("attribute_runs", (9, 8), ValueError, "start"),
    ("folios", (9, 8), ValueError, "start"),
    ("pfn_ranges", (9, 8), ValueError, "start"),
    ("page_pfns", (9, 8), ValueError, "start"),
    ("set_attributes", (8, 24, 8), gmem.ConversionBusy, "set_attributes"),  # pinned page 20
]


@IMPLS
@pytest.mark.parametrize(("method", "args", "exc", "arg"), not_u64_cases() + SEMANTIC)
def test_bad_call_on_a_file_changes_nothing(impl, method, args, exc, arg) -> None:
    f = file_under_test(impl)
    before = state(f)
    with pytest.raises(exc) as info:
        getattr(f, method)(*args)
    assert str(info.value).startswith(arg), str(info.value)
    after = state(f)
    if exc is gmem.ConversionBusy:  # the one counter a failed call moves
        assert after[0]["stats"].pop("conversions_busy") == 1
        before[0]["stats"].pop("conversions_busy")
    assert after == before
    f.close()


@IMPLS
@pytest.mark.parametrize(
    ("method", "good", "names"), [*FILE_CALLS, *BULK_CALLS, ("unpin_pfn", (0,), ("pfn",))]
)
def test_every_call_on_a_closed_file_raises(impl, method, good, names) -> None:
    f = file_under_test(impl)
    f.close()
    before = state(f)
    with pytest.raises(ValueError, match="closed"):
        getattr(f, method)(*good)
    assert state(f) == before


CREATE_BAD = [
    ({"size_bytes": 0}, ValueError, "size"),
    ({"size_bytes": P + 1}, ValueError, "size"),
    ({"size_bytes": -P}, ValueError, "size_bytes"),
    ({"size_bytes": "4096"}, TypeError, "size_bytes"),
    ({"size_bytes": 2**64}, ValueError, "size_bytes"),
    ({"flags": 4}, ValueError, "flags"),
    ({"flags": -1}, ValueError, "flags"),
    ({"folio_order": 19}, ValueError, "folio_order"),
    ({"folio_order": "9"}, TypeError, "folio_order"),
    ({"hook_design": "v8"}, ValueError, "hook_design"),
    ({"hook_design": 1}, TypeError, "hook_design"),
    ({"arch": "arm"}, ValueError, "arch"),
    ({"arch": 7}, TypeError, "arch"),
    ({"physmem": "big"}, TypeError, "physmem"),
]


@IMPLS
@pytest.mark.parametrize(("kw", "exc", "arg"), CREATE_BAD)
def test_bad_create(impl, kw, exc, arg) -> None:
    args = {"size_bytes": 16 * P, **kw}
    size = args.pop("size_bytes")
    with pytest.raises(exc) as info:
        impl.GuestMemfd(size, **args)
    assert str(info.value).startswith(arg), str(info.value)


@IMPLS
def test_bad_arch_config_and_reuse(impl) -> None:
    with pytest.raises(ValueError, match="^config:"):
        impl.arch.Recorder({"FREE", "MAKE_SHARED"})
    with pytest.raises(TypeError, match="^config:"):
        impl.arch.Recorder("FREE")
    rec = impl.arch.Recorder(HOOKS)
    with impl.GuestMemfd(P, arch=rec), pytest.raises(ValueError, match="^arch:"):
        impl.GuestMemfd(P, arch=rec)


PHYSMEM_BAD = [
    ("alloc", (19,), ValueError, "order"),
    ("alloc", ("1",), TypeError, "order"),
    ("free", (3, 1), ValueError, "pfn"),
    ("free", (2**64, 0), ValueError, "pfn"),
    ("free", (0, -1), ValueError, "order"),
    ("free", (64, 0), ValueError, "pfn"),
    ("free", (8, 2), ValueError, "pfn"),  # already free (double free)
    ("take", (0, 3), ValueError, "pfn"),  # allocated, not free
    ("take", (0, 7), ValueError, "order"),  # past the end
    ("is_free", (1, 1), ValueError, "pfn"),
    ("fragment", (1.5,), ValueError, "fraction"),
    ("fragment", ("x",), TypeError, "fraction"),
    ("read", (64,), ValueError, "pfn"),
    ("read", (-1,), ValueError, "pfn"),
    ("write", (0, 2**64), ValueError, "token"),
    ("write", (70, 1), ValueError, "pfn"),
]


@IMPLS
@pytest.mark.parametrize(("method", "args", "exc", "arg"), PHYSMEM_BAD)
def test_bad_physmem_call_changes_nothing(impl, method, args, exc, arg) -> None:
    pm = impl.PhysMem(64, seed=2)
    pm.alloc(3)
    pm.write(9, 4)

    def snap() -> Any:
        return (
            pm.free_blocks().tolist(),
            pm.nr_free,
            pm.content_runs().tolist(),
            pm.rmp_runs().tolist(),
            pm.nr_kept,
        )

    before = snap()
    with pytest.raises(exc) as info:
        getattr(pm, method)(*args)
    assert str(info.value).startswith(arg), str(info.value)
    assert snap() == before


ARRAY_BAD = [
    (([0, 1], [0], [0, 1]), ValueError, "order"),  # lengths differ
    (([0.5], [0], [0]), TypeError, "index"),
    (([0], ["a"], [0]), TypeError, "order"),
    (([[0]], [[0]], [[0]]), ValueError, "index"),  # 2-D
    (([-1], [0], [0]), ValueError, "index"),
    (([0], [0], [2**64]), TypeError, "pfn"),  # does not fit: numpy makes it an object array
]


@IMPLS
@pytest.mark.parametrize(("arrays", "exc", "arg"), ARRAY_BAD)
def test_bad_arrays(impl, arrays, exc, arg) -> None:
    with pytest.raises(exc) as info:
        impl.clamp_folio_ranges(*arrays, 0, 4)
    assert str(info.value).startswith(arg), str(info.value)
    c = impl.FolioCache()
    c.add_folio(8, 0, 8)
    with pytest.raises(exc):
        c.add_folios(*arrays)
    assert c.folios().tolist() == [(8, 0, 8, 0, 0, False)]
    m = impl.IntervalMap(16)
    with pytest.raises((ValueError, TypeError)):
        m.store_many(*arrays)
    assert m.runs().tolist() == [[0, 16, 0]]


NOT_U64_ARRAYS = [
    ([-1], ValueError),
    ([1, -(2**70)], ValueError),
    ([2**64], ValueError),
    ([1.5], TypeError),
    ([1, 2.0], TypeError),  # numpy makes it float: element by element, like get_pfn(2.0)
    (["x"], TypeError),
    ([None], TypeError),
    (np.array([1.0]), TypeError),
    (np.array(["1"]), TypeError),
    ([[1]], ValueError),  # 2-D
    ([[1], 2], TypeError),  # ragged
    (5, ValueError),  # 0-D
    ("x", ValueError),
]


def bulk_bad_cases() -> list[Any]:
    cases = []
    for method, good, names in BULK_CALLS:
        for i, name in enumerate(names):
            for value, exc in NOT_U64_ARRAYS:
                args = list(good)
                args[i] = value
                cases.append(
                    pytest.param(method, tuple(args), exc, name, id=f"{method}-{name}={value!r}")
                )
    cases.append(pytest.param("guest_write_many", ([3, 4], [5]), ValueError, "tokens", id="len"))
    cases.append(pytest.param("host_write_many", ([], [5]), ValueError, "tokens", id="len0"))
    cases.append(
        pytest.param("set_attributes_many", ([0], [4, 8], [0]), ValueError, "ends", id="len3")
    )
    return cases


@IMPLS
@pytest.mark.parametrize(("method", "args", "exc", "arg"), bulk_bad_cases())
def test_bad_bulk_call_changes_nothing(impl, method, args, exc, arg) -> None:
    f = file_under_test(impl)
    before = state(f)
    with pytest.raises(exc) as info:
        getattr(f, method)(*args)
    assert str(info.value).startswith(arg + ":"), str(info.value)
    assert not hasattr(info.value, "completed")  # refused before any element ran
    assert state(f) == before
    f.close()


def test_numpy_integers_are_accepted_everywhere() -> None:
    with gmem.GuestMemfd(np.uint64(16 * P), folio_order=np.int8(2)) as f:
        f.fallocate(np.int64(0), np.uint32(8))
        f.set_attributes(np.uint64(0), np.int16(4), np.uint8(0))
        assert f.get_attributes(np.int64(1)) == 0


# ---- direct calls of the built-in archs' hooks ---------------------------------------
#
# Python may call an arch's hooks itself (``arch.prepare(...)``, or through super()); the
# built-in models check what such a call passes them.  The arch serves a file on a PhysMem
# that does not start at PFN 0, so that PFNs below and above it are both outside it.

BASE = 1024  # the PhysMem's first PFN
PM_PAGES = 128  # its size: the file's 64 pages and 64 free ones
MODELS = ["SNP", "PKVM", "Recorder"]

# (hook, good arguments, names of the arguments in order)
HOOK_CALLS = [
    ("prepare", (0, BASE + 64, 4), ("index", "pfn", "nr_pages")),  # free, shared pages
    ("make_shared", (BASE, BASE + 4), ("start_pfn", "end_pfn")),
    ("free_folio", (BASE, BASE + 4), ("start_pfn", "end_pfn")),
    ("invalidate_start", (0, 4, 3), ("start", "end", "kinds")),
    ("invalidate_end", (0, 4), ("start", "end")),
    # The same hooks under the merged kernel's names.
    ("make_private", (0, BASE + 64, 4), ("index", "pfn", "nr_pages")),
    ("reclaim", (BASE, BASE + 4), ("start_pfn", "end_pfn")),
    ("invalidate_range", (0, 4, 3), ("start", "end", "kinds")),
    ("post_populate", (0, BASE + 64), ("index", "pfn")),
]


def new_arch(impl: Any, model: str) -> Any:
    cls = getattr(impl.arch, model)
    return cls(HOOKS) if model == "Recorder" else cls()


def arch_file_under_test(impl: Any, model: str) -> Any:
    """A built-in arch serving a file with some of everything, as in ``file_under_test``."""
    arch = new_arch(impl, model)
    pm = impl.PhysMem(PM_PAGES, base_pfn=BASE)
    f = impl.GuestMemfd(64 * P, flags=gmem.FLAG_MMAP, folio_order=2, arch=arch, physmem=pm)
    f.fallocate(0, 16)
    f.set_attributes(8, 32, gmem.SHARED)
    f.host_write(9, 99)
    f.pin(20)
    f.guest_write(2, 7)
    return arch, f


def hook_not_u64_cases() -> list[Any]:
    cases = []
    for hook, good, names in HOOK_CALLS:
        for i, name in enumerate(names):
            for value, exc in NOT_U64:
                args = list(good)
                args[i] = value
                cases.append(
                    pytest.param(hook, tuple(args), exc, name, id=f"{hook}-{name}={value!r}")
                )
    return cases


# (hook, arguments, names the message may start with)
HOOK_SEMANTIC = [
    ("prepare", (0, BASE - 1, 4), "pfn"),  # below the PhysMem
    ("prepare", (0, 0, 4), "pfn"),
    ("prepare", (0, BASE + PM_PAGES, 1), "pfn"),  # just past it
    ("prepare", (0, 10**9, 1), "pfn"),
    ("prepare", (0, BASE + PM_PAGES - 2, 4), "nr_pages"),  # runs past it
    ("prepare", (0, 2**64 - 1, 2), "pfn|nr_pages"),  # pfn + nr_pages wraps
    ("prepare", (0, BASE, 0), "nr_pages"),  # empty
    ("prepare", (0, BASE, 65), "nr_pages"),  # more than the file
    pytest.param("prepare", (64, BASE, 1), "index"),  # at EOF
    pytest.param("prepare", (62, BASE, 4), "index|nr_pages"),
    pytest.param("prepare", (2**64 - 1, BASE, 2), "index|nr_pages"),
]
for _hook in ("make_shared", "free_folio"):
    HOOK_SEMANTIC += [
        (_hook, (BASE - 1, BASE + 1), "start_pfn"),  # starts below the PhysMem
        (_hook, (0, 4), "start_pfn"),
        (_hook, (BASE + PM_PAGES, BASE + PM_PAGES + 1), "start_pfn"),  # past it
        (_hook, (10**9, 10**9 + 5), "start_pfn"),
        (_hook, (BASE + 4, BASE + 4), "start_pfn|end_pfn"),  # empty
        (_hook, (BASE + 5, BASE + 4), "start_pfn|end_pfn"),  # reversed
        (_hook, (BASE + PM_PAGES - 8, BASE + PM_PAGES + 1), "end_pfn"),  # runs past it
        (_hook, (BASE, 2**64 - 1), "end_pfn"),
    ]
HOOK_SEMANTIC += [
    (new, args, names)
    for old, new in (("prepare", "make_private"), ("free_folio", "reclaim"))
    for hook, args, names in [c.values if hasattr(c, "values") else c for c in HOOK_SEMANTIC]
    if hook == old
]
HOOK_SEMANTIC += [
    ("invalidate_range", (5, 4, 3), "start|end"),
    ("invalidate_range", (60, 65, 3), "end"),
    ("invalidate_range", (0, 4, 0), "kinds"),
    ("invalidate_range", (0, 4, 4), "kinds"),
    ("invalidate_start", (4, 4, 3), "start|end"),  # empty
    ("invalidate_start", (5, 4, 3), "start|end"),
    ("invalidate_start", (60, 65, 3), "end"),  # past nr_pages
    ("invalidate_start", (64, 65, 1), "start|end"),
    ("invalidate_start", (0, 2**64 - 1, 2), "end"),
    ("invalidate_start", (0, 4, 0), "kinds"),  # neither shared nor private
    ("invalidate_start", (0, 4, 4), "kinds"),
    ("invalidate_start", (0, 4, 2**63), "kinds"),
    ("invalidate_end", (4, 4), "start|end"),
    ("invalidate_end", (5, 4), "start|end"),
    ("invalidate_end", (60, 65), "end"),
    ("invalidate_end", (64, 65), "start|end"),
    ("invalidate_end", (0, 2**64 - 1), "end"),
]


def hook_semantic_cases() -> list[Any]:
    cases = []
    for case in HOOK_SEMANTIC:
        values, marks = (case.values, case.marks) if hasattr(case, "values") else (case, ())
        hook, args, names = values
        cases.append(pytest.param(hook, args, ValueError, names, marks=marks, id=f"{hook}{args}"))
    return cases


HOOK_CASES = hook_not_u64_cases() + hook_semantic_cases()


@IMPLS
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("hook", "args", "exc", "arg"), HOOK_CASES)
def test_bad_direct_hook_call_changes_nothing(impl, model, hook, args, exc, arg) -> None:
    arch, f = arch_file_under_test(impl, model)
    with f:  # closed however the test ends
        before = snapshot(f)  # with the arch's stats, RMP/owner state and a Recorder's log
        with pytest.raises(exc) as info:
            getattr(arch, hook)(*args)
        assert re.match(f"^({arg}): ", str(info.value)), str(info.value)
        assert snapshot(f) == before
    assert f.physmem.nr_free == PM_PAGES


@IMPLS
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("how", ["closed", "never attached"])
@pytest.mark.parametrize(("hook", "good", "names"), HOOK_CALLS)
def test_direct_hook_call_without_an_open_file_names_self(impl, model, how, hook, good, names):
    arch, f = arch_file_under_test(impl, model)
    if how == "closed":
        f.close()
    else:
        arch = new_arch(impl, model)
    before = (snapshot(f), arch.stats)
    with pytest.raises(ValueError, match="^self: this Arch serves no open file"):
        getattr(arch, hook)(*good)
    assert (snapshot(f), arch.stats) == before
    f.close()


# ---- a Python arch whose hook attributes are not what they must be ---------------------
#
# What the engine reads from a Python arch when its file is created: the five hooks (each
# must be callable), batched (a bool) and config (a set of hook names).  A bad one is a
# TypeError naming it, and the arch and the PhysMem stay as they were.


def _raises(self: Any) -> Any:
    raise KeyError("nope")


HOOK_NAMES = [hook for hook, _, _ in HOOK_CALLS]
ATTR_SHAPES = {
    **{hook: [None, "todo", 3, property(_raises)] for hook in HOOK_NAMES},
    # an int is a bool to the engine (batched = 1): only what is no int is refused
    "batched": [None, "yes", 1.5, property(_raises)],
    "config": [None, "FREE", 3, property(_raises)],
}


def attr_cases() -> list[Any]:
    cases = []
    for attr, shapes in ATTR_SHAPES.items():
        for shape in shapes:
            label = "raising-property" if isinstance(shape, property) else repr(shape)
            for impl, impl_id in ((gmem, "engine"), (gmem.reference, "reference")):
                cases.append(pytest.param(impl, attr, shape, id=f"{impl_id}-{attr}={label}"))
    return cases


@pytest.mark.parametrize(("impl", "attr", "shape"), attr_cases())
def test_a_bad_hook_attribute_is_refused_at_creation(impl, attr, shape) -> None:
    cls = type("A", (impl.Arch,), {"config": HOOKS, attr: shape})
    arch = cls()
    pm = impl.PhysMem(64)
    try:
        f = impl.GuestMemfd(16 * P, flags=gmem.FLAG_MMAP, arch=arch, physmem=pm)
    except TypeError as exc:
        assert re.match(f"^{attr}: ", str(exc)), str(exc)
    else:
        delattr(cls, attr)  # the class's own hook back, so that the file can close
        f.close()
        pytest.fail(f"{attr} = {shape!r} accepted")
    assert arch.file is None
    assert (pm.nr_free, pm.nr_kept, pm.free_blocks().tolist()) == (64, 0, [[0, 6]])
    delattr(cls, attr)  # and the same arch then serves a file
    with impl.GuestMemfd(16 * P, arch=arch, physmem=pm) as f:
        f.fallocate(0, 16)
        f.set_attributes(0, 16, gmem.SHARED)
    assert f.check() == [] and pm.nr_free == 64


# ---- arguments whose __index__ does something to the file ---------------------------------
#
# Converting an argument runs Python (``__index__``), which may read the file, change it,
# close it, or drop the last reference to it.  Every file operation and every direct hook
# call, with such an argument in every position: the interpreter must not crash, and the
# call must behave as if the side effect had happened before it (arguments are converted
# before the call looks at anything): the same outcome and the same state after as that
# control, and then the file closes with every page back in its PhysMem.  The engine runs
# in a child process, where a crash fails one test and not the run.

INDEX_EFFECTS = ["read", "write", "close", "drop"]
CLEAN = (ValueError, TypeError, RuntimeError, gmem.GmemError)


def _side_effect(effect: str, box: list[Any]) -> None:
    if not box:
        return
    f = box[0]
    if effect == "read":
        f.stats, f.folios(), f.check(), f.attribute_runs()
        if not f.closed:
            f.get_attributes(0)
    elif effect == "write" and not f.closed:
        f.fallocate(40, 44)
    elif effect == "close":
        f.close()
    elif effect == "drop":  # the last reference, but for the call's own (a bound method)
        box.clear()
        del f  # no cycle holds a file: it goes now (and gc.collect() is slow in pytest)


class SideEffectIndex:
    """An integer whose conversion first does ``effect`` to the file in ``box``."""

    def __init__(self, value: int, effect: str, box: list[Any]) -> None:
        self.value, self.effect, self.box = value, effect, box

    def __index__(self) -> int:
        _side_effect(self.effect, self.box)
        return self.value


def _index_case(impl: Any, target: str, call: str, args: list[Any], effect: str, i: int | None):
    """Call with ``args[i]`` a SideEffectIndex, or (i None) after the side effect."""
    if target == "file":
        obj, f = None, file_under_test(impl)
    else:
        obj, f = arch_file_under_test(impl, target)
    pm = f.physmem
    box = [f]
    del f
    fn = getattr(box[0] if obj is None else obj, call)
    args = list(args)
    if i is None:
        _side_effect(effect, box)
    else:
        args[i] = SideEffectIndex(args[i], effect, box)
    try:
        fn(*args)
        outcome = "ok"
    except CLEAN as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    del fn, args
    after = snapshot(box[0]) if box else "dropped"
    if box:
        box.pop().close()
    assert pm.nr_free + pm.nr_kept == pm.nr_pages, (target, call, i, pm.nr_free, pm.nr_kept)
    return outcome, after


def index_side_effect_mismatches(impl: Any, effect: str) -> list[str]:
    """Every call with a SideEffectIndex in every position; the cases unlike their control."""
    targets = [("file", *c) for c in FILE_CALLS] + [(m, *c) for m in MODELS for c in HOOK_CALLS]
    bad, cases = [], 0
    for target, call, good, names in targets:
        for i, name in enumerate(names):
            case = f"{target}.{call}-{name}"
            print(f"{impl.__name__} {effect} {case}", file=sys.stderr, flush=True)
            got = _index_case(impl, target, call, list(good), effect, i)
            want = _index_case(impl, target, call, list(good), effect, None)
            cases += 1
            if got != want:
                bad.append(f"{case}: {got[0]!r}, as if before: {want[0]!r}")
    assert cases == 35 + 3 * 22  # file calls; 3 archs x the hooks' arguments
    return bad


@pytest.mark.parametrize("effect", INDEX_EFFECTS)
def test_an_argument_whose_index_touches_the_file_engine(effect: str) -> None:
    from test_attack import isolated

    proc = isolated(
        f"""
        import json, sys, warnings
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        warnings.simplefilter("ignore", ResourceWarning)
        import gmem, test_bad_input as t
        print(json.dumps(t.index_side_effect_mismatches(gmem, {effect!r})))
        """,
        timeout=60,
    )
    assert json.loads(proc.stdout.splitlines()[-1]) == []


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize(
    "effect",
    INDEX_EFFECTS,
)
def test_an_argument_whose_index_touches_the_file_reference(effect: str) -> None:
    assert index_side_effect_mismatches(gmem.reference, effect) == []


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("effect", INDEX_EFFECTS)
@pytest.mark.parametrize(("method", "good", "names"), BULK_CALLS)
def test_an_array_element_whose_index_touches_the_file(impl_name, method, good, names, effect):
    """A bulk call's arrays are converted before the call takes the file: an element whose
    __index__ reads, changes, closes or drops the file acts as if it ran just before."""
    impl = gmem if impl_name == "engine" else gmem.reference

    def run(side_effect_first: bool, i: int) -> Any:
        f = file_under_test(impl)
        pm = f.physmem
        box = [f]
        del f
        fn = getattr(box[0], method)
        args = [list(a) for a in good]
        if side_effect_first:
            _side_effect(effect, box)
        else:
            args[i][0] = SideEffectIndex(args[i][0], effect, box)
        try:
            fn(*args)
            outcome = "ok"
        except CLEAN as exc:
            outcome = f"{type(exc).__name__}: {exc} ({getattr(exc, 'completed', None)})"
        del fn, args
        after = snapshot(box[0]) if box else "dropped"
        if box:
            box.pop().close()
        assert pm.nr_free + pm.nr_kept == pm.nr_pages
        return outcome, after

    for i in range(len(names)):
        assert run(False, i) == run(True, i), names[i]


@pytest.fixture(params=["engine", "reference"])
def impl_name(request: Any) -> str:
    return str(request.param)


# ---- objects made with Cls.__new__(Cls) and never initialised ----------------------------
#
# Every public method and property, and the special methods a class defines, of an object
# that was never initialised: a TypeError saying so, never a crash or a hang.  One child
# process per class.

UNINITIALISED = [
    "GuestMemfd",
    "PhysMem",
    "IntervalMap",
    "FolioCache",
    "Arch",
    "arch.SNP",
    "arch.TDX",
    "arch.PKVM",
    "arch.Recorder",
    "arch.SwProtected",
    "Violation",
]

# Arguments for the methods that take some; every other method is called with none.
UNINIT_ARGS: dict[str, tuple[Any, ...]] = {
    **{method: good for method, good, _ in FILE_CALLS},
    **{hook: good for hook, good, _ in HOOK_CALLS},
    "unpin_pfn": (0,),
    "alloc": (0,),
    "free": (0, 0),
    "take": (0, 0),
    "is_free": (0, 0),
    "fragment": (0.5,),
    "read": (0,),
    "write": (0, 1),
    "load": (0,),
    "store": (0, 1, 1),
    "store_many": ([0], [1], [1]),
    "range_has": (0, 1, 0),
    "runs": (0, 1),
    "add_folios": ([0], [0], [0]),
    "lookup": (0,),
    "remove_folio": (0,),
    "split": (0, 0),
    "split_range": (0, 1),
    "pfn_batches": (0, 1),
    "ranges": ("free_folio",),
    "__eq__": (None,),
    "__exit__": (None, None, None),
    "populate": (0,),
    **{method: good for method, good, _ in BULK_CALLS},
    "memory_failure": (0,),
    "post_populate": (0, 0),
}
# (__enter__ has a test of its own, below)
UNINIT_SPECIAL = ["__repr__", "__str__", "__eq__", "__hash__", "__len__", "__exit__"]


def uninitialised_failures(name: str) -> list[str]:
    """Call everything on ``Cls.__new__(Cls)``; what did not raise the TypeError.

    Self-contained (run from its source in a child that imports only gmem)."""
    import inspect
    import sys

    import gmem

    cls: Any = gmem
    for part in name.split("."):
        cls = getattr(cls, part)
    own = {n for k in cls.__mro__ if k.__module__ == "gmem._core" for n in vars(k)}
    names = [n for n in dir(cls) if not n.startswith("_")]
    names += [n for n in UNINIT_SPECIAL if n in own]
    obj = cls.__new__(cls)
    failures = []
    for attr in names:
        static = inspect.getattr_static(cls, attr)
        print(f"{name}.{attr}", file=sys.stderr, flush=True)
        if not callable(static) and not isinstance(static, property):
            getattr(obj, attr)  # a plain class attribute (batched): nothing to initialise
            continue
        try:
            value = getattr(obj, attr)
            if callable(static):
                value(*UNINIT_ARGS.get(attr, ()))
        except TypeError as exc:
            if "never initialised" not in str(exc):
                failures.append(f"{attr}: {exc}")
        except Exception as exc:
            failures.append(f"{attr}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{attr}: accepted")
    assert len(names) >= 5, names
    return failures


@pytest.mark.parametrize("name", UNINITIALISED)
def test_every_call_on_an_uninitialised_object_is_refused(name: str) -> None:
    from test_attack import isolated

    source = textwrap.dedent(inspect.getsource(uninitialised_failures))
    code = f"from typing import Any\nUNINIT_ARGS = {UNINIT_ARGS!r}\nUNINIT_SPECIAL = "
    code += f"{UNINIT_SPECIAL!r}\n{source}\nimport json\n"
    code += f"print(json.dumps(uninitialised_failures({name!r})))\n"
    proc = isolated(code, timeout=30)
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_with_on_an_uninitialised_file_is_refused_before_its_body() -> None:
    f = gmem.GuestMemfd.__new__(gmem.GuestMemfd)
    try:
        f.__enter__()  # returns the object, touching nothing: safe in this process
    except TypeError as exc:
        assert "never initialised" in str(exc)
    else:
        pytest.fail("__enter__ accepted an uninitialised file")
