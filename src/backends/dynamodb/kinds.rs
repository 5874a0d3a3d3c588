//! Shared locks and semaphores in the key's one item.
//!
//! Readers and permits are entries of the item's `leases` map, keyed by owner token,
//! each with a record version of its own (`rvn`) that its holder rewrites at every
//! renewal, beside `mode` and `permits`. With no server clock, an entry is timed as the
//! exclusive holder is: an entry whose version this process has seen unchanged for its
//! whole lease belongs to a dead holder, and is removed by a write conditioned on that
//! version (which fails if the holder renewed meanwhile).
//!
//! A grant reads the item, decides by the kind's rule, and writes the new entry with
//! the condition that the fence is still the one read: every grant of every kind bumps
//! the fence, so the count of entries the decision was based on cannot have grown. The
//! entry's fence is that bumped value.
//!
//! Writer starvation: write-preferring. A writer refused by readers writes an `intent`
//! (its owner and a fresh version) at each attempt, which come within a third of
//! [`WRITER_INTENT`]; new readers are refused while it is there, and remove it only once
//! they have seen its version unchanged for [`WRITER_INTENT`] (its writer stopped
//! trying). The writer's grant removes it.

use super::{millis, n, new_rvn, number, s, wall_ms, Failure, Observations, Shared, FENCE, OWNER};
use crate::core::backend::{AcquireRequest, Attempt, Granted, HeldLease, LockInfo, LockKind};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

pub(super) const LEASES: &str = "leases";
const MODE: &str = "mode";
const PERMITS: &str = "permits";
pub(super) const INTENT: &str = "intent";
const RVN: &str = "rvn";

/// How long a waiting writer's intent keeps new readers out after its last attempt.
pub(super) const WRITER_INTENT: Duration = Duration::from_secs(2);

/// How many times one attempt re-reads after a write lost a race or removed a dead entry.
const ROUNDS: usize = 4;

type Item = HashMap<String, AttributeValue>;

/// One reader or permit as read from the item.
struct Entry {
    owner: String,
    rvn: String,
    lease: Duration,
    fields: HashMap<String, AttributeValue>,
}

fn entries(item: &Item) -> Vec<Entry> {
    let Some(Ok(map)) = item.get(LEASES).map(AttributeValue::as_m) else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(owner, v)| {
            let fields = v.as_m().ok()?;
            Some(Entry {
                owner: owner.clone(),
                rvn: fields.get(RVN)?.as_s().ok()?.clone(),
                lease: number(fields, super::TTL_MS)
                    .map(Duration::from_millis)
                    .unwrap_or(super::FALLBACK_LEASE),
                fields: fields.clone(),
            })
        })
        .collect()
}

fn entry_name(key: &Key, owner: &str) -> String {
    format!("{}\u{0}lease\u{0}{owner}", key.as_str())
}

fn intent_name(key: &Key) -> String {
    format!("{}\u{0}intent", key.as_str())
}

fn str_of<'a>(item: &'a Item, name: &str) -> Option<&'a String> {
    item.get(name)?.as_s().ok()
}

fn mixed(describe: &str, key: &Key, held: &str, asked: LockKind) -> Error {
    let asked = match asked {
        LockKind::Semaphore { .. } => "a semaphore",
        LockKind::Shared => "a shared lock",
        _ => "an exclusive lock",
    };
    Error::backend(
        describe,
        format!(
            "key {:?} is held as {held}, and was asked for as {asked}: a key is either a lock or a semaphore",
            key.as_str()
        ),
    )
}

/// The entries of `item` that this process has seen unchanged for a whole lease, and
/// how long the soonest of the others still has by this process's reckoning.
fn sort_entries(
    shared: &Shared,
    key: &Key,
    item: &Item,
    seen_at: Instant,
) -> (Vec<Entry>, Vec<Entry>, Option<Duration>) {
    let mut dead = Vec::new();
    let mut live = Vec::new();
    let mut soonest: Option<Duration> = None;
    for entry in entries(item) {
        let sighting = Observations::note_name(
            &shared.scope,
            &entry_name(key, &entry.owner),
            &entry.rvn,
            entry.lease,
            seen_at,
        );
        let left = sighting.lease.saturating_sub(sighting.first_seen.elapsed());
        if left.is_zero() {
            dead.push(entry);
        } else {
            soonest = Some(soonest.map_or(left, |s| s.min(left)));
            live.push(entry);
        }
    }
    (dead, live, soonest)
}

/// Removes entries of dead holders, each only if still in the version seen.
async fn remove_dead(shared: &Shared, key: &Key, dead: &[Entry]) -> Result<()> {
    for entry in dead {
        let update = shared
            .client
            .update_item()
            .table_name(&shared.settings.table)
            .key(super::KEY, s(key.as_str()))
            .update_expression("REMOVE #leases.#who")
            .condition_expression("#leases.#who.#rvn = :seen")
            .expression_attribute_names("#leases", LEASES)
            .expression_attribute_names("#who", &entry.owner)
            .expression_attribute_names("#rvn", RVN)
            .expression_attribute_values(":seen", s(&entry.rvn));
        match shared
            .call("removing a dead holder's entry", update.send())
            .await
        {
            Ok(_) | Err(Failure::Condition) => {}
            Err(Failure::Other(err, _)) => return Err(err),
        }
    }
    Ok(())
}

/// Removes the key's intent if its `field` (`rvn` or `owner`) is still `value`.
async fn remove_intent(shared: &Shared, key: &Key, field: &str, value: &str) -> Result<()> {
    let update = shared
        .client
        .update_item()
        .table_name(&shared.settings.table)
        .key(super::KEY, s(key.as_str()))
        .update_expression("REMOVE #intent")
        .condition_expression("#intent.#f = :v")
        .expression_attribute_names("#intent", INTENT)
        .expression_attribute_names("#f", field)
        .expression_attribute_values(":v", s(value));
    match shared
        .call("removing a writer's intent", update.send())
        .await
    {
        Ok(_) | Err(Failure::Condition) => Ok(()),
        Err(Failure::Other(err, _)) => Err(err),
    }
}

/// Takes a reader's or a permit's lease on `request.key`.
pub(super) async fn try_acquire(
    shared: &Arc<Shared>,
    request: &AcquireRequest<'_>,
) -> Result<Attempt> {
    let describe = shared.settings.describe.as_str();
    let sent_at = Instant::now();
    if let Some((fence, rvn)) = quick_grant(shared, request).await? {
        return Ok(granted(shared, request, sent_at, fence, rvn));
    }
    for _ in 0..ROUNDS {
        let item = shared.read(request.key).await?.unwrap_or_default();
        let seen_at = Instant::now();
        if let Some(holder) = super::holder_of(&item) {
            if matches!(request.kind, LockKind::Semaphore { .. }) {
                return Err(mixed(
                    describe,
                    request.key,
                    "an exclusive lock",
                    request.kind,
                ));
            }
            let sighting = Observations::note(
                &shared.scope,
                request.key,
                &holder.rvn,
                holder.lease,
                seen_at,
            );
            let left = sighting.lease.saturating_sub(sighting.first_seen.elapsed());
            if !left.is_zero() {
                return Ok(Attempt::Held {
                    expires_in: Some(left),
                });
            }
            // A writer dead for a whole lease: free its hold, then decide again.
            shared.clear_if_version(request.key, &holder.rvn).await?;
            continue;
        }
        let (dead, mut live, soonest) = sort_entries(shared, request.key, &item, seen_at);
        if !dead.is_empty() {
            remove_dead(shared, request.key, &dead).await?;
            continue;
        }
        // An earlier attempt of this request whose answer was lost: the grant rewrites it.
        live.retain(|e| e.owner != request.owner.as_str());
        if !live.is_empty() {
            let semaphore = str_of(&item, MODE).map(String::as_str) == Some("semaphore");
            match request.kind {
                LockKind::Semaphore { permits } if semaphore => {
                    let held_with = number(&item, PERMITS)
                        .and_then(|p| u32::try_from(p).ok())
                        .unwrap_or(0);
                    if held_with != permits {
                        return Err(Error::PermitMismatch {
                            key: request.key.to_string(),
                            backend: describe.to_owned(),
                            held_with,
                            asked: permits,
                        });
                    }
                    if live.len() >= usize::try_from(permits).unwrap_or(usize::MAX) {
                        return Ok(Attempt::Held {
                            expires_in: soonest,
                        });
                    }
                }
                LockKind::Semaphore { .. } => {
                    return Err(mixed(describe, request.key, "a shared lock", request.kind))
                }
                _ if semaphore => {
                    return Err(mixed(describe, request.key, "a semaphore", request.kind))
                }
                _ => {}
            }
        }
        if request.kind == LockKind::Shared {
            if let Some(Ok(intent)) = item.get(INTENT).map(AttributeValue::as_m) {
                let rvn = str_of(intent, RVN).cloned().unwrap_or_default();
                let sighting = Observations::note_name(
                    &shared.scope,
                    &intent_name(request.key),
                    &rvn,
                    WRITER_INTENT,
                    seen_at,
                );
                let left = sighting.lease.saturating_sub(sighting.first_seen.elapsed());
                if !left.is_zero() {
                    return Ok(Attempt::Held {
                        expires_in: Some(left),
                    });
                }
                // Its writer stopped trying.
                remove_intent(shared, request.key, RVN, &rvn).await?;
                continue;
            }
        }
        let sent_at = Instant::now();
        if let Some((fence, rvn)) = grant(shared, request, &item).await? {
            return Ok(granted(shared, request, sent_at, fence, rvn));
        }
    }
    Ok(Attempt::Held {
        expires_in: Some(Duration::ZERO),
    })
}

fn granted(
    shared: &Arc<Shared>,
    request: &AcquireRequest<'_>,
    sent_at: Instant,
    fence: u64,
    rvn: String,
) -> Attempt {
    Observations::note_name(
        &shared.scope,
        &entry_name(request.key, request.owner.as_str()),
        &rvn,
        request.ttl,
        Instant::now(),
    );
    Attempt::Acquired(Granted {
        fence,
        sent_at,
        lease: Box::new(EntryLease {
            shared: Arc::clone(shared),
            key: request.key.clone(),
            owner: request.owner.clone(),
            rvn,
            unconfirmed: Vec::new(),
        }),
    })
}

fn entry_fields(request: &AcquireRequest<'_>, rvn: &str, fence: Option<u64>) -> AttributeValue {
    let now = wall_ms();
    let mut fields = HashMap::from([
        (RVN.to_owned(), s(rvn)),
        (super::TTL_MS.to_owned(), n(millis(request.ttl))),
        (super::PID.to_owned(), n(u64::from(request.holder.pid))),
        (super::HOST.to_owned(), s(&request.holder.host)),
        (super::ACQUIRED_AT.to_owned(), n(now)),
        (super::RENEWED_AT.to_owned(), n(now)),
    ]);
    if let Some(fence) = fence {
        fields.insert(FENCE.to_owned(), n(fence));
    }
    if let Some(value) = &request.holder.value {
        fields.insert(super::VALUE.to_owned(), s(value));
    }
    AttributeValue::M(fields)
}

/// The grant without a read, for a key whose `leases` map exists and whose entries
/// (dead ones included) admit the request: the rule is the write's condition, the fence
/// an `ADD`, so concurrent readers do not conflict. The entry's fence is written next.
/// `None` when the condition failed or the item has no map yet: the read path decides.
async fn quick_grant(
    shared: &Shared,
    request: &AcquireRequest<'_>,
) -> Result<Option<(u64, String)>> {
    let rvn = new_rvn();
    let (mode, permits, rule) = match request.kind {
        LockKind::Semaphore { permits } => (
            "semaphore",
            u64::from(permits),
            "(size(#leases) = :zero OR (#mode = :mode AND #permits = :permits AND size(#leases) < :permits))",
        ),
        _ => (
            "shared",
            0,
            "attribute_not_exists(#intent) AND (size(#leases) = :zero OR #mode = :mode)",
        ),
    };
    let update = shared
        .client
        .update_item()
        .table_name(&shared.settings.table)
        .key(super::KEY, s(request.key.as_str()))
        .update_expression(
            "SET #leases.#me = :entry, #mode = :mode, #permits = :permits ADD #fence :one",
        )
        .condition_expression(format!(
            "attribute_not_exists(#owner) AND attribute_exists(#leases) AND {rule}"
        ))
        .expression_attribute_names("#leases", LEASES)
        .expression_attribute_names("#me", request.owner.as_str())
        .expression_attribute_names("#owner", OWNER)
        .expression_attribute_names("#fence", FENCE)
        .expression_attribute_names("#mode", MODE)
        .expression_attribute_names("#permits", PERMITS)
        .expression_attribute_values(":entry", entry_fields(request, &rvn, None))
        .expression_attribute_values(":mode", s(mode))
        .expression_attribute_values(":permits", n(permits))
        .expression_attribute_values(":zero", n(0))
        .expression_attribute_values(":one", n(1))
        .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew);
    let update = if request.kind == LockKind::Shared {
        update.expression_attribute_names("#intent", INTENT)
    } else {
        update
    };
    let out = match shared.call("an acquire attempt", update.send()).await {
        Ok(out) => out,
        Err(Failure::Condition) => return Ok(None),
        // No map yet: the document path does not exist.
        Err(Failure::Other(_, Some(code))) if code == "ValidationException" => return Ok(None),
        Err(Failure::Other(err, _)) => return Err(err),
    };
    let Some(fence) = out.attributes.as_ref().and_then(|a| number(a, FENCE)) else {
        return Err(Error::backend(
            &shared.settings.describe,
            format!(
                "the lock item of {:?} has no valid fence",
                request.key.as_str()
            ),
        ));
    };
    let record = shared
        .client
        .update_item()
        .table_name(&shared.settings.table)
        .key(super::KEY, s(request.key.as_str()))
        .update_expression("SET #leases.#me.#fence = :fence")
        .condition_expression("#leases.#me.#rvn = :rvn")
        .expression_attribute_names("#leases", LEASES)
        .expression_attribute_names("#me", request.owner.as_str())
        .expression_attribute_names("#fence", FENCE)
        .expression_attribute_names("#rvn", RVN)
        .expression_attribute_values(":fence", n(fence))
        .expression_attribute_values(":rvn", s(&rvn));
    match shared.call("recording a fence", record.send()).await {
        // Gone already (broken by force): its holder learns it at the first renewal.
        Ok(_) | Err(Failure::Condition) => Ok(Some((fence, rvn))),
        Err(Failure::Other(err, _)) => Err(err),
    }
}

/// The conditional write of a new entry: fence still as read, no exclusive holder, and
/// for a reader no intent. `None` if another write came first.
async fn grant(
    shared: &Shared,
    request: &AcquireRequest<'_>,
    item: &Item,
) -> Result<Option<(u64, String)>> {
    let read_fence = number(item, FENCE);
    let fence = read_fence.unwrap_or(0).saturating_add(1);
    let rvn = new_rvn();
    let entry = entry_fields(request, &rvn, Some(fence));
    let has_map = matches!(item.get(LEASES), Some(AttributeValue::M(_)));
    let (set_entry, map_condition) = if has_map {
        ("#leases.#me = :entry", "attribute_exists(#leases)")
    } else {
        ("#leases = :entries", "attribute_not_exists(#leases)")
    };
    let mut condition = format!("attribute_not_exists(#owner) AND {map_condition}");
    condition.push_str(match read_fence {
        Some(_) => " AND #fence = :read",
        None => " AND attribute_not_exists(#fence)",
    });
    if request.kind == LockKind::Shared {
        condition.push_str(" AND attribute_not_exists(#intent)");
    }
    let (mode, permits) = match request.kind {
        LockKind::Semaphore { permits } => ("semaphore", u64::from(permits)),
        _ => ("shared", 0),
    };
    let mut update = shared
        .client
        .update_item()
        .table_name(&shared.settings.table)
        .key(super::KEY, s(request.key.as_str()))
        .update_expression(format!(
            "SET {set_entry}, #fence = :fence, #mode = :mode, #permits = :permits"
        ))
        .condition_expression(condition)
        .expression_attribute_names("#leases", LEASES)
        .expression_attribute_names("#owner", OWNER)
        .expression_attribute_names("#fence", FENCE)
        .expression_attribute_names("#mode", MODE)
        .expression_attribute_names("#permits", PERMITS)
        .expression_attribute_values(":fence", n(fence))
        .expression_attribute_values(":mode", s(mode))
        .expression_attribute_values(":permits", n(permits));
    if has_map {
        update = update
            .expression_attribute_names("#me", request.owner.as_str())
            .expression_attribute_values(":entry", entry);
    } else {
        update = update.expression_attribute_values(
            ":entries",
            AttributeValue::M(HashMap::from([(request.owner.as_str().to_owned(), entry)])),
        );
    }
    if let Some(read) = read_fence {
        update = update.expression_attribute_values(":read", n(read));
    }
    if request.kind == LockKind::Shared {
        update = update.expression_attribute_names("#intent", INTENT);
    }
    match shared.call("an acquire attempt", update.send()).await {
        Ok(_) => Ok(Some((fence, rvn))),
        Err(Failure::Condition) => Ok(None),
        Err(Failure::Other(err, _)) => Err(err),
    }
}

/// What a writer whose grant failed learns from the item when no exclusive holder
/// holds it: `Some(expires_in)` while live readers hold it (after leaving its intent),
/// `None` when nothing does (any dead holder's entry was removed: try again).
pub(super) async fn writer_blocked(
    shared: &Shared,
    request: &AcquireRequest<'_>,
    item: &Item,
    seen_at: Instant,
) -> Result<Option<Duration>> {
    let (dead, live, soonest) = sort_entries(shared, request.key, item, seen_at);
    if !dead.is_empty() {
        remove_dead(shared, request.key, &dead).await?;
    }
    if live.is_empty() {
        return Ok(None);
    }
    if str_of(item, MODE).map(String::as_str) == Some("semaphore") {
        return Err(mixed(
            &shared.settings.describe,
            request.key,
            "a semaphore",
            request.kind,
        ));
    }
    let intent = AttributeValue::M(HashMap::from([
        (OWNER.to_owned(), s(request.owner.as_str())),
        (RVN.to_owned(), s(&new_rvn())),
    ]));
    let update = shared
        .client
        .update_item()
        .table_name(&shared.settings.table)
        .key(super::KEY, s(request.key.as_str()))
        .update_expression("SET #intent = :intent")
        .expression_attribute_names("#intent", INTENT)
        .expression_attribute_values(":intent", intent);
    shared
        .call("recording a waiting writer", update.send())
        .await
        .map_err(|f| shared.plain(f))?;
    let retry = WRITER_INTENT / 3;
    Ok(Some(soonest.map_or(retry, |s| s.min(retry))))
}

/// Removes `owner`'s entry and intent on `key`, whatever an interrupted attempt left.
pub(super) async fn abandon(shared: &Shared, key: &Key, owner: &Owner) -> Result<()> {
    release(shared, key, owner).await?;
    remove_intent(shared, key, OWNER, owner.as_str()).await
}

/// Removes `owner`'s entry; true if it was there.
pub(super) async fn release(shared: &Shared, key: &Key, owner: &Owner) -> Result<bool> {
    let update = shared
        .client
        .update_item()
        .table_name(&shared.settings.table)
        .key(super::KEY, s(key.as_str()))
        .update_expression("REMOVE #leases.#me")
        .condition_expression("attribute_exists(#leases.#me)")
        .expression_attribute_names("#leases", LEASES)
        .expression_attribute_names("#me", owner.as_str());
    match shared.call("a release", update.send()).await {
        Ok(_) => Ok(true),
        Err(Failure::Condition) => Ok(false),
        Err(Failure::Other(err, _)) => Err(err),
    }
}

/// Most record versions of unanswered renewals an entry keeps (see the exclusive lease).
const UNCONFIRMED_KEPT: usize = 8;

/// One reader's or permit's lease: its entry in the key's item.
struct EntryLease {
    shared: Arc<Shared>,
    key: Key,
    owner: Owner,
    rvn: String,
    unconfirmed: Vec<String>,
}

#[async_trait]
impl HeldLease for EntryLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let next = new_rvn();
        if self.unconfirmed.len() >= UNCONFIRMED_KEPT {
            self.unconfirmed.remove(0);
        }
        self.unconfirmed.push(next.clone());
        let mut known = vec![self.rvn.clone()];
        known.extend(self.unconfirmed.iter().filter(|r| **r != next).cloned());
        let placeholders: Vec<String> = (0..known.len()).map(|i| format!(":k{i}")).collect();
        let mut update = self
            .shared
            .client
            .update_item()
            .table_name(&self.shared.settings.table)
            .key(super::KEY, s(self.key.as_str()))
            .update_expression(
                "SET #leases.#me.#rvn = :next, #leases.#me.#ttl = :ttl, #leases.#me.#ren = :now",
            )
            .condition_expression(format!("#leases.#me.#rvn IN ({})", placeholders.join(", ")))
            .expression_attribute_names("#leases", LEASES)
            .expression_attribute_names("#me", self.owner.as_str())
            .expression_attribute_names("#rvn", RVN)
            .expression_attribute_names("#ttl", super::TTL_MS)
            .expression_attribute_names("#ren", super::RENEWED_AT)
            .expression_attribute_values(":next", s(&next))
            .expression_attribute_values(":ttl", n(millis(ttl)))
            .expression_attribute_values(":now", n(wall_ms()));
        for (placeholder, rvn) in placeholders.iter().zip(&known) {
            update = update.expression_attribute_values(placeholder.as_str(), s(rvn));
        }
        match self.shared.call("a renewal", update.send()).await {
            Ok(_) => {
                Observations::note_name(
                    &self.shared.scope,
                    &entry_name(&self.key, self.owner.as_str()),
                    &next,
                    ttl,
                    Instant::now(),
                );
                self.rvn = next;
                self.unconfirmed.clear();
                Ok(true)
            }
            Err(Failure::Condition) => Ok(false),
            Err(Failure::Other(err, _)) => Err(err),
        }
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        release(&self.shared, &self.key, &self.owner).await
    }
}

/// The record of a key held by readers or permits, one record per entry.
pub(super) fn info_of(key: &str, item: &Item) -> Option<LockInfo> {
    let mut holders: Vec<LockInfo> = entries(item)
        .into_iter()
        .map(|e| {
            let mut info = LockInfo::new(key);
            let time = |name: &str| {
                number(&e.fields, name).map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
            };
            info.owner = Some(e.owner.clone());
            info.fence = number(&e.fields, FENCE);
            info.pid = number(&e.fields, super::PID).and_then(|p| u32::try_from(p).ok());
            info.host = str_of(&e.fields, super::HOST).cloned();
            info.value = str_of(&e.fields, super::VALUE).cloned();
            info.acquired_at = time(super::ACQUIRED_AT);
            info.renewed_at = time(super::RENEWED_AT);
            info.ttl = Some(e.lease);
            // By the holder's clock: shown to people, never used to decide anything.
            info.expires_at = info.renewed_at.map(|at| at + e.lease);
            info
        })
        .collect();
    if holders.is_empty() {
        return None;
    }
    holders.sort_by_key(|h| h.fence);
    let kind = match str_of(item, MODE).map(String::as_str) {
        Some("semaphore") => LockKind::Semaphore {
            permits: number(item, PERMITS)
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
        },
        _ => LockKind::Shared,
    };
    Some(LockInfo::of_holders(key, kind, holders))
}
