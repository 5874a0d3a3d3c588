//! The advisory-lock key of a dlock key (session mode).
//!
//! PostgreSQL advisory locks are named by one 64-bit integer, per database. A dlock key
//! (up to 1024 bytes) maps to the first 8 bytes of a SHA-256, read as a big-endian signed
//! integer, of the key *within its fence namespace*: the schema-qualified name of the
//! fence sequence the URL uses (`public.dlock_fence_seq` for the default table). Locks
//! and fences must share one namespace: two URLs that draw fences from the same sequence
//! must exclude each other, and two that draw from different sequences must not, or one
//! namespace's holder would block the other's key while both count fences on their own.
//!
//! * In the default namespace, `public.dlock_fence_seq`, the hash is of the key's UTF-8
//!   bytes alone, as it always was, so clients of earlier versions on the default table
//!   still exclude this version's.
//! * In any other namespace it is of `namespace`, a NUL byte, and the key (keys never
//!   contain NUL, so no key of one namespace can hash like a key of another).
//!
//! The mapping is stable across versions, hosts and architectures, so every dlock client
//! (and any other program that computes the same hash) locks the same advisory key.
//!
//! Collisions: two different keys collide with probability 2⁻⁶⁴ per pair (about one in
//! 10¹⁰ for a million keys in use at once). A collision can only make one key wait for the
//! other (false contention); it can never let two holders in, because the lock itself is
//! the advisory key. `status` shows the true holder of the advisory key and says so when
//! it is not a dlock lease on the asked key.

use sha2::{Digest, Sha256};

/// The fence namespace whose advisory keys are the plain hash of the key.
pub const DEFAULT_NAMESPACE: &str = "public.dlock_fence_seq";

/// The 64-bit advisory-lock key of `key` in the default namespace, and of internal locks.
pub fn advisory_key(key: &str) -> i64 {
    first_i64(&Sha256::digest(key.as_bytes()))
}

/// The 64-bit advisory-lock key of `key` among the locks whose fences come from the
/// sequence `namespace` (schema-qualified, as `pg_class`/`pg_namespace` name it).
pub fn namespaced_key(namespace: &str, key: &str) -> i64 {
    if namespace == DEFAULT_NAMESPACE {
        return advisory_key(key);
    }
    let mut hash = Sha256::new();
    hash.update(namespace.as_bytes());
    hash.update([0u8]);
    hash.update(key.as_bytes());
    first_i64(&hash.finalize())
}

fn first_i64(digest: &[u8]) -> i64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The two halves under which `pg_locks` shows a bigint advisory key: `classid` (high
/// 32 bits) and `objid` (low 32 bits), with `objsubid = 1`.
pub fn pg_locks_halves(id: i64) -> (u32, u32) {
    let bits = id as u64;
    ((bits >> 32) as u32, (bits & 0xffff_ffff) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_split() {
        // SHA-256("a") = ca978112ca1bbdca…
        assert_eq!(advisory_key("a"), 0xca97_8112_ca1b_bdca_u64 as i64);
        assert_eq!(
            pg_locks_halves(advisory_key("a")),
            (0xca97_8112, 0xca1b_bdca)
        );
        assert_ne!(advisory_key("a"), advisory_key("b"));
    }

    #[test]
    fn namespaces() {
        assert_eq!(namespaced_key(DEFAULT_NAMESPACE, "a"), advisory_key("a"));
        let other = namespaced_key("app.dlock_fence_seq", "a");
        assert_ne!(other, advisory_key("a"));
        assert_ne!(other, namespaced_key("app2.dlock_fence_seq", "a"));
        assert_eq!(other, namespaced_key("app.dlock_fence_seq", "a"));
    }
}
