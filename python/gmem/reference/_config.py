"""Hook configs, the reference: validation and the two vocabularies.  Its own module so
that arch.py and guest_memfd.py need not import each other."""

from __future__ import annotations

import itertools
from typing import Any

from gmem._consts import CONFIG_ALIASES, HOOK_CONFIGS


def config_names(config: Any) -> frozenset[str]:
    """A hook config as a frozenset of the thread's names (and INVALIDATE), validated:
    CONVERT stands for PREPARE + FREE_ON_SHARED_CONVERSION, RECLAIM for FREE."""
    if isinstance(config, str) or not hasattr(config, "__iter__"):
        raise TypeError(f"config: must be a set of hook names, got {type(config).__name__}")
    items = list(itertools.islice(iter(config), 65))
    if len(items) > 64:
        raise ValueError("config: more than 64 items; allowed: a set of hook names")
    names: set[str] = set()
    for name in items:
        if name not in HOOK_CONFIGS:
            raise ValueError(
                f"config: unknown hook config {name!r}; allowed: CONVERT, RECLAIM, INVALIDATE, "
                "POPULATE (or PREPARE, FREE, FREE_ON_SHARED_CONVERSION)"
            )
        names |= CONFIG_ALIASES.get(name, {name})
    return frozenset(names)


def config_for(names: frozenset[str], design: str) -> set[str]:
    """A normalised config in the vocabulary of ``design``."""
    out = set(names)
    if design == "mainline":
        for alias, parts in CONFIG_ALIASES.items():
            if parts <= out:
                out = (out - parts) | {alias}
    return out
