"""kazoo's Lock recipe on ZooKeeper, measured the way `dlock-bench` measures dlock.

Prints one JSON object per run (same fields as `dlock-bench --json`). All threads share
one KazooClient (one session), as dlock's tasks share one backend handle.

  python3 kazoo_peer.py --hosts 127.0.0.1:2181 --mode uncontended|handoff -c N --seconds S
"""
import argparse
import json
import os
import threading
import time

from kazoo.client import KazooClient
from kazoo.exceptions import LockTimeout

ROOT = "/dlock-bench-kazoo-" + os.urandom(4).hex()


def percentiles(samples):
    if not samples:
        return {"count": 0}
    samples = sorted(samples)
    def at(q):
        return samples[min(len(samples) - 1, round((len(samples) - 1) * q))] * 1e6
    return {"count": len(samples), "p10_us": at(0.10), "p25_us": at(0.25), "p50_us": at(0.5),
            "p75_us": at(0.75), "p90_us": at(0.9), "p99_us": at(0.99), "max_us": at(1.0)}


def uncontended(args, zk):
    until, start = time.monotonic() + args.seconds, time.monotonic()
    samples, errors = [], []
    guard = threading.Lock()

    def worker():
        mine = []
        while time.monotonic() < until:
            lock = zk.Lock(f"{ROOT}/u-{os.urandom(8).hex()}")
            t = time.perf_counter()
            if not lock.acquire(blocking=False):
                errors.append("a fresh lock was held")
                continue
            mine.append(time.perf_counter() - t)
            lock.release()
        with guard:
            samples.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    return {"operations": len(samples), "seconds": seconds, "per_second": len(samples) / seconds,
            "errors": len(errors), "acquire": percentiles(samples)}


def handoff(args, zk):
    path = f"{ROOT}/h"
    until, start = time.monotonic() + args.seconds, time.monotonic()
    state = {"released_at": None, "generation": 0, "ops": 0, "inside": 0, "violations": 0}
    served = set()
    cond = threading.Condition()
    samples = []

    def waiter(n):
        while time.monotonic() < until:
            lock = zk.Lock(path, identifier=str(n))
            try:
                if not lock.acquire(blocking=True, timeout=max(0.01, until - time.monotonic())):
                    continue
            except LockTimeout:
                continue
            with cond:
                if state["released_at"] is not None:
                    samples.append(time.perf_counter() - state["released_at"])
                    state["released_at"] = None
                state["inside"] += 1
                if state["inside"] > 1:
                    state["violations"] += 1
                served.add(n)
                state["generation"] += 1
                mine = state["generation"]
            time.sleep(args.hold_ms / 1000)
            with cond:
                state["inside"] -= 1
                state["released_at"] = time.perf_counter()
            lock.release()
            with cond:
                state["ops"] += 1
                cond.notify_all()
                cond.wait_for(lambda: state["generation"] > mine or time.monotonic() >= until,
                              timeout=max(0.0, until - time.monotonic()))

    threads = [threading.Thread(target=waiter, args=(n,)) for n in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    return {"operations": state["ops"], "seconds": seconds, "per_second": state["ops"] / seconds,
            "violations": state["violations"], "tasks_served": len(served), "handoff": percentiles(samples)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", required=True)
    p.add_argument("--mode", default="uncontended", choices=["uncontended", "handoff"])
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--hold-ms", type=float, default=5)
    args = p.parse_args()
    zk = KazooClient(hosts=args.hosts, timeout=10)
    zk.start(timeout=15)
    try:
        report = uncontended(args, zk) if args.mode == "uncontended" else handoff(args, zk)
    finally:
        try:
            zk.delete(ROOT, recursive=True)
        finally:
            zk.stop()
            zk.close()
    report.update({"client": "kazoo Lock", "mode": args.mode, "concurrency": args.concurrency})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
