//! Shared locks and semaphores in the key's one document.
//!
//! Readers and permits live in the document's `leases` array, one entry per lease (its
//! owner, fence, expiry and holder record), beside `mode` (`"shared"` or `"semaphore"`)
//! and `permits`. A grant is one `findAndModify` whose filter states the kind's rule
//! over the entries that are live by the server's clock, and whose update pipeline drops
//! the expired entries, bumps the key's one fence counter and appends the new entry with
//! that fence. A dead holder's entry simply stops counting at its expiry.
//!
//! Writer starvation: write-preferring. A writer refused while readers hold the key
//! writes an `intent` (its owner and an expiry [`WRITER_INTENT`] ahead of the server's
//! clock), which new readers respect; it is rewritten at each of the writer's attempts,
//! which come well within its life, and cleared when the writer acquires or abandons.

use super::{int, live_expr, millis, now_ms, now_plus, Shared, GC_MARGIN};
use crate::core::backend::{LockInfo, LockKind};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use futures_util::StreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;
use std::future::IntoFuture;
use std::time::Duration;

/// How long a waiting writer's intent keeps new readers out after its last attempt.
pub(super) const WRITER_INTENT: Duration = Duration::from_secs(2);

/// The value stored in `mode` for a kind of several holders.
pub(super) fn mode_name(kind: LockKind) -> &'static str {
    match kind {
        LockKind::Semaphore { .. } => "semaphore",
        LockKind::Shared => "shared",
        _ => "exclusive",
    }
}

/// A string stored as given, even when it starts with `$` (which an expression would
/// take for a field path).
pub(super) fn literal(value: &str) -> Document {
    doc! { "$literal": value }
}

fn leases() -> Document {
    doc! { "$ifNull": [ "$leases", [] ] }
}

/// True while the entry bound to `$$l` has not expired.
fn lease_live() -> Document {
    doc! { "$gt": [ { "$toLong": "$$l.expires_at" }, now_ms() ] }
}

fn is_mine(owner: &Owner) -> Document {
    doc! { "$eq": [ "$$l.owner", literal(owner.as_str()) ] }
}

fn live_leases() -> Document {
    doc! { "$filter": { "input": leases(), "as": "l", "cond": lease_live() } }
}

fn live_count() -> Document {
    doc! { "$size": live_leases() }
}

/// True when no exclusive lease holds the document.
pub(super) fn exclusive_free() -> Document {
    doc! { "$or": [
        { "$eq": [ { "$ifNull": [ "$owner", Bson::Null ] }, Bson::Null ] },
        { "$not": [ live_expr() ] },
    ] }
}

/// True when no reader nor permit holds the document.
pub(super) fn no_live_leases() -> Document {
    doc! { "$eq": [ live_count(), 0_i64 ] }
}

/// True while an exclusive lease holds the document.
fn exclusive_live() -> Document {
    doc! { "$and": [
        { "$ne": [ { "$ifNull": [ "$owner", Bson::Null ] }, Bson::Null ] },
        live_expr(),
    ] }
}

fn intent_live() -> Document {
    doc! { "$gt": [ { "$ifNull": [ { "$toLong": "$intent.until" }, 0_i64 ] }, now_ms() ] }
}

/// True when `owner` has an entry in `leases` (live or not), or also a live one.
fn has_entry(owner: &Owner, live_only: bool) -> Document {
    let cond = if live_only {
        Bson::Document(doc! { "$and": [ is_mine(owner), lease_live() ] })
    } else {
        Bson::Document(is_mine(owner))
    };
    doc! { "$anyElementTrue": [ { "$map": { "input": leases(), "as": "l", "in": cond } } ] }
}

fn without(owner: &Owner) -> Document {
    doc! { "$filter": {
        "input": leases(),
        "as": "l",
        "cond": { "$ne": [ "$$l.owner", literal(owner.as_str()) ] },
    } }
}

/// The `intent` after `owner` acquired or abandoned: its own goes, another's stays.
pub(super) fn intent_without(owner: &Owner) -> Document {
    doc! { "$cond": [
        { "$eq": [ "$intent.owner", literal(owner.as_str()) ] },
        Bson::Null,
        "$intent",
    ] }
}

/// `gc_at` pushed to at least `ms` plus the margin from now: it follows the
/// longest-lived lease of the document.
fn gc_at_covering(ms: i64) -> Document {
    doc! { "$max": [
        { "$ifNull": [ "$gc_at", "$$NOW" ] },
        now_plus(ms.saturating_add(millis(GC_MARGIN))),
    ] }
}

/// The filter that admits a new lease of `kind` (shared or semaphore).
pub(super) fn admits(kind: LockKind) -> Document {
    let rule = match kind {
        LockKind::Semaphore { permits } => doc! { "$or": [
            no_live_leases(),
            { "$and": [
                { "$eq": [ "$mode", "semaphore" ] },
                { "$eq": [ "$permits", i64::from(permits) ] },
                { "$lt": [ live_count(), i64::from(permits) ] },
            ] },
        ] },
        _ => doc! { "$and": [
            { "$or": [ no_live_leases(), { "$eq": [ "$mode", "shared" ] } ] },
            { "$not": [ intent_live() ] },
        ] },
    };
    doc! { "$and": [ exclusive_free(), rule ] }
}

/// What a new reader or permit writes into the key's document: two stages, since the
/// entry's fence is the counter the first stage bumps.
pub(super) fn grant_pipeline(
    kind: LockKind,
    owner: &Owner,
    ttl_ms: i64,
    holder: &crate::core::backend::Holder,
) -> Vec<Document> {
    let permits = match kind {
        LockKind::Semaphore { permits } => Bson::Int64(i64::from(permits)),
        _ => Bson::Null,
    };
    let value = holder
        .value
        .as_deref()
        .map_or(Bson::Null, |v| Bson::Document(literal(v)));
    vec![
        doc! { "$set": {
            "fence": { "$max": [ { "$add": [ { "$ifNull": [ "$fence", 0_i64 ] }, 1_i64 ] }, now_ms() ] },
            "owner": Bson::Null,
            "mode": mode_name(kind),
            "permits": permits,
            "leases": live_leases(),
            "gc_at": gc_at_covering(ttl_ms),
        } },
        doc! { "$set": {
            "leases": { "$concatArrays": [ "$leases", [ {
                "owner": literal(owner.as_str()),
                "fence": "$fence",
                "expires_at": now_plus(ttl_ms),
                "acquired_at": "$$NOW",
                "renewed_at": "$$NOW",
                "ttl_ms": ttl_ms,
                "pid": i64::from(holder.pid),
                "host": literal(&holder.host),
                "value": value,
            } ] ] },
        } },
    ]
}

/// Extends `owner`'s entry; false if it is gone or expired.
pub(super) async fn renew(
    shared: &Shared,
    key: &Key,
    owner: &Owner,
    ttl: Duration,
) -> Result<bool> {
    let ms = millis(ttl);
    let filter = doc! { "_id": key.as_str(), "$expr": has_entry(owner, true) };
    let update = vec![doc! { "$set": {
        "leases": { "$map": {
            "input": leases(),
            "as": "l",
            "in": { "$cond": [
                is_mine(owner),
                { "$mergeObjects": [ "$$l", {
                    "expires_at": now_plus(ms),
                    "renewed_at": "$$NOW",
                    "ttl_ms": ms,
                } ] },
                "$$l",
            ] },
        } },
        "gc_at": gc_at_covering(ms),
    } }];
    let result = shared
        .bounded(
            "a renewal",
            shared.locks.update_one(filter, update).into_future(),
        )
        .await?;
    Ok(result.matched_count == 1)
}

/// Removes `owner`'s entry; true if it was still live. `freed` tells the waiters.
pub(super) async fn release(shared: &Shared, key: &Key, owner: &Owner) -> Result<bool> {
    let filter = doc! { "_id": key.as_str(), "$expr": has_entry(owner, false) };
    let update = vec![doc! { "$set": {
        "released_live": has_entry(owner, true),
        "leases": without(owner),
        "freed": "$$NOW",
    } }];
    let after = shared
        .bounded(
            "a release",
            shared
                .locks
                .find_one_and_update(filter, update)
                .return_document(ReturnDocument::After)
                .projection(doc! { "released_live": 1 })
                .into_future(),
        )
        .await?;
    Ok(after.is_some_and(|d| d.get_bool("released_live").unwrap_or(false)))
}

/// Frees whatever `owner` holds or asked for on `key`: its exclusive lease, its entry,
/// its intent.
pub(super) async fn abandon(shared: &Shared, key: &Key, owner: &Owner) -> Result<()> {
    let me = literal(owner.as_str());
    let filter = doc! { "_id": key.as_str(), "$expr": { "$or": [
        { "$eq": [ "$owner", me.clone() ] },
        has_entry(owner, false),
        { "$eq": [ "$intent.owner", me.clone() ] },
    ] } };
    let was_exclusive = doc! { "$eq": [ "$owner", me ] };
    let update = vec![doc! { "$set": {
        "owner": { "$cond": [ was_exclusive.clone(), Bson::Null, "$owner" ] },
        "expires_at": { "$cond": [ was_exclusive.clone(), "$$NOW", "$expires_at" ] },
        "gc_at": { "$cond": [ was_exclusive, now_plus(millis(GC_MARGIN)), "$gc_at" ] },
        "leases": without(owner),
        "intent": intent_without(owner),
        "freed": "$$NOW",
    } }];
    shared
        .bounded(
            "freeing an abandoned attempt",
            shared.locks.update_one(filter, update).into_future(),
        )
        .await
        .map(|_| ())
}

/// Breaks every lease of `key`, of any kind; true if one was live.
pub(super) async fn force_release(shared: &Shared, key: &Key) -> Result<bool> {
    let update = vec![doc! { "$set": {
        "released_live": { "$or": [ exclusive_live(), { "$gt": [ live_count(), 0_i64 ] } ] },
        "owner": Bson::Null,
        "expires_at": "$$NOW",
        "leases": [],
        "freed": "$$NOW",
        "gc_at": now_plus(millis(GC_MARGIN)),
    } }];
    let after = shared
        .bounded(
            "breaking a lock",
            shared
                .locks
                .find_one_and_update(doc! { "_id": key.as_str() }, update)
                .return_document(ReturnDocument::After)
                .projection(doc! { "released_live": 1 })
                .into_future(),
        )
        .await?;
    Ok(after.is_some_and(|d| d.get_bool("released_live").unwrap_or(false)))
}

/// Makes `owner`'s intent the key's: new readers wait until it lapses or goes.
pub(super) async fn write_intent(shared: &Shared, key: &Key, owner: &Owner) -> Result<()> {
    let update = vec![doc! { "$set": {
        "intent": { "owner": literal(owner.as_str()), "until": now_plus(millis(WRITER_INTENT)) },
    } }];
    shared
        .bounded(
            "recording a waiting writer",
            shared
                .locks
                .update_one(doc! { "_id": key.as_str() }, update)
                .into_future(),
        )
        .await
        .map(|_| ())
}

/// A key's document as a refused request sees it, in the server's milliseconds.
#[derive(Debug, Default)]
pub(super) struct State {
    now: i64,
    /// The exclusive holder's expiry, if the document has an owner.
    owner_end: Option<i64>,
    mode: Option<String>,
    permits: Option<i64>,
    /// The expiries of the live entries.
    lease_ends: Vec<i64>,
    intent_end: Option<i64>,
}

/// Reads the key's [`State`]; `None` if the document is gone.
pub(super) async fn state(shared: &Shared, key: &Key) -> Result<Option<State>> {
    let pipeline = [
        doc! { "$match": { "_id": key.as_str() } },
        doc! { "$project": {
            "now": now_ms(),
            "owner": 1,
            "owner_end": { "$toLong": "$expires_at" },
            "mode": 1,
            "permits": 1,
            "lease_ends": { "$map": {
                "input": live_leases(),
                "as": "l",
                "in": { "$toLong": "$$l.expires_at" },
            } },
            "intent_end": { "$toLong": "$intent.until" },
        } },
    ];
    let found = shared
        .bounded("reading the lock", async {
            let mut cursor = shared.locks.aggregate(pipeline).await?;
            cursor.next().await.transpose()
        })
        .await?;
    Ok(found.map(|d| State {
        now: int(&d, "now").unwrap_or(0),
        owner_end: match d.get("owner") {
            Some(Bson::String(_)) => int(&d, "owner_end"),
            _ => None,
        },
        mode: d.get_str("mode").ok().map(str::to_owned),
        permits: int(&d, "permits"),
        lease_ends: match d.get("lease_ends") {
            Some(Bson::Array(ends)) => ends
                .iter()
                .filter_map(|e| match e {
                    Bson::Int64(v) => Some(*v),
                    Bson::Int32(v) => Some(i64::from(*v)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        },
        intent_end: int(&d, "intent_end"),
    }))
}

/// Why the key refuses a request of `asked`, as the engine wants it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Wait: the blocking lease (or intent) ends within this unless renewed.
    Held(Duration),
    /// Readers hold the key and the asking writer must leave its intent.
    Readers(Duration),
}

impl State {
    fn left(&self, end: i64) -> Duration {
        Duration::from_millis(u64::try_from(end.saturating_sub(self.now)).unwrap_or(0))
    }

    /// Why `asked` is refused, or the error that waiting cannot cure.
    pub(super) fn refusal(&self, asked: LockKind, key: &Key, describe: &str) -> Result<Refusal> {
        let mixed = |held: &str| {
            Error::backend(
                describe,
                format!(
                    "key {:?} is held as {held}, and was asked for as {}: a key is either a lock or a semaphore",
                    key.as_str(),
                    article(mode_name(asked)),
                ),
            )
        };
        if let Some(end) = self.owner_end.filter(|end| *end > self.now) {
            if matches!(asked, LockKind::Semaphore { .. }) {
                return Err(mixed("an exclusive lock"));
            }
            return Ok(Refusal::Held(self.left(end)));
        }
        if let Some(end) = self.lease_ends.iter().copied().min() {
            let semaphore = self.mode.as_deref() == Some("semaphore");
            match asked {
                LockKind::Semaphore { permits } if semaphore => {
                    let held_with = self
                        .permits
                        .and_then(|p| u32::try_from(p).ok())
                        .unwrap_or(0);
                    if held_with != permits {
                        return Err(Error::PermitMismatch {
                            key: key.to_string(),
                            backend: describe.to_owned(),
                            held_with,
                            asked: permits,
                        });
                    }
                }
                LockKind::Semaphore { .. } => return Err(mixed("a shared lock")),
                _ if semaphore => return Err(mixed("a semaphore")),
                LockKind::Exclusive => return Ok(Refusal::Readers(self.left(end))),
                _ => {}
            }
            return Ok(Refusal::Held(self.left(end)));
        }
        if asked == LockKind::Shared {
            if let Some(end) = self.intent_end.filter(|end| *end > self.now) {
                return Ok(Refusal::Held(self.left(end)));
            }
        }
        // Freed between the attempt and this read: try again at once.
        Ok(Refusal::Held(Duration::ZERO))
    }
}

fn article(mode: &str) -> &'static str {
    match mode {
        "semaphore" => "a semaphore",
        "shared" => "a shared lock",
        _ => "an exclusive lock",
    }
}

/// The fence of `owner`'s entry, read back after a grant the server did not answer
/// with a document.
pub(super) async fn own_fence(shared: &Shared, key: &Key, owner: &Owner) -> Result<Option<u64>> {
    let found = shared
        .bounded(
            "reading the lock",
            shared
                .locks
                .find_one(doc! { "_id": key.as_str() })
                .into_future(),
        )
        .await?;
    let Some(d) = found else { return Ok(None) };
    let Ok(entries) = d.get_array("leases") else {
        return Ok(None);
    };
    Ok(entries.iter().find_map(|e| match e {
        Bson::Document(e) if e.get_str("owner").ok() == Some(owner.as_str()) => {
            int(e, "fence").and_then(|f| u64::try_from(f).ok())
        }
        _ => None,
    }))
}

/// The aggregation stages that add `exclusive_live` and `live_leases` to each document.
pub(super) fn view_stage() -> Document {
    doc! { "$addFields": { "exclusive_live": exclusive_live(), "live_leases": live_leases() } }
}

/// The `$match` of the documents some lease holds.
pub(super) fn held_match() -> Document {
    doc! { "$match": { "$expr": { "$or": [ exclusive_live(), { "$gt": [ live_count(), 0_i64 ] } ] } } }
}

/// A document seen through [`view_stage`] as `status` shows it.
pub(super) fn info_of_view(d: &Document) -> Option<LockInfo> {
    if d.get_bool("exclusive_live").unwrap_or(false) {
        return Some(super::info_of(d));
    }
    let entries = d.get_array("live_leases").ok()?;
    let key = d.get_str("_id").ok()?;
    let mut holders: Vec<LockInfo> = entries
        .iter()
        .filter_map(|e| match e {
            Bson::Document(e) => {
                let mut info = super::info_of(e);
                info.key = key.to_owned();
                Some(info)
            }
            _ => None,
        })
        .collect();
    if holders.is_empty() {
        return None;
    }
    holders.sort_by_key(|h| h.fence);
    let kind = match d.get_str("mode") {
        Ok("semaphore") => LockKind::Semaphore {
            permits: int(d, "permits")
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
        },
        _ => LockKind::Shared,
    };
    Some(LockInfo::of_holders(key, kind, holders))
}
