from ._ferry import TransferEngine as TransferEngine
from ._ferry import TransferNotify as TransferNotify
from ._ferry import TransferOpcode as TransferOpcode

Read: TransferOpcode
Write: TransferOpcode
SUPPORT_CUDA: bool
SUPPORT_EFA: bool
SUPPORT_HIP: bool
SUPPORT_MNNVL: bool
SUPPORT_INTRA_NVLINK: bool
SUPPORT_MUSA: bool

def install() -> object: ...
