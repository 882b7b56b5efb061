"""Shared test helpers: engine/reference pairs and result normalisation for diffing."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import gmem
import gmem.reference as ref

settings.register_profile(
    "default", deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", deadline=None, max_examples=600, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", deadline=None, max_examples=3000, suppress_health_check=[HealthCheck.too_slow]
)
# Under ASan+UBSan each example costs several times more; the sanitizers look for memory
# errors on every path the tests take, and the example counts above run on the plain build.
settings.register_profile(
    "sanitizer", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("GMEM_HYPOTHESIS_PROFILE", "default"))

IMPLS = pytest.mark.parametrize("impl", [gmem, ref], ids=["engine", "reference"])


def norm(value: Any) -> Any:
    """A result in a form that compares by value across the two implementations."""
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tolist())
    if isinstance(value, (list, tuple)):
        return type(value)(norm(v) for v in value)
    return value


def outcome(fn: Callable[..., Any], *args: Any) -> Any:
    """("ok", result) or ("raises", exception type): what both sides must agree on."""
    try:
        return ("ok", norm(fn(*args)))
    except (ValueError, TypeError, gmem.GmemError) as exc:
        return ("raises", type(exc))


def both(engine: Any, oracle: Any, method: str, *args: Any) -> Any:
    """Call ``method`` on both objects and assert the same outcome."""
    got = outcome(getattr(engine, method), *args)
    want = outcome(getattr(oracle, method), *args)
    assert got == want, f"{method}{args}: engine {got} != reference {want}\n{engine.dump()}"
    return got
