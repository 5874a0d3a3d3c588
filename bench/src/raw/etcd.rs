//! etcd's own lock service through etcd-client: LeaseGrant, Lock (bound to the lease),
//! Unlock and LeaseRevoke — the recipe dlock's etcd backend follows (a lease per holder,
//! a key per contender bound to it, the lowest revision holds), as etcd ships it.

use super::{bounded, Token};
use etcd_client::{Client, LockOptions};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Etcd {
    client: Client,
}

impl Etcd {
    /// `etcd://host:port[,host:port…]` (no TLS or authentication).
    pub async fn connect(url: &str) -> Result<Etcd, String> {
        let rest = url.trim_start_matches("etcd://");
        let hosts = rest.split(['/', '?']).next().unwrap_or_default();
        let endpoints: Vec<String> = hosts.split(',').map(|h| format!("http://{h}")).collect();
        let client = bounded("connect to etcd", Client::connect(endpoints, None)).await?;
        Ok(Etcd { client })
    }

    pub async fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        until: Instant,
    ) -> Result<Option<Token>, String> {
        let mut client = self.client.clone();
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = bounded("grant a lease", client.lease_grant(seconds, None))
            .await?
            .id();
        let left = until.saturating_duration_since(Instant::now());
        let lock = client.lock(key, Some(LockOptions::new().with_lease(lease)));
        match tokio::time::timeout(left, lock).await {
            Ok(Ok(locked)) => Ok(Some(Token::Etcd {
                lease,
                key: locked.key().to_vec(),
            })),
            Ok(Err(err)) => {
                self.revoke(lease).await?;
                Err(format!("lock: {err}"))
            }
            // Out of time while waiting (the hand-off's end, or a fresh key that never
            // came, which the caller reports): the revoke takes the waiting key away
            // with the lease.
            Err(_) => {
                self.revoke(lease).await?;
                Ok(None)
            }
        }
    }

    pub async fn release(&self, lease: i64, key: Vec<u8>) -> Result<bool, String> {
        let mut client = self.client.clone();
        bounded("unlock", client.unlock(key)).await?;
        self.revoke(lease).await?;
        Ok(true)
    }

    async fn revoke(&self, lease: i64) -> Result<(), String> {
        let mut client = self.client.clone();
        bounded("revoke a lease", client.lease_revoke(lease))
            .await
            .map(drop)
    }
}
