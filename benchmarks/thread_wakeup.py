"""What one thread hand-over costs on this machine: across CPUs and on one CPU.

Two threads bounce a byte through a pair of pipes; the round trip is two wake-ups,
the same two a saga transition pays to reach its SQLite writer thread and come back.
On a virtual machine whose idle vCPUs halt, a wake-up across vCPUs goes through the
host and costs tens of microseconds; on one CPU it is a local context switch. The
numbers explain the "async floor" of ``saga_hop_floor.py``. Run it on an otherwise
idle machine (a busy vCPU does not halt, so the cost hides under load):
``python benchmarks/thread_wakeup.py``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time


def round_trips(count: int) -> list[float]:
    to_peer, from_peer = os.pipe(), os.pipe()

    def peer() -> None:
        while (byte := os.read(to_peer[0], 1)) != b"q":
            os.write(from_peer[1], byte)

    thread = threading.Thread(target=peer)
    thread.start()
    times = []
    for _ in range(count):
        began = time.perf_counter()
        os.write(to_peer[1], b"x")
        os.read(from_peer[0], 1)
        times.append(time.perf_counter() - began)
    os.write(to_peer[1], b"q")
    thread.join()
    for fd in (*to_peer, *from_peer):
        os.close(fd)
    return times


def main() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    print(f"thread round trip through a pipe (two wake-ups), {len(allowed)} CPUs allowed")
    print(f"{'placement':14} {'p50 us':>8} {'p90 us':>8} {'min us':>8}")
    for label, cpus in (("all CPUs", set(allowed)), (f"CPU {allowed[-1]}", {allowed[-1]})):
        os.sched_setaffinity(0, cpus)  # the peer thread inherits it
        times = round_trips(5000)
        p90 = statistics.quantiles(times, n=10)[-1]
        print(
            f"{label:14} {statistics.median(times) * 1e6:8.1f} {p90 * 1e6:8.1f} "
            f"{min(times) * 1e6:8.1f}"
        )
    os.sched_setaffinity(0, set(allowed))


if __name__ == "__main__":
    main()
