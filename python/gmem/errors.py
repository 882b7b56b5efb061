"""The exceptions gmem raises, shared by the C++ engine and the pure-Python reference.

Invalid arguments raise the built-in ``ValueError`` (the kernel's EINVAL) or ``TypeError``,
with a message that starts with the argument's name.  Domain failures raise a subclass of
:class:`GmemError` that carries the kernel's ``errno``.  An arch hook that tries to change
the file it was called from gets ``RuntimeError``.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["ConversionBusy", "GmemError", "HWPoison", "OutOfMemory", "SigBus"]

_PAGE_SIZE = 4096


class GmemError(Exception):
    """Base of gmem's domain errors; ``errno`` is the kernel's error number."""

    errno: int = 0
    # Set on what a bulk call (get_pfns, guest_read_many, ...) raises: the number of
    # elements done before the failing one.  (Its ValueError and TypeError carry it too.)
    completed: int


class OutOfMemory(GmemError, MemoryError):
    """Physical memory could not supply a block (ENOMEM); nothing was half-allocated."""

    errno = _errno.ENOMEM


class ConversionBusy(GmemError):
    """A to-private conversion met a pinned folio, or one mapped outside the range (EAGAIN).

    ``error_index`` is the first page that could not be converted (``max(start,
    folio.index)``), ``error_offset`` the same in bytes, as the uapi reports it.
    """

    errno = _errno.EAGAIN

    def __init__(self, message: str, error_index: int) -> None:
        super().__init__(message)
        self.error_index = error_index
        self.error_offset = error_index * _PAGE_SIZE


class SigBus(GmemError):
    """The host may not access this page: the mmap fault would raise SIGBUS."""

    errno = _errno.EFAULT

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class HWPoison(GmemError):
    """The page's folio had a memory failure: every access fails until it is punched out
    (kvm_gmem_get_pfn's -EHWPOISON)."""

    errno = 133  # EHWPOISON

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index
