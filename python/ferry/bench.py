"""``python -m ferry.bench``: ``ferry bench`` through the Mooncake-compatible API.

Starts a target in a child process on 127.0.0.1 and drives it from this process with
``TransferEngine.batch_transfer_sync_write`` (or ``_read``), one batch after another on
each thread, the way a serving connector does. Same flags and the same JSON fields as
``ferry bench``, so the two compare directly.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

from ferry.mooncake import TransferEngine

WARM_UP_S = 0.5


def size(text):
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def cpu_seconds(pid):
    """User plus system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def serve(length, protocol):
    """The target: registers `length` bytes, prints its segment and address, and serves
    until stdin closes."""
    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", protocol, "") != 0:
        print(json.dumps({"error": "initialize failed"}), flush=True)
        return 1
    addr = engine.allocate_managed_buffer(length)
    print(json.dumps({"name": f"127.0.0.1:{engine.get_rpc_port()}", "addr": addr}), flush=True)
    sys.stdin.read()
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ferry.bench", description=__doc__.splitlines()[0])
    p.add_argument("--operation", choices=["read", "write"], default="write")
    p.add_argument("--block-size", type=size, default=size("64K"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--protocol", default="tcp")
    p.add_argument("--verify", action="store_true", help="check every byte at the destination once")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--serve", type=size, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve, args.protocol)

    per_thread = args.block_size * args.batch_size
    child = subprocess.Popen(
        [sys.executable, "-m", "ferry.bench", "--serve", str(per_thread * args.threads), "--protocol", args.protocol],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        hello = json.loads(child.stdout.readline())
        if "error" in hello:
            raise SystemExit(f"target: {hello['error']}")
        engine = TransferEngine()
        if engine.initialize("127.0.0.1", "P2PHANDSHAKE", args.protocol, "") != 0:
            raise SystemExit("initialize failed")
        local = engine.allocate_managed_buffer(per_thread * args.threads)
        if args.verify:
            data = os.urandom(per_thread * args.threads)
            ctypes.memmove(local, data, len(data))
        transfer = (
            engine.batch_transfer_sync_write if args.operation == "write" else engine.batch_transfer_sync_read
        )
        lengths = [args.block_size] * args.batch_size
        stop = threading.Event()
        measuring = threading.Event()
        results = [{"bytes": 0, "errors": 0, "latencies": []} for _ in range(args.threads)]

        def worker(i):
            base = i * per_thread
            srcs = [local + base + j * args.block_size for j in range(args.batch_size)]
            dsts = [hello["addr"] + base + j * args.block_size for j in range(args.batch_size)]
            r = results[i]
            while not stop.is_set():
                start = time.perf_counter()
                ret = transfer(hello["name"], srcs, dsts, lengths)
                took = time.perf_counter() - start
                if not measuring.is_set():
                    continue
                if ret == 0:
                    r["bytes"] += per_thread
                    r["latencies"].append(took * 1e6)
                else:
                    r["errors"] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
        for t in threads:
            t.start()
        time.sleep(WARM_UP_S)
        cpu0 = (cpu_seconds(os.getpid()), cpu_seconds(child.pid))
        t0 = time.perf_counter()
        measuring.set()
        time.sleep(args.duration)
        measuring.clear()
        elapsed = time.perf_counter() - t0
        cpu1 = (cpu_seconds(os.getpid()), cpu_seconds(child.pid))
        stop.set()
        for t in threads:
            t.join()
        verified = False
        if args.verify:
            back = engine.allocate_managed_buffer(per_thread * args.threads)
            if args.operation == "write":
                ok = engine.transfer_sync_read(hello["name"], back, hello["addr"], per_thread * args.threads) == 0
                verified = ok and ctypes.string_at(back, len(data)) == data
            else:
                ok = engine.transfer_sync_write(hello["name"], local, hello["addr"], per_thread * args.threads) == 0
                verified = ok and engine.transfer_sync_read(hello["name"], back, hello["addr"], len(data)) == 0
                verified = verified and ctypes.string_at(back, len(data)) == data
            if not verified:
                raise SystemExit("verification failed: the destination does not hold the source's bytes")
    finally:
        child.stdin.close()
        child.wait()

    moved = sum(r["bytes"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

    cpu = {"initiator": cpu1[0] - cpu0[0], "target": cpu1[1] - cpu0[1]}
    report = {
        "protocol": args.protocol,
        "operation": args.operation,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "api": "mooncake batch_transfer_sync",
        "duration_s": elapsed,
        "bytes": moved,
        "throughput_gbps": moved / elapsed / 1e9,
        "ops_per_sec": moved / args.block_size / elapsed,
        "latency_us": {"p50": pct(0.5), "p99": pct(0.99), "max": lat[-1] if lat else 0.0},
        "errors": sum(r["errors"] for r in results),
        "cpu_seconds": cpu,
        "gb_per_cpu_second": moved / 1e9 / max(cpu["initiator"] + cpu["target"], 1e-9),
        "verified": verified,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"python -m ferry.bench: {args.operation} {args.block_size} B x {args.batch_size}, {args.threads} thread(s), {elapsed:.1f} s")
        print(f"  throughput   {report['throughput_gbps']:9.3f} GB/s   {report['ops_per_sec']:12.0f} ops/s")
        print(f"  batch p50    {report['latency_us']['p50']:9.0f} us   p99 {report['latency_us']['p99']:.0f} us")
        print(f"  cpu          initiator {cpu['initiator']:.2f} s, target {cpu['target']:.2f} s")
        print(f"  errors       {report['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
