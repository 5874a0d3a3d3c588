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

if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

exec cargo test --workspace --all-features "$@"
