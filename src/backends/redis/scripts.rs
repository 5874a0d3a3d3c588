//! The Lua scripts of the Redis layout (SPEC §3). Each runs atomically on the server,
//! is sent by EVALSHA and re-sent by EVAL on NOSCRIPT (redis-rs [`redis::Script`]).
//!
//! Keys of one lock `K` (prefix included), all in the same cluster slot as `K` when `K`
//! has no `{` or `}` (a cluster names the side keys of other keys differently:
//! `KeyNames::in_slot`):
//! - `K`: the owner token, set with `SET K owner NX PX ttl` — the canonical lock;
//! - `{K}:fence`: the last fence handed out for `K`, expiring once the server clock has
//!   passed it by the lease TTL plus [`FENCE_MARGIN_MS`] (see [`KEEP_FENCE`]);
//! - `{K}:holder`: a hash with pid, host, times and fence, for `status`, expiring with `K`.
//!
//! Numbers above 2^47 lose digits when Lua turns them into strings with `%.14g`, so
//! every number written or returned goes through `string.format('%.0f', n)`.

use redis::Script;
use std::sync::LazyLock;

/// The fence floor: the server clock in microseconds. A fence is never below it, so a
/// counter lost or rolled back by a restart still yields fences above every earlier one
/// (see docs/backends/redis.md for the exact condition).
const FLOOR: &str = r"
local function fence_floor(fence_key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local current = tonumber(redis.call('GET', fence_key) or '0') or 0
  return current, now
end
";

/// How long, beyond the lease TTL, a fence counter outlives the moment the server clock
/// catches up with it.
pub const FENCE_MARGIN_MS: u64 = 60_000;

/// Sets the expiry of a fence counter that was just written with `fence`.
///
/// A fence is `max(counter + 1, clock µs)`, so forgetting the counter is harmless once
/// the server clock has passed the last fence: the floor alone then yields a larger one.
/// The counter can run ahead of this server's clock (several acquisitions within one
/// µs, a clock stepped back while the counter lived, a Redlock fence taken from a node
/// whose clock is ahead), so the expiry is anchored to the fence value, not to "now":
/// `PEXPIREAT ⌊fence / 1000⌋ + 1 + ttl + margin`. Redis expires a key only when its own
/// clock has reached the expiry time, so when the counter is gone the clock has passed
/// the last fence by at least ttl + margin, whatever it did in between. A fence can
/// then only go backwards if the clock is later set back by more than ttl + margin, the
/// same exposure as a counter lost in a restart (docs/backends/redis.md). The TTL is in
/// the horizon so that a counter never goes before the lease it was handed out with
/// would have expired unrenewed.
const KEEP_FENCE: &str = r"
local function keep_fence(fence_key, fence, extra_ms)
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local at = math.max(math.floor(tonumber(fence) / 1000) + 1, now_ms)
    + tonumber(extra_ms) + FENCE_MARGIN_MS
  redis.call('PEXPIREAT', fence_key, string.format('%.0f', at))
end
";

/// [`KEEP_FENCE`] with the margin filled in.
fn keep_fence() -> String {
    KEEP_FENCE.replace("FENCE_MARGIN_MS", &FENCE_MARGIN_MS.to_string())
}

/// KEYS: lock, fence, holder. ARGV: owner, ttl_ms, pid, host, now_ms.
/// Returns `{1, fence}` when taken (fence = max(counter + 1, clock µs), stored), else
/// `{0, pttl}`.
pub static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{FLOOR}{keep}
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local current, now = fence_floor(KEYS[2])
  local fence = string.format('%.0f', math.max(current + 1, now))
  redis.call('SET', KEYS[2], fence)
  keep_fence(KEYS[2], fence, ARGV[2])
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'owner', ARGV[1], 'fence', fence, 'pid', ARGV[3], 'host', ARGV[4],
    'acquired_ms', ARGV[5], 'renewed_ms', ARGV[5], 'ttl_ms', ARGV[2])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  return {{1, fence}}
end
return {{0, string.format('%.0f', redis.call('PTTL', KEYS[1]))}}
",
        keep = keep_fence()
    ))
});

/// Redlock, phase 1 on one node. KEYS: lock, fence, holder. ARGV: owner, ttl_ms, pid,
/// host, now_ms. Returns `{1, max(counter, clock µs)}` (nothing written to the counter:
/// phase 2 does that) when taken, else `{0, pttl}`.
pub static REDLOCK_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{FLOOR}
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local current, now = fence_floor(KEYS[2])
  local counter = string.format('%.0f', math.max(current, now))
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'owner', ARGV[1], 'pid', ARGV[3], 'host', ARGV[4],
    'acquired_ms', ARGV[5], 'renewed_ms', ARGV[5], 'ttl_ms', ARGV[2])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  return {{1, counter}}
end
return {{0, string.format('%.0f', redis.call('PTTL', KEYS[1]))}}
"
    ))
});

/// Redlock, phase 2 on one node: records the chosen fence if the owner still holds the
/// lock there. KEYS: lock, fence, holder. ARGV: owner, fence. Returns 1 or 0.
/// The counter's horizon uses the lock's remaining TTL, which phase 1 has just set.
pub static REDLOCK_COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{keep}
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local current = redis.call('GET', KEYS[2])
local kept = ARGV[2]
if (not current) or tonumber(current) < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
else
  kept = current
end
keep_fence(KEYS[2], kept, math.max(redis.call('PTTL', KEYS[1]), 0))
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'fence', ARGV[2])
end
return 1
",
        keep = keep_fence()
    ))
});

/// Compare-and-expire. KEYS: lock, holder. ARGV: owner, ttl_ms, now_ms. Returns 1 or 0.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if redis.call('HGET', KEYS[2], 'owner') == ARGV[1] then
    redis.call('HSET', KEYS[2], 'renewed_ms', ARGV[3], 'ttl_ms', ARGV[2])
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
  return 1
end
return 0
",
    )
});

/// Compare-and-delete, then a wake-up for waiters. KEYS: lock, holder. ARGV: owner,
/// channel, key (the message). Returns 1 or 0. `publish` is PUBLISH, or SPUBLISH in a
/// cluster, where the channel is in the lock's slot.
fn release(publish: &str) -> Script {
    Script::new(&format!(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('{publish}', ARGV[2], ARGV[3])
  return 1
end
return 0
"
    ))
}

/// Deletes the lock whoever holds it, and wakes waiters. KEYS: lock, holder.
/// ARGV: channel, key (the message). Returns 1 if the lock was held.
fn force_release(publish: &str) -> Script {
    Script::new(&format!(
        r"
local held = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('{publish}', ARGV[1], ARGV[2])
return held
"
    ))
}

/// [`release`] with PUBLISH.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| release("PUBLISH"));
/// [`release`] with SPUBLISH (sharded Pub/Sub, Redis 7+).
pub static RELEASE_SHARDED: LazyLock<Script> = LazyLock::new(|| release("SPUBLISH"));
/// [`force_release`] with PUBLISH.
pub static FORCE_RELEASE: LazyLock<Script> = LazyLock::new(|| force_release("PUBLISH"));
/// [`force_release`] with SPUBLISH.
pub static FORCE_RELEASE_SHARDED: LazyLock<Script> = LazyLock::new(|| force_release("SPUBLISH"));

/// Who holds the lock. KEYS: lock, holder. Returns nil when free (or when the key is
/// not a string, i.e. not a lock), else `{owner, pttl, {holder hash fields…}}`.
pub static INSPECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'string' then return false end
local owner = redis.call('GET', KEYS[1])
local pttl = string.format('%.0f', redis.call('PTTL', KEYS[1]))
return {owner, pttl, redis.call('HGETALL', KEYS[2])}
",
    )
});
