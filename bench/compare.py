#!/usr/bin/env python3
"""The side-by-side benchmark of docs/benchmarks.md, in one command:

    python3 bench/compare.py            # full run (about 15 minutes)
    python3 bench/compare.py --quick    # 2 s per measurement, to try it out

It starts private servers (redis-server, a PostgreSQL cluster) on free loopback ports,
builds dlock and the peer clients, and measures in one go, on this machine:
`dlock-bench` per backend; the raw stores with their official clients (redis-rs,
tokio-postgres), `redis-benchmark` and `pgbench` running the same commands; and the peer
lock clients a user would pick instead (rslock, redis-py's Lock, python-redis-lock,
node-redlock), each with default and tuned retry settings. It writes JSON lines to
docs/bench/results.jsonl, SVG charts to docs/bench/, and the tables to docs/benchmarks.md.
Figures are reported as ratios to the raw store of the same run.
"""
import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
OUT = ROOT / "docs" / "bench"
DLOCK = ROOT / "target" / "release" / "dlock"
DLOCK_BENCH = ROOT / "target" / "release" / "dlock-bench"
PGBENCH_SCRIPT = ROOT / "target" / "release" / "dlock-pgbench-script"
PEER_BIN = PEERS / "target" / "release" / "dlock-bench-peers"
VENV = ROOT / "bench" / ".venv"

# The PostgreSQL modes of dlock's URL (?mode=…), see docs/backends/postgres.md.
PG_MODES = ["session", "lease"]


def log(message):
    print(f"compare: {message}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    log(" ".join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"compare: nothing listens on 127.0.0.1:{port}")


def need(binary, package):
    """Installs the Debian package that provides `binary` when it is missing (as root),
    else stops with a message naming it."""
    if shutil.which(binary) is not None:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {package} for {binary}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], env=env, check=False)
    if shutil.which(binary) is None:
        raise SystemExit(f"compare: `{binary}` is missing: apt-get install {package}")


def pg_bin(name):
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    need(name, "postgresql")
    return name


class Servers:
    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.procs = []

    def redis(self):
        need("redis-server", "redis-server")
        port = free_port()
        d = self.tmp / "redis"
        d.mkdir()
        self.procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(d)], stdout=subprocess.DEVNULL))
        wait_port(port)
        return port

    def postgres(self):
        port = free_port()
        d = self.tmp / "pg"
        as_user = []
        if os.geteuid() == 0:
            as_user = ["runuser", "-u", "postgres", "--"]
            self.tmp.chmod(0o755)
            d.mkdir()
            shutil.chown(d, "postgres", "postgres")
        run(as_user + [pg_bin("initdb"), "-D", str(d / "data"), "--auth=trust", "-U", "postgres"],
            stdout=subprocess.DEVNULL)
        self.pg_stop = as_user + [pg_bin("pg_ctl"), "-D", str(d / "data"), "-m", "immediate", "stop"]
        run(as_user + [pg_bin("pg_ctl"), "-D", str(d / "data"), "-l", str(d / "log"), "-w", "-o",
                       f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
            stdout=subprocess.DEVNULL)
        wait_port(port)
        return port

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()
        if getattr(self, "pg_stop", None):
            subprocess.run(self.pg_stop, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def build():
    run(["cargo", "build", "--release", "--all-features", "--workspace", "--bin", "dlock", "--bin", "dlock-bench",
         "--bin", "dlock-pgbench-script"], cwd=ROOT)
    run(["cargo", "build", "--release"], cwd=PEERS)
    if not (VENV / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(VENV)])
    run([str(VENV / "bin" / "pip"), "install", "-q", "redis==5.2.1", "python-redis-lock==4.0.1"])
    need("node", "nodejs")
    run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=PEERS)


class Results:
    def __init__(self, seconds):
        self.seconds = seconds
        self.rows = []
        OUT.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(OUT / "results.jsonl", "w")

    def add(self, backend, row):
        row["backend_kind"] = backend
        self.rows.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        return row

    def json_cmd(self, backend, cmd, client=None):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        if client:
            row["client"] = client
        log(f"{row.get('client')} {row.get('mode')} c={row.get('concurrency')}: {row.get('per_second', 0):.0f}/s")
        return self.add(backend, row)

    def dlock(self, backend, url, mode, c, extra=()):
        seconds = self.seconds if mode != "held" else self.held_seconds
        return self.json_cmd(backend, [str(DLOCK_BENCH), "--backend", url, "--mode", mode, "-c", str(c),
                                       "--duration", f"{seconds}s", "--json", *extra], client="dlock")

    def peer(self, backend, client, url, mode, c):
        return self.json_cmd(backend, [str(PEER_BIN), "--client", client, "--url", url, "--mode", mode, "-c", str(c),
                                       "--seconds", str(self.seconds)])

    def python(self, client, url, mode, c):
        return self.json_cmd("redis", [str(VENV / "bin" / "python"), str(PEERS / "python_peers.py"), "--client",
                                       client, "--url", url, "--mode", mode, "-c", str(c), "--seconds",
                                       str(self.seconds)])

    def node(self, client, url, mode, c):
        return self.json_cmd("redis", ["node", str(PEERS / "node_peers.mjs"), "--client", client, "--url", url,
                                       "--mode", mode, "-c", str(c), "--seconds", str(self.seconds)])


def redis_benchmark(results, port, c):
    """redis-benchmark running SET NX PX and the compare-and-delete EVAL: pairs/s = rps / 2."""
    script = "if redis.call('get',KEYS[1])==ARGV[1] then return redis.call('del',KEYS[1]) else return 0 end"
    rates = []
    for cmd in (["SET", "k:__rand_int__", "t", "NX", "PX", "30000"], ["EVAL", script, "1", "k:__rand_int__", "t"]):
        n = max(20000, int(8000 * results.seconds * (1 if c == 1 else 4)))
        out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(c), "-n", str(n), "-r", "100000000",
                              "--csv", *cmd], check=True, capture_output=True, text=True).stdout
        import csv
        rows = list(csv.reader(out.strip().splitlines()))
        rates.append(float(rows[-1][1]))
    pairs = 1 / (1 / rates[0] + 1 / rates[1])
    return results.add("redis", {"client": "redis-benchmark", "mode": "uncontended", "concurrency": c,
                                 "per_second": pairs})


def pgbench(results, port, c, sql, kind, name):
    script = Path(tempfile.mkstemp(suffix=".sql")[1])
    script.write_text(sql)
    out = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n", "-M", "prepared",
                          "-c", str(c), "-j", str(min(c, 2)), "-T", str(max(1, int(results.seconds))), "-f",
                          str(script), "postgres"], check=True, capture_output=True, text=True).stdout
    tps = next(float(line.split("=")[1].split()[0]) for line in out.splitlines() if line.startswith("tps"))
    return results.add(kind, {"client": name, "mode": "uncontended", "concurrency": c, "per_second": tps})


def hyperfine(results, tmp):
    need("hyperfine", "hyperfine")
    d = Path(tmp) / "cli"
    d.mkdir()
    export = Path(tmp) / "hyperfine.json"
    env = dict(os.environ, DLOCK_DIR=str(d))
    run(["hyperfine", "-N", "--warmup", "20", "--runs", "300", "--export-json", str(export),
         f"{DLOCK} run k -- true", f"flock {d}/k.lock true"], env=env, stdout=subprocess.DEVNULL)
    data = json.loads(export.read_text())["results"]
    for r, client in zip(data, ["dlock run k -- true", "flock k.lock true"]):
        results.add("cli", {"client": client, "mode": "cli", "mean_ms": r["mean"] * 1e3,
                            "median_ms": r["median"] * 1e3, "stddev_ms": r["stddev"] * 1e3})


# ---------------------------------------------------------------- report


def us(v):
    if v is None:
        return "-"
    return f"{v:.0f} µs" if v < 1000 else f"{v / 1000:.2f} ms"


def find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def svg_ladder(title, rows, path):
    """Hand-off latency distribution per client: a bar from p10 to p99, a box from p25 to
    p75, a tick at p50 and a dot at the maximum, on a log axis."""
    rows = [r for r in rows if r.get("handoff", {}).get("count")]
    if not rows:
        return None
    import math
    lo = min(r["handoff"]["p10_us"] for r in rows) / 2
    hi = max(r["handoff"]["max_us"] for r in rows) * 2
    width, left, right, row_h, top = 900, 260, 30, 34, 50
    height = top + row_h * len(rows) + 50
    def x(v):
        return left + (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (width - left - right)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15">{title}</text>']
    decade = 10 ** math.floor(math.log10(lo))
    while decade <= hi:
        if decade >= lo:
            label = f"{decade:g} µs" if decade < 1000 else f"{decade / 1000:g} ms"
            parts.append(f'<line x1="{x(decade):.1f}" y1="{top - 8}" x2="{x(decade):.1f}" y2="{height - 40}" stroke="#ddd"/>')
            parts.append(f'<text x="{x(decade):.1f}" y="{height - 22}" text-anchor="middle" fill="#555">{label}</text>')
        decade *= 10
    for i, r in enumerate(rows):
        h = r["handoff"]
        y = top + i * row_h + row_h / 2
        color = "#d9480f" if r["client"] == "dlock" else "#1c7ed6"
        parts.append(f'<text x="{left - 10}" y="{y + 4:.1f}" text-anchor="end">{r["client"]}</text>')
        parts.append(f'<line x1="{x(h["p10_us"]):.1f}" y1="{y:.1f}" x2="{x(h["p99_us"]):.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<rect x="{x(h["p25_us"]):.1f}" y="{y - 8:.1f}" width="{max(1, x(h["p75_us"]) - x(h["p25_us"])):.1f}" height="16" fill="{color}" fill-opacity="0.35" stroke="{color}"/>')
        parts.append(f'<line x1="{x(h["p50_us"]):.1f}" y1="{y - 11:.1f}" x2="{x(h["p50_us"]):.1f}" y2="{y + 11:.1f}" stroke="black" stroke-width="2"/>')
        parts.append(f'<circle cx="{x(h["max_us"]):.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
    parts.append(f'<text x="{left}" y="{height - 6}" fill="#555">bar p10–p99, box p25–p75, black tick p50, dot max</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path.name


def versions():
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except Exception:
            return "?"
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return [
        ("machine", f"{os.cpu_count()} cores, {cpu}, {platform.platform()}"),
        ("rustc", first_line(["rustc", "--version"])),
        ("redis-server", first_line(["redis-server", "--version"])),
        ("PostgreSQL", first_line([pg_bin("postgres"), "--version"])),
        ("python", sys.version.split()[0]),
        ("node", first_line(["node", "--version"])),
    ]


def write_report(results, command):
    rows = results.rows
    # Written again whole: the file written as the run went is only a safety copy.
    (OUT / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["# Benchmarks", "",
             "Produced by one run of the command below on the machine listed; every figure of a table comes from "
             "that same run. Absolute numbers on a shared machine drift by tens of percent: read the ratios to the "
             "raw store.", "", f"    {command}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in versions()]

    def pairs_table(kind, raw_client, concurrencies, clients):
        out = ["", "| client | " + " | ".join(f"{c} task{'s' if c > 1 else ''}: pairs/s (× raw)" for c in concurrencies)
               + " | acquire p50 / p99 (1 task) |", "|---|" + "---:|" * (len(concurrencies) + 1)]
        for client in clients:
            cells = []
            one = None
            for c in concurrencies:
                r = find(rows, backend_kind=kind, client=client, mode="uncontended", concurrency=c)
                raw = find(rows, backend_kind=kind, client=raw_client, mode="uncontended", concurrency=c)
                if r is None:
                    cells.append("-")
                    continue
                if c == concurrencies[0]:
                    one = r
                ratio = f" ({r['per_second'] / raw['per_second']:.2f}×)" if raw else ""
                cells.append(f"{r['per_second']:,.0f}{ratio}")
            lat = f"{us(one['acquire']['p50_us'])} / {us(one['acquire']['p99_us'])}" if one and one.get("acquire") else "-"
            out.append(f"| {client} | " + " | ".join(cells) + f" | {lat} |")
        return out

    def handoff_table(kind, chart):
        hs = [r for r in rows if r.get("backend_kind") == kind and r.get("mode") == "handoff"]
        out = ["", "| client | hand-off p50 | p99 | max | p99 / p50 | hand-offs/s | waiters served |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for r in hs:
            h = r["handoff"]
            served = r.get("tasks_served", "-")
            ratio = f"{h['p99_us'] / h['p50_us']:.1f}" if h.get("p50_us") else "-"
            out.append(f"| {r['client']} | {us(h.get('p50_us'))} | {us(h.get('p99_us'))} | {us(h.get('max_us'))} | "
                       f"{ratio} | {r['per_second']:.0f} | {served} |")
        name = svg_ladder(f"Hand-off latency, 16 waiters, hold 5 ms — {kind}", hs, OUT / f"handoff-{kind}.svg")
        if name:
            out += ["", f"![hand-off latency on {kind}](bench/{name})"]
        return out

    lines += ["", "## Redis: uncontended acquire + release", "",
              "Fresh random keys; `redis-rs (raw)` is `SET NX PX` + `EVALSHA` compare-and-delete on one multiplexed "
              "connection, the commands a dlock Redis lease costs. `redis-benchmark` runs the same two commands."]
    lines += pairs_table("redis", "redis-rs (raw)", [1, 64],
                         ["dlock", "redis-rs (raw)", "redis-benchmark", "rslock (default retry)", "rslock (tuned retry)",
                          "node-redlock (default retry)", "node-redlock (retry 5ms)",
                          "redis-py Lock (default sleep 100ms)", "redis-py Lock (sleep 1ms)", "python-redis-lock"])
    lines += ["", "## Redis: hand-off with 16 waiters", "",
              "One key, 16 waiters; each holder holds 5 ms, releases, and steps aside until another has acquired. "
              "Latency is from the release call to the next holder's acquire returning."]
    lines += handoff_table("redis", True)
    for mode in PG_MODES:
        lines += ["", f"## PostgreSQL ({mode} mode): uncontended acquire + release", "",
                  "Ratios are to `pgbench` running exactly dlock's statements (scripts generated from the library's own statements by `dlock-pgbench-script`); "
                  "`tokio-postgres (raw)` and `pgbench (bare advisory lock)` run a bare "
                  "`pg_advisory_lock`/`pg_advisory_unlock`, without the fence and holder record."]
        lines += pairs_table(f"postgres-{mode}", "pgbench (dlock's SQL)", [1, 32],
                             ["dlock", "pgbench (dlock's SQL)", "tokio-postgres (raw)", "pgbench (bare advisory lock)"])
        lines += handoff_table(f"postgres-{mode}", True)
    for kind in ["file", "memory"]:
        lines += ["", f"## {kind}", ""]
        lines += pairs_table(kind, None, [1, 16], ["dlock"])
        lines += handoff_table(kind, True)
    held = [r for r in rows if r.get("mode") == "held"]
    if held:
        lines += ["", "## 10,000 leases held with automatic renewal", "",
                  "| backend | leases | lost | RSS | CPU (share of one core) | renewals/s |", "|---|---:|---:|---:|---:|---:|"]
        for r in held:
            lines.append(f"| {r['backend_kind']} | {r['leases_held']} | {r['leases_lost']} | {r['rss_mib']:.1f} MiB | "
                         f"{r['cpu_share_of_one_core'] * 100:.2f}% | {r['renewals_per_second']:.0f} |")
    cli = [r for r in rows if r.get("mode") == "cli"]
    if cli:
        lines += ["", "## CLI start-up: `dlock run` against `flock(1)` (hyperfine, 300 runs)", "",
                  "| command | mean | median | σ |", "|---|---:|---:|---:|"]
        for r in cli:
            lines.append(f"| `{r['client']}` | {r['mean_ms']:.2f} ms | {r['median_ms']:.2f} ms | {r['stddev_ms']:.2f} ms |")
    lines.append("")
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines))
    log("wrote docs/benchmarks.md")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 s per measurement, 5 s for held leases")
    p.add_argument("--skip-build", action="store_true")
    args = p.parse_args()
    results = Results(2 if args.quick else 10)
    results.held_seconds = 5 if args.quick else 60
    command = "python3 bench/compare.py" + (" --quick" if args.quick else "")
    for binary, package in [("redis-benchmark", "redis-tools"), ("pgbench", "postgresql-client"),
                            ("hyperfine", "hyperfine"), ("flock", "util-linux")]:
        need(binary, package)
    if not args.skip_build:
        build()
    with tempfile.TemporaryDirectory(prefix="dlock-compare-") as tmp:
        servers = Servers(tmp)
        try:
            rport = servers.redis()
            pport = servers.postgres()
            redis_url = f"redis://127.0.0.1:{rport}"
            pg_url = f"postgres://postgres@127.0.0.1:{pport}/postgres"
            # Redis
            for c in (1, 64):
                results.dlock("redis", redis_url, "uncontended", c)
                results.peer("redis", "raw-redis", redis_url, "uncontended", c)
                redis_benchmark(results, rport, c)
                results.peer("redis", "rslock", redis_url, "uncontended", c)
                results.peer("redis", "rslock-tuned", redis_url, "uncontended", c)
                results.node("redlock", redis_url, "uncontended", c)
                results.node("redlock-tuned", redis_url, "uncontended", c)
            for client in ("redis-py", "redis-py-tuned", "python-redis-lock"):
                results.python(client, redis_url, "uncontended", 1)
            results.dlock("redis", redis_url, "handoff", 16)
            for client in ("rslock", "rslock-tuned"):
                results.peer("redis", client, redis_url, "handoff", 16)
            for client in ("redlock", "redlock-tuned"):
                results.node(client, redis_url, "handoff", 16)
            for client in ("redis-py", "redis-py-tuned", "python-redis-lock"):
                results.python(client, redis_url, "handoff", 16)
            # PostgreSQL: pgbench runs exactly the statements dlock sends, the scripts
            # generated from the library's own SQL
            scripts = {m: subprocess.run([str(PGBENCH_SCRIPT), m], check=True, capture_output=True, text=True).stdout
                       for m in ("session", "lease", "bare")}
            for mode in PG_MODES:
                kind = f"postgres-{mode}"
                url = f"{pg_url}?mode={mode}"
                for c in (1, 32):
                    results.dlock(kind, url, "uncontended", c)
                    pgbench(results, pport, c, scripts[mode], kind, "pgbench (dlock's SQL)")
                    if mode == "session":
                        results.peer(kind, "raw-postgres", pg_url, "uncontended", c)
                        pgbench(results, pport, c, scripts["bare"], kind, "pgbench (bare advisory lock)")
                results.dlock(kind, url, "handoff", 16)
            # file and memory
            fdir = Path(tmp) / "locks"
            for kind, url in (("file", f"file://{fdir}"), ("memory", "memory://")):
                for c in (1, 16):
                    results.dlock(kind, url, "uncontended", c)
                results.dlock(kind, url, "handoff", 16)
            # 10,000 held leases
            for kind, url in (("memory", "memory://"), ("file", f"file://{fdir}"), ("redis", redis_url),
                              ("postgres-lease", f"{pg_url}?mode=lease")):
                results.dlock(kind, url, "held", 10000)
            hyperfine(results, tmp)
        finally:
            servers.stop()
    write_report(results, command)


if __name__ == "__main__":
    main()
