"""The exceptions gmem raises, shared by the C++ engine and the pure-Python reference.

Invalid arguments raise the built-in ``ValueError`` (the kernel's EINVAL) or ``TypeError``,
with a message that starts with the argument's name.  Domain failures raise a subclass of
:class:`GmemError` that carries the kernel's ``errno``.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["GmemError", "OutOfMemory"]


class GmemError(Exception):
    """Base of gmem's domain errors; ``errno`` is the kernel's error number."""

    errno: int = 0


class OutOfMemory(GmemError, MemoryError):
    """Physical memory could not supply a block (ENOMEM); nothing was half-allocated."""

    errno = _errno.ENOMEM
