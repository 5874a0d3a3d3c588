//! `dynamodb://TABLE?region=…[&endpoint=http://…]`: one item per key, taken by
//! conditional writes; a holder that stops renewing is taken over by a waiter that saw
//! its record unchanged for a whole lease, timed on the waiter's own clock.
//!
//! DynamoDB has no server clock that a condition could compare with, and comparing the
//! wall clocks of the holder's and the waiter's machines would make the lock exactly as
//! safe as their NTP. So, as the AWS DynamoDB Lock Client does:
//!
//! * Every write by a holder (acquire, renew) stores a fresh random record version
//!   (`rvn`) and the lease duration (`ttl_ms`).
//! * A waiter that finds the item held notes the `rvn` and when it first saw it, on its
//!   own monotonic clock, right after the read returned (so no earlier than the holder
//!   sent that write, from which the holder counts its lease). Once that `rvn` has been
//!   seen for `ttl_ms`, the holder has had a whole lease to renew and has not: the waiter
//!   takes the item over with the condition `rvn = :observed`, which fails if the holder
//!   renewed meanwhile.
//! * A free item (no `owner`) is taken with `attribute_not_exists(owner)`.
//!
//! What has been seen is kept per process ([`Observations`]), not per backend handle:
//! every handle of the process times on the same clock, and the holder's own writes
//! count as sightings, so a handle opened later takes over a lease that another handle
//! of this process saw (or wrote) and that went unrenewed for a lease. A process that
//! has seen nothing of a held item times it from its first attempt:
//! [`Backend::try_acquire`] takes only free items and items whose current `rvn` this
//! process has already seen for a whole lease, and otherwise answers
//! `Held { expires_in }` with the rest of that lease by its own reckoning. The engine's
//! waiting loop retries no later than that, so the default [`Backend::acquire`] already
//! waits exactly "unchanged for a full lease" and is not overridden.
//!
//! The fence is a number attribute of the item, incremented (`ADD fence :one`) in the
//! same conditional write that takes the lock, and kept across releases: a release
//! removes the owner with the condition `owner = :me` and never deletes the item.
//!
//! Readers and permits are entries of the same item, each timed by its own record
//! version in the same way (`kinds`); an exclusive grant also requires no entry.

mod config;
mod kinds;

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, LockInfo, LockKind,
};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;
pub use config::Settings;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(crate) use config::schema;

/// Attribute names; every expression refers to them through `#` placeholders, since
/// `key`, `owner`, `host` and `ttl` are reserved words in DynamoDB expressions.
const KEY: &str = "key";
const OWNER: &str = "owner";
const RVN: &str = "rvn";
const FENCE: &str = "fence";
const TTL_MS: &str = "ttl_ms";
const PID: &str = "pid";
const HOST: &str = "host";
const ACQUIRED_AT: &str = "acquired_at";
const RENEWED_AT: &str = "renewed_at";
const VALUE: &str = "value";

/// The lease assumed for a held item without a readable `ttl_ms` (written by hand).
const FALLBACK_LEASE: Duration = Duration::from_secs(60);

/// How long opening may wait for a table it created to become usable.
const TABLE_ACTIVE_WAIT: Duration = Duration::from_secs(30);

/// Error codes that mean "try again later" rather than "this will not work".
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "TransactionConflictException",
    "LimitExceededException",
];

const CONDITION_FAILED: &str = "ConditionalCheckFailedException";
const TABLE_MISSING: &str = "ResourceNotFoundException";
const TABLE_EXISTS: &str = "ResourceInUseException";

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

fn s(text: &str) -> AttributeValue {
    AttributeValue::S(text.to_owned())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn new_rvn() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What one DynamoDB call ended with, beyond success.
enum Failure {
    /// The condition of a conditional write did not hold.
    Condition,
    /// Anything else, as the crate's error, with the service's error code if any.
    Other(Error, Option<String>),
}

/// A sighting of one record version, by this process.
#[derive(Debug, Clone)]
struct Sighting {
    rvn: String,
    lease: Duration,
    first_seen: Instant,
}

/// The record versions this process has seen, per table and key, with when each was
/// first seen: what a takeover waits on.
#[derive(Debug, Default)]
struct Observations {
    seen: HashMap<(Arc<str>, String), Sighting>,
}

/// More entries than this and the stale ones are dropped; forgetting a sighting only
/// makes a waiter time that lease again.
const OBSERVATIONS_KEPT: usize = 4096;

impl Observations {
    fn process() -> &'static Mutex<Observations> {
        static SEEN: OnceLock<Mutex<Observations>> = OnceLock::new();
        SEEN.get_or_init(Mutex::default)
    }

    /// Notes that `rvn` was current at `at`; returns the sighting with the first time
    /// this process saw that version.
    fn note(scope: &Arc<str>, key: &Key, rvn: &str, lease: Duration, at: Instant) -> Sighting {
        Self::note_name(scope, key.as_str(), rvn, lease, at)
    }

    /// [`note`](Self::note) for any record of the item: the key's own, or one of its
    /// entries (`key`, NUL, the entry's name).
    fn note_name(
        scope: &Arc<str>,
        name: &str,
        rvn: &str,
        lease: Duration,
        at: Instant,
    ) -> Sighting {
        let Ok(mut all) = Self::process().lock() else {
            // A poisoned table only loses history: time this version from now.
            return Sighting {
                rvn: rvn.to_owned(),
                lease,
                first_seen: at,
            };
        };
        if all.seen.len() >= OBSERVATIONS_KEPT {
            all.seen.retain(|_, s| {
                s.first_seen.elapsed() < s.lease.saturating_add(Duration::from_secs(600))
            });
        }
        let entry = all
            .seen
            .entry((Arc::clone(scope), name.to_owned()))
            .or_insert_with(|| Sighting {
                rvn: rvn.to_owned(),
                lease,
                first_seen: at,
            });
        if entry.rvn != rvn {
            *entry = Sighting {
                rvn: rvn.to_owned(),
                lease,
                first_seen: at,
            };
        } else {
            entry.lease = lease;
        }
        entry.clone()
    }

    /// The version of `key` this process has seen unchanged for a whole lease, if any.
    fn ripe(scope: &Arc<str>, key: &Key) -> Option<String> {
        let all = Self::process().lock().ok()?;
        let sighting = all
            .seen
            .get(&(Arc::clone(scope), key.as_str().to_owned()))?;
        (sighting.first_seen.elapsed() >= sighting.lease).then(|| sighting.rvn.clone())
    }

    fn forget(scope: &Arc<str>, key: &Key) {
        if let Ok(mut all) = Self::process().lock() {
            all.seen
                .remove(&(Arc::clone(scope), key.as_str().to_owned()));
        }
    }
}

/// What a read of one item tells about its holder.
struct Holder {
    owner: String,
    rvn: String,
    lease: Duration,
}

fn holder_of(item: &HashMap<String, AttributeValue>) -> Option<Holder> {
    let owner = item.get(OWNER)?.as_s().ok()?.clone();
    let rvn = item
        .get(RVN)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default();
    let lease = number(item, TTL_MS)
        .map(Duration::from_millis)
        .unwrap_or(FALLBACK_LEASE);
    Some(Holder { owner, rvn, lease })
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

fn system_time(item: &HashMap<String, AttributeValue>, name: &str) -> Option<SystemTime> {
    number(item, name).map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

/// What the backend and its leases share.
struct Shared {
    settings: Settings,
    client: Client,
    /// The endpoint (or region) and table, naming this table among all the process sees.
    scope: Arc<str>,
}

impl Shared {
    /// Maps an SDK error: throttling, server errors, timeouts and unreachable endpoints
    /// are transient; a failed condition is [`Failure::Condition`]; the rest (access
    /// denied, validation, a missing table) fails fast.
    fn failure<E>(&self, what: &str, err: SdkError<E>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let describe = self.settings.describe.as_str();
        let code = err.code().map(str::to_owned);
        if code.as_deref() == Some(CONDITION_FAILED) {
            return Failure::Condition;
        }
        let status = err.raw_response().map(|r| r.status().as_u16());
        let transient = match &err {
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => true,
            SdkError::ServiceError(_) => {
                code.as_deref()
                    .is_some_and(|c| TRANSIENT_CODES.contains(&c))
                    || status.is_some_and(|s| s >= 500)
            }
            _ => false,
        };
        let detail = match code.as_deref() {
            Some(TABLE_MISSING) => format!(
                "{what}: the table {:?} does not exist; `dlock schema --backend URL` prints the command that creates it",
                self.settings.table
            ),
            _ => format!("{what}: {}", one_line(&DisplayErrorContext(&err).to_string())),
        };
        let error = if transient {
            Error::unavailable(describe, detail).caused_by(err)
        } else {
            Error::backend(describe, detail).caused_by(err)
        };
        Failure::Other(error, code)
    }

    /// Runs one SDK call, bounded by the operation timeout even where the SDK's own
    /// timeouts do not reach (credential resolution, a stalled body).
    async fn call<T, E>(
        &self,
        what: &str,
        call: impl Future<Output = std::result::Result<T, SdkError<E>>>,
    ) -> std::result::Result<T, Failure>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(self.failure(what, err)),
            Err(_) => Err(Failure::Other(
                Error::unavailable(
                    &self.settings.describe,
                    format!(
                        "{what} got no answer within {}",
                        crate::duration::format_duration(self.settings.timeout)
                    ),
                ),
                None,
            )),
        }
    }

    /// The item of `key`, read consistently.
    async fn read(&self, key: &Key) -> Result<Option<HashMap<String, AttributeValue>>> {
        let out = self
            .call(
                "reading the lock",
                self.client
                    .get_item()
                    .table_name(&self.settings.table)
                    .key(KEY, s(key.as_str()))
                    .consistent_read(true)
                    .send(),
            )
            .await
            .map_err(|f| self.plain(f))?;
        Ok(out.item)
    }

    fn plain(&self, failure: Failure) -> Error {
        match failure {
            Failure::Other(err, _) => err,
            Failure::Condition => Error::backend(
                &self.settings.describe,
                "a write without a condition failed its condition",
            ),
        }
    }

    /// Removes the holder of `key`: `owner`'s hold only, or anybody's when `None`. True
    /// if the item was held (by that owner). The item and its fence stay.
    async fn clear(&self, key: &Key, owner: Option<&Owner>) -> Result<bool> {
        let mut update = self
            .client
            .update_item()
            .table_name(&self.settings.table)
            .key(KEY, s(key.as_str()))
            .update_expression("REMOVE #owner, #ttl, #pid, #host, #acq, #ren SET #rvn = :rvn")
            .expression_attribute_names("#owner", OWNER)
            .expression_attribute_names("#ttl", TTL_MS)
            .expression_attribute_names("#pid", PID)
            .expression_attribute_names("#host", HOST)
            .expression_attribute_names("#acq", ACQUIRED_AT)
            .expression_attribute_names("#ren", RENEWED_AT)
            .expression_attribute_names("#rvn", RVN)
            .expression_attribute_values(":rvn", s(&new_rvn()));
        update = match owner {
            Some(owner) => update
                .condition_expression("#owner = :me")
                .expression_attribute_values(":me", s(owner.as_str())),
            // Every reader and permit goes too: their renewals then find no entry.
            None => update
                .update_expression(
                    "REMOVE #owner, #ttl, #pid, #host, #acq, #ren SET #rvn = :rvn, #leases = :none",
                )
                .condition_expression(
                    "attribute_exists(#owner) OR (attribute_exists(#leases) AND size(#leases) > :zero)",
                )
                .expression_attribute_names("#leases", kinds::LEASES)
                .expression_attribute_values(":none", AttributeValue::M(HashMap::new()))
                .expression_attribute_values(":zero", n(0)),
        };
        match self.call("a release", update.send()).await {
            Ok(_) => {
                Observations::forget(&self.scope, key);
                Ok(true)
            }
            Err(Failure::Condition) => Ok(false),
            Err(Failure::Other(err, _)) => Err(err),
        }
    }

    /// Removes the exclusive holder of `key` if its record is still in version `rvn`
    /// (seen unchanged for a whole lease).
    async fn clear_if_version(&self, key: &Key, rvn: &str) -> Result<()> {
        let update = self
            .client
            .update_item()
            .table_name(&self.settings.table)
            .key(KEY, s(key.as_str()))
            .update_expression("REMOVE #owner SET #rvn = :rvn")
            .condition_expression("#rvn = :seen")
            .expression_attribute_names("#owner", OWNER)
            .expression_attribute_names("#rvn", RVN)
            .expression_attribute_values(":seen", s(rvn))
            .expression_attribute_values(":rvn", s(&new_rvn()));
        match self.call("taking over a dead holder", update.send()).await {
            Ok(_) | Err(Failure::Condition) => Ok(()),
            Err(Failure::Other(err, _)) => Err(err),
        }
    }

    /// One conditional write that takes `key` if it is free, or if its record version
    /// is still `ripe` (seen unchanged for a whole lease). Returns the new fence and
    /// record version, or `None` if the condition failed.
    async fn take(
        &self,
        request: &AcquireRequest<'_>,
        ripe: Option<&str>,
    ) -> Result<Option<(u64, String)>> {
        let rvn = new_rvn();
        let now = wall_ms();
        let mut update = self
            .client
            .update_item()
            .table_name(&self.settings.table)
            .key(KEY, s(request.key.as_str()))
            .update_expression(match request.holder.value {
                Some(_) => "SET #owner = :owner, #rvn = :rvn, #ttl = :ttl, #pid = :pid, #host = :host, #acq = :now, #ren = :now, #value = :value ADD #fence :one REMOVE #intent",
                None => "SET #owner = :owner, #rvn = :rvn, #ttl = :ttl, #pid = :pid, #host = :host, #acq = :now, #ren = :now ADD #fence :one REMOVE #intent, #value",
            })
            .expression_attribute_names("#value", VALUE)
            .expression_attribute_names("#intent", kinds::INTENT)
            .expression_attribute_names("#leases", kinds::LEASES)
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_names("#owner", OWNER)
            .expression_attribute_names("#rvn", RVN)
            .expression_attribute_names("#ttl", TTL_MS)
            .expression_attribute_names("#pid", PID)
            .expression_attribute_names("#host", HOST)
            .expression_attribute_names("#acq", ACQUIRED_AT)
            .expression_attribute_names("#ren", RENEWED_AT)
            .expression_attribute_names("#fence", FENCE)
            .expression_attribute_values(":owner", s(request.owner.as_str()))
            .expression_attribute_values(":rvn", s(&rvn))
            .expression_attribute_values(":ttl", n(millis(request.ttl)))
            .expression_attribute_values(":pid", n(u64::from(request.holder.pid)))
            .expression_attribute_values(":host", s(&request.holder.host))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::UpdatedNew);
        if let Some(value) = &request.holder.value {
            update = update.expression_attribute_values(":value", s(value));
        }
        // Readers and permits keep a writer out until their entries go.
        update = match ripe {
            Some(seen) => update
                .condition_expression("(attribute_not_exists(#owner) OR #rvn = :seen) AND (attribute_not_exists(#leases) OR size(#leases) = :zero)")
                .expression_attribute_values(":seen", s(seen)),
            None => update.condition_expression("attribute_not_exists(#owner) AND (attribute_not_exists(#leases) OR size(#leases) = :zero)"),
        };
        match self.call("an acquire attempt", update.send()).await {
            Ok(out) => {
                let fence = out
                    .attributes
                    .as_ref()
                    .and_then(|a| number(a, FENCE))
                    .ok_or_else(|| {
                        Error::backend(
                            &self.settings.describe,
                            format!(
                                "the lock item of {:?} has no valid fence",
                                request.key.as_str()
                            ),
                        )
                    })?;
                Ok(Some((fence, rvn)))
            }
            Err(Failure::Condition) => Ok(None),
            Err(Failure::Other(err, _)) => Err(err),
        }
    }

    /// Renews a lock that an earlier, unanswered attempt of `request` took: condition
    /// `owner = :me AND rvn = :seen`. Returns its fence and new record version, or `None`
    /// if it changed meanwhile.
    async fn reclaim(
        &self,
        request: &AcquireRequest<'_>,
        seen: &str,
    ) -> Result<Option<(u64, String)>> {
        let rvn = new_rvn();
        let update = self
            .client
            .update_item()
            .table_name(&self.settings.table)
            .key(KEY, s(request.key.as_str()))
            .update_expression("SET #rvn = :rvn, #ttl = :ttl, #ren = :now")
            .condition_expression("#owner = :me AND #rvn = :seen")
            .expression_attribute_names("#owner", OWNER)
            .expression_attribute_names("#rvn", RVN)
            .expression_attribute_names("#ttl", TTL_MS)
            .expression_attribute_names("#ren", RENEWED_AT)
            .expression_attribute_values(":me", s(request.owner.as_str()))
            .expression_attribute_values(":seen", s(seen))
            .expression_attribute_values(":rvn", s(&rvn))
            .expression_attribute_values(":ttl", n(millis(request.ttl)))
            .expression_attribute_values(":now", n(wall_ms()))
            .return_values(ReturnValue::AllNew);
        match self.call("an acquire attempt", update.send()).await {
            Ok(out) => Ok(out
                .attributes
                .as_ref()
                .and_then(|a| number(a, FENCE))
                .map(|fence| (fence, rvn))),
            Err(Failure::Condition) => Ok(None),
            Err(Failure::Other(err, _)) => Err(err),
        }
    }

    fn info_of(&self, item: &HashMap<String, AttributeValue>) -> Option<LockInfo> {
        let key = item.get(KEY)?.as_s().ok()?;
        let Some(holder) = holder_of(item) else {
            return kinds::info_of(key, item);
        };
        let mut info = LockInfo::new(key.clone());
        info.owner = Some(holder.owner);
        info.fence = number(item, FENCE);
        info.pid = number(item, PID).and_then(|p| u32::try_from(p).ok());
        info.host = item.get(HOST).and_then(|v| v.as_s().ok()).cloned();
        info.value = item.get(VALUE).and_then(|v| v.as_s().ok()).cloned();
        info.acquired_at = system_time(item, ACQUIRED_AT);
        info.renewed_at = system_time(item, RENEWED_AT);
        info.ttl = number(item, TTL_MS).map(Duration::from_millis);
        // By the holder's clock: shown to people, never used to decide anything.
        info.expires_at = info.renewed_at.zip(info.ttl).map(|(at, ttl)| at + ttl);
        let stale = Key::new(key.clone()).ok().and_then(|k| {
            let all = Observations::process().lock().ok()?;
            let seen = all
                .seen
                .get(&(Arc::clone(&self.scope), k.as_str().to_owned()))?;
            (seen.rvn == holder.rvn && seen.first_seen.elapsed() >= seen.lease)
                .then(|| seen.first_seen.elapsed())
        });
        if let Some(unchanged) = stale {
            info.note = Some(format!(
                "not renewed for {} as seen from here: the holder may be dead, and the next waiter takes the lock over",
                crate::duration::format_duration(Duration::from_millis(millis(unchanged)))
            ));
        }
        Some(info)
    }
}

fn one_line(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > 400 {
        let mut end = 400;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &line[..end])
    } else {
        line
    }
}

/// The DynamoDB backend.
#[derive(Clone)]
pub struct DynamoBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DynamoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoBackend")
            .field("url", &self.shared.settings.describe)
            .field("table", &self.shared.settings.table)
            .finish_non_exhaustive()
    }
}

impl DynamoBackend {
    /// Builds the client (credentials and region from the standard AWS chain, unless the
    /// URL names the region) and makes sure the table exists, creating it when missing
    /// and allowed.
    pub async fn connect(settings: Settings) -> Result<Self> {
        use aws_config::retry::RetryConfig;
        use aws_config::timeout::TimeoutConfig;
        use aws_smithy_http_client::tls;

        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let attempt = (settings.timeout / 2).max(Duration::from_millis(200));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(settings.connect_timeout.min(settings.timeout))
            .operation_attempt_timeout(attempt)
            .operation_timeout(settings.timeout)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts)
            // Few, quick retries: a waiter retries transient failures itself, and a
            // renewal must answer within a fraction of its TTL.
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(2)
                    .with_initial_backoff(Duration::from_millis(50))
                    .with_max_backoff(Duration::from_millis(500)),
            );
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let sdk =
            match tokio::time::timeout(settings.timeout, loader.load()).await {
                Ok(sdk) => sdk,
                Err(_) => return Err(Error::unavailable(
                    &settings.describe,
                    "loading the AWS configuration (region, credentials) did not finish in time",
                )),
            };
        if sdk.region().is_none() {
            return Err(Error::BadUrl {
                url: settings.describe.clone(),
                reason: "no AWS region: add ?region=us-east-1 (or set AWS_REGION)".to_owned(),
            });
        }
        let scope: Arc<str> = Arc::from(format!(
            "{}|{}|{}",
            settings.endpoint.as_deref().unwrap_or(""),
            sdk.region().map(|r| r.as_ref()).unwrap_or(""),
            settings.table
        ));
        let client = Client::new(&sdk);
        let shared = Arc::new(Shared {
            settings,
            client,
            scope,
        });
        ensure_table(&shared).await?;
        Ok(DynamoBackend { shared })
    }
}

/// Checks that the table exists; creates it (on-demand billing) when it does not and the
/// URL allows, and waits until it is active.
async fn ensure_table(shared: &Shared) -> Result<()> {
    let table = &shared.settings.table;
    let describe = || shared.client.describe_table().table_name(table).send();
    let status = match shared.call("describing the table", describe()).await {
        Ok(out) => out.table.and_then(|t| t.table_status),
        Err(Failure::Other(_, Some(code))) if code == TABLE_MISSING => {
            if !shared.settings.create_table {
                return Err(Error::backend(
                    &shared.settings.describe,
                    format!("the table {table:?} does not exist and ?create_table=false; `dlock schema --backend URL` prints the command that creates it"),
                ));
            }
            create_table(shared).await?;
            None
        }
        // Credentials allowed to use items but not to describe tables: the item calls
        // will tell whether the table is there.
        Err(Failure::Other(err, Some(code))) if code.starts_with("AccessDenied") => {
            tracing::debug!(%err, "cannot describe the table; assuming it exists");
            return Ok(());
        }
        Err(failure) => return Err(shared.plain(failure)),
    };
    if status == Some(TableStatus::Active) {
        return Ok(());
    }
    let until = Instant::now() + TABLE_ACTIVE_WAIT;
    loop {
        let out = shared
            .call("waiting for the table", describe())
            .await
            .map_err(|f| shared.plain(f))?;
        match out.table.and_then(|t| t.table_status) {
            Some(TableStatus::Active) => return Ok(()),
            _ if Instant::now() >= until => {
                return Err(Error::unavailable(
                    &shared.settings.describe,
                    format!(
                        "the table {table:?} was not active within {}",
                        crate::duration::format_duration(TABLE_ACTIVE_WAIT)
                    ),
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn create_table(shared: &Shared) -> Result<()> {
    let describe = shared.settings.describe.as_str();
    let invalid = |err: aws_sdk_dynamodb::error::BuildError| {
        Error::backend(describe, format!("building the table definition: {err}"))
    };
    let attribute = AttributeDefinition::builder()
        .attribute_name(KEY)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(invalid)?;
    let schema = KeySchemaElement::builder()
        .attribute_name(KEY)
        .key_type(KeyType::Hash)
        .build()
        .map_err(invalid)?;
    let create = shared
        .client
        .create_table()
        .table_name(&shared.settings.table)
        .attribute_definitions(attribute)
        .key_schema(schema)
        .billing_mode(BillingMode::PayPerRequest)
        .send();
    match shared.call("creating the table", create).await {
        Ok(_) => Ok(()),
        Err(Failure::Other(_, Some(code))) if code == TABLE_EXISTS => Ok(()),
        Err(Failure::Other(err, Some(code))) if code.starts_with("AccessDenied") => {
            Err(Error::backend(
                describe,
                format!(
                    "the table {:?} does not exist and these credentials may not create it; an administrator can run the command `dlock schema --backend URL` prints",
                    shared.settings.table
                ),
            )
            .caused_by(err))
        }
        Err(failure) => Err(shared.plain(failure)),
    }
}

/// Opens `dynamodb://…`.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(
        DynamoBackend::connect(Settings::parse(url)?).await?,
    ))
}

/// Most record versions of renewals whose answer never came that a lease keeps: one of
/// them may have landed, and is then the version the next renewal must find.
const UNCONFIRMED_KEPT: usize = 8;

/// One held lease: its key, owner token and the record version it last wrote.
struct DynamoLease {
    shared: Arc<Shared>,
    key: Key,
    owner: Owner,
    rvn: String,
    unconfirmed: Vec<String>,
}

#[async_trait]
impl HeldLease for DynamoLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let next = new_rvn();
        // Recorded before sending: if this call is dropped after its write landed, the
        // next renewal still finds the item in a version it knows.
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
            .key(KEY, s(self.key.as_str()))
            .update_expression("SET #rvn = :next, #ttl = :ttl, #ren = :now")
            .condition_expression(format!(
                "#owner = :me AND #rvn IN ({})",
                placeholders.join(", ")
            ))
            .expression_attribute_names("#owner", OWNER)
            .expression_attribute_names("#rvn", RVN)
            .expression_attribute_names("#ttl", TTL_MS)
            .expression_attribute_names("#ren", RENEWED_AT)
            .expression_attribute_values(":me", s(self.owner.as_str()))
            .expression_attribute_values(":next", s(&next))
            .expression_attribute_values(":ttl", n(millis(ttl)))
            .expression_attribute_values(":now", n(wall_ms()));
        for (placeholder, rvn) in placeholders.iter().zip(&known) {
            update = update.expression_attribute_values(placeholder.as_str(), s(rvn));
        }
        match self.shared.call("a renewal", update.send()).await {
            Ok(_) => {
                Observations::note(&self.shared.scope, &self.key, &next, ttl, Instant::now());
                self.rvn = next;
                self.unconfirmed.clear();
                Ok(true)
            }
            Err(Failure::Condition) => Ok(false),
            Err(Failure::Other(err, _)) => Err(err),
        }
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        self.shared.clear(&self.key, Some(&self.owner)).await
    }
}

#[async_trait]
impl Backend for DynamoBackend {
    fn describe(&self) -> &str {
        &self.shared.settings.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shared_locks: true,
            semaphores: true,
            ..Capabilities::expiring()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let shared = &self.shared;
        if request.kind != LockKind::Exclusive {
            return kinds::try_acquire(shared, request).await;
        }
        let mut ripe = Observations::ripe(&shared.scope, request.key);
        // At most one more write after the read: when the read shows the item free, or
        // shows a version this process has already seen for a whole lease.
        for _ in 0..2 {
            let sent_at = Instant::now();
            if let Some((fence, rvn)) = shared.take(request, ripe.as_deref()).await? {
                Observations::note(
                    &shared.scope,
                    request.key,
                    &rvn,
                    request.ttl,
                    Instant::now(),
                );
                return Ok(Attempt::Acquired(Granted {
                    fence,
                    sent_at,
                    lease: Box::new(DynamoLease {
                        shared: Arc::clone(shared),
                        key: request.key.clone(),
                        owner: request.owner.clone(),
                        rvn,
                        unconfirmed: Vec::new(),
                    }),
                }));
            }
            let item = shared.read(request.key).await?;
            let seen_at = Instant::now();
            let Some(holder) = item.as_ref().and_then(holder_of) else {
                // Readers or permits hold it, or it was released between the write and
                // the read.
                if let Some(item) = &item {
                    if let Some(left) =
                        kinds::writer_blocked(shared, request, item, seen_at).await?
                    {
                        return Ok(Attempt::Held {
                            expires_in: Some(left),
                        });
                    }
                }
                ripe = None;
                continue;
            };
            if holder.owner == request.owner.as_str() {
                // An earlier attempt of this request landed although its answer was
                // lost: the lock is ours, counted from a write whose sending we time.
                let sent_at = Instant::now();
                if let Some((fence, rvn)) = shared.reclaim(request, &holder.rvn).await? {
                    Observations::note(
                        &shared.scope,
                        request.key,
                        &rvn,
                        request.ttl,
                        Instant::now(),
                    );
                    return Ok(Attempt::Acquired(Granted {
                        fence,
                        sent_at,
                        lease: Box::new(DynamoLease {
                            shared: Arc::clone(shared),
                            key: request.key.clone(),
                            owner: request.owner.clone(),
                            rvn,
                            unconfirmed: Vec::new(),
                        }),
                    }));
                }
                ripe = None;
                continue;
            }
            let sighting = Observations::note(
                &shared.scope,
                request.key,
                &holder.rvn,
                holder.lease,
                seen_at,
            );
            let remaining = sighting.lease.saturating_sub(sighting.first_seen.elapsed());
            if remaining.is_zero() && ripe.as_deref() != Some(holder.rvn.as_str()) {
                ripe = Some(holder.rvn);
                continue;
            }
            return Ok(Attempt::Held {
                expires_in: Some(remaining),
            });
        }
        Ok(Attempt::Held {
            expires_in: Some(Duration::ZERO),
        })
    }

    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        self.shared.clear(key, Some(owner)).await?;
        kinds::abandon(&self.shared, key, owner).await
    }
}

#[async_trait]
impl Admin for DynamoBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let item = self.shared.read(key).await?;
        let seen_at = Instant::now();
        let Some(item) = item else { return Ok(None) };
        if let Some(holder) = holder_of(&item) {
            Observations::note(&self.shared.scope, key, &holder.rvn, holder.lease, seen_at);
        }
        Ok(self.shared.info_of(&item))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let shared = &self.shared;
        let mut all = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = shared
                .call(
                    "listing the locks",
                    shared
                        .client
                        .scan()
                        .table_name(&shared.settings.table)
                        // An empty `leases` map is dropped below: moto refuses size() in a
                        // scan's filter.
                        .filter_expression("attribute_exists(#owner) OR attribute_exists(#leases)")
                        .expression_attribute_names("#owner", OWNER)
                        .expression_attribute_names("#leases", kinds::LEASES)
                        .consistent_read(true)
                        .set_exclusive_start_key(start.take())
                        .send(),
                )
                .await
                .map_err(|f| shared.plain(f))?;
            all.extend(out.items().iter().filter_map(|item| shared.info_of(item)));
            match out.last_evaluated_key {
                Some(next) if !next.is_empty() => start = Some(next),
                _ => break,
            }
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        self.shared.clear(key, None).await
    }
}
