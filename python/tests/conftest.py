"""Shared fixtures: peers in their own processes (``peer.py``), random data, and a
local Mooncake-compatible engine."""

import ctypes
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


class Peer:
    """A peer process; `buffers` are its registered `(addr, len)` pairs."""

    def __init__(self, *sizes):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "peer.py"), *map(str, sizes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = json.loads(self.proc.stdout.readline())
        assert "error" not in hello, hello
        self.name = hello["name"]
        self.port = hello["port"]
        self.buffers = [tuple(b) for b in hello["buffers"]]

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def read(self, addr, n):
        return bytes.fromhex(self.ask(op="read", addr=addr, len=n)["data"])

    def write(self, addr, data):
        assert self.ask(op="write", addr=addr, data=data.hex())["ok"]

    def notifies(self):
        return [tuple(n) for n in self.ask(op="notifies")["notifies"]]

    def register(self, n):
        return self.ask(op="register", len=n)["addr"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def peer():
    p = Peer(1 << 20, 1 << 16)
    yield p
    p.close()


@pytest.fixture
def peers():
    ps = [Peer(1 << 20) for _ in range(3)]
    yield ps
    for p in ps:
        p.close()


class LocalMemory:
    """Host memory owned by the test, registered with a compat engine."""

    def __init__(self, engine, n):
        self.mem = (ctypes.c_char * n).from_buffer_copy(os.urandom(n))
        self.addr = ctypes.addressof(self.mem)
        self.len = n
        assert engine.register_memory(self.addr, n) == 0

    def bytes(self, offset=0, n=None):
        return ctypes.string_at(self.addr + offset, self.len - offset if n is None else n)

    def fill(self, offset, data):
        ctypes.memmove(self.addr + offset, data, len(data))


@pytest.fixture
def engine():
    from ferry.mooncake import TransferEngine

    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    return e


def random_bytes(n):
    return os.urandom(n)
