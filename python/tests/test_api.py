"""The Pythonic API: engines, buffers seen by memoryview and numpy without a copy,
context-managed batches, exceptions with causes, and the GIL let go while waiting."""

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import ferry
from conftest import Peer


def pair(size=1 << 20):
    target = ferry.Engine()
    initiator = ferry.Engine(protocol="tcp", listen="127.0.0.1:0", timeout_ms=10_000)
    kv = target.allocate(size, name="kv")
    local = initiator.allocate(size)
    return target, initiator, kv, local


def test_write_then_read_random_data_byte_for_byte():
    target, initiator, kv, local = pair()
    data = os.urandom(len(local))
    local.write(0, data)
    segment = initiator.open_segment(target.name)
    assert segment.protocol == "tcp" and not segment.is_local and len(segment) == 1
    remote = segment.buffer_named("kv")
    assert remote.addr == kv.addr and len(remote) == len(kv) and remote.location == "cpu"
    with initiator.batch(timeout=10) as b:
        b.write(local, 0, remote, 0, len(data) // 2)
        b.write(local, len(data) // 2, remote, len(data) // 2, len(data) // 2)
    assert b.batch.statuses() == [ferry.TaskStatus.Completed] * 2
    assert kv.read(0, len(data)) == data
    back = initiator.allocate(len(data))
    b = initiator.batch()
    b.read(back, 0, remote, 0, len(data))
    batch = b.submit()
    batch.wait()
    assert batch.poll() == {"total": 1, "completed": 1, "failed": 0, "timed_out": 0, "pending": 0}
    assert initiator.batch_progress(batch.id)["completed"] == 1
    assert back.read(0, len(data)) == data
    located, offset = segment.locate(kv.addr + 4096, 10)
    assert located.addr == kv.addr and offset == 4096
    assert segment.locate(kv.addr + len(kv), 1) is None
    # Tasks count for the peer once their batches are gone.
    del b, batch
    stats = {"completed": 3, "failed": 0, "timed_out": 0, "bytes_written": len(data), "bytes_read": len(data),
             "retried_over_tcp": 0, "reopened": 0}
    assert segment.stats() == stats
    assert initiator.peer_stats() == {target.name: stats}


def test_buffers_are_seen_without_a_copy():
    engine = ferry.Engine()
    buf = engine.allocate(8192)
    view = buf.view()
    assert len(view) == 8192 and not view.readonly
    view[10:15] = b"hello"
    assert buf.read(10, 5) == b"hello", "the view is the buffer's memory"
    array = np.asarray(buf)
    assert array.shape == (8192,) and array.dtype == np.uint8
    array[100:103] = [1, 2, 3]
    assert buf.read(100, 3) == bytes([1, 2, 3]), "numpy shares the buffer's memory"
    buf.write(200, b"xyz")
    assert bytes(view[200:203]) == b"xyz" and array[200:203].tobytes() == b"xyz"
    # The view keeps the buffer registered after the last name for it is gone.
    addr = buf.addr
    del buf, array
    view[0:1] = b"!"
    assert view[0:1] == b"!"
    assert addr != 0


def test_caller_memory_is_registered_and_served():
    target = ferry.Engine()
    initiator = ferry.Engine()
    ours = bytearray(os.urandom(4096))
    theirs = np.zeros(4096, dtype=np.uint8)
    src = initiator.register(ours)
    dst = target.register(theirs)
    assert src.location == "cpu" and len(dst) == 4096
    with pytest.raises(ferry.InvalidInput, match="read-only"):
        target.register(b"immutable")
    with pytest.raises(ferry.InvalidInput):
        target.register(12345)  # an address needs its length
    segment = initiator.open_segment(target.name)
    remote = segment.locate(dst.addr, 4096)[0]
    with initiator.batch() as b:
        b.write(src, 0, remote, 0, 4096)
    assert theirs.tobytes() == bytes(ours), "the peer wrote into the numpy array itself"
    with pytest.raises(BufferError):
        ours.extend(b"more")  # registered memory cannot move


def test_errors_are_exceptions_by_kind_with_their_causes():
    engine = ferry.Engine()
    with pytest.raises(ferry.Unreachable) as caught:
        engine.open_segment("127.0.0.1:1")
    assert isinstance(caught.value, ConnectionError) and isinstance(caught.value, ferry.Error)
    assert caught.value.__cause__ is not None, "the cause is chained"
    with pytest.raises(ferry.InvalidInput) as caught:
        ferry.Engine(protcol="tcp")
    assert "protcol" in str(caught.value)
    with pytest.raises(ferry.Unsupported, match="rdma"):
        ferry.Engine(protocol="rdma")
    with pytest.raises(ValueError):
        engine.allocate(10, location="nowhere")
    local = engine.allocate(10)
    with pytest.raises(ferry.InvalidInput):
        local.write(8, b"too long")


def test_a_failing_batch_raises_on_leaving_the_block_and_keeps_its_statuses():
    target, initiator, kv, local = pair(8192)
    remote = initiator.open_segment(target.name).buffer(0)
    with pytest.raises(ferry.InvalidInput):
        with initiator.batch() as b:
            b.write(local, 0, remote, 8000, 1000)  # past the remote buffer
    del kv  # the peer deregisters the buffer: the request is refused by the peer
    with pytest.raises(ferry.Rejected) as caught:
        with initiator.batch(timeout=10) as b:
            b.write(local, 0, remote, 0, 4096)
    assert isinstance(caught.value, RuntimeError)
    assert b.batch.statuses() == [ferry.TaskStatus.Failed]
    assert "not registered" in b.batch.reason(0)
    with pytest.raises(ferry.InvalidInput):
        initiator.batch_progress(b.batch.id + (1 << 32))
    # The peer counted the refusal; this engine counts the failed task for the peer.
    assert target.tcp_stats()["rejected_requests"] == 1
    assert initiator.tcp_stats()["rejected_requests"] == 0
    assert initiator.batch_stats()["late_wakeups"] == 0
    del b
    assert initiator.peer_stats()[target.name]["failed"] == 1


def test_the_gil_is_released_while_waiting():
    # The main thread waits for a notification that only another Python thread sends:
    # were the GIL held while waiting, the sender could never run.
    receiver = ferry.Engine()
    sender = ferry.Engine()
    segment = sender.open_segment(receiver.name)
    t = threading.Thread(target=sender.notify, args=(segment, b"from another thread"))
    t.start()
    got = receiver.recv_notification(timeout=60)
    t.join()
    assert got == (sender.name, b"from another thread")
    assert receiver.recv_notification() is None


def test_a_batch_wait_lets_other_threads_run():
    # A peer process stopped with SIGSTOP holds a READ; a Python thread resumes it while
    # the main thread is inside wait(). Without the GIL released it could not, and the
    # task would time out instead of completing.
    peer = Peer(1 << 16)
    try:
        engine = ferry.Engine()
        local = engine.allocate(1 << 16)
        segment = engine.open_segment(peer.name)
        remote, offset = segment.locate(peer.buffers[0][0], 1 << 16)
        os.kill(peer.proc.pid, signal.SIGSTOP)
        started = threading.Event()

        def resume():
            started.wait()
            os.kill(peer.proc.pid, signal.SIGCONT)

        t = threading.Thread(target=resume)
        t.start()
        b = engine.batch(timeout=60)
        b.read(local, 0, remote, offset, 1 << 16)
        batch = b.submit()
        started.set()
        batch.wait()
        t.join()
        assert batch.statuses() == [ferry.TaskStatus.Completed]
        assert local.read(0, 1 << 16) == peer.read(peer.buffers[0][0], 1 << 16)
    finally:
        os.kill(peer.proc.pid, signal.SIGCONT)
        peer.close()


def test_the_engine_is_a_context_manager_and_shuts_down():
    with ferry.Engine() as engine:
        buf = engine.allocate(4096)
    with pytest.raises(ferry.Unreachable):
        engine.allocate(4096)
    assert len(buf) == 4096


def test_config_dicts_and_json_configure_the_engine():
    engine = ferry.Engine(config={"tcp": {"lanes": 2}, "timeout_ms": 1234})
    assert engine.protocols == ["tcp"]
    engine = ferry.Engine(config='{"protocol": "tcp"}', notify_queue_bytes=1 << 20)
    assert engine.name.startswith("127.0.0.1:")
    assert "tcp" in ferry.COMPILED_PROTOCOLS
    # The TCP transport's own settings nest under `tcp`, congestion control among them:
    # one the kernel offers starts, one it does not fails naming those it allows.
    ferry.Engine(tcp={"congestion_control": "reno"}).shutdown()
    with pytest.raises(ferry.InvalidInput, match="reno"):
        ferry.Engine(tcp={"congestion_control": "no-such-cc"})


def test_type_stubs_and_docstrings_cover_the_native_api():
    import ast

    import ferry._ferry as native

    path = os.path.join(os.path.dirname(ferry.__file__), "_ferry.pyi")
    with open(path) as f:
        tree = ast.parse(f.read())
    stubbed = {}
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef):
            names = set()
            for node in cls.body:
                if isinstance(node, ast.FunctionDef):
                    names.add(node.name)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
            stubbed[cls.name] = names
    classes = [n for n in dir(native) if isinstance(getattr(native, n), type)]
    assert set(classes) <= set(stubbed), f"classes without stubs: {set(classes) - set(stubbed)}"
    for name in classes:
        cls = getattr(native, name)
        public = {m for m in dir(cls) if not m.startswith("_")}
        assert public <= stubbed[name], f"{name}: not in the stubs: {public - stubbed[name]}"
        for member in public:
            if callable(getattr(cls, member)) and not isinstance(getattr(cls, member), cls):
                assert getattr(cls, member).__doc__ or name in ("TransferOpcode", "TaskStatus"), f"{name}.{member} has no docstring"


class HostTensor:
    """The part of a tensor's interface `register` reads (data_ptr, numel,
    element_size, is_contiguous, device), over a numpy array, as a CPU tensor offers it."""

    class device:
        type = "cpu"
        index = None

    def __init__(self, array):
        self.array = array

    def data_ptr(self):
        return self.array.ctypes.data

    def numel(self):
        return self.array.size

    def element_size(self):
        return self.array.itemsize

    def is_contiguous(self):
        return self.array.flags.c_contiguous


def test_tensors_register_by_their_data_pointer_and_stay_alive():
    target = ferry.Engine()
    initiator = ferry.Engine()
    tensor = HostTensor(np.arange(1024, dtype=np.float32))
    buf = target.register(tensor)
    assert buf.addr == tensor.data_ptr() and len(buf) == 4096
    del tensor  # the buffer keeps the tensor (and its memory) alive
    local = initiator.allocate(4096)
    remote = initiator.open_segment(target.name).locate(buf.addr, 4096)[0]
    with initiator.batch() as b:
        b.read(local, 0, remote, 0, 4096)
    assert np.frombuffer(local.read(0, 4096), dtype=np.float32).tolist() == list(range(1024))
