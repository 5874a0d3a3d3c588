#!/usr/bin/env bash
# Runs the whole dlock test suite. The backend tests start their own private servers
# (redis-server, Valkey, PostgreSQL, MariaDB, etcd, ZooKeeper, SecantusDB, dynalite,
# moto) from installed binaries; scripts/install-deps.sh installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo test --workspace --all-features "$@"
