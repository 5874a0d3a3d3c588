//! How dlock's keys, owners and holders are written into etcd.
//!
//! A lock key `k` owns the etcd range `<prefix><escape(k)>/`; every contender puts one
//! etcd key `<prefix><escape(k)>/<lease id, 16 hex digits>` in it. `/` and `%` are
//! percent-escaped in the lock key so that the range of `a` never contains the keys of
//! `a/b` (which live under `a%2Fb/`).

use crate::core::backend::{AcquireRequest, LockInfo, LockKind};
use crate::core::owner::Owner;
use crate::key::Key;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The lock key with `%` and `/` escaped.
fn escape(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for text that [`escape`] cannot have written.
fn unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("%25") => out.push('%'),
            Some("%2F") => out.push('/'),
            _ => return None,
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// The etcd range of one lock key: `<prefix><escaped key>/`.
pub fn range_of(prefix: &str, key: &Key) -> Vec<u8> {
    format!("{prefix}{}/", escape(key.as_str())).into_bytes()
}

/// The etcd key of one contender for `key`, holding etcd lease `lease`.
pub fn entry_of(prefix: &str, key: &Key, lease: i64) -> Vec<u8> {
    let mut entry = range_of(prefix, key);
    entry.extend_from_slice(format!("{lease:016x}").as_bytes());
    entry
}

/// The lock key of an etcd key under `prefix`, if it is one of ours.
pub fn key_of_entry(prefix: &str, entry: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(entry).ok()?.strip_prefix(prefix)?;
    let (escaped, lease) = text.rsplit_once('/')?;
    if lease.len() != 16 || !lease.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    unescape(escaped)
}

/// The etcd lease ID of the lease an acquire with `owner` takes: a function of the owner
/// token alone, so that a cancelled or timed-out attempt can be cleaned up by owner
/// ([`Backend::abandon`](crate::core::backend::Backend::abandon)) even when its caller
/// never learned what the store granted. The token has 128 random bits; its hash keeps
/// 63 of them (etcd lease IDs are positive i64).
pub fn lease_of(owner: &Owner) -> i64 {
    let digest = Sha256::digest(owner.as_str().as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    let id = i64::from_be_bytes(bytes) & i64::MAX;
    if id == 0 {
        1
    } else {
        id
    }
}

/// The holder record, stored as the value of each contender's etcd key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquired_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// `"shared"` or `"semaphore"`; absent for an exclusive lease, so that records
    /// written before the kinds existed still read as exclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A semaphore's number of permits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// The value the holder published (an election's leader value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Record {
    pub fn new(request: &AcquireRequest<'_>) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Record {
            owner: request.owner.to_string(),
            pid: Some(request.holder.pid),
            host: Some(request.holder.host.clone()),
            acquired_at_ms: Some(millis(now)),
            ttl_ms: Some(millis(request.ttl)),
            kind: crate::core::backend::kind_name(request.kind).map(str::to_owned),
            permits: match request.kind {
                LockKind::Semaphore { permits } => Some(permits),
                _ => None,
            },
            value: request.holder.value.clone(),
        }
    }

    /// The kind of lease this record was written for; a record of another program, or
    /// of an unknown kind, counts as exclusive (it blocks everybody).
    pub fn kind(&self) -> LockKind {
        match (self.kind.as_deref(), self.permits) {
            (Some("shared"), _) => LockKind::Shared,
            (Some("semaphore"), Some(permits)) => LockKind::Semaphore { permits },
            _ => LockKind::Exclusive,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(value: &[u8]) -> Option<Record> {
        serde_json::from_slice(value).ok()
    }

    /// What `status` shows for the holder with this record and fence.
    pub fn info(record: Option<Record>, key: String, fence: u64) -> LockInfo {
        let mut info = LockInfo::new(key);
        info.fence = Some(fence);
        match record {
            Some(record) => {
                info.owner = Some(record.owner);
                info.pid = record.pid;
                info.host = record.host;
                info.acquired_at = record
                    .acquired_at_ms
                    .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
                info.ttl = record.ttl_ms.map(Duration::from_millis);
                info.value = record.value;
            }
            None => {
                info.note = Some("held by an etcd key without a dlock record".to_owned());
            }
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_keys_have_disjoint_ranges() {
        let a = Key::new("a").unwrap();
        let ab = Key::new("a/b").unwrap();
        let entry = entry_of("p/", &ab, 7);
        assert!(!entry.starts_with(&range_of("p/", &a)));
        assert_eq!(key_of_entry("p/", &entry).as_deref(), Some("a/b"));
        let odd = Key::new("100%/x%2F").unwrap();
        assert_eq!(
            key_of_entry("p/", &entry_of("p/", &odd, i64::MAX)).as_deref(),
            Some("100%/x%2F")
        );
        assert_eq!(key_of_entry("p/", b"p/a/zz"), None);
        assert_eq!(key_of_entry("q/", &entry), None);
    }

    #[test]
    fn lease_ids_are_positive_and_deterministic() {
        let owner = Owner::random();
        assert_eq!(lease_of(&owner), lease_of(&owner));
        assert!(lease_of(&owner) > 0);
        assert_ne!(lease_of(&owner), lease_of(&Owner::random()));
    }
}
