//! The advisory-lock key of a dlock key (session mode).
//!
//! PostgreSQL advisory locks are named by one 64-bit integer. A dlock key (up to 1024
//! bytes) maps to the first 8 bytes of the SHA-256 of its UTF-8 bytes, read as a
//! big-endian signed integer. The mapping is stable across versions, hosts and
//! architectures, so every dlock client (and any other program that computes the same
//! hash) locks the same advisory key.
//!
//! Collisions: two different keys collide with probability 2⁻⁶⁴ per pair (about one in
//! 10¹⁰ for a million keys in use at once). A collision can only make one key wait for the
//! other (false contention); it can never let two holders in, because the lock itself is
//! the advisory key. `status` shows the true holder of the advisory key and says so when
//! it is not a dlock lease on the asked key.

use sha2::{Digest, Sha256};

/// The 64-bit advisory-lock key of `key`.
pub fn advisory_key(key: &str) -> i64 {
    let digest = Sha256::digest(key.as_bytes());
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
}
