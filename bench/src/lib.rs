//! What the benchmarks share: the pgbench scripts built from dlock's own statements.

#[cfg(feature = "postgres")]
pub mod pgbench;
