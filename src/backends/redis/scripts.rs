//! The Lua scripts of the Redis layout (SPEC §3). Each runs atomically on the server,
//! is sent by EVALSHA and re-sent by EVAL on NOSCRIPT (redis-rs [`redis::Script`]).
//!
//! Keys of one lock `K` (prefix included), all in the same cluster slot as `K` when `K`
//! has no `{` or `}` (a cluster names the side keys of other keys differently:
//! `KeyNames::in_slot`):
//! - `K`: the owner token, set with `SET K owner NX PX ttl` — the canonical lock;
//! - `{K}:fence`: the last fence handed out for `K`, expiring once the server clock has
//!   passed it by the lease TTL plus [`FENCE_MARGIN_MS`] (see [`KEEP_FENCE`]);
//! - `{K}:holder`: a hash with pid, host, times, fence and value, for `status`, expiring
//!   with `K`;
//! - `{K}:leases`: the reader or permit leases, a sorted set of owner tokens scored by
//!   their expiry (server clock, ms), expiring with its last member;
//! - `{K}:records`: a hash beside it, `.mode` (`shared` or `semaphore`), `.permits`, and
//!   one JSON record per lease (fence, pid, host, value, times, slot);
//! - `{K}:intents`: the waiting writers, a sorted set of owner tokens scored by when
//!   their intent lapses, expiring with the latest.
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
  return current, now, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
///
/// `set_fence` writes the counter and its expiry in one call (each `redis.call` costs
/// the server a few µs): `PX` the same moment less the clock just read, plus 1 ms for
/// the time the script has run since (Redis measures `PX` from the script's start).
const KEEP_FENCE: &str = r"
local function fence_expiry(fence, extra_ms, now_ms)
  return math.max(math.floor(tonumber(fence) / 1000) + 1, now_ms)
    + tonumber(extra_ms) + FENCE_MARGIN_MS
end
local function keep_fence(fence_key, fence, extra_ms, now_ms)
  if not now_ms then
    local t = redis.call('TIME')
    now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  redis.call('PEXPIREAT', fence_key, string.format('%.0f', fence_expiry(fence, extra_ms, now_ms)))
end
local function set_fence(fence_key, fence, extra_ms, now_ms)
  local px = fence_expiry(fence, extra_ms, now_ms) - now_ms + 1
  redis.call('SET', fence_key, fence, 'PX', string.format('%.0f', px))
end
";

/// [`KEEP_FENCE`] with the margin filled in.
fn keep_fence() -> String {
    KEEP_FENCE.replace("FENCE_MARGIN_MS", &FENCE_MARGIN_MS.to_string())
}

/// Helpers of the scripts that know the lock kinds: the server clock in ms, number
/// formatting that keeps every digit, and the pruning of expired reader/permit leases.
const KINDS: &str = r"
local function fmt(n) return string.format('%.0f', n) end
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function prune(leases, records, now)
  local gone = redis.call('ZRANGEBYSCORE', leases, '-inf', fmt(now))
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', fmt(now))
    for i = 1, #gone do redis.call('HDEL', records, gone[i]) end
  end
  return redis.call('ZCARD', leases)
end
local function first_expiry(leases, now)
  local first = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
  if #first < 2 then return 0 end
  return math.max(tonumber(first[2]) - now, 0)
end
local function expire_with_last(leases, records)
  local last = redis.call('ZRANGE', leases, -1, -1, 'WITHSCORES')
  if #last == 2 then
    redis.call('PEXPIREAT', leases, last[2])
    redis.call('PEXPIREAT', records, last[2])
  end
end
";

/// How often a waiter tries again while the key is held by a client that is not dlock
/// (redis-py's `Lock`, node-redlock, a bare `SET NX PX`): such a holder publishes nothing
/// when it lets go, so polling is the only wake-up. A dlock holder's release publishes.
pub const FOREIGN_POLL_MS: u64 = 5;

/// How long a refused writer's intent keeps new readers out after its last attempt.
pub const WRITER_INTENT_MS: u64 = 2_000;

/// One attempt of any kind, on one node.
///
/// KEYS: lock, fence, holder, leases, records, intents. ARGV: owner, ttl_ms, pid, host,
/// requested_ms, kind (`x` exclusive, `s` shared, `p` semaphore), permits, value,
/// has_value (`1`/`0`), intent_ms, first slot to try, redlock (`1`: phase 1 of Redlock,
/// which returns `max(counter, clock µs)` and writes no counter).
///
/// Returns `{1, fence, slot}` when taken, `{0, ms until a retry may succeed (-1: the
/// holder has no expiry; at most [`FOREIGN_POLL_MS`] behind a holder that is not
/// dlock's), 0}` when held, `{2, held_with, 0}` when the key's permits were taken with
/// another count.
///
/// An exclusive request is refused while live reader/permit leases exist, and leaves an
/// intent (member of `intents`, expiring `intent_ms` later) that keeps new readers out.
/// A semaphore lease takes a slot `0..permits` free on this node, trying the slots from
/// the given one: the count is bounded by the slots, which is what keeps Redlock, where a
/// holder is on a majority and not on every node, from over-admitting.
pub static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{FLOOR}{keep}{KINDS}
local owner, ttl = ARGV[1], ARGV[2]
local redlock = ARGV[12] == '1'
-- When to try again behind the holder of KEYS[1], whose PTTL is `pttl`: at its expiry
-- if it is dlock's (its release publishes), soon if no holder record names it.
local function retry_in(pttl)
  if redis.call('HGET', KEYS[3], 'owner') ~= redis.call('GET', KEYS[1]) then
    if pttl < 0 or pttl > {FOREIGN_POLL_MS} then return {FOREIGN_POLL_MS} end
  end
  return pttl
end
local function take_fence()
  local current, now, now_ms = fence_floor(KEYS[2])
  if redlock then return fmt(math.max(current, now)) end
  local fence = fmt(math.max(current + 1, now))
  set_fence(KEYS[2], fence, ttl, now_ms)
  return fence
end
if ARGV[6] == 'x' then
  if redis.call('EXISTS', KEYS[4]) == 1 then
    local now = server_ms()
    if prune(KEYS[4], KEYS[5], now) > 0 then
      local intent = tonumber(ARGV[10])
      redis.call('ZADD', KEYS[6], fmt(now + intent), owner)
      redis.call('PEXPIRE', KEYS[6], ARGV[10])
      return {{0, fmt(math.min(first_expiry(KEYS[4], now), math.floor(intent / 3))), 0}}
    end
  end
  if redis.call('SET', KEYS[1], owner, 'NX', 'PX', ttl) then
    local fence = take_fence()
    -- One HSET of every field: each redis.call costs server time.
    local fields = {{'owner', owner, 'pid', ARGV[3], 'host', ARGV[4],
      'acquired_ms', ARGV[5], 'renewed_ms', ARGV[5], 'ttl_ms', ttl}}
    if not redlock then fields[#fields + 1] = 'fence'; fields[#fields + 1] = fence end
    if ARGV[9] == '1' then fields[#fields + 1] = 'value'; fields[#fields + 1] = ARGV[8] end
    -- HSET answers how many fields it added: fewer than it wrote when a record was
    -- there already, left by a holder whose key went without it (a client that is not
    -- dlock deleted the key, say). Its other fields (a value, a fence) are not this
    -- holder's: start the record again.
    if redis.call('HSET', KEYS[3], unpack(fields)) < #fields / 2 then
      redis.call('DEL', KEYS[3])
      redis.call('HSET', KEYS[3], unpack(fields))
    end
    redis.call('PEXPIRE', KEYS[3], ttl)
    redis.call('ZREM', KEYS[6], owner)
    return {{1, fence, 0}}
  end
  return {{0, fmt(retry_in(redis.call('PTTL', KEYS[1]))), 0}}
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then return {{0, fmt(retry_in(pttl)), 0}} end
local now = server_ms()
local shared = ARGV[6] == 's'
local permits = tonumber(ARGV[7])
-- A retry with the same owner token replaces what its earlier attempt took.
if redis.call('ZREM', KEYS[4], owner) == 1 then redis.call('HDEL', KEYS[5], owner) end
local live = prune(KEYS[4], KEYS[5], now)
if live > 0 then
  local mode = redis.call('HGET', KEYS[5], '.mode')
  if shared and mode ~= 'shared' then return {{0, fmt(first_expiry(KEYS[4], now)), 0}} end
  if not shared then
    if mode ~= 'semaphore' then return {{0, fmt(first_expiry(KEYS[4], now)), 0}} end
    local held_with = tonumber(redis.call('HGET', KEYS[5], '.permits') or '0')
    if held_with ~= permits then return {{2, fmt(held_with), 0}} end
    if live >= permits then return {{0, fmt(first_expiry(KEYS[4], now)), 0}} end
  end
end
local slot = 0
if shared then
  if redis.call('EXISTS', KEYS[6]) == 1 then
    redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', fmt(now))
    local first = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
    if #first == 2 then return {{0, fmt(math.max(tonumber(first[2]) - now, 1)), 0}} end
  end
else
  local used = {{}}
  if live > 0 then
    local all = redis.call('HGETALL', KEYS[5])
    for i = 1, #all, 2 do
      if string.sub(all[i], 1, 1) ~= '.' then
        local ok, rec = pcall(cjson.decode, all[i + 1])
        if ok and type(rec) == 'table' and rec.slot then used[tonumber(rec.slot)] = true end
      end
    end
  end
  slot = -1
  local start = tonumber(ARGV[11]) % permits
  for j = 0, permits - 1 do
    local i = (start + j) % permits
    if not used[i] then slot = i; break end
  end
  if slot < 0 then return {{0, fmt(first_expiry(KEYS[4], now)), 0}} end
end
local fence = take_fence()
redis.call('ZADD', KEYS[4], fmt(now + tonumber(ttl)), owner)
local rec = {{pid = ARGV[3], host = ARGV[4], acquired_ms = ARGV[5], renewed_ms = ARGV[5],
  ttl_ms = ttl, slot = slot}}
if not redlock then rec.fence = fence end
if ARGV[9] == '1' then rec.value = ARGV[8] end
redis.call('HSET', KEYS[5], owner, cjson.encode(rec), '.mode', shared and 'shared' or 'semaphore',
  '.permits', ARGV[7])
expire_with_last(KEYS[4], KEYS[5])
return {{1, fence, slot}}
",
        keep = keep_fence()
    ))
});

/// Redlock, phase 2 on one node: records the chosen fence if the owner still holds its
/// lease there. KEYS: lock, fence, holder, leases, records. ARGV: owner, fence, kind
/// (`x` for an exclusive lease, else a reader or permit). Returns 1 or 0.
/// The counter's horizon uses the lease's remaining TTL, which phase 1 has just set.
pub static REDLOCK_COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{keep}{KINDS}
local left
if ARGV[3] == 'x' then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
  left = math.max(redis.call('PTTL', KEYS[1]), 0)
else
  local score = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if not score then return 0 end
  left = tonumber(score) - server_ms()
  if left <= 0 then return 0 end
end
local current = redis.call('GET', KEYS[2])
local kept = ARGV[2]
if (not current) or tonumber(current) < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
else
  kept = current
end
keep_fence(KEYS[2], kept, left)
if ARGV[3] == 'x' then
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('HSET', KEYS[3], 'fence', ARGV[2])
  end
else
  local raw = redis.call('HGET', KEYS[5], ARGV[1])
  if raw then
    local rec = cjson.decode(raw)
    rec.fence = ARGV[2]
    redis.call('HSET', KEYS[5], ARGV[1], cjson.encode(rec))
  end
end
return 1
",
        keep = keep_fence()
    ))
});

/// Compare-and-expire of exclusive leases, any number in one call (the renewals that
/// fall due together on one server; a cluster sends one lease per call, since its keys
/// are in different slots). KEYS: lock and holder of each lease, in pairs. ARGV: now_ms,
/// then owner and ttl_ms of each lease, in the same order. Returns one 1 (extended) or 0
/// (not this owner's any more) per lease. Each lease is checked on its own, exactly as a
/// call for it alone would check it.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = ARGV[1]
local renewed = {}
for i = 1, #KEYS / 2 do
  local lock, holder = KEYS[2 * i - 1], KEYS[2 * i]
  local owner, ttl = ARGV[2 * i], ARGV[2 * i + 1]
  if redis.call('GET', lock) == owner then
    redis.call('PEXPIRE', lock, ttl)
    if redis.call('HGET', holder, 'owner') == owner then
      redis.call('HSET', holder, 'renewed_ms', now, 'ttl_ms', ttl)
      redis.call('PEXPIRE', holder, ttl)
    end
    renewed[i] = 1
  else
    renewed[i] = 0
  end
end
return renewed
",
    )
});

/// Renewal of one reader or permit lease, touching only its own member and record.
/// KEYS: leases, records. ARGV: owner, ttl_ms, now_ms. Returns 1 or 0 (gone or expired).
pub static RENEW_SHARED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{KINDS}
local now = server_ms()
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not score) or tonumber(score) <= now then return 0 end
redis.call('ZADD', KEYS[1], 'XX', fmt(now + tonumber(ARGV[2])), ARGV[1])
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if raw then
  local rec = cjson.decode(raw)
  rec.renewed_ms = ARGV[3]
  rec.ttl_ms = ARGV[2]
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(rec))
end
expire_with_last(KEYS[1], KEYS[2])
return 1
"
    ))
});

/// Release of whatever `owner` holds on the key (an exclusive lease, or a reader or
/// permit lease) and of its writer intent, then a wake-up for waiters of every kind.
/// Also the cleanup of an abandoned attempt, which does not know what it took.
/// KEYS: lock, holder, leases, records, intents. ARGV: owner, channel, key (the
/// message), keep_intent (`1`: leave the owner's writer intent in place). Returns 1 if a
/// live lease was released, else 0. `publish` is PUBLISH, or
/// SPUBLISH in a cluster, where the channel is in the lock's slot.
fn release(publish: &str) -> Script {
    Script::new(&format!(
        r"{KINDS}
local done, changed = 0, false
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  done, changed = 1, true
elseif redis.call('EXISTS', KEYS[3]) == 1 then
  local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if score then
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
    if tonumber(score) > server_ms() then done = 1 end
    changed = true
    if redis.call('ZCARD', KEYS[3]) == 0 then redis.call('DEL', KEYS[3], KEYS[4]) end
  end
end
-- A live lease leaves no intent behind (a writer's went at its grant; readers and
-- permits make none): only an abandoned or lapsed attempt can have one.
if done == 0 and ARGV[4] ~= '1' and redis.call('ZREM', KEYS[5], ARGV[1]) == 1 then
  changed = true
end
if changed then redis.call('{publish}', ARGV[2], ARGV[3]) end
return done
"
    ))
}

/// Breaks every lease of the key (the writer, every reader, every permit) and the
/// writers' intents, and wakes waiters. KEYS: lock, holder, leases, records, intents.
/// ARGV: channel, key (the message). Returns 1 if a live lease was there.
fn force_release(publish: &str) -> Script {
    Script::new(&format!(
        r"{KINDS}
local held = redis.call('DEL', KEYS[1])
local live = redis.call('ZCOUNT', KEYS[3], '(' .. fmt(server_ms()), '+inf')
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('{publish}', ARGV[1], ARGV[2])
if held > 0 or live > 0 then return 1 end
return 0
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

/// Who holds the lock. KEYS: lock, holder, leases, records. Returns nil when free (or
/// when the lock key is neither a string nor absent, i.e. not a lock), else
/// `{'exclusive', owner, pttl, {holder hash fields…}}` for an exclusive lock, or
/// `{mode, permits, '', {owner, pttl, record, …}}` for the live readers or permits.
pub static INSPECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{KINDS}
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  local owner = redis.call('GET', KEYS[1])
  return {{'exclusive', owner, fmt(redis.call('PTTL', KEYS[1])), redis.call('HGETALL', KEYS[2])}}
end
if kind ~= 'none' then return false end
local now = server_ms()
local live = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. fmt(now), '+inf', 'WITHSCORES')
if #live == 0 then return false end
local holders = {{}}
for i = 1, #live, 2 do
  holders[#holders + 1] = live[i]
  holders[#holders + 1] = fmt(tonumber(live[i + 1]) - now)
  holders[#holders + 1] = redis.call('HGET', KEYS[4], live[i]) or ''
end
local mode = redis.call('HGET', KEYS[4], '.mode') or 'shared'
local permits = redis.call('HGET', KEYS[4], '.permits') or '0'
return {{mode, permits, '', holders}}
"
    ))
});
