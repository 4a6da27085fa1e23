"""ferry: a transfer engine for disaggregated LLM serving.

Moves bytes between registered memory on different hosts with one-sided READ and
WRITE, over TCP (and EFA in builds with it), from host or GPU memory::

    import ferry

    target = ferry.Engine()
    kv = target.allocate(1 << 20)

    engine = ferry.Engine()
    local = engine.allocate(1 << 20)
    local.write(0, b"block 0")
    segment = engine.open_segment(target.name)
    with engine.batch(timeout=5) as b:
        b.write(local, 0, segment.buffer(0), 0, 7)

Every call that waits or moves data releases the GIL; every object may be shared
between threads. Mooncake's ``TransferEngine`` is in :mod:`ferry.mooncake`.
"""

from . import errors
from ._ferry import (
    COMPILED_PROTOCOLS,
    CUDA_COMPILED,
    Batch,
    BatchBuilder,
    Buffer,
    Engine,
    RemoteBuffer,
    Segment,
    TaskStatus,
    __version__,
)
from .errors import (
    Error,
    InvalidInput,
    IoError,
    Rejected,
    TimedOut,
    Unreachable,
    Unsupported,
)

__all__ = [
    "COMPILED_PROTOCOLS",
    "CUDA_COMPILED",
    "Batch",
    "BatchBuilder",
    "Buffer",
    "Engine",
    "Error",
    "InvalidInput",
    "IoError",
    "Rejected",
    "RemoteBuffer",
    "Segment",
    "TaskStatus",
    "TimedOut",
    "Unreachable",
    "Unsupported",
    "__version__",
    "errors",
]
