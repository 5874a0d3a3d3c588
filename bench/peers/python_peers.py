"""redis-py's Lock and python-redis-lock, measured the way `dlock-bench` measures dlock.

Prints one JSON object per run (same fields as `dlock-bench --json`).

  python3 python_peers.py --client redis-py|redis-py-tuned|python-redis-lock \
      --url redis://127.0.0.1:6379 --mode uncontended|handoff -c N --seconds S
  python3 python_peers.py --client redis-py --url … --mode hold --key K --hold-ms H
      (takes K with a 10 s lock, prints "held", holds H ms, releases and prints
      "released <unix ns>": the foreign holder a dlock waiter waits behind)
"""
import argparse
import json
import os
import threading
import time

import redis
import redis_lock


def percentiles(samples):
    if not samples:
        return {"count": 0}
    samples = sorted(samples)
    def at(q):
        return samples[min(len(samples) - 1, round((len(samples) - 1) * q))] * 1e6
    return {"count": len(samples), "p10_us": at(0.10), "p25_us": at(0.25), "p50_us": at(0.5),
            "p75_us": at(0.75), "p90_us": at(0.9), "p99_us": at(0.99), "max_us": at(1.0)}


def make_lock(client, conn, name):
    if client == "redis-py":
        return conn.lock(name, timeout=30)  # default sleep=0.1 between retries
    if client == "redis-py-tuned":
        return conn.lock(name, timeout=30, sleep=0.001)
    return redis_lock.Lock(conn, name, expire=30)  # waiters block on BLPOP of a signal key


def uncontended(args, conn):
    samples, until, start = [], time.monotonic() + args.seconds, time.monotonic()
    while time.monotonic() < until:
        lock = make_lock(args.client, conn, "peer-" + os.urandom(8).hex())
        t = time.perf_counter()
        assert lock.acquire(blocking=False)
        samples.append(time.perf_counter() - t)
        lock.release()
    seconds = time.monotonic() - start
    return {"operations": len(samples), "seconds": seconds, "per_second": len(samples) / seconds,
            "acquire": percentiles(samples)}


def handoff(args, url):
    name = "peer-" + os.urandom(8).hex()
    until, start = time.monotonic() + args.seconds, time.monotonic()
    state = {"released_at": None, "generation": 0, "ops": 0}
    cond = threading.Condition()
    samples = []

    def waiter():
        conn = redis.Redis.from_url(url)
        while time.monotonic() < until:
            lock = make_lock(args.client, conn, name)
            wait = max(0.01, until - time.monotonic())
            got = (lock.acquire(blocking=True, timeout=wait) if args.client == "python-redis-lock"
                   else lock.acquire(blocking=True, blocking_timeout=wait))
            if not got:
                continue
            with cond:
                if state["released_at"] is not None:
                    samples.append(time.perf_counter() - state["released_at"])
                    state["released_at"] = None
                state["generation"] += 1
                mine = state["generation"]
            time.sleep(args.hold_ms / 1000)
            with cond:
                state["released_at"] = time.perf_counter()
            lock.release()
            with cond:
                state["ops"] += 1
                cond.notify_all()
                cond.wait_for(lambda: state["generation"] > mine or time.monotonic() >= until,
                              timeout=max(0.0, until - time.monotonic()))

    threads = [threading.Thread(target=waiter) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    return {"operations": state["ops"], "seconds": seconds, "per_second": state["ops"] / seconds,
            "handoff": percentiles(samples)}


def hold(args, conn):
    lock = make_lock(args.client, conn, args.key)
    if args.client != "python-redis-lock":
        lock = conn.lock(args.key, timeout=10)
    assert lock.acquire(blocking=False), "the key was not free"
    print("held", flush=True)
    time.sleep(args.hold_ms / 1000)
    lock.release()
    print("released", time.time_ns(), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--client", required=True, choices=["redis-py", "redis-py-tuned", "python-redis-lock"])
    p.add_argument("--url", required=True)
    p.add_argument("--mode", default="uncontended", choices=["uncontended", "handoff", "hold"])
    p.add_argument("--key")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--hold-ms", type=float, default=5)
    args = p.parse_args()
    if args.mode == "hold":
        return hold(args, redis.Redis.from_url(args.url))
    if args.mode == "uncontended":
        report = uncontended(args, redis.Redis.from_url(args.url))
    else:
        report = handoff(args, args.url)
    names = {"redis-py": "redis-py Lock (default sleep 100ms)", "redis-py-tuned": "redis-py Lock (sleep 1ms)",
             "python-redis-lock": "python-redis-lock"}
    report.update({"client": names[args.client], "mode": args.mode, "concurrency": args.concurrency})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
