"""What the live progress of a send costs (issue 11): ``python3 bench/progress.py [--quick]``.

``Channel.send_memory`` with and without its progress callback (the one ``vm.info``'s ``migration.progress``
and ``chmig remote send-migration``'s progress line read), over a UNIX socketpair drained by a thread (the
wire minus the network), from 1 GiB of populated memfd guest RAM: a dirty table of 131072 one-page ranges
(where a per-range cost would show) and iteration 0's one 1 GiB range (written in 16 MiB steps when
counted).  Median of 5 (3 with --quick); the baseline is the same call without progress, in the same run.
"""
import socket
import statistics
import sys
import threading
import time

import _common  # noqa: F401 - puts the repository on sys.path
from chmig.memory import GuestMemory, ZoneConfig
from chmig.channel import Channel
from chmig.transport import Connection
import chmig.protocol as p
from chmig.stats import Progress

mem = GuestMemory.create([ZoneConfig("mem0", 1 << 30)])
with mem.view(0, 1 << 30) as v:
    v[::4096] = b"\x01" * (len(v) // 4096)  # populate every page
tables = {"131072 x 4 KiB ranges": p.MemoryRangeTable([p.MemoryRange(i * 8192, 4096) for i in range(131072)]),
          "1 x 1 GiB range": p.MemoryRangeTable([p.MemoryRange(0, 1 << 30)])}
REPEATS = 3 if "--quick" in sys.argv else 5
print("live progress on the send path: chmig with progress vs the same send without (baseline)")
print(f"{'table':<24} {'no progress ms':>15} {'with progress ms':>17} {'ratio':>6}")
for name, table in tables.items():
    out = {}
    for label in ("none", "progress"):
        runs = []
        for _ in range(REPEATS):
            a, b = socket.socketpair()
            def drain(sock=b):
                buf = bytearray(1 << 20)
                got = 0
                need = len(p.Request.memory(0).encode()) + table.byte_length + table.total_bytes
                while got < need:
                    n = sock.recv_into(buf)
                    if not n:
                        break
                    got += n
                sock.sendall(p.Response.ok().encode())
            t = threading.Thread(target=drain, name="bench-drain")
            t.start()
            chan = Channel(Connection(a, peer="pair", is_unix=True), side=p.Side.SOURCE, name="bench")
            progress = Progress()
            started = time.perf_counter()
            if label == "none":
                chan.send_memory(mem, table)
            else:
                chan.send_memory(mem, table, progress.sent)
                assert progress.iteration_sent == table.total_bytes, (progress.iteration_sent, table.total_bytes)
            runs.append(time.perf_counter() - started)
            t.join()
            a.close()
            b.close()
        out[label] = statistics.median(runs)
    print(f"{name:<24} {out['none']*1e3:>15.1f} {out['progress']*1e3:>17.1f} {out['progress']/out['none']:>6.2f}")
