"""Bad input, everywhere: every public function and constructor of both implementations.

Each bad call must raise the documented exception (ValueError or TypeError, or SigBus for a
host access the kernel would refuse) with a message that starts with the argument's name,
and a snapshot of the whole state before and after must be equal, with no hook called.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gmem

from conftest import IMPLS
from model import snapshot

P = gmem.PAGE_SIZE
HOOKS = {"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION"}

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
@pytest.mark.parametrize(("method", "good", "names"), [*FILE_CALLS, ("unpin_pfn", (0,), ("pfn",))])
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


def test_numpy_integers_are_accepted_everywhere() -> None:
    with gmem.GuestMemfd(np.uint64(16 * P), folio_order=np.int8(2)) as f:
        f.fallocate(np.int64(0), np.uint32(8))
        f.set_attributes(np.uint64(0), np.int16(4), np.uint8(0))
        assert f.get_attributes(np.int64(1)) == 0
