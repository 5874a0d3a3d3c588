#!/usr/bin/env bash
# Runs the whole dlock test suite. The backend tests start their own private servers
# (redis-server, Valkey, PostgreSQL, MariaDB, etcd, ZooKeeper, SecantusDB, dynalite,
# moto) from installed binaries; scripts/install-deps.sh installs what is missing.
#
# Every test binary runs (--no-fail-fast); the last line says how the run went:
#   dlock tests: PASSED (N test binaries)
#   dlock tests: FAILED: <the binaries that failed>[; left behind in /tmp: <entries>]
# and the exit status is cargo's (or 1 if only the leftover check failed).
#
# The tests run with TMPDIR set to a directory of their own, which must be empty at the
# end: a test that leaves a file or a server's data directory behind fails the run. New
# entries directly in /tmp named after dlock (from programs that ignore TMPDIR) fail it
# too, and so do the performance-data files of JVMs that ended. Extra arguments go to
# `cargo test` (e.g. `scripts/test.sh -- --test-threads=1`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

system_tmp="${TMPDIR:-/tmp}"
run_tmp="$(mktemp -d "$system_tmp/dlock-test-run.XXXXXX")"
# Servers that drop root for a user of their own (PostgreSQL runs as `postgres`) must be
# able to reach their directories inside it; mktemp makes it 0700.
chmod 0755 "$run_tmp"
log="$(mktemp "$system_tmp/dlock-test-log.XXXXXX")"
# The run's TMPDIR goes if it is empty, however the script ends.
trap 'rm -f "$log"; rmdir "$run_tmp" 2>/dev/null || true' EXIT

# The dlock entries in the system's temporary directory, one per line, bar those of
# test processes still running (dlock-<what>-<pid>-XXXXXX: another run, side by side).
# A JVM (the ZooKeeper servers) writes /tmp/hsperfdata_USER/PID whatever TMPDIR says
# and leaves it behind when killed: those of JVMs no longer running count too.
dlock_entries() {
  {
    find "$system_tmp" -mindepth 1 -maxdepth 1 -name 'dlock-*' \
      ! -name 'dlock-test-run.*' ! -name 'dlock-test-log.*' -printf '%f\n' |
      while read -r name; do
        pid="$(sed -nE 's/.*-([0-9]+)-[A-Za-z0-9]{6,}$/\1/p' <<<"$name")"
        [ -n "$pid" ] && [ -e "/proc/$pid" ] && continue
        echo "$name"
      done
    find /tmp -mindepth 2 -maxdepth 2 -path '/tmp/hsperfdata_*/*' -printf '%P\n' 2>/dev/null |
      while read -r name; do
        [ -e "/proc/${name##*/}" ] && continue
        echo "$name"
      done
  } | sort || true
}
before="$(dlock_entries)"

set +e
TMPDIR="$run_tmp" cargo test --workspace --all-features --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

binaries=$(grep -cE '^\s+(Running|Doc-tests) ' "$log" || true)
# cargo names the failed targets: "error: N targets failed:" then one "`--test x`" a
# line, or "error: test failed, to rerun pass `--test x`" for a single one.
failed=$(
  {
    sed -n '/targets failed:/,$p' "$log" | grep -oE '^\s+`[^`]+`' | sed -E 's/^\s+`([^`]+)`/\1/' || true
    grep -oE 'to rerun pass `[^`]+`' "$log" | sed -E 's/.*`([^`]+)`/\1/' || true
  } | sort -u | paste -sd ',' - | sed 's/,/, /g'
)
if [ "$status" -ne 0 ] && [ -z "$failed" ]; then
  failed="cargo test exited with status $status before naming a test binary"
fi

leftovers="$(find "$run_tmp" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | paste -sd ' ' -)"
new_in_tmp="$(comm -13 <(echo "$before") <(dlock_entries) | paste -sd ' ' -)"
if [ -n "$leftovers" ]; then
  echo "scripts/test.sh: the tests left these in $run_tmp (kept for a look):" >&2
  find "$run_tmp" -mindepth 1 -maxdepth 2 >&2
fi
[ -z "$new_in_tmp" ] || echo "scripts/test.sh: new in $system_tmp during the run: $new_in_tmp" >&2

left=""
[ -z "$leftovers" ] || left="$leftovers"
[ -z "$new_in_tmp" ] || left="${left:+$left }$new_in_tmp"
if [ "$status" -eq 0 ] && [ -z "$left" ]; then
  echo "dlock tests: PASSED ($binaries test binaries)"
  exit 0
fi
summary="dlock tests: FAILED:"
[ -z "$failed" ] || summary="$summary $failed"
if [ -n "$left" ]; then
  [ -z "$failed" ] || summary="$summary;"
  summary="$summary left behind in /tmp: $left"
fi
echo "$summary"
[ "$status" -ne 0 ] && exit "$status"
exit 1
