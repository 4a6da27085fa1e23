"""GPU memory through both Python APIs, held the way serving stacks hold it: PyTorch
tensors on a CUDA device, their addresses handed over as integers (Mooncake's API) or the
tensors themselves (ferry's).

Needs PyTorch with a CUDA device and a wheel built with `cuda`; `cargo xtask gpu-bundle`
carries such a wheel to a GPU host, whose run installs it next to PyTorch and runs this
suite. Skipped elsewhere."""

import os

import pytest

# Where a GPU run expects these tests to run (the bundle's run.sh sets it), a missing
# PyTorch, device or `cuda` build is a failure, not a skip.
REQUIRED = os.environ.get("FERRY_REQUIRE_CUDA") == "1"

torch = __import__("torch") if REQUIRED else pytest.importorskip("torch")
import ferry  # noqa: E402

AVAILABLE = ferry.CUDA_COMPILED and torch.cuda.is_available()
if REQUIRED:
    assert AVAILABLE, "FERRY_REQUIRE_CUDA=1: needs a wheel built with `cuda` and a CUDA device"

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="needs a wheel built with `cuda` and a CUDA device")

N = 8 << 20
BLOCK = 64 << 10


def random_tensor(seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (N,), dtype=torch.uint8, generator=g).to(device)


def zeros(device):
    return torch.zeros(N, dtype=torch.uint8, device=device)


def same(a, b):
    return torch.equal(a.cpu(), b.cpu())


def compat_engine():
    from ferry.mooncake import TransferEngine

    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    return e


@pytest.mark.parametrize("here,there", [("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu")])
def test_mooncake_api_moves_tensors_between_gpu_and_host(here, there):
    initiator, target = compat_engine(), compat_engine()
    src, back, dst = random_tensor(1, here), zeros(here), zeros(there)
    # No location given: the engine asks the driver what each address is.
    for engine, t in [(initiator, src), (initiator, back), (target, dst)]:
        assert engine.register_memory(t.data_ptr(), N) == 0
    torch.cuda.synchronize()
    name = target.get_local_segment_name()

    assert initiator.transfer_sync_write(name, src.data_ptr(), dst.data_ptr(), N) == 0
    assert same(dst, src)
    assert initiator.transfer_sync_read(name, back.data_ptr(), dst.data_ptr(), N) == 0
    assert same(back, src)

    # A batch of 64 KiB blocks, as a KV cache's pages: every other block, last first.
    blocks = list(range(0, N, 2 * BLOCK))[::-1]
    fresh = random_tensor(2, here)
    assert initiator.register_memory(fresh.data_ptr(), N) == 0
    torch.cuda.synchronize()
    assert (
        initiator.batch_transfer_sync_write(
            name,
            [fresh.data_ptr() + o for o in blocks],
            [dst.data_ptr() + o for o in blocks],
            [BLOCK] * len(blocks),
        )
        == 0
    )
    expected = src.cpu().clone()
    for o in blocks:
        expected[o : o + BLOCK] = fresh.cpu()[o : o + BLOCK]
    assert torch.equal(dst.cpu(), expected)


def test_mooncake_api_refuses_a_gpu_address_called_host_memory():
    engine = compat_engine()
    t = zeros("cuda")
    # Taken as host memory, the socket path would read the device address as a host
    # one: the driver says what it is, and the registration is refused.
    assert engine.register_memory(t.data_ptr(), N, "cpu") == -1
    assert engine.register_memory(t.data_ptr(), N, "cuda:0") == 0


def test_ferry_api_registers_tensors_where_they_are():
    target, initiator = ferry.Engine(), ferry.Engine()
    dst = zeros("cuda")
    published = target.register(dst)
    assert published.location == "cuda:0"
    src = random_tensor(3, "cuda")
    local = initiator.register(src)
    assert local.location == "cuda:0"
    torch.cuda.synchronize()
    segment = initiator.open_segment(target.name)
    remote, offset = segment.locate(dst.data_ptr(), N)
    with initiator.batch(timeout=30) as b:
        b.write(local, 0, remote, offset, N)
    assert b.batch.statuses() == [ferry.TaskStatus.Completed]
    assert same(dst, src)
    # A tensor's own device decides: claiming another location is refused.
    with pytest.raises(ferry.InvalidInput):
        initiator.register(random_tensor(4, "cuda"), location="cpu")
