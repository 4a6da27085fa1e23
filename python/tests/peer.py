"""A peer in its own process, driven over stdin/stdout by the tests: one JSON object per
line each way. It starts a Mooncake-compatible engine (or a Pythonic one with
``--api``), registers memory filled with random bytes, prints
``{"name", "port", "buffers": [[addr, len], ...]}`` and then answers commands:

- ``{"op": "read", "addr": A, "len": N}`` -> ``{"data": "<hex>"}`` (its own memory)
- ``{"op": "write", "addr": A, "data": "<hex>"}`` -> ``{"ok": true}``
- ``{"op": "notifies"}`` -> ``{"notifies": [[name, msg], ...]}``
- ``{"op": "register", "len": N}`` -> ``{"addr": A}`` (more memory, random bytes)
- ``{"op": "exit"}``: ends the process.
"""

import ctypes
import json
import os
import sys

from ferry.mooncake import TransferEngine


def main():
    sizes = [int(s) for s in (sys.argv[1:] or ["1048576"])]
    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        print(json.dumps({"error": "initialize failed"}), flush=True)
        return 1
    keep = []

    def register(n):
        mem = (ctypes.c_char * n).from_buffer_copy(os.urandom(n))
        keep.append(mem)
        addr = ctypes.addressof(mem)
        assert engine.register_memory(addr, n) == 0
        return addr

    buffers = [[register(n), n] for n in sizes]
    port = engine.get_rpc_port()
    print(json.dumps({"name": f"127.0.0.1:{port}", "port": port, "buffers": buffers}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "read":
            out = {"data": ctypes.string_at(cmd["addr"], cmd["len"]).hex()}
        elif op == "write":
            data = bytes.fromhex(cmd["data"])
            ctypes.memmove(cmd["addr"], data, len(data))
            out = {"ok": True}
        elif op == "notifies":
            out = {"notifies": [[n.name, n.msg] for n in engine.get_notifies()]}
        elif op == "register":
            out = {"addr": register(cmd["len"])}
        elif op == "exit":
            return 0
        else:
            out = {"error": f"unknown op {op}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
