"""The built-in architecture models, implemented in C++.

``SwProtected`` (no hooks), ``SNP`` (RMP), ``TDX`` (contents zeroed on conversion),
``PKVM`` (ownership and scrubbing) and ``Recorder(config)``, which logs every hook call.
Subclass :class:`gmem.Arch` (or one of these) in Python to write your own.
"""

from __future__ import annotations

from gmem._core import PKVM, SNP, TDX, Recorder, SwProtected

__all__ = ["PKVM", "SNP", "TDX", "Recorder", "SwProtected"]
