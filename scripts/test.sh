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

# The DynamoDB backend is tested against dynalite (npm) and moto's server (PyPI), each
# installed once into the test cache and reused by every run (the test kit installs them
# too when they are missing; see testkit/src/servers/dynamodb.rs). DynamoDB Local is a
# download from AWS and cannot be installed from a package registry.
missing=()
have node || missing+=(nodejs)
have npm || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
dynalite_version=4.0.0
moto_version=5.2.5
dynalite_dir="$cache/dynalite-$dynalite_version"
if [ ! -f "$dynalite_dir/.installed" ]; then
  echo "test.sh: installing dynalite $dynalite_version into $dynalite_dir" >&2
  rm -rf "$dynalite_dir"
  mkdir -p "$dynalite_dir"
  npm install --prefix "$dynalite_dir" --no-audit --no-fund --silent "dynalite@$dynalite_version"
  touch "$dynalite_dir/.installed"
fi
moto_dir="$cache/moto-$moto_version"
if [ ! -f "$moto_dir/.installed" ]; then
  echo "test.sh: installing moto[server] $moto_version into $moto_dir" >&2
  rm -rf "$moto_dir"
  python3 -m venv "$moto_dir"
  "$moto_dir/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$moto_version"
  touch "$moto_dir/.installed"
fi

exec cargo test --workspace --all-features "$@"
