"""Mooncake's Python ``TransferEngine`` on ferry.

``from ferry.mooncake import TransferEngine`` gives a class with every method of
Mooncake's (``mooncake.engine.TransferEngine``): the same names, argument shapes,
0/-1 returns, batch ids and notifications. Where Mooncake trusts its caller, this one
checks: peer addresses are mapped to the peer's published buffers and anything outside
them is refused (-1, logged), local addresses must be registered memory, and a stale
or forged batch id is -1.

To run a connector written for Mooncake unmodified, call :func:`install` before it
imports ``mooncake.engine``.
"""

import sys
import types

from ._ferry import (
    COMPILED_PROTOCOLS,
    CUDA_COMPILED,
    TransferEngine,
    TransferNotify,
    TransferOpcode,
)

#: Module-level aliases, as Mooncake exports them.
Read = TransferOpcode.Read
Write = TransferOpcode.Write

#: Build capabilities, named as Mooncake's module names them.
SUPPORT_CUDA = CUDA_COMPILED
SUPPORT_EFA = "efa" in COMPILED_PROTOCOLS
SUPPORT_HIP = False
SUPPORT_MNNVL = False
SUPPORT_INTRA_NVLINK = False
SUPPORT_MUSA = False


def install():
    """Makes ``import mooncake.engine`` (and ``from mooncake.engine import
    TransferEngine``) resolve to this module, unless a ``mooncake`` package is already
    imported. Returns the module ``mooncake.engine`` now names."""
    existing = sys.modules.get("mooncake.engine")
    if existing is not None:
        return existing
    package = sys.modules.get("mooncake")
    if package is None:
        package = types.ModuleType("mooncake")
        package.__path__ = []
        sys.modules["mooncake"] = package
    this = sys.modules[__name__]
    package.engine = this
    sys.modules["mooncake.engine"] = this
    return this


__all__ = [
    "Read",
    "TransferEngine",
    "TransferNotify",
    "TransferOpcode",
    "Write",
    "install",
]
