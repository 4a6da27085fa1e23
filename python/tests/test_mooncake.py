"""The Mooncake-compatible TransferEngine, driven the way real clients drive it, against
peers in their own processes on loopback, with random data checked byte for byte."""

import contextlib
import os
import random
import subprocess
import threading

import pytest

from conftest import LocalMemory, Peer, random_bytes
from ferry.mooncake import TransferEngine, TransferNotify, TransferOpcode


def test_vllm_sequence_ten_threads_write_to_one_peer(peer):
    # vLLM: initialize(ip, "P2PHANDSHAKE", "rdma", ""), get_rpc_port,
    # batch_register_memory, then batch_transfer_sync_write from many threads at once.
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "") == 0
    assert e.get_protocol() == "tcp", "rdma is not in this build: TCP, as Mooncake falls back"
    assert e.get_rpc_port() > 0
    threads, block, blocks = 10, 4096, 16
    mems = [LocalMemory.__new__(LocalMemory) for _ in range(threads)]
    import ctypes

    for m in mems:
        m.mem = (ctypes.c_char * (block * blocks)).from_buffer_copy(random_bytes(block * blocks))
        m.addr = ctypes.addressof(m.mem)
        m.len = block * blocks
    assert e.batch_register_memory([m.addr for m in mems], [m.len for m in mems]) == 0
    remote, remote_len = peer.buffers[0]
    assert remote_len >= threads * blocks * block
    results = [None] * threads

    def send(i):
        m = mems[i]
        srcs = [m.addr + j * block for j in range(blocks)]
        dsts = [remote + (i * blocks + j) * block for j in range(blocks)]
        results[i] = e.batch_transfer_sync_write(peer.name, srcs, dsts, [block] * blocks)

    ts = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == [0] * threads
    for i, m in enumerate(mems):
        assert peer.read(remote + i * blocks * block, m.len) == m.bytes()
    assert e.batch_unregister_memory([m.addr for m in mems]) == 0


def test_sglang_sequence_register_probe_and_write(engine, peer):
    local = LocalMemory(engine, 1 << 16)
    assert engine.unregister_memory(local.addr) == 0
    assert engine.unregister_memory(local.addr) != 0, "nothing is registered there any more"
    assert engine.register_memory(local.addr, local.len) == 0
    remote, _ = peer.buffers[0]
    assert engine.transfer_sync_write(peer.name, local.addr, remote + 4096, 30000) == 0
    assert peer.read(remote + 4096, 30000) == local.bytes(0, 30000)
    # A live peer answers the probe; an unknown one does not.
    assert engine.send_probe(peer.name) == 0
    assert engine.send_probe("127.0.0.1:1") != 0
    assert engine.get_engine().name == f"127.0.0.1:{engine.get_rpc_port()}"
    more = [LocalMemory(engine, 8192) for _ in range(3)]
    assert engine.batch_unregister_memory([m.addr for m in more]) == 0


def test_rl_sequence_async_writes_to_several_peers_then_status_and_reads(engine, peers):
    local = LocalMemory(engine, 3 * 65536)
    ids = []
    for i, p in enumerate(peers):
        remote, _ = p.buffers[0]
        assert engine.get_first_buffer_address(p.name) == remote
        srcs = [local.addr + i * 65536 + j * 8192 for j in range(8)]
        dsts = [remote + j * 8192 for j in range(8)]
        batch_id = engine.batch_transfer_async_write(p.name, srcs, dsts, [8192] * 8)
        assert batch_id != 0
        ids.append(batch_id)
    assert engine.get_batch_transfer_status(ids) == 0
    for i, p in enumerate(peers):
        remote, _ = p.buffers[0]
        assert p.read(remote, 65536) == local.bytes(i * 65536, 65536)
    # The ids are spent: asking again is -1, never a crash.
    assert engine.get_batch_transfer_status(ids) == -1
    # transfer_sync_read brings a peer's bytes back.
    back = LocalMemory(engine, 65536)
    remote, _ = peers[1].buffers[0]
    assert engine.transfer_sync_read(peers[1].name, back.addr, remote, 65536) == 0
    assert back.bytes() == local.bytes(65536, 65536)


def test_a_thousand_small_round_trips_through_bytes_helpers(engine, peer):
    local = engine.allocate_managed_buffer(4096)
    assert local != 0
    remote, _ = peer.buffers[1]
    rng = random.Random(7)
    for i in range(1000):
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(1, 200)))
        data = text.encode()
        assert engine.write_bytes_to_buffer(local, data, len(data)) == 0
        at = remote + (i % 16) * 256
        assert engine.transfer_sync_write(peer.name, local, at, len(data)) == 0
        assert engine.write_bytes_to_buffer(local, b"\0" * len(data), len(data)) == 0
        assert engine.transfer_sync_read(peer.name, local, at, len(data)) == 0
        assert engine.read_bytes_from_buffer(local, len(data)) == data
    assert engine.free_managed_buffer(local, 4096) == 0
    assert engine.free_managed_buffer(local, 4096) == -1, "freed already"


def test_hundred_entry_sync_and_async_batches_both_ways(engine, peer):
    n, block = 100, 1000
    local = LocalMemory(engine, n * block)
    back = LocalMemory(engine, n * block)
    remote, _ = peer.buffers[0]
    order = list(range(n))
    random.Random(3).shuffle(order)
    srcs = [local.addr + i * block for i in order]
    dsts = [remote + 7 + i * block for i in range(n)]
    assert engine.batch_transfer_sync(peer.name, srcs, dsts, [block] * n, TransferOpcode.Write) == 0
    expect = b"".join(local.bytes(i * block, block) for i in order)
    assert peer.read(remote + 7, n * block) == expect
    rid = engine.batch_transfer_async_read(peer.name, [back.addr + i * block for i in range(n)], dsts, [block] * n)
    assert rid != 0
    assert engine.get_batch_transfer_status([rid]) == 0
    assert back.bytes() == expect
    # transfer_submit_write / transfer_check_status: 1 once done, then the id is spent.
    wid = engine.transfer_submit_write(peer.name, local.addr, remote, 4096)
    assert wid != 0
    status = 0
    while status == 0:
        status = engine.transfer_check_status(wid)
    assert status == 1
    assert engine.transfer_check_status(wid) == -1
    assert peer.read(remote, 4096) == local.bytes(0, 4096)


def test_notifications_carry_name_and_message(engine, peer):
    local = LocalMemory(engine, 4096)
    remote, _ = peer.buffers[0]
    note = TransferNotify("kv-ready", "blocks 0..4")
    assert engine.transfer_sync(peer.name, local.addr, remote, 4096, TransferOpcode.Write, note) == 0
    assert engine.batch_transfer_sync(
        peer.name, [local.addr], [remote + 4096], [4096], TransferOpcode.Write, notify=TransferNotify("second", "x")
    ) == 0
    assert peer.notifies() == [("kv-ready", "blocks 0..4"), ("second", "x")]
    assert peer.notifies() == [], "drained"


def test_memory_registered_after_opening_is_found(engine, peer):
    local = LocalMemory(engine, 8192)
    assert engine.transfer_sync_write(peer.name, local.addr, peer.buffers[0][0], 16) == 0
    later = peer.register(8192)
    # The cached descriptor does not know it: fetched again, once.
    assert engine.transfer_sync_write(peer.name, local.addr, later, 8192) == 0
    assert peer.read(later, 8192) == local.bytes()


def test_wrong_addresses_in_a_loop_cost_no_connection_per_request(engine, peer):
    local = LocalMemory(engine, 8192)
    remote, remote_len = peer.buffers[0]
    assert engine.transfer_sync_write(peer.name, local.addr, remote, 16) == 0
    stats = engine.get_engine().peer_stats
    # A local address that is not registered here says nothing about the peer: its
    # descriptor is not fetched again.
    for _ in range(20):
        assert engine.transfer_sync_write(peer.name, 12345, remote, 16) == -1
    assert stats()[peer.name]["reopened"] == 0
    # A peer address it does not publish is looked for once in a fresh descriptor; the
    # next misses within a second fetch nothing (each fetch is a connection).
    for _ in range(20):
        assert engine.transfer_sync_write(peer.name, local.addr, remote + remote_len, 16) == -1
    fetched = stats()[peer.name]["reopened"]
    # One, or two where this machine stalled for a second inside the loop: never 20.
    assert fetched in (1, 2), fetched
    # Another address of the peer still fetches: memory it registered meanwhile is found.
    later = peer.register(8192)
    assert engine.transfer_sync_write(peer.name, local.addr, later, 8192) == 0
    assert peer.read(later, 8192) == local.bytes()
    assert stats()[peer.name]["reopened"] == fetched + 1
    # A batch with a wrong local address among wrong peer ones fetches nothing.
    assert engine.batch_transfer_sync_write(
        peer.name, [local.addr, 12345], [remote + 2 * remote_len, remote], [16, 16]
    ) == -1
    assert stats()[peer.name]["reopened"] == fetched + 1


def test_bad_input_is_refused_and_the_engine_keeps_serving(engine, peer):
    local = LocalMemory(engine, 8192)
    remote, remote_len = peer.buffers[0]
    before = peer.read(remote, 64)
    # Addresses outside any region, lengths past a region's end, on both sides.
    assert engine.transfer_sync_write(peer.name, local.addr, remote + remote_len, 16) == -1
    assert engine.transfer_sync_write(peer.name, local.addr, remote + remote_len - 8, 16) == -1
    assert engine.transfer_sync_write(peer.name, local.addr, 8, 16) == -1
    assert engine.transfer_sync_write(peer.name, local.addr + 8190, remote, 16) == -1
    assert engine.transfer_sync_write(peer.name, 12345, remote, 16) == -1
    assert engine.batch_transfer_sync_write(peer.name, [local.addr], [remote], [16, 16]) == -1
    assert engine.batch_transfer_async_write(peer.name, [local.addr], [remote + remote_len], [16]) == 0
    # Unknown peers fail (fast, and without waiting for the transfer timeout).
    assert engine.transfer_sync_write("127.0.0.1:1", local.addr, remote, 16) == -1
    assert engine.transfer_sync_write("no-such-host.invalid:5", local.addr, remote, 16) == -1
    # Stale and forged batch ids.
    assert engine.get_batch_transfer_status([0, 12345, 2**64 - 1]) == -1
    assert engine.transfer_check_status(987654321) == -1
    # Helpers outside registered memory.
    assert engine.write_bytes_to_buffer(12345, b"abc", 3) == -1
    assert engine.write_bytes_to_buffer(local.addr, b"abc", 4) == -1, "length past the data"
    import ferry

    with pytest.raises(ferry.InvalidInput):
        engine.read_bytes_from_buffer(local.addr + 8000, 1000)
    # Wrong types are exceptions, not crashes.
    with pytest.raises(TypeError):
        engine.transfer_sync_write(None, local.addr, remote, 16)
    with pytest.raises(TypeError):
        engine.transfer_sync_write(peer.name, "not an address", remote, 16)
    with pytest.raises(TypeError):
        engine.batch_transfer_sync_write(peer.name, None, [remote], [16])
    with pytest.raises(ValueError):
        engine.transfer_sync(peer.name, local.addr, remote, 16, 7)
    assert engine.register_memory(local.addr + 100, 10) == -1, "overlaps a registration"
    # Nothing landed, and good requests still work.
    assert peer.read(remote, 64) == before
    assert engine.transfer_sync_write(peer.name, local.addr, remote, 8192) == 0
    assert peer.read(remote, 8192) == local.bytes()


def test_uninitialized_engines_and_missing_metadata_servers_fail_cleanly():
    e = TransferEngine()
    assert e.get_rpc_port() == -1
    assert e.transfer_sync_write("127.0.0.1:1", 1, 1, 1) == -1
    assert e.get_engine() is None
    assert e.get_notifies() == []
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once the socket is closed
    # etcd is not served yet; HTTP and Redis servers that do not answer fail initialize.
    for server in [
        "etcd://127.0.0.1:2379",
        "127.0.0.1:2379",
        f"http://127.0.0.1:{closed}/metadata",
        f"redis://127.0.0.1:{closed}",
    ]:
        assert TransferEngine().initialize("127.0.0.1", server, "tcp", "") == -1
    ok = TransferEngine()
    assert ok.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    assert ok.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == -1, "already initialized"


def test_a_hostname_with_a_port_binds_that_port_and_is_the_name():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = TransferEngine()
    assert e.initialize(f"127.0.0.1:{port}", "P2PHANDSHAKE", "tcp", "") == 0
    assert e.get_rpc_port() == port
    assert e.get_local_segment_name() == f"127.0.0.1:{port}"


def test_force_tcp_and_topology():
    import json

    os.environ["MC_FORCE_TCP"] = "1"
    try:
        e = TransferEngine()
        assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "efa", "") == 0
        assert e.get_protocol() == "tcp"
    finally:
        del os.environ["MC_FORCE_TCP"]
    top = json.loads(e.get_local_topology())
    assert "cpu:0" in top and "tcp" in top["ferry"]["protocols"]


def test_install_makes_mooncake_engine_resolve_to_ferry():
    import ferry.mooncake

    module = ferry.mooncake.install()
    from mooncake.engine import TransferEngine as Imported  # noqa: E402

    assert Imported is TransferEngine
    assert module.Write == TransferOpcode.Write and int(TransferOpcode.Read) == 0


def test_stream_ordered_transfers_check_now_and_say_what_is_missing(engine, peer):
    import ferry

    local = LocalMemory(engine, 8192)
    remote, remote_len = peer.buffers[0]
    # A request that cannot be valid raises at once, whatever the build.
    with pytest.raises(ferry.Rejected):
        engine.transfer_write_on_cuda(peer.name, local.addr, remote + remote_len, 16)
    with pytest.raises(RuntimeError):
        engine.batch_transfer_read_on_cuda(peer.name, [local.addr], [remote], [16, 16])
    engine.check_stream_transfers()
    if ferry.CUDA_COMPILED and "cuda:0" in __import__("json").loads(engine.get_local_topology()):
        # A device: the transfer runs once the default stream reaches it.
        engine.transfer_write_on_cuda(peer.name, local.addr, remote, 8192)
        import ctypes

        ctypes.CDLL("libcuda.so.1").cuCtxSynchronize()
        engine.check_stream_transfers()
        assert peer.read(remote, 8192) == local.bytes()
    else:
        with pytest.raises(ferry.Unsupported):
            engine.transfer_write_on_cuda(peer.name, local.addr, remote, 8192)


def test_registrations_and_unregistrations_are_safe_under_concurrency(engine, peer):
    import ctypes

    mem = (ctypes.c_char * 65536)()
    base = ctypes.addressof(mem)
    # Eight threads register the same range at once: exactly one wins.
    results = []
    ts = [threading.Thread(target=lambda: results.append(engine.register_memory(base, 65536))) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(results) == [-1] * 7 + [0]
    # Unregistering while transfers name the memory waits for them; they all succeed.
    remote, _ = peer.buffers[0]
    outcomes = []

    def send():
        outcomes.append(engine.transfer_sync_write(peer.name, base, remote, 65536))

    senders = [threading.Thread(target=send) for _ in range(4)]
    for t in senders:
        t.start()
    while not outcomes and any(t.is_alive() for t in senders):
        if engine.unregister_memory(base) == 0:
            break
    for t in senders:
        t.join()
    assert all(o in (0, -1) for o in outcomes), outcomes
    assert engine.register_memory(base, 65536) in (0, -1)


def test_mooncake_surface_extras():
    e = TransferEngine()
    assert e.warmup_efa_segment("anything") == 0 and e.get_engine_ptr() == 0
    assert TransferEngine.TransferOpcode is TransferOpcode
    assert e.initialize("127.0.0.1:1234:npu_0", "P2PHANDSHAKE", "tcp", "") == -1


def test_a_temporary_registered_buffer_in_a_batch_does_not_hang():
    import ferry

    target = ferry.Engine()
    e = ferry.Engine()
    kv = target.allocate(4096)
    seg = e.open_segment(target.name)
    b = e.batch(timeout=10)
    # The registered buffer's last Python reference goes right after `write`.
    b.write(e.register(bytearray(4096)), 0, seg.buffer(0), 0, 16)
    batch = b.submit()
    batch.wait()
    assert batch.statuses() == [ferry.TaskStatus.Completed] and len(kv) == 4096


@contextlib.contextmanager
def metadata_store(kind):
    """A metadata server on free loopback ports for the body of the ``with``: yields its
    metadata string for ``initialize``, or ``None`` when its binary is missing. The
    server is stopped and its data directory removed at the end."""
    import shutil
    import socket
    import tempfile
    import time

    def free():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    if kind == "http":
        server = HttpStore()
        try:
            yield server.url
        finally:
            server.stop()
        return
    binary = "redis-server" if kind == "redis" else "etcd"
    if shutil.which(binary) is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f"ferry-{kind}-") as tmp:
        port = free()
        if kind == "redis":
            cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp]
            url = f"redis://127.0.0.1:{port}"
        else:
            client, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{free()}"
            cmd = [binary, "--data-dir", tmp + "/d", "--listen-client-urls", client, "--advertise-client-urls", client,
                   "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}"]
            url = f"127.0.0.1:{port}"  # a bare host:port is etcd, as Mooncake reads it
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while TransferEngine().initialize("probe", url, "tcp", "") != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} did not come up")
                time.sleep(0.1)
            yield url
        finally:
            proc.kill()
            proc.wait()


class HttpStore:
    """Mooncake's HTTP metadata protocol in a thread: GET/PUT/DELETE ?key=."""

    def __init__(self):
        import http.server
        import threading
        import urllib.parse

        entries = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def key(self):
                return urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).get("key", [""])[0]

            def reply(self, code, body=b""):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                v = entries.get(self.key())
                self.reply(200, v) if v is not None else self.reply(404)

            def do_PUT(self):
                entries[self.key()] = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.reply(200)

            def do_DELETE(self):
                entries.pop(self.key(), None)
                self.reply(200)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metadata"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("kind", ["redis", "etcd", "http"])
def test_names_through_a_metadata_server(kind):
    with metadata_store(kind) as url:
        if url is None:
            pytest.skip(f"{kind} is not installed (cargo xtask test installs it)")
        target = TransferEngine()
        assert target.initialize("target-0", url, "tcp", "") == 0
        assert target.get_local_segment_name() == "target-0" and target.get_rpc_port() > 0
        initiator = TransferEngine()
        assert initiator.initialize("initiator-0", url, "tcp", "") == 0
        remote = target.allocate_managed_buffer(65536)
        local = LocalMemory(initiator, 65536)
        assert initiator.get_first_buffer_address("target-0") == remote
        assert initiator.transfer_sync_write("target-0", local.addr, remote, 65536) == 0
        assert target.read_bytes_from_buffer(remote, 65536) == local.bytes()
        back = LocalMemory(initiator, 65536)
        assert initiator.batch_transfer_sync_read("target-0", [back.addr], [remote], [65536]) == 0
        assert back.bytes() == local.bytes()
        assert initiator.send_probe("target-0") == 0 and initiator.send_probe("nobody") != 0
        # A second engine cannot take a live name.
        assert TransferEngine().initialize("target-0", url, "tcp", "") == -1
