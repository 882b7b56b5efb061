"""The built-in architecture models, implemented in C++, and what a Python Arch needs.

``SwProtected`` (no hooks), ``SNP`` (RMP), ``TDX`` (contents zeroed on conversion),
``PKVM`` (ownership and scrubbing) and ``Recorder(config)``, which logs every hook call.
Subclass :class:`gmem.Arch` (per-range hooks) or :class:`BatchedArch` (``make_shared``
and ``free_folio`` get one (n, 2) uint64 array per folio batch) in Python to write your
own, or one of the built-in models to change one hook.

A hook runs only when the arch's ``config`` (read once, when the file is created)
enables it: PREPARE gates ``prepare``, FREE gates ``free_folio``,
FREE_ON_SHARED_CONVERSION gates ``make_shared``.  Creating a file with an arch that
overrides a hook its config does not enable warns (:class:`UnusedHookWarning`): the
hook would silently never run.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any

from gmem import _consts, _core
from gmem._core import PKVM, SNP, TDX, Arch, Recorder, SwProtected

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "HOOK_CONFIGS",
    "PKVM",
    "SNP",
    "TDX",
    "AnyArch",
    "BatchedArch",
    "Recorder",
    "SwProtected",
    "UnusedHookWarning",
    "unused_hooks",
]

# hook -> the config entry that enables it (CONVERT is PREPARE + FREE_ON_SHARED_CONVERSION,
# RECLAIM is FREE: either spelling enables the hook, under either of its names)
HOOK_CONFIGS = {
    "make_private": "PREPARE",
    "prepare": "PREPARE",
    "reclaim": "FREE",
    "free_folio": "FREE",
    "make_shared": "FREE_ON_SHARED_CONVERSION",
    "invalidate_range": "INVALIDATE",
    "post_populate": "POPULATE",
}


if TYPE_CHECKING:
    from gmem._core import AnyArch

    class BatchedArch(AnyArch):
        batched: bool

        def make_shared(self, ranges: npt.NDArray[np.uint64]) -> None: ...

        def reclaim(self, ranges: npt.NDArray[np.uint64]) -> None: ...

        def free_folio(self, ranges: npt.NDArray[np.uint64]) -> None: ...

else:
    AnyArch = Arch  # the type of any arch; at run time every arch is a gmem.Arch

    class BatchedArch(Arch):
        """A Python arch whose ``make_shared`` and ``free_folio`` get one (n, 2) uint64
        array of [start_pfn, end_pfn) rows per batch of up to 31 folios: an Arch with
        ``batched = True``, whose hook signatures type checkers know."""

        batched = True  # no hooks defined here: a hook defined on a class would run


class UnusedHookWarning(UserWarning):
    """An Arch overrides a hook that its config does not enable: it is never called."""


def _overrides(cls: type, hook: str) -> bool:
    """Whether a Python class in ``cls``'s MRO defines ``hook`` before a C++ class does."""
    for klass in cls.__mro__:
        if hook in vars(klass):
            return klass.__module__ != _core.__name__
    return False


def unused_hooks(arch: object) -> list[tuple[str, str]]:
    """(hook, config entry) for each hook ``arch``'s class overrides while its config
    lacks the entry that enables it.  Empty for names, built-in archs, and what the
    engine refuses anyway (a bad config, an arch already serving a file)."""
    if not isinstance(arch, Arch) or type(arch).__module__ == _core.__name__:
        return []
    try:
        config, serving = arch.config, arch.file
    except Exception:  # the engine reports it when the file is created
        return []
    if serving is not None:  # the engine refuses an arch that serves another file
        return []
    if not isinstance(config, (set, frozenset)) or not config <= _consts.HOOK_CONFIGS:
        return []
    config = set().union(*(_consts.CONFIG_ALIASES.get(name, {name}) for name in config))
    return [
        (hook, gate)
        for hook, gate in HOOK_CONFIGS.items()
        if gate not in config and _overrides(type(arch), hook)
    ]


def warn_unused_hooks(arch: object, stacklevel: int = 2) -> None:
    for hook, gate in unused_hooks(arch):
        warnings.warn(
            f"{type(arch).__name__} overrides {hook}, but its config does not enable it: "
            f"the hook will never be called; add {gate!r} to config",
            UnusedHookWarning,
            stacklevel=stacklevel + 1,
        )


_create_file = _core.GuestMemfd.__init__


@functools.wraps(_create_file)
def _init_file(self: _core.GuestMemfd, *args: Any, **kwargs: Any) -> None:
    # The check lives here, in Python, where the arch meets its file: a class may set
    # config on its instances, so only the file's creation knows what it is.
    warn_unused_hooks(kwargs.get("arch"), stacklevel=2)
    _create_file(self, *args, **kwargs)


setattr(_core.GuestMemfd, "__init__", _init_file)  # noqa: B010 (mypy: no method-assign)
